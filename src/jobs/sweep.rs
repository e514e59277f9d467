//! Sweeps, the paper's protocol as a job: for each method a fresh session, the first `n_edits`
//! records of an editing dataset applied one at a time through the engine's edit lane, and at
//! each checkpoint (a number of edits so far) the benchmark tasks on that version plus the
//! edits' metrics averaged over the edits so far. This file holds what a sweep is (request,
//! validated spec, curve row, listing); the loop is `sweep_loop.rs` and the job's side of it
//! `sweep_job.rs`.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::checks::{check_fewshot, check_limit, check_tasks, count_requests};
use super::{
    invalid, json, Decoded, EvaluationSpec, JobError, JobProgress, JobStatus, Jobs, Record, SWEEP,
};
use crate::engine::editing::datasets::{self, EditDataset};
use crate::engine::editing::{self, Method};
use crate::engine::model::ModelSpec;
use crate::store::JobRow;

/// Most edits in one sweep.
pub const MAX_SWEEP_EDITS: i64 = 10_000;
/// Most checkpoints in one sweep.
pub const MAX_CHECKPOINTS: usize = 64;
/// Most methods compared in one sweep.
pub const MAX_METHODS: usize = 8;

/// What `POST /v1/sweeps` asks for.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSweep {
    /// One editing method (`GET /v1/methods`); give this or `methods`.
    #[schema(example = "rome")]
    pub method: Option<String>,
    /// Methods compared in one sweep, each on a fresh session of its own and drawn as its own
    /// line (1 to 8, no repeats); give this or `method`. `hparams` is then keyed by method:
    /// `{"rome": {"steps": 10}}`.
    #[schema(example = json!(["rome", "memit"]))]
    pub methods: Option<Vec<String>>,
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
    /// Overrides of the method's defaults; with `methods`, one object per method name.
    #[schema(value_type = Option<Object>)]
    pub hparams: Option<Value>,
    /// Also read the server's canary probes at every checkpoint: a `canary` task in the curve
    /// (`acc`: the probes' pooled accuracy, `perplexity_ratio`, `accuracy_drop` in points and
    /// `neighbour_flips` against the base model), drawn beside the benchmark panels.
    #[serde(default)]
    pub canary: bool,
}

/// A validated sweep, as stored in the job's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    /// The first method (what single-method sweeps stored).
    pub method: String,
    /// Every method when the request gave `methods` (then `hparams` is keyed by method);
    /// empty for a request with `method`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    pub dataset: EditDataset,
    pub n_edits: usize,
    pub checkpoints: Vec<usize>,
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    pub seed: Option<u64>,
    pub hparams: Value,
    /// Canary probes at every checkpoint (specs stored before the option read as `false`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
}

impl SweepSpec {
    /// The methods, in the order they run.
    pub fn methods(&self) -> Vec<String> {
        if self.methods.is_empty() {
            vec![self.method.clone()]
        } else {
            self.methods.clone()
        }
    }
    /// The overrides one method runs with.
    pub fn hparams_for(&self, method: &str) -> Value {
        if self.methods.is_empty() {
            self.hparams.clone()
        } else {
            self.hparams.get(method).cloned().unwrap_or(Value::Null)
        }
    }
    /// Edits plus checkpoints over every method: the progress total.
    pub fn total_steps(&self) -> u64 {
        (self.methods().len() * (self.n_edits + self.checkpoints.len())) as u64
    }
}

/// One finished checkpoint: a point of every curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CurveRow {
    /// The method whose session this checkpoint evaluated.
    #[serde(default)]
    #[schema(example = "rome")]
    pub method: String,
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
    /// The first method.
    pub method: String,
    /// Every method, in the order they run.
    pub methods: Vec<String>,
    pub dataset: EditDataset,
    pub n_edits: usize,
    pub checkpoints: Vec<usize>,
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    pub seed: Option<u64>,
    #[schema(value_type = Object)]
    pub hparams: Value,
    /// Canary probes at every checkpoint.
    pub canary: bool,
    /// The first method's session (created when it starts).
    pub session: Option<String>,
    /// Each started method's session.
    pub sessions: BTreeMap<String, String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Edits applied plus checkpoints evaluated, of (`n_edits` + checkpoints) × methods.
    pub progress: JobProgress,
    /// The finished checkpoints, method by method, in order.
    pub curve: Vec<CurveRow>,
    pub attempts: u32,
    pub cancel_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Sweep {
    /// The chart's title: methods, dataset, edits.
    pub fn title(&self) -> String {
        title(&self.methods, self.dataset, self.n_edits)
    }
}

impl Record {
    /// The session a method runs on, once created (sweeps before `methods` kept one).
    pub(super) fn session_of(&self, method: &str, first: &str) -> Option<String> {
        self.sessions
            .get(method)
            .cloned()
            .or_else(|| (method == first).then(|| self.session.clone()).flatten())
    }
}

/// A sweep chart's title: methods, dataset, edits.
pub fn title(methods: &[String], dataset: EditDataset, n_edits: usize) -> String {
    format!(
        "{} on {}, {n_edits} edits",
        methods.join(", "),
        dataset.name()
    )
}

/// `method` xor `methods`, parsed; the flag says whether `hparams` is keyed by method.
pub fn check_methods(
    method: Option<&str>,
    methods: Option<&[String]>,
) -> Result<(Vec<Method>, bool), JobError> {
    let parse = |field: String, m: &str| {
        m.parse::<Method>()
            .map_err(|e: editing::EditError| invalid(field, e.to_string()))
    };
    match (method, methods) {
        (Some(m), None) => Ok((vec![parse("method".into(), m)?], false)),
        (None, Some(ms)) => {
            if ms.is_empty() || ms.len() > MAX_METHODS {
                return Err(invalid(
                    "methods",
                    format!("must hold 1 to {MAX_METHODS} methods. Given: {}", ms.len()),
                ));
            }
            let mut out: Vec<Method> = Vec::with_capacity(ms.len());
            for (i, m) in ms.iter().enumerate() {
                let parsed = parse(format!("methods[{i}]"), m)?;
                if out.contains(&parsed) {
                    return Err(invalid(
                        format!("methods[{i}]"),
                        format!("repeats `{}`", parsed.name()),
                    ));
                }
                out.push(parsed);
            }
            Ok((out, true))
        }
        (Some(_), Some(_)) => Err(invalid("methods", "give `method` or `methods`, not both")),
        (None, None) => Err(invalid("method", "is required (or `methods`)")),
    }
}

impl Jobs {
    /// Validates and queues a sweep; nothing is stored when a field is invalid.
    pub async fn submit_sweep(&self, tenant: &str, req: NewSweep) -> Result<Sweep, JobError> {
        let (methods, keyed) = check_methods(req.method.as_deref(), req.methods.as_deref())?;
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
        let spec = SweepSpec {
            method: methods[0].name().to_string(),
            methods: if keyed {
                methods.iter().map(|m| m.name().to_string()).collect()
            } else {
                Vec::new()
            },
            dataset,
            n_edits,
            checkpoints,
            tasks,
            limit,
            num_fewshot,
            seed: req.seed,
            hparams,
            canary: req.canary,
        };
        if spec.canary && self.sessions.canary().is_none() {
            return Err(invalid(
                "canary",
                "needs the server's canary set, which needs a dataset directory (configure `data_dir`)",
            ));
        }
        check_hparams(&spec, &methods, self.engine.spec())?;
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
        // Every task's requests are built once here, so a bad option is a 422 now.
        count_requests(&spec.tasks, eval_spec(&spec, "", 0).options(), dir).await?;
        let row = self
            .insert(tenant, SWEEP, json(&spec), spec.total_steps())
            .await?;
        tracing::info!(job = %row.id, methods = ?spec.methods(), dataset = spec.dataset.name(),
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
        let Decoded {
            spec,
            status,
            progress,
            rec,
            cancel_requested,
        } = self.decode::<SweepSpec>(&row)?;
        let methods = spec.methods();
        let sessions: BTreeMap<String, String> = methods
            .iter()
            .filter_map(|m| Some((m.clone(), rec.session_of(m, &spec.method)?)))
            .collect();
        let mut curve = rec.curve;
        // Rows stored before `method` was recorded are the (only) method's.
        for r in curve.iter_mut().filter(|r| r.method.is_empty()) {
            r.method = spec.method.clone();
        }
        Ok(Sweep {
            id: row.id,
            status,
            session: sessions.get(&spec.method).cloned(),
            sessions,
            method: spec.method,
            methods,
            dataset: spec.dataset,
            n_edits: spec.n_edits,
            checkpoints: spec.checkpoints,
            tasks: spec.tasks,
            limit: spec.limit,
            num_fewshot: spec.num_fewshot,
            seed: spec.seed,
            hparams: spec.hparams,
            canary: spec.canary,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            progress,
            curve,
            attempts: rec.attempts,
            cancel_requested,
            error: rec.error,
        })
    }
}

/// Each method's overrides resolve against its defaults; with `methods`, `hparams` is an
/// object whose keys are among them (fields are then named `hparams.<method>.<key>`).
pub fn check_hparams(
    spec: &SweepSpec,
    methods: &[Method],
    model: &ModelSpec,
) -> Result<(), JobError> {
    let keyed = !spec.methods.is_empty();
    if keyed {
        match &spec.hparams {
            Value::Null => {}
            Value::Object(o) => {
                if let Some(k) = o.keys().find(|k| !spec.methods.contains(k)) {
                    return Err(invalid(
                        format!("hparams.{k}"),
                        format!("is not one of `methods` ({})", spec.methods.join(", ")),
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "hparams",
                    "must be an object keyed by method name when `methods` is given",
                ))
            }
        }
    }
    for m in methods {
        let overrides = spec.hparams_for(m.name());
        editing::hparams::resolve(*m, model, &overrides).map_err(|e| match e {
            editing::EditError::Invalid { field, message } => JobError::Invalid {
                field: match field.strip_prefix("hparams") {
                    Some(rest) if keyed => format!("hparams.{}{rest}", m.name()),
                    _ => field,
                },
                message,
            },
            other => invalid("hparams", other.to_string()),
        })?;
    }
    Ok(())
}

/// The evaluation a checkpoint runs.
pub(super) fn eval_spec(s: &SweepSpec, session: &str, version: u64) -> EvaluationSpec {
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
pub(super) async fn load_records(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(methods: &[&str], hparams: Value) -> SweepSpec {
        SweepSpec {
            canary: false,
            method: methods[0].into(),
            methods: if methods.len() > 1 {
                methods.iter().map(|m| m.to_string()).collect()
            } else {
                Vec::new()
            },
            dataset: EditDataset::Counterfact,
            n_edits: 10,
            checkpoints: vec![0, 5, 10],
            tasks: vec!["arc_easy".into()],
            limit: None,
            num_fewshot: None,
            seed: None,
            hparams,
        }
    }

    #[test]
    fn a_spec_gives_each_method_its_overrides() {
        let one = spec(&["rome"], serde_json::json!({"steps": 3}));
        assert_eq!(one.methods(), ["rome"]);
        assert_eq!(one.hparams_for("rome"), serde_json::json!({"steps": 3}));
        assert_eq!(one.total_steps(), 13);
        let two = spec(&["rome", "ft-m"], serde_json::json!({"ft-m": {"steps": 2}}));
        assert_eq!(two.methods(), ["rome", "ft-m"]);
        assert_eq!(two.hparams_for("rome"), Value::Null);
        assert_eq!(two.hparams_for("ft-m"), serde_json::json!({"steps": 2}));
        assert_eq!(two.total_steps(), 26);
        // What a sweep stored before `methods` still reads, as one method.
        let old: SweepSpec = serde_json::from_value(serde_json::json!({
            "method": "rome", "dataset": "counterfact", "n_edits": 1, "checkpoints": [0, 1],
            "tasks": ["arc_easy"], "limit": null, "num_fewshot": null, "seed": null,
            "hparams": null}))
        .expect("old spec");
        assert_eq!(old.methods(), ["rome"]);
    }

    #[test]
    fn methods_are_one_field_or_the_other_without_repeats() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let field = |r: Result<(Vec<Method>, bool), JobError>| match r {
            Err(JobError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        };
        assert!(!check_methods(Some("rome"), None).expect("one").1);
        let (ms, keyed) = check_methods(None, Some(&names(&["rome", "memit"]))).expect("two");
        assert_eq!((ms.len(), keyed), (2, true));
        assert_eq!(field(check_methods(None, None)), "method");
        assert_eq!(
            field(check_methods(Some("rome"), Some(&names(&["rome"])))),
            "methods"
        );
        assert_eq!(field(check_methods(None, Some(&[]))), "methods");
        assert_eq!(
            field(check_methods(None, Some(&names(&["rome", "nope"])))),
            "methods[1]"
        );
        assert_eq!(
            field(check_methods(None, Some(&names(&["rome", "rome"])))),
            "methods[1]"
        );
        assert_eq!(field(check_methods(Some("nope"), None)), "method");
    }

    #[test]
    fn old_records_name_their_one_session() {
        let rec: Record = serde_json::from_value(serde_json::json!({
            "attempts": 1, "error": null, "session": "s1"}))
        .expect("old record");
        assert_eq!(rec.session_of("rome", "rome").as_deref(), Some("s1"));
        assert_eq!(rec.session_of("memit", "rome"), None);
    }
}
