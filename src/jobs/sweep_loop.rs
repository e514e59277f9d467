//! One sweep loop, two front ends. [`drive`] is the paper's protocol: for each method, the
//! records applied one at a time from the method's current version, and at each checkpoint
//! the edits so far measured again and the tasks run on that version. Where the model runs and
//! where the results go belong to a [`SweepFront`]: the service's sweep job edits and evaluates
//! through the engine worker and writes to the store (`sweep_job.rs`); `emend sweep` does both
//! in-process and writes files.
use std::collections::BTreeMap;

use serde_json::Value;

use super::curve::{headline_metrics, mean_metrics, mean_post_metrics};
use super::now;
use super::sweep::{CurveRow, SweepSpec};
use crate::engine::editing::{EditMetrics, EditRequest, Method};

/// Where a method's edits start from.
pub struct Start<V> {
    pub version: V,
    /// Records already applied to `version` (a resumed job has some; they are the first ones).
    pub applied: usize,
    /// Their reports, as the edit routes give them (JSON).
    pub reports: Vec<Value>,
}

/// How a sweep ended, when nothing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Finished,
    Cancelled,
}

/// What the loop needs from where it runs. Each front is a concrete type handed to [`drive`],
/// so a caller sees that front's own futures (the job's are `Send`, the CLI's need not be);
/// hence plain `async fn`s.
#[allow(async_fn_in_trait)]
pub trait SweepFront {
    /// A model version: what an edit applies on and a checkpoint evaluates.
    type Version;
    type Error;

    /// The version's number, as curve rows report it.
    fn number(&self, version: &Self::Version) -> u64;

    /// Whether to stop before the next edit or checkpoint (and before a checkpoint's tasks).
    fn cancelled(&self) -> bool;

    /// Where `method`'s edits start: a fresh version, or what an earlier run left.
    async fn start(&mut self, method: Method) -> Result<Start<Self::Version>, Self::Error>;

    /// Applies `record`, edit number `n` (from 1) of `method`, on `version`: the next version
    /// and the reports of its requests (JSON).
    async fn apply(
        &mut self,
        method: Method,
        hparams: &Value,
        version: &Self::Version,
        record: &EditRequest,
        n: usize,
    ) -> Result<(Self::Version, Vec<Value>), Self::Error>;

    /// `edits` measured again on `version` (retention), in order.
    async fn remeasure(
        &mut self,
        version: &Self::Version,
        edits: &[EditRequest],
    ) -> Result<Vec<EditMetrics>, Self::Error>;

    /// The sweep's tasks on `version`: each task's result (JSON), by task.
    async fn tasks(
        &mut self,
        version: &Self::Version,
    ) -> Result<BTreeMap<String, Value>, Self::Error>;

    /// Called after each edit with the number of `method`'s records applied so far.
    async fn edit_applied(&mut self, method: Method, applied: usize) -> Result<(), Self::Error>;

    /// Called after each checkpoint with the curve so far, the new row last.
    async fn checkpoint_finished(&mut self, rows: &[CurveRow]) -> Result<(), Self::Error>;
}

/// Runs the sweep of `spec` with `methods` (parsed from it) over `records` (its first `n_edits`
/// records). `rows` are the checkpoints an earlier run finished: they are kept and skipped.
pub async fn drive<F: SweepFront>(
    front: &mut F,
    spec: &SweepSpec,
    methods: &[Method],
    records: &[EditRequest],
    mut rows: Vec<CurveRow>,
) -> Result<Ended, F::Error> {
    for &method in methods {
        let name = method.name();
        let hparams = spec.hparams_for(name);
        let Start {
            mut version,
            mut applied,
            mut reports,
        } = front.start(method).await?;
        for &c in &spec.checkpoints {
            // Rows stored before `method` was recorded are the (only) first method's.
            let finished = |r: &CurveRow| {
                r.n_edits == c && (r.method == name || (r.method.is_empty() && name == spec.method))
            };
            if rows.iter().any(finished) {
                continue;
            }
            while applied < c {
                if front.cancelled() {
                    return Ok(Ended::Cancelled);
                }
                let (next, r) = front
                    .apply(method, &hparams, &version, &records[applied], applied + 1)
                    .await?;
                version = next;
                reports.extend(r);
                applied += 1;
                front.edit_applied(method, applied).await?;
            }
            if front.cancelled() {
                return Ok(Ended::Cancelled);
            }
            // Every method's 0-edit checkpoint is the base model: evaluated once.
            let base = (c == 0)
                .then(|| rows.iter().find(|r| r.n_edits == 0).cloned())
                .flatten();
            let row = match base {
                Some(b) => CurveRow {
                    method: name.to_string(),
                    finished_at: now(),
                    ..b
                },
                None => match checkpoint(front, &version, &records[..c], &reports).await? {
                    Some(r) => CurveRow {
                        method: name.to_string(),
                        ..r
                    },
                    None => return Ok(Ended::Cancelled),
                },
            };
            tracing::info!(
                method = name,
                n_edits = c,
                version = row.version,
                "checkpoint finished"
            );
            rows.push(row);
            front.checkpoint_finished(&rows).await?;
        }
    }
    Ok(Ended::Finished)
}

/// `version` evaluated after `edits`: the edits measured again, their at-apply `reports`
/// averaged, and the tasks run; `None` when cancelled before the tasks.
async fn checkpoint<F: SweepFront>(
    front: &mut F,
    version: &F::Version,
    edits: &[EditRequest],
    reports: &[Value],
) -> Result<Option<CurveRow>, F::Error> {
    let edit = if edits.is_empty() {
        BTreeMap::new()
    } else {
        let retained = front.remeasure(version, edits).await?;
        mean_metrics(
            &retained
                .iter()
                .map(|m| serde_json::to_value(m).unwrap_or_default())
                .collect::<Vec<_>>(),
        )
    };
    if front.cancelled() {
        return Ok(None);
    }
    let tasks = front
        .tasks(version)
        .await?
        .iter()
        .map(|(t, v)| (t.clone(), headline_metrics(v)))
        .collect();
    Ok(Some(CurveRow {
        method: String::new(),
        n_edits: edits.len(),
        version: front.number(version),
        edit,
        edit_at_apply: mean_post_metrics(reports),
        tasks,
        finished_at: now(),
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{json, Value};

    use super::*;
    use crate::engine::editing::datasets::EditDataset;

    /// A model without a model: a version is the number of edits under it, every edit reports
    /// `post.reliability = 1 / n`, and every task scores the version.
    #[derive(Default)]
    struct Fake {
        /// Per method: edits an earlier run applied.
        applied_before: BTreeMap<&'static str, usize>,
        /// Cancel once this many edits were applied in this run.
        cancel_after: Option<usize>,
        edits: usize,
        /// (method, n_edits) of every checkpoint whose tasks ran.
        evaluated: Vec<(String, u64)>,
        method: &'static str,
        written: Vec<CurveRow>,
    }

    impl SweepFront for Fake {
        type Version = u64;
        type Error = String;

        fn number(&self, v: &u64) -> u64 {
            *v
        }

        fn cancelled(&self) -> bool {
            self.cancel_after.is_some_and(|n| self.edits >= n)
        }

        async fn start(&mut self, method: Method) -> Result<Start<u64>, String> {
            self.method = method.name();
            let applied = self.applied_before.get(method.name()).copied().unwrap_or(0);
            Ok(Start {
                version: applied as u64,
                applied,
                reports: (1..=applied).map(report).collect(),
            })
        }

        async fn apply(
            &mut self,
            _method: Method,
            _hparams: &Value,
            v: &u64,
            _record: &EditRequest,
            n: usize,
        ) -> Result<(u64, Vec<Value>), String> {
            assert_eq!(
                *v as usize + 1,
                n,
                "edits apply in order on the last version"
            );
            self.edits += 1;
            Ok((v + 1, vec![report(n)]))
        }

        async fn remeasure(
            &mut self,
            v: &u64,
            edits: &[EditRequest],
        ) -> Result<Vec<EditMetrics>, String> {
            assert_eq!(*v as usize, edits.len());
            Ok(Vec::new())
        }

        async fn tasks(&mut self, v: &u64) -> Result<BTreeMap<String, Value>, String> {
            self.evaluated.push((self.method.to_string(), *v));
            Ok([(
                "arc_easy".to_string(),
                json!({"acc": *v as f64, "acc_stderr": 0.1}),
            )]
            .into())
        }

        async fn edit_applied(&mut self, _method: Method, _applied: usize) -> Result<(), String> {
            Ok(())
        }

        async fn checkpoint_finished(&mut self, rows: &[CurveRow]) -> Result<(), String> {
            self.written = rows.to_vec();
            Ok(())
        }
    }

    fn report(n: usize) -> Value {
        json!({"post": {"reliability": 1.0 / n as f64}})
    }

    fn spec(methods: &[&str]) -> SweepSpec {
        SweepSpec {
            canary: false,
            method: methods[0].into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            dataset: EditDataset::Counterfact,
            n_edits: 4,
            checkpoints: vec![0, 1, 4],
            tasks: vec!["arc_easy".into()],
            limit: None,
            num_fewshot: None,
            seed: None,
            hparams: Value::Null,
        }
    }

    fn records() -> Vec<EditRequest> {
        let r: EditRequest = serde_json::from_value(json!({
            "prompt": "{} is in", "subject": "It", "target_new": "Rome"}))
        .expect("an edit request");
        vec![r; 4]
    }

    fn run(front: &mut Fake, s: &SweepSpec, rows: Vec<CurveRow>) -> Ended {
        let methods: Vec<Method> = s.methods().iter().map(|m| m.parse().unwrap()).collect();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(drive(front, s, &methods, &records(), rows))
            .unwrap()
    }

    #[test]
    fn each_method_runs_every_checkpoint_and_shares_the_base_row() {
        let s = spec(&["rome", "ft-m"]);
        let mut f = Fake::default();
        assert_eq!(run(&mut f, &s, Vec::new()), Ended::Finished);
        let points: Vec<(&str, usize, u64)> = f
            .written
            .iter()
            .map(|r| (r.method.as_str(), r.n_edits, r.version))
            .collect();
        assert_eq!(
            points,
            [
                ("rome", 0, 0),
                ("rome", 1, 1),
                ("rome", 4, 4),
                ("ft-m", 0, 0),
                ("ft-m", 1, 1),
                ("ft-m", 4, 4)
            ]
        );
        // The base model is evaluated once, for the first method.
        assert_eq!(
            f.evaluated,
            [
                ("rome".to_string(), 0),
                ("rome".into(), 1),
                ("rome".into(), 4),
                ("ft-m".into(), 1),
                ("ft-m".into(), 4)
            ]
        );
        assert_eq!(f.edits, 8);
        let last = &f.written[5];
        assert_eq!(last.tasks["arc_easy"], [("acc".to_string(), 4.0)].into());
        let mean = (1.0 + 0.5 + 1.0 / 3.0 + 0.25) / 4.0;
        assert_eq!(last.edit_at_apply["reliability"], mean);
        assert!(f.written[0].edit.is_empty() && f.written[0].edit_at_apply.is_empty());
    }

    #[test]
    fn a_resumed_sweep_keeps_its_rows_and_edits_and_goes_on() {
        let s = spec(&["rome", "ft-m"]);
        let mut first = Fake::default();
        run(&mut first, &s, Vec::new());
        // Stopped after rome's checkpoint 1 and two more of its edits.
        let kept = first.written[..2].to_vec();
        let mut f = Fake {
            applied_before: [("rome", 3)].into(),
            ..Fake::default()
        };
        assert_eq!(run(&mut f, &s, kept.clone()), Ended::Finished);
        assert_eq!(f.edits, 1 + 4, "rome's last edit, then all of ft-m's");
        assert_eq!(&f.written[..2], &kept[..]);
        assert_eq!(f.written.len(), 6);
        // At-apply means cover the edits of the earlier run too.
        assert_eq!(f.written[2].edit_at_apply, first.written[2].edit_at_apply);
        assert_eq!(
            f.evaluated,
            [
                ("rome".to_string(), 4),
                ("ft-m".into(), 1),
                ("ft-m".into(), 4)
            ]
        );
    }

    #[test]
    fn rows_without_a_method_are_the_first_methods() {
        let s = spec(&["rome"]);
        let mut first = Fake::default();
        run(&mut first, &s, Vec::new());
        let old: Vec<CurveRow> = first.written[..2]
            .iter()
            .map(|r| CurveRow {
                method: String::new(),
                ..r.clone()
            })
            .collect();
        let mut f = Fake {
            applied_before: [("rome", 1)].into(),
            ..Fake::default()
        };
        run(&mut f, &s, old);
        assert_eq!(f.evaluated, [("rome".to_string(), 4)]);
    }

    #[test]
    fn a_cancel_stops_before_the_next_edit() {
        let s = spec(&["rome"]);
        let mut f = Fake {
            cancel_after: Some(2),
            ..Fake::default()
        };
        assert_eq!(run(&mut f, &s, Vec::new()), Ended::Cancelled);
        assert_eq!(f.edits, 2);
        assert_eq!(f.written.len(), 2, "checkpoints 0 and 1 finished");
    }
}
