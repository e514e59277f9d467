//! Sweeps, the paper's protocol as a job: a fresh session, the first `n_edits` records of an
//! editing dataset applied one at a time through the engine's edit lane, and at each
//! checkpoint (a number of edits so far) the benchmark tasks on that version plus the edits'
//! metrics averaged over the edits so far. Checkpoints are stored as they finish; a resumed
//! sweep keeps its session and edits and goes on from the last finished checkpoint.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use utoipa::ToSchema;

use super::{
    check_fewshot, check_limit, check_tasks, count_requests, eval, invalid, json, now,
    EvaluationSpec, JobError, JobProgress, JobStatus, Jobs, Record, SWEEP,
};
use crate::engine::editing::datasets::{self, EditDataset};
use crate::engine::editing::{self, MeasureOptions, Method};
use crate::engine::eval::{EngineBackend, EvalError};
use crate::engine::worker::{EngineError, Lane, ModelView, Work};
use crate::store::JobRow;

/// Most edits in one sweep.
pub const MAX_SWEEP_EDITS: i64 = 10_000;
/// Most checkpoints in one sweep.
pub const MAX_CHECKPOINTS: usize = 64;

/// What `POST /v1/sweeps` asks for.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSweep {
    /// Editing method (`GET /v1/methods`).
    #[schema(example = "rome")]
    pub method: String,
    /// `counterfact` or `zsre`: its first `n_edits` records are applied in order.
    #[schema(example = "counterfact")]
    pub dataset: String,
    /// Edits to apply, 1 to 10000 (and at most the dataset's records).
    #[schema(minimum = 1, maximum = 10000)]
    pub n_edits: i64,
    /// Numbers of edits after which the tasks run, increasing, each at most `n_edits`
    /// (0 = the base model), at most 64.
    #[schema(example = json!([0, 1, 2, 5, 10]))]
    pub checkpoints: Vec<i64>,
    /// Benchmark tasks run at every checkpoint, as in `POST /v1/evaluations`.
    pub tasks: Vec<String>,
    #[schema(minimum = 1, maximum = 100000)]
    pub limit: Option<i64>,
    #[schema(minimum = 0, maximum = 32)]
    pub num_fewshot: Option<i64>,
    pub seed: Option<u64>,
    /// Overrides of the method's defaults.
    #[schema(value_type = Option<Object>)]
    pub hparams: Option<Value>,
}

/// A validated sweep, as stored in the job's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    pub method: String,
    pub dataset: EditDataset,
    pub n_edits: usize,
    pub checkpoints: Vec<usize>,
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    pub seed: Option<u64>,
    pub hparams: Value,
}

/// One finished checkpoint: a point of every curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CurveRow {
    /// Edits applied before this checkpoint.
    pub n_edits: usize,
    /// The session version evaluated.
    pub version: u64,
    /// Retention: every edit so far measured again on this checkpoint's model (reliability,
    /// generalization, locality against the base model, …), averaged over the edits.
    pub edit: BTreeMap<String, f64>,
    /// The same metrics as each edit's route reported them right after it was applied,
    /// averaged over the edits so far (what the edit achieved, before later edits).
    #[serde(default)]
    pub edit_at_apply: BTreeMap<String, f64>,
    /// Per task, its metrics (standard errors left out; the full results are not kept).
    #[schema(value_type = Object)]
    pub tasks: BTreeMap<String, BTreeMap<String, f64>>,
    pub finished_at: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Sweep {
    pub id: String,
    pub status: JobStatus,
    pub method: String,
    pub dataset: EditDataset,
    pub n_edits: usize,
    pub checkpoints: Vec<usize>,
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    pub seed: Option<u64>,
    #[schema(value_type = Object)]
    pub hparams: Value,
    /// The session the sweep edits (created when it starts).
    pub session: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Edits applied plus checkpoints evaluated, of `n_edits` + checkpoints.
    pub progress: JobProgress,
    /// The finished checkpoints, in order.
    pub curve: Vec<CurveRow>,
    pub attempts: u32,
    pub cancel_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Jobs {
    /// Validates and queues a sweep; nothing is stored when a field is invalid.
    pub async fn submit_sweep(&self, tenant: &str, req: NewSweep) -> Result<Sweep, JobError> {
        let method: Method = req
            .method
            .parse()
            .map_err(|e: editing::EditError| invalid("method", e.to_string()))?;
        let dataset: EditDataset = req
            .dataset
            .parse()
            .map_err(|e: editing::EditError| invalid("dataset", e.to_string()))?;
        if !(1..=MAX_SWEEP_EDITS).contains(&req.n_edits) {
            return Err(invalid(
                "n_edits",
                format!("must be 1 to {MAX_SWEEP_EDITS}. Given: {}", req.n_edits),
            ));
        }
        let n_edits = req.n_edits as usize;
        if req.checkpoints.is_empty() || req.checkpoints.len() > MAX_CHECKPOINTS {
            return Err(invalid(
                "checkpoints",
                format!(
                    "must hold 1 to {MAX_CHECKPOINTS} checkpoints. Given: {}",
                    req.checkpoints.len()
                ),
            ));
        }
        let mut checkpoints = Vec::with_capacity(req.checkpoints.len());
        for (i, c) in req.checkpoints.iter().enumerate() {
            let prev = checkpoints.last().map(|p| *p as i64);
            if *c < 0 || *c > req.n_edits || prev.is_some_and(|p| *c <= p) {
                return Err(invalid(
                    format!("checkpoints[{i}]"),
                    format!("must be above the previous checkpoint and at most n_edits ({n_edits}). Given: {c}"),
                ));
            }
            checkpoints.push(*c as usize);
        }
        let tasks = check_tasks(&req.tasks)?;
        let limit = check_limit(req.limit)?;
        let num_fewshot = check_fewshot(req.num_fewshot)?;
        let hparams = req.hparams.unwrap_or(Value::Null);
        editing::hparams::resolve(method, self.engine.spec(), &hparams).map_err(|e| match e {
            editing::EditError::Invalid { field, message } => JobError::Invalid { field, message },
            other => invalid("hparams", other.to_string()),
        })?;
        let dir = self.cfg.data_dir.clone().ok_or(JobError::NoData)?;
        let available = load_records(dataset, dir.clone(), n_edits)
            .await
            .map_err(|e| invalid("dataset", e))?
            .len();
        if available < n_edits {
            return Err(invalid(
                "n_edits",
                format!(
                    "{} has only {available} records. Given: {n_edits}",
                    dataset.name()
                ),
            ));
        }
        let spec = SweepSpec {
            method: method.name().to_string(),
            dataset,
            n_edits,
            checkpoints,
            tasks,
            limit,
            num_fewshot,
            seed: req.seed,
            hparams,
        };
        // Every task's requests are built once here, so a bad option is a 422 now.
        count_requests(&spec.tasks, eval_spec(&spec, "", 0).options(), dir).await?;
        let total = (spec.n_edits + spec.checkpoints.len()) as u64;
        let row = self.insert(tenant, SWEEP, json(&spec), total).await?;
        tracing::info!(job = %row.id, method = %spec.method, dataset = spec.dataset.name(),
            n_edits, checkpoints = ?spec.checkpoints, "sweep queued");
        self.to_sweep(row)
    }

    pub async fn get_sweep(&self, tenant: &str, id: &str) -> Result<Sweep, JobError> {
        let row = self.row(tenant, SWEEP, id).await?;
        self.to_sweep(row)
    }

    /// A page of the tenant's sweeps, oldest first, and their number.
    pub async fn list_sweeps(
        &self,
        tenant: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<Sweep>, u64), JobError> {
        let (rows, total) = self
            .store
            .jobs_page(
                tenant,
                SWEEP,
                offset.min(i64::MAX as u64) as i64,
                limit as i64,
            )
            .await?;
        let sweeps = rows
            .into_iter()
            .map(|r| self.to_sweep(r))
            .collect::<Result<_, _>>()?;
        Ok((sweeps, total.max(0) as u64))
    }

    fn to_sweep(&self, row: JobRow) -> Result<Sweep, JobError> {
        let corrupt = |msg: String| JobError::Corrupt {
            id: row.id.clone(),
            msg,
        };
        let spec: SweepSpec =
            serde_json::from_str(&row.spec).map_err(|e| corrupt(format!("spec: {e}")))?;
        let status = JobStatus::parse(&row.status)
            .ok_or_else(|| corrupt(format!("status `{}`", row.status)))?;
        let progress: JobProgress = row
            .progress
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(format!("progress: {e}")))?
            .unwrap_or_default();
        let rec: Record = row
            .result
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(format!("result: {e}")))?
            .unwrap_or_default();
        let cancel_requested = status == JobStatus::Running
            && self
                .current()
                .as_ref()
                .is_some_and(|(id, f)| *id == row.id && f.load(Ordering::Relaxed));
        Ok(Sweep {
            id: row.id,
            status,
            method: spec.method,
            dataset: spec.dataset,
            n_edits: spec.n_edits,
            checkpoints: spec.checkpoints,
            tasks: spec.tasks,
            limit: spec.limit,
            num_fewshot: spec.num_fewshot,
            seed: spec.seed,
            hparams: spec.hparams,
            session: rec.session,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            progress,
            curve: rec.curve,
            attempts: rec.attempts,
            cancel_requested,
            error: rec.error,
        })
    }
}

/// The evaluation a checkpoint runs.
fn eval_spec(s: &SweepSpec, session: &str, version: u64) -> EvaluationSpec {
    EvaluationSpec {
        session: session.to_string(),
        version,
        tasks: s.tasks.clone(),
        limit: s.limit,
        num_fewshot: s.num_fewshot,
        seed: s.seed,
    }
}

/// The first `n` records' edit requests (off the async runtime: the files are megabytes).
async fn load_records(
    ds: EditDataset,
    dir: PathBuf,
    n: usize,
) -> Result<Vec<editing::EditRequest>, String> {
    tokio::task::spawn_blocking(move || {
        datasets::load(ds, &dir)
            .map(|r| r.into_iter().take(n).map(|r| r.request).collect())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

fn backend(e: impl std::fmt::Display) -> EvalError {
    EvalError::Backend(e.to_string())
}

/// Runs (or resumes) a sweep. The outer error is the store's (the job stays running and is
/// retried); the inner result is the sweep's outcome.
pub(super) async fn run(
    jobs: &Jobs,
    row: &JobRow,
    rec: &mut Record,
    progress: &mut JobProgress,
    flag: &Arc<AtomicBool>,
) -> Result<Result<(), EvalError>, JobError> {
    let spec: SweepSpec = match serde_json::from_str(&row.spec) {
        Ok(s) => s,
        Err(e) => return Ok(Err(backend(format!("the stored spec is unreadable: {e}")))),
    };
    let Ok(method) = spec.method.parse::<Method>() else {
        return Ok(Err(backend(format!("unknown method `{}`", spec.method))));
    };
    let Some(dir) = jobs.cfg.data_dir.clone() else {
        return Ok(Err(backend(JobError::NoData)));
    };
    let tenant = row.tenant.as_str();
    let sid = match &rec.session {
        Some(s) => s.clone(),
        None => match jobs
            .sessions
            .create(tenant, Some(format!("sweep {}", row.id)), None)
            .await
        {
            Ok(s) => {
                rec.session = Some(s.id.clone());
                jobs.store
                    .update_job(&row.id, &json(progress), Some(&json(rec)))
                    .await?;
                s.id
            }
            Err(e) => return Ok(Err(backend(e))),
        },
    };
    let records = match load_records(spec.dataset, dir.clone(), spec.n_edits).await {
        Ok(r) => r,
        Err(e) => return Ok(Err(backend(e))),
    };
    let mut applied = match jobs.sessions.get(tenant, &sid) {
        Ok(s) => s.edit_count as usize,
        Err(e) => return Ok(Err(backend(format!("the sweep's session: {e}")))),
    };
    tracing::info!(session = %sid, applied, finished = rec.curve.len(), "sweep started");
    progress.total = (spec.n_edits + spec.checkpoints.len()) as u64;
    let t0 = Instant::now();
    let done0 = (applied + rec.curve.len()) as u64;
    let report = |progress: &mut JobProgress, applied: usize, rows: usize| {
        progress.done = (applied + rows) as u64;
        let ran = progress.done.saturating_sub(done0);
        progress.eta_seconds = (ran > 0).then(|| {
            t0.elapsed().as_secs_f64() / ran as f64
                * progress.total.saturating_sub(progress.done) as f64
        });
    };
    for &c in &spec.checkpoints {
        if rec.curve.iter().any(|r| r.n_edits == c) {
            continue;
        }
        while applied < c {
            if flag.load(Ordering::Relaxed) {
                return Ok(Err(EvalError::Cancelled));
            }
            let req = records[applied].clone();
            let engine = jobs.engine.clone();
            let hparams = spec.hparams.clone();
            let patience = jobs.cfg.patience;
            let r = jobs
                .sessions
                .apply_edit(
                    tenant,
                    &sid,
                    method,
                    vec![req.clone()],
                    move |view| async move {
                        let (tx, rx) = oneshot::channel();
                        engine
                            .submit_waiting(
                                Lane::Edit,
                                Work::Edit {
                                    view,
                                    method,
                                    requests: vec![req],
                                    hparams,
                                    opts: MeasureOptions::default(),
                                    reply: tx,
                                },
                                patience,
                            )
                            .await?;
                        rx.await.map_err(|_| {
                            EngineError::Failed("the engine dropped the edit".into())
                        })?
                    },
                )
                .await;
            if let Err(e) = r {
                return Ok(Err(backend(format!("edit {}: {e}", applied + 1))));
            }
            applied += 1;
            report(progress, applied, rec.curve.len());
            jobs.store
                .update_job(&row.id, &json(progress), None)
                .await?;
        }
        if flag.load(Ordering::Relaxed) {
            return Ok(Err(EvalError::Cancelled));
        }
        let view = match jobs.sessions.view(tenant, &sid, None) {
            Ok(v) => v,
            Err(e) => return Ok(Err(backend(format!("the sweep's session: {e}")))),
        };
        let version = view.version;
        let edit_at_apply = match edit_means(jobs, tenant, &sid, version) {
            Ok(m) => m,
            Err(e) => return Ok(Err(backend(e))),
        };
        let edit = match retention(jobs, view.clone(), records[..c].to_vec()).await {
            Ok(m) => m,
            Err(e) => return Ok(Err(e)),
        };
        if flag.load(Ordering::Relaxed) {
            return Ok(Err(EvalError::Cancelled));
        }
        let results = match evaluate_at(
            jobs,
            view,
            &eval_spec(&spec, &sid, version),
            dir.clone(),
            flag,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let tasks = results
            .into_iter()
            .map(|(t, v)| (t, headline_metrics(&v)))
            .collect();
        rec.curve.push(CurveRow {
            n_edits: c,
            version,
            edit,
            edit_at_apply,
            tasks,
            finished_at: now(),
        });
        tracing::info!(n_edits = c, version, "checkpoint finished");
        report(progress, applied, rec.curve.len());
        jobs.store
            .update_job(&row.id, &json(progress), Some(&json(rec)))
            .await?;
    }
    Ok(Ok(()))
}

/// Numeric metrics of a task result, standard errors left out.
pub fn headline_metrics(v: &Value) -> BTreeMap<String, f64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !k.ends_with("_stderr"))
                .filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)))
                .collect()
        })
        .unwrap_or_default()
}

/// Means of the post-edit metrics of versions 1..=version (a sweep's session is linear: one
/// version per edit).
fn edit_means(
    jobs: &Jobs,
    tenant: &str,
    sid: &str,
    version: u64,
) -> Result<BTreeMap<String, f64>, String> {
    let mut reports = Vec::new();
    for v in 1..=version {
        if let Some(summary) = jobs
            .sessions
            .version_summary(tenant, sid, v)
            .map_err(|e| e.to_string())?
        {
            reports.extend(summary.metrics.as_array().into_iter().flatten().cloned());
        }
    }
    Ok(mean_post_metrics(&reports))
}

/// The requests' metrics re-measured on `view` (on a thread of its own: the engine backend
/// blocks), averaged.
async fn retention(
    jobs: &Jobs,
    view: ModelView,
    requests: Vec<editing::EditRequest>,
) -> Result<BTreeMap<String, f64>, EvalError> {
    if requests.is_empty() {
        return Ok(BTreeMap::new());
    }
    let b = EngineBackend::new(jobs.engine.clone(), view, jobs.cfg.patience);
    let metrics = tokio::task::spawn_blocking(move || b.remeasure(&requests))
        .await
        .map_err(backend)??;
    Ok(mean_metrics(
        &metrics
            .iter()
            .map(|m| serde_json::to_value(m).unwrap_or_default())
            .collect::<Vec<_>>(),
    ))
}

/// Means of the numeric `post` metrics of edit reports (as JSON), each over the reports that
/// have it.
pub fn mean_post_metrics(reports: &[Value]) -> BTreeMap<String, f64> {
    let posts: Vec<Value> = reports.iter().map(|r| r["post"].clone()).collect();
    mean_metrics(&posts)
}

/// Means of the numeric fields of metric objects (as JSON), each over the objects that have it.
pub fn mean_metrics(metrics: &[Value]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for m in metrics {
        for (k, x) in m.as_object().into_iter().flatten() {
            if let Some(f) = x.as_f64() {
                let e = sums.entry(k.clone()).or_default();
                e.0 += f;
                e.1 += 1;
            }
        }
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

/// The tasks on one view, on a thread of their own; each task's result as JSON.
async fn evaluate_at(
    jobs: &Jobs,
    view: ModelView,
    spec: &EvaluationSpec,
    dir: PathBuf,
    flag: &Arc<AtomicBool>,
) -> Result<BTreeMap<String, Value>, EvalError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let engine = jobs.engine.clone();
    let patience = jobs.cfg.patience;
    let cancel = flag.clone();
    let spec = spec.clone();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("emend-sweep-eval".into())
        .spawn(move || {
            let _s = span.entered();
            let finished = BTreeSet::new();
            let r = eval::run(
                eval::Run {
                    engine,
                    view,
                    spec: &spec,
                    data_dir: &dir,
                    finished: &finished,
                    cancel: &cancel,
                    patience,
                },
                &tx,
            );
            let _ = tx.send(eval::Event::Finished(r));
        })
        .map_err(|e| backend(format!("could not start the evaluation thread: {e}")))?;
    let mut results = BTreeMap::new();
    loop {
        match rx.recv().await {
            Some(eval::Event::TaskDone { task, result }) => {
                results.insert(task, result);
            }
            Some(eval::Event::Progress { .. }) => {}
            Some(eval::Event::Finished(r)) => return r.map(|()| results),
            None => return Err(backend("the evaluation thread stopped without an answer")),
        }
    }
}

/// Column names of a curve: `n_edits`, `version`, `edit.<metric>`, `<task>.<metric>`.
pub fn curve_columns(rows: &[CurveRow]) -> Vec<String> {
    let mut edit = BTreeSet::new();
    let mut at_apply = BTreeSet::new();
    let mut tasks = BTreeSet::new();
    for r in rows {
        edit.extend(r.edit.keys().map(|k| format!("edit.{k}")));
        at_apply.extend(r.edit_at_apply.keys().map(|k| format!("edit_at_apply.{k}")));
        for (t, m) in &r.tasks {
            tasks.extend(m.keys().map(|k| format!("{t}.{k}")));
        }
    }
    let mut cols = vec!["n_edits".to_string(), "version".to_string()];
    cols.extend(edit);
    cols.extend(at_apply);
    cols.extend(tasks);
    cols
}

fn cell(r: &CurveRow, col: &str) -> Option<f64> {
    match col {
        "n_edits" => Some(r.n_edits as f64),
        "version" => Some(r.version as f64),
        _ => match col.strip_prefix("edit.") {
            Some(k) => r.edit.get(k).copied(),
            None if col.starts_with("edit_at_apply.") => {
                r.edit_at_apply.get(&col["edit_at_apply.".len()..]).copied()
            }
            None => {
                let (t, m) = col.split_once('.')?;
                r.tasks.get(t)?.get(m).copied()
            }
        },
    }
}

/// The curve as CSV, one row per checkpoint (empty cells for missing values).
pub fn curve_csv(rows: &[CurveRow]) -> String {
    let cols = curve_columns(rows);
    let mut out = cols.join(",");
    out.push('\n');
    for r in rows {
        let line: Vec<String> = cols
            .iter()
            .map(|c| cell(r, c).map(|v| v.to_string()).unwrap_or_default())
            .collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// The curve as JSON: the columns and one array of values (or null) per checkpoint.
pub fn curve_json(rows: &[CurveRow]) -> Value {
    let cols = curve_columns(rows);
    let data: Vec<Vec<Option<f64>>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(r, c)).collect())
        .collect();
    serde_json::json!({"columns": cols, "rows": data})
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG chart, one line per metric against the number of edits, like the paper's figures.
/// Only metrics on a 0–1 scale (accuracies, edit metrics) share the axis; perplexities are in
/// the CSV and JSON.
pub fn curve_svg(rows: &[CurveRow], title: &str) -> String {
    const W: f64 = 760.0;
    const H: f64 = 440.0;
    const L: f64 = 60.0;
    const R: f64 = 230.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    const COLORS: [&str; 10] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    let cols = curve_columns(rows);
    let series: Vec<&String> = cols
        .iter()
        .skip(2)
        .filter(|c| {
            let vals: Vec<f64> = rows.iter().filter_map(|r| cell(r, c)).collect();
            !vals.is_empty() && vals.iter().all(|v| (0.0..=1.0).contains(v))
        })
        .collect();
    let max_x = rows.iter().map(|r| r.n_edits).max().unwrap_or(0).max(1) as f64;
    let x = |n: f64| L + n / max_x * (W - L - R);
    let y = |v: f64| H - B - v * (H - T - B);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{L}\" y=\"24\" font-size=\"15\">{}</text>\n",
        xml_escape(title)
    );
    // axes, y grid and ticks
    s.push_str(&format!(
        "<line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{}\" stroke=\"black\"/>\n",
        H - B,
        W - R,
        H - B,
        H - B
    ));
    for i in 0..=4 {
        let v = i as f64 / 4.0;
        s.push_str(&format!(
            "<line x1=\"{L}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\n<text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
            y(v),
            W - R,
            L - 6.0,
            y(v) + 4.0
        ));
    }
    for r in rows {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            x(r.n_edits as f64),
            H - B + 18.0,
            r.n_edits
        ));
    }
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">number of edits</text>\n",
        (L + W - R) / 2.0,
        H - 12.0
    ));
    for (i, c) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = rows
            .iter()
            .filter_map(|r| cell(r, c).map(|v| format!("{:.1},{:.1}", x(r.n_edits as f64), y(v))))
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        ));
        for p in &pts {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            s.push_str(&format!(
                "<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n"
            ));
        }
        let ly = T + 10.0 + i as f64 * 18.0;
        s.push_str(&format!(
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>\n<text x=\"{2}\" y=\"{3}\">{4}</text>\n",
            W - R + 16.0,
            W - R + 40.0,
            W - R + 46.0,
            ly + 4.0,
            xml_escape(c)
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, rel: f64, acc: f64, ppl: f64) -> CurveRow {
        CurveRow {
            n_edits: n,
            version: n as u64,
            edit: if n == 0 {
                BTreeMap::new()
            } else {
                [("reliability".to_string(), rel)].into()
            },
            edit_at_apply: BTreeMap::new(),
            tasks: [(
                "arc_easy".to_string(),
                [("acc".to_string(), acc), ("perplexity".to_string(), ppl)].into(),
            )]
            .into(),
            finished_at: "t".into(),
        }
    }

    #[test]
    fn curves_render_as_csv_json_and_svg() {
        let rows = [row(0, 0.0, 0.5, 30.0), row(2, 0.75, 0.25, 31.5)];
        assert_eq!(
            curve_csv(&rows),
            "n_edits,version,edit.reliability,arc_easy.acc,arc_easy.perplexity\n\
             0,0,,0.5,30\n2,2,0.75,0.25,31.5\n"
        );
        let j = curve_json(&rows);
        assert_eq!(j["rows"][0][2], Value::Null);
        assert_eq!(j["rows"][1][3], 0.25);
        let svg = curve_svg(&rows, "ft-m <counterfact>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("ft-m &lt;counterfact&gt;"));
        // two 0–1 series drawn (perplexity is off that scale)
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.contains(">arc_easy.acc<") && !svg.contains(">arc_easy.perplexity<"));
    }
}
