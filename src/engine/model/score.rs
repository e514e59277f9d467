//! Log-likelihood scoring as lm-evaluation-harness defines it: per-token log-probs of a
//! continuation, greedy checks, and rolling (disjoint-window) log-likelihood for perplexity.
use candle_core::{DType, Tensor, D};

use super::hooks::gather_rows;
use super::{CausalLm, Forward, ModelError, Result, Tok};

/// Tokens per forward pass when scoring a batch (padding included).
pub const DEFAULT_TOKEN_BUDGET: usize = 4096;

/// Scores of one sequence's predicted tokens `seq[from..]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScores {
    /// `log P(seq[j] | seq[..j])` for `j` in `from..len`.
    pub logprobs: Vec<f32>,
    /// The best log-prob in the same row (from the same log-softmax, so equality is exact).
    pub top_logprobs: Vec<f32>,
    pub top_ids: Vec<u32>,
    /// The `top_n` best `(id, log-prob)` per position, best first (empty unless asked for).
    pub alternatives: Vec<Vec<(u32, f32)>>,
}

impl TokenScores {
    pub fn sum(&self) -> f64 {
        self.logprobs.iter().map(|&x| x as f64).sum()
    }
    pub fn is_greedy(&self) -> bool {
        self.logprobs
            .iter()
            .zip(&self.top_logprobs)
            .all(|(a, b)| a == b)
    }
}

/// Scores `seqs[i][from[i]..]` given their prefixes. Sequences are sorted by length and batched
/// under a token budget; results come back in input order.
pub fn score_tokens(
    model: &dyn CausalLm,
    seqs: &[Vec<u32>],
    from: &[usize],
    budget: usize,
) -> Result<Vec<TokenScores>> {
    score_tokens_top(model, seqs, from, 0, budget)
}

/// [`score_tokens`] plus the `top_n` most likely tokens at every scored position.
pub fn score_tokens_top(
    model: &dyn CausalLm,
    seqs: &[Vec<u32>],
    from: &[usize],
    top_n: usize,
    budget: usize,
) -> Result<Vec<TokenScores>> {
    assert_eq!(seqs.len(), from.len());
    let ctx = model.spec().context_length;
    for (s, &f) in seqs.iter().zip(from) {
        if f == 0 || f > s.len() {
            return Err(ModelError::InvalidInput(format!(
                "cannot score from position {f} of a {}-token sequence",
                s.len()
            )));
        }
        if s.len() - 1 > ctx {
            return Err(ModelError::ContextOverflow {
                tokens: s.len() - 1,
                limit: ctx,
            });
        }
    }
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut out: Vec<Option<TokenScores>> = vec![None; seqs.len()];
    let mut start = 0;
    while start < order.len() {
        let width = seqs[order[start]].len() - 1;
        let per_batch = (budget / width.max(1)).max(1);
        let chunk = &order[start..(start + per_batch).min(order.len())];
        let scored = score_batch(
            model,
            chunk.iter().map(|&i| (&seqs[i], from[i])).collect(),
            top_n,
        )?;
        for (&i, s) in chunk.iter().zip(scored) {
            out[i] = Some(s);
        }
        start += chunk.len();
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every sequence scored"))
        .collect())
}

/// One right-padded forward pass: causal attention means padding after a sequence never
/// influences its real positions.
fn score_batch(
    model: &dyn CausalLm,
    items: Vec<(&Vec<u32>, usize)>,
    top_n: usize,
) -> Result<Vec<TokenScores>> {
    let dev = model.device();
    let width = items
        .iter()
        .map(|(s, _)| s.len() - 1)
        .max()
        .unwrap_or(0)
        .max(1);
    let b = items.len();
    let mut ids = vec![0u32; b * width];
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (r, (seq, from)) in items.iter().enumerate() {
        let input = &seq[..seq.len() - 1];
        ids[r * width..r * width + input.len()].copy_from_slice(input);
        for j in *from..seq.len() {
            rows.push((r, j - 1));
            targets.push(seq[j]);
        }
    }
    let input = Tensor::from_vec(ids, (b, width), dev)?;
    let mut fwd = Forward::new(b, width, dev);
    let h = model.hidden(&input, &mut fwd)?;
    let h = gather_rows(&h, &rows)?;
    let logits = model.head(&h, false)?.to_dtype(DType::F32)?;
    let (lp, top, top_ids, lse) = log_softmax_pick(&logits, &targets)?;
    let alts = if top_n > 0 {
        top_alternatives(&logits, &lse, top_n)?
    } else {
        Vec::new()
    };
    let mut out = Vec::with_capacity(b);
    let mut k = 0;
    for (seq, from) in &items {
        let n = seq.len() - from;
        out.push(TokenScores {
            logprobs: lp[k..k + n].to_vec(),
            top_logprobs: top[k..k + n].to_vec(),
            top_ids: top_ids[k..k + n].to_vec(),
            alternatives: if top_n > 0 {
                alts[k..k + n].to_vec()
            } else {
                Vec::new()
            },
        });
        k += n;
    }
    Ok(out)
}

/// For each logits row: log-prob of the target, the maximum log-prob, its id, and the row's
/// log-sum-exp (so alternatives come from the same normaliser).
#[allow(clippy::type_complexity)]
fn log_softmax_pick(
    logits: &Tensor,
    targets: &[u32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<u32>, Tensor)> {
    let dev = logits.device();
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let idx = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), dev)?;
    let picked = (logits.gather(&idx, D::Minus1)? - &lse)?;
    let top = (max - &lse)?;
    let top_ids = logits.argmax(D::Minus1)?;
    Ok((
        picked.flatten_all()?.to_vec1()?,
        top.flatten_all()?.to_vec1()?,
        top_ids.to_vec1()?,
        lse,
    ))
}

/// The `n` best `(id, logit − lse)` of each row, best first (ties by id).
fn top_alternatives(logits: &Tensor, lse: &Tensor, n: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let lse: Vec<f32> = lse.flatten_all()?.to_vec1()?;
    Ok(rows
        .iter()
        .zip(lse)
        .map(|(row, l)| {
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            let n = n.min(row.len());
            let cmp =
                |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            idx.select_nth_unstable_by(n - 1, cmp);
            idx.truncate(n);
            idx.sort_by(cmp);
            idx.into_iter().map(|i| (i, row[i as usize] - l)).collect()
        })
        .collect())
}

/// lm-eval's `_encode_pair`: trailing context spaces move into the continuation; the
/// continuation's tokens are those of `context + continuation` past the context's tokens.
pub fn encode_pair(tok: &Tok, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    if context.is_empty() {
        return Ok((vec![prefix_token(tok)], tok.encode_plain(continuation)?));
    }
    let trimmed = context.trim_end();
    let (context, continuation) = if trimmed.len() < context.len() {
        (
            trimmed.to_string(),
            format!("{}{continuation}", &context[trimmed.len()..]),
        )
    } else {
        (context.to_string(), continuation.to_string())
    };
    let whole = tok.encode(&format!("{context}{continuation}"))?;
    let ctx = tok.encode(&context)?;
    let cont = whole[ctx.len().min(whole.len())..].to_vec();
    Ok((ctx, cont))
}

/// The token an empty context is replaced by (lm-eval: BOS when the tokenizer has one, else EOS).
pub fn prefix_token(tok: &Tok) -> u32 {
    tok.bos_id.unwrap_or(tok.eos_id)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Loglikelihood {
    pub logprob: f64,
    pub is_greedy: bool,
    pub continuation_tokens: usize,
}

/// `loglikelihood(context, continuation)` for a batch of pairs, in order.
pub fn loglikelihood(
    model: &dyn CausalLm,
    tok: &Tok,
    pairs: &[(String, String)],
    budget: usize,
) -> Result<Vec<Loglikelihood>> {
    let max_len = model.spec().context_length;
    let mut seqs = Vec::with_capacity(pairs.len());
    let mut from = Vec::with_capacity(pairs.len());
    for (c, x) in pairs {
        let (ctx, cont) = encode_pair(tok, c, x)?;
        if cont.is_empty() {
            return Err(ModelError::InvalidInput(
                "continuation encodes to no tokens".into(),
            ));
        }
        let mut whole = ctx;
        whole.extend_from_slice(&cont);
        // Keep the last max_len + 1 tokens, as lm-eval does.
        let cut = whole.len().saturating_sub(max_len + 1);
        let whole = whole[cut..].to_vec();
        from.push(whole.len() - cont.len());
        seqs.push(whole);
    }
    let scores = score_tokens(model, &seqs, &from, budget)?;
    Ok(scores
        .into_iter()
        .map(|s| Loglikelihood {
            logprob: s.sum(),
            is_greedy: s.is_greedy(),
            continuation_tokens: s.logprobs.len(),
        })
        .collect())
}

/// lm-eval's `get_rolling_token_windows` + `make_disjoint_window` with `context_len = 1`:
/// every token is predicted exactly once, each window with as much context as fits.
pub fn rolling_windows(tokens: &[u32], prefix: u32, max_len: usize) -> Vec<(Vec<u32>, usize)> {
    let mut out = Vec::new();
    if tokens.is_empty() {
        return out;
    }
    let first = max_len.min(tokens.len());
    let mut seq = vec![prefix];
    seq.extend_from_slice(&tokens[..first]);
    out.push((seq, 1));
    let mut predicted = first;
    while predicted < tokens.len() {
        let n = (tokens.len() - predicted).min(max_len);
        let end = predicted + n;
        // Context = the window's tokens before the predicted span, trimmed to fit max_len inputs.
        let ctx_start = end.saturating_sub(max_len + 1);
        let ctx = &tokens[ctx_start..end - n];
        let mut seq = ctx.to_vec();
        seq.extend_from_slice(&tokens[end - n..end]);
        out.push((seq, ctx.len()));
        predicted = end;
    }
    out
}

/// Total log-likelihood of `text` (for perplexity), and the number of tokens scored.
pub fn loglikelihood_rolling(
    model: &dyn CausalLm,
    tok: &Tok,
    text: &str,
    max_len: Option<usize>,
    budget: usize,
) -> Result<(f64, usize)> {
    let tokens = tok.encode_plain(text)?;
    let max_len = max_len.unwrap_or(model.spec().context_length);
    let windows = rolling_windows(&tokens, prefix_token(tok), max_len);
    let (seqs, from): (Vec<_>, Vec<_>) = windows.into_iter().unzip();
    let scores = score_tokens(model, &seqs, &from, budget)?;
    Ok((scores.iter().map(TokenScores::sum).sum(), tokens.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_windows_predict_every_token_once() {
        let toks: Vec<u32> = (10..20).collect();
        let w = rolling_windows(&toks, 0, 4);
        let mut predicted = Vec::new();
        for (seq, from) in &w {
            assert!(seq.len() - 1 <= 4, "inputs fit the context");
            assert!(*from >= 1);
            predicted.extend_from_slice(&seq[*from..]);
        }
        assert_eq!(predicted, toks);
        assert_eq!(w[0], (vec![0, 10, 11, 12, 13], 1));
        // lm-eval: later windows keep max_len inputs, i.e. one token of context before 4 targets
        assert_eq!(w[1], (vec![13, 14, 15, 16, 17], 1));
        assert_eq!(w[2], (vec![15, 16, 17, 18, 19], 3));
    }
}
