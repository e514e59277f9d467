//! `emend bench-eval`: what evaluating costs on the loaded model, task by task, beside
//! lm-evaluation-harness's HF backend on the same slices (`scripts/bench_eval_peer.py`'s
//! report). Writes a section of BENCHMARKS.md.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};

use emend::engine::eval::{evaluate, EvalOptions, ModelBackend};

use super::bench::{cpu_name, cpu_seconds, peak_rss_mb, write_marked};
use super::{load, Global};

#[derive(Args)]
pub struct BenchEvalArgs {
    /// Comma-separated tasks, each timed on its own with a fresh backend.
    #[arg(long, value_delimiter = ',', default_value = "mmlu,lambada_openai")]
    pub tasks: Vec<String>,
    /// Documents per task (per subject for MMLU), as the peer ran them.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// `scripts/bench_eval_peer.py`'s report (lm-eval on the same slices).
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Write the table into this markdown file (between the eval-bench markers).
    #[arg(long)]
    pub write_md: Option<PathBuf>,
}

pub fn run(g: &Global, a: BenchEvalArgs) -> Result<()> {
    let peer: Option<Value> = match &a.peer {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .context("the peer report is not JSON")?,
        ),
        None => None,
    };
    if let Some(p) = &peer {
        if p["limit"].as_u64() != Some(a.limit) {
            anyhow::bail!(
                "the peer ran limit {} but --limit is {}",
                p["limit"],
                a.limit
            );
        }
    }
    let dir = super::eval::data_dir(a.data_dir.clone());
    let m = load(g)?;
    let opts = EvalOptions {
        limit: Some(a.limit as usize),
        ..Default::default()
    };
    let mut rows = Vec::new();
    for task in &a.tasks {
        let _span = tracing::info_span!("bench_eval", task = %task).entered();
        let mut backend = ModelBackend::new(m.model.as_ref(), &m.tokenizer);
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let res = evaluate(
            std::slice::from_ref(task),
            &opts,
            &dir,
            &mut backend,
            &mut |_, _| true,
        )
        .with_context(|| format!("evaluating {task}"))?;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        let r = &res.results[task];
        let row = json!({
            "task": task,
            "docs": r.meta.n_docs,
            "requests": res.requests.total,
            "distinct_requests": res.requests.unique,
            "prefix_tokens_reused": backend.prefix_kv.reused_tokens,
            "wall_s": wall,
            "cpu_s": cpu,
            "metrics": r.metrics,
        });
        tracing::info!(%row, "measured");
        rows.push(row);
    }
    let md = render(&m, &a, &rows, peer.as_ref());
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"emend": rows, "peer": peer}))?
        );
    } else {
        print!("{md}");
    }
    if let Some(path) = &a.write_md {
        write_marked(path, "eval-bench", &md)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn metric(v: &Value, name: &str) -> String {
    v.get(name)
        .and_then(Value::as_f64)
        .map_or("—".into(), |x| format!("{x:.4}"))
}

fn render(
    m: &emend::engine::model::LoadedModel,
    a: &BenchEvalArgs,
    rows: &[Value],
    peer: Option<&Value>,
) -> String {
    let peer_name = peer
        .and_then(|p| p["peer"].as_str())
        .unwrap_or("—")
        .to_string();
    let mut s = format!(
        "Machine: {}, {} threads. Model: `{}` ({:?}). Slices: the first {} documents of each \
         task (per subject for MMLU, 5-shot), local files. Peer: {peer_name}, model loaded \
         before timing. emend peak RSS {:.0} MB{}.\n\n",
        cpu_name(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        m.info
            .path
            .file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned()),
        m.model.dtype(),
        a.limit,
        peak_rss_mb(),
        peer.and_then(|p| p["peak_rss_mb"].as_f64())
            .map_or(String::new(), |r| format!(", peer {r:.0} MB")),
    );
    s.push_str(
        "| task | docs | requests (distinct) | emend wall s | emend docs/s | peer wall s | peer docs/s \
         | speed-up | emend CPU s | peer CPU s | emend acc | peer acc |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let task = r["task"].as_str().unwrap_or("?");
        let p = peer.map(|p| &p["tasks"][task]);
        let docs = r["docs"].as_u64().unwrap_or(0) as f64;
        let wall = r["wall_s"].as_f64().unwrap_or(f64::NAN);
        let pwall = p.and_then(|p| p["wall_s"].as_f64());
        let pdocs = p.and_then(|p| p["docs"].as_f64()).unwrap_or(docs);
        s.push_str(&format!(
            "| {task} | {} | {} ({}) | {wall:.1} | {:.2} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
            docs,
            r["requests"],
            r["distinct_requests"],
            docs / wall,
            pwall.map_or("—".into(), |w| format!("{w:.1}")),
            pwall.map_or("—".into(), |w| format!("{:.2}", pdocs / w)),
            pwall.map_or("—".into(), |w| format!("{:.1}×", w / wall)),
            r["cpu_s"].as_f64().unwrap_or(0.0),
            p.and_then(|p| p["cpu_s"].as_f64())
                .map_or("—".into(), |c| format!("{c:.1}")),
            metric(&r["metrics"], "acc"),
            p.map_or("—".into(), |p| metric(&p["metrics"], "acc")),
        ));
    }
    s.push_str(
        "\nemend scores identical inputs once (one-token choices share their context) and runs \
         a shared prefix (a subject's few-shot examples, a question before its choices) once, \
         continuing every request from its KV cache, including across chunks.\n",
    );
    s
}
