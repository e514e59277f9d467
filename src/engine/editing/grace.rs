//! GRACE (Hartvigsen et al., NeurIPS 2023): edits as entries of a codebook at one layer's MLP
//! output, the base weights untouched. The run-time side is the overlay's
//! [`crate::engine::overlay::Codebook`]; this file decides what an edit writes and trains the
//! value.
//!
//! Per request, as EasyEdit's `GRACEAdapter` does at its first iteration: the key is what
//! enters the down projection at the prompt's last token; with no entry nearer than
//! `radius + r` (the nearest entry's radius `r`) a new entry is added; a nearer entry with
//! another target is split (its radius and the new one's become half the distance); a nearer
//! entry with the same target grows its radius to cover the key and its value is trained
//! further. The value replaces the down projection's output at the key's position and is
//! trained by Adam on the target's tokens, teacher-forced after the prompt (EasyEdit's
//! `prompt + " " + target` with the prompt masked).
//!
//! Where emend differs from EasyEdit, on purpose: a label is the target's token ids (EasyEdit
//! compares the means of the label tensors, so two different targets of equal mean count as
//! the same); the cold value comes from a seeded generator, so the same edit trains the same
//! value; the codebook applies at every position (see the codebook's documentation), where
//! EasyEdit applies it at the position of the last edit's key.
use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::hparams::check_layer;
use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::primitives::{read_at, weighted_nll, TargetTerm};
use super::{EditError, EditRequest};
use crate::engine::model::score::encode_pair;
use crate::engine::model::{
    gather_rows, CausalLm, Forward, Hooks, KvCache, ModelSpec, PatchMode, Positions, Site, SiteKind,
};
use crate::engine::overlay::{Codebook, CodebookWrite, Edited};

pub struct Grace;

/// How a new entry's value starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ValueInit {
    /// Uniform in [0, 1) per element (EasyEdit's `cold`, from a seeded generator here).
    Cold,
    /// The down projection's output at the key's position (EasyEdit's `warm`).
    Warm,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GraceHparams {
    /// The layer whose MLP output the codebook replaces.
    #[schema(minimum = 0)]
    pub layer: usize,
    /// A new entry's deferral radius (EasyEdit's `eps`), in the Euclidean distance between
    /// keys entering the down projection.
    #[schema(minimum = 0.0, maximum = 1000000.0)]
    pub radius: f64,
    /// Adam steps training the value (EasyEdit's `n_iter`).
    #[schema(minimum = 1, maximum = 1000)]
    pub steps: usize,
    /// Adam learning rate (EasyEdit's `edit_lr`).
    #[schema(minimum = 0.000001, maximum = 100.0)]
    pub lr: f64,
    pub value_init: ValueInit,
    /// Seed of the cold initialisation.
    #[schema(minimum = 0)]
    pub seed: u64,
}

impl MethodHparams for GraceHparams {
    fn check(&self, spec: &ModelSpec) -> Result<(), EditError> {
        check_layer("layer", self.layer, spec)
    }
}

impl TypedMethod for Grace {
    type Hparams = GraceHparams;
    const NAME: &'static str = "grace";
    const DESCRIPTION: &'static str = "GRACE (Hartvigsen et al. 2023): a codebook of (key, value, radius) at one layer's MLP output; a position whose key falls within an entry's radius gets the entry's trained value, every other position runs the unedited model. Base weights are untouched.";
    const BATCHED: bool = false;
    const DEFAULTS: &'static str = "grace";

    fn resources(&self, _: &GraceHparams) -> Vec<Resource> {
        Vec::new()
    }

    fn compute(&self, input: &EditInput<'_>, h: &GraceHparams) -> Result<MethodOutput, EditError> {
        let [req] = input.requests else {
            return Err(EditError::invalid(
                "edits",
                "GRACE edits one request per step",
            ));
        };
        edit(input.model, input.tok, req, h)
    }
}

/// What an edit does to the codebook (EasyEdit's first-iteration branches, plus `Replace`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Decision {
    /// A new entry, its radius the default.
    Add,
    /// A new entry, and `entry`'s radius and the new one's halved to the distance between them.
    Split { entry: usize, distance: f32 },
    /// The same target near `entry`: its radius grows to `distance` if that is more, and its
    /// value is trained further.
    Extend { entry: usize, distance: f32 },
    /// Another target for exactly `entry`'s key (the same prompt edited again): the entry takes
    /// the new target and value. Splitting would leave both radii at zero and neither entry
    /// reachable, which is what EasyEdit does.
    Replace { entry: usize },
}

fn decide(
    model: &Edited<'_>,
    layer: usize,
    key: &[f32],
    label: &[u32],
    radius: f32,
) -> Result<(Decision, Option<f32>), EditError> {
    let Some(cb) = model.overlay.codebook(layer).filter(|c| !c.is_empty()) else {
        return Ok((Decision::Add, None));
    };
    let q = Tensor::from_slice(key, (1, key.len()), model.device())?;
    let (entry, _) = cb.nearest(&q)?[0];
    let e = cb.entry(entry);
    // The distance to the nearest entry exactly, so that the same key is at distance 0.
    let distance = e
        .key
        .iter()
        .zip(key)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32;
    let decision = if distance > radius + e.radius {
        Decision::Add
    } else if e.label == label {
        Decision::Extend { entry, distance }
    } else if distance == 0.0 {
        Decision::Replace { entry }
    } else {
        Decision::Split { entry, distance }
    };
    Ok((decision, Some(distance)))
}

/// Uniform [0, 1) values from a generator seeded with `seed`.
fn cold_value(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>()).collect()
}

/// The window a value is trained on: from the key's position (the prompt's last token) to the
/// last target token. The positions before it do not depend on the value, so their keys and
/// values at every layer are computed once (`prefix`), and so is the window's input to the
/// codebook's layer (`h_in`).
struct Window {
    prefix: KvCache,
    h_in: Tensor,
    width: usize,
    terms: Vec<TargetTerm>,
}

impl Window {
    fn new(
        model: &Edited<'_>,
        ctx: &[u32],
        target: &[u32],
        layer: usize,
    ) -> Result<Self, EditError> {
        let dev = model.device();
        let key_pos = ctx.len() - 1;
        let mut suffix = vec![ctx[key_pos]];
        suffix.extend_from_slice(&target[..target.len() - 1]);
        let width = suffix.len();
        let weight = 1.0 / target.len() as f64;
        let terms = target
            .iter()
            .enumerate()
            .map(|(j, &token)| TargetTerm {
                row: 0,
                position: j,
                token,
                weight,
            })
            .collect();
        let mut prefix = KvCache::new(model.spec().n_layers);
        if key_pos > 0 {
            let ids = Tensor::from_slice(&ctx[..key_pos], (1, key_pos), dev)?;
            let mut fwd = Forward::new(1, key_pos, dev).with_cache(&mut prefix);
            let e = model.embed(&ids, &fwd)?;
            model.run_layers(e, 0..model.spec().n_layers, &mut fwd)?;
        }
        let h_in = {
            let ids = Tensor::from_slice(&suffix, (1, width), dev)?;
            let mut cache = prefix.frozen_prefix(1);
            let mut fwd = Forward::new(1, width, dev).with_cache(&mut cache);
            let e = model.embed(&ids, &fwd)?;
            model.run_layers(e, 0..layer, &mut fwd)?
        };
        Ok(Self {
            prefix,
            h_in,
            width,
            terms,
        })
    }

    /// The key entering the down projection and the MLP's output there, at the key's position.
    fn key_and_output(
        &self,
        model: &Edited<'_>,
        layer: usize,
    ) -> Result<(Vec<f32>, Tensor), EditError> {
        let (key_site, out_site) = (
            Site::new(layer, SiteKind::MlpIn),
            Site::new(layer, SiteKind::MlpOut),
        );
        let mut hooks = Hooks::new()
            .read(key_site, Positions::Rows(vec![(0, 0)]))
            .read(out_site, Positions::Rows(vec![(0, 0)]));
        let mut cache = self.prefix.frozen_prefix(1);
        let mut fwd = Forward::new(1, self.width, model.device())
            .with_cache(&mut cache)
            .with_hooks(&mut hooks);
        model.run_layers(self.h_in.clone(), layer..layer + 1, &mut fwd)?;
        let key = hooks.take(key_site).expect("key read");
        let out = hooks.take(out_site).expect("output read");
        Ok((
            key.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            out.to_dtype(DType::F32)?,
        ))
    }

    /// Adam on the value replacing the MLP output at the key's position; the value and the loss
    /// per step.
    fn train(
        &self,
        model: &Edited<'_>,
        layer: usize,
        start: Vec<f32>,
        h: &GraceHparams,
    ) -> Result<(Vec<f32>, Vec<f64>), EditError> {
        let dev = model.device();
        let n = start.len();
        let value = Var::from_tensor(&Tensor::from_vec(start, (1, n), dev)?)?;
        let mut opt = AdamW::new(
            vec![value.clone()],
            ParamsAdamW {
                lr: h.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let loss_rows: Vec<(usize, usize)> =
            self.terms.iter().map(|t| (t.row, t.position)).collect();
        let mut losses = Vec::with_capacity(h.steps);
        for _ in 0..h.steps {
            let mut hooks = Hooks::new().patch(
                Site::new(layer, SiteKind::MlpOut),
                vec![(0, 0)],
                value.as_tensor().to_dtype(model.dtype())?,
                PatchMode::Set,
            );
            let mut cache = self.prefix.frozen_prefix(1);
            let mut fwd = Forward::new(1, self.width, dev)
                .with_cache(&mut cache)
                .with_hooks(&mut hooks)
                .differentiable();
            let top =
                model.run_layers(self.h_in.clone(), layer..model.spec().n_layers, &mut fwd)?;
            let logits = model.head(&gather_rows(&top, &loss_rows)?, true)?;
            let loss = weighted_nll(&logits, &self.terms)?;
            losses.push(loss.to_scalar::<f32>()? as f64);
            opt.backward_step(&loss)?;
        }
        Ok((value.as_tensor().flatten_all()?.to_vec1()?, losses))
    }
}

/// What the edit writes into the codebook (`cb`, `None` when empty) for `decision`: the
/// entry it trained last.
fn writes(decision: Decision, cb: Option<&Codebook>, new: CodebookWrite) -> Vec<CodebookWrite> {
    let old = |entry: usize| cb.expect("the decision names an entry").entry(entry);
    match decision {
        Decision::Add => vec![new],
        Decision::Split { entry, distance } => {
            let e = old(entry);
            vec![
                CodebookWrite {
                    index: entry,
                    key: e.key.to_vec(),
                    value: e.value.to_vec(),
                    radius: distance / 2.0 - 1e-5,
                    label: e.label.to_vec(),
                },
                CodebookWrite {
                    radius: distance / 2.0,
                    ..new
                },
            ]
        }
        Decision::Extend { entry, distance } => {
            let e = old(entry);
            vec![CodebookWrite {
                index: entry,
                key: e.key.to_vec(),
                radius: e.radius.max(distance),
                label: e.label.to_vec(),
                ..new
            }]
        }
        Decision::Replace { entry } => {
            let e = old(entry);
            vec![CodebookWrite {
                index: entry,
                key: e.key.to_vec(),
                radius: e.radius,
                ..new
            }]
        }
    }
}

fn edit(
    model: &Edited<'_>,
    tok: &crate::engine::model::Tok,
    req: &EditRequest,
    h: &GraceHparams,
) -> Result<MethodOutput, EditError> {
    let layer = h.layer;
    let (prompt, _) = req.filled();
    let (ctx, target) = encode_pair(tok, &prompt, &req.target_new_text())?;
    let window = Window::new(model, &ctx, &target, layer)?;
    let (key, out) = window.key_and_output(model, layer)?;
    let (decision, nearest) = decide(model, layer, &key, &target, h.radius as f32)?;
    let cb = model.overlay.codebook(layer);
    let start: Vec<f32> = match (decision, h.value_init) {
        (Decision::Extend { entry, .. }, _) => {
            cb.expect("extended entry").entry(entry).value.to_vec()
        }
        (_, ValueInit::Cold) => cold_value(out.dim(1)?, h.seed),
        (_, ValueInit::Warm) => out.flatten_all()?.to_vec1()?,
    };
    let (value, losses) = window.train(model, layer, start, h)?;
    let n = cb.map_or(0, |c| c.len());
    let key_norm = key.iter().map(|x| x * x).sum::<f32>().sqrt();
    let writes = writes(
        decision,
        cb,
        CodebookWrite {
            index: n,
            key,
            value,
            radius: h.radius as f32,
            label: target,
        },
    );
    let state = writes
        .iter()
        .map(|w| w.to_state(layer))
        .collect::<Result<Vec<_>, _>>()?;
    let scope = scope(
        model,
        tok,
        req,
        layer,
        writes.last().expect("an edit writes"),
    )?;
    let diagnostics = json!({
        "layer": layer,
        "decision": match decision {
            Decision::Add => "add",
            Decision::Split { .. } => "split",
            Decision::Extend { .. } => "extend",
            Decision::Replace { .. } => "replace",
        },
        "nearest_distance": nearest,
        "entries": n + usize::from(matches!(decision, Decision::Add | Decision::Split { .. })),
        "key_norm": key_norm,
        "scope": scope,
        "loss": losses,
    });
    Ok(MethodOutput {
        deltas: Vec::new(),
        state,
        diagnostics,
    })
}

/// Whether the request's rephrasings and locality prompts fall within this edit's entry (their
/// key at the prompt's last token against the entry's key and radius): what GRACE will do with
/// them, as a diagnostic.
fn scope(
    model: &Edited<'_>,
    tok: &crate::engine::model::Tok,
    req: &EditRequest,
    layer: usize,
    entry: &CodebookWrite,
) -> Result<serde_json::Value, EditError> {
    let mut out = serde_json::Map::new();
    for (name, prompts) in req.probe_groups() {
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| Ok(encode_pair(tok, p, &req.target_new_text())?.0))
            .collect::<Result<_, EditError>>()?;
        let at: Vec<(usize, usize)> = rows
            .iter()
            .enumerate()
            .map(|(r, x)| (r, x.len() - 1))
            .collect();
        let keys: Vec<Vec<f32>> =
            read_at(model, tok, &rows, &at, Site::new(layer, SiteKind::MlpIn))?
                .to_dtype(DType::F32)?
                .to_vec2()?;
        let probes: Vec<serde_json::Value> = keys
            .iter()
            .map(|k| {
                let d = k
                    .iter()
                    .zip(&entry.key)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                json!({"distance": d, "in_scope": d <= entry.radius as f64})
            })
            .collect();
        out.insert(name.into(), probes.into());
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_values_are_uniform_and_seeded() {
        let a = cold_value(1000, 7);
        assert_eq!(a, cold_value(1000, 7));
        assert_ne!(a, cold_value(1000, 8));
        assert!(a.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = a.iter().sum::<f32>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }
}
