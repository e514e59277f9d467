//! Shared-context scoring (one pass for identical inputs, one KV-cached prefix for inputs that
//! share a long start, the last prefix kept across calls) gives what scoring each sequence on
//! its own gives, on every architecture: rotary and learned positions, a sliding window, and
//! the default model.
mod common;

use common::*;
use emend::engine::model::score::{
    score_tokens_shared, score_tokens_top, PrefixKv, TokenScores, MIN_SHARED_PREFIX,
};
use emend::engine::model::{CausalLm, LoadOptions, LoadedModel, ModelSource};

/// Deterministic token ids below `vocab` (a small LCG: no dependency, same every run).
fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Multiple-choice shaped requests: a few-shot prefix shared by every question, each question
/// with four one-token choices (identical inputs) and two three-token choices, plus sequences
/// that share too little to group.
fn requests(
    prefix: &[u32],
    questions: std::ops::Range<u64>,
    vocab: usize,
) -> Vec<(Vec<u32>, usize)> {
    let mut out = Vec::new();
    for q in questions {
        let mut ctx = prefix.to_vec();
        ctx.extend(tokens(100 + q, 4 + q as usize % 7, vocab));
        for c in 0..4u64 {
            let mut s = ctx.clone();
            s.extend(tokens(200 + 10 * q + c, 1, vocab));
            out.push((s, ctx.len()));
        }
        for c in 0..2u64 {
            let mut s = ctx.clone();
            s.extend(tokens(300 + 10 * q + c, 3, vocab));
            out.push((s, ctx.len()));
        }
    }
    out
}

fn alone(model: &dyn CausalLm, seq: &[u32], from: usize) -> TokenScores {
    score_tokens_top(model, &[seq.to_vec()], &[from], 3, 4096)
        .unwrap()
        .remove(0)
}

fn assert_close(model: &dyn CausalLm, reqs: &[(Vec<u32>, usize)], got: &[TokenScores], what: &str) {
    assert_eq!(got.len(), reqs.len());
    for (i, ((seq, from), g)) in reqs.iter().zip(got).enumerate() {
        let want = alone(model, seq, *from);
        assert_eq!(g.logprobs.len(), seq.len() - from, "{what} #{i}");
        for (a, b) in g.logprobs.iter().zip(&want.logprobs) {
            assert!((a - b).abs() < 1e-4, "{what} #{i}: {a} vs {b}");
        }
        for (a, b) in g.top_logprobs.iter().zip(&want.top_logprobs) {
            assert!((a - b).abs() < 1e-4, "{what} #{i} top: {a} vs {b}");
        }
        assert_eq!(g.alternatives.len(), want.alternatives.len());
    }
}

fn check(model: &dyn CausalLm, what: &str) {
    let vocab = model.spec().vocab_size;
    let prefix = tokens(1, 3 * MIN_SHARED_PREFIX, vocab);
    let mut reqs = requests(&prefix, 0..3, vocab);
    // Shares fewer tokens than is worth a pass, and one unrelated sequence.
    let mut short = prefix[..MIN_SHARED_PREFIX / 2].to_vec();
    short.extend(tokens(7, 5, vocab));
    reqs.push((short, 3));
    reqs.push((tokens(8, 6, vocab), 1));
    let (seqs, from): (Vec<_>, Vec<_>) = reqs.iter().cloned().unzip();

    let mut kv = PrefixKv::default();
    kv.retarget(1);
    // A small budget splits the shared group into several batches.
    let got = score_tokens_shared(model, &seqs, &from, 3, 48, Some(&mut kv)).unwrap();
    assert_close(model, &reqs, &got, what);
    assert_eq!(
        kv.reused_tokens, 0,
        "{what}: nothing to reuse on the first call"
    );

    // The next chunk of the same task continues from the cached prefix.
    let more = requests(&prefix, 3..5, vocab);
    let (seqs, from): (Vec<_>, Vec<_>) = more.iter().cloned().unzip();
    let got = score_tokens_shared(model, &seqs, &from, 3, 4096, Some(&mut kv)).unwrap();
    assert_close(model, &more, &got, &format!("{what}, second call"));
    assert!(
        kv.reused_tokens >= prefix.len(),
        "{what}: reused {} tokens",
        kv.reused_tokens
    );

    // Another model (session version) must not see this model's keys and values.
    kv.retarget(2);
    let before = kv.reused_tokens;
    score_tokens_shared(model, &seqs[..1], &from[..1], 0, 4096, Some(&mut kv)).unwrap();
    assert_eq!(
        kv.reused_tokens, before,
        "{what}: retargeted cache was reused"
    );
}

fn tiny(name: &str) -> LoadedModel {
    let dir = fixtures_dir().join("golden").join(name);
    LoadedModel::load(
        &ModelSource::from_path(&dir).unwrap(),
        &LoadOptions::default(),
    )
    .unwrap()
}

#[test]
fn shared_contexts_score_like_separate_sequences_on_every_architecture() {
    for name in ["llama", "mistral", "gpt2", "gpt_neox"] {
        check(tiny(name).model.as_ref(), name);
    }
}

#[test]
fn shared_contexts_score_like_separate_sequences_on_the_default_model() {
    check(default_model().model.as_ref(), "default model");
}
