//! `hellaswag`: the validation split in the public `hellaswag_val.jsonl` format (`ctx_a`,
//! `ctx_b`, `activity_label`, `endings`, `label`), preprocessed as lm-eval does: query
//! `"{activity_label}: {ctx_a} {Ctx_b}"`, WikiHow `[title]` markers turned into sentence breaks
//! and other bracketed tags removed. The data is not in the shared directory yet; the loader is
//! tested on a small file written in that format.
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;

use super::{multiple_choice, zero_shot_only, Prepared, Task, TaskOptions};
use crate::engine::eval::data::{digest, read_jsonl, select};
use crate::engine::eval::error::{EvalError, Result};

pub const FILE: &str = "hellaswag/hellaswag_val.jsonl";

pub struct Hellaswag;

#[derive(Debug, Deserialize)]
pub struct Doc {
    pub activity_label: String,
    pub ctx_a: String,
    pub ctx_b: String,
    pub endings: Vec<String>,
    /// An integer in the original release, a string in the Hugging Face copy.
    pub label: serde_json::Value,
}

static BRACKETED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\[.*?\]").expect("valid regex"));

pub fn preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    BRACKETED.replace_all(&t, "").replace("  ", " ")
}

/// Python's `str.capitalize`: first character upper case, the rest lower case.
pub fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f
            .to_uppercase()
            .chain(c.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

impl Doc {
    pub fn query(&self) -> String {
        let ctx = format!("{} {}", self.ctx_a, capitalize(&self.ctx_b));
        preprocess(&format!("{}: {ctx}", self.activity_label))
    }
    pub fn choices(&self) -> Vec<String> {
        self.endings.iter().map(|e| preprocess(e)).collect()
    }
    pub fn gold(&self) -> Option<usize> {
        match &self.label {
            serde_json::Value::Number(n) => n.as_u64().map(|x| x as usize),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .filter(|&g| g < self.endings.len())
    }
}

impl Task for Hellaswag {
    fn name(&self) -> &'static str {
        "hellaswag"
    }
    fn version(&self) -> &'static str {
        "1.0"
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
            let gold = d.gold().ok_or_else(|| {
                EvalError::data(&path, format!("row {}: bad label {}", i + 1, d.label))
            })?;
            instances.push(multiple_choice(i, d.query(), d.choices(), gold, true));
        }
        Ok(Prepared {
            instances,
            num_fewshot,
            data_files: vec![digest(data_dir, FILE)?],
            categories: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing() {
        assert_eq!(capitalize("then, the MAN"), "Then, the man");
        assert_eq!(
            preprocess(" Clean the sink [title] Rinse it [step] well.  "),
            "Clean the sink. Rinse it well."
        );
    }
}
