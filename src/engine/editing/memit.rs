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
use serde_json::json;
use utoipa::ToSchema;

use super::hparams::check_layers;
use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::primitives::{locate, mean_key, optimise_values, read_at, spd_inverse, ValueHparams};
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

    /// Each layer step prepares its lower-layer updates on top of the current version.
    fn compute(&self, input: &EditInput<'_>, h: &MemitHparams) -> Result<MethodOutput, EditError> {
        let model = input.model;
        let tok = input.tok;
        let reqs = input.requests;
        let templates = input.resources.templates()?;
        let z_layer = *h.layers.last().expect("layers checked non-empty");
        let z_site = Site::new(z_layer, SiteKind::Residual);
        let base = model.base;
        let dev = base.device().clone();
        let mut zs = Vec::with_capacity(reqs.len());
        let mut v_diag = Vec::with_capacity(reqs.len());
        for r in reqs {
            let (mut z, d) = optimise_values(model, tok, r, templates, &[z_site], &h.value)?;
            zs.push(z.remove(0).target);
            v_diag.push(d);
        }
        let zs = Tensor::stack(&zs, 1)?; // (d, B)
        let plain: Vec<_> = reqs
            .iter()
            .map(|r| locate(tok, "{}", r))
            .collect::<Result<_, _>>()?;
        let plain_rows: Vec<Vec<u32>> = plain.iter().map(|l| l.ids.clone()).collect();
        let plain_at: Vec<(usize, usize)> = plain
            .iter()
            .enumerate()
            .map(|(i, l)| (i, l.subject_last))
            .collect();

        let mut deltas: Vec<Delta> = Vec::new();
        let mut layer_diag = Vec::new();
        let n = h.layers.len();
        for (i, &layer) in h.layers.iter().enumerate() {
            // The model with this step's lower-layer updates applied.
            let step = Overlay::push(input.current, deltas.clone());
            let view = Edited::new(base, Arc::new(step.prepare_on(base, &model.overlay)?));
            let keys: Vec<Tensor> = reqs
                .iter()
                .map(|r| mean_key(&view, tok, r, templates, layer))
                .collect::<Result<_, _>>()?;
            let k = Tensor::stack(&keys, 1)?; // (ff, B)
            let cur_z = read_at(&view, tok, &plain_rows, &plain_at, z_site)?.t()?; // (d, B)
            let resid = ((&zs - &cur_z)? / (n - i) as f64)?;
            let inv = input.resources.stats(layer)?.inverse_tensor(&dev)?;
            let p = inv.matmul(&k)?; // C⁻¹K (ff, B)
            let g = k.t()?.matmul(&p)?; // KᵀC⁻¹K (B, B)
            let b = g.dim(0)?;
            let lam = h.mom2_update_weight;
            let small = (g.to_dtype(DType::F64)? + (Tensor::eye(b, DType::F64, &dev)? * lam)?)?;
            let small_inv = spd_inverse(&small, "MEMIT's batch system")?;
            let adj = p.matmul(&small_inv.to_dtype(DType::F32)?)?; // (ff, B)
            layer_diag.push(json!({
                "layer": layer,
                "residual_norm": resid.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
            }));
            let dtype = base.dtype();
            deltas.push(Delta::LowRank {
                weight: WeightId::mlp_down(layer),
                u: resid.to_dtype(dtype)?.contiguous()?,
                v: adj.to_dtype(dtype)?.contiguous()?,
            });
        }
        let diagnostics = json!({
            "layers": h.layers,
            "z_layer": z_layer,
            "z_star": v_diag,
            "per_layer": layer_diag,
            "templates": templates.len(),
        });
        Ok(MethodOutput {
            deltas,
            state: Vec::new(),
            diagnostics,
        })
    }
}
