//! Trained editors on disk: `<dir>/<id>/editor.safetensors` and `provenance.json` (model
//! sha256, data file and hash, hyper-parameters, validation curve, duration). An id is the
//! method and the first 16 hex digits of the editor file's sha256, so the same training gives
//! the same id. Artefacts are written to a temporary folder and renamed into place: a reader
//! never sees half of one.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::mend_net::MendNet;
use super::run::{TrainConfig, Validation};
use super::serac::ScopeNet;
use super::TrainingError;

/// Where an artefact came from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Provenance {
    pub id: String,
    pub method: String,
    /// sha256 of the model file it was trained on.
    pub model_sha256: String,
    /// The training file, relative to the data directory.
    pub data_file: String,
    pub data_sha256: String,
    #[schema(value_type = Object)]
    pub config: TrainConfig,
    /// The trained network's dimensions (MEND: edited layers, widths, rank; SERAC: the pooled
    /// layer, hidden size, width).
    #[schema(value_type = Object)]
    pub net: serde_json::Value,
    pub steps: usize,
    /// Validation on the held-back records, every `val_every` steps and at the end.
    pub validation: Vec<Validation>,
    pub duration_s: f64,
    /// RFC 3339.
    pub created_at: String,
}

/// Tensor `name` of an artefact's `tensors`, checked to have `dims`, as f32.
pub(super) fn checked(
    tensors: &HashMap<String, Tensor>,
    name: &str,
    dims: &[usize],
) -> Result<Tensor, TrainingError> {
    let x = tensors
        .get(name)
        .ok_or_else(|| TrainingError::Artefact(format!("tensor `{name}` is missing")))?;
    if x.dims() != dims {
        return Err(TrainingError::Artefact(format!(
            "tensor `{name}` is {:?}, expected {dims:?}",
            x.dims()
        )));
    }
    Ok(x.to_dtype(candle_core::DType::F32)?)
}

/// A trained network: MEND's gradient transform or SERAC's scope classifier.
pub enum TrainedEditor {
    Mend(MendNet),
    Serac(ScopeNet),
}

impl TrainedEditor {
    /// Every trainable variable.
    pub fn vars(&self) -> Vec<Var> {
        match self {
            Self::Mend(n) => n.vars(),
            Self::Serac(n) => n.vars(),
        }
    }

    /// The network as named tensors (an artefact's body).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>, TrainingError> {
        match self {
            Self::Mend(n) => n.tensors(),
            Self::Serac(n) => Ok(n.tensors()),
        }
    }

    /// The network's dimensions, as provenance records them.
    pub fn shape(&self) -> serde_json::Value {
        match self {
            Self::Mend(n) => serde_json::to_value(&n.shape),
            Self::Serac(n) => serde_json::to_value(&n.shape),
        }
        .unwrap_or_default()
    }

    /// The `method` network `tensors` wrote, of dimensions `shape`.
    pub fn from_tensors(
        method: &str,
        shape: &serde_json::Value,
        tensors: &HashMap<String, Tensor>,
        dev: &Device,
    ) -> Result<Self, TrainingError> {
        let bad = |e: serde_json::Error| TrainingError::Artefact(format!("net dimensions: {e}"));
        match method {
            "mend" => Ok(Self::Mend(MendNet::from_tensors(
                serde_json::from_value(shape.clone()).map_err(bad)?,
                tensors,
            )?)),
            "serac" => Ok(Self::Serac(ScopeNet::from_tensors(
                serde_json::from_value(shape.clone()).map_err(bad)?,
                tensors,
                dev,
            )?)),
            other => Err(TrainingError::Artefact(format!(
                "`{other}` is not a trained editor"
            ))),
        }
    }

    /// The MEND network (an error naming the artefact's kind otherwise).
    pub fn mend(&self) -> Result<&MendNet, TrainingError> {
        match self {
            Self::Mend(n) => Ok(n),
            Self::Serac(_) => Err(TrainingError::Mismatch(
                "the artefact is a serac editor, not mend".into(),
            )),
        }
    }

    /// The SERAC classifier (an error naming the artefact's kind otherwise).
    pub fn serac(&self) -> Result<&ScopeNet, TrainingError> {
        match self {
            Self::Serac(n) => Ok(n),
            Self::Mend(_) => Err(TrainingError::Mismatch(
                "the artefact is a mend editor, not serac".into(),
            )),
        }
    }
}

/// A loaded trained editor.
pub struct Artefact {
    pub provenance: Provenance,
    pub editor: TrainedEditor,
}

/// The artefact folder, with loaded artefacts cached by id.
pub struct ArtefactStore {
    dir: PathBuf,
    loaded: Mutex<HashMap<String, Arc<Artefact>>>,
}

impl ArtefactStore {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `editor` with `provenance` (its id set here) and returns the id.
    pub fn save(
        &self,
        editor: &TrainedEditor,
        mut provenance: Provenance,
    ) -> Result<String, TrainingError> {
        std::fs::create_dir_all(&self.dir)?;
        let tensors = editor.tensors()?;
        let tmp = self.dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&tmp)?;
        let file = tmp.join("editor.safetensors");
        candle_core::safetensors::save(&tensors, &file)?;
        let digest = hex::encode(Sha256::digest(std::fs::read(&file)?));
        let id = format!("{}-{}", provenance.method, &digest[..16]);
        provenance.id = id.clone();
        std::fs::write(
            tmp.join("provenance.json"),
            serde_json::to_vec_pretty(&provenance)?,
        )?;
        let dest = self.dir.join(&id);
        if dest.exists() {
            // The same bytes were trained before: keep the first copy.
            std::fs::remove_dir_all(&tmp)?;
        } else {
            std::fs::rename(&tmp, &dest)?;
        }
        Ok(id)
    }

    /// Every artefact's provenance, newest first (unreadable folders are skipped).
    pub fn list(&self) -> Vec<Provenance> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Provenance> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| std::fs::read(e.path().join("provenance.json")).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        out
    }

    /// The artefact `id` (or the newest `method` artefact trained on `model_sha256`), loaded.
    pub fn get(
        &self,
        method: &str,
        id: Option<&str>,
        model_sha256: &str,
        dev: &Device,
    ) -> Result<Arc<Artefact>, TrainingError> {
        let id = match id {
            Some(id) => id.to_string(),
            None => self
                .list()
                .into_iter()
                .find(|p| p.method == method && p.model_sha256 == model_sha256)
                .map(|p| p.id)
                .ok_or_else(|| TrainingError::NoArtefact {
                    method: method.to_string(),
                })?,
        };
        if let Some(a) = self.loaded.lock().expect("artefact cache").get(&id) {
            return Ok(a.clone());
        }
        let folder = self.dir.join(&id);
        if id.contains(['/', '\\']) || id.starts_with('.') || !folder.is_dir() {
            return Err(TrainingError::UnknownArtefact(id));
        }
        let provenance: Provenance =
            serde_json::from_slice(&std::fs::read(folder.join("provenance.json"))?)?;
        if provenance.method != method {
            return Err(TrainingError::Mismatch(format!(
                "artefact `{id}` is a {} editor, not {method}",
                provenance.method
            )));
        }
        if provenance.model_sha256 != model_sha256 {
            return Err(TrainingError::Mismatch(format!(
                "artefact `{id}` was trained for model sha256 {}…, this server runs {}…",
                &provenance.model_sha256[..12.min(provenance.model_sha256.len())],
                &model_sha256[..12.min(model_sha256.len())]
            )));
        }
        let tensors = candle_core::safetensors::load(folder.join("editor.safetensors"), dev)?;
        let editor = TrainedEditor::from_tensors(method, &provenance.net, &tensors, dev)?;
        let a = Arc::new(Artefact { provenance, editor });
        self.loaded
            .lock()
            .expect("artefact cache")
            .insert(id, a.clone());
        Ok(a)
    }
}
