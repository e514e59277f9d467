//! `bbh` (lm-eval's `bbh_cot_fewshot`): 27 BIG-Bench Hard tasks, each prompted with its task
//! description and the 3 chain-of-thought examples of `cot-prompts/<task>.txt`, as
//! "Q: {input}\nA: Let's think step by step.\n{reasoning}" joined by blank lines; generation
//! until "Q" or a blank line (at most 1024 tokens); the answer is what follows "the answer is "
//! up to the line's last character, matched exactly. `limit` applies per task.
use std::path::Path;

use regex::Regex;
use serde::Deserialize;

use super::{
    fewshot_context, Filter, FilterKind, Instance, Prepared, Scorer, Shot, Task, TaskOptions,
};
use crate::engine::eval::data::{digest, read_json, read_text, select};
use crate::engine::eval::error::{EvalError, Result};
use crate::engine::eval::metrics::ExactMatch;
use crate::engine::eval::request::{GenRequest, Request};

pub const SUBTASKS: [&str; 27] = [
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
];
pub const UNTIL: [&str; 3] = ["</s>", "Q", "\n\n"];
pub const MAX_GEN_TOKS: usize = 1024;
const ANSWER_CUE: &str = "\nA: Let's think step by step.\n";
/// The cue as it appears in the files, where a few put the reasoning on the same line.
const FILE_CUE: &str = "\nA: Let's think step by step.";

pub struct Bbh;

#[derive(Debug, Deserialize)]
pub struct Example {
    pub input: String,
    pub target: String,
}

#[derive(Debug, Deserialize)]
struct File {
    examples: Vec<Example>,
}

/// A task's chain-of-thought prompt: description and `(input, reasoning)` examples.
#[derive(Debug, Clone)]
pub struct CotPrompt {
    pub description: String,
    pub shots: Vec<(String, String)>,
}

pub fn text(input: &str) -> String {
    format!("Q: {input}{ANSWER_CUE}")
}

/// Parses `cot-prompts/<task>.txt`: a canary line, `-----`, the description, then examples
/// "Q: …\nA: Let's think step by step.\n…" separated by blank lines. Where a file continues the
/// cue's line with the reasoning (`sports_understanding`), lm-eval's prompt still breaks the
/// line after the cue, so the separator is dropped either way.
pub fn parse_cot_prompt(path: &Path, raw: &str) -> Result<CotPrompt> {
    let body = raw
        .split_once("-----\n")
        .map(|(_, b)| b)
        .ok_or_else(|| EvalError::data(path, "no `-----` line after the canary"))?;
    let body = body.trim_end_matches('\n');
    let mut parts = body.split("\n\nQ: ");
    let description = parts.next().unwrap_or_default().trim().to_string();
    let shots = parts
        .map(|p| {
            p.split_once(FILE_CUE)
                .map(|(i, r)| {
                    let r = r.strip_prefix(['\n', ' ']).unwrap_or(r);
                    (i.to_string(), r.to_string())
                })
                .ok_or_else(|| EvalError::data(path, "an example without its answer cue"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CotPrompt { description, shots })
}

pub fn filter() -> Filter {
    Filter {
        name: Some("get-answer"),
        // lm-eval: `(?<=the answer is )(.*)(?=.)`; the same match without look-around.
        kind: FilterKind::Regex {
            re: Regex::new(r"the answer is (.*).").expect("valid regex"),
            group_select: 0,
        },
    }
}

impl Task for Bbh {
    fn name(&self) -> &'static str {
        "bbh"
    }
    fn version(&self) -> &'static str {
        "4.0"
    }
    fn default_num_fewshot(&self) -> usize {
        3
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = opts.num_fewshot.unwrap_or(3);
        let mut instances = Vec::new();
        let mut data_files = Vec::new();
        for sub in SUBTASKS {
            let data_rel = format!("bbh/data/{sub}.json");
            let cot_rel = format!("bbh/cot-prompts/{sub}.txt");
            let file: File = read_json(&data_dir.join(&data_rel))?;
            let cot_path = data_dir.join(&cot_rel);
            let cot = parse_cot_prompt(&cot_path, &read_text(&cot_path)?)?;
            if num_fewshot > cot.shots.len() {
                return Err(EvalError::Option(format!(
                    "bbh: {sub} has {} examples, num_fewshot is {num_fewshot}",
                    cot.shots.len()
                )));
            }
            data_files.push(digest(data_dir, &data_rel)?);
            data_files.push(digest(data_dir, &cot_rel)?);
            let shots: Vec<Shot> = cot.shots[..num_fewshot]
                .iter()
                .map(|(i, r)| Shot {
                    text: text(i),
                    target: r.clone(),
                })
                .collect();
            let desc = format!("{}\n\n", cot.description);
            for i in select(file.examples.len(), opts.limit, opts.seed) {
                let ex = &file.examples[i];
                instances.push(Instance {
                    doc_id: i,
                    subtask: Some(sub.to_string()),
                    requests: vec![Request::GenerateUntil(GenRequest {
                        context: fewshot_context(&desc, &shots, "", &text(&ex.input)),
                        until: UNTIL.iter().map(|s| s.to_string()).collect(),
                        max_gen_toks: MAX_GEN_TOKS,
                    })],
                    scorer: Scorer::Generation {
                        references: vec![ex.target.clone()],
                        filters: vec![filter()],
                        matcher: ExactMatch::default(),
                    },
                });
            }
        }
        Ok(Prepared {
            instances,
            num_fewshot,
            data_files,
            categories: Vec::new(),
        })
    }
}
