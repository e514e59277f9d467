//! `piqa`: "Question: {goal}\nAnswer:" over `[sol1, sol2]`; labels come from the aligned
//! `valid-labels.lst` of the original release.
use std::path::Path;

use serde::Deserialize;

use super::{multiple_choice, zero_shot_only, Prepared, Task, TaskOptions};
use crate::engine::eval::data::{digest, read_jsonl, read_text, select};
use crate::engine::eval::error::{EvalError, Result};

pub const FILE: &str = "piqa/valid.jsonl";
pub const LABELS: &str = "piqa/valid-labels.lst";

pub struct Piqa;

#[derive(Debug, Deserialize)]
pub struct Doc {
    pub goal: String,
    pub sol1: String,
    pub sol2: String,
}

pub fn load(data_dir: &Path) -> Result<Vec<(Doc, usize)>> {
    let docs: Vec<Doc> = read_jsonl(&data_dir.join(FILE))?;
    let labels_path = data_dir.join(LABELS);
    let labels: Vec<usize> = read_text(&labels_path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| match l.trim() {
            "0" => Ok(0),
            "1" => Ok(1),
            x => Err(EvalError::data(
                &labels_path,
                format!("line {}: label `{x}` is not 0 or 1", i + 1),
            )),
        })
        .collect::<Result<_>>()?;
    if labels.len() != docs.len() {
        return Err(EvalError::data(
            &labels_path,
            format!("{} labels for {} questions", labels.len(), docs.len()),
        ));
    }
    Ok(docs.into_iter().zip(labels).collect())
}

impl Task for Piqa {
    fn name(&self) -> &'static str {
        "piqa"
    }
    fn version(&self) -> &'static str {
        "1.0"
    }
    fn default_num_fewshot(&self) -> usize {
        0
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = zero_shot_only(self.name(), opts)?;
        let docs = load(data_dir)?;
        let instances = select(docs.len(), opts.limit, opts.seed)
            .into_iter()
            .map(|i| {
                let (d, gold) = &docs[i];
                multiple_choice(
                    i,
                    format!("Question: {}\nAnswer:", d.goal),
                    vec![d.sol1.clone(), d.sol2.clone()],
                    *gold,
                    true,
                )
            })
            .collect();
        Ok(Prepared {
            instances,
            num_fewshot,
            data_files: vec![digest(data_dir, FILE)?, digest(data_dir, LABELS)?],
            categories: Vec::new(),
        })
    }
}
