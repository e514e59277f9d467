//! FT-L and FT-M: norm-bounded fine-tuning of one layer's MLP down projection, stored as a
//! dense delta. The key entering the layer does not depend on the update, so the layers below
//! and the keys are computed once; each Adam step runs only the layers from the edited one up.
use candle_core::{DType, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde_json::{json, Value};

use super::{EditError, EditRequest, FtHparams};
use crate::engine::model::score::encode_pair;
use crate::engine::model::{CausalLm, Forward, Hooks, Positions, Site, SiteKind, Tok};
use crate::engine::overlay::Delta;

/// A right-padded batch of `prompt + target[..]` rows and the positions the loss reads.
pub(super) struct TargetBatch {
    pub input: Tensor,
    pub batch: usize,
    pub width: usize,
    /// `(row, position, target id, weight)`: the loss is `Σ weight · −log P(target)`.
    pub terms: Vec<(usize, usize, u32, f64)>,
}

/// FT-M rows: `prompt + target[..-1]`, the loss on every target token (teacher forcing).
/// FT-L rows: the prompt only, the loss on every target token at the prompt's last position
/// (EasyEdit's `prompt_last`).
fn batch(
    model: &dyn CausalLm,
    tok: &Tok,
    reqs: &[&EditRequest],
    masked: bool,
) -> Result<TargetBatch, EditError> {
    let mut rows: Vec<Vec<u32>> = Vec::new();
    let mut terms = Vec::new();
    for (r, req) in reqs.iter().enumerate() {
        let (prompt, _) = req.filled();
        let (ctx, target) = encode_pair(tok, &prompt, &req.target_new_text())?;
        let w = 1.0 / (reqs.len() * target.len()) as f64;
        if masked {
            let mut row = ctx.clone();
            row.extend_from_slice(&target[..target.len() - 1]);
            for (j, &t) in target.iter().enumerate() {
                terms.push((r, ctx.len() - 1 + j, t, w));
            }
            rows.push(row);
        } else {
            for &t in &target {
                terms.push((r, ctx.len() - 1, t, w));
            }
            rows.push(ctx);
        }
    }
    let width = rows.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = vec![tok.eos_id; rows.len() * width];
    for (r, row) in rows.iter().enumerate() {
        ids[r * width..r * width + row.len()].copy_from_slice(row);
    }
    Ok(TargetBatch {
        input: Tensor::from_vec(ids, (rows.len(), width), model.device())?,
        batch: rows.len(),
        width,
        terms,
    })
}

/// `Σ weight · −log P(target)` from logits at the loss rows (`(n, vocab)`, one per term).
pub(super) fn weighted_nll(
    logits: &Tensor,
    terms: &[(usize, usize, u32, f64)],
) -> Result<Tensor, EditError> {
    let dev = logits.device();
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let ids = Tensor::from_vec(
        terms.iter().map(|t| t.2).collect::<Vec<u32>>(),
        (terms.len(), 1),
        dev,
    )?;
    let w = Tensor::from_vec(
        terms.iter().map(|t| t.3 as f32).collect::<Vec<f32>>(),
        (terms.len(), 1),
        dev,
    )?;
    Ok(lp.gather(&ids, D::Minus1)?.mul(&w)?.sum_all()?.neg()?)
}

pub(super) fn edit(
    model: &dyn CausalLm,
    tok: &Tok,
    reqs: &[&EditRequest],
    h: &FtHparams,
    masked: bool,
) -> Result<(Vec<Delta>, Value), EditError> {
    let dev = model.device().clone();
    let layer = h.layer;
    let n_layers = model.spec().n_layers;
    let b = batch(model, tok, reqs, masked)?;
    let rows: Vec<(usize, usize)> = b.terms.iter().map(|t| (t.0, t.1)).collect();

    // Once: the hidden state entering `layer`, the keys and the (current) output at its MLP.
    let mut fwd = Forward::new(b.batch, b.width, &dev);
    let h_in = {
        let e = model.embed(&b.input, &fwd)?;
        model.run_layers(e, 0..layer, &mut fwd)?
    };
    let key_site = Site::new(layer, SiteKind::MlpIn);
    let out_site = Site::new(layer, SiteKind::MlpOut);
    let mut hooks = Hooks::new()
        .read(key_site, Positions::All)
        .read(out_site, Positions::All);
    {
        let mut fwd = Forward::new(b.batch, b.width, &dev).with_hooks(&mut hooks);
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
        let mut fwd = Forward::new(b.batch, b.width, &dev)
            .with_hooks(&mut hooks)
            .differentiable();
        let top = model.run_layers(h_in.clone(), layer..n_layers, &mut fwd)?;
        let picked = crate::engine::model::gather_rows(&top, &rows)?;
        let logits = model.head(&picked, true)?;
        let loss = weighted_nll(&logits, &b.terms)?;
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
    Ok((
        vec![Delta::Dense {
            layer,
            delta: delta_t,
        }],
        diagnostics,
    ))
}
