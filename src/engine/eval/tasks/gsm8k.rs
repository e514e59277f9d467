//! `gsm8k`: "Question: {q}\nAnswer:" with 5 examples drawn from train (lm-eval's
//! `random.Random(1234).sample`, one draw per evaluated document in order), greedy generation
//! until "Question:", and exact match of the extracted number: `strict-match` (after "#### ")
//! and `flexible-extract` (the last number in the output).
use std::path::Path;

use regex::Regex;
use serde::Deserialize;

use super::{
    fewshot_context, Filter, FilterKind, Instance, Prepared, Scorer, Shot, Task, TaskOptions,
    FEWSHOT_SEED, TARGET_DELIMITER,
};
use crate::engine::eval::data::{digest, read_jsonl, select};
use crate::engine::eval::error::Result;
use crate::engine::eval::metrics::ExactMatch;
use crate::engine::eval::pyrandom::PyRandom;
use crate::engine::eval::request::{GenRequest, Request, DEFAULT_MAX_GEN_TOKS};

pub const TEST: &str = "gsm8k/test.jsonl";
pub const TRAIN: &str = "gsm8k/train.jsonl";
pub const UNTIL: [&str; 3] = ["Question:", "</s>", "<|im_end|>"];

pub struct Gsm8k;

#[derive(Debug, Deserialize)]
pub struct Doc {
    pub question: String,
    pub answer: String,
}

impl Doc {
    pub fn text(&self) -> String {
        format!("Question: {}\nAnswer:", self.question)
    }
}

fn re(p: &str) -> Regex {
    Regex::new(p).expect("valid regex")
}

pub fn filters() -> Vec<Filter> {
    vec![
        Filter {
            name: Some("strict-match"),
            kind: FilterKind::Regex {
                re: re(r"#### (\-?[0-9\.\,]+)"),
                group_select: 0,
            },
        },
        Filter {
            name: Some("flexible-extract"),
            kind: FilterKind::Regex {
                re: re(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"),
                group_select: -1,
            },
        },
    ]
}

pub fn matcher() -> ExactMatch {
    ExactMatch {
        regexes_to_ignore: [",", r"\$", r"(?s).*#### ", r"\.$"]
            .iter()
            .map(|p| re(p))
            .collect(),
        ignore_case: true,
        ignore_punctuation: false,
    }
}

impl Task for Gsm8k {
    fn name(&self) -> &'static str {
        "gsm8k"
    }
    fn version(&self) -> &'static str {
        "3.0"
    }
    fn default_num_fewshot(&self) -> usize {
        5
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = opts.num_fewshot.unwrap_or(5);
        let docs: Vec<Doc> = read_jsonl(&data_dir.join(TEST))?;
        let mut data_files = vec![digest(data_dir, TEST)?];
        let pool: Vec<Doc> = if num_fewshot > 0 {
            data_files.push(digest(data_dir, TRAIN)?);
            read_jsonl(&data_dir.join(TRAIN))?
        } else {
            Vec::new()
        };
        let mut rng = PyRandom::new(FEWSHOT_SEED);
        let (filters, matcher) = (filters(), matcher());
        let instances = select(docs.len(), opts.limit, opts.seed)
            .into_iter()
            .map(|i| {
                let d = &docs[i];
                let shots: Vec<Shot> = if num_fewshot > 0 {
                    rng.sample(pool.len(), num_fewshot)
                        .into_iter()
                        .map(|j| Shot {
                            text: pool[j].text(),
                            target: pool[j].answer.clone(),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                Instance {
                    doc_id: i,
                    subtask: None,
                    requests: vec![Request::GenerateUntil(GenRequest {
                        context: fewshot_context("", &shots, TARGET_DELIMITER, &d.text()),
                        until: UNTIL.iter().map(|s| s.to_string()).collect(),
                        max_gen_toks: DEFAULT_MAX_GEN_TOKS,
                    })],
                    scorer: Scorer::Generation {
                        references: vec![d.answer.clone()],
                        filters: filters.clone(),
                        matcher: matcher.clone(),
                    },
                }
            })
            .collect();
        Ok(Prepared {
            instances,
            num_fewshot,
            data_files,
            categories: Vec::new(),
        })
    }
}
