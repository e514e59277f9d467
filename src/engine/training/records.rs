//! Training records of the trained editors: an edit (prompt, new target, a rephrasing) and an
//! unrelated fact the edit must leave alone, read from zsRE's MEND training file or
//! CounterFact's train split.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::TrainingError;

/// Which training file a run reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TrainingData {
    /// `zsre/zsre_mend_train-1k.json`: `src`, `alt`, `rephrase`, `loc`, `loc_ans`.
    Zsre,
    /// `counterfact/counterfact-train.json`: `prompt`, `target_new`, `rephrase_prompt`,
    /// `locality_prompt`, `locality_ground_truth`.
    Counterfact,
}

impl TrainingData {
    pub fn file(self) -> &'static str {
        match self {
            Self::Zsre => "zsre/zsre_mend_train-1k.json",
            Self::Counterfact => "counterfact/counterfact-train.json",
        }
    }

    fn fields(self) -> [&'static str; 5] {
        match self {
            Self::Zsre => ["src", "alt", "rephrase", "loc", "loc_ans"],
            Self::Counterfact => [
                "prompt",
                "target_new",
                "rephrase_prompt",
                "locality_prompt",
                "locality_ground_truth",
            ],
        }
    }
}

/// One training record.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingRecord {
    pub prompt: String,
    pub target: String,
    pub rephrase: String,
    pub loc_prompt: String,
    pub loc_answer: String,
}

/// A training file's records and the sha256 of its bytes (the artefact's provenance).
pub struct TrainingSet {
    pub records: Vec<TrainingRecord>,
    /// Records with an empty text field, left out.
    pub skipped: usize,
    pub sha256: String,
    pub path: PathBuf,
}

/// Reads `data`'s file under `data_dir`; a record without one of the fields is refused with
/// its index and the field's name, one with an empty field is skipped.
pub fn load(data_dir: &Path, data: TrainingData) -> Result<TrainingSet, TrainingError> {
    let path = data_dir.join(data.file());
    let bytes = std::fs::read(&path)
        .map_err(|e| TrainingError::Data(format!("cannot read {}: {e}", path.display())))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let rows: Vec<Value> = serde_json::from_slice(&bytes).map_err(|e| {
        TrainingError::Data(format!(
            "{} is not a JSON array of records: {e}",
            path.display()
        ))
    })?;
    let mut records = Vec::with_capacity(rows.len());
    let mut skipped = 0;
    for (i, row) in rows.iter().enumerate() {
        let mut fields = Vec::with_capacity(5);
        for name in data.fields() {
            let text = row.get(name).and_then(Value::as_str).ok_or_else(|| {
                TrainingError::Data(format!(
                    "{}: record {i} has no text field `{name}`",
                    path.display()
                ))
            })?;
            fields.push(text.trim().to_string());
        }
        // zsRE's file has records with an empty `alt` (nothing to edit to): skipped, counted.
        if fields.iter().any(String::is_empty) {
            skipped += 1;
            continue;
        }
        let mut f = fields.into_iter();
        let mut next = || f.next().expect("five fields");
        records.push(TrainingRecord {
            prompt: next(),
            target: next(),
            rephrase: next(),
            loc_prompt: next(),
            loc_answer: next(),
        });
    }
    if records.len() < 2 {
        return Err(TrainingError::Data(format!(
            "{} holds {} records; training needs at least two",
            path.display(),
            records.len()
        )));
    }
    Ok(TrainingSet {
        records,
        skipped,
        sha256,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_field_names_the_record_and_the_field() {
        let dir = std::env::temp_dir().join(format!("emend-records-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("zsre")).unwrap();
        let rec = |alt: &str| serde_json::json!({"src": "Q?", "alt": alt, "rephrase": "R?", "loc": "L", "loc_ans": "A"});
        let file = dir.join(TrainingData::Zsre.file());
        let mut missing = rec("x");
        missing.as_object_mut().unwrap().remove("alt");
        std::fs::write(&file, serde_json::to_vec(&vec![rec("x"), missing]).unwrap()).unwrap();
        let e = load(&dir, TrainingData::Zsre).err().unwrap().to_string();
        assert!(e.contains("record 1 has no text field `alt`"), "{e}");
        std::fs::write(
            &file,
            serde_json::to_vec(&vec![rec("x"), rec(" "), rec("y")]).unwrap(),
        )
        .unwrap();
        let set = load(&dir, TrainingData::Zsre).unwrap();
        assert_eq!(set.records[1].target, "y");
        assert_eq!(set.skipped, 1);
        assert_eq!(set.sha256.len(), 64);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
