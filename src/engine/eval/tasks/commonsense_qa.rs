//! `commonsense_qa`: "Question: {q}\nA. ..\nE. ..\nAnswer:" over " A" … " E", on the
//! validation split (`dev_rand_split.jsonl`), as lm-eval scores it.
use std::path::Path;

use serde::Deserialize;

use super::{multiple_choice, zero_shot_only, Prepared, Task, TaskOptions};
use crate::engine::eval::data::{digest, read_jsonl, select};
use crate::engine::eval::error::{EvalError, Result};

pub const FILE: &str = "commonsense_qa/dev_rand_split.jsonl";
const LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];

pub struct CommonsenseQa;

#[derive(Debug, Deserialize)]
pub struct Choices {
    pub label: Vec<String>,
    pub text: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct Doc {
    pub question: String,
    pub choices: Choices,
    #[serde(rename = "answerKey")]
    pub answer_key: String,
}

impl Doc {
    pub fn text(&self) -> String {
        let mut s = format!("Question: {}", self.question.trim());
        for (l, t) in LETTERS.iter().zip(&self.choices.text) {
            s.push_str(&format!("\n{l}. {t}"));
        }
        s.push_str("\nAnswer:");
        s
    }
}

impl Task for CommonsenseQa {
    fn name(&self) -> &'static str {
        "commonsense_qa"
    }
    /// lm-eval's config carries no `metadata.version`.
    fn version(&self) -> &'static str {
        "none"
    }
    fn default_num_fewshot(&self) -> usize {
        0
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = zero_shot_only(self.name(), opts)?;
        let path = data_dir.join(FILE);
        let docs: Vec<Doc> = read_jsonl(&path)?;
        let mut instances = Vec::new();
        for i in select(docs.len(), opts.limit, opts.seed) {
            let d = &docs[i];
            if d.choices.text.len() != 5 {
                return Err(EvalError::data(
                    &path,
                    format!("row {}: not 5 choices", i + 1),
                ));
            }
            // lm-eval maps the answer letter to its position among the choice letters.
            let gold = LETTERS
                .iter()
                .position(|l| *l == d.answer_key.trim_start())
                .ok_or_else(|| {
                    EvalError::data(
                        &path,
                        format!("row {}: answerKey `{}`", i + 1, d.answer_key),
                    )
                })?;
            let choices = LETTERS.iter().map(|l| l.to_string()).collect();
            instances.push(multiple_choice(i, d.text(), choices, gold, false));
        }
        Ok(Prepared {
            instances,
            num_fewshot,
            data_files: vec![digest(data_dir, FILE)?],
            categories: Vec::new(),
        })
    }
}
