//! WISE (Wang et al., NeurIPS 2024): edits written into a side memory of one layer's down
//! projection, through a random-mask shard of its entries, with a router that sends a sequence
//! to the memory only when its activation there clears the margins the edit was trained for.
//! The run-time side is the overlay's [`crate::engine::overlay::WiseMemory`]; this file trains
//! an edit's shard values.
//!
//! Per request, as EasyEdit's `WISE.edit` does for a factual edit: the rows are the edit
//! prompt in each context template followed by the target, plus one out-of-scope row; the open
//! memory's `ΔW` (masked to the shard) is trained by SGD on the target's cross-entropy plus the
//! activation margins, each entry clamped to `±norm_constraint`. In scope are the subject's
//! tokens, out of scope the rows' other tokens (EasyEdit's act and deact masks) and the
//! out-of-scope row: their scores are pushed below `act_margin_out`, the subject's above
//! `act_margin_in`, and every pair apart by `act_margin_gap`. A prompt that shares the edit's
//! template but not its subject ("The Louvre is located in the city of") thus stays with the
//! unedited layer. Every `save_freq` edits the
//! memory closes and a new shard opens; every `merge_freq` edits the last closed memories merge
//! by TIES; routing retrieves among all memories (EasyEdit's `retrieve: true`).
//!
//! Where emend differs from EasyEdit, on purpose: the out-of-scope row is a corpus sentence
//! picked by the edit's number (EasyEdit takes `loc_prompts` from the caller, which CounterFact
//! runs fill with the very neighbourhood prompts locality is measured on); scores average over
//! a row's real tokens, not its padding; SGD's weight decay is left out (it would move every
//! entry of the weight, not only the shard's, by about 7·10⁻⁴ of its value over 70 steps);
//! the shard masks come from a fixed hash of (seed, shard), so the log replays them exactly;
//! an edit's in-scope score, which thresholds are made from, is the smallest of its rows'
//! (EasyEdit averages them: on the first 8 CounterFact records that left 3 edit prompts just under
//! their own threshold, 52.3 against 53.6, 75.3 against 75.3 and 120.2 against 129.6);
//! the router decides per sequence (EasyEdit averages the score over the batch) and holds its
//! decision over a generation (EasyEdit routes each decode step's single token afresh); the
//! default score of a sequence is its largest token distance (`router_score`; EasyEdit's mean
//! is the other choice, see the defaults for what it did on SmolLM2).
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::hparams::check_layer;
use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::primitives::{pad, weighted_nll, TargetTerm};
use super::{EditError, EditRequest};
use crate::engine::model::score::encode_pair;
use crate::engine::model::{
    gather_rows, CausalLm, Forward, Hooks, ModelSpec, Positions, Site, SiteKind, Tok,
};
use crate::engine::overlay::{activation_distance, Activation, Edited, Scoring, WiseWrite};

pub struct Wise;

/// How the router scores a sequence from its tokens' activation distances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouterScore {
    /// The mean over its tokens, the largest token's beyond 100 (EasyEdit's rule).
    Mean,
    /// The largest token's.
    Max,
}

impl RouterScore {
    fn scoring(self) -> Scoring {
        match self {
            Self::Mean => Scoring::Mean,
            Self::Max => Scoring::Max,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WiseHparams {
    /// The layer whose down projection the side memories copy.
    #[schema(minimum = 0)]
    pub layer: usize,
    /// Share of the weight's entries a shard may change (EasyEdit's `mask_ratio`).
    #[schema(minimum = 0.001, maximum = 1.0)]
    pub mask_ratio: f64,
    /// SGD steps per edit (EasyEdit's `n_iter`).
    #[schema(minimum = 1, maximum = 1000)]
    pub steps: usize,
    /// SGD learning rate (EasyEdit's `edit_lr`).
    #[schema(minimum = 0.000001, maximum = 100.0)]
    pub lr: f64,
    /// Each entry of `ΔW` stays within `±norm_constraint` (EasyEdit's `norm_constraint`).
    #[schema(minimum = 0.0001, maximum = 100.0)]
    pub norm_constraint: f64,
    /// The out-of-scope score is pushed below this (EasyEdit's `act_margin[0]`, α).
    #[schema(minimum = 0.0, maximum = 1000.0)]
    pub act_margin_out: f64,
    /// The in-scope score is pushed above this (EasyEdit's `act_margin[1]`, β).
    #[schema(minimum = 0.0, maximum = 1000.0)]
    pub act_margin_in: f64,
    /// In-scope scores are pushed this far above the out-of-scope one (`act_margin[2]`, γ).
    #[schema(minimum = 0.0, maximum = 1000.0)]
    pub act_margin_gap: f64,
    /// A memory answers a sequence whose score reaches this share of the smallest in-scope
    /// score of its edits (EasyEdit's `act_ratio`).
    #[schema(minimum = 0.0, maximum = 10.0)]
    pub act_ratio: f64,
    /// Edits per shard: after this many the memory closes (EasyEdit's `save_freq`).
    #[schema(minimum = 1, maximum = 1000000)]
    pub save_freq: usize,
    /// Every this many edits the memories closed since the last merge are merged by TIES
    /// (EasyEdit's `merge_freq`; a multiple of `save_freq`).
    #[schema(minimum = 1, maximum = 1000000)]
    pub merge_freq: usize,
    /// Share of each memory's largest entries a TIES merge keeps (EasyEdit's `densities`).
    #[schema(minimum = 0.01, maximum = 1.0)]
    pub density: f64,
    /// Seed of the shard masks (and `mask_ratio`: both take effect when a shard opens).
    #[schema(minimum = 0, maximum = 16777215)]
    pub seed: u32,
    /// Context templates the edit prompt is trained in (besides the bare prompt).
    #[schema(minimum = 0, maximum = 50)]
    pub context_templates: usize,
    /// Tokens of the longer templates (half are half as long).
    #[schema(minimum = 2, maximum = 64)]
    pub context_template_tokens: usize,
    /// How a sequence's score is made from its tokens' distances.
    pub router_score: RouterScore,
    /// Corpus sentences the out-of-scope row is drawn from (edit `n` takes sentence
    /// `n mod count`).
    #[schema(minimum = 1, maximum = 10000)]
    pub locality_sentences: usize,
}

impl MethodHparams for WiseHparams {
    fn check(&self, spec: &ModelSpec) -> Result<(), EditError> {
        check_layer("layer", self.layer, spec)?;
        if !self.merge_freq.is_multiple_of(self.save_freq) {
            return Err(EditError::invalid(
                "hparams.merge_freq",
                format!(
                    "merge_freq ({}) must be a multiple of save_freq ({})",
                    self.merge_freq, self.save_freq
                ),
            ));
        }
        Ok(())
    }
}

impl TypedMethod for Wise {
    type Hparams = WiseHparams;
    const NAME: &'static str = "wise";
    const DESCRIPTION: &'static str = "WISE (Wang et al. 2024): edits written into side memories of one layer's down projection through random-mask shards; a router sends a sequence to the memory whose activation it clears, else it runs the unedited layer. Memories merge by TIES. Base weights are untouched.";
    const BATCHED: bool = false;
    const DEFAULTS: &'static str = "wise";

    fn resources(&self, h: &WiseHparams) -> Vec<Resource> {
        vec![
            Resource::ContextTemplates {
                count: h.context_templates,
                tokens: h.context_template_tokens,
            },
            Resource::CorpusSnippets {
                count: h.locality_sentences,
            },
        ]
    }

    fn compute(&self, input: &EditInput<'_>, h: &WiseHparams) -> Result<MethodOutput, EditError> {
        let [req] = input.requests else {
            return Err(EditError::invalid(
                "edits",
                "WISE edits one request per step",
            ));
        };
        edit(input, req, h)
    }
}

/// The training rows: the prompt in each template followed by the target, then the
/// out-of-scope sentence; the target's loss terms; each row's real length and where its
/// subject is.
struct Rows {
    ids: Tensor,
    width: usize,
    lengths: Vec<usize>,
    subjects: Vec<std::ops::Range<usize>>,
    terms: Vec<TargetTerm>,
}

impl Rows {
    fn new(
        model: &dyn CausalLm,
        tok: &Tok,
        req: &EditRequest,
        templates: &[String],
        outside: &str,
    ) -> Result<Self, EditError> {
        let (prompt, subject) = req.filled();
        let target_text = req.target_new_text();
        let mut rows = Vec::with_capacity(templates.len() + 1);
        let mut subjects = Vec::with_capacity(templates.len());
        let mut terms = Vec::new();
        for (r, t) in templates.iter().enumerate() {
            let text = t.replacen("{}", &prompt, 1);
            let at = t.find("{}").unwrap_or(0);
            let count = |end: usize| -> Result<usize, EditError> {
                Ok(tok.encode(text[..end].trim_end())?.len())
            };
            let (first, last) = (count(at + subject.start)?, count(at + subject.end)?);
            subjects.push(first.min(last.saturating_sub(1))..last);
            let (ctx, target) = encode_pair(tok, &text, &target_text)?;
            let weight = 1.0 / (target.len() * templates.len()) as f64;
            terms.extend(target.iter().enumerate().map(|(j, &token)| TargetTerm {
                row: r,
                position: ctx.len() - 1 + j,
                token,
                weight,
            }));
            rows.push([ctx, target].concat());
        }
        rows.push(tok.encode(outside)?);
        let lengths = rows.iter().map(Vec::len).collect();
        let (ids, width) = pad(model, tok, &rows)?;
        Ok(Self {
            ids,
            width,
            lengths,
            subjects,
            terms,
        })
    }

    fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// `(b, width)` weights that average a per-token quantity over the positions of each row
    /// that `pick(row, position)` selects among its real tokens.
    fn means(
        &self,
        dev: &candle_core::Device,
        pick: impl Fn(usize, usize) -> bool,
    ) -> Result<Tensor, EditError> {
        let mut w = vec![0f32; self.batch() * self.width];
        for (r, &len) in self.lengths.iter().enumerate() {
            let picked: Vec<usize> = (0..len).filter(|&p| pick(r, p)).collect();
            for &p in &picked {
                w[r * self.width + p] = 1.0 / picked.len() as f32;
            }
        }
        Ok(Tensor::from_vec(w, (self.batch(), self.width), dev)?)
    }

    fn in_subject(&self, row: usize, p: usize) -> bool {
        self.subjects.get(row).is_some_and(|s| s.contains(&p))
    }
}

/// What the layer computes on the rows without any side memory: the residual leaving it, the
/// keys entering its down projection and the projection's output.
struct Below {
    residual: Tensor,
    keys: Tensor,
    out: Tensor,
}

fn below(model: &Edited<'_>, rows: &Rows, layer: usize) -> Result<Below, EditError> {
    let (b, w) = (rows.batch(), rows.width);
    let (key_site, out_site) = (
        Site::new(layer, SiteKind::MlpIn),
        Site::new(layer, SiteKind::MlpOut),
    );
    let mut hooks = Hooks::new()
        .read(key_site, Positions::All)
        .read(out_site, Positions::All);
    let mut fwd = Forward::new(b, w, model.device())
        .with_lengths(rows.lengths.clone())
        .with_hooks(&mut hooks);
    let e = model.embed(&rows.ids, &fwd)?;
    let residual = model.run_layers(e, 0..layer + 1, &mut fwd)?;
    let keys = hooks.take(key_site).expect("keys read");
    let out = hooks.take(out_site).expect("output read");
    Ok(Below {
        residual,
        keys: keys.reshape((b * w, ()))?.to_dtype(DType::F32)?,
        out: out.reshape((b * w, ()))?.to_dtype(DType::F32)?,
    })
}

/// Each row's score from its real tokens' distances (`d`: `(b·w,)`).
fn row_scores(
    d: &Tensor,
    width: usize,
    lengths: &[usize],
    scoring: Scoring,
) -> Result<Vec<f32>, EditError> {
    let d: Vec<f32> = d.flatten_all()?.to_vec1()?;
    Ok(lengths
        .iter()
        .enumerate()
        .map(|(r, &len)| scoring.score(&d[r * width..r * width + len]))
        .collect())
}

/// The scores of the request's prompt, rephrasings and locality prompts under the trained
/// memory `delta`, and whether each clears `threshold`: what the router will do with them, as
/// a diagnostic.
fn scope(
    model: &Edited<'_>,
    tok: &Tok,
    req: &EditRequest,
    delta: &Tensor,
    threshold: f32,
    h: &WiseHparams,
) -> Result<serde_json::Value, EditError> {
    let mut groups = vec![("prompt", vec![req.filled().0])];
    groups.extend(req.probe_groups());
    let mut out = serde_json::Map::new();
    out.insert("threshold".into(), json!(threshold));
    for (name, prompts) in groups {
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| tok.encode(p))
            .collect::<Result<_, _>>()?;
        let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
        let (batch, width) = pad(model, tok, &ids)?;
        let rows = Rows {
            ids: batch,
            width,
            lengths,
            subjects: Vec::new(),
            terms: Vec::new(),
        };
        let base = below(model, &rows, h.layer)?;
        let act = Activation::of(model.spec().architecture);
        let d = activation_distance(act, &base.out, &base.keys.matmul(&delta.t()?)?, 0.0)?;
        let scores = row_scores(&d, width, &rows.lengths, h.router_score.scoring())?;
        let probes: Vec<serde_json::Value> = scores
            .iter()
            .map(|&s| json!({"score": s, "routed": s >= threshold}))
            .collect();
        out.insert(name.into(), probes.into());
    }
    Ok(out.into())
}

/// Mean of the positive entries of `x` (EasyEdit's `mean(loss[loss > 0])`), 0 with none.
fn mean_positive(x: &Tensor) -> Result<Tensor, EditError> {
    let r = x.relu()?;
    let n = r
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .filter(|&&v| v > 0.0)
        .count();
    Ok((r.sum_all()? / n.max(1) as f64)?)
}

/// The training loop's result: the trained `ΔW`, the loss per step, and the final in-scope and
/// out-of-scope scores.
struct Trained {
    delta: Tensor,
    losses: Vec<f64>,
    in_scores: Vec<f32>,
    out_score: f32,
}

fn train(
    model: &Edited<'_>,
    rows: &Rows,
    start: Tensor,
    mask: &Tensor,
    act: Activation,
    h: &WiseHparams,
) -> Result<Trained, EditError> {
    let (b, w, layer) = (rows.batch(), rows.width, h.layer);
    let dev = model.device();
    let n_layers = model.spec().n_layers;
    let base = below(model, rows, layer)?;
    // In scope: the subject's tokens of each template row; out of scope: their other tokens
    // and the corpus row (EasyEdit's act/deact masks of a factual edit); the score a memory is
    // routed by: every token.
    let subject = rows.means(dev, |r, p| rows.in_subject(r, p))?;
    let rest = rows.means(dev, |r, p| !rows.in_subject(r, p))?;
    let delta = Var::from_tensor(&start)?;
    let loss_rows: Vec<(usize, usize)> = rows.terms.iter().map(|t| (t.row, t.position)).collect();
    let distances = |add: &Tensor| -> Result<Tensor, EditError> {
        Ok(activation_distance(act, &base.out, add, 1e-12)?.reshape((b, w))?)
    };
    let scores =
        |d: &Tensor, means: &Tensor| -> Result<Tensor, EditError> { Ok((d * means)?.sum(1)?) };
    // Only the template rows carry loss terms: the layers above run on them alone, as wide as
    // the longest of them (the corpus row is often the longest).
    let (tb, tw) = (
        b - 1,
        rows.lengths[..b - 1].iter().copied().max().unwrap_or(1),
    );
    let residual = base.residual.narrow(0, 0, tb)?.narrow(1, 0, tw)?;
    let mut losses = Vec::with_capacity(h.steps);
    for _ in 0..h.steps {
        let add = base.keys.matmul(&delta.as_tensor().t()?)?;
        let above = add
            .reshape((b, w, ()))?
            .narrow(0, 0, tb)?
            .narrow(1, 0, tw)?
            .to_dtype(residual.dtype())?;
        let hidden = (&residual + above)?;
        let mut fwd = Forward::new(tb, tw, dev)
            .with_lengths(rows.lengths[..tb].to_vec())
            .differentiable();
        let top = model.run_layers(hidden, layer + 1..n_layers, &mut fwd)?;
        let logits = model.head(&gather_rows(&top, &loss_rows)?, true)?;
        let ft = weighted_nll(&logits, &rows.terms)?;
        let d = distances(&add)?;
        let inside = scores(&d, &subject)?.narrow(0, 0, b - 1)?;
        let outside = scores(&d, &rest)?;
        let gap = mean_positive(
            &(outside.unsqueeze(1)?.broadcast_sub(&inside.unsqueeze(0)?)? + h.act_margin_gap)?,
        )?;
        let low = mean_positive(&(outside - h.act_margin_out)?)?;
        let high = mean_positive(&(inside.neg()? + h.act_margin_in)?)?;
        let loss = (ft + gap + low + high)?;
        let value = loss.to_scalar::<f32>()? as f64;
        // EasyEdit's EarlyStopMeter: the loss settled and small.
        if losses
            .last()
            .is_some_and(|&prev: &f64| (value - prev).abs() <= 1e-4 && value <= 0.02)
        {
            losses.push(value);
            break;
        }
        losses.push(value);
        let grads = loss.backward()?;
        let g = grads.get(delta.as_tensor()).ok_or_else(|| {
            EditError::Model(crate::engine::model::ModelError::InvalidInput(
                "WISE: no gradient reached the memory".into(),
            ))
        })?;
        let next = (delta.as_tensor() - (g * mask)? * h.lr)?
            .clamp(-h.norm_constraint as f32, h.norm_constraint as f32)?;
        delta.set(&next)?;
    }
    let delta = delta.as_tensor().detach();
    let d = activation_distance(act, &base.out, &base.keys.matmul(&delta.t()?)?, 0.0)?;
    let s = row_scores(&d, w, &rows.lengths, h.router_score.scoring())?;
    Ok(Trained {
        delta,
        losses,
        in_scores: s[..b - 1].to_vec(),
        out_score: s[b - 1],
    })
}

fn edit(
    input: &EditInput<'_>,
    req: &EditRequest,
    h: &WiseHparams,
) -> Result<MethodOutput, EditError> {
    let layer = h.layer;
    let spec = input.model.spec();
    let dev = input.model.device();
    let (d_out, d_in) = (spec.hidden_size, spec.intermediate_size);
    let memory = input.model.overlay.wise(layer);
    let n = memory.map_or(0, |m| m.edits());
    let shard = memory.map_or(0, |m| m.next_shard());
    // The open shard's seed, mask and values (`seed` and `mask_ratio` take effect when a shard
    // opens), or a fresh shard's.
    let (seed, mask, values) = match memory.and_then(|m| m.open()) {
        Some((s, seed, mask, values)) if s == shard => (seed, mask.to_vec(), values.to_vec()),
        _ => {
            let mask = crate::engine::overlay::shard_mask(
                h.seed,
                shard,
                h.mask_ratio as f32,
                d_out * d_in,
            );
            let zeros = vec![0.0; mask.len()];
            (h.seed, mask, zeros)
        }
    };
    let mut start = vec![0f32; d_out * d_in];
    let mut mask_dense = vec![0f32; d_out * d_in];
    for (&i, &v) in mask.iter().zip(&values) {
        start[i as usize] = v;
        mask_dense[i as usize] = 1.0;
    }
    let start = Tensor::from_vec(start, (d_out, d_in), dev)?;
    let mask_t = Tensor::from_vec(mask_dense, (d_out, d_in), dev)?;
    // Trained on the model without this layer's memories: the side memory alone, unrouted.
    let model = Edited::new(
        input.model.base,
        Arc::new(input.model.overlay.without_wise(layer)),
    );
    let snippets = input.resources.snippets()?;
    let outside = &snippets[n % snippets.len()];
    let rows = Rows::new(
        &model,
        input.tok,
        req,
        input.resources.templates()?,
        outside,
    )?;
    let act = Activation::of(spec.architecture);
    let t = train(&model, &rows, start, &mask_t, act, h)?;
    let flat: Vec<f32> = t.delta.flatten_all()?.to_vec1()?;
    let values: Vec<f32> = mask.iter().map(|&i| flat[i as usize]).collect();
    // The edit's score is its rows' smallest (EasyEdit: their mean), the bare prompt's row
    // among them, so that the edit prompt itself always clears `act_ratio` of it.
    let score = t.in_scores.iter().copied().fold(f32::INFINITY, f32::min);
    let min_score = memory
        .and_then(|m| m.open_min_score(shard))
        .unwrap_or(f32::INFINITY)
        .min(score);
    let scope = scope(
        &model,
        input.tok,
        req,
        &t.delta,
        min_score * h.act_ratio as f32,
        h,
    )?;
    let close = (n + 1).is_multiple_of(h.save_freq);
    let merge = if close && (n + 1).is_multiple_of(h.merge_freq) {
        h.merge_freq / h.save_freq
    } else {
        0
    };
    let write = WiseWrite {
        edit: n,
        shard,
        seed,
        mask_ratio: h.mask_ratio as f32,
        score,
        act_ratio: h.act_ratio as f32,
        close,
        merge,
        density: h.density as f32,
        scoring: h.router_score.scoring(),
        values,
    };
    let delta_norm = flat.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diagnostics = json!({
        "layer": layer,
        "edit": n,
        "shard": shard,
        "shard_entries": mask.len(),
        "closes_memory": close,
        "merges": merge,
        "in_scope_scores": t.in_scores,
        "out_of_scope_score": t.out_score,
        "out_of_scope_prompt": outside,
        "scope": scope,
        "delta_norm": delta_norm,
        "loss": t.losses,
    });
    Ok(MethodOutput {
        deltas: Vec::new(),
        state: vec![write.to_state(layer)?],
        diagnostics,
    })
}
