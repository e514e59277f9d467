//! A run-time module of the overlay: SERAC's edit memory (Mitchell et al., ICML 2022).
//!
//! Each edit is a memory entry: a key (the scope classifier's embedding of the edit's prompt)
//! and the edit written out as text. An input is in scope of an entry when the classifier's
//! logit `scale · cos(key, embed(input)) + bias` against it is positive; the best such entry
//! conditions the input: its text goes in front of the input's tokens and the session's model
//! answers from there (the counterfactual model is the model itself, reading the edit). Out of
//! scope, the input runs untouched, bit for bit.
//!
//! The decision is made per input on the base model's hidden states (the classifier sees no
//! deltas), one input at a time, so batch company never changes it. Scoring decides on the
//! tokens before the first scored one (the context), or on the whole sequence when scoring
//! starts at its first token (echo, perplexity); generation decides on the prompt, and the
//! decision holds for every new token because the conditioned prompt is what the KV cache
//! holds.
//!
//! The classifier head and the entries are method state of the session's versions, so
//! rollback, fork and restart carry exactly the memory of the version they land on.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, D};

use super::delta::tensor_bytes;
use super::StateEntry;
use crate::engine::model::{CausalLm, Conditioning, Forward, ModelError, Result};

/// The state entry holding the classifier head (written by a chain's first SERAC edit).
pub const HEAD_STATE: &str = "serac.head";
/// The state entries of memory entries (one per edit).
pub const ENTRY_STATE: &str = "serac.entry";

/// The scope classifier: the mean over an input's tokens of the hidden state leaving `layer`,
/// standardised (`mean`, `std`), projected (`proj`, `(width, hidden)`) and normalised; the
/// logit against a key is `scale · cos + bias`. Training builds one over variables, so the
/// same code differentiates.
#[derive(Debug, Clone)]
pub struct ScopeHead {
    pub layer: usize,
    pub mean: Tensor,
    pub std: Tensor,
    pub proj: Tensor,
    pub scale: Tensor,
    pub bias: Tensor,
}

impl ScopeHead {
    pub fn width(&self) -> Result<usize> {
        Ok(self.proj.dim(0)?)
    }

    /// Unit-norm embeddings `(n, width)` of pooled features `(n, hidden)`.
    pub fn embed(&self, feats: &Tensor) -> Result<Tensor> {
        let x = feats
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?
            .matmul(&self.proj.t()?)?;
        let norm = (x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-6)?;
        Ok(x.broadcast_div(&norm)?)
    }

    /// Logits `(n, m)` of queries `(n, width)` against keys `(m, width)`, both unit-norm.
    pub fn logits(&self, queries: &Tensor, keys: &Tensor) -> Result<Tensor> {
        Ok(queries
            .matmul(&keys.t()?)?
            .broadcast_mul(&self.scale)?
            .broadcast_add(&self.bias)?)
    }

    /// Packs the head as one f32 vector: `[layer, width, hidden, scale, bias, mean…, std…,
    /// proj…]`.
    pub fn to_state(&self) -> Result<StateEntry> {
        let (width, hidden) = self.proj.dims2()?;
        let scalar = |t: &Tensor| -> Result<f32> { Ok(t.flatten_all()?.to_vec1::<f32>()?[0]) };
        let mut v = vec![
            self.layer as f32,
            width as f32,
            hidden as f32,
            scalar(&self.scale)?,
            scalar(&self.bias)?,
        ];
        v.extend(self.mean.flatten_all()?.to_vec1::<f32>()?);
        v.extend(self.std.flatten_all()?.to_vec1::<f32>()?);
        v.extend(self.proj.flatten_all()?.to_vec1::<f32>()?);
        let n = v.len();
        Ok(StateEntry::new(
            HEAD_STATE,
            Tensor::from_vec(v, n, self.proj.device())?,
        ))
    }

    pub fn from_state(t: &Tensor) -> Result<Self> {
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bad = || ModelError::InvalidInput("malformed SERAC classifier head in state".into());
        if v.len() < 5 {
            return Err(bad());
        }
        let (layer, width, hidden) = (v[0] as usize, v[1] as usize, v[2] as usize);
        if width == 0 || hidden == 0 || v.len() != 5 + 2 * hidden + width * hidden {
            return Err(bad());
        }
        let dev = t.device();
        let at = |from: usize, len: usize| &v[from..from + len];
        Ok(Self {
            layer,
            scale: Tensor::new(&[v[3]], dev)?,
            bias: Tensor::new(&[v[4]], dev)?,
            mean: Tensor::from_slice(at(5, hidden), (1, hidden), dev)?,
            std: Tensor::from_slice(at(5 + hidden, hidden), (1, hidden), dev)?,
            proj: Tensor::from_slice(at(5 + 2 * hidden, width * hidden), (width, hidden), dev)?,
        })
    }
}

/// The mean over `ids` of the hidden state leaving `layer` (`(1, hidden)`, f32, no gradient),
/// from one unbatched pass: the same input always gets the same bits.
pub fn pooled(model: &dyn CausalLm, ids: &[u32], layer: usize) -> Result<Tensor> {
    if ids.is_empty() {
        return Err(ModelError::InvalidInput("nothing to embed".into()));
    }
    let input = Tensor::from_slice(ids, (1, ids.len()), model.device())?;
    let mut fwd = Forward::new(1, ids.len(), model.device());
    let e = model.embed(&input, &fwd)?;
    let h = model.run_layers(e, 0..layer + 1, &mut fwd)?;
    Ok(h.to_dtype(DType::F32)?.mean(1)?.detach())
}

/// One memory entry: the classifier's key of the edit's prompt and the edit as tokens to
/// condition an input on.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeEntry {
    pub key: Vec<f32>,
    pub conditioning: Arc<Conditioning>,
}

impl ScopeEntry {
    /// Packs the entry as one f32 vector: `[lead, text_len, text…, key…]` (token ids below
    /// 2²⁴ are exact in f32).
    pub fn to_state(&self, dev: &Device) -> Result<StateEntry> {
        let c = &self.conditioning;
        let mut v = Vec::with_capacity(2 + c.text.len() + self.key.len());
        v.push(c.lead as f32);
        v.push(c.text.len() as f32);
        v.extend(c.text.iter().map(|&t| t as f32));
        v.extend_from_slice(&self.key);
        let n = v.len();
        Ok(StateEntry::new(ENTRY_STATE, Tensor::from_vec(v, n, dev)?))
    }

    pub fn from_state(t: &Tensor) -> Result<Self> {
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bad = || ModelError::InvalidInput("malformed SERAC memory entry in state".into());
        let len = *v.get(1).ok_or_else(bad)? as usize;
        if v.len() <= 2 + len {
            return Err(bad());
        }
        Ok(Self {
            key: v[2 + len..].to_vec(),
            conditioning: Arc::new(Conditioning {
                lead: v[0] as u32,
                text: v[2..2 + len].iter().map(|&x| x as u32).collect(),
            }),
        })
    }
}

/// Decisions a memory keeps (per version): the choices of a multiple-choice question arrive as
/// separate requests with one context, and are decided once.
const DECISIONS_KEPT: usize = 4096;

/// A session's SERAC memory: the classifier head and the entries, oldest first.
#[derive(Debug, Default)]
pub struct ScopeMemory {
    head: Option<Arc<ScopeHead>>,
    entries: Vec<Arc<ScopeEntry>>,
    /// The entries' keys stacked `(n, width)`, rebuilt after writes.
    keys: Option<Tensor>,
    /// Inputs already decided against these entries (a decision is a pure function of the
    /// input and the memory, so keeping it changes no result).
    decided: Mutex<HashMap<Vec<u32>, Option<usize>>>,
}

impl Clone for ScopeMemory {
    /// A copy with the same head and entries and no kept decisions (a copy is made to be
    /// written to, which invalidates them).
    fn clone(&self) -> Self {
        Self {
            head: self.head.clone(),
            entries: self.entries.clone(),
            keys: self.keys.clone(),
            decided: Mutex::default(),
        }
    }
}

impl ScopeMemory {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn head(&self) -> Option<&Arc<ScopeHead>> {
        self.head.as_ref()
    }

    pub fn entry(&self, i: usize) -> &Arc<ScopeEntry> {
        &self.entries[i]
    }

    /// Folds state entries in chain order: a head replaces the head, an entry is appended.
    pub fn write_all<'s>(&mut self, states: impl Iterator<Item = &'s StateEntry>) -> Result<()> {
        let mut wrote = false;
        for s in states {
            match s.name.as_str() {
                HEAD_STATE => self.head = Some(Arc::new(ScopeHead::from_state(&s.tensor)?)),
                ENTRY_STATE => self
                    .entries
                    .push(Arc::new(ScopeEntry::from_state(&s.tensor)?)),
                _ => continue,
            }
            wrote = true;
        }
        if wrote {
            self.decided = Mutex::default();
            self.refresh()?;
        }
        Ok(())
    }

    fn refresh(&mut self) -> Result<()> {
        let Some(head) = &self.head else {
            if self.entries.is_empty() {
                return Ok(());
            }
            return Err(ModelError::InvalidInput(
                "SERAC memory entries without a classifier head".into(),
            ));
        };
        let width = head.width()?;
        if self.entries.is_empty() {
            self.keys = None;
            return Ok(());
        }
        let mut flat = Vec::with_capacity(self.entries.len() * width);
        for e in &self.entries {
            if e.key.len() != width {
                return Err(ModelError::InvalidInput(format!(
                    "a SERAC key of width {} under a classifier of width {width}",
                    e.key.len()
                )));
            }
            flat.extend_from_slice(&e.key);
        }
        let dev = head.proj.device();
        self.keys = Some(Tensor::from_vec(flat, (self.entries.len(), width), dev)?);
        Ok(())
    }

    /// Per input, the entry it is in scope of (the highest positive logit), decided on the
    /// base model `base`; an input seen recently is not decided again.
    pub fn route(&self, base: &dyn CausalLm, inputs: &[&[u32]]) -> Result<Vec<Option<usize>>> {
        let (Some(head), Some(keys)) = (&self.head, &self.keys) else {
            return Ok(vec![None; inputs.len()]);
        };
        let mut out = Vec::with_capacity(inputs.len());
        for &input in inputs {
            let kept = self.decided.lock().ok().and_then(|d| d.get(input).copied());
            if let Some(r) = kept {
                out.push(r);
                continue;
            }
            let r = if input.is_empty() {
                None
            } else {
                let q = head.embed(&pooled(base, input, head.layer)?)?;
                let logits = head.logits(&q, keys)?.flatten_all()?.to_vec1::<f32>()?;
                best_positive(&logits)
            };
            if let Ok(mut d) = self.decided.lock() {
                if d.len() >= DECISIONS_KEPT {
                    d.clear();
                }
                d.insert(input.to_vec(), r);
            }
            out.push(r);
        }
        Ok(out)
    }

    pub fn bytes(&self) -> usize {
        let head = self.head.as_ref().map_or(0, |h| {
            tensor_bytes(&h.proj) + tensor_bytes(&h.mean) + tensor_bytes(&h.std) + 8
        });
        head + self
            .entries
            .iter()
            .map(|e| 4 * (e.key.len() + e.conditioning.text.len() + 1))
            .sum::<usize>()
    }
}

/// The index of the largest positive logit (the first on ties), if any is positive.
fn best_positive(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &z) in logits.iter().enumerate() {
        if z > 0.0 && best.is_none_or(|(_, b)| z > b) {
            best = Some((i, z));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(dev: &Device) -> ScopeHead {
        ScopeHead {
            layer: 3,
            mean: Tensor::new(&[[0.5f32, -1.0, 0.0]], dev).unwrap(),
            std: Tensor::new(&[[1.0f32, 2.0, 4.0]], dev).unwrap(),
            proj: Tensor::new(&[[1.0f32, 0.0, 0.0], [0.0, 1.0, 1.0]], dev).unwrap(),
            scale: Tensor::new(&[10.0f32], dev).unwrap(),
            bias: Tensor::new(&[-5.0f32], dev).unwrap(),
        }
    }

    #[test]
    fn head_and_entries_round_trip_through_state() {
        let dev = Device::Cpu;
        let h = head(&dev);
        let back = ScopeHead::from_state(&h.to_state().unwrap().tensor).unwrap();
        assert_eq!(back.layer, 3);
        for (a, b) in [
            (&h.proj, &back.proj),
            (&h.mean, &back.mean),
            (&h.std, &back.std),
        ] {
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let e = ScopeEntry {
            key: vec![0.6, 0.8],
            conditioning: Arc::new(Conditioning {
                text: vec![7, 49_151, 3],
                lead: 0,
            }),
        };
        let s = e.to_state(&dev).unwrap();
        assert_eq!(s.name, ENTRY_STATE);
        assert_eq!(ScopeEntry::from_state(&s.tensor).unwrap(), e);
        assert!(ScopeEntry::from_state(&Tensor::new(&[0f32, 9.0, 1.0], &dev).unwrap()).is_err());
        assert!(ScopeHead::from_state(&Tensor::new(&[3f32, 2.0, 3.0], &dev).unwrap()).is_err());
    }

    #[test]
    fn the_best_positive_logit_routes() {
        assert_eq!(best_positive(&[-1.0, 0.5, 2.0, 2.0]), Some(2));
        assert_eq!(best_positive(&[-1.0, 0.0]), None);
        assert_eq!(best_positive(&[]), None);
        let dev = Device::Cpu;
        let h = head(&dev);
        // (x - mean) / std = [0.5, 1, 0] → proj [0.5, 1] → unit [0.447, 0.894].
        let q = h
            .embed(&Tensor::new(&[[1.0f32, 1.0, -0.0]], &dev).unwrap())
            .unwrap();
        let keys = Tensor::new(&[[0.0f32, 1.0], [1.0, 0.0]], &dev).unwrap();
        let z = h.logits(&q, &keys).unwrap().to_vec2::<f32>().unwrap()[0].clone();
        assert!((z[0] - (10.0 * 0.894_427 - 5.0)).abs() < 1e-4, "{z:?}");
        assert!((z[1] - (10.0 * 0.447_213 - 5.0)).abs() < 1e-4, "{z:?}");
    }
}
