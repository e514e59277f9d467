//! `lambada_openai`: predict the last word of a passage (OpenAI's detokenized LAMBADA).
//! Context = every space-separated word but the last; continuation = `" " + last word`.
use std::path::Path;

use serde::Deserialize;

use super::{zero_shot_only, Instance, Prepared, Scorer, Task, TaskOptions};
use crate::engine::eval::data::{digest, read_jsonl, select};
use crate::engine::eval::error::Result;
use crate::engine::eval::request::Request;

pub const FILE: &str = "lambada/lambada_test.jsonl";

pub struct LambadaOpenai;

#[derive(Deserialize)]
struct Doc {
    text: String,
}

/// lm-eval splits on single spaces (`text.split(' ')`), not on any whitespace.
pub fn split_last_word(text: &str) -> (String, String) {
    match text.rfind(' ') {
        Some(i) => (text[..i].to_string(), format!(" {}", &text[i + 1..])),
        None => (String::new(), format!(" {text}")),
    }
}

impl Task for LambadaOpenai {
    fn name(&self) -> &'static str {
        "lambada_openai"
    }
    fn version(&self) -> &'static str {
        "1.0"
    }
    fn default_num_fewshot(&self) -> usize {
        0
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = zero_shot_only(self.name(), opts)?;
        let docs: Vec<Doc> = read_jsonl(&data_dir.join(FILE))?;
        let instances = select(docs.len(), opts.limit, opts.seed)
            .into_iter()
            .map(|i| {
                let (context, continuation) = split_last_word(&docs[i].text);
                Instance {
                    doc_id: i,
                    subtask: None,
                    requests: vec![Request::Loglikelihood {
                        context,
                        continuation,
                    }],
                    scorer: Scorer::TargetWord,
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_word_split() {
        assert_eq!(
            split_last_word("a b\nc d"),
            ("a b\nc".to_string(), " d".to_string())
        );
        // a newline is not a separator for lm-eval's split(' ')
        assert_eq!(
            split_last_word("x y\nz"),
            ("x".to_string(), " y\nz".to_string())
        );
    }
}
