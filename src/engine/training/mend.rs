//! MEND's passes over the model, shared by training and editing: the gradient factors of one
//! edit at the edited layers, the low-rank updates the network makes of them, and the
//! post-edit losses training minimises.
use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::mend_net::{kl_rows, MendNet};
use super::TrainingError;
use crate::engine::editing::primitives::{weighted_nll, TargetTerm};
use crate::engine::model::score::encode_pair;
use crate::engine::model::{
    gather_rows, CausalLm, Forward, Hooks, PatchMode, Positions, Site, SiteKind, Tok, WeightId,
};
use crate::engine::overlay::{LayerPatch, PreparedOverlay};

/// One sequence fed to the model: its tokens and the NLL terms of the target's tokens
/// (teacher-forced, averaged: EasyEdit's `edit_loss_fn`).
pub struct TargetRow {
    pub ids: Vec<u32>,
    pub(crate) terms: Vec<TargetTerm>,
}

impl TargetRow {
    /// `prompt + target[..-1]`, the loss on every target token.
    pub fn new(tok: &Tok, prompt: &str, target: &str) -> Result<Self, TrainingError> {
        let target = if target.starts_with(' ') {
            target.to_string()
        } else {
            format!(" {target}")
        };
        let (ctx, tgt) = encode_pair(tok, prompt, &target)?;
        if tgt.is_empty() {
            return Err(TrainingError::Invalid(format!(
                "target `{target}` has no tokens"
            )));
        }
        let weight = 1.0 / tgt.len() as f64;
        let terms = tgt
            .iter()
            .enumerate()
            .map(|(j, &token)| TargetTerm {
                row: 0,
                position: ctx.len() - 1 + j,
                token,
                weight,
            })
            .collect();
        let mut ids = ctx;
        ids.extend_from_slice(&tgt[..tgt.len() - 1]);
        Ok(Self { ids, terms })
    }

    /// `prompt + answer`, every token (the locality loss's sequence).
    pub fn whole(tok: &Tok, prompt: &str, answer: &str) -> Result<Vec<u32>, TrainingError> {
        let (mut ids, ans) = encode_pair(tok, prompt, &format!(" {}", answer.trim_start()))?;
        ids.extend(ans);
        Ok(ids)
    }

    fn positions(&self) -> Vec<(usize, usize)> {
        self.terms.iter().map(|t| (0, t.position)).collect()
    }
}

/// The hidden state entering layer `from` for one row, with no gradient.
pub fn hidden_at(model: &dyn CausalLm, ids: &[u32], from: usize) -> Result<Tensor, TrainingError> {
    let input = Tensor::from_slice(ids, (1, ids.len()), model.device())?;
    let mut fwd = Forward::new(1, ids.len(), model.device());
    let e = model.embed(&input, &fwd)?;
    Ok(model.run_layers(e, 0..from, &mut fwd)?.detach())
}

/// The factors of the edit loss's gradient at each layer's MLP down projection: what entered
/// it (`u`, `(t, x_dim)`) and the loss's gradient at its output (`δ`, `(t, delta_dim)`).
/// `h` is the hidden state entering `layers[0]` (see [`hidden_at`]).
pub fn factors(
    model: &dyn CausalLm,
    h: &Tensor,
    row: &TargetRow,
    layers: &[usize],
) -> Result<Vec<(Tensor, Tensor)>, TrainingError> {
    let dev = model.device();
    let t = row.ids.len();
    let d = model.spec().hidden_size;
    let all: Vec<(usize, usize)> = (0..t).map(|p| (0, p)).collect();
    let mut probes = Vec::with_capacity(layers.len());
    let mut hooks = Hooks::new();
    for &l in layers {
        let z = Var::zeros((t, d), model.dtype(), dev)?;
        hooks = hooks
            .read(Site::new(l, SiteKind::MlpIn), Positions::All)
            .patch(
                Site::new(l, SiteKind::MlpOut),
                all.clone(),
                z.as_tensor().clone(),
                PatchMode::Add,
            );
        probes.push(z);
    }
    let n = model.spec().n_layers;
    let top = {
        let mut fwd = Forward::new(1, t, dev)
            .with_hooks(&mut hooks)
            .differentiable();
        model.run_layers(h.clone(), layers[0]..n, &mut fwd)?
    };
    let logits = model.head(&gather_rows(&top, &row.positions())?, true)?;
    let grads = weighted_nll(&logits, &row.terms)?.backward()?;
    layers
        .iter()
        .zip(probes)
        .map(|(&l, z)| {
            let u = hooks
                .take(Site::new(l, SiteKind::MlpIn))
                .ok_or_else(|| TrainingError::Invalid(format!("layer {l} was not reached")))?
                .squeeze(0)?
                .detach()
                .to_dtype(DType::F32)?;
            let delta = match grads.get(z.as_tensor()) {
                Some(g) => g.to_dtype(DType::F32)?,
                None => Tensor::zeros((t, d), DType::F32, dev)?,
            };
            Ok((u, delta))
        })
        .collect()
}

/// The network's update of each edited layer: `(layer, up (d, n), down_t (n, x_dim))`.
pub fn updates(
    net: &MendNet,
    factors: &[(Tensor, Tensor)],
) -> Result<Vec<(usize, Tensor, Tensor)>, TrainingError> {
    net.shape
        .layers
        .iter()
        .zip(factors)
        .enumerate()
        .map(|(mode, (&l, (u, d)))| {
            let (up, down_t) = net.update(mode, u, d)?;
            Ok((l, up, down_t))
        })
        .collect()
}

/// The updates as a prepared overlay (its tensors may carry gradients).
pub fn overlay_of(
    model: &dyn CausalLm,
    ups: &[(usize, Tensor, Tensor)],
) -> Result<Arc<PreparedOverlay>, TrainingError> {
    let dtype = model.dtype();
    let mut weights = BTreeMap::new();
    for (l, up, down_t) in ups {
        weights.insert(
            WeightId::mlp_down(*l),
            LayerPatch::LowRank {
                v_t: down_t.to_dtype(dtype)?,
                u: up.to_dtype(dtype)?,
            },
        );
    }
    Ok(Arc::new(PreparedOverlay::from_patches(weights)))
}

/// Logits at `positions` of one row run from `h` (entering layer `from`) through the top of
/// the model with `overlay`.
pub fn logits_from(
    model: &dyn CausalLm,
    h: &Tensor,
    from: usize,
    overlay: Option<Arc<PreparedOverlay>>,
    positions: &[(usize, usize)],
    differentiable: bool,
) -> Result<Tensor, TrainingError> {
    let t = h.dim(1)?;
    let mut fwd = Forward::new(1, t, model.device());
    if let Some(o) = overlay {
        fwd = fwd.with_overlay(o);
    }
    if differentiable {
        fwd = fwd.differentiable();
    }
    let top = model.run_layers(h.clone(), from..model.spec().n_layers, &mut fwd)?;
    Ok(model.head(&gather_rows(&top, positions)?, differentiable)?)
}

/// The post-edit losses of one training record: the edit's NLL under the edited model and
/// the KL of the locality row's predictions from the base model's.
pub fn post_losses(
    model: &dyn CausalLm,
    overlay: Arc<PreparedOverlay>,
    from: usize,
    edit: (&Tensor, &TargetRow),
    loc: (&Tensor, &Tensor),
) -> Result<(Tensor, Tensor), TrainingError> {
    let (h_edit, row) = edit;
    let logits = logits_from(
        model,
        h_edit,
        from,
        Some(overlay.clone()),
        &row.positions(),
        true,
    )?;
    let l_edit = weighted_nll(&logits, &row.terms)?;
    let (h_loc, base_logits) = loc;
    let all: Vec<(usize, usize)> = (0..h_loc.dim(1)?).map(|p| (0, p)).collect();
    let post = logits_from(model, h_loc, from, Some(overlay), &all, true)?;
    Ok((l_edit, kl_rows(base_logits, &post)?))
}

/// Share of `row`'s target tokens that are the greedy prediction (EasyEdit's token accuracy).
pub fn token_accuracy(logits: &Tensor, row: &TargetRow) -> Result<f64, TrainingError> {
    let argmax = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    let hits = argmax
        .iter()
        .zip(&row.terms)
        .filter(|(a, t)| **a == t.token)
        .count();
    Ok(hits as f64 / row.terms.len() as f64)
}
