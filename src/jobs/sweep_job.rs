//! The service's front end of the sweep loop: each method on a session of its own, edits
//! through the engine's edit lane as the session's next versions, checkpoints evaluated by the
//! engine on its evaluation lane, progress and finished checkpoints written to the job's row as
//! they happen. A resumed sweep keeps its sessions and edits and goes on from the last finished
//! checkpoint.
use crate::canary::set::POOLED_ACC;
use crate::canary::{Budget, CanaryMode, CanarySettings};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::sweep::{eval_spec, load_records, CurveRow, SweepSpec};
use super::sweep_loop::{drive, Ended, Start, SweepFront};
use super::{eval, json, EvaluationSpec, JobError, JobProgress, Jobs, Record};
use crate::engine::editing::{EditMetrics, EditRequest, MeasureOptions, Method};
use crate::engine::eval::EvalError;
use crate::engine::worker::EngineBackend;
use crate::engine::worker::{Admission, ModelView};
use crate::sessions::Applied;
use crate::store::JobRow;

/// Why a run stops early: the store failed (the job stays running and is retried), or the
/// sweep itself did (its outcome).
enum Stop {
    Store(JobError),
    Sweep(EvalError),
}

impl From<JobError> for Stop {
    fn from(e: JobError) -> Self {
        Self::Store(e)
    }
}

impl From<crate::store::StoreError> for Stop {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Store(e.into())
    }
}

impl From<EvalError> for Stop {
    fn from(e: EvalError) -> Self {
        Self::Sweep(e)
    }
}

fn backend(e: impl std::fmt::Display) -> EvalError {
    EvalError::Backend(e.to_string())
}

/// Progress and ETA over the steps this run does (a resumed run's earlier steps don't count
/// toward the rate).
struct Clock {
    t0: Instant,
    done0: u64,
}

impl Clock {
    fn report(&self, progress: &mut JobProgress, done: u64) {
        progress.done = done;
        let ran = done.saturating_sub(self.done0);
        progress.eta_seconds = (ran > 0).then(|| {
            self.t0.elapsed().as_secs_f64() / ran as f64
                * progress.total.saturating_sub(done) as f64
        });
    }
}

/// Runs (or resumes) a sweep: each method in turn on its own session. The outer error is the
/// store's (the job stays running and is retried); the inner result is the sweep's outcome.
pub(super) async fn run(
    jobs: &Jobs,
    row: &JobRow,
    rec: &mut Record,
    progress: &mut JobProgress,
    flag: &Arc<AtomicBool>,
) -> Result<Result<(), EvalError>, JobError> {
    let prepared = match prepare(jobs, row, rec).await {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    progress.total = prepared.spec.total_steps();
    let Prepared {
        spec,
        methods,
        records,
        dir,
        done,
    } = prepared;
    let rows = rec.curve.clone();
    let mut front = JobFront {
        jobs,
        row,
        rec,
        progress,
        flag,
        spec: &spec,
        dir,
        session: String::new(),
        done,
        clock: Clock {
            t0: Instant::now(),
            done0: done,
        },
    };
    match drive(&mut front, &spec, &methods, &records, rows).await {
        Ok(Ended::Finished) => Ok(Ok(())),
        Ok(Ended::Cancelled) => Ok(Err(EvalError::Cancelled)),
        Err(Stop::Sweep(e)) => Ok(Err(e)),
        Err(Stop::Store(e)) => Err(e),
    }
}

/// What a run starts from.
struct Prepared {
    spec: SweepSpec,
    methods: Vec<Method>,
    records: Vec<EditRequest>,
    dir: PathBuf,
    /// Steps (edits and checkpoints) an earlier run did.
    done: u64,
}

async fn prepare(jobs: &Jobs, row: &JobRow, rec: &Record) -> Result<Prepared, EvalError> {
    let spec: SweepSpec = serde_json::from_str(&row.spec)
        .map_err(|e| backend(format!("the stored spec is unreadable: {e}")))?;
    let mut methods = Vec::new();
    for name in spec.methods() {
        let m: Method = name
            .parse()
            .map_err(|_| backend(format!("unknown method `{name}`")))?;
        methods.push(m);
    }
    let dir = jobs
        .cfg
        .data_dir
        .clone()
        .ok_or_else(|| backend(JobError::NoData))?;
    let records = load_records(spec.dataset, dir.clone(), spec.n_edits)
        .await
        .map_err(backend)?;
    let mut done = rec.curve.len() as u64;
    for m in &methods {
        if let Some(sid) = rec.session_of(m.name(), &spec.method) {
            let s = jobs
                .sessions
                .get(&row.tenant, &sid)
                .map_err(|e| backend(format!("the sweep's session: {e}")))?;
            done += s.edit_count;
        }
    }
    Ok(Prepared {
        spec,
        methods,
        records,
        dir,
        done,
    })
}

struct JobFront<'a> {
    jobs: &'a Jobs,
    row: &'a JobRow,
    rec: &'a mut Record,
    progress: &'a mut JobProgress,
    flag: &'a Arc<AtomicBool>,
    spec: &'a SweepSpec,
    dir: PathBuf,
    /// The current method's session.
    session: String,
    /// Edits applied plus checkpoints finished, over every method.
    done: u64,
    clock: Clock,
}

impl JobFront<'_> {
    fn tenant(&self) -> &str {
        &self.row.tenant
    }

    /// The method's session: the one an earlier run created, else a new one (recorded at once,
    /// so a restart finds it).
    async fn session_for(&mut self, name: &str) -> Result<String, Stop> {
        if let Some(s) = self.rec.session_of(name, &self.spec.method) {
            return Ok(s);
        }
        let s = self
            .jobs
            .sessions
            .create(
                &self.row.tenant,
                Some(format!("sweep {} {name}", self.row.id)),
                None,
                None,
            )
            .await
            .map_err(backend)?;
        self.rec.sessions.insert(name.to_string(), s.id.clone());
        self.jobs
            .store
            .update_job(&self.row.id, &json(self.progress), Some(&json(self.rec)))
            .await?;
        Ok(s.id)
    }
}

impl JobFront<'_> {
    /// The canary reading of a checkpoint as a task result: the probes' pooled accuracy and
    /// the drift from the base model (an empty budget: nothing is flagged).
    async fn canary(&self, version: &ModelView) -> Result<Value, Stop> {
        let failed = |m: String| Stop::Sweep(EvalError::Backend(m));
        let canary = self
            .jobs
            .sessions
            .canary()
            .ok_or_else(|| failed("the server has no canary set".into()))?;
        let settings = CanarySettings {
            mode: CanaryMode::Measure,
            budget: Budget {
                perplexity_ratio: None,
                accuracy_drop: None,
                neighbour_flips: None,
            },
        };
        let r = canary
            .read(version.clone(), &settings)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut out = serde_json::Map::new();
        if let Some(acc) = r.scores.get(POOLED_ACC) {
            out.insert("acc".into(), (*acc).into());
        }
        out.insert("perplexity_ratio".into(), r.drift.perplexity_ratio.into());
        out.insert("accuracy_drop".into(), r.drift.accuracy_drop.into());
        out.insert("neighbour_flips".into(), r.drift.neighbour_flips.into());
        Ok(Value::Object(out))
    }
}

impl SweepFront for JobFront<'_> {
    type Version = ModelView;
    type Error = Stop;

    fn number(&self, version: &ModelView) -> u64 {
        version.version
    }

    fn cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    async fn start(&mut self, method: Method) -> Result<Start<ModelView>, Stop> {
        let name = method.name();
        let sid = self.session_for(name).await?;
        let session =
            |e: crate::sessions::SessionError| backend(format!("the sweep's session: {e}"));
        let tenant = self.tenant();
        let applied = self
            .jobs
            .sessions
            .get(tenant, &sid)
            .map_err(session)?
            .edit_count as usize;
        let version = self
            .jobs
            .sessions
            .view(tenant, &sid, None)
            .map_err(session)?;
        // The reports of edits an earlier run applied (a sweep's session is linear: one version
        // per edit).
        let mut reports = Vec::new();
        for v in 1..=version.version {
            if let Some(summary) = self
                .jobs
                .sessions
                .version_summary(tenant, &sid, v)
                .map_err(session)?
            {
                reports.extend(summary.metrics.as_array().into_iter().flatten().cloned());
            }
        }
        tracing::info!(method = name, session = %sid, applied, finished = self.rec.curve.len(),
            "sweep method started");
        self.session = sid;
        Ok(Start {
            version,
            applied,
            reports,
        })
    }

    /// The session's edit applies on its current version, which is `_version` (nothing else
    /// edits a sweep's session).
    async fn apply(
        &mut self,
        method: Method,
        hparams: &Value,
        _version: &ModelView,
        record: &EditRequest,
        n: usize,
    ) -> Result<(ModelView, Vec<Value>), Stop> {
        let failed = |e: String| backend(format!("{} edit {n}: {e}", method.name()));
        let applied = apply_one(
            self.jobs,
            self.tenant(),
            &self.session,
            method,
            record.clone(),
            hparams.clone(),
        )
        .await
        .map_err(failed)?;
        let view = self
            .jobs
            .sessions
            .view(self.tenant(), &self.session, Some(applied.session.version))
            .map_err(|e| failed(e.to_string()))?;
        let reports = applied
            .versions
            .iter()
            .flat_map(|v| &v.reports)
            .map(|r| serde_json::to_value(r).unwrap_or_default())
            .collect();
        Ok((view, reports))
    }

    /// On a thread of its own: the engine backend blocks.
    async fn remeasure(
        &mut self,
        version: &ModelView,
        edits: &[EditRequest],
    ) -> Result<Vec<EditMetrics>, Stop> {
        let b = EngineBackend::new(
            self.jobs.engine.clone(),
            version.clone(),
            self.jobs.cfg.patience,
        );
        let requests = edits.to_vec();
        Ok(tokio::task::spawn_blocking(move || b.remeasure(&requests))
            .await
            .map_err(backend)??)
    }

    async fn tasks(&mut self, version: &ModelView) -> Result<BTreeMap<String, Value>, Stop> {
        let spec = eval_spec(self.spec, &self.session, version.version);
        let mut tasks = evaluate_at(
            self.jobs,
            version.clone(),
            &spec,
            self.dir.clone(),
            self.flag,
        )
        .await?;
        if self.spec.canary {
            tasks.insert("canary".into(), self.canary(version).await?);
        }
        Ok(tasks)
    }

    async fn edit_applied(&mut self, _method: Method, _applied: usize) -> Result<(), Stop> {
        self.done += 1;
        self.clock.report(self.progress, self.done);
        self.jobs
            .store
            .update_job(&self.row.id, &json(self.progress), None)
            .await?;
        Ok(())
    }

    async fn checkpoint_finished(&mut self, rows: &[CurveRow]) -> Result<(), Stop> {
        self.rec.curve = rows.to_vec();
        self.done += 1;
        self.clock.report(self.progress, self.done);
        self.jobs
            .store
            .update_job(&self.row.id, &json(self.progress), Some(&json(self.rec)))
            .await?;
        Ok(())
    }
}

/// One record applied through the engine's edit lane as the session's next version.
async fn apply_one(
    jobs: &Jobs,
    tenant: &str,
    sid: &str,
    method: Method,
    req: EditRequest,
    hparams: Value,
) -> Result<Applied, String> {
    let engine = jobs.engine.clone();
    let admission = Admission::Patient(jobs.cfg.patience);
    jobs.sessions
        .apply_edit(
            tenant,
            sid,
            method,
            vec![req.clone()],
            move |view| async move {
                engine
                    .edit(
                        view,
                        method,
                        vec![req],
                        hparams,
                        MeasureOptions::default(),
                        admission,
                    )
                    .await
            },
        )
        .await
        .map_err(|e| e.to_string())
}

/// The tasks on one view, on a thread of their own; each task's result as JSON.
async fn evaluate_at(
    jobs: &Jobs,
    view: ModelView,
    spec: &EvaluationSpec,
    dir: PathBuf,
    flag: &Arc<AtomicBool>,
) -> Result<BTreeMap<String, Value>, EvalError> {
    let run = eval::Run {
        engine: jobs.engine.clone(),
        view,
        spec: spec.clone(),
        data_dir: dir,
        finished: BTreeSet::new(),
        cancel: flag.clone(),
        patience: jobs.cfg.patience,
    };
    let mut rx = eval::spawn(run, "emend-sweep-eval")
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
