//! The stored form of one version: its deltas and method state as safetensors bytes, f32,
//! tagged with a format name and version in the header's metadata so that any method's
//! versions load without knowing the method.
//!
//! - Version 2 (written): metadata `{"format": "emend.version", "version": "2"}`; tensors
//!   `delta.{i}.{layer}.{linear}.{u|v|dense}` (`linear` as [`Linear::name`], e.g. `mlp.down`)
//!   and `state.{i}.{name}`; `i` orders the entries.
//! - Version 1 (read only): no metadata; tensors `{i}.{layer}.{u|v|dense}`, all of them MLP
//!   down projections (the only weight edits could update then). Edit logs written before
//!   version 2 keep loading.
use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};

use super::{Delta, StateEntry};
use crate::engine::model::{Linear, ModelError, Result, WeightId};

pub const FORMAT_NAME: &str = "emend.version";
pub const FORMAT_VERSION: u32 = 2;

/// What one version adds on top of its parent.
#[derive(Debug, Clone, Default)]
pub struct VersionData {
    pub deltas: Vec<Delta>,
    pub state: Vec<StateEntry>,
}

/// Serialises a version's deltas and state (format version 2).
pub fn encode(deltas: &[Delta], state: &[StateEntry]) -> Result<Vec<u8>> {
    let mut named: BTreeMap<String, Tensor> = BTreeMap::new();
    for (i, d) in deltas.iter().enumerate() {
        let w = d.weight();
        let at = format!("delta.{i}.{}.{}", w.layer, w.linear);
        match d {
            Delta::LowRank { u, v, .. } => {
                named.insert(format!("{at}.u"), u.clone());
                named.insert(format!("{at}.v"), v.clone());
            }
            Delta::Dense { delta, .. } => {
                named.insert(format!("{at}.dense"), delta.clone());
            }
        }
    }
    for (i, s) in state.iter().enumerate() {
        named.insert(format!("state.{i}.{}", s.name), s.tensor.clone());
    }
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = named
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((k.clone(), bytes, t.dims().to_vec()))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(k, b, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| ModelError::InvalidInput(format!("version serialisation: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        ("format".to_string(), FORMAT_NAME.to_string()),
        ("version".to_string(), FORMAT_VERSION.to_string()),
    ]);
    safetensors::serialize(views, Some(meta))
        .map_err(|e| ModelError::InvalidInput(format!("version serialisation: {e}")))
}

/// Reads a version written by [`encode`] (or by format version 1): deltas onto `device` in
/// `dtype`, state in f32.
pub fn decode(bytes: &[u8], device: &Device, dtype: DType) -> Result<VersionData> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| ModelError::InvalidInput(format!("stored version is not safetensors: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::InvalidInput(format!("stored version is not safetensors: {e}")))?;
    let tags = meta.metadata().as_ref();
    let version = match tags.and_then(|m| m.get("format")) {
        None => 1,
        Some(f) if f == FORMAT_NAME => tags
            .and_then(|m| m.get("version"))
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| {
                ModelError::InvalidInput("stored version has no format version".into())
            })?,
        Some(f) => {
            return Err(ModelError::InvalidInput(format!(
                "stored version has format `{f}`, not `{FORMAT_NAME}`"
            )))
        }
    };
    if version > FORMAT_VERSION {
        return Err(ModelError::InvalidInput(format!(
            "stored version has format version {version}; this build reads up to {FORMAT_VERSION}"
        )));
    }
    let mut parts: BTreeMap<usize, Parts> = BTreeMap::new();
    let mut state: BTreeMap<usize, StateEntry> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let bad = || ModelError::InvalidInput(format!("stored version has a bad entry `{name}`"));
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad());
        }
        let floats: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = Tensor::from_vec(floats, view.shape(), device)?;
        let entry = if version == 1 {
            Entry::Delta(parse_v1(&name).ok_or_else(bad)?)
        } else {
            parse_v2(&name).ok_or_else(bad)?
        };
        match entry {
            Entry::Delta((i, weight, part)) => {
                let e = parts.entry(i).or_insert_with(|| Parts::new(weight));
                if e.weight != weight {
                    return Err(bad());
                }
                let t = t.to_dtype(dtype)?;
                match part {
                    Part::U => e.u = Some(t),
                    Part::V => e.v = Some(t),
                    Part::Dense => e.dense = Some(t),
                }
            }
            Entry::State(i, name) => {
                state.insert(i, StateEntry::new(name, t));
            }
        }
    }
    let deltas = parts
        .into_iter()
        .map(|(i, p)| match (p.u, p.v, p.dense) {
            (Some(u), Some(v), None) => Ok(Delta::LowRank {
                weight: p.weight,
                u,
                v,
            }),
            (None, None, Some(delta)) => Ok(Delta::Dense {
                weight: p.weight,
                delta,
            }),
            _ => Err(ModelError::InvalidInput(format!(
                "stored version has an incomplete delta {i} ({})",
                p.weight
            ))),
        })
        .collect::<Result<_>>()?;
    Ok(VersionData {
        deltas,
        state: state.into_values().collect(),
    })
}

enum Part {
    U,
    V,
    Dense,
}

enum Entry {
    Delta((usize, WeightId, Part)),
    State(usize, String),
}

struct Parts {
    weight: WeightId,
    u: Option<Tensor>,
    v: Option<Tensor>,
    dense: Option<Tensor>,
}

impl Parts {
    fn new(weight: WeightId) -> Self {
        Self {
            weight,
            u: None,
            v: None,
            dense: None,
        }
    }
}

fn part(s: &str) -> Option<Part> {
    match s {
        "u" => Some(Part::U),
        "v" => Some(Part::V),
        "dense" => Some(Part::Dense),
        _ => None,
    }
}

/// `{i}.{layer}.{u|v|dense}`: an MLP down projection.
fn parse_v1(name: &str) -> Option<(usize, WeightId, Part)> {
    let mut it = name.split('.');
    let (Some(i), Some(layer), Some(p), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return None;
    };
    Some((
        i.parse().ok()?,
        WeightId::mlp_down(layer.parse().ok()?),
        part(p)?,
    ))
}

/// `delta.{i}.{layer}.{linear}.{part}` or `state.{i}.{name}`.
fn parse_v2(name: &str) -> Option<Entry> {
    if let Some(rest) = name.strip_prefix("state.") {
        let (i, name) = rest.split_once('.')?;
        return Some(Entry::State(i.parse().ok()?, name.to_string()));
    }
    let rest = name.strip_prefix("delta.")?;
    let (i, rest) = rest.split_once('.')?;
    let (layer, rest) = rest.split_once('.')?;
    let (linear, p) = rest.rsplit_once('.')?;
    let linear: Linear = linear.parse().ok()?;
    Some(Entry::Delta((
        i.parse().ok()?,
        WeightId::new(layer.parse().ok()?, linear),
        part(p)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[&[f32]]) -> Tensor {
        let v: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(v, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims()
            && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn versions_round_trip_with_weights_and_state() {
        let ds = vec![
            Delta::LowRank {
                weight: WeightId::mlp_down(3),
                u: t(&[&[1.], &[2.], &[3.]]),
                v: t(&[&[0.5], &[-1.]]),
            },
            Delta::Dense {
                weight: WeightId::new(7, Linear::AttnO),
                delta: t(&[&[1., 2.], &[3., 4.]]),
            },
            Delta::LowRank {
                weight: WeightId::new(7, Linear::MlpGate),
                u: t(&[&[1.]]),
                v: t(&[&[2.]]),
            },
        ];
        let state = vec![
            StateEntry::new("alphaedit.keys.3", t(&[&[1., 2., 3.]])),
            StateEntry::new("grace.codebook.v", t(&[&[4.]])),
        ];
        let bytes = encode(&ds, &state).unwrap();
        let back = decode(&bytes, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(back.deltas.len(), 3);
        for (a, b) in ds.iter().zip(&back.deltas) {
            assert_eq!(a.weight(), b.weight());
            assert!(same(&a.dense().unwrap(), &b.dense().unwrap()));
        }
        let names: Vec<&str> = back.state.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["alphaedit.keys.3", "grace.codebook.v"]);
        assert!(same(&back.state[0].tensor, &state[0].tensor));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let dev = Device::Cpu;
        assert!(decode(b"nope", &dev, DType::F32).is_err());
        // A later format version than this build knows.
        let meta = HashMap::from([
            ("format".to_string(), FORMAT_NAME.to_string()),
            ("version".to_string(), "99".to_string()),
        ]);
        let empty: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
        let bytes = safetensors::serialize(empty, Some(meta)).unwrap();
        let e = decode(&bytes, &dev, DType::F32).unwrap_err();
        assert!(e.to_string().contains("format version 99"), "{e}");
    }
}
