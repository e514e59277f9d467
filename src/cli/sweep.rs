//! `emend sweep`: the paper's protocol in-process. For each method, the first N records of an
//! editing dataset are applied one at a time to a fresh overlay; at each checkpoint the tasks
//! run on the edited model and the edits' metrics are averaged. After every checkpoint the
//! curve so far is written to `--out` as curve.csv, curve.json, curve.svg and curve.png (the
//! same rows and renderings as `GET /v1/sweeps/{id}/results.csv`, `/curve`, `/chart.svg` and
//! `/chart.png`).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use chrono::{SecondsFormat, Utc};
use clap::Args;

use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{self, EditContext, MeasureOptions};
use emend::engine::eval::{evaluate, get_task, EvalOptions, ModelBackend};
use emend::engine::model::LoadedModel;
use emend::engine::overlay::{Edited, Overlay, PreparedOverlay};
use emend::jobs::chart::{self, ChartError};
use emend::jobs::sweep::{
    check_hparams, check_methods, curve_csv, curve_json, headline_metrics, mean_metrics,
    mean_post_metrics, title, SweepSpec,
};
use emend::jobs::CurveRow;

use super::{load, Global};

#[derive(Args)]
pub struct SweepArgs {
    /// Comma-separated methods (rome, memit, ft-l, ft-m), each on a fresh overlay of its own
    /// and drawn as its own line.
    #[arg(long, value_delimiter = ',', default_value = "rome")]
    pub method: Vec<String>,
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
    /// Hyper-parameter overrides as a JSON object, e.g. '{"steps": 10}'; with several methods,
    /// one object per method: '{"rome": {"steps": 10}}'.
    #[arg(long)]
    pub hparams: Option<String>,
    /// Dataset directory [default: $EMEND_DATA_DIR, else $EMEND_SHARED_DIR/data, else
    /// ../shared/data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory for curve.csv, curve.json, curve.svg and curve.png (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

fn write_curve(out: &Path, rows: &[CurveRow], title: &str) -> Result<()> {
    let w = |name: &str, bytes: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    w("curve.csv", curve_csv(rows).as_bytes())?;
    w(
        "curve.json",
        serde_json::to_string_pretty(&curve_json(rows))?.as_bytes(),
    )?;
    match chart::svg(rows, title).and_then(|svg| Ok((svg, chart::png(rows, title)?))) {
        Ok((svg, png)) => {
            w("curve.svg", svg.as_bytes())?;
            w("curve.png", &png)
        }
        // The table is the result; a machine without fonts still gets it.
        Err(e @ ChartError::NoFont) => {
            tracing::warn!("charts not written: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub fn run(g: &Global, a: SweepArgs) -> Result<()> {
    let names: Vec<String> = a.method.iter().map(|m| m.trim().to_string()).collect();
    // One method: `--hparams` is its overrides; several: keyed by method, as in the API.
    let (methods, keyed) = match names.as_slice() {
        [one] => check_methods(Some(one), None)?,
        many => check_methods(None, Some(many))?,
    };
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
    let spec = SweepSpec {
        method: methods[0].name().to_string(),
        methods: if keyed { names } else { Vec::new() },
        dataset: ds,
        n_edits: n,
        checkpoints: a.checkpoints.clone(),
        tasks: a.tasks.clone(),
        limit: a.limit.map(|l| l as usize),
        num_fewshot: a.num_fewshot,
        seed: a.seed,
        hparams: overrides,
    };
    check_hparams(&spec, &methods, m.model.spec())?;
    editing::validate(&records, &m.tokenizer)?;
    let ctx = EditContext::new(super::edit::env(Some(dir.clone())), &m.info);
    let opts = EvalOptions {
        limit: a.limit.map(|l| l as usize),
        num_fewshot: a.num_fewshot,
        seed: a.seed,
    };
    let title = title(&spec.methods(), ds, n);
    let mut rows: Vec<CurveRow> = Vec::new();
    for &method in &methods {
        let hparams = spec.hparams_for(method.name());
        let mut overlay = Overlay::base();
        // Each version prepared from the one before (the chain is never summed again).
        let mut prepared = Arc::new(overlay.prepare(m.model.as_ref())?);
        let mut reports = Vec::new();
        let mut applied = 0;
        for &c in &a.checkpoints {
            while applied < c {
                let t = std::time::Instant::now();
                let steps = editing::apply_prepared(
                    &m,
                    &overlay,
                    prepared.clone(),
                    method,
                    std::slice::from_ref(&records[applied]),
                    &hparams,
                    MeasureOptions::default(),
                    &ctx,
                )
                .with_context(|| format!("{} edit {}", method.name(), applied + 1))?;
                for s in steps {
                    reports.extend(
                        s.reports
                            .iter()
                            .map(|r| serde_json::to_value(r).unwrap_or_default()),
                    );
                    overlay = Overlay::push(&overlay, s.deltas);
                    prepared = Arc::new(overlay.prepare_on(m.model.as_ref(), &prepared)?);
                }
                applied += 1;
                tracing::info!(
                    method = method.name(),
                    applied,
                    seconds = t.elapsed().as_secs_f64(),
                    "edit applied"
                );
            }
            // The 0-edit checkpoint is the base model, the same for every method.
            let base = (c == 0)
                .then(|| rows.iter().find(|r| r.n_edits == 0).cloned())
                .flatten();
            let row = match base {
                Some(b) => CurveRow {
                    method: method.name().to_string(),
                    ..b
                },
                None => CurveRow {
                    method: method.name().to_string(),
                    ..checkpoint(
                        &m,
                        &overlay,
                        &prepared,
                        &a.tasks,
                        &opts,
                        &dir,
                        &records[..c],
                        &reports,
                    )
                    .with_context(|| format!("{} checkpoint {c}", method.name()))?
                },
            };
            rows.push(row);
            write_curve(&a.out, &rows, &title)?;
            tracing::info!(method = method.name(), n_edits = c, "checkpoint finished");
        }
    }
    if g.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", curve_csv(&rows));
    }
    Ok(())
}

/// The overlay's model evaluated: the tasks, the edits so far re-measured, and the at-apply
/// metrics averaged.
#[allow(clippy::too_many_arguments)] // the sweep's state at one checkpoint
fn checkpoint(
    m: &LoadedModel,
    overlay: &Overlay,
    prepared: &Arc<PreparedOverlay>,
    tasks: &[String],
    opts: &EvalOptions,
    dir: &Path,
    edits: &[editing::EditRequest],
    reports: &[serde_json::Value],
) -> Result<CurveRow> {
    let edited = Edited::new(m.model.as_ref(), prepared.clone());
    let mut backend = ModelBackend::new(&edited, &m.tokenizer);
    let res = evaluate(tasks, opts, dir, &mut backend, &mut |_, _| true)?;
    let tasks = res
        .results
        .iter()
        .map(|(t, r)| Ok((t.clone(), headline_metrics(&serde_json::to_value(r)?))))
        .collect::<Result<_>>()?;
    let retained = editing::remeasure(m.model.as_ref(), &edited, &m.tokenizer, edits)
        .context("re-measuring the edits")?;
    let retained: Vec<serde_json::Value> = retained
        .iter()
        .map(serde_json::to_value)
        .collect::<std::result::Result<_, _>>()?;
    Ok(CurveRow {
        method: String::new(),
        n_edits: edits.len(),
        version: overlay.depth() as u64,
        edit: mean_metrics(&retained),
        edit_at_apply: mean_post_metrics(reports),
        tasks,
        finished_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
    })
}
