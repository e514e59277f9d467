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
use serde_json::{json, Value};

use super::rome::{compute_v, locate, mean_key, read_at, VParams};
use super::stats::LayerStats;
use super::{EditError, EditRequest, MemitHparams};
use crate::engine::model::{Site, SiteKind, Tok};
use crate::engine::overlay::{Delta, Edited, Overlay};

/// MEMIT on `model`, the session's current model: the base with `current`'s prepared overlay
/// (each layer step prepares its lower-layer updates on top of that overlay).
pub(super) fn edit(
    model: &Edited<'_>,
    current: &Arc<Overlay>,
    tok: &Tok,
    reqs: &[&EditRequest],
    h: &MemitHparams,
    templates: &[String],
    stats: &[Arc<LayerStats>],
) -> Result<(Vec<Delta>, Value), EditError> {
    let z_layer = *h.layers.last().expect("layers checked non-empty");
    let z_site = Site::new(z_layer, SiteKind::Residual);
    let base = model.base;
    let dev = base.device().clone();
    let vp = VParams {
        lr: h.v_lr,
        steps: h.v_steps,
        weight_decay: h.v_weight_decay,
        clamp_norm_factor: h.clamp_norm_factor,
        kl_factor: h.kl_factor,
    };
    let mut zs = Vec::with_capacity(reqs.len());
    let mut v_diag = Vec::with_capacity(reqs.len());
    for r in reqs {
        let (z, _, d) = compute_v(model, tok, r, templates, z_site, &vp)?;
        zs.push(z);
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
    for (i, (&layer, st)) in h.layers.iter().zip(stats).enumerate() {
        // The model with this step's lower-layer updates applied.
        let step = Overlay::push(current, deltas.clone());
        let view = Edited::new(base, Arc::new(step.prepare_on(base, &model.overlay)?));
        let keys: Vec<Tensor> = reqs
            .iter()
            .map(|r| mean_key(&view, tok, r, templates, layer))
            .collect::<Result<_, _>>()?;
        let k = Tensor::stack(&keys, 1)?; // (ff, B)
        let cur_z = read_at(&view, tok, &plain_rows, &plain_at, z_site)?.t()?; // (d, B)
        let resid = ((&zs - &cur_z)? / (n - i) as f64)?;
        let inv = st.inverse_tensor(&dev)?;
        let p = inv.matmul(&k)?; // C⁻¹K (ff, B)
        let g = k.t()?.matmul(&p)?; // KᵀC⁻¹K (B, B)
        let b = g.dim(0)?;
        let lam = h.mom2_update_weight;
        let small = (g.to_dtype(DType::F64)? + (Tensor::eye(b, DType::F64, &dev)? * lam)?)?;
        let small_inv = invert_small(&small)?;
        let adj = p.matmul(&small_inv.to_dtype(DType::F32)?)?; // (ff, B)
        layer_diag.push(json!({
            "layer": layer,
            "residual_norm": resid.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
        }));
        let dtype = base.dtype();
        deltas.push(Delta::LowRank {
            layer,
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
    Ok((deltas, diagnostics))
}

/// Inverse of a small symmetric positive-definite `(b, b)` matrix (f64, Cholesky).
fn invert_small(m: &Tensor) -> Result<Tensor, EditError> {
    let b = m.dim(0)?;
    let v: Vec<f64> = m.flatten_all()?.to_vec1()?;
    let mat = nalgebra::DMatrix::<f64>::from_row_slice(b, b, &v);
    let inv = nalgebra::Cholesky::new(mat)
        .ok_or_else(|| EditError::Stats("MEMIT's batch system is not positive definite".into()))?
        .inverse();
    let rows: Vec<f64> = (0..b)
        .flat_map(|i| (0..b).map(move |j| (i, j)))
        .map(|(i, j)| inv[(i, j)])
        .collect();
    Ok(Tensor::from_vec(rows, (b, b), m.device())?)
}
