//! Edit requests from the public editing datasets, in the layouts of a dataset directory like
//! `shared/data`: CounterFact in EasyEdit's flattened format (`counterfact/counterfact-edit.json`)
//! and zsRE in the MEND/ROME record format (`zsre/*.json`).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{EditError, EditRequest, PromptAnswer};

/// The editing datasets emend reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EditDataset {
    /// `counterfact/counterfact-edit.json`; records are named by `case_id`.
    Counterfact,
    /// `zsre/zsre_mend_eval_portability_gpt4.json`; records are named by their index.
    Zsre,
}

impl EditDataset {
    pub fn file(self) -> &'static str {
        match self {
            Self::Counterfact => "counterfact/counterfact-edit.json",
            Self::Zsre => "zsre/zsre_mend_eval_portability_gpt4.json",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Counterfact => "counterfact",
            Self::Zsre => "zsre",
        }
    }
}

impl std::str::FromStr for EditDataset {
    type Err = EditError;
    fn from_str(s: &str) -> Result<Self, EditError> {
        match s {
            "counterfact" => Ok(Self::Counterfact),
            "zsre" => Ok(Self::Zsre),
            _ => Err(EditError::invalid(
                "dataset",
                format!("unknown dataset `{s}` (counterfact or zsre)"),
            )),
        }
    }
}

/// A record of an editing dataset as an edit request, with the id it is named by.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: u64,
    pub request: EditRequest,
}

#[derive(Deserialize)]
struct CounterfactRow {
    case_id: u64,
    prompt: String,
    target_new: String,
    subject: String,
    ground_truth: String,
    rephrase_prompt: String,
    locality_prompt: String,
    locality_ground_truth: String,
}

#[derive(Deserialize)]
struct ZsreRow {
    subject: String,
    src: String,
    rephrase: String,
    alt: String,
    answers: Vec<String>,
    loc: String,
    loc_ans: String,
    #[serde(default)]
    portability: Option<ZsrePortability>,
}

#[derive(Deserialize)]
struct ZsrePortability {
    #[serde(rename = "New Question")]
    question: String,
    #[serde(rename = "New Answer")]
    answer: String,
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> EditError {
    EditError::invalid("dataset", format!("{}: {e}", path.display()))
}

/// Every usable record of `dataset` under `data_dir`, in file order (the paper edits the first
/// N records one after another).
pub fn load(dataset: EditDataset, data_dir: &Path) -> Result<Vec<Record>, EditError> {
    let path: PathBuf = data_dir.join(dataset.file());
    let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
    match dataset {
        EditDataset::Counterfact => parse_counterfact(&text).map_err(|e| io_error(&path, e)),
        EditDataset::Zsre => parse_zsre(&text).map_err(|e| io_error(&path, e)),
    }
}

pub fn parse_counterfact(text: &str) -> Result<Vec<Record>, serde_json::Error> {
    let rows: Vec<CounterfactRow> = serde_json::from_str(text)?;
    Ok(rows
        .into_iter()
        .map(|r| Record {
            id: r.case_id,
            request: EditRequest {
                prompt: r.prompt,
                subject: r.subject,
                target_new: r.target_new,
                target_true: Some(r.ground_truth),
                rephrase_prompts: vec![r.rephrase_prompt],
                locality_prompts: vec![PromptAnswer {
                    prompt: r.locality_prompt,
                    answer: Some(r.locality_ground_truth),
                }],
                portability_prompts: Vec::new(),
            },
        })
        .collect())
}

/// zsRE as EasyEdit reads it: `src` is the prompt, `alt` the new target, `answers[0]` the old
/// one, `loc`/`loc_ans` the locality pair. Records with an empty `alt` are skipped (as the
/// paper's loader does); ids stay the record's index in the file.
pub fn parse_zsre(text: &str) -> Result<Vec<Record>, serde_json::Error> {
    let rows: Vec<ZsreRow> = serde_json::from_str(text)?;
    Ok(rows
        .into_iter()
        .enumerate()
        .filter(|(_, r)| !r.alt.trim().is_empty() && r.src.contains(&r.subject))
        .map(|(i, r)| Record {
            id: i as u64,
            request: EditRequest {
                prompt: r.src,
                subject: r.subject,
                target_new: r.alt,
                target_true: r.answers.into_iter().next(),
                rephrase_prompts: vec![r.rephrase],
                locality_prompts: vec![PromptAnswer {
                    prompt: r.loc,
                    answer: Some(r.loc_ans),
                }],
                portability_prompts: r
                    .portability
                    .map(|p| {
                        vec![PromptAnswer {
                            prompt: p.question,
                            answer: Some(p.answer),
                        }]
                    })
                    .unwrap_or_default(),
            },
        })
        .collect())
}

/// The records named by `ids`, in the order given.
pub fn by_ids(
    dataset: EditDataset,
    data_dir: &Path,
    ids: &[u64],
) -> Result<Vec<EditRequest>, EditError> {
    let all = load(dataset, data_dir)?;
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            all.iter()
                .find(|r| r.id == *id)
                .map(|r| r.request.clone())
                .ok_or_else(|| {
                    EditError::invalid(
                        format!("edits[{i}].id"),
                        format!("{} has no record {id}", dataset.name()),
                    )
                })
        })
        .collect()
}
