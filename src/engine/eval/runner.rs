//! Runs tasks against a backend: builds every task's requests, answers each distinct request
//! once (multiple-choice items share contexts; tasks may share requests), reports progress, and
//! aggregates metrics per task, subtask and category.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::data::FileDigest;
use super::error::{EvalError, Result};
use super::metrics::{aggregate, Sample};
use super::request::{LmBackend, Request, Response};
use super::tasks::{get_task, Prepared, Task, TaskOptions, FEWSHOT_SEED};

/// Loglikelihood pairs per backend call (one progress step each).
const LOGLIKELIHOOD_CHUNK: usize = 32;

/// Context bytes that decide which requests are sent together (longer than a question, shorter
/// than a few-shot prefix).
const CLUSTER_PREFIX_BYTES: usize = 256;

#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    pub seed: Option<u64>,
}

/// Called with `(done, total)` distinct requests; returning `false` cancels the run.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

#[derive(Debug, Clone, Serialize)]
pub struct TaskMeta {
    pub task: String,
    pub version: String,
    pub num_fewshot: usize,
    pub fewshot_seed: u64,
    pub limit: Option<usize>,
    pub seed: Option<u64>,
    pub n_docs: usize,
    pub n_requests: usize,
    pub data_files: Vec<FileDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    /// e.g. `acc`, `acc_stderr`, `acc_norm`, `perplexity`, `exact_match,strict-match`.
    #[serde(flatten)]
    pub metrics: BTreeMap<String, f64>,
    pub meta: TaskMeta,
    /// Per subtask (MMLU subject, BBH task).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subtasks: BTreeMap<String, BTreeMap<String, f64>>,
    /// Per category (MMLU's stem, humanities, social_sciences, other).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub categories: BTreeMap<String, BTreeMap<String, f64>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestStats {
    /// Requests the tasks built.
    pub total: usize,
    /// Distinct requests the backend answered.
    pub unique: usize,
    /// Distinct requests answered from the cache of an earlier run.
    pub cached: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub results: BTreeMap<String, TaskResult>,
    pub requests: RequestStats,
}

/// Answers keyed by the SHA-256 of the request, kept across runs of one [`Evaluator`] (e.g.
/// checkpoints of a sweep against the same model version).
#[derive(Default)]
pub struct RequestCache {
    answers: HashMap<[u8; 32], Response>,
}

impl RequestCache {
    pub fn key(r: &Request) -> [u8; 32] {
        let bytes = serde_json::to_vec(r).expect("requests serialise");
        Sha256::digest(&bytes).into()
    }
    pub fn get(&self, r: &Request) -> Option<&Response> {
        self.answers.get(&Self::key(r))
    }
    pub fn len(&self) -> usize {
        self.answers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

fn task_options(opts: &EvalOptions) -> TaskOptions {
    TaskOptions {
        limit: opts.limit,
        num_fewshot: opts.num_fewshot,
        seed: opts.seed,
    }
}

/// Builds one task's documents and requests (what an evaluation of it would send), e.g. to
/// check options and data files before queuing a job.
pub fn prepare_task(name: &str, opts: &EvalOptions, data_dir: &Path) -> Result<Prepared> {
    if opts.limit == Some(0) {
        return Err(EvalError::Option("limit must be at least 1".into()));
    }
    get_task(name.trim())?.prepare(data_dir, &task_options(opts))
}

/// Distinct requests each prepared task adds when the tasks run one after another with one
/// [`Evaluator`] (requests an earlier task already asked are answered from its cache).
pub fn distinct_requests(prepared: &[Prepared]) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    prepared
        .iter()
        .map(|p| {
            p.instances
                .iter()
                .flat_map(|i| &i.requests)
                .filter(|r| seen.insert(RequestCache::key(r)))
                .count()
        })
        .collect()
}

/// Evaluates `task_names` with one fresh cache.
pub fn evaluate(
    task_names: &[String],
    opts: &EvalOptions,
    data_dir: &Path,
    backend: &mut dyn LmBackend,
    progress: Progress<'_>,
) -> Result<Results> {
    Evaluator::default().evaluate(task_names, opts, data_dir, backend, progress)
}

#[derive(Default)]
pub struct Evaluator {
    pub cache: RequestCache,
}

impl Evaluator {
    pub fn evaluate(
        &mut self,
        task_names: &[String],
        opts: &EvalOptions,
        data_dir: &Path,
        backend: &mut dyn LmBackend,
        progress: Progress<'_>,
    ) -> Result<Results> {
        if opts.limit == Some(0) {
            return Err(EvalError::Option("limit must be at least 1".into()));
        }
        if task_names.is_empty() {
            return Err(EvalError::Option("no tasks given".into()));
        }
        // Resolve every name before any work, so a typo fails fast.
        let tasks: Vec<Box<dyn Task>> = task_names
            .iter()
            .map(|n| get_task(n.trim()))
            .collect::<Result<_>>()?;
        let topts = task_options(opts);
        let prepared: Vec<Prepared> = tasks
            .iter()
            .map(|t| {
                tracing::info!(task = t.name(), "building requests");
                t.prepare(data_dir, &topts)
            })
            .collect::<Result<_>>()?;
        self.evaluate_prepared(&tasks, &prepared, opts, backend, progress)
    }

    /// Evaluates tasks whose requests are already built (`prepared[i]` of `tasks[i]`, from
    /// [`prepare_task`] with the same `opts`).
    pub fn evaluate_prepared(
        &mut self,
        tasks: &[Box<dyn Task>],
        prepared: &[Prepared],
        opts: &EvalOptions,
        backend: &mut dyn LmBackend,
        progress: Progress<'_>,
    ) -> Result<Results> {
        if tasks.len() != prepared.len() {
            return Err(EvalError::Option(format!(
                "{} tasks but {} prepared request sets",
                tasks.len(),
                prepared.len()
            )));
        }
        let mut stats = RequestStats::default();
        let mut pending: Vec<&Request> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in prepared {
            for inst in &p.instances {
                for r in &inst.requests {
                    stats.total += 1;
                    let k = RequestCache::key(r);
                    if self.cache.answers.contains_key(&k) {
                        if seen.insert(k) {
                            stats.cached += 1;
                        }
                    } else if seen.insert(k) {
                        pending.push(r);
                    }
                }
            }
        }
        stats.unique = pending.len();
        self.answer(pending, backend, progress)?;

        let mut results = BTreeMap::new();
        for (task, p) in tasks.iter().zip(prepared) {
            results.insert(task.name().to_string(), self.score(task.as_ref(), p, opts)?);
        }
        Ok(Results {
            results,
            requests: stats,
        })
    }

    fn answer(
        &mut self,
        pending: Vec<&Request>,
        backend: &mut dyn LmBackend,
        progress: Progress<'_>,
    ) -> Result<()> {
        let total = pending.len();
        let mut done = 0;
        let mut ll: Vec<(&Request, (String, String))> = Vec::new();
        let mut rolling = Vec::new();
        let mut gens = Vec::new();
        for r in pending {
            match r {
                Request::Loglikelihood {
                    context,
                    continuation,
                } => ll.push((r, (context.clone(), continuation.clone()))),
                Request::LoglikelihoodRolling { text } => rolling.push((r, text.clone())),
                Request::GenerateUntil(g) => gens.push((r, g.clone())),
            }
        }
        // Requests whose contexts start alike (a subject's few-shot examples, a question's
        // choices) go together, so the backend computes the shared prefix once per run of
        // chunks; within a cluster, and among the rest, longest first (less padding).
        let cluster = |c: &str| -> String {
            let mut end = c.len().min(CLUSTER_PREFIX_BYTES);
            while !c.is_char_boundary(end) {
                end -= 1;
            }
            c[..end].to_string()
        };
        let mut sizes: HashMap<String, usize> = HashMap::new();
        for (_, (c, _)) in &ll {
            *sizes.entry(cluster(c)).or_default() += 1;
        }
        ll.sort_by_cached_key(|(_, (c, x))| {
            let k = cluster(c);
            let k = if sizes[&k] > 1 { k } else { String::new() };
            (k, std::cmp::Reverse(c.len() + x.len()))
        });
        if !progress(done, total) {
            return Err(EvalError::Cancelled);
        }
        for chunk in ll.chunks(LOGLIKELIHOOD_CHUNK) {
            let pairs: Vec<(String, String)> = chunk.iter().map(|(_, p)| p.clone()).collect();
            let out = backend.loglikelihood(&pairs)?;
            check_len(out.len(), pairs.len())?;
            for ((r, _), (logprob, is_greedy)) in chunk.iter().zip(out) {
                self.cache.answers.insert(
                    RequestCache::key(r),
                    Response::Loglikelihood { logprob, is_greedy },
                );
            }
            done += chunk.len();
            if !progress(done, total) {
                return Err(EvalError::Cancelled);
            }
        }
        for (r, text) in rolling {
            let out = backend.loglikelihood_rolling(std::slice::from_ref(&text))?;
            check_len(out.len(), 1)?;
            let (logprob, tokens) = out[0];
            self.cache
                .answers
                .insert(RequestCache::key(r), Response::Rolling { logprob, tokens });
            done += 1;
            if !progress(done, total) {
                return Err(EvalError::Cancelled);
            }
        }
        for (r, g) in gens {
            let out = backend.generate_until(std::slice::from_ref(&g))?;
            check_len(out.len(), 1)?;
            let text = out.into_iter().next().unwrap_or_default();
            self.cache
                .answers
                .insert(RequestCache::key(r), Response::Text(text));
            done += 1;
            if !progress(done, total) {
                return Err(EvalError::Cancelled);
            }
        }
        Ok(())
    }

    fn score(&self, task: &dyn Task, p: &Prepared, opts: &EvalOptions) -> Result<TaskResult> {
        let mut all: Vec<(String, Sample)> = Vec::new();
        let mut by_sub: BTreeMap<String, Vec<(String, Sample)>> = BTreeMap::new();
        let mut n_requests = 0;
        for inst in &p.instances {
            let responses: Vec<Response> =
                inst.requests
                    .iter()
                    .map(|r| {
                        self.cache.get(r).cloned().ok_or_else(|| {
                            EvalError::Backend("a request was left unanswered".into())
                        })
                    })
                    .collect::<Result<_>>()?;
            n_requests += responses.len();
            let samples = inst.score(&responses);
            if let Some(s) = &inst.subtask {
                by_sub
                    .entry(s.clone())
                    .or_default()
                    .extend(samples.iter().cloned());
            }
            all.extend(samples);
        }
        let mut categories = BTreeMap::new();
        if !p.categories.is_empty() {
            let mut by_cat: BTreeMap<String, Vec<(String, Sample)>> = BTreeMap::new();
            for (sub, cat) in &p.categories {
                if let Some(s) = by_sub.get(sub) {
                    by_cat
                        .entry(cat.clone())
                        .or_default()
                        .extend(s.iter().cloned());
                }
            }
            categories = by_cat
                .into_iter()
                .map(|(c, s)| (c, aggregate(&s)))
                .collect();
        }
        Ok(TaskResult {
            metrics: aggregate(&all),
            meta: TaskMeta {
                task: task.name().to_string(),
                version: task.version().to_string(),
                num_fewshot: p.num_fewshot,
                fewshot_seed: FEWSHOT_SEED,
                limit: opts.limit,
                seed: opts.seed,
                n_docs: p.instances.len(),
                n_requests,
                data_files: p.data_files.clone(),
                note: task.note().map(str::to_string),
            },
            subtasks: by_sub
                .into_iter()
                .map(|(s, v)| (s, aggregate(&v)))
                .collect(),
            categories,
        })
    }
}

fn check_len(got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(EvalError::Backend(format!(
            "{got} answers for {want} requests"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::eval::request::GenRequest;

    /// Scores a continuation by minus its length, so the shortest choice wins; counts calls.
    #[derive(Default)]
    struct Fake {
        pairs: usize,
    }

    impl LmBackend for Fake {
        fn loglikelihood(&mut self, r: &[(String, String)]) -> Result<Vec<(f64, bool)>> {
            self.pairs += r.len();
            Ok(r.iter()
                .map(|(_, c)| (-(c.len() as f64), c == " No"))
                .collect())
        }
        fn loglikelihood_rolling(&mut self, t: &[String]) -> Result<Vec<(f64, usize)>> {
            Ok(t.iter().map(|t| (-(t.len() as f64), t.len())).collect())
        }
        fn generate_until(&mut self, r: &[GenRequest]) -> Result<Vec<String>> {
            Ok(r.iter().map(|_| String::new()).collect())
        }
    }

    fn fixtures() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/data")
    }

    #[test]
    fn dedup_cache_progress_and_cancel() {
        let names = vec!["toxigen".to_string(), "toxigen".to_string()];
        let mut ev = Evaluator::default();
        let mut fake = Fake::default();
        let mut seen = Vec::new();
        let r = ev
            .evaluate(
                &names,
                &EvalOptions::default(),
                &fixtures(),
                &mut fake,
                &mut |d, t| {
                    seen.push((d, t));
                    true
                },
            )
            .unwrap();
        // the same task twice builds its 6 requests twice; each is answered once
        assert_eq!((r.requests.total, r.requests.unique), (12, 6));
        assert_eq!(fake.pairs, 6);
        assert_eq!(seen.first(), Some(&(0, 6)));
        assert_eq!(seen.last(), Some(&(6, 6)));
        // " No" (shorter) always wins; gold is No only for the fixture's first row (row 3 sums
        // to 5.57, just above lm-eval's 5.5 threshold)
        let m = &r.results["toxigen"].metrics;
        assert!((m["acc"] - 1.0 / 3.0).abs() < 1e-12, "{m:?}");
        // a second run is answered from the cache
        let r2 = ev
            .evaluate(
                &names,
                &EvalOptions::default(),
                &fixtures(),
                &mut fake,
                &mut |_, _| true,
            )
            .unwrap();
        assert_eq!((r2.requests.unique, r2.requests.cached), (0, 6));
        assert_eq!(fake.pairs, 6);
        // cancelling stops the run
        let e = evaluate(
            &names,
            &EvalOptions::default(),
            &fixtures(),
            &mut fake,
            &mut |_, _| false,
        )
        .unwrap_err();
        assert!(matches!(e, EvalError::Cancelled));
    }

    #[test]
    fn bad_options_and_names() {
        let mut fake = Fake::default();
        let opts = EvalOptions {
            limit: Some(0),
            ..Default::default()
        };
        let e = evaluate(
            &["toxigen".into()],
            &opts,
            &fixtures(),
            &mut fake,
            &mut |_, _| true,
        );
        assert!(matches!(e, Err(EvalError::Option(_))));
        let e = evaluate(
            &["toxigen".into(), "nope".into()],
            &EvalOptions::default(),
            &fixtures(),
            &mut fake,
            &mut |_, _| true,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`nope`"));
        assert_eq!(fake.pairs, 0, "nothing ran");
    }
}
