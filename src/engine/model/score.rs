//! Log-likelihood scoring as lm-evaluation-harness defines it: per-token log-probs of a
//! continuation, greedy checks, and rolling (disjoint-window) log-likelihood for perplexity.
use candle_core::{DType, Tensor, D};

use super::fastmath;
use super::hooks::gather_rows;
use super::{CausalLm, Forward, KvCache, ModelError, Result, Tok};

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
    score_tokens_shared(model, seqs, from, top_n, budget, None)
}

/// Shortest common prefix worth a forward pass of its own; shorter ones are recomputed per row.
pub const MIN_SHARED_PREFIX: usize = 16;

/// The most recent shared prefix's keys and values, kept between calls on the same model so
/// that an evaluation sending one MMLU subject's questions in several chunks computes the
/// subject's few-shot prefix once. The entry remembers which model (a session version) made
/// it and is only reused for that model.
#[derive(Default)]
pub struct PrefixKv {
    model: u64,
    entry: Option<(u64, Vec<u32>, KvCache)>,
    /// Prefix tokens served from this cache instead of recomputed (a diagnostic).
    pub reused_tokens: usize,
    /// Prefix tokens run once for a group of inputs sharing them (a diagnostic).
    pub prefix_tokens: usize,
}

impl PrefixKv {
    /// Names the model the next calls run on (an entry made by another model is not reused).
    pub fn retarget(&mut self, key: u64) {
        self.model = key;
    }

    /// The cached prefix's agreement with `tokens[..limit]`, if it is worth reusing.
    fn hit(&self, tokens: &[u32], limit: usize) -> Option<(usize, &KvCache)> {
        let (model, cached, cache) = self.entry.as_ref()?;
        let m = common_prefix(cached, &tokens[..limit]);
        (*model == self.model && m >= MIN_SHARED_PREFIX).then_some((m, cache))
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// [`score_tokens_top`], computing shared work once: sequences whose inputs are identical
/// (the one-token choices of a multiple-choice question) are run once, and sequences that
/// share a long prefix (a few-shot context, a question's context before its choices) run the
/// prefix once and continue from its KV cache. `prefix_kv` carries the last prefix across calls.
/// Results equal the plain batched pass up to float reassociation (~1e-5 per token).
pub fn score_tokens_shared(
    model: &dyn CausalLm,
    seqs: &[Vec<u32>],
    from: &[usize],
    top_n: usize,
    budget: usize,
    prefix_kv: Option<&mut PrefixKv>,
) -> Result<Vec<TokenScores>> {
    assert_eq!(seqs.len(), from.len());
    if let Some((seqs, from)) = conditioned(model, seqs, from)? {
        return score_unconditioned(model, &seqs, &from, top_n, budget, prefix_kv);
    }
    score_unconditioned(model, seqs, from, top_n, budget, prefix_kv)
}

/// The sequences and scoring starts a conditioning module (SERAC's memory) makes of `seqs`, or
/// `None` when the model has no such module. A sequence is decided on its tokens before
/// `from` (its context), or on all of them when scoring starts at its first token; one the
/// conditioning would push past the context length stays as it is.
#[allow(clippy::type_complexity)]
fn conditioned(
    model: &dyn CausalLm,
    seqs: &[Vec<u32>],
    from: &[usize],
) -> Result<Option<(Vec<Vec<u32>>, Vec<usize>)>> {
    let inputs: Vec<&[u32]> = seqs
        .iter()
        .zip(from)
        .map(|(s, &f)| {
            if f > 1 && f <= s.len() {
                &s[..f]
            } else {
                &s[..]
            }
        })
        .collect();
    let Some(conds) = model.condition(&inputs)? else {
        return Ok(None);
    };
    let ctx = model.spec().context_length;
    let mut out = (
        Vec::with_capacity(seqs.len()),
        Vec::with_capacity(seqs.len()),
    );
    for ((s, &f), c) in seqs.iter().zip(from).zip(conds) {
        match c {
            Some(c) if f > 0 && s.len() + c.text.len() <= ctx + 1 => {
                out.0.push(c.apply(s));
                out.1.push(f + c.text.len());
            }
            _ => {
                out.0.push(s.clone());
                out.1.push(f);
            }
        }
    }
    Ok(Some(out))
}

/// [`score_tokens_shared`] on the sequences as given (no conditioning module consulted).
fn score_unconditioned(
    model: &dyn CausalLm,
    seqs: &[Vec<u32>],
    from: &[usize],
    top_n: usize,
    budget: usize,
    prefix_kv: Option<&mut PrefixKv>,
) -> Result<Vec<TokenScores>> {
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
    // Distinct inputs (a sequence's tokens but its last), each with the first position whose
    // logits some sequence needs.
    let mut index: std::collections::HashMap<&[u32], usize> = Default::default();
    let mut inputs: Vec<Input<'_>> = Vec::new();
    let mut users: Vec<Vec<usize>> = Vec::new();
    for (i, (s, &f)) in seqs.iter().zip(from).enumerate() {
        let tokens = &s[..s.len() - 1];
        let u = *index.entry(tokens).or_insert_with(|| {
            inputs.push(Input {
                tokens,
                first: f - 1,
            });
            users.push(Vec::new());
            inputs.len() - 1
        });
        inputs[u].first = inputs[u].first.min(f - 1);
        users[u].push(i);
    }
    let mut out: Vec<Option<TokenScores>> = vec![None; seqs.len()];
    let mut on_logits = |u: usize, logits: Tensor| -> Result<()> {
        for &i in &users[u] {
            let (seq, f) = (&seqs[i], from[i]);
            let rows = logits.narrow(0, f - 1 - inputs[u].first, seq.len() - f)?;
            out[i] = Some(pick(&rows, &seq[f..], top_n)?);
        }
        Ok(())
    };
    run_inputs(model, &inputs, budget, prefix_kv, &mut on_logits)?;
    Ok(out
        .into_iter()
        .map(|s| s.expect("every sequence scored"))
        .collect())
}

/// One distinct input: its tokens, and the first position whose logits are wanted.
#[derive(Clone, Copy)]
struct Input<'s> {
    tokens: &'s [u32],
    first: usize,
}

/// Runs every input, handing `on_logits(u, rows)` the f32 logits of positions
/// `first..tokens.len()` of input `u`.
fn run_inputs(
    model: &dyn CausalLm,
    inputs: &[Input<'_>],
    budget: usize,
    mut prefix_kv: Option<&mut PrefixKv>,
    on_logits: &mut dyn FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    // Lexicographic order puts inputs sharing a prefix next to each other. A group grows while
    // the tokens it saves (one prefix pass for all members) outweigh what a shorter shared
    // prefix costs the members already in it: n·l' > (n−1)·l.
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    // A per-sequence module decides on a sequence's whole input: no prefix is shared.
    if model.routes_per_sequence() {
        return run_batches(model, inputs, order, 0, None, budget, on_logits);
    }
    order.sort_by(|&a, &b| inputs[a].tokens.cmp(inputs[b].tokens));
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for &u in &order {
        let x = inputs[u];
        if let Some((l, g)) = groups.last_mut() {
            let lead = inputs[g[0]].tokens;
            let shared = (*l).min(common_prefix(lead, x.tokens)).min(x.first);
            let n = g.len();
            if shared >= MIN_SHARED_PREFIX && n * shared > (n - 1) * *l {
                *l = shared;
                g.push(u);
                continue;
            }
        }
        groups.push((x.first, vec![u]));
    }
    let mut plain = Vec::new();
    for (l, g) in groups {
        let lead = inputs[g[0]].tokens;
        let hit = if l >= MIN_SHARED_PREFIX {
            prefix_kv.as_deref().and_then(|p| p.hit(lead, l))
        } else {
            None
        };
        let reuse = hit.map_or(0, |(m, _)| m);
        if g.len() == 1 && reuse == 0 || l < MIN_SHARED_PREFIX {
            plain.push(g[0]);
            continue;
        }
        // A lone input reuses what is cached as is; a group extends it to its whole prefix.
        let l = if g.len() == 1 { reuse } else { l };
        let mut cache = match hit {
            Some((m, c)) => {
                let mut c = c.clone();
                c.truncate(m)?;
                c
            }
            None => KvCache::new(model.spec().n_layers),
        };
        if reuse < l {
            let ids = Tensor::from_vec(lead[reuse..l].to_vec(), (1, l - reuse), model.device())?;
            let mut fwd = Forward::new(1, l - reuse, model.device()).with_cache(&mut cache);
            model.hidden(&ids, &mut fwd)?;
        }
        if let Some(p) = prefix_kv.as_deref_mut() {
            p.reused_tokens += reuse;
            p.prefix_tokens += l - reuse;
            if reuse < l {
                p.entry = Some((p.model, lead[..l].to_vec(), cache.clone()));
            }
        }
        run_batches(model, inputs, g, l, Some(&cache), budget, on_logits)?;
    }
    run_batches(model, inputs, plain, 0, None, budget, on_logits)
}

/// Runs `members` from position `skip` on (continuing `prefix`, which holds their first `skip`
/// tokens), longest first in batches under `budget`, handing each input's logits on.
fn run_batches(
    model: &dyn CausalLm,
    inputs: &[Input<'_>],
    mut members: Vec<usize>,
    skip: usize,
    prefix: Option<&KvCache>,
    budget: usize,
    on_logits: &mut dyn FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    members.sort_by_key(|&u| std::cmp::Reverse(inputs[u].tokens.len()));
    for_each_batch(
        &members,
        |u| inputs[u].tokens.len() - skip,
        budget,
        |chunk| {
            let items: Vec<Input<'_>> = chunk
                .iter()
                .map(|&u| Input {
                    tokens: &inputs[u].tokens[skip..],
                    first: inputs[u].first - skip,
                })
                .collect();
            let logits = forward_rows(model, &items, prefix)?;
            for (&u, t) in chunk.iter().zip(logits) {
                on_logits(u, t)?;
            }
            Ok(())
        },
    )
}

/// Splits `members` (longest first) into batches of at most `budget` padded tokens.
fn for_each_batch(
    members: &[usize],
    width: impl Fn(usize) -> usize,
    budget: usize,
    mut f: impl FnMut(&[usize]) -> Result<()>,
) -> Result<()> {
    let mut start = 0;
    while start < members.len() {
        let per_batch = (budget / width(members[start]).max(1)).max(1);
        let chunk = &members[start..(start + per_batch).min(members.len())];
        f(chunk)?;
        start += chunk.len();
    }
    Ok(())
}

/// One right-padded forward pass, continuing `prefix` when given: causal attention means
/// padding after a sequence never influences its real positions. Returns each input's logits
/// at positions `first..len`.
fn forward_rows(
    model: &dyn CausalLm,
    items: &[Input<'_>],
    prefix: Option<&KvCache>,
) -> Result<Vec<Tensor>> {
    let dev = model.device();
    let width = items
        .iter()
        .map(|x| x.tokens.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let b = items.len();
    let mut ids = vec![0u32; b * width];
    let mut rows = Vec::new();
    for (r, x) in items.iter().enumerate() {
        ids[r * width..r * width + x.tokens.len()].copy_from_slice(x.tokens);
        rows.extend((x.first..x.tokens.len()).map(|j| (r, j)));
    }
    let input = Tensor::from_vec(ids, (b, width), dev)?;
    let mut frozen = prefix.map(|c| c.frozen_prefix(b));
    let mut fwd =
        Forward::new(b, width, dev).with_lengths(items.iter().map(|x| x.tokens.len()).collect());
    if let Some(c) = frozen.as_mut() {
        fwd = fwd.with_cache(c);
    }
    let h = model.hidden(&input, &mut fwd)?;
    let h = gather_rows(&h, &rows)?;
    let logits = model.head(&h, false)?.to_dtype(DType::F32)?;
    let mut out = Vec::with_capacity(b);
    let mut k = 0;
    for x in items {
        let n = x.tokens.len() - x.first;
        out.push(logits.narrow(0, k, n)?);
        k += n;
    }
    Ok(out)
}

/// Scores one sequence's targets from its logits rows (one row per target).
fn pick(logits: &Tensor, targets: &[u32], top_n: usize) -> Result<TokenScores> {
    let picked = match log_softmax_pick_cpu(logits, targets)? {
        Some(p) => p,
        None => log_softmax_pick(logits, targets)?,
    };
    let alternatives = if top_n > 0 {
        top_alternatives(logits, &picked.lse, top_n)?
    } else {
        Vec::new()
    };
    Ok(TokenScores {
        logprobs: picked.logprobs,
        top_logprobs: picked.top,
        top_ids: picked.top_ids,
        alternatives,
    })
}

/// Per logits row: the target's log-prob, the best log-prob and its id, and the row's
/// log-sum-exp (so alternatives come from the same normaliser).
struct Picked {
    logprobs: Vec<f32>,
    top: Vec<f32>,
    top_ids: Vec<u32>,
    lse: Vec<f32>,
}

/// [`log_softmax_pick`] in one read of each CPU row, without the three vocabulary-wide
/// intermediates the tensor ops allocate (for an 8,192-token WikiText window each is 1.6 GB of
/// fresh pages, faulted in one by one: most of a WikiText run's system time). `None` when
/// the logits are not a contiguous f32 CPU tensor or hold a NaN or infinity: the tensor path
/// then keeps its semantics for a broken model.
fn log_softmax_pick_cpu(logits: &Tensor, targets: &[u32]) -> Result<Option<Picked>> {
    use rayon::prelude::*;

    let (rows, vocab) = logits.dims2()?;
    if rows != targets.len() || vocab == 0 {
        return Err(ModelError::InvalidInput(format!(
            "{} targets for {rows} logits rows of width {vocab}",
            targets.len()
        )));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::InvalidInput(format!(
            "target token {t} outside a {vocab}-token vocabulary"
        )));
    }
    let (storage, layout) = logits.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let per_row: Option<Vec<(f32, f32, u32, f32)>> = data[start..end]
        .par_chunks(vocab)
        .with_min_len(16)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = fastmath::max_of(row);
            if !max.is_finite() || row.iter().any(|v| v.is_nan()) {
                return None;
            }
            // The first maximum, as the tensor path's argmax picks.
            let id = row.iter().position(|&v| v == max)? as u32;
            let lse = fastmath::sum_exp_sub(row, max).ln() + max;
            Some((row[t as usize] - lse, max - lse, id, lse))
        })
        .collect();
    Ok(per_row.map(|r| {
        let mut p = Picked {
            logprobs: Vec::with_capacity(rows),
            top: Vec::with_capacity(rows),
            top_ids: Vec::with_capacity(rows),
            lse: Vec::with_capacity(rows),
        };
        for (lp, top, id, lse) in r {
            p.logprobs.push(lp);
            p.top.push(top);
            p.top_ids.push(id);
            p.lse.push(lse);
        }
        p
    }))
}

/// The tensor-op log-softmax pick (any device; and the CPU's fallback for non-finite logits).
fn log_softmax_pick(logits: &Tensor, targets: &[u32]) -> Result<Picked> {
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
    Ok(Picked {
        logprobs: picked.flatten_all()?.to_vec1()?,
        top: top.flatten_all()?.to_vec1()?,
        top_ids: top_ids.to_vec1()?,
        lse: lse.flatten_all()?.to_vec1()?,
    })
}

/// The `n` best `(id, logit − lse)` of each row, best first (ties by id).
fn top_alternatives(logits: &Tensor, lse: &[f32], n: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(rows
        .iter()
        .zip(lse)
        .map(|(row, &l)| {
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
    loglikelihood_shared(model, tok, pairs, budget, None)
}

/// [`loglikelihood`] with shared contexts computed once (see [`score_tokens_shared`]).
pub fn loglikelihood_shared(
    model: &dyn CausalLm,
    tok: &Tok,
    pairs: &[(String, String)],
    budget: usize,
    prefix_kv: Option<&mut PrefixKv>,
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
    let scores = score_tokens_shared(model, &seqs, &from, 0, budget, prefix_kv)?;
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

    fn logits(rows: usize, vocab: usize) -> Vec<f32> {
        // Spread like real logits (tens of units), with a deliberate tie for the argmax.
        let mut v: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919 % 1013) as f32) * 0.031 - 12.0)
            .collect();
        v[3] = 40.0;
        v[7] = 40.0;
        v
    }

    #[test]
    fn cpu_log_softmax_pick_matches_the_tensor_ops() {
        let (rows, vocab) = (37, 1_000);
        let t = Tensor::from_vec(
            logits(rows, vocab),
            (rows, vocab),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 31) % vocab as u32).collect();
        for x in [t.clone(), t.narrow(0, 5, 20).unwrap()] {
            let tg = &targets[..x.dims2().unwrap().0];
            let fast = log_softmax_pick_cpu(&x, tg)
                .unwrap()
                .expect("finite f32 CPU rows");
            let slow = log_softmax_pick(&x, tg).unwrap();
            assert_eq!(fast.top_ids, slow.top_ids, "first maximum on ties");
            for (a, b) in [
                (&fast.logprobs, &slow.logprobs),
                (&fast.top, &slow.top),
                (&fast.lse, &slow.lse),
            ] {
                for (a, b) in a.iter().zip(b) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
            // The target is the argmax exactly when the two log-probs are equal.
            for (i, &t) in tg.iter().enumerate() {
                assert_eq!(fast.logprobs[i] == fast.top[i], t == fast.top_ids[i]);
            }
        }
    }

    #[test]
    fn cpu_log_softmax_pick_leaves_non_finite_rows_and_bad_targets_alone() {
        let mut v = logits(3, 50);
        v[60] = f32::NAN;
        let t = Tensor::from_vec(v, (3, 50), &candle_core::Device::Cpu).unwrap();
        assert!(log_softmax_pick_cpu(&t, &[1, 2, 3]).unwrap().is_none());
        let t = Tensor::from_vec(logits(3, 50), (3, 50), &candle_core::Device::Cpu).unwrap();
        assert!(log_softmax_pick_cpu(&t, &[1, 50, 3]).is_err());
        assert!(log_softmax_pick_cpu(&t, &[1, 2]).is_err());
    }
}
