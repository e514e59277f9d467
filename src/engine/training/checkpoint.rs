//! One file per checkpoint: f32 tensors and a JSON state in the safetensors header, written
//! to a temporary file and renamed, so a kill at any moment leaves the previous checkpoint
//! or the new one, never half of one.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::TrainingError;

/// A checkpoint's tensors by name and its JSON state.
pub type Contents = (HashMap<String, Tensor>, serde_json::Value);

const STATE_KEY: &str = "emend.training.state";

pub fn write(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    state: &serde_json::Value,
) -> Result<(), TrainingError> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = names
        .into_iter()
        .map(|k| {
            let t = &tensors[k];
            let v: Vec<f32> = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            Ok((
                k.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.dims().to_vec(),
            ))
        })
        .collect::<Result<_, TrainingError>>()?;
    let views = data
        .iter()
        .map(|(k, b, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| TrainingError::Artefact(format!("checkpoint: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = HashMap::from([(STATE_KEY.to_string(), state.to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| TrainingError::Artefact(format!("checkpoint: {e}")))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The tensors and state [`write`] stored, or `None` when there is no checkpoint.
pub fn read(path: &Path, dev: &Device) -> Result<Option<Contents>, TrainingError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let bad = |e: String| TrainingError::Artefact(format!("checkpoint {}: {e}", path.display()));
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let state = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| bad("no training state".into()))?;
    let state: serde_json::Value = serde_json::from_str(state).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("`{name}` is not f32")));
        }
        let floats: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, Tensor::from_vec(floats, view.shape(), dev)?);
    }
    Ok(Some((out, state)))
}
