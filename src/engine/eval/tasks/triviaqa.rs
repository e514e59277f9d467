//! `triviaqa`: "Question: {q}?\nAnswer:", greedy generation until a newline, "." or ",", and
//! exact match (case and punctuation ignored) against any alias. The data here is TriviaQA's
//! unfiltered validation set in DPR's `.qa.csv` layout, not the `rc.nocontext` validation split
//! lm-eval scores (17,944 rows): scores are not directly comparable.
use std::path::Path;

use super::{
    fewshot_context, Filter, FilterKind, Instance, Prepared, Scorer, Shot, Task, TaskOptions,
    FEWSHOT_SEED, TARGET_DELIMITER,
};
use crate::engine::eval::data::{digest, parse_csv, parse_py_str_list, read_text, select};
use crate::engine::eval::error::{EvalError, Result};
use crate::engine::eval::metrics::ExactMatch;
use crate::engine::eval::pyrandom::PyRandom;
use crate::engine::eval::request::{GenRequest, Request, DEFAULT_MAX_GEN_TOKS};

pub const TEST: &str = "triviaqa/topics.dpr.trivia.test.txt";
/// DPR's dev set, drawn from the unfiltered training set: the few-shot pool.
pub const DEV: &str = "triviaqa/topics.dpr.trivia.dev.txt";
pub const UNTIL: [&str; 3] = ["\n", ".", ","];
pub const NOTE: &str = "data: TriviaQA unfiltered validation set in DPR's layout, not the \
rc.nocontext validation split lm-evaluation-harness uses";

pub struct TriviaQa;

#[derive(Debug, Clone)]
pub struct Doc {
    pub question: String,
    pub aliases: Vec<String>,
}

impl Doc {
    pub fn text(&self) -> String {
        format!("Question: {}?\nAnswer:", self.question)
    }
}

/// One question per line: the question, a tab, the aliases as a Python list literal (both
/// fields CSV-quoted when they hold a double quote).
pub fn load(path: &Path) -> Result<Vec<Doc>> {
    parse_csv(&read_text(path)?, '\t')
        .into_iter()
        .enumerate()
        .filter(|(_, r)| !(r.len() == 1 && r[0].trim().is_empty()))
        .map(|(i, r)| {
            let bad = || {
                EvalError::data(
                    path,
                    format!("line {}: not `question<TAB>[aliases]`", i + 1),
                )
            };
            if r.len() != 2 {
                return Err(bad());
            }
            Ok(Doc {
                question: r[0].clone(),
                aliases: parse_py_str_list(&r[1]).ok_or_else(bad)?,
            })
        })
        .collect()
}

impl Task for TriviaQa {
    fn name(&self) -> &'static str {
        "triviaqa"
    }
    fn version(&self) -> &'static str {
        "3.0"
    }
    fn default_num_fewshot(&self) -> usize {
        0
    }
    fn note(&self) -> Option<&'static str> {
        Some(NOTE)
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = opts.num_fewshot.unwrap_or(0);
        let docs = load(&data_dir.join(TEST))?;
        let mut data_files = vec![digest(data_dir, TEST)?];
        let pool = if num_fewshot > 0 {
            data_files.push(digest(data_dir, DEV)?);
            load(&data_dir.join(DEV))?
        } else {
            Vec::new()
        };
        let mut rng = PyRandom::new(FEWSHOT_SEED);
        let filters = vec![Filter {
            name: Some("remove_whitespace"),
            kind: FilterKind::Strip,
        }];
        let matcher = ExactMatch {
            ignore_case: true,
            ignore_punctuation: true,
            ..Default::default()
        };
        let instances = select(docs.len(), opts.limit, opts.seed)
            .into_iter()
            .map(|i| {
                let d = &docs[i];
                // lm-eval shows a few-shot example's first alias as its answer.
                let shots: Vec<Shot> = if num_fewshot > 0 {
                    rng.sample(pool.len(), num_fewshot)
                        .into_iter()
                        .map(|j| Shot {
                            text: pool[j].text(),
                            target: pool[j].aliases.first().cloned().unwrap_or_default(),
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
                        references: d.aliases.clone(),
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
