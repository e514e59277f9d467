//! `emend bench`: load time, prefill and decode throughput, peak RSS, on the configured model.
//! With `--peer` it puts a peer's numbers (same keys, e.g. `scripts/bench_hf.py`) beside ours
//! and can write the table into BENCHMARKS.md.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use serde::{Deserialize, Serialize};

use emend::engine::model::sampling::argmax;
use emend::engine::model::{CausalLm, Forward, KvCache, LoadedModel, ModelSource};

use super::{load_options, model_path, Global};

#[derive(Args)]
pub struct BenchArgs {
    /// Repetitions per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decode steps measured after the prefill.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batches: Vec<usize>,
    /// JSON results of a peer measured with the same workload (scripts/bench_hf.py).
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Write the results table into this markdown file (between the runtime-bench markers).
    #[arg(long)]
    pub write_md: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BenchResult {
    pub engine: String,
    pub load_seconds: f64,
    /// keys like "prefill_b1_tokens_per_s", "decode_b8_tokens_per_s"
    pub throughput: std::collections::BTreeMap<String, f64>,
    pub peak_rss_mb: f64,
    pub threads: usize,
}

pub(super) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Deterministic prompt ids spread over the vocabulary (no special tokens near the start).
pub(super) fn prompt(b: usize, t: usize, vocab: usize) -> Vec<u32> {
    (0..b * t)
        .map(|i| (1000 + (i * 7919) % (vocab - 2000)) as u32)
        .collect()
}

pub(super) fn prefill(
    model: &dyn CausalLm,
    ids: &[u32],
    b: usize,
    t: usize,
    cache: Option<&mut KvCache>,
) -> Result<Vec<Vec<f32>>> {
    let dev = model.device();
    let input = Tensor::from_vec(ids.to_vec(), (b, t), dev)?;
    let mut fwd = Forward::new(b, t, dev);
    if let Some(c) = cache {
        fwd = fwd.with_cache(c);
    }
    let h = model.hidden(&input, &mut fwd)?;
    let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
    Ok(model
        .head(&last, false)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2()?)
}

pub(super) fn decode(
    model: &dyn CausalLm,
    ids: &[u32],
    b: usize,
    t: usize,
    steps: usize,
) -> Result<f64> {
    let dev = model.device();
    let mut cache = KvCache::new(model.spec().n_layers);
    let mut logits = prefill(model, ids, b, t, Some(&mut cache))?;
    let start = Instant::now();
    for _ in 0..steps {
        let next: Vec<u32> = logits.iter().map(|r| argmax(r)).collect();
        let input = Tensor::from_vec(next, (b, 1), dev)?;
        let mut fwd = Forward::new(b, 1, dev).with_cache(&mut cache);
        let h = model.hidden(&input, &mut fwd)?;
        logits = model
            .head(&h.squeeze(1)?, false)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The CPU's model name, for the machine line of a benchmark table.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// User + system CPU seconds this process has used (`/proc/self/stat`, in clock ticks of
/// 1/100 s, the Linux default).
pub fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn run(g: &Global, a: BenchArgs) -> Result<()> {
    let path = model_path(g)?;
    let source = ModelSource::from_path(&path)?;
    let opts = load_options(g)?;
    let runs = a.runs.max(1);
    let mut loads = Vec::new();
    let mut model = None;
    for _ in 0..runs {
        let start = Instant::now();
        let m = LoadedModel::load(&source, &opts)?;
        loads.push(start.elapsed().as_secs_f64());
        model = Some(m);
    }
    let m = model.expect("at least one run");
    let lm = m.model.as_ref();
    let vocab = lm.spec().vocab_size;
    // The decode steps continue the prompt, so both must fit the model's positions.
    let ctx = lm.spec().context_length;
    anyhow::ensure!(
        a.prompt_tokens + a.decode_tokens <= ctx,
        "--prompt-tokens {} + --decode-tokens {} exceed the model's context length {ctx}",
        a.prompt_tokens,
        a.decode_tokens
    );
    anyhow::ensure!(a.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    let mut throughput = std::collections::BTreeMap::new();
    for &b in &a.batches {
        let ids = prompt(b, a.prompt_tokens, vocab);
        prefill(lm, &ids, b, a.prompt_tokens, None)?; // warm-up
        let times: Vec<f64> = (0..runs)
            .map(|_| {
                let s = Instant::now();
                prefill(lm, &ids, b, a.prompt_tokens, None).map(|_| s.elapsed().as_secs_f64())
            })
            .collect::<Result<_>>()?;
        throughput.insert(
            format!("prefill_b{b}_tokens_per_s"),
            (b * a.prompt_tokens) as f64 / median(times),
        );
        eprintln!("prefill b={b} done");
        let times: Vec<f64> = (0..runs)
            .map(|_| decode(lm, &ids, b, a.prompt_tokens, a.decode_tokens))
            .collect::<Result<_>>()?;
        throughput.insert(
            format!("decode_b{b}_tokens_per_s"),
            (b * a.decode_tokens) as f64 / median(times),
        );
        eprintln!("decode b={b} done");
    }
    let ours = BenchResult {
        engine: format!(
            "emend {} (candle, {})",
            env!("CARGO_PKG_VERSION"),
            m.info.dtype
        ),
        load_seconds: median(loads),
        throughput,
        peak_rss_mb: peak_rss_mb(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let peer: Option<BenchResult> = match &a.peer {
        Some(p) => Some(serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    let table = render(&ours, peer.as_ref(), &a, &path);
    if let Some(md) = &a.write_md {
        write_marked(md, "runtime-bench", &table)?;
        eprintln!("wrote {}", md.display());
    }
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"emend": ours, "peer": peer}))?
        );
    } else {
        println!("{table}");
    }
    Ok(())
}

fn render(
    ours: &BenchResult,
    peer: Option<&BenchResult>,
    a: &BenchArgs,
    model: &std::path::Path,
) -> String {
    let mut s = String::new();
    let cpu = cpu_name();
    s.push_str(&format!(
        "Machine: {cpu}, {} threads. Model: `{}`. Workload: {}-token prompts, {} decode steps, median of {} runs.\n\n",
        ours.threads,
        model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        a.prompt_tokens,
        a.decode_tokens,
        a.runs
    ));
    let peer_name = peer.map_or("—".to_string(), |p| p.engine.clone());
    s.push_str(&format!(
        "| metric | {} | {} | emend / peer |\n|---|---:|---:|---:|\n",
        ours.engine, peer_name
    ));
    let row = |name: &str, o: f64, p: Option<f64>, higher_better: bool| {
        let ratio = p.map_or("—".into(), |p| {
            format!("{:.2}×", if higher_better { o / p } else { p / o })
        });
        format!(
            "| {name} | {o:.2} | {} | {ratio} |\n",
            p.map_or("—".into(), |p| format!("{p:.2}"))
        )
    };
    s.push_str(&row(
        "load (s, lower is better)",
        ours.load_seconds,
        peer.map(|p| p.load_seconds),
        false,
    ));
    for (k, v) in &ours.throughput {
        s.push_str(&row(
            &k.replace('_', " "),
            *v,
            peer.and_then(|p| p.throughput.get(k).copied()),
            true,
        ));
    }
    s.push_str(&row(
        "peak RSS (MB, lower is better)",
        ours.peak_rss_mb,
        peer.map(|p| p.peak_rss_mb),
        false,
    ));
    s.push_str("\nRatios above 1 mean emend is better.\n");
    s
}

/// Replaces the block between `<!-- {name}:start -->` and `<!-- {name}:end -->` in `md`
/// (appending it when the markers are missing).
pub fn write_marked(md: &std::path::Path, name: &str, table: &str) -> Result<()> {
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    let old = std::fs::read_to_string(md).unwrap_or_default();
    let block = format!("{start}\n{table}{end}");
    let new = match (old.find(&start), old.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{}{}", &old[..s], block, &old[e + end.len()..]),
        _ => format!("{old}\n{block}\n"),
    };
    std::fs::write(md, new)?;
    Ok(())
}
