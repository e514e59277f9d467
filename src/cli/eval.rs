//! `emend eval`: lm-evaluation-harness-compatible benchmarks on the loaded model, or on the
//! model edited by the edits of `--session-file`. A progress bar goes to stderr; scores (or,
//! with `--json`, one JSON object) to stdout.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use emend::engine::editing::{self, EditContext, MeasureOptions, Method};
use emend::engine::eval::{evaluate, list_tasks, EvalOptions, ModelBackend, Results};
use emend::engine::overlay::{Edited, Overlay};

use super::edit::read_edit_file;
use super::{load, Global};

#[derive(Args)]
pub struct EvalArgs {
    /// Comma-separated task names (see `--list`).
    #[arg(long, value_delimiter = ',', required_unless_present = "list")]
    pub tasks: Vec<String>,
    /// Documents per task (per subject for MMLU, per task for BBH).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Few-shot examples instead of each task's default.
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// With --limit: evaluate a seeded sample instead of the first documents.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Dataset directory laid out like ../shared/data [default: $EMEND_DATA_DIR, else
    /// $EMEND_SHARED_DIR/data, else ../shared/data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the known task names and exit.
    #[arg(long)]
    pub list: bool,
    /// Evaluate the model edited by these edits (JSON array or JSONL of edit requests or
    /// `{"dataset": "counterfact", "id": N}` records), applied one by one to a fresh overlay.
    #[arg(long)]
    pub session_file: Option<PathBuf>,
    /// Editing method for --session-file (see `emend methods`).
    #[arg(long, default_value = "rome", requires = "session_file")]
    pub method: String,
    /// Hyper-parameter overrides for --session-file as a JSON object, e.g. '{"layer": 5}'.
    #[arg(long, requires = "session_file")]
    pub hparams: Option<String>,
}

pub fn data_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("EMEND_DATA_DIR").map(PathBuf::from))
        .or_else(|| std::env::var_os("EMEND_SHARED_DIR").map(|s| PathBuf::from(s).join("data")))
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
}

pub fn run(g: &Global, a: EvalArgs) -> Result<()> {
    if a.list {
        for t in list_tasks() {
            println!("{t}");
        }
        return Ok(());
    }
    // Unknown names fail before the model loads.
    for t in &a.tasks {
        emend::engine::eval::get_task(t.trim())?;
    }
    let dir = data_dir(a.data_dir);
    let edits = match &a.session_file {
        Some(f) => {
            let method: Method = a.method.parse()?;
            let overrides: serde_json::Value = match &a.hparams {
                Some(s) => serde_json::from_str(s).context("--hparams must be a JSON object")?,
                None => serde_json::Value::Null,
            };
            Some((method, read_edit_file(f, Some(&dir))?, overrides))
        }
        None => None,
    };
    let m = load(g)?;
    let mut overlay = Overlay::base();
    if let Some((method, requests, overrides)) = &edits {
        editing::validate(requests, &m.tokenizer)?;
        let ctx = EditContext::new(super::edit::env(Some(dir.clone())), &m.info);
        let span = tracing::info_span!("edits", method = %method, n = requests.len());
        let steps = span.in_scope(|| {
            editing::apply(
                &m,
                &overlay,
                *method,
                requests,
                overrides,
                MeasureOptions::default(),
                &ctx,
            )
        })?;
        for s in steps {
            overlay = s.version_on(&overlay);
        }
        tracing::info!(method = %method, edits = requests.len(), versions = overlay.depth(), "edits applied");
    }
    let edited = Edited::new(
        m.model.as_ref(),
        Arc::new(overlay.prepare(m.model.as_ref())?),
    );
    let mut backend = ModelBackend::new(&edited, &m.tokenizer);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {elapsed} (eta {eta})")
            .expect("valid template"),
    );
    let opts = EvalOptions {
        limit: a.limit.map(|l| l as usize),
        num_fewshot: a.num_fewshot,
        seed: a.seed,
    };
    let res = evaluate(&a.tasks, &opts, &dir, &mut backend, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        true
    })
    .with_context(|| format!("evaluating with data from `{}`", dir.display()))?;
    bar.finish_and_clear();
    if g.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        print_table(&res);
    }
    Ok(())
}

fn print_table(res: &Results) {
    println!(
        "{:<18} {:<28} {:>10} {:>9}  fewshot  n",
        "task", "metric", "value", "stderr"
    );
    for (task, r) in &res.results {
        for (name, v) in r.metrics.iter().filter(|(k, _)| !k.ends_with("_stderr")) {
            let se = r
                .metrics
                .get(&format!("{name}_stderr"))
                .map(|s| format!("{s:.4}"))
                .unwrap_or_default();
            println!(
                "{task:<18} {name:<28} {v:>10.4} {se:>9}  {:<7}  {}",
                r.meta.num_fewshot, r.meta.n_docs
            );
        }
        for (cat, m) in &r.categories {
            if let Some(v) = m.get("acc") {
                println!("{:<18} {:<28} {v:>10.4}", format!("  {cat}"), "acc");
            }
        }
        if let Some(n) = &r.meta.note {
            println!("  note: {n}");
        }
    }
    println!(
        "requests: {} built, {} distinct answered",
        res.requests.total, res.requests.unique
    );
}
