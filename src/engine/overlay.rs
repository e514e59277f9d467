//! A session's edits as deltas over the immutable base weights.
//!
//! Every version of a session is an [`Overlay`] node: the deltas of the edit that made it plus a
//! pointer to the version it was applied on, so versions share their history and a rollback is
//! only a pointer move. A forward pass runs against a [`PreparedOverlay`]: per edited layer the
//! stacked low-rank factors (`y = W x + U (Vᵀ x)`), or one dense copy `W + U Vᵀ` once the stacked
//! rank makes the dense product cheaper. Preparing is a pure function of the chain, so the same
//! version always yields bit-identical logits.
use std::collections::BTreeMap;
use std::sync::Arc;

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::model::{CausalLm, Forward, ModelError, ModelSpec, Result};

/// One update of the projection that reads `layers.{layer}.mlp.in` and writes
/// `layers.{layer}.mlp.out` (the MLP's down/out projection, weight `(d_out, d_in)`).
#[derive(Debug, Clone)]
pub enum Delta {
    /// `ΔW = U Vᵀ`, `u: (d_out, r)`, `v: (d_in, r)`.
    LowRank { layer: usize, u: Tensor, v: Tensor },
    /// A full `(d_out, d_in)` update.
    Dense { layer: usize, delta: Tensor },
}

impl Delta {
    pub fn layer(&self) -> usize {
        match self {
            Self::LowRank { layer, .. } | Self::Dense { layer, .. } => *layer,
        }
    }

    /// Rank it adds to its layer's stack (`None` for dense).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Self::LowRank { u, .. } => u.dims().get(1).copied(),
            Self::Dense { .. } => None,
        }
    }

    pub fn bytes(&self) -> usize {
        let n = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::LowRank { u, v, .. } => n(u) + n(v),
            Self::Dense { delta, .. } => n(delta),
        }
    }

    /// The full `(d_out, d_in)` update in f32.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Self::LowRank { u, v, .. } => u
                .to_dtype(DType::F32)?
                .matmul(&v.to_dtype(DType::F32)?.t()?)?,
            Self::Dense { delta, .. } => delta.to_dtype(DType::F32)?,
        })
    }
}

/// Serialises one edit's deltas as safetensors bytes (`{i}.{layer}.u|v|dense`).
pub fn to_safetensors(deltas: &[Delta]) -> Result<Vec<u8>> {
    let mut named: BTreeMap<String, Tensor> = BTreeMap::new();
    for (i, d) in deltas.iter().enumerate() {
        match d {
            Delta::LowRank { layer, u, v } => {
                named.insert(format!("{i}.{layer}.u"), u.to_device(&Device::Cpu)?);
                named.insert(format!("{i}.{layer}.v"), v.to_device(&Device::Cpu)?);
            }
            Delta::Dense { layer, delta } => {
                named.insert(format!("{i}.{layer}.dense"), delta.to_device(&Device::Cpu)?);
            }
        }
    }
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = named
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((k.clone(), bytes, t.dims().to_vec()))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(k, b, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| ModelError::InvalidInput(format!("delta serialisation: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None)
        .map_err(|e| ModelError::InvalidInput(format!("delta serialisation: {e}")))
}

/// `(layer, u, v, dense)` of one stored delta while it is read back.
type Parts = (usize, Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Reads deltas written by [`to_safetensors`] onto `device` in `dtype`.
pub fn from_safetensors(bytes: &[u8], device: &Device, dtype: DType) -> Result<Vec<Delta>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::InvalidInput(format!("stored delta is not safetensors: {e}")))?;
    let bad =
        |name: &str| ModelError::InvalidInput(format!("stored delta has a bad entry `{name}`"));
    // index → (layer, u, v, dense)
    let mut parts: BTreeMap<usize, Parts> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let mut it = name.split('.');
        let (Some(i), Some(layer), Some(kind), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad(&name));
        };
        let i: usize = i.parse().map_err(|_| bad(&name))?;
        let layer: usize = layer.parse().map_err(|_| bad(&name))?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(&name));
        }
        let floats: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = Tensor::from_vec(floats, view.shape(), device)?.to_dtype(dtype)?;
        let e = parts.entry(i).or_insert((layer, None, None, None));
        match kind {
            "u" => e.1 = Some(t),
            "v" => e.2 = Some(t),
            "dense" => e.3 = Some(t),
            _ => return Err(bad(&name)),
        }
    }
    parts
        .into_iter()
        .map(|(i, (layer, u, v, dense))| match (u, v, dense) {
            (Some(u), Some(v), None) => Ok(Delta::LowRank { layer, u, v }),
            (None, None, Some(delta)) => Ok(Delta::Dense { layer, delta }),
            _ => Err(bad(&format!("{i}.{layer}"))),
        })
        .collect()
}

/// One version of a session: its edit's deltas on top of the version it was applied to.
#[derive(Debug, Default)]
pub struct Overlay {
    parent: Option<Arc<Overlay>>,
    deltas: Vec<Delta>,
    depth: usize,
}

impl Overlay {
    /// The base model (no deltas).
    pub fn base() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A new version: `deltas` applied on top of `parent`.
    pub fn push(parent: &Arc<Overlay>, deltas: Vec<Delta>) -> Arc<Self> {
        Arc::new(Self {
            parent: Some(parent.clone()),
            depth: parent.depth + 1,
            deltas,
        })
    }

    /// Edits between the base model and this version.
    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn is_base(&self) -> bool {
        self.depth == 0
    }

    /// This version's own deltas.
    pub fn own_deltas(&self) -> &[Delta] {
        &self.deltas
    }

    /// Every delta from the base up, oldest first.
    pub fn chain(&self) -> Vec<&Delta> {
        let mut nodes = Vec::with_capacity(self.depth);
        let mut at = Some(self);
        while let Some(n) = at {
            nodes.push(n);
            at = n.parent.as_deref();
        }
        nodes.iter().rev().flat_map(|n| n.deltas.iter()).collect()
    }

    /// Bytes held by the deltas of the whole chain.
    pub fn bytes(&self) -> usize {
        self.chain().iter().map(|d| d.bytes()).sum()
    }

    /// The version this one was applied on (`None` for the base model).
    pub fn parent(&self) -> Option<&Arc<Overlay>> {
        self.parent.as_ref()
    }

    /// Stacks the chain per layer for the forward pass.
    pub fn prepare(&self, model: &dyn CausalLm) -> Result<PreparedOverlay> {
        let mut layers = BTreeMap::new();
        for (layer, ds) in by_layer(self.chain(), model)? {
            layers.insert(layer, patch(model, layer, &ds)?);
        }
        Ok(PreparedOverlay { layers })
    }

    /// The same overlay as [`Overlay::prepare`], bit for bit, built from `parent`, the prepared
    /// overlay of this version's parent: only the layers this version's own deltas touch
    /// change, and each costs its own deltas (a rank-one add or a concatenation) instead of the
    /// whole chain's. At depth 1,000 preparing from scratch sums 1,000 dense products per
    /// edited layer; a sequential edit pays that twice (before and after it) otherwise.
    pub fn prepare_on(
        &self,
        model: &dyn CausalLm,
        parent: &PreparedOverlay,
    ) -> Result<PreparedOverlay> {
        let mut layers = parent.layers.clone();
        for (layer, own) in by_layer(self.deltas.iter().collect(), model)? {
            let (d_out, d_in) = model.mlp_out_weight(layer).dims2()?;
            let own_rank: Option<usize> = own.iter().map(|d| d.rank()).sum();
            let next = match (parent.layers.get(&layer), own_rank) {
                // Nothing below: this version's deltas are the layer's whole chain.
                (None, _) => patch(model, layer, &own)?,
                // `prepare` folds the deltas into an f32 accumulator in chain order; the
                // parent's f32 weight is that accumulator, so continuing the fold is exact.
                (Some(LayerPatch::Dense { weight }), _) if weight.dtype() == DType::F32 => {
                    let mut acc = weight.clone();
                    for d in &own {
                        acc = (acc + d.dense()?)?;
                    }
                    LayerPatch::Dense {
                        weight: acc.contiguous()?,
                    }
                }
                // Still cheaper low-rank: the stack is the parent's with these factors after.
                (Some(LayerPatch::LowRank { v_t, u }), Some(r))
                    if (u.dim(1)? + r) * (d_in + d_out) <= d_in * d_out =>
                {
                    let (own_u, own_v) = stacked(&own, u.dtype())?;
                    LayerPatch::LowRank {
                        v_t: Tensor::cat(&[v_t, &own_v.t()?], 0)?.contiguous()?,
                        u: Tensor::cat(&[u, &own_u], 1)?.contiguous()?,
                    }
                }
                // The stack turns dense here (or the dense copy was rounded to a narrower
                // dtype): from the layer's whole chain, as `prepare` does.
                _ => {
                    let chain: Vec<&Delta> = self
                        .chain()
                        .into_iter()
                        .filter(|d| d.layer() == layer)
                        .collect();
                    patch(model, layer, &chain)?
                }
            };
            layers.insert(layer, next);
        }
        Ok(PreparedOverlay { layers })
    }
}

/// `deltas` grouped by layer, in order; refuses a layer the model does not have.
fn by_layer<'d>(
    deltas: Vec<&'d Delta>,
    model: &dyn CausalLm,
) -> Result<BTreeMap<usize, Vec<&'d Delta>>> {
    let mut by_layer: BTreeMap<usize, Vec<&Delta>> = BTreeMap::new();
    for d in deltas {
        if d.layer() >= model.spec().n_layers {
            return Err(ModelError::InvalidInput(format!(
                "delta for layer {} but the model has {} layers",
                d.layer(),
                model.spec().n_layers
            )));
        }
        by_layer.entry(d.layer()).or_default().push(d);
    }
    Ok(by_layer)
}

/// The low-rank factors of `ds` side by side: `U (d_out, R)` and `V (d_in, R)` in `dtype`.
fn stacked(ds: &[&Delta], dtype: DType) -> Result<(Tensor, Tensor)> {
    let (mut us, mut vs) = (Vec::with_capacity(ds.len()), Vec::with_capacity(ds.len()));
    for d in ds {
        match d {
            Delta::LowRank { u, v, .. } => {
                us.push(u);
                vs.push(v);
            }
            Delta::Dense { .. } => {
                return Err(ModelError::InvalidInput(
                    "a dense delta in a low-rank stack".into(),
                ))
            }
        }
    }
    Ok((
        Tensor::cat(&us, 1)?.to_dtype(dtype)?,
        Tensor::cat(&vs, 1)?.to_dtype(dtype)?,
    ))
}

/// One layer's patch from its whole chain of deltas (oldest first).
fn patch(model: &dyn CausalLm, layer: usize, ds: &[&Delta]) -> Result<LayerPatch> {
    let w = model.mlp_out_weight(layer);
    let (d_out, d_in) = w.dims2()?;
    let low_rank: Option<usize> = ds.iter().map(|d| d.rank()).sum();
    Ok(match low_rank {
        Some(r) if r * (d_in + d_out) <= d_in * d_out => {
            let (u, v) = stacked(ds, w.dtype())?;
            LayerPatch::LowRank {
                v_t: v.t()?.contiguous()?,
                u: u.contiguous()?,
            }
        }
        _ => {
            // Sum in f32 in chain order: deterministic, so a version's logits never drift.
            let mut acc = w.to_dtype(DType::F32)?;
            for d in ds {
                acc = (acc + d.dense()?)?;
            }
            LayerPatch::Dense {
                weight: acc.to_dtype(w.dtype())?.contiguous()?,
            }
        }
    })
}

/// How one edited layer's down projection runs.
#[derive(Debug, Clone)]
pub enum LayerPatch {
    /// `y = W x + U (Vᵀ x)`; `v_t: (R, d_in)`, `u: (d_out, R)`, both `(out, in)` like weights.
    LowRank { v_t: Tensor, u: Tensor },
    /// `y = W' x` with `W' = W + ΣΔ` (`(d_out, d_in)`).
    Dense { weight: Tensor },
}

/// An overlay ready for the forward pass (derived data; the log is the truth).
#[derive(Debug, Clone, Default)]
pub struct PreparedOverlay {
    layers: BTreeMap<usize, LayerPatch>,
}

impl PreparedOverlay {
    pub fn layer(&self, layer: usize) -> Option<&LayerPatch> {
        self.layers.get(&layer)
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn bytes(&self) -> usize {
        let n = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.layers
            .values()
            .map(|p| match p {
                LayerPatch::LowRank { v_t, u } => n(v_t) + n(u),
                LayerPatch::Dense { weight } => n(weight),
            })
            .sum()
    }
}

/// A model view: the base model with a session's prepared overlay applied in every forward.
/// Everything that takes `&dyn CausalLm` (generation, scoring, editing) runs on it unchanged.
pub struct Edited<'a> {
    pub base: &'a dyn CausalLm,
    pub overlay: Arc<PreparedOverlay>,
}

impl<'a> Edited<'a> {
    pub fn new(base: &'a dyn CausalLm, overlay: Arc<PreparedOverlay>) -> Self {
        Self { base, overlay }
    }
}

impl CausalLm for Edited<'_> {
    fn spec(&self) -> &ModelSpec {
        self.base.spec()
    }
    fn embed(&self, input_ids: &Tensor, fwd: &Forward) -> Result<Tensor> {
        self.base.embed(input_ids, fwd)
    }
    fn run_layers(&self, h: Tensor, range: Range<usize>, fwd: &mut Forward) -> Result<Tensor> {
        let caller = fwd.swap_overlay((!self.overlay.is_empty()).then(|| self.overlay.clone()));
        let out = self.base.run_layers(h, range, fwd);
        fwd.swap_overlay(caller);
        out
    }
    fn head(&self, h: &Tensor, differentiable: bool) -> Result<Tensor> {
        self.base.head(h, differentiable)
    }
    /// The base weight (editing methods read edited values through forward passes).
    fn mlp_out_weight(&self, layer: usize) -> &Tensor {
        self.base.mlp_out_weight(layer)
    }
    fn device(&self) -> &Device {
        self.base.device()
    }
    fn dtype(&self) -> DType {
        self.base.dtype()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_round_trip_through_safetensors() {
        let dev = Device::Cpu;
        let u = Tensor::new(&[[1f32], [2.], [3.]], &dev).unwrap();
        let v = Tensor::new(&[[0.5f32], [-1.]], &dev).unwrap();
        let dense = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
        let ds = vec![
            Delta::LowRank { layer: 3, u, v },
            Delta::Dense {
                layer: 7,
                delta: dense,
            },
        ];
        let bytes = to_safetensors(&ds).unwrap();
        let back = from_safetensors(&bytes, &dev, DType::F32).unwrap();
        assert_eq!(back.len(), 2);
        for (a, b) in ds.iter().zip(&back) {
            assert_eq!(a.layer(), b.layer());
            assert_eq!(
                a.dense().unwrap().to_vec2::<f32>().unwrap(),
                b.dense().unwrap().to_vec2::<f32>().unwrap()
            );
        }
        assert!(from_safetensors(b"nope", &dev, DType::F32).is_err());
    }

    #[test]
    fn chains_list_deltas_oldest_first() {
        let dev = Device::Cpu;
        let d = |layer| Delta::Dense {
            layer,
            delta: Tensor::zeros((1, 1), DType::F32, &dev).unwrap(),
        };
        let base = Overlay::base();
        let v1 = Overlay::push(&base, vec![d(1)]);
        let v2 = Overlay::push(&v1, vec![d(2), d(3)]);
        let fork = Overlay::push(&v1, vec![d(9)]);
        let layers = |o: &Overlay| o.chain().iter().map(|d| d.layer()).collect::<Vec<_>>();
        assert_eq!(layers(&v2), vec![1, 2, 3]);
        assert_eq!(layers(&fork), vec![1, 9]);
        assert_eq!(v2.depth(), 2);
        assert!(base.is_base() && layers(&base).is_empty());
    }
}
