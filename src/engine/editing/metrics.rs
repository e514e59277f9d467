//! Edit metrics as EasyEdit and ROME define them, on the edited model and the one before it.
use serde::{Deserialize, Serialize};

/// Scores of one prompt against its target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PromptScore {
    /// Teacher-forced token accuracy: share of target tokens that are the argmax given the
    /// prompt and the target tokens before them (EasyEdit's `rewrite_acc`).
    pub token_accuracy: f64,
    /// `log P(target | prompt)`, summed over the target's tokens.
    pub logprob_new: f64,
    /// `log P(target_true | prompt)` when the request names the old object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob_true: Option<f64>,
}

/// One request's metrics on one model (pre- or post-edit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EditMetrics {
    /// Reliability: mean token accuracy of `target_new` on the edit prompt.
    pub reliability: f64,
    /// ROME's efficacy success: `P(new) > P(true)` on the edit prompt (needs `target_true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success: Option<f64>,
    /// Generalization: mean token accuracy of `target_new` over the rephrase prompts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generalization: Option<f64>,
    /// Paraphrase success `P(new) > P(true)` (needs `target_true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generalization_success: Option<f64>,
    /// Locality: share of the locality answers' tokens whose argmax is the same as before the
    /// edit (teacher-forced on the answer; 1.0 on the pre-edit model by definition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<f64>,
    /// Portability: mean token accuracy of the portability answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub portability: Option<f64>,
    /// Fluency: n-gram entropy of greedy generations from the edit prompt (ROME's
    /// `ngram_entropy`: weighted 2- and 3-gram entropies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fluency: Option<f64>,
    pub rewrite: PromptScore,
}

/// Metrics of one request before and after its edit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EditReport {
    pub pre: EditMetrics,
    pub post: EditMetrics,
}

use crate::engine::model::generate::{generate, GenParams};
use crate::engine::model::score::{encode_pair, score_tokens, DEFAULT_TOKEN_BUDGET};
use crate::engine::model::{CausalLm, Result, Tok};

use super::EditRequest;

/// Greedy tokens generated for a locality prompt without an answer.
const LOCALITY_ANSWER_TOKENS: usize = 5;
/// Greedy tokens generated from the edit prompt for the fluency metric.
const FLUENCY_TOKENS: usize = 48;

/// What a measurement keeps for the post-edit comparison.
#[derive(Debug, Clone)]
pub(crate) struct Measured {
    pub metrics: EditMetrics,
    /// Per locality prompt: the teacher-forced sequence and where its answer starts.
    locality_seqs: Vec<(Vec<u32>, usize)>,
    /// Per locality prompt: the argmax at each answer position.
    locality_top: Vec<Vec<u32>>,
}

/// Which sequence a score belongs to.
enum Slot {
    RewriteNew(usize),
    RewriteTrue(usize),
    RephraseNew(usize),
    RephraseTrue(usize),
    Locality(usize),
    Portability(usize),
}

fn pair(tok: &Tok, context: &str, continuation: &str) -> Result<(Vec<u32>, usize)> {
    let (mut ctx, cont) = encode_pair(tok, context, continuation)?;
    let from = ctx.len();
    ctx.extend_from_slice(&cont);
    Ok((ctx, from))
}

/// Measures `reqs` on `model`. With `pre` (the measurement before the edit), locality compares
/// against the pre-edit predictions; without it, this is the pre-edit measurement.
pub(crate) fn measure(
    model: &dyn CausalLm,
    tok: &Tok,
    reqs: &[&EditRequest],
    pre: Option<&[Measured]>,
    fluency: bool,
) -> Result<Vec<Measured>> {
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    let mut from: Vec<usize> = Vec::new();
    let mut slots: Vec<Slot> = Vec::new();
    let mut push = |seq: (Vec<u32>, usize), slot: Slot, seqs: &mut Vec<Vec<u32>>| {
        seqs.push(seq.0);
        from.push(seq.1);
        slots.push(slot);
    };
    let mut locality_seqs: Vec<Vec<(Vec<u32>, usize)>> = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let (prompt, _) = r.filled();
        let new = r.target_new_text();
        push(pair(tok, &prompt, &new)?, Slot::RewriteNew(i), &mut seqs);
        if let Some(t) = r.target_true_text() {
            push(pair(tok, &prompt, &t)?, Slot::RewriteTrue(i), &mut seqs);
        }
        for p in &r.rephrase_prompts {
            push(pair(tok, p, &new)?, Slot::RephraseNew(i), &mut seqs);
            if let Some(t) = r.target_true_text() {
                push(pair(tok, p, &t)?, Slot::RephraseTrue(i), &mut seqs);
            }
        }
        let loc: Vec<(Vec<u32>, usize)> = match pre {
            Some(pre) => pre[i].locality_seqs.clone(),
            None => r
                .locality_prompts
                .iter()
                .map(|p| match &p.answer {
                    Some(a) => pair(tok, &p.prompt, &super::with_space(a)),
                    None => {
                        // No answer given: the model's own greedy answer before the edit.
                        let ids = tok.encode(&p.prompt)?;
                        let g = generate(
                            model,
                            tok,
                            std::slice::from_ref(&ids),
                            &GenParams {
                                max_tokens: LOCALITY_ANSWER_TOKENS,
                                ..GenParams::default()
                            },
                            &mut |_, _| {},
                        )?;
                        let mut seq = ids.clone();
                        seq.extend_from_slice(&g[0].token_ids);
                        if g[0].token_ids.is_empty() {
                            seq.push(tok.eos_id);
                        }
                        Ok((seq, ids.len()))
                    }
                })
                .collect::<Result<_>>()?,
        };
        for s in &loc {
            push(s.clone(), Slot::Locality(i), &mut seqs);
        }
        locality_seqs.push(loc);
        for p in &r.portability_prompts {
            let a = p.answer.as_deref().unwrap_or_default();
            push(
                pair(tok, &p.prompt, &super::with_space(a))?,
                Slot::Portability(i),
                &mut seqs,
            );
        }
    }
    let scores = score_tokens(model, &seqs, &from, DEFAULT_TOKEN_BUDGET)?;

    #[derive(Default, Clone)]
    struct Acc {
        new: Option<(f64, f64, usize)>,
        true_lp: Option<(f64, usize)>,
        reph_acc: Vec<f64>,
        reph_new: Vec<f64>,
        reph_true: Vec<f64>,
        loc_top: Vec<Vec<u32>>,
        port: Vec<f64>,
    }
    let mut acc = vec![Acc::default(); reqs.len()];
    for (k, slot) in slots.iter().enumerate() {
        let s = &scores[k];
        let targets = &seqs[k][from[k]..];
        let n = targets.len().max(1);
        let token_acc = s
            .top_ids
            .iter()
            .zip(targets)
            .filter(|(a, b)| a == b)
            .count() as f64
            / n as f64;
        let lp = s.sum();
        match *slot {
            Slot::RewriteNew(i) => acc[i].new = Some((token_acc, lp, n)),
            Slot::RewriteTrue(i) => acc[i].true_lp = Some((lp, n)),
            Slot::RephraseNew(i) => {
                acc[i].reph_acc.push(token_acc);
                acc[i].reph_new.push(lp / n as f64);
            }
            Slot::RephraseTrue(i) => acc[i].reph_true.push(lp / n as f64),
            Slot::Locality(i) => acc[i].loc_top.push(s.top_ids.clone()),
            Slot::Portability(i) => acc[i].port.push(token_acc),
        }
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let mut out = Vec::with_capacity(reqs.len());
    for (i, (a, r)) in acc.into_iter().zip(reqs).enumerate() {
        let (rel, lp_new, n_new) = a.new.expect("every request has a rewrite score");
        // ROME compares mean per-token log-probs of the two objects.
        let success = a.true_lp.map(|(lp_true, n_true)| {
            ((lp_new / n_new as f64) > (lp_true / n_true as f64)) as u8 as f64
        });
        let generalization_success = (!a.reph_true.is_empty()).then(|| {
            a.reph_new
                .iter()
                .zip(&a.reph_true)
                .filter(|(n, t)| n > t)
                .count() as f64
                / a.reph_true.len() as f64
        });
        let locality = match pre {
            None if !a.loc_top.is_empty() => Some(1.0),
            None => None,
            Some(pre) => {
                let before = &pre[i].locality_top;
                let (same, total) = a.loc_top.iter().zip(before).fold((0, 0), |(s, t), (x, y)| {
                    (
                        s + x.iter().zip(y).filter(|(a, b)| a == b).count(),
                        t + y.len(),
                    )
                });
                (total > 0).then(|| same as f64 / total as f64)
            }
        };
        let fluency = if fluency {
            let (prompt, _) = r.filled();
            let ids = tok.encode(&prompt)?;
            let g = generate(
                model,
                tok,
                std::slice::from_ref(&ids),
                &GenParams {
                    max_tokens: FLUENCY_TOKENS,
                    ..GenParams::default()
                },
                &mut |_, _| {},
            )?;
            Some(ngram_entropy(&format!("{prompt}{}", g[0].text)))
        } else {
            None
        };
        out.push(Measured {
            metrics: EditMetrics {
                reliability: rel,
                success,
                generalization: mean(&a.reph_acc),
                generalization_success,
                locality,
                portability: mean(&a.port),
                fluency,
                rewrite: PromptScore {
                    token_accuracy: rel,
                    logprob_new: lp_new,
                    logprob_true: a.true_lp.map(|x| x.0),
                },
            },
            locality_seqs: locality_seqs[i].clone(),
            locality_top: a.loc_top,
        });
    }
    Ok(out)
}

/// ROME's fluency measure: the weighted mean of the 2- and 3-gram entropies (bits, weights
/// 2/3 and 4/3) of the text's words (whitespace-split and lower-cased here; ROME uses NLTK's
/// word tokenizer).
pub fn ngram_entropy(text: &str) -> f64 {
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_lowercase()).collect();
    let weights = [(2usize, 2.0 / 3.0), (3usize, 4.0 / 3.0)];
    let mut total = 0.0;
    for (n, w) in weights {
        let mut counts: std::collections::HashMap<&[String], usize> = Default::default();
        for g in words.windows(n) {
            *counts.entry(g).or_default() += 1;
        }
        let sum: usize = counts.values().sum();
        let h: f64 = counts
            .values()
            .map(|&c| {
                let p = c as f64 / sum as f64;
                -p * p.log2()
            })
            .sum();
        total += w * h;
    }
    total / weights.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetitive_text_has_lower_ngram_entropy() {
        let varied = "the tower stands in paris and draws visitors from every country each year";
        let stuck = "paris paris paris paris paris paris paris paris paris paris paris paris";
        assert!(ngram_entropy(varied) > ngram_entropy(stuck) + 1.0);
        assert_eq!(ngram_entropy(stuck), 0.0);
    }
}
