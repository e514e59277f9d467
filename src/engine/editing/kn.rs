//! KN (Dai et al., ACL 2022), knowledge neurons, as EasyEdit runs it on decoder models
//! (`easyeditor/models/kn`), the implementation the study measured.
//!
//! Attribution: for each token of the true answer (teacher-forced after the prompt), the
//! integrated gradients of its probability at the prompt's last position with respect to every
//! layer's MLP pre-activation there (`mlp.pre`: llama's gate projection, gpt2's and gpt-neox's
//! up projection), the activation scaled by `k/(steps−1)`, `k = 0..steps` (EasyEdit's
//! `linspace`, so one step is the gradient at the zero baseline), summed, times the activation,
//! divided by `steps`; averaged over the answer's tokens. Neurons scoring above
//! `adaptive_threshold` of the largest score over all layers are kept; with several prompts,
//! those kept in more than `shared_prompt_fraction` of them.
//!
//! The edit: each kept neuron's value (its column of the layer's down projection) moves by the
//! new target's token embeddings minus those of what the model said before, greedily, as many
//! tokens as the target has; with a one-token target the old embedding counts twice (EasyEdit's
//! `modify_weights`). Per layer that is the rank-one delta `δ 1ᵀ_J`. Nothing bounds it: the
//! study found KN breaks the model within a few edits, and this reproduces the method, not a
//! tuned variant.
use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::{EditError, EditRequest};
use crate::engine::model::score::encode_pair;
use crate::engine::model::{
    gather_rows, CausalLm, Forward, Hooks, ModelSpec, PatchMode, Positions, Site, SiteKind, Tok,
    WeightId,
};
use crate::engine::overlay::Delta;

pub struct Kn;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KnHparams {
    /// Riemann steps of the integrated gradients (1: the gradient at the zero baseline, as
    /// EasyEdit's llama configuration runs it; the paper uses 20).
    #[schema(minimum = 1, maximum = 64)]
    pub steps: usize,
    /// A neuron is kept when its score exceeds this fraction of the prompt's largest score over
    /// all layers.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub adaptive_threshold: f64,
    /// Attribute on the request's rephrase prompts as well as the edit prompt (the paper's
    /// refinement; EasyEdit attributes on the edit prompt only).
    pub refine_with_rephrases: bool,
    /// With several prompts, a neuron is kept when found in more than this fraction of them.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub shared_prompt_fraction: f64,
}

impl MethodHparams for KnHparams {
    fn check(&self, _spec: &ModelSpec) -> Result<(), EditError> {
        Ok(())
    }
}

impl TypedMethod for Kn {
    type Hparams = KnHparams;
    const NAME: &'static str = "kn";
    const DESCRIPTION: &'static str = "Knowledge neurons (Dai et al. 2022): MLP neurons attributed to the true answer by integrated gradients; their values moved from the old answer's token embeddings to the new target's. Needs `target_true`; one edit at a time.";
    const BATCHED: bool = false;
    const DEFAULTS: &'static str = "kn";

    fn resources(&self, _: &KnHparams) -> Vec<Resource> {
        Vec::new()
    }

    fn check_requests(&self, requests: &[EditRequest]) -> Result<(), EditError> {
        match requests.iter().position(|r| r.target_true.is_none()) {
            Some(i) => Err(EditError::invalid(
                format!("edits[{i}].target_true"),
                "KN needs the true answer: it attributes the neurons that predict it",
            )),
            None => Ok(()),
        }
    }

    fn compute(&self, input: &EditInput<'_>, h: &KnHparams) -> Result<MethodOutput, EditError> {
        let [req] = input.requests else {
            return Err(EditError::invalid(
                "edits",
                "KN edits one request at a time",
            ));
        };
        let (model, tok) = (input.model, input.tok);
        let truth = req.target_true_text().ok_or_else(|| {
            EditError::invalid("edits[0].target_true", "KN needs the true answer")
        })?;
        let (prompt, _) = req.filled();
        let mut prompts = vec![prompt.clone()];
        if h.refine_with_rephrases {
            prompts.extend(req.rephrase_prompts.iter().cloned());
        }
        let mut found: BTreeMap<(usize, usize), (usize, f32)> = BTreeMap::new();
        let mut per_prompt = Vec::with_capacity(prompts.len());
        for p in &prompts {
            let scores = attribute(model, tok, p, &truth, h.steps)?;
            let (coarse, max) = coarse_neurons(&scores, h.adaptive_threshold)?;
            per_prompt.push(json!({"max_score": max, "neurons": coarse.len()}));
            for (n, s) in coarse {
                let e = found.entry(n).or_insert((0, 0.0));
                e.0 += 1;
                e.1 = e.1.max(s);
            }
        }
        let need = h.shared_prompt_fraction * prompts.len() as f64;
        let neurons: Vec<Scored> = found
            .into_iter()
            .filter(|(_, (count, _))| *count as f64 > need)
            .map(|(n, (_, s))| (n, s))
            .collect();
        let (delta, old, new) = value_shift(model, tok, &prompt, &req.target_new_text())?;
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for ((layer, j), _) in &neurons {
            by_layer.entry(*layer).or_default().push(*j);
        }
        let ff = model.spec().intermediate_size;
        let dtype = model.dtype();
        let u = delta.unsqueeze(1)?.to_dtype(dtype)?.contiguous()?; // (d, 1)
        let mut deltas = Vec::with_capacity(by_layer.len());
        for (&layer, cols) in &by_layer {
            let mut ind = vec![0f32; ff];
            for &j in cols {
                ind[j] = 1.0;
            }
            let v = Tensor::from_vec(ind, (ff, 1), model.device())?.to_dtype(dtype)?;
            deltas.push(Delta::LowRank {
                weight: WeightId::mlp_down(layer),
                u: u.clone(),
                v,
            });
        }
        let mut top = neurons.clone();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        let diagnostics = json!({
            "neurons": neurons.len(),
            "layers": by_layer.iter().map(|(l, c)| json!({"layer": l, "neurons": c.len()})).collect::<Vec<_>>(),
            "top": top.iter().take(20).map(|((l, j), s)| json!({"layer": l, "neuron": j, "score": s})).collect::<Vec<_>>(),
            "prompts": per_prompt,
            "old_tokens": old,
            "new_tokens": new,
            "delta_norm": delta.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
        });
        Ok(MethodOutput {
            deltas,
            state: Vec::new(),
            diagnostics,
        })
    }
}

/// A neuron, `(layer, index)`, with its attribution score.
type Scored = ((usize, usize), f32);

/// Rows of one differentiable forward: steps times the layers patched in it.
const ROWS_PER_FORWARD: usize = 32;

/// KN's attribution scores of `prompt` for the true `answer`: `(n_layers, ff)`.
fn attribute(
    model: &dyn CausalLm,
    tok: &Tok,
    prompt: &str,
    answer: &str,
    steps: usize,
) -> Result<Tensor, EditError> {
    let dev = model.device().clone();
    let spec = model.spec();
    let (n_layers, ff) = (spec.n_layers, spec.intermediate_size);
    let (ctx, ans) = encode_pair(tok, prompt, answer)?;
    if ctx.is_empty() || ans.is_empty() {
        return Err(EditError::invalid(
            "edits[0].target_true",
            "the prompt and its true answer must both encode to tokens",
        ));
    }
    let layers: Vec<usize> = (0..n_layers).collect();
    let mut total = Tensor::zeros((n_layers, ff), DType::F32, &dev)?;
    for i in 0..ans.len() {
        let ids: Vec<u32> = ctx.iter().chain(&ans[..i]).copied().collect();
        let acts = activations(model, &ids)?; // (n_layers, ff)
        let mut rows = Vec::with_capacity(n_layers);
        for chunk in layers.chunks((ROWS_PER_FORWARD / steps).max(1)) {
            rows.push(gradient_sums(model, &ids, ans[i], &acts, chunk, steps)?);
        }
        let grads = Tensor::cat(&rows, 0)?; // (n_layers, ff)
        total = (total + (grads * &acts)? / steps as f64)?;
    }
    Ok((total / ans.len() as f64)?)
}

/// Every layer's `mlp.pre` value at the last position of `ids`: `(n_layers, ff)`.
fn activations(model: &dyn CausalLm, ids: &[u32]) -> Result<Tensor, EditError> {
    let dev = model.device();
    let n_layers = model.spec().n_layers;
    let last = ids.len() - 1;
    let mut hooks = Hooks::new();
    for l in 0..n_layers {
        hooks = hooks.read(
            Site::new(l, SiteKind::MlpPre),
            Positions::Rows(vec![(0, last)]),
        );
    }
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), dev)?;
    let mut fwd = Forward::new(1, ids.len(), dev).with_hooks(&mut hooks);
    let e = model.embed(&input, &fwd)?;
    model.run_layers(e, 0..n_layers, &mut fwd)?;
    let rows: Vec<Tensor> = (0..n_layers)
        .map(|l| {
            hooks
                .take(Site::new(l, SiteKind::MlpPre))
                .expect("site read")
                .to_dtype(DType::F32)
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// For each of `layers`, `Σₖ ∂P(target)/∂a'` over the scaled activations `a' = αₖ a` set at
/// the last position of `ids` (one row per layer and step, all in one forward): `(layers, ff)`.
fn gradient_sums(
    model: &dyn CausalLm,
    ids: &[u32],
    target: u32,
    acts: &Tensor,
    layers: &[usize],
    steps: usize,
) -> Result<Tensor, EditError> {
    let dev = model.device();
    let (t, last) = (ids.len(), ids.len() - 1);
    let rows = layers.len() * steps;
    let alphas: Vec<f32> = (0..steps)
        .map(|k| match steps {
            1 => 0.0,
            _ => k as f32 / (steps - 1) as f32,
        })
        .collect();
    let alphas = Tensor::from_vec(alphas, (steps, 1), dev)?;
    let mut vars = Vec::with_capacity(layers.len());
    let mut hooks = Hooks::new();
    for (c, &l) in layers.iter().enumerate() {
        let scaled = alphas.broadcast_mul(&acts.narrow(0, l, 1)?)?; // (steps, ff)
        let var = Var::from_tensor(&scaled)?;
        let at = (0..steps).map(|k| (c * steps + k, last)).collect();
        hooks = hooks.patch(
            Site::new(l, SiteKind::MlpPre),
            at,
            var.as_tensor().to_dtype(model.dtype())?,
            PatchMode::Set,
        );
        vars.push(var);
    }
    let input = Tensor::from_vec(ids.repeat(rows), (rows, t), dev)?;
    let mut fwd = Forward::new(rows, t, dev)
        .with_hooks(&mut hooks)
        .differentiable();
    let e = model.embed(&input, &fwd)?;
    let n_layers = model.spec().n_layers;
    let top = model.run_layers(e, 0..n_layers, &mut fwd)?;
    let at_last: Vec<(usize, usize)> = (0..rows).map(|r| (r, last)).collect();
    let logits = model
        .head(&gather_rows(&top, &at_last)?, true)?
        .to_dtype(DType::F32)?;
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
    let p = probs.narrow(1, target as usize, 1)?.sum_all()?;
    let grads = p.backward()?;
    let sums: Vec<Tensor> = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .map(|g| g.sum_keepdim(0))
                .unwrap_or_else(|| v.as_tensor().zeros_like().and_then(|z| z.sum_keepdim(0)))
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&sums, 0)?)
}

/// Neurons whose score exceeds `fraction` of the largest (none when the largest is not
/// positive), with their scores, and the largest score.
fn coarse_neurons(scores: &Tensor, fraction: f64) -> Result<(Vec<Scored>, f32), EditError> {
    let rows: Vec<Vec<f32>> = scores.to_vec2()?;
    let max = rows
        .iter()
        .flatten()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    if max <= 0.0 {
        return Ok((Vec::new(), max));
    }
    let threshold = max * fraction as f32;
    let mut out = Vec::new();
    for (l, row) in rows.iter().enumerate() {
        for (j, &s) in row.iter().enumerate() {
            if s > threshold {
                out.push(((l, j), s));
            }
        }
    }
    Ok((out, max))
}

/// The shift every kept neuron's value takes: the new target's token embeddings minus those of
/// the model's greedy continuation of `prompt` (as many tokens as the target; with one token
/// the old embedding counts twice, as in EasyEdit), `(d,)`, and both token lists.
fn value_shift(
    model: &dyn CausalLm,
    tok: &Tok,
    prompt: &str,
    target: &str,
) -> Result<(Tensor, Value, Value), EditError> {
    let dev = model.device();
    let (mut ids, new) = encode_pair(tok, prompt, target)?;
    let mut old = Vec::with_capacity(new.len());
    for _ in 0..new.len() {
        let input = Tensor::from_vec(ids.clone(), (1, ids.len()), dev)?;
        let mut fwd = Forward::new(1, ids.len(), dev);
        let h = model.hidden(&input, &mut fwd)?;
        let last = h.narrow(1, ids.len() - 1, 1)?;
        let next = model
            .head(&last, false)?
            .flatten_all()?
            .argmax(0)?
            .to_scalar::<u32>()?;
        old.push(next);
        ids.push(next);
    }
    let emb = |t: &[u32]| -> Result<Tensor, EditError> {
        let ids = Tensor::from_vec(t.to_vec(), t.len(), dev)?;
        Ok(model.token_embeddings(&ids)?.to_dtype(DType::F32)?.sum(0)?)
    };
    let old_weight = if new.len() == 1 { 2.0 } else { 1.0 };
    let delta = (emb(&new)? - (emb(&old)? * old_weight)?)?;
    let names = |t: &[u32]| -> Value {
        json!(t
            .iter()
            .map(|&i| tok.decode(&[i], false).unwrap_or_default())
            .collect::<Vec<_>>())
    };
    Ok((delta, names(&old), names(&new)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn neurons_strictly_above_the_fraction_of_the_largest_score_are_kept() {
        let s = Tensor::new(&[[1.0f32, 0.2, -3.0], [0.21, 0.0, 0.5]], &Device::Cpu).unwrap();
        let (kept, max) = coarse_neurons(&s, 0.2).unwrap();
        assert_eq!(max, 1.0);
        let at: Vec<(usize, usize)> = kept.iter().map(|k| k.0).collect();
        assert_eq!(
            at,
            [(0, 0), (1, 0), (1, 2)],
            "0.2 itself is not above 0.2 · 1.0"
        );
        // No positive score: nothing is attributed, and the edit changes nothing.
        let s = Tensor::new(&[[-1.0f32, 0.0]], &Device::Cpu).unwrap();
        assert!(coarse_neurons(&s, 0.2).unwrap().0.is_empty());
    }
}
