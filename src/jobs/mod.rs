//! Jobs: evaluations of a session version (`eval.rs`) and sweeps (`sweep*.rs`), queued in the
//! store and run one at a time (the model is one), resumable and cancellable, with progress and
//! per-task results as they finish. Both reach the engine through its typed calls, evaluation
//! chunks through [`EngineBackend`].
//!
//! A job's row is the truth: the runner moves it queued → running → succeeded | failed |
//! cancelled with conditional updates, writes each task's result when the task ends, and at
//! start picks up a job an earlier process left running, skipping the tasks it finished.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;
use utoipa::ToSchema;

use crate::engine::eval::{EvalError, EvalOptions};
use crate::engine::worker::Engine;
use crate::metrics::Metrics;
use crate::sessions::{SessionError, Sessions};
use crate::store::{JobRow, Store, StoreError};

pub mod chart;
mod checks;
pub mod curve;
mod eval;
pub mod sweep;
mod sweep_job;
pub mod sweep_loop;
mod training;

use checks::{check_fewshot, check_limit, check_tasks, count_requests};

pub use crate::engine::worker::EngineBackend;
pub use sweep::{CurveRow, NewSweep, Sweep};
pub use training::Training;
use training::TRAINING;

/// Most tasks in one evaluation.
pub const MAX_TASKS: usize = 32;
/// Largest `limit` (documents per task); the largest benchmark here has about 14k.
pub const MAX_LIMIT: i64 = 100_000;
/// Largest `num_fewshot`: beyond this a prompt no longer fits a small model's context.
pub const MAX_FEWSHOT: i64 = 32;
/// How often a running job's progress is written (task results are written at once).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

const KIND: &str = "evaluation";
const SWEEP: &str = "sweep";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// What `POST /v1/evaluations` asks for.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvaluation {
    /// One of your sessions.
    pub session: String,
    /// The session version to evaluate; omitted = its current version when the job is
    /// submitted (pinned then: later edits do not change what the job evaluates).
    #[schema(minimum = 0)]
    pub version: Option<i64>,
    /// Task names (`emend eval --list`), 1 to 32, each at most once.
    #[schema(example = json!(["arc_easy", "piqa"]))]
    pub tasks: Vec<String>,
    /// Documents per task (per subject for MMLU, per task for BBH), 1 to 100000.
    #[schema(minimum = 1, maximum = 100000)]
    pub limit: Option<i64>,
    /// Few-shot examples instead of each task's default, 0 to 32.
    #[schema(minimum = 0, maximum = 32)]
    pub num_fewshot: Option<i64>,
    /// With `limit`: evaluate a seeded sample of documents instead of the first ones.
    pub seed: Option<u64>,
}

/// A validated evaluation, as stored in the job's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationSpec {
    pub session: String,
    pub version: u64,
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    pub seed: Option<u64>,
}

impl EvaluationSpec {
    pub fn options(&self) -> EvalOptions {
        EvalOptions {
            limit: self.limit,
            num_fewshot: self.num_fewshot,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobProgress {
    /// Distinct requests answered.
    pub done: u64,
    /// Distinct requests of the whole job.
    pub total: u64,
    /// Estimated seconds left, from this run's pace; absent before the first chunk and once
    /// the job ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FinishedTask {
    pub task: String,
    pub finished_at: String,
    /// The run of the job (1, or more after restarts) that computed it.
    pub attempt: u32,
}

/// A job row decoded: its spec as `S` and what every kind shares.
struct Decoded<S> {
    spec: S,
    status: JobStatus,
    progress: JobProgress,
    rec: Record,
    cancel_requested: bool,
}

/// The `result` column: what finished so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    #[serde(default)]
    results: BTreeMap<String, Value>,
    #[serde(default)]
    finished_tasks: Vec<FinishedTask>,
    attempts: u32,
    error: Option<String>,
    /// A single-method sweep's session, as sweeps before `methods` stored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    /// A sweep's sessions by method, each created when its method starts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    sessions: BTreeMap<String, String>,
    /// A sweep's finished checkpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    curve: Vec<CurveRow>,
    /// A training's step, validation curve and artefact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    training: Option<training::TrainingRecord>,
}

/// An evaluation job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Job {
    pub id: String,
    #[schema(example = "evaluation")]
    pub kind: String,
    pub status: JobStatus,
    pub session: String,
    /// The version evaluated (pinned at submit).
    pub version: u64,
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    pub seed: Option<u64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub progress: JobProgress,
    /// Results of the tasks finished so far, by task: metrics (`acc`, `acc_stderr`,
    /// `acc_norm`, `perplexity`, …) and `meta` (task version, few-shot count and seed,
    /// limit, seed, documents, data files with their sha256). Left out of listings.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub results: Option<BTreeMap<String, Value>>,
    /// Tasks in the order they finished.
    pub finished_tasks: Vec<FinishedTask>,
    /// Runs of this job so far (a restart resumes it as a new run).
    pub attempts: u32,
    /// A cancel was asked for and takes effect after the chunk in hand.
    pub cancel_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A request field is invalid; `field` names it as the request spells it (`tasks[1]`).
    #[error("`{field}` {message}")]
    Invalid { field: String, message: String },
    #[error("evaluation `{0}` does not exist")]
    NotFound(String),
    #[error("evaluation `{id}` has already {}", status.as_str())]
    Finished { id: String, status: JobStatus },
    #[error("{0} evaluations are already queued; retry later")]
    Full(usize),
    #[error("the server has no dataset directory (configure `data_dir`)")]
    NoData,
    #[error("stored job `{id}` is unreadable: {msg}")]
    Corrupt { id: String, msg: String },
    #[error(transparent)]
    Session(SessionError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> JobError {
    JobError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub struct JobsConfig {
    /// Where the benchmark datasets are; `None`: every evaluation is refused.
    pub data_dir: Option<PathBuf>,
    /// How long a chunk waits for room in the engine's evaluation lane.
    pub patience: Duration,
    /// Queued jobs before submissions answer 429.
    pub max_queued: usize,
    /// Training runs' checkpoints, one folder per job.
    pub trainings_dir: PathBuf,
    /// Trained editors (the engine's artefact folder).
    pub editors_dir: PathBuf,
}

pub struct Jobs {
    store: Store,
    sessions: Arc<Sessions>,
    engine: Engine,
    metrics: Arc<Metrics>,
    cfg: JobsConfig,
    wake: Notify,
    /// The running job and its cancel flag. Set before the job is marked running, so a
    /// cancel that finds it no longer queued always finds the flag.
    current: Mutex<Option<(String, Arc<AtomicBool>)>>,
}

impl Jobs {
    pub fn new(
        store: Store,
        sessions: Arc<Sessions>,
        engine: Engine,
        metrics: Arc<Metrics>,
        cfg: JobsConfig,
    ) -> Arc<Self> {
        // Every series exists from the start, so dashboards and alerts see zeros, not gaps.
        for kind in [KIND, SWEEP, TRAINING] {
            for s in JobStatus::ALL {
                metrics.jobs.with_label_values(&[kind, s.as_str()]);
            }
        }
        for s in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            metrics
                .eval_job_duration_seconds
                .with_label_values(&[s.as_str()]);
        }
        Arc::new(Self {
            store,
            sessions,
            engine,
            metrics,
            cfg,
            wake: Notify::new(),
            current: Mutex::new(None),
        })
    }

    /// Starts the runner on the current tokio runtime: it resumes what an earlier process left
    /// queued or running, then waits for submissions.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.run().await });
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<(String, Arc<AtomicBool>)>> {
        // Only whole values are ever stored, so a poisoned lock's data is still good.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validates and queues an evaluation; nothing is stored when a field is invalid.
    pub async fn submit(&self, tenant: &str, req: NewEvaluation) -> Result<Job, JobError> {
        let version = match req.version {
            Some(v) if v < 0 => {
                return Err(invalid("version", format!("must be 0 or more. Given: {v}")))
            }
            v => v.map(|v| v as u64),
        };
        let view = self
            .sessions
            .view(tenant, &req.session, version)
            .map_err(|e| match e {
                SessionError::NotFound(_) => invalid(
                    "session",
                    format!("is not one of your sessions: `{}`", req.session),
                ),
                SessionError::VersionNotFound { .. } => invalid("version", e.to_string()),
                other => JobError::Session(other),
            })?;
        let tasks = check_tasks(&req.tasks)?;
        let limit = check_limit(req.limit)?;
        let num_fewshot = check_fewshot(req.num_fewshot)?;
        let dir = self.cfg.data_dir.clone().ok_or(JobError::NoData)?;
        let spec = EvaluationSpec {
            session: req.session,
            version: view.version,
            tasks,
            limit,
            num_fewshot,
            seed: req.seed,
        };
        let total = count_requests(&spec.tasks, spec.options(), dir).await?;
        let row = self.insert(tenant, KIND, json(&spec), total).await?;
        tracing::info!(job = %row.id, session = %spec.session, version = spec.version,
            tasks = ?spec.tasks, requests = total, "evaluation queued");
        self.to_job(row, true)
    }

    /// Stores a new queued job and wakes the runner; 429 when the queue is full.
    async fn insert(
        &self,
        tenant: &str,
        kind: &str,
        spec: String,
        total: u64,
    ) -> Result<JobRow, JobError> {
        let queued = self.store.queued_jobs().await?;
        if queued >= self.cfg.max_queued as i64 {
            return Err(JobError::Full(queued.max(0) as usize));
        }
        let row = JobRow {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: tenant.to_string(),
            kind: kind.into(),
            spec,
            status: JobStatus::Queued.as_str().into(),
            progress: Some(json(&JobProgress {
                done: 0,
                total,
                eta_seconds: None,
            })),
            result: Some(json(&Record::default())),
            created_at: now(),
            started_at: None,
            finished_at: None,
        };
        self.store.insert_job(&row).await?;
        self.refresh_gauge().await;
        self.wake.notify_one();
        Ok(row)
    }

    /// What every kind of job row holds besides its spec: status, progress, the result record
    /// and whether a cancel of the running job is pending; the spec parsed as `S`.
    fn decode<S: serde::de::DeserializeOwned>(&self, row: &JobRow) -> Result<Decoded<S>, JobError> {
        let corrupt = |msg: String| JobError::Corrupt {
            id: row.id.clone(),
            msg,
        };
        let spec: S = serde_json::from_str(&row.spec).map_err(|e| corrupt(format!("spec: {e}")))?;
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
        Ok(Decoded {
            spec,
            status,
            progress,
            rec,
            cancel_requested,
        })
    }

    fn to_job(&self, row: JobRow, with_results: bool) -> Result<Job, JobError> {
        let Decoded {
            spec,
            status,
            progress,
            rec,
            cancel_requested,
        } = self.decode::<EvaluationSpec>(&row)?;
        Ok(Job {
            id: row.id,
            kind: row.kind,
            status,
            session: spec.session,
            version: spec.version,
            tasks: spec.tasks,
            limit: spec.limit,
            num_fewshot: spec.num_fewshot,
            seed: spec.seed,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            progress,
            results: with_results.then_some(rec.results),
            finished_tasks: rec.finished_tasks,
            attempts: rec.attempts,
            cancel_requested,
            error: rec.error,
        })
    }

    async fn row(&self, tenant: &str, kind: &str, id: &str) -> Result<JobRow, JobError> {
        match self.store.job(id).await? {
            // Other tenants' jobs are indistinguishable from missing ones.
            Some(r) if r.tenant == tenant && r.kind == kind => Ok(r),
            _ => Err(JobError::NotFound(id.to_string())),
        }
    }

    pub async fn get(&self, tenant: &str, id: &str) -> Result<Job, JobError> {
        let row = self.row(tenant, KIND, id).await?;
        self.to_job(row, true)
    }

    /// A page of the tenant's evaluations, oldest first (without results), and their number.
    pub async fn list(
        &self,
        tenant: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<Job>, u64), JobError> {
        let (rows, total) = self
            .store
            .jobs_page(
                tenant,
                KIND,
                offset.min(i64::MAX as u64) as i64,
                limit as i64,
            )
            .await?;
        let jobs = rows
            .into_iter()
            .map(|r| self.to_job(r, false))
            .collect::<Result<_, _>>()?;
        Ok((jobs, total.max(0) as u64))
    }

    /// Cancels a job of `kind` ("evaluation", "sweep"): a queued one at once, a running one
    /// after the chunk in hand. Answers whether it is cancelled already.
    pub async fn cancel(&self, tenant: &str, kind: &str, id: &str) -> Result<bool, JobError> {
        let row = self.row(tenant, kind, id).await?;
        let status = JobStatus::parse(&row.status).ok_or_else(|| JobError::Corrupt {
            id: id.to_string(),
            msg: format!("status `{}`", row.status),
        })?;
        match status {
            JobStatus::Cancelled => return Ok(true),
            s if s.is_terminal() => {
                return Err(JobError::Finished {
                    id: id.to_string(),
                    status: s,
                })
            }
            _ => {}
        }
        if self.flag_current(id) {
            tracing::info!(job = %id, "cancel requested");
            return Ok(false);
        }
        if self.store.cancel_queued_job(id, &now()).await? {
            tracing::info!(job = %id, "cancelled before it started");
            self.refresh_gauge().await;
            return Ok(true);
        }
        // It started (or ended) between the read and the update: the runner registered its
        // flag before marking it running.
        self.flag_current(id);
        let row = self.row(tenant, kind, id).await?;
        Ok(JobStatus::parse(&row.status).is_some_and(JobStatus::is_terminal))
    }

    fn flag_current(&self, id: &str) -> bool {
        match self.current().as_ref() {
            Some((cid, flag)) if cid == id => {
                flag.store(true, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Sets the jobs gauge from the store (each transition changes two series; recounting
    /// keeps it right across restarts and replicas).
    async fn refresh_gauge(&self) {
        match self.store.job_counts().await {
            Ok(counts) => {
                for kind in [KIND, SWEEP, TRAINING] {
                    for s in JobStatus::ALL {
                        let n = counts
                            .iter()
                            .filter(|(k, st, _)| k == kind && st == s.as_str())
                            .map(|c| c.2)
                            .sum();
                        self.metrics
                            .jobs
                            .with_label_values(&[kind, s.as_str()])
                            .set(n);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not count jobs"),
        }
    }

    async fn run(self: Arc<Self>) {
        self.refresh_gauge().await;
        loop {
            match self.store.next_job().await {
                Ok(Some(row)) => {
                    let id = row.id.clone();
                    if let Err(e) = self.run_job(row).await {
                        tracing::error!(job = %id, error = %e, "job runner error; retrying");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
                // A notification sent while no one waits is kept, so none is lost.
                Ok(None) => self.wake.notified().await,
                Err(e) => {
                    tracing::error!(error = %e, "job runner cannot read the store; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
            if !self.engine.is_running() {
                return;
            }
        }
    }

    async fn run_job(&self, row: JobRow) -> Result<(), JobError> {
        let flag = Arc::new(AtomicBool::new(false));
        *self.current() = Some((row.id.clone(), flag.clone()));
        let r = self.run_registered(row, &flag).await;
        *self.current() = None;
        r
    }

    async fn run_registered(&self, row: JobRow, flag: &Arc<AtomicBool>) -> Result<(), JobError> {
        let id = row.id.clone();
        let mut rec: Record = row
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or_default();
        let mut progress: JobProgress = row
            .progress
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or_default();
        rec.attempts += 1;
        let started_at = row.started_at.clone().unwrap_or_else(now);
        if !self.store.start_job(&id, &started_at, &json(&rec)).await? {
            return Ok(()); // cancelled before it started
        }
        self.refresh_gauge().await;
        if row.kind == TRAINING {
            let span = tracing::info_span!("training", job = %id, attempt = rec.attempts);
            let outcome = tracing::Instrument::instrument(
                training::run(self, &row, &mut rec, &mut progress, flag),
                span.clone(),
            )
            .await?;
            return self
                .conclude(&id, outcome, &started_at, progress, rec, &span)
                .await;
        }
        if row.kind == SWEEP {
            let span = tracing::info_span!("sweep", job = %id, attempt = rec.attempts);
            let outcome = tracing::Instrument::instrument(
                sweep_job::run(self, &row, &mut rec, &mut progress, flag),
                span.clone(),
            )
            .await?;
            return self
                .conclude(&id, outcome, &started_at, progress, rec, &span)
                .await;
        }
        self.run_evaluation(&row, rec, progress, &started_at, flag)
            .await
    }

    /// Ends a run with the status its outcome says, or leaves it running when the engine is
    /// shutting down (the next start resumes it).
    async fn conclude(
        &self,
        id: &str,
        outcome: Result<(), EvalError>,
        started_at: &str,
        mut progress: JobProgress,
        mut rec: Record,
        span: &tracing::Span,
    ) -> Result<(), JobError> {
        let status = match &outcome {
            Ok(()) => JobStatus::Succeeded,
            Err(EvalError::Cancelled) => JobStatus::Cancelled,
            Err(_) if !self.engine.is_running() => {
                // Shutting down: leave it running so that the next start resumes it.
                span.in_scope(|| tracing::info!("job interrupted by shutdown"));
                return Ok(());
            }
            Err(e) => {
                rec.error = Some(e.to_string());
                JobStatus::Failed
            }
        };
        if status == JobStatus::Succeeded {
            progress.done = progress.total;
        }
        span.in_scope(|| tracing::info!(status = status.as_str(), "job ended"));
        self.finish(id, status, started_at, progress, rec).await
    }

    async fn finish(
        &self,
        id: &str,
        status: JobStatus,
        started_at: &str,
        mut progress: JobProgress,
        rec: Record,
    ) -> Result<(), JobError> {
        progress.eta_seconds = None;
        let at = now();
        self.store
            .finish_job(id, status.as_str(), &at, &json(&progress), &json(&rec))
            .await?;
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(started_at) {
            let secs = (Utc::now() - t.with_timezone(&Utc)).num_milliseconds() as f64 / 1e3;
            self.metrics
                .eval_job_duration_seconds
                .with_label_values(&[status.as_str()])
                .observe(secs.max(0.0));
        }
        self.refresh_gauge().await;
        Ok(())
    }
}
