//! Batched generation: left-padded prefill into a KV cache, then one token per step for every
//! unfinished row, with sampling, stop strings, EOS and token limits.
use candle_core::{DType, Tensor};
use serde::Serialize;

use super::sampling::{Sampler, Sampling};
use super::{CausalLm, Forward, KvCache, ModelError, Result, Tok};

#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Stop at the tokenizer's EOS token (always on for serving; off for raw benchmarks).
    pub stop_at_eos: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            sampling: Sampling::default(),
            stop: Vec::new(),
            stop_at_eos: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` or the context length was reached.
    Length,
    /// A stop string or the EOS token.
    Stop,
    /// The caller cancelled the row (its client disconnected).
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
}

/// Text streamed so far for one row; holds back what could still turn into a stop string or an
/// incomplete UTF-8 sequence.
struct RowText {
    ids: Vec<u32>,
    text: String,
    emitted: usize,
    done: Option<FinishReason>,
}

/// Generates for each prompt (token ids) with shared parameters. `on_text(row, delta)` receives
/// text as it becomes final.
pub fn generate(
    model: &dyn CausalLm,
    tok: &Tok,
    prompts: &[Vec<u32>],
    params: &GenParams,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    let params: Vec<GenParams> = vec![params.clone(); prompts.len()];
    generate_each(model, tok, prompts, &params, &mut |r, d| {
        on_text(r, d);
        true
    })
}

/// Generates for each prompt with its own parameters (one batch, one KV cache).
/// `on_text(row, delta)` returns `false` to cancel that row (its client went away).
pub fn generate_each(
    model: &dyn CausalLm,
    tok: &Tok,
    prompts: &[Vec<u32>],
    params: &[GenParams],
    on_text: &mut dyn FnMut(usize, &str) -> bool,
) -> Result<Vec<Generation>> {
    assert_eq!(prompts.len(), params.len(), "one parameter set per prompt");
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let Some(conds) = model.condition(&inputs)? else {
        return generate_unconditioned(model, tok, prompts, params, on_text);
    };
    // A conditioned prompt (SERAC's retrieved edit in front) is what the cache holds, so the
    // decision holds for every new token; one pushed past the context stays as it is.
    let ctx_len = model.spec().context_length;
    let conditioned: Vec<Vec<u32>> = prompts
        .iter()
        .zip(conds)
        .map(|(p, c)| match c {
            Some(c) if p.len() + c.text.len() < ctx_len => c.apply(p),
            _ => p.clone(),
        })
        .collect();
    let mut gens = generate_unconditioned(model, tok, &conditioned, params, on_text)?;
    for (g, p) in gens.iter_mut().zip(prompts) {
        g.prompt_tokens = p.len();
    }
    Ok(gens)
}

/// [`generate_each`] on the prompts as given (no conditioning module consulted).
fn generate_unconditioned(
    model: &dyn CausalLm,
    tok: &Tok,
    prompts: &[Vec<u32>],
    params: &[GenParams],
    on_text: &mut dyn FnMut(usize, &str) -> bool,
) -> Result<Vec<Generation>> {
    let spec = model.spec();
    let ctx_len = spec.context_length;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    for p in prompts {
        if p.is_empty() {
            return Err(ModelError::InvalidInput(
                "prompt encodes to no tokens".into(),
            ));
        }
        if p.len() >= ctx_len {
            return Err(ModelError::ContextOverflow {
                tokens: p.len(),
                limit: ctx_len,
            });
        }
    }
    let dev = model.device().clone();
    let b = prompts.len();
    let mut samplers: Vec<Sampler> = params
        .iter()
        .map(|p| Sampler::new(p.sampling.clone()))
        .collect();
    let mut rows: Vec<RowText> = (0..b)
        .map(|_| RowText {
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            done: None,
        })
        .collect();
    // `active[i]` = original row index of cache row i.
    let mut active: Vec<usize> = (0..b).filter(|&r| params[r].max_tokens > 0).collect();
    if active.is_empty() {
        return Ok(finish(rows, prompts));
    }
    let width = active.iter().map(|&r| prompts[r].len()).max().unwrap_or(0);
    let pad: Vec<usize> = active.iter().map(|&r| width - prompts[r].len()).collect();
    let mut ids = Vec::with_capacity(active.len() * width);
    for &r in &active {
        ids.extend(std::iter::repeat_n(tok.eos_id, width - prompts[r].len()));
        ids.extend_from_slice(&prompts[r]);
    }
    let mut cache = KvCache::new(spec.n_layers);
    let mut input = Tensor::from_vec(ids, (active.len(), width), &dev)?;
    let mut padding = Some(pad);
    loop {
        let (bb, t) = input.dims2()?;
        let mut fwd = Forward::new(bb, t, &dev);
        if let Some(p) = padding.take() {
            fwd = fwd.with_left_padding(p);
        }
        let mut fwd = fwd.with_cache(&mut cache);
        let h = model.hidden(&input, &mut fwd)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        let logits = model.head(&last, false)?.to_dtype(DType::F32)?;
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next = Vec::with_capacity(active.len());
        // Rows were dropped from the cache when they finished; `logits[i]` is cache row i.
        for (i, &r) in active.iter().enumerate() {
            let params = &params[r];
            let id = samplers[r].sample(&logits[i]);
            let row = &mut rows[r];
            if params.stop_at_eos && id == tok.eos_id {
                row.done = Some(FinishReason::Stop);
            } else {
                row.ids.push(id);
                row.text = tok.decode(&row.ids, false)?;
                if let Some(cut) = first_stop(&row.text, &params.stop) {
                    row.text.truncate(cut);
                    row.done = Some(FinishReason::Stop);
                } else if row.ids.len() >= params.max_tokens
                    || prompts[r].len() + row.ids.len() >= ctx_len
                {
                    row.done = Some(FinishReason::Length);
                }
            }
            let safe = if row.done.is_some() {
                row.text.len()
            } else {
                stable_len(&row.text, &params.stop)
            };
            if safe > row.emitted {
                let keep_going = on_text(r, &row.text[row.emitted..safe]);
                row.emitted = safe;
                if !keep_going && row.done.is_none() {
                    row.done = Some(FinishReason::Cancelled);
                }
            }
            next.push(id);
        }
        let keep: Vec<usize> = (0..active.len())
            .filter(|&i| rows[active[i]].done.is_none())
            .collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache.select_rows(&keep)?;
            active = keep.iter().map(|&i| active[i]).collect();
            next = keep.iter().map(|&i| next[i]).collect();
        }
        let n = next.len();
        input = Tensor::from_vec(next, (n, 1), &dev)?;
    }
    Ok(finish(rows, prompts))
}

fn finish(rows: Vec<RowText>, prompts: &[Vec<u32>]) -> Vec<Generation> {
    rows.into_iter()
        .zip(prompts)
        .map(|(r, p)| Generation {
            text: r.text,
            token_ids: r.ids,
            prompt_tokens: p.len(),
            finish_reason: r.done.unwrap_or(FinishReason::Length),
        })
        .collect()
}

/// Byte offset of the earliest stop string in `text`.
fn first_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of the prefix of `text` that no later token can change: excludes a trailing partial
/// UTF-8 character and any suffix that is the start of a stop string.
fn stable_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let body = &text[..end];
    let mut hold = 0;
    for s in stop.iter().filter(|s| !s.is_empty()) {
        for (i, _) in s.char_indices().skip(1) {
            if body.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    end - hold
}

/// Argmax next token after `ids` (single sequence, no cache); a helper for tests and probes.
pub fn next_token_logits(model: &dyn CausalLm, ids: &[u32]) -> Result<Vec<f32>> {
    let dev = model.device();
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), dev)?;
    let mut fwd = Forward::new(1, ids.len(), dev);
    let logits = model.forward(&input, &mut fwd)?;
    Ok(logits
        .squeeze(0)?
        .get(ids.len() - 1)?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let stop = vec!["\n\n".to_string(), "Question:".to_string()];
        assert_eq!(first_stop("abc\n\ndef", &stop), Some(3));
        assert_eq!(first_stop("abc", &stop), None);
        // "Quest" may become "Question:": hold it back
        assert_eq!(stable_len("answer Quest", &stop), "answer ".len());
        assert_eq!(stable_len("answer\n", &stop), "answer".len());
        assert_eq!(stable_len("caf\u{FFFD}", &stop), 3);
    }
}
