//! Benchmark tasks: each turns dataset files into requests with lm-evaluation-harness's prompt
//! format and says how the answers score. One file per family; the registry maps names to them.
use std::path::Path;

use super::data::FileDigest;
use super::error::{EvalError, Result};
use super::metrics::{self, ExactMatch, Sample};
use super::request::{Request, Response};

pub mod arc;
pub mod bbh;
pub mod commonsense_qa;
pub mod gsm8k;
pub mod hellaswag;
pub mod lambada;
pub mod mmlu;
pub mod piqa;
pub mod sciq;
pub mod toxigen;
pub mod triviaqa;
pub mod truthfulqa;
pub mod wikitext;

/// lm-eval's defaults (`TaskConfig`).
pub const TARGET_DELIMITER: &str = " ";
pub const FEWSHOT_DELIMITER: &str = "\n\n";
/// lm-eval's default `fewshot_random_seed`.
pub const FEWSHOT_SEED: u64 = 1234;

/// Per-run choices that change which documents and prompts a task produces.
#[derive(Debug, Clone, Default)]
pub struct TaskOptions {
    /// Documents to evaluate (per subtask for MMLU and BBH, as lm-eval applies `--limit`).
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    /// With `limit`: evaluate a seeded uniform sample instead of the first documents.
    pub seed: Option<u64>,
}

/// How a document's responses turn into metric samples.
#[derive(Debug, Clone)]
pub enum Scorer {
    /// One loglikelihood request per choice: `acc` and, when `norm`, `acc_norm`.
    MultipleChoice {
        choices: Vec<String>,
        gold: usize,
        norm: bool,
    },
    /// TruthfulQA MC2 over one request per answer, each labelled true or false.
    Mc2 { labels: Vec<bool> },
    /// One loglikelihood request (LAMBADA): `acc` = greedy, `perplexity` of the target.
    TargetWord,
    /// One rolling request: word and byte perplexity, bits per byte of the original text.
    Rolling { words: usize, bytes: usize },
    /// One generation, scored per filter as `exact_match[,filter]` against any reference.
    Generation {
        references: Vec<String>,
        filters: Vec<Filter>,
        matcher: ExactMatch,
    },
}

/// A named answer extraction applied to generated text before matching.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Metric suffix; `None` reports plain `exact_match`.
    pub name: Option<&'static str>,
    pub kind: FilterKind,
}

#[derive(Debug, Clone)]
pub enum FilterKind {
    /// Leading and trailing whitespace removed.
    Strip,
    Regex {
        re: regex::Regex,
        group_select: isize,
    },
}

impl Filter {
    pub fn apply(&self, text: &str) -> String {
        match &self.kind {
            FilterKind::Strip => text.trim().to_string(),
            FilterKind::Regex { re, group_select } => {
                metrics::regex_extract(re, text, *group_select)
            }
        }
    }
}

/// One evaluated document: its requests and how to score their answers.
#[derive(Debug, Clone)]
pub struct Instance {
    pub doc_id: usize,
    /// Subtask (MMLU subject, BBH task) for the per-subtask breakdown.
    pub subtask: Option<String>,
    pub requests: Vec<Request>,
    pub scorer: Scorer,
}

impl Instance {
    pub fn score(&self, responses: &[Response]) -> Vec<(String, Sample)> {
        match &self.scorer {
            Scorer::MultipleChoice {
                choices,
                gold,
                norm,
            } => {
                let lls: Vec<f64> = responses.iter().map(Response::logprob).collect();
                let (acc, acc_norm) = metrics::multiple_choice(&lls, choices, *gold);
                let mut v = vec![("acc".to_string(), Sample::Mean(acc))];
                if *norm {
                    v.push(("acc_norm".into(), Sample::Mean(acc_norm)));
                }
                v
            }
            Scorer::Mc2 { labels } => {
                let lls: Vec<f64> = responses.iter().map(Response::logprob).collect();
                vec![("acc".into(), Sample::Mean(metrics::mc2(&lls, labels)))]
            }
            Scorer::TargetWord => {
                let r = &responses[0];
                vec![
                    ("perplexity".into(), Sample::Perplexity(r.logprob())),
                    ("acc".into(), Sample::Mean(r.is_greedy() as u8 as f64)),
                ]
            }
            Scorer::Rolling { words, bytes } => {
                let ll = responses[0].logprob();
                vec![
                    (
                        "word_perplexity".into(),
                        Sample::WeightedPerplexity(ll, *words as f64),
                    ),
                    (
                        "byte_perplexity".into(),
                        Sample::WeightedPerplexity(ll, *bytes as f64),
                    ),
                    (
                        "bits_per_byte".into(),
                        Sample::BitsPerByte(ll, *bytes as f64),
                    ),
                ]
            }
            Scorer::Generation {
                references,
                filters,
                matcher,
            } => {
                let text = responses[0].text();
                filters
                    .iter()
                    .map(|f| {
                        let name = match f.name {
                            Some(n) => format!("exact_match,{n}"),
                            None => "exact_match".to_string(),
                        };
                        (
                            name,
                            Sample::Mean(matcher.score(&f.apply(text), references)),
                        )
                    })
                    .collect()
            }
        }
    }
}

/// Documents and requests of one task, with what the result must record.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub instances: Vec<Instance>,
    pub num_fewshot: usize,
    pub data_files: Vec<FileDigest>,
    /// Subtask → category (MMLU) for a second breakdown level.
    pub categories: Vec<(String, String)>,
}

pub trait Task: Send + Sync {
    fn name(&self) -> &'static str;
    /// The lm-eval task version whose format this reproduces.
    fn version(&self) -> &'static str;
    fn default_num_fewshot(&self) -> usize;
    /// Caveats to report beside the score (e.g. a data split that differs from lm-eval's).
    fn note(&self) -> Option<&'static str> {
        None
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared>;
}

/// Every task, in the order `list_tasks` shows them.
pub fn registry() -> Vec<Box<dyn Task>> {
    vec![
        Box::new(lambada::LambadaOpenai),
        Box::new(wikitext::Wikitext),
        Box::new(arc::Arc::Easy),
        Box::new(arc::Arc::Challenge),
        Box::new(piqa::Piqa),
        Box::new(sciq::Sciq),
        Box::new(hellaswag::Hellaswag),
        Box::new(mmlu::Mmlu),
        Box::new(commonsense_qa::CommonsenseQa),
        Box::new(truthfulqa::TruthfulQa::Mc1),
        Box::new(truthfulqa::TruthfulQa::Mc2),
        Box::new(gsm8k::Gsm8k),
        Box::new(bbh::Bbh),
        Box::new(triviaqa::TriviaQa),
        Box::new(toxigen::Toxigen),
    ]
}

pub fn list_tasks() -> Vec<&'static str> {
    registry().iter().map(|t| t.name()).collect()
}

pub fn get_task(name: &str) -> Result<Box<dyn Task>> {
    registry()
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| EvalError::UnknownTask {
            name: name.to_string(),
            known: list_tasks().join(", "),
        })
}

/// A few-shot example: its prompt and its target text.
pub struct Shot {
    pub text: String,
    pub target: String,
}

/// lm-eval's plain-text context: description, then each example as
/// `text + target_delimiter + target + fewshot_delimiter`, then the document's text.
pub fn fewshot_context(
    description: &str,
    shots: &[Shot],
    target_delim: &str,
    text: &str,
) -> String {
    let mut out = description.to_string();
    for s in shots {
        out.push_str(&s.text);
        out.push_str(target_delim);
        out.push_str(&s.target);
        out.push_str(FEWSHOT_DELIMITER);
    }
    out.push_str(text);
    out
}

/// Requests and scorer of a multiple-choice document: one loglikelihood per choice with
/// continuation `" " + choice`.
pub fn multiple_choice(
    doc_id: usize,
    context: String,
    choices: Vec<String>,
    gold: usize,
    norm: bool,
) -> Instance {
    let requests = choices
        .iter()
        .map(|c| Request::Loglikelihood {
            context: context.clone(),
            continuation: format!("{TARGET_DELIMITER}{c}"),
        })
        .collect();
    Instance {
        doc_id,
        subtask: None,
        requests,
        scorer: Scorer::MultipleChoice {
            choices,
            gold,
            norm,
        },
    }
}

/// Rejects a few-shot count for a task that has no few-shot pool.
pub fn zero_shot_only(task: &str, opts: &TaskOptions) -> Result<usize> {
    match opts.num_fewshot {
        None | Some(0) => Ok(0),
        Some(n) => Err(EvalError::Option(format!(
            "{task} has no few-shot split here; num_fewshot must be 0 (got {n})"
        ))),
    }
}
