//! `mmlu`: 57 subjects, lm-eval's default format. Each subject's prompt starts with
//! "The following are multiple choice questions (with answers) about {subject}.\n\n", then the
//! first `num_fewshot` dev questions with their answer letter, then the question; choices are
//! " A" … " D". The score is accuracy over all questions (lm-eval's size-weighted group mean),
//! with per-subject and per-category breakdowns. `limit` applies per subject, as in lm-eval.
use std::path::Path;

use super::{
    fewshot_context, multiple_choice, Prepared, Shot, Task, TaskOptions, TARGET_DELIMITER,
};
use crate::engine::eval::data::{digest, read_csv_records, select};
use crate::engine::eval::error::{EvalError, Result};

pub struct Mmlu;

/// Subject and lm-eval's category (its `mmlu_<category>` group).
pub const SUBJECTS: [(&str, &str); 57] = [
    ("abstract_algebra", "stem"),
    ("anatomy", "stem"),
    ("astronomy", "stem"),
    ("business_ethics", "other"),
    ("clinical_knowledge", "other"),
    ("college_biology", "stem"),
    ("college_chemistry", "stem"),
    ("college_computer_science", "stem"),
    ("college_mathematics", "stem"),
    ("college_medicine", "other"),
    ("college_physics", "stem"),
    ("computer_security", "stem"),
    ("conceptual_physics", "stem"),
    ("econometrics", "social_sciences"),
    ("electrical_engineering", "stem"),
    ("elementary_mathematics", "stem"),
    ("formal_logic", "humanities"),
    ("global_facts", "other"),
    ("high_school_biology", "stem"),
    ("high_school_chemistry", "stem"),
    ("high_school_computer_science", "stem"),
    ("high_school_european_history", "humanities"),
    ("high_school_geography", "social_sciences"),
    ("high_school_government_and_politics", "social_sciences"),
    ("high_school_macroeconomics", "social_sciences"),
    ("high_school_mathematics", "stem"),
    ("high_school_microeconomics", "social_sciences"),
    ("high_school_physics", "stem"),
    ("high_school_psychology", "social_sciences"),
    ("high_school_statistics", "stem"),
    ("high_school_us_history", "humanities"),
    ("high_school_world_history", "humanities"),
    ("human_aging", "other"),
    ("human_sexuality", "social_sciences"),
    ("international_law", "humanities"),
    ("jurisprudence", "humanities"),
    ("logical_fallacies", "humanities"),
    ("machine_learning", "stem"),
    ("management", "other"),
    ("marketing", "other"),
    ("medical_genetics", "other"),
    ("miscellaneous", "other"),
    ("moral_disputes", "humanities"),
    ("moral_scenarios", "humanities"),
    ("nutrition", "other"),
    ("philosophy", "humanities"),
    ("prehistory", "humanities"),
    ("professional_accounting", "other"),
    ("professional_law", "humanities"),
    ("professional_medicine", "other"),
    ("professional_psychology", "social_sciences"),
    ("public_relations", "social_sciences"),
    ("security_studies", "social_sciences"),
    ("sociology", "social_sciences"),
    ("us_foreign_policy", "social_sciences"),
    ("virology", "other"),
    ("world_religions", "humanities"),
];

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(Debug, Clone)]
pub struct Doc {
    pub question: String,
    pub choices: [String; 4],
    pub answer: usize,
}

impl Doc {
    pub fn text(&self) -> String {
        format!(
            "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
            self.question.trim(),
            self.choices[0],
            self.choices[1],
            self.choices[2],
            self.choices[3]
        )
    }
}

/// A subject's CSV (header `question,choice0,choice1,choice2,choice3,answer`, answer 0–3).
pub fn load(path: &Path) -> Result<Vec<Doc>> {
    read_csv_records(path)?
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let field = |k: &str| {
                r.get(k)
                    .cloned()
                    .ok_or_else(|| EvalError::data(path, format!("no column `{k}`")))
            };
            let answer: usize = field("answer")?
                .trim()
                .parse()
                .ok()
                .filter(|a| *a < 4)
                .ok_or_else(|| {
                    EvalError::data(path, format!("record {}: answer not 0-3", i + 1))
                })?;
            Ok(Doc {
                question: field("question")?,
                choices: [
                    field("choice0")?,
                    field("choice1")?,
                    field("choice2")?,
                    field("choice3")?,
                ],
                answer,
            })
        })
        .collect()
}

pub fn description(subject: &str) -> String {
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.replace('_', " ")
    )
}

impl Task for Mmlu {
    fn name(&self) -> &'static str {
        "mmlu"
    }
    fn version(&self) -> &'static str {
        "1.0"
    }
    /// lm-eval's config sets none (0); the paper and the original MMLU use 5.
    fn default_num_fewshot(&self) -> usize {
        5
    }
    fn prepare(&self, data_dir: &Path, opts: &TaskOptions) -> Result<Prepared> {
        let num_fewshot = opts.num_fewshot.unwrap_or(5);
        let mut instances = Vec::new();
        let mut data_files = Vec::new();
        let mut categories = Vec::new();
        for (subject, category) in SUBJECTS {
            let test_rel = format!("mmlu/test/{subject}_test.csv");
            let dev_rel = format!("mmlu/dev/{subject}_dev.csv");
            let docs = load(&data_dir.join(&test_rel))?;
            data_files.push(digest(data_dir, &test_rel)?);
            let shots: Vec<Shot> = if num_fewshot > 0 {
                let dev = load(&data_dir.join(&dev_rel))?;
                data_files.push(digest(data_dir, &dev_rel)?);
                if dev.len() < num_fewshot {
                    return Err(EvalError::Option(format!(
                        "mmlu: {subject} has {} dev examples, num_fewshot is {num_fewshot}",
                        dev.len()
                    )));
                }
                dev[..num_fewshot]
                    .iter()
                    .map(|d| Shot {
                        text: d.text(),
                        target: LETTERS[d.answer].to_string(),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let desc = description(subject);
            for i in select(docs.len(), opts.limit, opts.seed) {
                let d = &docs[i];
                let ctx = fewshot_context(&desc, &shots, TARGET_DELIMITER, &d.text());
                let choices = LETTERS.iter().map(|l| l.to_string()).collect();
                let mut inst = multiple_choice(i, ctx, choices, d.answer, false);
                inst.subtask = Some(subject.to_string());
                instances.push(inst);
            }
            categories.push((subject.to_string(), category.to_string()));
        }
        Ok(Prepared {
            instances,
            num_fewshot,
            data_files,
            categories,
        })
    }
}
