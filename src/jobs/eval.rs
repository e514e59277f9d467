//! The body of an evaluation job, on a thread of its own: tasks one after another through the
//! engine (one [`Evaluator`], so requests shared by tasks are answered once), reporting
//! progress after every chunk and each task's result as soon as it is scored.
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::EvaluationSpec;
use crate::engine::eval::{
    distinct_requests, get_task, prepare_task, EngineBackend, EvalError, Evaluator,
};
use crate::engine::worker::{Engine, ModelView};

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

pub(crate) struct Run<'a> {
    pub engine: Engine,
    pub view: ModelView,
    pub spec: &'a EvaluationSpec,
    pub data_dir: &'a Path,
    /// Tasks whose results are already stored (a resumed job skips them).
    pub finished: &'a BTreeSet<String>,
    pub cancel: &'a AtomicBool,
    pub patience: Duration,
}

pub(crate) fn run(r: Run<'_>, tx: &UnboundedSender<Event>) -> Result<(), EvalError> {
    let opts = r.spec.options();
    let mut tasks = Vec::with_capacity(r.spec.tasks.len());
    let mut prepared = Vec::with_capacity(r.spec.tasks.len());
    for name in &r.spec.tasks {
        tasks.push(get_task(name)?);
        prepared.push(prepare_task(name, &opts, r.data_dir)?);
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
