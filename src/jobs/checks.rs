//! Validation shared by evaluations and sweeps: task names, `limit`, `num_fewshot`, and every
//! task's requests built at submit, so that a bad option is the client's 422 and not a failed
//! job later.
use std::path::PathBuf;

use super::{invalid, JobError, MAX_FEWSHOT, MAX_LIMIT, MAX_TASKS};
use crate::engine::eval::{distinct_requests, get_task, prepare_task, EvalError, EvalOptions};

/// Canonical task names, each known and listed once.
pub(super) fn check_tasks(names: &[String]) -> Result<Vec<String>, JobError> {
    if names.is_empty() || names.len() > MAX_TASKS {
        return Err(invalid(
            "tasks",
            format!("must name 1 to {MAX_TASKS} tasks. Given: {}", names.len()),
        ));
    }
    let mut tasks: Vec<String> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let t = get_task(name.trim()).map_err(|e| invalid(format!("tasks[{i}]"), e.to_string()))?;
        if tasks.iter().any(|x| x == t.name()) {
            return Err(invalid(
                format!("tasks[{i}]"),
                format!("repeats `{}`", t.name()),
            ));
        }
        tasks.push(t.name().to_string());
    }
    Ok(tasks)
}

pub(super) fn check_limit(limit: Option<i64>) -> Result<Option<usize>, JobError> {
    match limit {
        Some(l) if !(1..=MAX_LIMIT).contains(&l) => Err(invalid(
            "limit",
            format!("must be 1 to {MAX_LIMIT}. Given: {l}"),
        )),
        l => Ok(l.map(|l| l as usize)),
    }
}

pub(super) fn check_fewshot(n: Option<i64>) -> Result<Option<usize>, JobError> {
    match n {
        Some(n) if !(0..=MAX_FEWSHOT).contains(&n) => Err(invalid(
            "num_fewshot",
            format!("must be 0 to {MAX_FEWSHOT}. Given: {n}"),
        )),
        n => Ok(n.map(|n| n as usize)),
    }
}

/// Builds every task's requests (off the async runtime) and counts the distinct ones: a task
/// option it refuses or a missing data file is the client's answer, not a failed job later.
pub(super) async fn count_requests(
    tasks: &[String],
    opts: EvalOptions,
    dir: PathBuf,
) -> Result<u64, JobError> {
    let tasks = tasks.to_vec();
    tokio::task::spawn_blocking(move || -> Result<u64, JobError> {
        let mut prepared = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.iter().enumerate() {
            prepared.push(prepare_task(t, &opts, &dir).map_err(|e| match e {
                EvalError::Option(m) => invalid("num_fewshot", m),
                other => invalid(
                    format!("tasks[{i}]"),
                    format!("cannot be evaluated: {other}"),
                ),
            })?);
        }
        Ok(distinct_requests(&prepared).iter().map(|n| *n as u64).sum())
    })
    .await
    .map_err(|e| invalid("tasks", format!("could not be prepared: {e}")))?
}
