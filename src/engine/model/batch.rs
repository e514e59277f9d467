//! Per-forward state: positions, attention masks (causal, padding, sliding window), the KV cache
//! and the hook set. The model itself stays immutable.
use std::cell::OnceCell;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::layers::Proj;
use super::{Hooks, KvCache, Result, WeightId};
use crate::engine::overlay::{LayerPatch, PreparedOverlay};

pub struct Forward<'a> {
    batch: usize,
    seq: usize,
    past: usize,
    pad_left: Vec<usize>,
    /// Each row's real length when rows are right-padded (per-sequence modules average over
    /// real tokens only).
    lengths: Option<Vec<usize>>,
    device: Device,
    pub(crate) cache: Option<&'a mut KvCache>,
    pub(crate) hooks: Option<&'a mut Hooks>,
    /// Use only ops with a backward pass (no fused kernels).
    pub(crate) differentiable: bool,
    /// A session's edits, applied at each edited weight.
    pub(crate) overlay: Option<Arc<PreparedOverlay>>,
    positions: OnceCell<Tensor>,
    mask: OnceCell<Option<Tensor>>,
}

impl<'a> Forward<'a> {
    /// A plain forward over a `(batch, seq)` window with no padding, cache or hooks.
    pub fn new(batch: usize, seq: usize, device: &Device) -> Self {
        Self {
            batch,
            seq,
            past: 0,
            pad_left: vec![0; batch],
            lengths: None,
            device: device.clone(),
            cache: None,
            hooks: None,
            differentiable: false,
            overlay: None,
            positions: OnceCell::new(),
            mask: OnceCell::new(),
        }
    }

    /// Left padding per row (prefill). With a cache, it is remembered for the decode steps.
    pub fn with_left_padding(mut self, pad: Vec<usize>) -> Self {
        assert_eq!(pad.len(), self.batch, "one padding count per row");
        self.pad_left = pad;
        if let Some(c) = self.cache.as_deref_mut() {
            c.set_pad_left(self.pad_left.clone());
        }
        self
    }

    /// Each row's real length in this window (the rest is right padding).
    pub fn with_lengths(mut self, lengths: Vec<usize>) -> Self {
        assert_eq!(lengths.len(), self.batch, "one length per row");
        self.lengths = Some(lengths);
        self
    }

    pub fn with_cache(mut self, cache: &'a mut KvCache) -> Self {
        self.past = cache.len();
        if self.past == 0 {
            cache.set_pad_left(self.pad_left.clone());
        } else {
            self.pad_left = cache.pad_left().to_vec();
        }
        self.cache = Some(cache);
        self
    }

    pub fn with_hooks(mut self, hooks: &'a mut Hooks) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// Runs against a session's edited weights (the base weights stay untouched).
    pub fn with_overlay(mut self, overlay: Arc<PreparedOverlay>) -> Self {
        self.overlay = (!overlay.is_empty()).then_some(overlay);
        self
    }

    /// Swaps the overlay in place (the [`crate::engine::overlay::Edited`] wrapper sets it for
    /// the layers it runs and restores the caller's afterwards).
    pub(crate) fn swap_overlay(
        &mut self,
        overlay: Option<Arc<PreparedOverlay>>,
    ) -> Option<Arc<PreparedOverlay>> {
        std::mem::replace(&mut self.overlay, overlay)
    }

    /// The projection `id` of `x`, with the session's delta if it has one.
    pub(crate) fn linear(&self, id: WeightId, proj: &Proj, x: &Tensor) -> Result<Tensor> {
        match self.overlay.as_deref().and_then(|o| o.weight(id)) {
            None => proj.forward(x),
            Some(LayerPatch::Dense { weight }) => Proj {
                weight: weight.clone(),
                bias: proj.bias.clone(),
            }
            .forward(x),
            Some(LayerPatch::LowRank { v_t, u }) => {
                let base = proj.forward(x)?;
                let down = Proj {
                    weight: v_t.clone(),
                    bias: None,
                };
                let up = Proj {
                    weight: u.clone(),
                    bias: None,
                };
                Ok((base + up.forward(&down.forward(x)?)?)?)
            }
        }
    }

    /// The MLP output `out` of `layer` through the session's run-time modules there, if any
    /// (`key` is what entered the down projection): GRACE's codebook, then WISE's memories,
    /// whose per-sequence decisions the KV cache holds for later windows.
    pub(crate) fn mlp_module(&mut self, layer: usize, key: &Tensor, out: Tensor) -> Result<Tensor> {
        let Some(overlay) = self.overlay.clone() else {
            return Ok(out);
        };
        let out = match overlay.codebook(layer) {
            None => out,
            Some(m) => m.apply(key, out)?,
        };
        let Some(wise) = overlay.wise(layer) else {
            return Ok(out);
        };
        let held = self
            .cache
            .as_deref()
            .and_then(|c| c.routes(layer))
            .filter(|r| r.len() == self.batch)
            .map(<[Option<usize>]>::to_vec);
        let spans = self.spans();
        let (out, routes) = wise.apply(key, out, &spans, held.as_deref())?;
        if held.is_none() {
            if let Some(c) = self.cache.as_deref_mut() {
                c.set_routes(layer, routes);
            }
        }
        Ok(out)
    }

    /// Where each row's real tokens are in this window.
    fn spans(&self) -> Vec<std::ops::Range<usize>> {
        (0..self.batch)
            .map(|r| {
                let start = self.pad_left[r].saturating_sub(self.past).min(self.seq);
                let end = self
                    .lengths
                    .as_ref()
                    .map_or(self.seq, |l| l[r].min(self.seq));
                start..end.max(start)
            })
            .collect()
    }

    /// Restricts the pass to ops with a backward (needed when hooks carry gradients).
    pub fn differentiable(mut self) -> Self {
        self.differentiable = true;
        self
    }

    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn seq(&self) -> usize {
        self.seq
    }
    /// Tokens already in the cache before this window.
    pub fn past(&self) -> usize {
        self.past
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn pad_left(&self) -> &[usize] {
        &self.pad_left
    }

    /// True when every row starts at the same position (no padding): positions are shared.
    pub fn unpadded(&self) -> bool {
        self.pad_left.iter().all(|&p| p == 0)
    }

    /// Position ids `(b, t)`, `u32`: absolute index minus the row's left padding.
    pub fn positions(&self) -> Result<&Tensor> {
        if let Some(p) = self.positions.get() {
            return Ok(p);
        }
        let mut ids = Vec::with_capacity(self.batch * self.seq);
        for &pad in &self.pad_left {
            for j in 0..self.seq {
                ids.push((self.past + j).saturating_sub(pad) as u32);
            }
        }
        let t = Tensor::from_vec(ids, (self.batch, self.seq), &self.device)?;
        Ok(self.positions.get_or_init(|| t))
    }

    /// Additive attention mask `(b or 1, 1, t, past + t)` in `dtype`, or `None` when every key is
    /// visible (a single unpadded token within the window).
    pub fn mask(&self, window: Option<usize>, dtype: DType) -> Result<Option<&Tensor>> {
        if let Some(m) = self.mask.get() {
            return Ok(m.as_ref());
        }
        let kv = self.past + self.seq;
        let window_binds = window.is_some_and(|w| kv > w);
        let m = if self.seq == 1 && self.unpadded() && !window_binds {
            None
        } else {
            let rows = if self.unpadded() { 1 } else { self.batch };
            let mut data = vec![0f32; rows * self.seq * kv];
            for r in 0..rows {
                let pad = self.pad_left[r];
                for j in 0..self.seq {
                    let q = self.past + j;
                    for k in 0..kv {
                        let visible =
                            k <= q && (k >= pad || k == q) && window.is_none_or(|w| q - k < w);
                        if !visible {
                            data[(r * self.seq + j) * kv + k] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            let t =
                Tensor::from_vec(data, (rows, 1, self.seq, kv), &self.device)?.to_dtype(dtype)?;
            Some(t)
        };
        Ok(self.mask.get_or_init(|| m).as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(m: &Tensor) -> Vec<Vec<Vec<u8>>> {
        let m = m.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        m.into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|q| q.into_iter().map(|v| (v == 0.0) as u8).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn causal_mask_draws_a_lower_triangle() {
        let f = Forward::new(1, 3, &Device::Cpu);
        let m = f.mask(None, DType::F32).unwrap().unwrap();
        // row q sees keys 0..=q
        assert_eq!(
            visible(m),
            vec![vec![vec![1, 0, 0], vec![1, 1, 0], vec![1, 1, 1]]]
        );
    }

    #[test]
    fn left_padding_hides_pad_keys_and_shifts_positions() {
        let f = Forward::new(2, 3, &Device::Cpu).with_left_padding(vec![0, 2]);
        let m = f.mask(None, DType::F32).unwrap().unwrap();
        assert_eq!(
            visible(m),
            vec![
                vec![vec![1, 0, 0], vec![1, 1, 0], vec![1, 1, 1]],
                // pad queries see themselves only (no NaN); the real token sees itself only
                vec![vec![1, 0, 0], vec![0, 1, 0], vec![0, 0, 1]],
            ]
        );
        let p = f.positions().unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(p, vec![vec![0, 1, 2], vec![0, 0, 0]]);
    }

    #[test]
    fn sliding_window_limits_lookback() {
        let f = Forward::new(1, 4, &Device::Cpu);
        let m = f.mask(Some(2), DType::F32).unwrap().unwrap();
        assert_eq!(
            visible(m),
            vec![vec![
                vec![1, 0, 0, 0],
                vec![1, 1, 0, 0],
                vec![0, 1, 1, 0],
                vec![0, 0, 1, 1]
            ]]
        );
    }

    #[test]
    fn single_token_decode_needs_no_mask() {
        let mut cache = KvCache::new(1);
        let f = Forward::new(1, 1, &Device::Cpu).with_cache(&mut cache);
        assert!(f.mask(None, DType::F32).unwrap().is_none());
    }
}
