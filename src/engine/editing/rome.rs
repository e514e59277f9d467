//! ROME (Meng et al. 2022): a rank-one update of one layer's MLP down projection.
//!
//! `k*` is the mean key at the subject's last token over the edit prompt prefixed with short
//! model-generated contexts; `v*` is optimised so the model predicts the new target (see
//! [`optimise_values`]); the closed form `ΔW = (v* − W k)(C⁻¹k*)ᵀ / (kᵀ C⁻¹ k*)`, with `k` the
//! key of the plain prompt, writes `v*` at `k`.
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::hparams::check_layer;
use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::primitives::{mean_key, optimise_values, prompt_key, ValueHparams};
use super::EditError;
use crate::engine::model::{CausalLm, ModelSpec, Site, SiteKind, WeightId};
use crate::engine::overlay::Delta;

pub struct Rome;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RomeHparams {
    /// The layer whose MLP down projection is rewritten.
    #[schema(minimum = 0)]
    pub layer: usize,
    #[serde(flatten)]
    #[schema(inline)]
    pub value: ValueHparams,
    /// Corpus sequences for the key covariance `C = E[k kᵀ]`.
    #[schema(minimum = 1, maximum = 1000000)]
    pub mom2_samples: usize,
    /// Use `C⁻¹` in the update (false: identity, the ROME ablation).
    pub mom2_adjustment: bool,
}

impl MethodHparams for RomeHparams {
    fn check(&self, spec: &ModelSpec) -> Result<(), EditError> {
        check_layer("layer", self.layer, spec)
    }
}

impl TypedMethod for Rome {
    type Hparams = RomeHparams;
    const NAME: &'static str = "rome";
    const DESCRIPTION: &'static str = "Rank-one model editing (Meng et al. 2022): one edit at a time, a rank-one update of one layer's MLP down projection from a key covariance and an optimised value.";
    const BATCHED: bool = false;
    const DEFAULTS: &'static str = "rome";

    fn resources(&self, h: &RomeHparams) -> Vec<Resource> {
        let mut r = vec![Resource::ContextTemplates {
            count: h.value.context_templates,
            tokens: h.value.context_template_tokens,
        }];
        if h.mom2_adjustment {
            r.push(Resource::KeyStats {
                layers: vec![h.layer],
                samples: h.mom2_samples,
            });
        }
        r
    }

    fn compute(&self, input: &EditInput<'_>, h: &RomeHparams) -> Result<MethodOutput, EditError> {
        let model = input.model;
        let tok = input.tok;
        let req = input.requests[0];
        let templates = input.resources.templates()?;
        let inv_cov = if h.mom2_adjustment {
            Some(
                input
                    .resources
                    .stats(h.layer)?
                    .inverse_tensor(model.device())?,
            )
        } else {
            None
        };
        let layer = h.layer;
        let t0 = std::time::Instant::now();
        let k_star = mean_key(model, tok, req, templates, layer)?;
        let cur_k = prompt_key(model, tok, req, layer)?;
        let key_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = std::time::Instant::now();
        let site = Site::new(layer, SiteKind::MlpOut);
        let (mut values, diag) = optimise_values(model, tok, req, templates, &[site], &h.value)?;
        let v = values.remove(0);
        let v_ms = t1.elapsed().as_secs_f64() * 1e3;
        let left = match &inv_cov {
            Some(inv) => inv.matmul(&k_star.unsqueeze(1)?)?.squeeze(1)?,
            None => k_star.clone(),
        };
        let left = (&left / left.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
        let denom = (&cur_k * &left)?.sum_all()?.to_scalar::<f32>()? as f64;
        if !denom.is_finite() || denom.abs() < 1e-12 {
            return Err(EditError::Stats(
                "the edit key is orthogonal to its covariance direction; try another layer".into(),
            ));
        }
        let right: Tensor = ((&v.target - &v.current)? / denom)?;
        let dtype = model.dtype();
        let diagnostics = json!({
            "layer": layer,
            "v_star": diag,
            "right_norm": right.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
            "key_dot": denom,
            "templates": templates.len(),
            "timing_ms": {"keys": key_ms, "v_star": v_ms},
        });
        Ok(MethodOutput {
            deltas: vec![Delta::LowRank {
                weight: WeightId::mlp_down(layer),
                u: right.unsqueeze(1)?.to_dtype(dtype)?,
                v: left.unsqueeze(1)?.to_dtype(dtype)?,
            }],
            state: Vec::new(),
            diagnostics,
        })
    }
}
