//! `sciq`: "{support}\nQuestion: {q}\nAnswer:" over the three distractors then the correct
//! answer (gold index 3), as lm-eval orders them.
use std::path::Path;

use serde::Deserialize;

use super::{multiple_choice, zero_shot_only, Prepared, Task, TaskOptions};
use crate::engine::eval::data::{digest, read_json, select};
use crate::engine::eval::error::Result;

pub const FILE: &str = "sciq/test.json";

pub struct Sciq;

#[derive(Debug, Deserialize)]
pub struct Doc {
    pub question: String,
    pub distractor1: String,
    pub distractor2: String,
    pub distractor3: String,
    pub correct_answer: String,
    pub support: String,
}

impl Task for Sciq {
    fn name(&self) -> &'static str {
        "sciq"
    }
    fn version(&self) -> &'static str {
        "1.0"
    }
    fn default_num_fewshot(&self) -> usize {
        0
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = zero_shot_only(self.name(), opts)?;
        let docs: Vec<Doc> = read_json(&data_dir.join(FILE))?;
        let instances = select(docs.len(), opts.limit, opts.seed)
            .into_iter()
            .map(|i| {
                let d = &docs[i];
                multiple_choice(
                    i,
                    format!(
                        "{}\nQuestion: {}\nAnswer:",
                        d.support.trim_start(),
                        d.question
                    ),
                    vec![
                        d.distractor1.clone(),
                        d.distractor2.clone(),
                        d.distractor3.clone(),
                        d.correct_answer.clone(),
                    ],
                    3,
                    true,
                )
            })
            .collect();
        Ok(Prepared {
            instances,
            num_fewshot,
            data_files: vec![digest(data_dir, FILE)?],
            categories: Vec::new(),
        })
    }
}
