//! `emend sweep`: the paper's protocol in-process, the in-process front end of the sweep loop
//! the service's sweep jobs run (`jobs::sweep_loop`). For each method, the first N records of
//! an editing dataset are applied one at a time to a fresh overlay; at each checkpoint the
//! tasks run on the edited model and the edits' metrics are averaged. After every checkpoint
//! the curve so far is written to `--out` as curve.csv, curve.json, curve.svg and curve.png
//! (the same rows and renderings as `GET /v1/sweeps/{id}/results.csv`, `/curve`, `/chart.svg`
//! and `/chart.png`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{self, EditContext, EditMetrics, EditRequest, MeasureOptions, Method};
use emend::engine::eval::{evaluate, get_task, EvalOptions, ModelBackend};
use emend::engine::model::LoadedModel;
use emend::engine::overlay::{Edited, Overlay, PreparedOverlay};
use emend::jobs::chart::{self, ChartError};
use emend::jobs::curve::{curve_csv, curve_json, curve_rows};
use emend::jobs::sweep::{check_hparams, check_methods, title, SweepSpec};
use emend::jobs::sweep_loop::{drive, Start, SweepFront};
use emend::jobs::CurveRow;

use super::{load, Global};

#[derive(Args)]
pub struct SweepArgs {
    /// Comma-separated methods (see `emend methods`), each on a fresh overlay of its own
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

#[derive(Args)]
pub struct ChartArgs {
    /// A curve to draw: `[LABEL=]PATH`, PATH a sweep's `--out` directory or its curve.json
    /// (also a sweep job's `/curve`). LABEL renames a one-method curve's line, e.g.
    /// `rome+early-stop=sweeps/rome-es`. Repeatable; lines keep this order.
    #[arg(long = "curve", required = true)]
    pub curves: Vec<String>,
    #[arg(long, default_value = "Sequential editing")]
    pub title: String,
    /// Directory for the combined curve.csv, curve.json, curve.svg and curve.png.
    #[arg(long)]
    pub out: PathBuf,
}

/// `emend chart`: curves of separate sweeps (run one method per process or machine) as one
/// table and chart.
pub fn chart(a: ChartArgs) -> Result<()> {
    let mut rows = Vec::new();
    for spec in &a.curves {
        let (label, path) = match spec.split_once('=') {
            Some((l, p)) => (Some(l.trim()), PathBuf::from(p)),
            None => (None, PathBuf::from(spec)),
        };
        let file = if path.is_dir() {
            path.join("curve.json")
        } else {
            path
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let table: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let mut curve = curve_rows(&table).with_context(|| file.display().to_string())?;
        if let Some(label) = label {
            let first = curve.first().map(|r| r.method.clone()).unwrap_or_default();
            if curve.iter().any(|r| r.method != first) {
                bail!(
                    "{}: LABEL= renames a one-method curve; this one has several",
                    file.display()
                );
            }
            curve.iter_mut().for_each(|r| r.method = label.to_string());
        }
        if let Some(dup) = curve
            .iter()
            .find(|r| rows.iter().any(|o: &CurveRow| o.method == r.method))
        {
            bail!("two curves draw method `{}`: give one a LABEL=", dup.method);
        }
        rows.extend(curve);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_curve(&a.out, &rows, &a.title)?;
    print!("{}", curve_csv(&rows));
    Ok(())
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
    let overrides: Value = match &a.hparams {
        Some(s) => serde_json::from_str(s).context("--hparams must be a JSON object")?,
        None => Value::Null,
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
        canary: false,
    };
    check_hparams(&spec, &methods, m.model.spec())?;
    editing::validate(&records, &m.tokenizer)?;
    let mut front = InProcess {
        m: &m,
        ctx: EditContext::new(super::edit::env(Some(dir.clone())), &m.info),
        opts: EvalOptions {
            limit: spec.limit,
            num_fewshot: spec.num_fewshot,
            seed: spec.seed,
        },
        tasks: &spec.tasks,
        dir,
        out: &a.out,
        title: title(&spec.methods(), ds, n),
        method: "",
        rows: Vec::new(),
    };
    // Nothing here awaits anything but the front's own (blocking) work: one thread suffices.
    tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(drive(&mut front, &spec, &methods, &records, Vec::new()))?;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&front.rows)?);
    } else {
        print!("{}", curve_csv(&front.rows));
    }
    Ok(())
}

/// A version of the in-process model: the overlay, and its deltas prepared for forwards (each
/// version's prepared from the one before, so the chain is never summed again).
#[derive(Clone)]
struct Version {
    overlay: Arc<Overlay>,
    prepared: Arc<PreparedOverlay>,
}

/// The sweep loop on a model loaded in this process, the curve written to files.
struct InProcess<'a> {
    m: &'a LoadedModel,
    ctx: EditContext,
    opts: EvalOptions,
    tasks: &'a [String],
    dir: PathBuf,
    out: &'a Path,
    title: String,
    /// The method running (for error messages).
    method: &'static str,
    /// The curve so far.
    rows: Vec<CurveRow>,
}

impl InProcess<'_> {
    fn edited(&self, v: &Version) -> Edited<'_> {
        Edited::new(self.m.model.as_ref(), v.prepared.clone())
    }

    fn at_checkpoint(&self, v: &Version) -> String {
        format!("{} checkpoint {}", self.method, v.overlay.depth())
    }
}

impl SweepFront for InProcess<'_> {
    type Version = Version;
    type Error = anyhow::Error;

    fn number(&self, v: &Version) -> u64 {
        v.overlay.depth() as u64
    }

    /// Ctrl-C ends the process; the files hold the checkpoints finished so far.
    fn cancelled(&self) -> bool {
        false
    }

    async fn start(&mut self, method: Method) -> Result<Start<Version>> {
        self.method = method.name();
        let overlay = Overlay::base();
        let prepared = Arc::new(overlay.prepare(self.m.model.as_ref())?);
        Ok(Start {
            version: Version { overlay, prepared },
            applied: 0,
            reports: Vec::new(),
        })
    }

    async fn apply(
        &mut self,
        method: Method,
        hparams: &Value,
        v: &Version,
        record: &EditRequest,
        n: usize,
    ) -> Result<(Version, Vec<Value>)> {
        let t = Instant::now();
        let steps = editing::apply_prepared(
            self.m,
            &v.overlay,
            v.prepared.clone(),
            method,
            std::slice::from_ref(record),
            hparams,
            MeasureOptions::default(),
            &self.ctx,
        )
        .with_context(|| format!("{} edit {n}", method.name()))?;
        let mut next = v.clone();
        let mut reports = Vec::new();
        for s in steps {
            reports.extend(
                s.reports
                    .iter()
                    .map(|r| serde_json::to_value(r).unwrap_or_default()),
            );
            let overlay = s.version_on(&next.overlay);
            let prepared = Arc::new(overlay.prepare_on(self.m.model.as_ref(), &next.prepared)?);
            next = Version { overlay, prepared };
        }
        tracing::info!(
            method = method.name(),
            applied = n,
            seconds = t.elapsed().as_secs_f64(),
            "edit applied"
        );
        Ok((next, reports))
    }

    async fn remeasure(&mut self, v: &Version, edits: &[EditRequest]) -> Result<Vec<EditMetrics>> {
        editing::remeasure(
            self.m.model.as_ref(),
            &self.edited(v),
            &self.m.tokenizer,
            edits,
        )
        .with_context(|| format!("{}: re-measuring the edits", self.at_checkpoint(v)))
    }

    async fn tasks(&mut self, v: &Version) -> Result<BTreeMap<String, Value>> {
        let edited = self.edited(v);
        let mut backend = ModelBackend::new(&edited, &self.m.tokenizer);
        let res = evaluate(
            self.tasks,
            &self.opts,
            &self.dir,
            &mut backend,
            &mut |_, _| true,
        )
        .with_context(|| self.at_checkpoint(v))?;
        res.results
            .iter()
            .map(|(t, r)| Ok((t.clone(), serde_json::to_value(r)?)))
            .collect()
    }

    async fn edit_applied(&mut self, _method: Method, _applied: usize) -> Result<()> {
        Ok(())
    }

    async fn checkpoint_finished(&mut self, rows: &[CurveRow]) -> Result<()> {
        self.rows = rows.to_vec();
        write_curve(self.out, rows, &self.title)
    }
}
