//! A run-time module of the overlay: GRACE's codebook at one layer's MLP (Hartvigsen et al.,
//! NeurIPS 2023). Entries are (key, value, radius, label); a token position whose key entering
//! the down projection lies within the radius of its nearest entry gets that entry's value as
//! the down projection's output, every other position is left bit-identical.
//!
//! The rule applies at every position of every window, as GRACE's `replace_last` treats the
//! last token of the input it sees: a position is treated as if it ended the input, so
//! scoring a sequence in one pass, scoring it against a cached prefix and generating it token
//! by token with the KV cache all agree, and left padding or batch company change nothing. A
//! generation whose prompt ends inside an entry's scope keeps the replaced position's keys and
//! values in its cache for every new token; new tokens are checked by their own keys.
//!
//! A version stores what its edit wrote as [`CodebookWrite`]s (a new entry, or new values for
//! an existing one: GRACE shrinks an old radius when a conflicting edit lands close to it), and
//! the codebook of a version is the fold of its chain's writes, so rollback and fork carry
//! exactly the entries of the version they land on.
use candle_core::{DType, Device, Tensor};

use super::delta::tensor_bytes;
use super::StateEntry;
use crate::engine::model::{ModelError, PatchMode, Result};

/// State entries of codebook writes are named `grace.codebook.{layer}`.
const STATE_PREFIX: &str = "grace.codebook.";

/// One write into a layer's codebook: entry `index` becomes (key, value, radius, label).
/// `index` is the codebook's length for a new entry.
#[derive(Debug, Clone, PartialEq)]
pub struct CodebookWrite {
    pub index: usize,
    pub key: Vec<f32>,
    pub value: Vec<f32>,
    pub radius: f32,
    /// The target's token ids: GRACE's label, compared to tell a conflicting edit from a
    /// repeated one.
    pub label: Vec<u32>,
}

impl CodebookWrite {
    /// The state entry name for writes at `layer`.
    pub fn state_name(layer: usize) -> String {
        format!("{STATE_PREFIX}{layer}")
    }

    /// The layer a state entry name writes to, if it names a codebook write.
    pub fn layer_of(name: &str) -> Option<usize> {
        name.strip_prefix(STATE_PREFIX)?.parse().ok()
    }

    /// Packs the write as one f32 vector: `[index, radius, label_len, label…, key…, value…]`
    /// (indices and token ids below 2²⁴ are exact in f32).
    pub fn to_state(&self, layer: usize) -> Result<StateEntry> {
        let mut v = Vec::with_capacity(3 + self.label.len() + self.key.len() + self.value.len());
        v.push(self.index as f32);
        v.push(self.radius);
        v.push(self.label.len() as f32);
        v.extend(self.label.iter().map(|&t| t as f32));
        v.extend_from_slice(&self.key);
        v.extend_from_slice(&self.value);
        let n = v.len();
        Ok(StateEntry::new(
            Self::state_name(layer),
            Tensor::from_vec(v, n, &Device::Cpu)?,
        ))
    }

    /// Unpacks a write for a codebook of `key_dim`-wide keys and `value_dim`-wide values.
    pub fn from_state(t: &Tensor, key_dim: usize, value_dim: usize) -> Result<Self> {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bad = |why: &str| ModelError::InvalidInput(format!("codebook write: {why}"));
        if v.len() < 3 {
            return Err(bad("shorter than its header"));
        }
        let n_label = v[2] as usize;
        if v.len() != 3 + n_label + key_dim + value_dim {
            return Err(bad(&format!(
                "{} numbers, expected {} for keys of {key_dim} and values of {value_dim}",
                v.len(),
                3 + n_label + key_dim + value_dim
            )));
        }
        let (label, rest) = v[3..].split_at(n_label);
        let (key, value) = rest.split_at(key_dim);
        Ok(Self {
            index: v[0] as usize,
            radius: v[1],
            label: label.iter().map(|&t| t as u32).collect(),
            key: key.to_vec(),
            value: value.to_vec(),
        })
    }
}

/// One codebook entry, as a method reads it.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub key: &'a [f32],
    pub value: &'a [f32],
    pub radius: f32,
    pub label: &'a [u32],
}

/// The codebook of one layer, host copy plus the device tensors the forward pass reads.
#[derive(Debug, Clone)]
pub struct Codebook {
    key_dim: usize,
    value_dim: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
    radii: Vec<f32>,
    labels: Vec<Vec<u32>>,
    device: Device,
    /// Keys transposed `(key_dim, n)` (contiguous, so the distance is one plain matmul),
    /// `(1, n)` squared norms, values `(n, value_dim)`; `None` while empty.
    tensors: Option<(Tensor, Tensor, Tensor)>,
}

impl Codebook {
    pub fn new(key_dim: usize, value_dim: usize, device: &Device) -> Self {
        Self {
            key_dim,
            value_dim,
            keys: Vec::new(),
            values: Vec::new(),
            radii: Vec::new(),
            labels: Vec::new(),
            device: device.clone(),
            tensors: None,
        }
    }

    pub fn len(&self) -> usize {
        self.radii.len()
    }

    pub fn is_empty(&self) -> bool {
        self.radii.is_empty()
    }

    pub fn key_dim(&self) -> usize {
        self.key_dim
    }

    pub fn entry(&self, i: usize) -> Entry<'_> {
        Entry {
            key: &self.keys[i * self.key_dim..(i + 1) * self.key_dim],
            value: &self.values[i * self.value_dim..(i + 1) * self.value_dim],
            radius: self.radii[i],
            label: &self.labels[i],
        }
    }

    /// Applies writes in order (a new entry at the end, or an existing entry replaced), then
    /// rebuilds the device tensors once.
    pub fn write_all<'w>(
        &mut self,
        writes: impl IntoIterator<Item = &'w CodebookWrite>,
    ) -> Result<()> {
        for w in writes {
            self.write_one(w)?;
        }
        self.refresh()
    }

    fn write_one(&mut self, w: &CodebookWrite) -> Result<()> {
        if w.key.len() != self.key_dim || w.value.len() != self.value_dim {
            return Err(ModelError::InvalidInput(format!(
                "codebook write of key {} and value {} into a codebook of {} and {}",
                w.key.len(),
                w.value.len(),
                self.key_dim,
                self.value_dim
            )));
        }
        let n = self.len();
        if w.index == n {
            self.keys.extend_from_slice(&w.key);
            self.values.extend_from_slice(&w.value);
            self.radii.push(w.radius);
            self.labels.push(w.label.clone());
        } else if w.index < n {
            let (i, k, v) = (w.index, self.key_dim, self.value_dim);
            self.keys[i * k..(i + 1) * k].copy_from_slice(&w.key);
            self.values[i * v..(i + 1) * v].copy_from_slice(&w.value);
            self.radii[i] = w.radius;
            self.labels[i] = w.label.clone();
        } else {
            return Err(ModelError::InvalidInput(format!(
                "codebook write at entry {} of a codebook of {n}",
                w.index
            )));
        }
        Ok(())
    }

    fn refresh(&mut self) -> Result<()> {
        let n = self.len();
        self.tensors = if n == 0 {
            None
        } else {
            let keys = Tensor::from_vec(self.keys.clone(), (n, self.key_dim), &self.device)?;
            let sq = keys.sqr()?.sum_keepdim(1)?.t()?.contiguous()?;
            let keys = keys.t()?.contiguous()?;
            let values = Tensor::from_vec(self.values.clone(), (n, self.value_dim), &self.device)?;
            Some((keys, sq, values))
        };
        Ok(())
    }

    /// The nearest entry and its Euclidean distance for each row of `queries` (`(m, key_dim)`).
    pub fn nearest(&self, queries: &Tensor) -> Result<Vec<(usize, f32)>> {
        let Some((keys_t, key_sq, _)) = &self.tensors else {
            return Ok(Vec::new());
        };
        let q = queries.to_dtype(DType::F32)?;
        // ‖q − k‖² = ‖q‖² + ‖k‖² − 2 q·k, clamped at 0 against rounding.
        let q_sq = q.sqr()?.sum_keepdim(1)?;
        let d2 = q_sq
            .broadcast_add(key_sq)?
            .sub(&(q.matmul(keys_t)? * 2.0)?)?
            .clamp(0f32, f32::MAX)?;
        let idx: Vec<u32> = d2.argmin(1)?.to_vec1()?;
        let min: Vec<f32> = d2.min(1)?.to_vec1()?;
        Ok(idx
            .into_iter()
            .zip(min)
            .map(|(i, d)| (i as usize, d.sqrt()))
            .collect())
    }

    /// The down projection's output `out` (`(b, t, value_dim)`) with each position whose key
    /// (`key`, `(b, t, key_dim)`) is in scope replaced by its entry's value. Positions out of
    /// scope are the same tensor elements, bit for bit.
    pub fn apply(&self, key: &Tensor, out: Tensor) -> Result<Tensor> {
        let Some((_, _, values)) = &self.tensors else {
            return Ok(out);
        };
        let (b, t, k) = key.dims3()?;
        let near = self.nearest(&key.reshape((b * t, k))?)?;
        let mut at = Vec::new();
        let mut chosen = Vec::new();
        for (row, &(i, d)) in near.iter().enumerate() {
            if d <= self.radii[i] {
                at.push((row / t, row % t));
                chosen.push(i as u32);
            }
        }
        if at.is_empty() {
            return Ok(out);
        }
        let n = chosen.len();
        let idx = Tensor::from_vec(chosen, n, &self.device)?;
        let rows = values.index_select(&idx, 0)?.to_dtype(out.dtype())?;
        crate::engine::model::patch_rows(&out, &at, &rows, PatchMode::Set)
    }

    /// Bytes the codebook holds: the host copy the edits read and the device tensors the
    /// forward pass reads.
    pub fn bytes(&self) -> usize {
        let host = (self.keys.len() + self.values.len() + self.radii.len()) * 4
            + self.labels.iter().map(|l| l.len() * 4).sum::<usize>();
        host + self.tensors.as_ref().map_or(0, |(k, s, v)| {
            tensor_bytes(k) + tensor_bytes(s) + tensor_bytes(v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(index: usize, key: [f32; 2], value: [f32; 3], radius: f32) -> CodebookWrite {
        CodebookWrite {
            index,
            key: key.to_vec(),
            value: value.to_vec(),
            radius,
            label: vec![7, index as u32],
        }
    }

    #[test]
    fn writes_round_trip_through_state() {
        let w = write(3, [1.5, -2.0], [0.25, 4.0, -1.0], 0.75);
        let s = w.to_state(12).unwrap();
        assert_eq!(s.name, "grace.codebook.12");
        assert_eq!(CodebookWrite::layer_of(&s.name), Some(12));
        assert_eq!(CodebookWrite::layer_of("alphaedit.keys.4"), None);
        assert_eq!(CodebookWrite::from_state(&s.tensor, 2, 3).unwrap(), w);
        assert!(CodebookWrite::from_state(&s.tensor, 3, 3).is_err());
    }

    #[test]
    fn in_scope_positions_take_the_value_and_others_stay_bit_identical() {
        let dev = Device::Cpu;
        let mut cb = Codebook::new(2, 3, &dev);
        cb.write_all(&[
            write(0, [0.0, 0.0], [1.0, 2.0, 3.0], 1.0),
            write(1, [10.0, 0.0], [4.0, 5.0, 6.0], 0.5),
        ])
        .unwrap();
        // Rows: near entry 0 (0.6 ≤ 1), near entry 1 but outside its 0.5, far from both.
        let key = Tensor::new(&[[[0.6f32, 0.0], [10.0, 0.9], [5.0, 5.0]]], &dev).unwrap();
        let out = Tensor::new(
            &[[[0.1f32, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]]],
            &dev,
        )
        .unwrap();
        let got: Vec<Vec<f32>> = cb
            .apply(&key, out.clone())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(got[0], vec![1.0, 2.0, 3.0]);
        let want: Vec<Vec<f32>> = out.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(got[1], want[1]);
        assert_eq!(got[2], want[2]);
        let near = cb
            .nearest(&Tensor::new(&[[9.0f32, 0.0]], &dev).unwrap())
            .unwrap();
        assert_eq!(near[0].0, 1);
        assert!((near[0].1 - 1.0).abs() < 1e-4, "{near:?}");
    }

    #[test]
    fn a_write_replaces_an_entry_and_refuses_a_gap() {
        let dev = Device::Cpu;
        let mut cb = Codebook::new(2, 3, &dev);
        cb.write_all(&[write(0, [0.0, 0.0], [1.0, 2.0, 3.0], 1.0)])
            .unwrap();
        cb.write_all(&[write(0, [0.0, 0.0], [1.0, 2.0, 3.0], 0.25)])
            .unwrap();
        assert_eq!(cb.len(), 1);
        assert_eq!(cb.entry(0).radius, 0.25);
        assert!(cb
            .write_all(&[write(2, [0.0, 0.0], [1.0, 2.0, 3.0], 1.0)])
            .is_err());
        let empty = Codebook::new(2, 3, &dev);
        let out = Tensor::ones((1, 1, 3), DType::F32, &dev).unwrap();
        let key = Tensor::zeros((1, 1, 2), DType::F32, &dev).unwrap();
        assert_eq!(
            empty
                .apply(&key, out)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0, 1.0, 1.0]
        );
    }
}
