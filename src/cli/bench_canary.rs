//! `emend bench-canary`: what a damage-guard reading costs against the edit it guards. Each
//! canary set's reading (every probe on one version) on the model after one ROME edit, beside
//! that ROME edit's compute time (k*, v*, Δ) in the same run, on the same CounterFact records.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use emend::canary::{CanarySet, CanarySpec};
use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{self, EditContext, EditingEnv, MeasureOptions, Method};
use emend::engine::eval::ModelBackend;
use emend::engine::overlay::{Edited, Overlay};

use super::bench::{cpu_name, median, write_marked};
use super::{load, Global};

#[derive(Args)]
pub struct BenchCanaryArgs {
    /// Canary set files to time beside the built-in set (e.g. examples/canary-study.json).
    #[arg(long)]
    pub canary_file: Vec<PathBuf>,
    /// ROME edits (CounterFact records 0, 1, …), each followed by one reading per set.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write the table into this markdown file (between the canary-bench markers).
    #[arg(long)]
    pub write_md: Option<PathBuf>,
}

pub fn run(g: &Global, a: BenchCanaryArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let data_dir = a
        .data_dir
        .clone()
        .or_else(emend::setup::default_datasets_dir)
        .context("no dataset directory: pass --data-dir or set EMEND_DATA_DIR")?;
    let mut specs = vec![CanarySpec::default()];
    for f in &a.canary_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        specs.push(serde_json::from_str(&text).with_context(|| format!("{}", f.display()))?);
    }
    let sets: Vec<CanarySet> = specs
        .into_iter()
        .map(|s| CanarySet::load(s, &data_dir))
        .collect::<Result<_, _>>()?;
    let records = datasets::load(EditDataset::Counterfact, &data_dir)?;
    let m = load(g)?;
    let lm = m.model.as_ref();
    let ctx = EditContext::new(
        EditingEnv {
            stats_dir: emend::setup::cache_dir().join("stats"),
            editors_dir: emend::setup::cache_dir().join("editors"),
            data_dir: Some(data_dir),
        },
        &m.info,
    );
    let rome = Method::named("rome").context("ROME is registered")?;
    // The baselines (greedy neighbour answers) on the unedited model, not timed.
    let base = Overlay::base();
    let baselines: Vec<_> = sets
        .iter()
        .map(|s| s.baseline(&mut ModelBackend::new(lm, &m.tokenizer)))
        .collect::<Result<_, _>>()?;
    // A first edit outside the timing: key statistics and context templates.
    let prepared = Arc::new(base.prepare(lm)?);
    editing::apply_prepared(
        &m,
        &base,
        prepared,
        rome,
        std::slice::from_ref(&records[0].request),
        &serde_json::Value::Null,
        MeasureOptions::default(),
        &ctx,
    )?;
    let mut edit_s = Vec::new();
    let mut read_s = vec![Vec::new(); sets.len()];
    for r in records.iter().take(a.runs) {
        let prepared = Arc::new(base.prepare(lm)?);
        let steps = editing::apply_prepared(
            &m,
            &base,
            prepared,
            rome,
            std::slice::from_ref(&r.request),
            &serde_json::Value::Null,
            MeasureOptions::default(),
            &ctx,
        )?;
        let step = &steps[0];
        edit_s.push(
            step.diagnostics["phases_ms"]["compute"]
                .as_f64()
                .unwrap_or(step.duration_ms as f64)
                / 1000.0,
        );
        let version = step.version_on(&base);
        let edited = Edited::new(lm, Arc::new(version.prepare(lm)?));
        for (i, (set, b)) in sets.iter().zip(&baselines).enumerate() {
            let t = Instant::now();
            set.measure(&mut ModelBackend::new(&edited, &m.tokenizer), &b.answers)?;
            read_s[i].push(t.elapsed().as_secs_f64());
        }
    }
    let edit = median(edit_s);
    let mut table = format!(
        "CPU: {} ({} threads), `emend bench-canary --runs {}`; ROME compute (k*, v*, Δ) median \
         {edit:.2} s.\n\n| canary set | probes | reading (median) | × ROME edit |\n|---|---|---:|---:|\n",
        cpu_name(),
        rayon::current_num_threads(),
        a.runs
    );
    for (set, times) in sets.iter().zip(read_s) {
        let probes: Vec<String> = set
            .spec
            .tasks
            .iter()
            .map(|t| format!("{} {}", t.task, t.limit))
            .chain(std::iter::once(format!(
                "neighbours {}",
                set.spec.neighbours.count
            )))
            .collect();
        let r = median(times);
        table.push_str(&format!(
            "| {} | {} | {r:.2} s | {:.2} |\n",
            set.spec.name,
            probes.join(", "),
            r / edit
        ));
    }
    print!("{table}");
    if let Some(md) = &a.write_md {
        write_marked(md, "canary-bench", &table)?;
    }
    Ok(())
}
