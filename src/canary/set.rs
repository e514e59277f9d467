//! The canary set: a small, fixed and versioned probe of general ability, built from the data
//! dir. Task probes are benchmark tasks cut to their first `limit` documents, answered exactly as
//! `emend eval --tasks T --limit N` answers them; neighbour probes are CounterFact neighbourhood
//! prompts whose greedy answers are recorded on the base model, and a neighbour *flips* when that
//! answer is no longer the greedy one.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::engine::editing::datasets::{self, EditDataset};
use crate::engine::eval::tasks::{Prepared, Task};
use crate::engine::eval::{
    get_task, prepare_task, EvalError, EvalOptions, Evaluator, GenRequest, LmBackend,
};

/// What a canary set holds. Its `name` is stored with every reading, so readings of different
/// sets are never compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanarySpec {
    #[schema(example = "emend-canary-1")]
    pub name: String,
    pub tasks: Vec<TaskProbe>,
    pub neighbours: NeighbourProbe,
}

/// The first `limit` documents of a benchmark task (0-shot unless the task has a fixed shot
/// count).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskProbe {
    #[schema(example = "lambada_openai")]
    pub task: String,
    #[schema(example = 64, minimum = 1)]
    pub limit: usize,
}

/// The neighbourhood prompts of the last `count` CounterFact records (sweeps edit from the
/// first record on, so these stay unedited longest), answered greedily with at most
/// `max_tokens` tokens on the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NeighbourProbe {
    #[schema(example = 32)]
    pub count: usize,
    #[serde(default = "default_answer_tokens")]
    #[schema(example = 6, minimum = 1)]
    pub max_tokens: usize,
}

/// One token: the answer's first word piece names the fact, and every further token is one
/// more near-tie that a harmless edit can tip.
fn default_answer_tokens() -> usize {
    1
}

impl Default for CanarySpec {
    /// LAMBADA accuracy and perplexity (perplexity moves first as edits pile up), ARC-Easy,
    /// TruthfulQA MC1 (the study's safety finding) and neighbourhood facts, sized so that a
    /// reading is a few ROME edits' time on a 2-core CPU. `examples/canary-study.json` is issue
    /// 29's larger set (a WikiText document, more items of each).
    fn default() -> Self {
        let t = |task: &str, limit| TaskProbe {
            task: task.into(),
            limit,
        };
        Self {
            name: "emend-canary-1".into(),
            tasks: vec![
                t("lambada_openai", 32),
                t("arc_easy", 16),
                t("truthfulqa_mc1", 8),
            ],
            neighbours: NeighbourProbe {
                count: 16,
                max_tokens: default_answer_tokens(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("canary set `{name}`: {message}")]
    Spec { name: String, message: String },
    #[error("canary probes: {0}")]
    Eval(#[from] EvalError),
    #[error("canary probes: {0}")]
    Failed(String),
}

/// A canary set with its documents and requests built.
pub struct CanarySet {
    pub spec: CanarySpec,
    tasks: Vec<(Box<dyn Task>, Prepared, EvalOptions)>,
    /// Neighbourhood prompts.
    neighbours: Vec<String>,
    /// SHA-256 over the spec and the prompts: two sets with one digest ask the same questions.
    pub digest: String,
}

/// The base model's answers to the neighbour probes and its scores.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// Greedy answers; empty where the model answered nothing (not checked).
    pub answers: Vec<String>,
    pub measured: Measured,
}

/// One run of the probes on one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// `task.metric` → value (standard errors left out).
    pub scores: BTreeMap<String, f64>,
    /// Per neighbour: is its recorded answer the greedy one (`None`: not checked).
    pub greedy: Vec<Option<bool>>,
}

impl CanarySet {
    /// Resolves the tasks and reads their documents and the neighbour prompts.
    pub fn load(spec: CanarySpec, data_dir: &Path) -> Result<Self, CanaryError> {
        let bad = |message: String| CanaryError::Spec {
            name: spec.name.clone(),
            message,
        };
        if spec.name.trim().is_empty() {
            return Err(bad("`name` must not be empty".into()));
        }
        let mut tasks = Vec::with_capacity(spec.tasks.len());
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&spec).unwrap_or_default());
        for p in &spec.tasks {
            if p.limit == 0 {
                return Err(bad(format!(
                    "task `{}`: `limit` must be at least 1",
                    p.task
                )));
            }
            let opts = EvalOptions {
                limit: Some(p.limit),
                ..EvalOptions::default()
            };
            let task = get_task(&p.task).map_err(|e| bad(e.to_string()))?;
            let prepared =
                prepare_task(&p.task, &opts, data_dir).map_err(|e| bad(e.to_string()))?;
            for f in &prepared.data_files {
                h.update(f.sha256.as_bytes());
            }
            tasks.push((task, prepared, opts));
        }
        let mut neighbours = Vec::new();
        if spec.neighbours.count > 0 {
            if spec.neighbours.max_tokens == 0 {
                return Err(bad("`neighbours.max_tokens` must be at least 1".into()));
            }
            let records = datasets::load(EditDataset::Counterfact, data_dir)
                .map_err(|e| bad(e.to_string()))?;
            for r in records.iter().rev() {
                if neighbours.len() == spec.neighbours.count {
                    break;
                }
                if let Some(p) = r.request.locality_prompts.first() {
                    neighbours.push(p.prompt.clone());
                }
            }
            if neighbours.len() < spec.neighbours.count {
                return Err(bad(format!(
                    "CounterFact has {} records with a neighbourhood prompt, not {}",
                    neighbours.len(),
                    spec.neighbours.count
                )));
            }
            for p in &neighbours {
                h.update(p.as_bytes());
            }
        }
        if tasks.is_empty() && neighbours.is_empty() {
            return Err(bad("it has no probes".into()));
        }
        Ok(Self {
            spec,
            tasks,
            neighbours,
            digest: hex(&h.finalize()),
        })
    }

    /// Records the base model's greedy answers to the neighbour prompts and its scores.
    pub fn baseline(&self, backend: &mut dyn LmBackend) -> Result<Baseline, CanaryError> {
        let reqs: Vec<GenRequest> = self
            .neighbours
            .iter()
            .map(|p| GenRequest {
                context: p.clone(),
                until: vec!["\n".into()],
                max_gen_toks: self.spec.neighbours.max_tokens,
            })
            .collect();
        let answers = if reqs.is_empty() {
            Vec::new()
        } else {
            backend.generate_until(&reqs)?
        };
        let answers: Vec<String> = answers
            .into_iter()
            .map(|a| {
                if a.trim().is_empty() {
                    String::new()
                } else {
                    a
                }
            })
            .collect();
        let measured = self.measure(backend, &answers)?;
        Ok(Baseline { answers, measured })
    }

    /// Runs every probe on `backend`; `answers` are the baseline's.
    pub fn measure(
        &self,
        backend: &mut dyn LmBackend,
        answers: &[String],
    ) -> Result<Measured, CanaryError> {
        let mut scores = BTreeMap::new();
        let (mut correct, mut items) = (0.0, 0usize);
        for (task, prepared, opts) in &self.tasks {
            let r = Evaluator::default().evaluate_prepared(
                std::slice::from_ref(task),
                std::slice::from_ref(prepared),
                opts,
                backend,
                &mut |_, _| true,
            )?;
            for (name, result) in r.results {
                if let Some(acc) = result.metrics.get("acc") {
                    correct += acc * result.meta.n_docs as f64;
                    items += result.meta.n_docs;
                }
                for (metric, v) in result.metrics {
                    if !metric.ends_with("_stderr") {
                        scores.insert(format!("{name}.{metric}"), v);
                    }
                }
            }
        }
        if items > 0 {
            scores.insert(POOLED_ACC.into(), correct / items as f64);
        }
        let asked: Vec<(usize, (String, String))> = self
            .neighbours
            .iter()
            .zip(answers)
            .enumerate()
            .filter(|(_, (_, a))| !a.is_empty())
            .map(|(i, (p, a))| (i, (p.clone(), a.clone())))
            .collect();
        let mut greedy = vec![None; self.neighbours.len()];
        if !asked.is_empty() {
            let pairs: Vec<(String, String)> = asked.iter().map(|(_, p)| p.clone()).collect();
            let out = backend.loglikelihood(&pairs)?;
            if out.len() != pairs.len() {
                return Err(CanaryError::Failed(format!(
                    "{} answers for {} neighbour probes",
                    out.len(),
                    pairs.len()
                )));
            }
            for ((i, _), (_, is_greedy)) in asked.iter().zip(out) {
                greedy[*i] = Some(is_greedy);
            }
        }
        Ok(Measured { scores, greedy })
    }
}

/// The item-weighted mean accuracy over every task probe that reports `acc`: one question
/// of 56 moves it by under 2 points, where one of 8 moves its task's accuracy by 12.5.
pub const POOLED_ACC: &str = "pooled.acc";

/// Neighbours greedy on the base model that are not greedy now, and how many were checked (a
/// base answer that does not re-tokenise to its own greedy path is not checked).
pub fn flips(base: &[Option<bool>], now: &[Option<bool>]) -> (u32, u32) {
    let mut checked = 0;
    let mut flipped = 0;
    for (b, n) in base.iter().zip(now) {
        if *b == Some(true) {
            checked += 1;
            if *n != Some(true) {
                flipped += 1;
            }
        }
    }
    (flipped, checked)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_count_only_base_greedy_neighbours() {
        let base = [Some(true), Some(true), Some(false), None, Some(true)];
        let now = [Some(true), Some(false), Some(true), Some(false), None];
        assert_eq!(flips(&base, &now), (2, 3));
    }

    #[test]
    fn specs_are_strict() {
        let e = serde_json::from_value::<CanarySpec>(serde_json::json!({
            "name": "x", "tasks": [{"task": "arc_easy", "limit": 2, "shots": 1}],
            "neighbours": {"count": 0}
        }))
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `shots`"), "{e}");
        let dir = std::env::temp_dir();
        let spec = CanarySpec {
            name: "x".into(),
            tasks: vec![TaskProbe {
                task: "nope".into(),
                limit: 1,
            }],
            neighbours: NeighbourProbe {
                count: 0,
                max_tokens: 1,
            },
        };
        let e = CanarySet::load(spec, &dir).err().unwrap();
        assert!(e.to_string().contains("unknown task"), "{e}");
    }
}
