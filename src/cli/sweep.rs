//! `emend sweep`: the paper's protocol in-process. The first N records of an editing dataset
//! are applied one at a time to a fresh overlay; at each checkpoint the tasks run on the edited
//! model and the edits' post-edit metrics are averaged. After every checkpoint the curve so far
//! is written to `--out` as curve.csv, curve.json and curve.svg (the same rows and renderings as
//! `GET /v1/sweeps/{id}/curve`).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use chrono::{SecondsFormat, Utc};
use clap::Args;

use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{self, EditContext, MeasureOptions, Method};
use emend::engine::eval::{evaluate, get_task, EvalOptions, ModelBackend};
use emend::engine::overlay::{Edited, Overlay};
use emend::jobs::sweep::{
    curve_csv, curve_json, curve_svg, headline_metrics, mean_metrics, mean_post_metrics,
};
use emend::jobs::CurveRow;

use super::{load, Global};

#[derive(Args)]
pub struct SweepArgs {
    /// rome, memit, ft-l or ft-m.
    #[arg(long, default_value = "rome")]
    pub method: String,
    /// counterfact or zsre: its first --n-edits records are applied in order.
    #[arg(long, default_value = "counterfact")]
    pub dataset: String,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub n_edits: u64,
    /// Comma-separated, increasing numbers of edits after which the tasks run (0 = base).
    #[arg(long, value_delimiter = ',', required = true)]
    pub checkpoints: Vec<usize>,
    /// Comma-separated task names (see `emend eval --list`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub tasks: Vec<String>,
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hyper-parameter overrides as a JSON object, e.g. '{"steps": 10}'.
    #[arg(long)]
    pub hparams: Option<String>,
    /// Dataset directory [default: $EMEND_DATA_DIR, else $EMEND_SHARED_DIR/data, else
    /// ../shared/data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory for curve.csv, curve.json and curve.svg (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

fn write_curve(out: &Path, rows: &[CurveRow], title: &str) -> Result<()> {
    let w = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    w("curve.csv", curve_csv(rows))?;
    w(
        "curve.json",
        serde_json::to_string_pretty(&curve_json(rows))?,
    )?;
    w("curve.svg", curve_svg(rows, title))
}

pub fn run(g: &Global, a: SweepArgs) -> Result<()> {
    let method: Method = a.method.parse()?;
    let ds: EditDataset = a.dataset.parse()?;
    let n = a.n_edits as usize;
    for (i, c) in a.checkpoints.iter().enumerate() {
        if *c > n || (i > 0 && *c <= a.checkpoints[i - 1]) {
            bail!("--checkpoints must increase and be at most --n-edits ({n}); got {c}");
        }
    }
    for t in &a.tasks {
        get_task(t.trim())?;
    }
    let overrides: serde_json::Value = match &a.hparams {
        Some(s) => serde_json::from_str(s).context("--hparams must be a JSON object")?,
        None => serde_json::Value::Null,
    };
    let dir = super::eval::data_dir(a.data_dir.clone());
    let records: Vec<_> = datasets::load(ds, &dir)?
        .into_iter()
        .take(n)
        .map(|r| r.request)
        .collect();
    if records.len() < n {
        bail!("{} has only {} records", ds.name(), records.len());
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let m = load(g)?;
    editing::hparams::resolve(method, m.model.spec(), &overrides)?;
    editing::validate(&records, &m.tokenizer)?;
    let ctx = EditContext::new(super::edit::env(Some(dir.clone())), &m.info);
    let opts = EvalOptions {
        limit: a.limit.map(|l| l as usize),
        num_fewshot: a.num_fewshot,
        seed: a.seed,
    };
    let title = format!("{} on {}, {n} edits", method.name(), ds.name());
    let mut overlay = Overlay::base();
    let mut reports = Vec::new();
    let mut rows: Vec<CurveRow> = Vec::new();
    let mut applied = 0;
    for &c in &a.checkpoints {
        while applied < c {
            let steps = editing::apply(
                &m,
                &overlay,
                method,
                std::slice::from_ref(&records[applied]),
                &overrides,
                MeasureOptions::default(),
                &ctx,
            )
            .with_context(|| format!("edit {}", applied + 1))?;
            for s in steps {
                reports.extend(
                    s.reports
                        .iter()
                        .map(|r| serde_json::to_value(r).unwrap_or_default()),
                );
                overlay = Overlay::push(&overlay, s.deltas);
            }
            applied += 1;
            tracing::info!(applied, "edit applied");
        }
        let edited = Edited::new(
            m.model.as_ref(),
            Arc::new(overlay.prepare(m.model.as_ref())?),
        );
        let mut backend = ModelBackend::new(&edited, &m.tokenizer);
        let res = evaluate(&a.tasks, &opts, &dir, &mut backend, &mut |_, _| true)
            .with_context(|| format!("evaluating checkpoint {c}"))?;
        let tasks = res
            .results
            .iter()
            .map(|(t, r)| Ok((t.clone(), headline_metrics(&serde_json::to_value(r)?))))
            .collect::<Result<_>>()?;
        let retained = editing::remeasure(m.model.as_ref(), &edited, &m.tokenizer, &records[..c])
            .with_context(|| format!("re-measuring the edits at checkpoint {c}"))?;
        let retained: Vec<serde_json::Value> = retained
            .iter()
            .map(serde_json::to_value)
            .collect::<std::result::Result<_, _>>()?;
        rows.push(CurveRow {
            n_edits: c,
            version: overlay.depth() as u64,
            edit: mean_metrics(&retained),
            edit_at_apply: mean_post_metrics(&reports),
            tasks,
            finished_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        write_curve(&a.out, &rows, &title)?;
        tracing::info!(n_edits = c, "checkpoint finished");
    }
    if g.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", curve_csv(&rows));
    }
    Ok(())
}
