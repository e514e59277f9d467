//! MEMIT (Meng et al. 2023): a batch of edits spread over several layers.
//!
//! For every request, `z*` (the residual stream after the last MEMIT layer at the subject's last
//! token) is optimised as ROME's `v*` is. Then layer by layer, lowest first: the residual still
//! missing, `z* − z`, divided by the number of layers left, is written into that layer's down
//! projection by least squares against the key covariance,
//! `ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`, and the next layer sees the update. With `C⁻¹` cached the solve
//! is done in the batch's space (Woodbury): `(λC + KKᵀ)⁻¹ K = C⁻¹K (λI + KᵀC⁻¹K)⁻¹`.
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::hparams::check_layers;
use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::primitives::{
    mean_key, optimise_batch, plain_prompts, read_at, spd_inverse, ValueHparams,
};
use super::EditError;
use crate::engine::model::{ModelSpec, Site, SiteKind, WeightId};
use crate::engine::overlay::{Delta, Edited, Overlay};

pub struct Memit;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemitHparams {
    /// Strictly increasing layers the update is spread over (`z*` is optimised after the
    /// last).
    #[schema(min_items = 1)]
    pub layers: Vec<usize>,
    #[serde(flatten)]
    #[schema(inline)]
    pub value: ValueHparams,
    /// λ: weight of the key covariance against the new keys in the least squares.
    #[schema(minimum = 0.0, maximum = 1000000000.0)]
    pub mom2_update_weight: f64,
    /// Corpus sequences for the key covariance `C = E[k kᵀ]`.
    #[schema(minimum = 1, maximum = 1000000)]
    pub mom2_samples: usize,
}

impl MethodHparams for MemitHparams {
    fn check(&self, spec: &ModelSpec) -> Result<(), EditError> {
        check_layers("layers", &self.layers, spec)
    }
}

impl TypedMethod for Memit {
    type Hparams = MemitHparams;
    const NAME: &'static str = "memit";
    const DESCRIPTION: &'static str = "Mass-editing memory in a transformer (Meng et al. 2023): a batch of edits spread over several layers by per-layer least squares with the key covariance.";
    const BATCHED: bool = true;
    const DEFAULTS: &'static str = "memit";

    fn resources(&self, h: &MemitHparams) -> Vec<Resource> {
        covariance_resources(h)
    }

    fn compute(&self, input: &EditInput<'_>, h: &MemitHparams) -> Result<MethodOutput, EditError> {
        covariance_walk(input, h, &Target::RESIDUAL)
    }
}

/// What MEMIT and PMET need: the context templates and the key statistics of their layers.
pub(super) fn covariance_resources(h: &MemitHparams) -> Vec<Resource> {
    vec![
        Resource::ContextTemplates {
            count: h.value.context_templates,
            tokens: h.value.context_template_tokens,
        },
        Resource::KeyStats {
            layers: h.layers.clone(),
            samples: h.mom2_samples,
        },
    ]
}

/// MEMIT's edit towards `target`: the walk over the layers with the covariance least squares
/// (PMET is this with its own target).
pub(super) fn covariance_walk(
    input: &EditInput<'_>,
    h: &MemitHparams,
    target: &Target,
) -> Result<MethodOutput, EditError> {
    let walk = spread(input, &h.layers, &h.value, target, |step| {
        Ok((
            covariance_solve(input, &step, h.mom2_update_weight)?,
            json!({}),
        ))
    })?;
    let diagnostics = walk.diagnostics(&h.layers, input.resources.templates()?.len());
    Ok(MethodOutput {
        deltas: walk.deltas,
        state: Vec::new(),
        diagnostics,
    })
}

/// MEMIT's least squares against the key covariance: `X = (λC + KKᵀ)⁻¹K`, solved as
/// `C⁻¹K (λI + KᵀC⁻¹K)⁻¹` in the batch's space.
pub(super) fn covariance_solve(
    input: &EditInput<'_>,
    step: &LayerStep<'_>,
    lam: f64,
) -> Result<Tensor, EditError> {
    let dev = input.model.base.device().clone();
    let inv = input.resources.stats(step.layer)?.inverse_tensor(&dev)?;
    let p = inv.matmul(step.keys)?; // C⁻¹K (ff, B)
    let g = step.keys.t()?.matmul(&p)?; // KᵀC⁻¹K (B, B)
    let b = g.dim(0)?;
    let small = (g.to_dtype(DType::F64)? + (Tensor::eye(b, DType::F64, &dev)? * lam)?)?;
    let small_inv = spd_inverse(&small, "the batch's key system")?;
    Ok(p.matmul(&small_inv.to_dtype(DType::F32)?)?)
}

/// What a walk optimises at its last layer and writes over its layers.
pub(super) struct Target {
    /// The sites of the last layer whose values are optimised together for each request.
    pub optimise: &'static [SiteKind],
    /// The one of them whose missing part the layers write, read back after each update.
    pub written: SiteKind,
    /// The share of the missing part a layer writes, given the layers left including it.
    pub share: fn(usize) -> f64,
}

impl Target {
    /// MEMIT's: the residual stream, each layer writing its even share of what is missing.
    pub const RESIDUAL: Target = Target {
        optimise: &[SiteKind::Residual],
        written: SiteKind::Residual,
        share: |left| 1.0 / left as f64,
    };
}

/// One layer of MEMIT's walk: the layer and this step's keys there (`(ff, B)`).
pub(super) struct LayerStep<'t> {
    pub layer: usize,
    pub keys: &'t Tensor,
}

/// What [`spread`] made: the deltas, per-layer diagnostics and the `z*` optimisations'.
pub(super) struct Spread {
    pub deltas: Vec<Delta>,
    pub per_layer: Vec<Value>,
    pub z_star: Vec<Value>,
}

impl Spread {
    /// The diagnostics every spreading method reports.
    pub fn diagnostics(&self, layers: &[usize], templates: usize) -> Value {
        json!({
            "layers": layers,
            "z_layer": layers.last(),
            "z_star": self.z_star,
            "per_layer": self.per_layer,
            "templates": templates,
        })
    }
}

/// MEMIT's walk, shared by the methods that spread a batch over layers: `z*` for every request
/// at the `target`'s site of the last layer, then lowest layer first, on the current model with
/// this step's lower-layer updates applied, the step's keys and the target's share of what is
/// still missing there; `solve` turns the keys into `X` (`(ff, B)`, and diagnostics), and the
/// layer's update is `ΔW = R Xᵀ`.
pub(super) fn spread(
    input: &EditInput<'_>,
    layers: &[usize],
    value: &ValueHparams,
    target: &Target,
    mut solve: impl FnMut(LayerStep<'_>) -> Result<(Tensor, Value), EditError>,
) -> Result<Spread, EditError> {
    let (model, tok, reqs) = (input.model, input.tok, input.requests);
    let templates = input.resources.templates()?;
    let z_layer = *layers.last().expect("layers checked non-empty");
    let z_site = Site::new(z_layer, target.written);
    let sites: Vec<Site> = target
        .optimise
        .iter()
        .map(|&k| Site::new(z_layer, k))
        .collect();
    let keep = target
        .optimise
        .iter()
        .position(|&k| k == target.written)
        .expect("the written site is optimised");
    let base = model.base;
    let (zs, z_star) = optimise_batch(model, tok, reqs, templates, &sites, keep, value)?; // (d, B)
    let (plain_rows, plain_at) = plain_prompts(tok, reqs)?;
    let mut deltas: Vec<Delta> = Vec::new();
    let mut per_layer = Vec::new();
    let n = layers.len();
    for (i, &layer) in layers.iter().enumerate() {
        let view = with_step(input, &deltas)?;
        let keys: Vec<Tensor> = reqs
            .iter()
            .map(|r| mean_key(&view, tok, r, templates, layer))
            .collect::<Result<_, _>>()?;
        let k = Tensor::stack(&keys, 1)?; // (ff, B)
        let cur_z = read_at(&view, tok, &plain_rows, &plain_at, z_site)?.t()?; // (d, B)
        let resid = ((&zs - &cur_z)? * (target.share)(n - i))?;
        let (x, mut diag) = solve(LayerStep { layer, keys: &k })?;
        if let Some(d) = diag.as_object_mut() {
            d.insert("layer".into(), json!(layer));
            d.insert(
                "residual_norm".into(),
                json!(resid.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?),
            );
        }
        per_layer.push(diag);
        let dtype = base.dtype();
        deltas.push(Delta::LowRank {
            weight: WeightId::mlp_down(layer),
            u: resid.to_dtype(dtype)?.contiguous()?,
            v: x.to_dtype(dtype)?.contiguous()?,
        });
    }
    Ok(Spread {
        deltas,
        per_layer,
        z_star,
    })
}

/// The current model with `deltas` (this step's updates so far) applied on top of the current
/// version, prepared from the current version's prepared overlay.
pub(super) fn with_step<'a>(
    input: &EditInput<'a>,
    deltas: &[Delta],
) -> Result<Edited<'a>, EditError> {
    let base = input.model.base;
    let step = Overlay::push(input.current, deltas.to_vec());
    Ok(Edited::new(
        base,
        Arc::new(step.prepare_on(base, &input.model.overlay)?),
    ))
}
