//! AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the
//! preserved knowledge's keys, solved against the keys of the session's earlier edits.
//!
//! `z*` is optimised per request as in MEMIT, and the missing residual is spread over the
//! layers lowest first. At each layer the update is `ΔW = R Xᵀ` with
//! `X = (P (K Kᵀ + Kₚ Kₚᵀ) + λ I)⁻¹ P K` — `P = U₀U₀ᵀ` the projector onto the covariance's
//! eigenvectors under `nullspace_threshold`, `K` this step's keys, `Kₚ` the keys of the
//! session's earlier AlphaEdit edits at that layer (method state of the version), `λ` the
//! `l2` ridge. `X` lies in `P`'s range, so with `H = P [Kₚ K]` the solve is
//! `X = (PK − H (λI + HᵀH)⁻¹ Hᵀ PK) / λ`: a system of the session's edit count, not of the
//! MLP width. After the update the keys of this step, read on the edited model, join the
//! version's state.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::hparams::check_layers;
use super::memit::{spread, with_step, Target};
use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::primitives::{mean_keys, spd_inverse, ValueHparams};
use super::EditError;
use crate::engine::model::ModelSpec;
use crate::engine::overlay::StateEntry;

pub struct AlphaEdit;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlphaEditHparams {
    /// Strictly increasing layers the update is spread over (`z*` is optimised after the
    /// last).
    #[schema(min_items = 1)]
    pub layers: Vec<usize>,
    #[serde(flatten)]
    #[schema(inline)]
    pub value: ValueHparams,
    /// Eigenvalues of the key covariance below this span the null space updates are
    /// projected onto (AlphaEdit's `nullspace_threshold`).
    #[schema(minimum = 0.0, maximum = 1000000.0)]
    pub nullspace_threshold: f64,
    /// Ridge weight `λ` of the solve (AlphaEdit's `L2`).
    #[schema(minimum = 0.000001, maximum = 1000000.0)]
    pub l2: f64,
    /// Corpus sequences for the key covariance the null space comes from.
    #[schema(minimum = 1, maximum = 1000000)]
    pub mom2_samples: usize,
}

impl MethodHparams for AlphaEditHparams {
    fn check(&self, spec: &ModelSpec) -> Result<(), EditError> {
        check_layers("layers", &self.layers, spec)
    }
}

/// The state entry holding the keys AlphaEdit wrote at `layer` (`(ff, n)` per version).
fn keys_name(layer: usize) -> String {
    format!("alphaedit.keys.{layer}")
}

impl TypedMethod for AlphaEdit {
    type Hparams = AlphaEditHparams;
    const NAME: &'static str = "alphaedit";
    const DESCRIPTION: &'static str = "AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of the preserved knowledge's key covariance, solved against the keys of the session's earlier edits (kept as the version's state).";
    const BATCHED: bool = true;
    const DEFAULTS: &'static str = "alphaedit";

    fn resources(&self, h: &AlphaEditHparams) -> Vec<Resource> {
        vec![
            Resource::ContextTemplates {
                count: h.value.context_templates,
                tokens: h.value.context_template_tokens,
            },
            Resource::NullSpace {
                layers: h.layers.clone(),
                samples: h.mom2_samples,
                threshold: h.nullspace_threshold,
            },
        ]
    }

    fn compute(
        &self,
        input: &EditInput<'_>,
        h: &AlphaEditHparams,
    ) -> Result<MethodOutput, EditError> {
        let dev = input.model.base.device().clone();
        let walk = spread(input, &h.layers, &h.value, &Target::RESIDUAL, |step| {
            let layer = step.layer;
            let ns = input.resources.null_space(layer)?;
            if ns.rank == 0 {
                return Err(EditError::Stats(format!(
                    "the key covariance of layer {layer} has no eigenvalue below \
                     nullspace_threshold {} (its smallest is {:.3e}); raise the threshold",
                    h.nullspace_threshold, ns.eigen_range.0
                )));
            }
            let u0 = ns.basis(&dev)?; // (ff, r)
            let project =
                |m: &Tensor| -> candle_core::Result<Tensor> { u0.matmul(&u0.t()?.matmul(m)?) };
            let mut all: Vec<Tensor> = input
                .current
                .state(&keys_name(layer))
                .into_iter()
                .map(|t| t.to_device(&dev))
                .collect::<candle_core::Result<_>>()?;
            let earlier = all.len();
            all.push(step.keys.clone());
            let hk = project(&Tensor::cat(&all, 1)?)?; // P [Kₚ K]: (ff, N + B)
            let (m, b) = (hk.dim(1)?, step.keys.dim(1)?);
            let pk = hk.narrow(1, m - b, b)?; // PK (ff, B)
            let gram = (hk.t()?.matmul(&hk)?.to_dtype(DType::F64)?
                + (Tensor::eye(m, DType::F64, &dev)? * h.l2)?)?;
            let gram_inv = spd_inverse(&gram, "AlphaEdit's key system")?.to_dtype(DType::F32)?;
            let x = ((&pk - hk.matmul(&gram_inv.matmul(&hk.t()?.matmul(&pk)?)?)?)? / h.l2)?;
            let diag = json!({
                "null_space_rank": ns.rank,
                "earlier_keys": m - b,
                "earlier_versions": earlier,
                "x_norm": x.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
            });
            Ok((x, diag))
        })?;
        let (tok, reqs) = (input.tok, input.requests);
        let templates = input.resources.templates()?;
        let diagnostics = walk.diagnostics(&h.layers, templates.len());
        let deltas = walk.deltas;
        // The keys this step wrote, read on the model it leaves (as AlphaEdit accumulates them).
        let after = with_step(input, &deltas)?;
        let mut state = Vec::with_capacity(h.layers.len());
        let per_request: Vec<Vec<Tensor>> = reqs
            .iter()
            .map(|r| mean_keys(&after, tok, r, templates, &h.layers))
            .collect::<Result<_, _>>()?;
        for (j, &layer) in h.layers.iter().enumerate() {
            let cols: Vec<&Tensor> = per_request.iter().map(|ks| &ks[j]).collect();
            state.push(StateEntry::new(keys_name(layer), Tensor::stack(&cols, 1)?));
        }
        Ok(MethodOutput {
            deltas,
            state,
            diagnostics,
        })
    }
}
