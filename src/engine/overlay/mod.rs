//! A session's edits as deltas over the immutable base weights.
//!
//! Every version of a session is an [`Overlay`] node: what the edit that made it added (weight
//! deltas and method state) plus a pointer to the version it was applied on, so versions share
//! their history and a rollback is only a pointer move. A forward pass runs against a
//! [`PreparedOverlay`]: per edited weight the stacked low-rank factors (`y = W x + U (Vᵀ x)`),
//! or one dense copy `W + U Vᵀ` once the stacked rank makes the dense product cheaper.
//! Run-time modules (GRACE's [`Codebook`], WISE's [`WiseMemory`]) are folded from the chain's
//! method state the same way and act inside the forward pass; SERAC's [`ScopeMemory`] acts on
//! the inputs before it. Preparing is a pure function of the chain, so the same version always
//! yields bit-identical logits.
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::model::{CausalLm, Conditioning, Forward, ModelError, ModelSpec, Result, WeightId};

mod codebook;
mod delta;
mod format;
mod scope_memory;
mod wise_memory;

pub use codebook::{Codebook, CodebookWrite, Entry};
pub use delta::{Delta, StateEntry};
pub use format::{decode, encode, VersionData, FORMAT_VERSION};
pub use scope_memory::{
    pooled, ScopeEntry, ScopeHead, ScopeMemory, ENTRY_STATE as SERAC_ENTRY,
    HEAD_STATE as SERAC_HEAD,
};
pub use wise_memory::{
    activation_distance, shard_mask, Activation, Scoring, Span, WiseMemory, WiseWrite,
};

/// One version of a session: its edit's deltas and state on top of the version it was applied
/// to.
#[derive(Debug, Default)]
pub struct Overlay {
    parent: Option<Arc<Overlay>>,
    deltas: Vec<Delta>,
    state: Vec<StateEntry>,
    depth: usize,
}

impl Overlay {
    /// The base model (no deltas).
    pub fn base() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A new version: `deltas` applied on top of `parent`.
    pub fn push(parent: &Arc<Overlay>, deltas: Vec<Delta>) -> Arc<Self> {
        Self::push_with(parent, deltas, Vec::new())
    }

    /// A new version that also records method state (see [`Overlay::state`]).
    pub fn push_with(
        parent: &Arc<Overlay>,
        deltas: Vec<Delta>,
        state: Vec<StateEntry>,
    ) -> Arc<Self> {
        Arc::new(Self {
            parent: Some(parent.clone()),
            depth: parent.depth + 1,
            deltas,
            state,
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

    /// This version's own state entries.
    pub fn own_state(&self) -> &[StateEntry] {
        &self.state
    }

    /// The nodes from the base up to this one, oldest first.
    fn nodes(&self) -> Vec<&Overlay> {
        let mut nodes = Vec::with_capacity(self.depth + 1);
        let mut at = Some(self);
        while let Some(n) = at {
            nodes.push(n);
            at = n.parent.as_deref();
        }
        nodes.reverse();
        nodes
    }

    /// Every delta from the base up, oldest first.
    pub fn chain(&self) -> Vec<&Delta> {
        self.nodes()
            .into_iter()
            .flat_map(|n| n.deltas.iter())
            .collect()
    }

    /// The state entries named `name` from the base up, oldest first: a method that accumulates
    /// (AlphaEdit's keys) reads them all; one that replaces reads the last.
    pub fn state(&self, name: &str) -> Vec<&Tensor> {
        self.nodes()
            .into_iter()
            .flat_map(|n| n.state.iter())
            .filter(|s| s.name == name)
            .map(|s| &s.tensor)
            .collect()
    }

    /// Bytes held by the deltas and state of the whole chain.
    pub fn bytes(&self) -> usize {
        self.nodes().iter().map(|n| n.own_bytes()).sum()
    }

    /// Bytes of this version's own deltas and state.
    pub fn own_bytes(&self) -> usize {
        self.deltas.iter().map(Delta::bytes).sum::<usize>()
            + self.state.iter().map(StateEntry::bytes).sum::<usize>()
    }

    /// The version this one was applied on (`None` for the base model).
    pub fn parent(&self) -> Option<&Arc<Overlay>> {
        self.parent.as_ref()
    }

    /// Stacks the chain per weight for the forward pass. `model` is the base model.
    pub fn prepare(&self, model: &dyn CausalLm) -> Result<PreparedOverlay> {
        let mut weights = BTreeMap::new();
        for (id, ds) in by_weight(self.chain(), model)? {
            weights.insert(id, patch(model, id, &ds)?);
        }
        let states: Vec<&StateEntry> = self
            .nodes()
            .into_iter()
            .flat_map(|n| n.state.iter())
            .collect();
        let modules = fold(model, BTreeMap::new(), states.iter().copied())?;
        let wise = fold(model, BTreeMap::new(), states.iter().copied())?;
        let mut scope = ScopeMemory::default();
        scope.write_all(states.iter().copied())?;
        Ok(PreparedOverlay {
            weights,
            modules,
            wise,
            scope: Arc::new(scope),
        })
    }

    /// The same overlay as [`Overlay::prepare`], bit for bit, built from `parent`, the prepared
    /// overlay of this version's parent: only the weights this version's own deltas touch
    /// change, and each costs its own deltas (a rank-one add or a concatenation) instead of the
    /// whole chain's. At depth 1,000 preparing from scratch sums 1,000 dense products per
    /// edited weight; a sequential edit pays that twice (before and after it) otherwise.
    pub fn prepare_on(
        &self,
        model: &dyn CausalLm,
        parent: &PreparedOverlay,
    ) -> Result<PreparedOverlay> {
        let mut weights = parent.weights.clone();
        for (id, own) in by_weight(self.deltas.iter().collect(), model)? {
            let (d_out, d_in) = model.weight(id)?.dims2()?;
            let own_rank: Option<usize> = own.iter().map(|d| d.rank()).sum();
            let next = match (parent.weights.get(&id), own_rank) {
                // Nothing below: this version's deltas are the weight's whole chain.
                (None, _) => patch(model, id, &own)?,
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
                // dtype): from the weight's whole chain, as `prepare` does.
                _ => {
                    let chain: Vec<&Delta> = self
                        .chain()
                        .into_iter()
                        .filter(|d| d.weight() == id)
                        .collect();
                    patch(model, id, &chain)?
                }
            };
            weights.insert(id, next);
        }
        let modules = fold(model, parent.modules.clone(), self.state.iter())?;
        let wise = fold(model, parent.wise.clone(), self.state.iter())?;
        let mut scope = parent.scope.clone();
        if self.state.iter().any(|s| s.name.starts_with("serac.")) {
            Arc::make_mut(&mut scope).write_all(self.state.iter())?;
        }
        Ok(PreparedOverlay {
            weights,
            modules,
            wise,
            scope,
        })
    }
}

/// A kind of run-time module folded from method state: which state entries are its writes and
/// how a layer's module takes them.
trait ModuleKind: Clone + Sized {
    type Write;
    /// What an error calls it.
    const WHAT: &'static str;
    /// The layer a state entry name writes to, if it names one of this kind's writes.
    fn layer_of(name: &str) -> Option<usize>;
    fn decode(model: &dyn CausalLm, t: &Tensor) -> Result<Self::Write>;
    /// The module of a layer no write has touched yet.
    fn empty(model: &dyn CausalLm) -> Self;
    fn write_all(&mut self, writes: &[Self::Write]) -> Result<()>;
}

/// A codebook's key and value widths: what enters and leaves a layer's down projection.
fn codebook_dims(model: &dyn CausalLm) -> (usize, usize) {
    (model.spec().intermediate_size, model.spec().hidden_size)
}

impl ModuleKind for Codebook {
    type Write = CodebookWrite;
    const WHAT: &'static str = "codebook";
    fn layer_of(name: &str) -> Option<usize> {
        CodebookWrite::layer_of(name)
    }
    fn decode(model: &dyn CausalLm, t: &Tensor) -> Result<CodebookWrite> {
        let (key_dim, value_dim) = codebook_dims(model);
        CodebookWrite::from_state(t, key_dim, value_dim)
    }
    fn empty(model: &dyn CausalLm) -> Self {
        let (key_dim, value_dim) = codebook_dims(model);
        Codebook::new(key_dim, value_dim, model.device())
    }
    fn write_all(&mut self, writes: &[CodebookWrite]) -> Result<()> {
        Codebook::write_all(self, writes)
    }
}

impl ModuleKind for WiseMemory {
    type Write = WiseWrite;
    const WHAT: &'static str = "WISE memory";
    fn layer_of(name: &str) -> Option<usize> {
        WiseWrite::layer_of(name)
    }
    fn decode(_: &dyn CausalLm, t: &Tensor) -> Result<WiseWrite> {
        WiseWrite::from_state(t)
    }
    fn empty(model: &dyn CausalLm) -> Self {
        let spec = model.spec();
        WiseMemory::new(
            spec.hidden_size,
            spec.intermediate_size,
            Activation::of(spec.architecture),
            model.device(),
        )
    }
    fn write_all(&mut self, writes: &[WiseWrite]) -> Result<()> {
        WiseMemory::write_all(self, writes)
    }
}

/// `modules` with the writes of kind `M` among `states` applied in order; only the layers
/// written to are copied.
fn fold<'s, M: ModuleKind>(
    model: &dyn CausalLm,
    mut modules: BTreeMap<usize, Arc<M>>,
    states: impl Iterator<Item = &'s StateEntry>,
) -> Result<BTreeMap<usize, Arc<M>>> {
    let mut writes: BTreeMap<usize, Vec<M::Write>> = BTreeMap::new();
    for s in states {
        let Some(layer) = M::layer_of(&s.name) else {
            continue;
        };
        if layer >= model.spec().n_layers {
            return Err(ModelError::InvalidInput(format!(
                "{} at layer {layer} but the model has {} layers",
                M::WHAT,
                model.spec().n_layers
            )));
        }
        writes
            .entry(layer)
            .or_default()
            .push(M::decode(model, &s.tensor)?);
    }
    for (layer, ws) in writes {
        let mut m = match modules.get(&layer) {
            Some(m) => (**m).clone(),
            None => M::empty(model),
        };
        m.write_all(&ws)?;
        modules.insert(layer, Arc::new(m));
    }
    Ok(modules)
}

/// `deltas` grouped by weight, in order; refuses a weight the model does not have.
fn by_weight<'d>(
    deltas: Vec<&'d Delta>,
    model: &dyn CausalLm,
) -> Result<BTreeMap<WeightId, Vec<&'d Delta>>> {
    let mut by_weight: BTreeMap<WeightId, Vec<&Delta>> = BTreeMap::new();
    for d in deltas {
        let id = d.weight();
        if id.layer >= model.spec().n_layers {
            return Err(ModelError::InvalidInput(format!(
                "delta for layer {} but the model has {} layers",
                id.layer,
                model.spec().n_layers
            )));
        }
        let w = model.weight(id)?;
        let want = w.dims2()?;
        let got = match d {
            Delta::LowRank { u, v, .. } => (u.dim(0)?, v.dim(0)?),
            Delta::Dense { delta, .. } => delta.dims2()?,
        };
        if got != want {
            return Err(ModelError::InvalidInput(format!(
                "delta for {id} is {got:?} but the weight is {want:?}"
            )));
        }
        by_weight.entry(id).or_default().push(d);
    }
    Ok(by_weight)
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

/// One weight's patch from its whole chain of deltas (oldest first).
fn patch(model: &dyn CausalLm, id: WeightId, ds: &[&Delta]) -> Result<LayerPatch> {
    let w = model.weight(id)?;
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

/// How one edited weight runs.
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
    weights: BTreeMap<WeightId, LayerPatch>,
    /// GRACE's codebooks at layers' MLP outputs.
    modules: BTreeMap<usize, Arc<Codebook>>,
    /// WISE's side memories at layers' down projections.
    wise: BTreeMap<usize, Arc<WiseMemory>>,
    /// SERAC's edit memory, which conditions in-scope inputs.
    scope: Arc<ScopeMemory>,
}

impl PreparedOverlay {
    /// An overlay of the given weight patches alone (MEND's training passes build one whose
    /// patches carry gradients).
    pub fn from_patches(weights: BTreeMap<WeightId, LayerPatch>) -> Self {
        Self {
            weights,
            ..Self::default()
        }
    }

    pub fn weight(&self, id: WeightId) -> Option<&LayerPatch> {
        self.weights.get(&id)
    }

    /// The edited weights, in order.
    pub fn edited(&self) -> impl Iterator<Item = WeightId> + '_ {
        self.weights.keys().copied()
    }

    /// GRACE's codebook at `layer`'s MLP output, if the chain wrote one.
    pub fn codebook(&self, layer: usize) -> Option<&Codebook> {
        self.modules.get(&layer).map(|m| m.as_ref())
    }

    /// WISE's memories at `layer`, if the chain wrote any.
    pub fn wise(&self, layer: usize) -> Option<&WiseMemory> {
        self.wise.get(&layer).map(|m| m.as_ref())
    }

    /// The same overlay without WISE's memories at `layer`: what WISE trains a new edit on
    /// (EasyEdit's adapter in editing mode runs the side memory alone, unrouted).
    pub fn without_wise(&self, layer: usize) -> Self {
        let mut o = self.clone();
        o.wise.remove(&layer);
        o
    }

    /// True when a module decides per sequence (WISE): such a sequence's result depends on all
    /// of its tokens, so a prefix computed for another sequence cannot be reused for it.
    pub fn routes_per_sequence(&self) -> bool {
        self.wise.values().any(|m| m.memories() > 0)
    }

    /// SERAC's edit memory (empty unless the chain holds SERAC edits).
    pub fn scope(&self) -> &ScopeMemory {
        &self.scope
    }

    /// True when nothing acts inside the forward pass (SERAC's memory acts before it).
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty() && self.modules.is_empty() && self.wise.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.weights
            .values()
            .map(|p| match p {
                LayerPatch::LowRank { v_t, u } => delta::tensor_bytes(v_t) + delta::tensor_bytes(u),
                LayerPatch::Dense { weight } => delta::tensor_bytes(weight),
            })
            .sum::<usize>()
            + self.modules.values().map(|m| m.bytes()).sum::<usize>()
            + self.wise.values().map(|m| m.bytes()).sum::<usize>()
            + self.scope.bytes()
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
    fn token_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        self.base.token_embeddings(ids)
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
    /// The edited weight: what a method reads as `W` when it edits on top of earlier edits.
    fn weight(&self, id: WeightId) -> Result<Tensor> {
        let base = self.base.weight(id)?;
        Ok(match self.overlay.weight(id) {
            None => base,
            Some(LayerPatch::Dense { weight }) => weight.clone(),
            Some(LayerPatch::LowRank { v_t, u }) => (base.to_dtype(DType::F32)?
                + u.to_dtype(DType::F32)?.matmul(&v_t.to_dtype(DType::F32)?)?)?
            .to_dtype(base.dtype())?,
        })
    }
    fn device(&self) -> &Device {
        self.base.device()
    }
    fn dtype(&self) -> DType {
        self.base.dtype()
    }
    fn routes_per_sequence(&self) -> bool {
        self.overlay.routes_per_sequence()
    }
    fn condition(&self, inputs: &[&[u32]]) -> Result<Option<Vec<Option<Arc<Conditioning>>>>> {
        let memory = self.overlay.scope();
        if memory.is_empty() {
            return Ok(None);
        }
        let routes = memory.route(self.base, inputs)?;
        Ok(Some(
            routes
                .into_iter()
                .map(|r| r.map(|i| memory.entry(i).conditioning.clone()))
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::Linear;

    #[test]
    fn chains_list_deltas_and_state_oldest_first() {
        let dev = Device::Cpu;
        let d = |layer| Delta::Dense {
            weight: WeightId::mlp_down(layer),
            delta: Tensor::zeros((1, 1), DType::F32, &dev).unwrap(),
        };
        let s = |x: f32| StateEntry::new("m.keys", Tensor::new(&[x], &dev).unwrap());
        let base = Overlay::base();
        let v1 = Overlay::push_with(&base, vec![d(1)], vec![s(1.0)]);
        let v2 = Overlay::push_with(&v1, vec![d(2), d(3)], vec![s(2.0)]);
        let fork = Overlay::push(&v1, vec![d(9)]);
        let layers = |o: &Overlay| o.chain().iter().map(|d| d.layer()).collect::<Vec<_>>();
        assert_eq!(layers(&v2), vec![1, 2, 3]);
        assert_eq!(layers(&fork), vec![1, 9]);
        assert_eq!(v2.depth(), 2);
        assert!(base.is_base() && layers(&base).is_empty());
        let keys = |o: &Overlay| {
            o.state("m.keys")
                .iter()
                .map(|t| t.to_vec1::<f32>().unwrap()[0])
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&v2), vec![1.0, 2.0]);
        assert_eq!(keys(&fork), vec![1.0]);
        assert!(v2.state("other").is_empty());
        assert_eq!(v2.bytes(), 3 * 4 + 2 * 4);
        let _ = Linear::AttnO;
    }
}
