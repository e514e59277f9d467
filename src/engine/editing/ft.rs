//! FT-L and FT-M: norm-bounded fine-tuning of one layer's MLP down projection, stored as a
//! dense delta. The key entering the layer does not depend on the update, so the layers below
//! and the keys are computed once; each Adam step runs only the layers from the edited one up.
use candle_core::{DType, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::hparams::check_layer;
use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::primitives::{pad, weighted_nll, TargetTerm};
use super::{EditError, EditRequest};
use crate::engine::model::score::encode_pair;
use crate::engine::model::{
    CausalLm, Forward, Hooks, ModelSpec, Positions, Site, SiteKind, Tok, WeightId,
};
use crate::engine::overlay::Delta;

/// FT-L: EasyEdit's `prompt_last` objective.
pub struct FtL;
/// FT-M: the loss masked to the target tokens.
pub struct FtM;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FtHparams {
    /// The layer whose MLP down projection is tuned.
    #[schema(minimum = 0)]
    pub layer: usize,
    /// Adam learning rate.
    #[schema(minimum = 0.00000001, maximum = 1.0)]
    pub lr: f64,
    /// Adam steps.
    #[schema(minimum = 1, maximum = 500)]
    pub steps: usize,
    /// L∞ bound on each entry of the update.
    #[schema(minimum = 0.00000001, maximum = 10.0)]
    pub norm_constraint: f64,
}

impl MethodHparams for FtHparams {
    fn check(&self, spec: &ModelSpec) -> Result<(), EditError> {
        check_layer("layer", self.layer, spec)
    }
}

impl TypedMethod for FtL {
    type Hparams = FtHparams;
    const NAME: &'static str = "ft-l";
    const DESCRIPTION: &'static str = "Constrained fine-tuning of one layer's MLP down projection (Zhu et al. 2020), EasyEdit's `prompt_last` objective: the log-probabilities of the target's tokens at the prompt's last position; the update is clamped to an L∞ norm.";
    const BATCHED: bool = false;
    const DEFAULTS: &'static str = "ft";

    fn resources(&self, _: &FtHparams) -> Vec<Resource> {
        Vec::new()
    }

    fn compute(&self, input: &EditInput<'_>, h: &FtHparams) -> Result<MethodOutput, EditError> {
        edit(input.model, input.tok, input.requests, h, false)
    }
}

impl TypedMethod for FtM {
    type Hparams = FtHparams;
    const NAME: &'static str = "ft-m";
    const DESCRIPTION: &'static str = "Constrained fine-tuning of one layer's MLP down projection with the loss masked to the target tokens (EasyEdit's FT-M); the update is clamped to an L∞ norm.";
    const BATCHED: bool = false;
    const DEFAULTS: &'static str = "ft";

    fn resources(&self, _: &FtHparams) -> Vec<Resource> {
        Vec::new()
    }

    fn compute(&self, input: &EditInput<'_>, h: &FtHparams) -> Result<MethodOutput, EditError> {
        edit(input.model, input.tok, input.requests, h, true)
    }
}

/// FT-M rows: `prompt + target[..-1]`, the loss on every target token (teacher forcing).
/// FT-L rows: the prompt only, the loss on every target token at the prompt's last position
/// (EasyEdit's `prompt_last`).
fn rows(
    tok: &Tok,
    reqs: &[&EditRequest],
    masked: bool,
) -> Result<(Vec<Vec<u32>>, Vec<TargetTerm>), EditError> {
    let mut rows: Vec<Vec<u32>> = Vec::new();
    let mut terms = Vec::new();
    for (r, req) in reqs.iter().enumerate() {
        let (prompt, _) = req.filled();
        let (ctx, target) = encode_pair(tok, &prompt, &req.target_new_text())?;
        let weight = 1.0 / (reqs.len() * target.len()) as f64;
        let term = |position, token| TargetTerm {
            row: r,
            position,
            token,
            weight,
        };
        if masked {
            let mut row = ctx.clone();
            row.extend_from_slice(&target[..target.len() - 1]);
            for (j, &t) in target.iter().enumerate() {
                terms.push(term(ctx.len() - 1 + j, t));
            }
            rows.push(row);
        } else {
            for &t in &target {
                terms.push(term(ctx.len() - 1, t));
            }
            rows.push(ctx);
        }
    }
    Ok((rows, terms))
}

fn edit(
    model: &dyn CausalLm,
    tok: &Tok,
    reqs: &[&EditRequest],
    h: &FtHparams,
    masked: bool,
) -> Result<MethodOutput, EditError> {
    let dev = model.device().clone();
    let layer = h.layer;
    let n_layers = model.spec().n_layers;
    let (rows, terms) = rows(tok, reqs, masked)?;
    let (input, width) = pad(model, tok, &rows)?;
    let batch = rows.len();
    let loss_rows: Vec<(usize, usize)> = terms.iter().map(|t| (t.row, t.position)).collect();

    // Once: the hidden state entering `layer`, the keys and the (current) output at its MLP.
    let mut fwd = Forward::new(batch, width, &dev);
    let h_in = {
        let e = model.embed(&input, &fwd)?;
        model.run_layers(e, 0..layer, &mut fwd)?
    };
    let key_site = Site::new(layer, SiteKind::MlpIn);
    let out_site = Site::new(layer, SiteKind::MlpOut);
    let mut hooks = Hooks::new()
        .read(key_site, Positions::All)
        .read(out_site, Positions::All);
    {
        let mut fwd = Forward::new(batch, width, &dev).with_hooks(&mut hooks);
        model.run_layers(h_in.clone(), layer..layer + 1, &mut fwd)?;
    }
    let keys = hooks
        .take(key_site)
        .expect("key read")
        .to_dtype(DType::F32)?;
    let out0 = hooks
        .take(out_site)
        .expect("output read")
        .to_dtype(DType::F32)?;
    let (bb, t, ff) = keys.dims3()?;
    let d = out0.dim(2)?;
    let keys2 = keys.reshape((bb * t, ff))?;

    let delta = Var::zeros((d, ff), DType::F32, &dev)?;
    let mut opt = AdamW::new(
        vec![delta.clone()],
        ParamsAdamW {
            lr: h.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut losses = Vec::with_capacity(h.steps);
    for _ in 0..h.steps {
        let added = keys2.matmul(&delta.as_tensor().t()?)?.reshape((bb, t, d))?;
        let value = (&out0 + added)?.to_dtype(model.dtype())?;
        let mut hooks = Hooks::new().replace(out_site, value);
        let mut fwd = Forward::new(batch, width, &dev)
            .with_hooks(&mut hooks)
            .differentiable();
        let top = model.run_layers(h_in.clone(), layer..n_layers, &mut fwd)?;
        let picked = crate::engine::model::gather_rows(&top, &loss_rows)?;
        let logits = model.head(&picked, true)?;
        let loss = weighted_nll(&logits, &terms)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        opt.backward_step(&loss)?;
        // The L∞ ball around the original weights (ROME's FT-L constraint).
        let c = h.norm_constraint;
        delta.set(&delta.as_tensor().clamp(-c, c)?)?;
    }
    let delta_t = delta.as_tensor().detach().to_dtype(model.dtype())?;
    let diagnostics = json!({
        "layer": layer,
        "loss": losses,
        "delta_linf": delta_t.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?,
    });
    Ok(MethodOutput {
        deltas: vec![Delta::Dense {
            weight: WeightId::mlp_down(layer),
            delta: delta_t,
        }],
        state: Vec::new(),
        diagnostics,
    })
}
