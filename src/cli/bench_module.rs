//! `emend bench-module`: what a run-time module (GRACE's codebook, WISE's memories) costs the
//! forward pass. Prefill and decode time after 0, 100 and 1,000 edits at the method's default
//! layer, batch 1 and 8, against the unedited model in the same run; and the bytes the edits
//! hold (prepared and stored).
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use emend::engine::editing::hparams;
use emend::engine::editing::Method;
use emend::engine::model::{CausalLm, LoadedModel, ModelSource, WeightId};
use emend::engine::overlay::{
    encode, shard_mask, CodebookWrite, Edited, Overlay, Scoring, StateEntry, WiseWrite,
};

use super::bench::{cpu_name, decode, median, prefill, prompt, write_marked};
use super::{load_options, model_path, Global};

#[derive(Args)]
pub struct BenchModuleArgs {
    /// `grace` or `wise`.
    #[arg(long, default_value = "grace")]
    pub module: String,
    /// Edits (codebook entries for GRACE; 0: the unedited model).
    #[arg(long, value_delimiter = ',', default_value = "0,100,1000")]
    pub entries: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batches: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
    /// Repetitions per measurement; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Write the table into this markdown file (between the module-bench markers).
    #[arg(long)]
    pub write_md: Option<std::path::PathBuf>,
}

/// Uniform [-1, 1) numbers from a seeded generator: entries far from every real key, so the
/// pass pays the lookup and never the replacement (the cost every out-of-scope input pays).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A version whose codebook at `layer` has `n` entries of norm about 20 (real keys' norms).
fn codebook_version(lm: &dyn CausalLm, layer: usize, n: usize) -> Result<Arc<Overlay>> {
    let (value_dim, key_dim) = lm.weight(WeightId::mlp_down(layer))?.dims2()?;
    let scale = 20.0 / (key_dim as f32 / 3.0).sqrt();
    let state: Vec<StateEntry> = (0..n)
        .map(|i| {
            CodebookWrite {
                index: i,
                key: noise(key_dim, i as u64).iter().map(|x| x * scale).collect(),
                value: noise(value_dim, i as u64 + 1_000_000),
                radius: 1.0,
                label: vec![i as u32],
            }
            .to_state(layer)
        })
        .collect::<Result<_, _>>()?;
    Ok(Overlay::push_with(&Overlay::base(), Vec::new(), state))
}

/// A version after `n` WISE edits at `layer` with EasyEdit's shard schedule (a memory closes
/// every 500 edits, two merge at 1,000): noise values and an unreachable threshold, so the
/// router scores every sequence under every memory and routes none.
fn wise_version(lm: &dyn CausalLm, layer: usize, n: usize) -> Result<Arc<Overlay>> {
    let (d_out, d_in) = lm.weight(WeightId::mlp_down(layer))?.dims2()?;
    let mut state = Vec::with_capacity(n);
    for i in 0..n {
        let shard = i / 500;
        let k = shard_mask(0, shard, 0.2, d_out * d_in).len();
        let write = WiseWrite {
            edit: i,
            shard,
            seed: 0,
            mask_ratio: 0.2,
            score: 1e9,
            act_ratio: 0.88,
            close: (i + 1).is_multiple_of(500),
            merge: if (i + 1).is_multiple_of(1000) { 2 } else { 0 },
            density: 0.53,
            scoring: Scoring::Max,
            values: noise(k, i as u64).iter().map(|x| x * 0.01).collect(),
        };
        state.push(write.to_state(layer)?);
    }
    // One version per edit, as a session stores them.
    Ok(state.into_iter().fold(Overlay::base(), |o, s| {
        Overlay::push_with(&o, Vec::new(), vec![s])
    }))
}

/// Bytes a version's chain stores (the log's rows from the base up).
fn stored_bytes(mut v: &Overlay) -> Result<usize> {
    let mut total = 0;
    loop {
        total += encode(v.own_deltas(), v.own_state())?.len();
        match v.parent() {
            Some(p) => v = p,
            None => return Ok(total),
        }
    }
}

pub fn run(g: &Global, a: BenchModuleArgs) -> Result<()> {
    let source = ModelSource::from_path(&model_path(g)?)?;
    let m = LoadedModel::load(&source, &load_options(g)?)?;
    let lm = m.model.as_ref();
    let method: Method = a.module.parse()?;
    if !matches!(method.name(), "grace" | "wise") {
        anyhow::bail!("--module takes grace or wise");
    }
    let layer = hparams::defaults(method, lm.spec())["layer"]
        .as_u64()
        .unwrap_or(0) as usize;
    let runs = a.runs.max(1);
    let vocab = lm.spec().vocab_size;
    let mut rows = Vec::new();
    let mut base_ms: std::collections::BTreeMap<(usize, &str), f64> = Default::default();
    for &n in &a.entries {
        let version = match method.name() {
            "grace" => codebook_version(lm, layer, n)?,
            _ => wise_version(lm, layer, n)?,
        };
        let prepared = Arc::new(version.prepare(lm)?);
        let stored = stored_bytes(&version)?;
        let view = Edited::new(lm, prepared.clone());
        for &b in &a.batches {
            let ids = prompt(b, a.prompt_tokens, vocab);
            prefill(&view, &ids, b, a.prompt_tokens, None)?; // warm-up
            let pre: Vec<f64> = (0..runs)
                .map(|_| {
                    let s = Instant::now();
                    prefill(&view, &ids, b, a.prompt_tokens, None)
                        .map(|_| s.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<_>>()?;
            let dec: Vec<f64> = (0..runs)
                .map(|_| {
                    decode(&view, &ids, b, a.prompt_tokens, a.decode_tokens)
                        .map(|s| s * 1e3 / a.decode_tokens as f64)
                })
                .collect::<Result<_>>()?;
            for (what, ms) in [("prefill", median(pre)), ("decode", median(dec))] {
                let base = *base_ms.entry((b, what)).or_insert(ms);
                rows.push(format!(
                    "| {n} | {b} | {what} | {ms:.2} | {:+.1} % | {:.2} | {:.2} |",
                    (ms / base - 1.0) * 100.0,
                    prepared.bytes() as f64 / 1e6,
                    stored as f64 / 1e6
                ));
            }
            eprintln!("entries {n}, batch {b} done");
        }
    }
    let what = match method.name() {
        "grace" => "GRACE codebook; entries far from every key (the lookup, never a replacement)",
        _ => {
            "WISE memories (a memory closes every 500 edits, two merge at 1,000); noise values \
              and an unreachable threshold (every memory scored, no row routed)"
        }
    };
    let table = format!(
        "{what}, at layer {layer} of {model}, {threads} threads, {cpu}; prompts of {t} tokens, \
         {d} decode steps, median of {runs} runs; the first size listed is the baseline.\n\n\
         | edits | batch | pass | ms (prefill: per pass; decode: per token) | vs baseline | prepared MB | stored MB |\n\
         |---:|---:|---|---:|---:|---:|---:|\n{}\n",
        rows.join("\n"),
        model = m.info.name,
        threads = std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu = cpu_name(),
        t = a.prompt_tokens,
        d = a.decode_tokens,
    );
    println!("{table}");
    if let Some(md) = &a.write_md {
        let marker = match method.name() {
            "grace" => "module-bench",
            _ => "module-bench-wise",
        };
        write_marked(md, marker, &table)?;
    }
    Ok(())
}
