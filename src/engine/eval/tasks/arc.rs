//! `arc_easy`, `arc_challenge`: "Question: {q}\nAnswer:" scored over `" " + choice text`.
//! The gold index is the position of `answerKey` among the labels (`A`–`E` or `1`–`5`).
use std::path::Path;

use serde::Deserialize;

use super::{
    fewshot_context, multiple_choice, Prepared, Shot, Task, TaskOptions, FEWSHOT_SEED,
    TARGET_DELIMITER,
};
use crate::engine::eval::data::{digest, read_jsonl, select};
use crate::engine::eval::error::{EvalError, Result};
use crate::engine::eval::pyrandom::PyRandom;

#[derive(Debug, Clone, Copy)]
pub enum Arc {
    Easy,
    Challenge,
}

#[derive(Debug, Deserialize)]
pub struct Choices {
    pub text: Vec<String>,
    pub label: Vec<String>,
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
        format!("Question: {}\nAnswer:", self.question)
    }
    pub fn gold(&self) -> Option<usize> {
        self.choices
            .label
            .iter()
            .position(|l| *l == self.answer_key)
    }
}

impl Arc {
    fn file(self, split: &str) -> String {
        let set = match self {
            Arc::Easy => "Easy",
            Arc::Challenge => "Challenge",
        };
        format!("arc/ARC-{set}-{split}.jsonl")
    }
}

pub fn load(path: &Path) -> Result<Vec<Doc>> {
    let docs: Vec<Doc> = read_jsonl(path)?;
    if let Some((i, _)) = docs.iter().enumerate().find(|(_, d)| d.gold().is_none()) {
        return Err(EvalError::data(
            path,
            format!("row {}: answerKey not among the labels", i + 1),
        ));
    }
    Ok(docs)
}

impl Task for Arc {
    fn name(&self) -> &'static str {
        match self {
            Arc::Easy => "arc_easy",
            Arc::Challenge => "arc_challenge",
        }
    }
    fn version(&self) -> &'static str {
        "1.0"
    }
    fn default_num_fewshot(&self) -> usize {
        0
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let test = self.file("test");
        let docs = load(&data_dir.join(&test))?;
        let num_fewshot = opts.num_fewshot.unwrap_or(0);
        let mut data_files = vec![digest(data_dir, &test)?];
        // lm-eval draws few-shot examples from the train split with random.Random(1234).
        let pool = if num_fewshot > 0 {
            let train = self.file("train");
            data_files.push(digest(data_dir, &train)?);
            load(&data_dir.join(&train))?
        } else {
            Vec::new()
        };
        let mut rng = PyRandom::new(FEWSHOT_SEED);
        let instances = select(docs.len(), opts.limit, opts.seed)
            .into_iter()
            .map(|i| {
                let d = &docs[i];
                let shots: Vec<Shot> = if num_fewshot > 0 {
                    rng.sample(pool.len(), num_fewshot)
                        .into_iter()
                        .map(|j| {
                            let s = &pool[j];
                            Shot {
                                text: s.text(),
                                target: s.choices.text[s.gold().expect("checked")].clone(),
                            }
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let ctx = fewshot_context("", &shots, TARGET_DELIMITER, &d.text());
                multiple_choice(
                    i,
                    ctx,
                    d.choices.text.clone(),
                    d.gold().expect("checked"),
                    true,
                )
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
