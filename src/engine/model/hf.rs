//! Hugging Face model directories: `config.json`, `*.safetensors` (sharded too), `tokenizer.json`.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ModelError, Result};

/// The parts of `config.json` that pick the architecture.
#[derive(Debug, Deserialize)]
pub struct ArchProbe {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
}

pub fn read_config(dir: &Path) -> Result<(PathBuf, String)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    Ok((path, text))
}

/// Weight files in load order: the shard index when present, else every `*.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: index.clone(),
            msg: e.to_string(),
        })?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                msg: "`weight_map` is missing".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Config {
            path: dir.to_path_buf(),
            msg: "no *.safetensors weights in the directory".into(),
        });
    }
    Ok(files)
}
