//! Evaluation jobs. The body runs on a thread of its own ([`run`]): tasks one after another
//! through the engine (one [`Evaluator`], so requests shared by tasks are answered once),
//! reporting progress after every chunk and each task's result as soon as it is scored; the
//! runner ([`Jobs::run_evaluation`]) writes them to the job's row as they come.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use super::{
    json, now, EvaluationSpec, FinishedTask, JobError, JobProgress, JobStatus, Jobs, Record, KIND,
    PROGRESS_EVERY,
};
use crate::engine::eval::{distinct_requests, get_task, prepare_task, EvalError, Evaluator};
use crate::engine::worker::EngineBackend;
use crate::engine::worker::{Engine, ModelView};
use crate::store::JobRow;

pub(crate) enum Event {
    /// Distinct requests answered so far, of `total`, over the whole job.
    Progress {
        done: u64,
        total: u64,
    },
    /// A task finished: its result (metrics and metadata) as JSON.
    TaskDone {
        task: String,
        result: serde_json::Value,
    },
    Finished(Result<(), EvalError>),
}

/// What an evaluation thread needs, owned so it can move onto the thread.
pub(crate) struct Run {
    pub engine: Engine,
    pub view: ModelView,
    pub spec: EvaluationSpec,
    pub data_dir: PathBuf,
    /// Tasks whose results are already stored (a resumed job skips them).
    pub finished: BTreeSet<String>,
    pub cancel: Arc<AtomicBool>,
    pub patience: Duration,
}

/// Starts [`run`] on a thread named `name`, inside the current span; its events, ending with
/// [`Event::Finished`], arrive on the returned receiver.
pub(crate) fn spawn(r: Run, name: &str) -> std::io::Result<UnboundedReceiver<Event>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _s = span.entered();
            let done = run(r, &tx);
            let _ = tx.send(Event::Finished(done));
        })?;
    Ok(rx)
}

pub(crate) fn run(r: Run, tx: &UnboundedSender<Event>) -> Result<(), EvalError> {
    let opts = r.spec.options();
    let mut tasks = Vec::with_capacity(r.spec.tasks.len());
    let mut prepared = Vec::with_capacity(r.spec.tasks.len());
    for name in &r.spec.tasks {
        tasks.push(get_task(name)?);
        prepared.push(prepare_task(name, &opts, &r.data_dir)?);
    }
    let plan = distinct_requests(&prepared);
    let total: u64 = plan.iter().map(|n| *n as u64).sum();
    let mut base = 0u64;
    let mut evaluator = Evaluator::default();
    let mut backend = EngineBackend::new(r.engine, r.view, r.patience);
    for (i, name) in r.spec.tasks.iter().enumerate() {
        let n = plan[i] as u64;
        if r.finished.contains(name) {
            base += n;
            continue;
        }
        if r.cancel.load(Ordering::Relaxed) {
            return Err(EvalError::Cancelled);
        }
        tracing::info!(task = %name, requests = n, "task started");
        let res = evaluator.evaluate_prepared(
            std::slice::from_ref(&tasks[i]),
            std::slice::from_ref(&prepared[i]),
            &opts,
            &mut backend,
            &mut |d, t| {
                // After a resume a task may recompute requests an earlier (skipped) task had
                // answered, so its own count is scaled onto its share of the plan.
                let done = base + if t == 0 { n } else { d as u64 * n / t as u64 };
                let _ = tx.send(Event::Progress { done, total });
                !r.cancel.load(Ordering::Relaxed)
            },
        )?;
        base += n;
        let result = res
            .results
            .into_values()
            .next()
            .ok_or_else(|| EvalError::Backend(format!("task `{name}` gave no result")))?;
        let result = serde_json::to_value(&result)
            .map_err(|e| EvalError::Backend(format!("task `{name}`: {e}")))?;
        tracing::info!(task = %name, "task finished");
        let _ = tx.send(Event::TaskDone {
            task: name.clone(),
            result,
        });
        let _ = tx.send(Event::Progress { done: base, total });
    }
    Ok(())
}

impl Jobs {
    /// Runs (or resumes) the evaluation job of `row`, already marked running.
    pub(super) async fn run_evaluation(
        &self,
        row: &JobRow,
        mut rec: Record,
        progress: JobProgress,
        started_at: &str,
        flag: &Arc<AtomicBool>,
    ) -> Result<(), JobError> {
        let id = row.id.as_str();
        let span = tracing::info_span!("evaluation", job = %id, attempt = rec.attempts);
        let spec: EvaluationSpec = match serde_json::from_str(&row.spec) {
            Ok(s) if row.kind == KIND => s,
            Ok(_) => {
                rec.error = Some(format!("unknown job kind `{}`", row.kind));
                return self
                    .finish(id, JobStatus::Failed, started_at, progress, rec)
                    .await;
            }
            Err(e) => {
                rec.error = Some(format!("the stored spec is unreadable: {e}"));
                return self
                    .finish(id, JobStatus::Failed, started_at, progress, rec)
                    .await;
            }
        };
        let view = match self
            .sessions
            .view(&row.tenant, &spec.session, Some(spec.version))
        {
            Ok(v) => v,
            Err(e) => {
                rec.error = Some(format!("the session version is gone: {e}"));
                return self
                    .finish(id, JobStatus::Failed, started_at, progress, rec)
                    .await;
            }
        };
        let Some(dir) = self.cfg.data_dir.clone() else {
            rec.error = Some(JobError::NoData.to_string());
            return self
                .finish(id, JobStatus::Failed, started_at, progress, rec)
                .await;
        };
        span.in_scope(|| {
            tracing::info!(session = %spec.session, version = spec.version,
                resumed_tasks = rec.results.len(), "evaluation started")
        });
        let run = Run {
            engine: self.engine.clone(),
            view,
            spec,
            data_dir: dir,
            finished: rec.results.keys().cloned().collect(),
            cancel: flag.clone(),
            patience: self.cfg.patience,
        };
        let spawned = span.in_scope(|| spawn(run, "emend-eval"));
        let rx = match spawned {
            Ok(rx) => rx,
            Err(e) => {
                rec.error = Some(format!("could not start the evaluation thread: {e}"));
                return self
                    .finish(id, JobStatus::Failed, started_at, progress, rec)
                    .await;
            }
        };
        let mut progress = progress;
        let outcome = self.follow(id, rx, &mut rec, &mut progress, flag).await?;
        self.conclude(id, outcome, started_at, progress, rec, &span)
            .await
    }

    /// Writes the evaluation thread's events to the job's row until the thread ends; its
    /// outcome, or the store's error (then the thread is stopped and the job stays running in
    /// the store, to be resumed).
    async fn follow(
        &self,
        id: &str,
        mut rx: UnboundedReceiver<Event>,
        rec: &mut Record,
        progress: &mut JobProgress,
        flag: &AtomicBool,
    ) -> Result<Result<(), EvalError>, JobError> {
        let t0 = Instant::now();
        let mut done_at_start: Option<u64> = None;
        let mut last_write: Option<Instant> = None;
        loop {
            let write = match rx.recv().await {
                Some(Event::Progress { done, total }) => {
                    let d0 = *done_at_start.get_or_insert(done);
                    progress.done = done;
                    progress.total = total;
                    let ran = done.saturating_sub(d0);
                    progress.eta_seconds = (ran > 0).then(|| {
                        t0.elapsed().as_secs_f64() / ran as f64 * total.saturating_sub(done) as f64
                    });
                    if last_write.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                        self.store.update_job(id, &json(progress), None).await
                    } else {
                        continue;
                    }
                }
                Some(Event::TaskDone { task, result }) => {
                    rec.results.insert(task.clone(), result);
                    rec.finished_tasks.push(FinishedTask {
                        task,
                        finished_at: now(),
                        attempt: rec.attempts,
                    });
                    self.store
                        .update_job(id, &json(progress), Some(&json(rec)))
                        .await
                }
                Some(Event::Finished(r)) => return Ok(r),
                None => {
                    return Ok(Err(EvalError::Backend(
                        "the evaluation thread stopped without an answer".into(),
                    )))
                }
            };
            if let Err(e) = write {
                flag.store(true, Ordering::Relaxed);
                return Err(e.into());
            }
            last_write = Some(Instant::now());
        }
    }
}
