//! Editing methods: each turns a batch of edit requests into deltas (and method state) over the
//! session's current model (see [`crate::engine::overlay`]), plus the edit metrics measured
//! before and after.
//!
//! A method is a plug-in: one file implementing [`method::TypedMethod`], one line in the
//! registry ([`method`]) and its defaults in `defaults/hparams.toml`. The primitives methods
//! share (subject positions, key reads, value optimisation, loss terms) are in [`primitives`].
//! Methods: ROME (rank-one at one layer), MEMIT (a batch spread over several layers), FT-L and
//! FT-M (norm-bounded fine-tuning of one layer's down projection, stored as a dense delta).
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::model::{ModelError, Tok};
use super::overlay::{Delta, Overlay, StateEntry};

pub mod datasets;
pub mod hparams;
pub mod method;
pub mod metrics;
pub mod primitives;
pub mod stats;
pub mod stats_pass;

mod alphaedit;
mod compute;
mod ft;
mod grace;
mod kn;
mod memit;
mod mend;
mod nullspace;
mod pmet;
mod prepare;
mod rome;
mod serac;
mod wise;

pub use compute::{apply, apply_prepared, remeasure, EditContext, MeasureOptions};
pub use ft::FtHparams;
pub use memit::MemitHparams;
pub use method::{
    methods, EditInput, EditMethod, Method, MethodInfo, MethodOutput, Resource, Resources,
};
pub use metrics::{EditMetrics, EditReport, PromptScore};
pub use prepare::Preparation;
pub use rome::RomeHparams;

/// Longest target (tokens) an edit may ask for.
pub const MAX_TARGET_TOKENS: usize = 32;
/// Longest prompt (characters) an edit request may carry.
pub const MAX_PROMPT_CHARS: usize = 2048;
/// Most auxiliary prompts (rephrase, locality, portability) per request, each.
pub const MAX_AUX_PROMPTS: usize = 32;

/// A prompt and, where the metric needs one, its expected answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptAnswer {
    pub prompt: String,
    /// Locality: the answer the model should keep (default: its own pre-edit greedy answer).
    /// Portability: required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

/// One fact to write, in ROME/EasyEdit conventions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    /// The edit prompt: `{}` marks the subject, or plain text that contains `subject`.
    #[schema(example = "The Eiffel Tower is located in the city of")]
    pub prompt: String,
    #[schema(example = "The Eiffel Tower")]
    pub subject: String,
    /// The new object; a leading space is added when it has none.
    #[schema(example = "Rome")]
    pub target_new: String,
    /// The old object, for the `P(new) > P(true)` success metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "Paris")]
    pub target_true: Option<String>,
    /// Paraphrases of the prompt (generalization).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rephrase_prompts: Vec<String>,
    /// Unrelated prompts whose answers must not change (locality).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locality_prompts: Vec<PromptAnswer>,
    /// Questions whose answers follow from the new fact (portability); answers required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub portability_prompts: Vec<PromptAnswer>,
}

impl EditRequest {
    /// The prompt with the subject filled in, and the byte range of the subject in it.
    pub fn filled(&self) -> (String, std::ops::Range<usize>) {
        match self.prompt.find("{}") {
            Some(at) => {
                let text = self.prompt.replacen("{}", &self.subject, 1);
                (text, at..at + self.subject.len())
            }
            None => {
                let at = self.prompt.rfind(&self.subject).unwrap_or(0);
                (self.prompt.clone(), at..at + self.subject.len())
            }
        }
    }

    /// The prompt as a template with `{}` for the subject (ROME's form).
    pub fn template(&self) -> String {
        if self.prompt.contains("{}") {
            self.prompt.clone()
        } else {
            match self.prompt.rfind(&self.subject) {
                Some(at) => format!(
                    "{}{{}}{}",
                    &self.prompt[..at],
                    &self.prompt[at + self.subject.len()..]
                ),
                None => self.prompt.clone(),
            }
        }
    }

    /// `target_new` with the leading space ROME adds, so it tokenizes as a continuation.
    pub fn target_new_text(&self) -> String {
        with_space(&self.target_new)
    }

    pub fn target_true_text(&self) -> Option<String> {
        self.target_true.as_deref().map(with_space)
    }

    /// The prompts a run-time module's scope diagnostics probe, by group: the rephrasings and
    /// the locality prompts (empty groups left out).
    pub fn probe_groups(&self) -> Vec<(&'static str, Vec<String>)> {
        [
            ("rephrase", self.rephrase_prompts.clone()),
            (
                "locality",
                self.locality_prompts
                    .iter()
                    .map(|p| p.prompt.clone())
                    .collect(),
            ),
        ]
        .into_iter()
        .filter(|(_, p)| !p.is_empty())
        .collect()
    }
}

fn with_space(s: &str) -> String {
    if s.starts_with(' ') {
        s.to_string()
    } else {
        format!(" {s}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// Bad input: names the field (e.g. `edits[0].subject`, `hparams.layers`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("statistics: {0}")]
    Stats(String),
    /// A trained editor is missing, unknown or made for another model.
    #[error(transparent)]
    Editor(#[from] crate::engine::training::TrainingError),
}

impl EditError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<candle_core::Error> for EditError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::from(e))
    }
}

/// Checks requests before any work is queued; `field` prefixes are `edits[i]`.
pub fn validate(requests: &[EditRequest], tok: &Tok) -> Result<(), EditError> {
    if requests.is_empty() {
        return Err(EditError::invalid("edits", "give at least one edit"));
    }
    for (i, r) in requests.iter().enumerate() {
        let f = |name: &str| format!("edits[{i}].{name}");
        if r.subject.trim().is_empty() {
            return Err(EditError::invalid(f("subject"), "must not be empty"));
        }
        if r.prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(EditError::invalid(
                f("prompt"),
                format!("must be at most {MAX_PROMPT_CHARS} characters"),
            ));
        }
        if r.prompt.matches("{}").count() > 1 {
            return Err(EditError::invalid(
                f("prompt"),
                "holds `{}` more than once; mark the subject once",
            ));
        }
        if !r.prompt.contains("{}") && !r.prompt.contains(&r.subject) {
            return Err(EditError::invalid(
                f("subject"),
                format!(
                    "`{}` does not occur in the prompt (write it there or mark it with `{{}}`)",
                    r.subject
                ),
            ));
        }
        if r.target_new.trim().is_empty() {
            return Err(EditError::invalid(f("target_new"), "must not be empty"));
        }
        let n = tok.encode_plain(&r.target_new_text())?.len();
        if n > MAX_TARGET_TOKENS {
            return Err(EditError::invalid(
                f("target_new"),
                format!("is {n} tokens; the limit is {MAX_TARGET_TOKENS}"),
            ));
        }
        if let Some(t) = &r.target_true {
            if t.trim().is_empty() {
                return Err(EditError::invalid(
                    f("target_true"),
                    "must not be empty when given",
                ));
            }
            if tok.encode_plain(&with_space(t))?.len() > MAX_TARGET_TOKENS {
                return Err(EditError::invalid(
                    f("target_true"),
                    format!("is longer than {MAX_TARGET_TOKENS} tokens"),
                ));
            }
        }
        for (name, n) in [
            ("rephrase_prompts", r.rephrase_prompts.len()),
            ("locality_prompts", r.locality_prompts.len()),
            ("portability_prompts", r.portability_prompts.len()),
        ] {
            if n > MAX_AUX_PROMPTS {
                return Err(EditError::invalid(
                    f(name),
                    format!("at most {MAX_AUX_PROMPTS} prompts"),
                ));
            }
        }
        for (j, p) in r.rephrase_prompts.iter().enumerate() {
            if p.trim().is_empty() || p.chars().count() > MAX_PROMPT_CHARS {
                return Err(EditError::invalid(
                    format!("edits[{i}].rephrase_prompts[{j}]"),
                    format!("must be 1 to {MAX_PROMPT_CHARS} characters"),
                ));
            }
        }
        for (name, list, need_answer) in [
            ("locality_prompts", &r.locality_prompts, false),
            ("portability_prompts", &r.portability_prompts, true),
        ] {
            for (j, p) in list.iter().enumerate() {
                if p.prompt.trim().is_empty() || p.prompt.chars().count() > MAX_PROMPT_CHARS {
                    return Err(EditError::invalid(
                        format!("edits[{i}].{name}[{j}].prompt"),
                        format!("must be 1 to {MAX_PROMPT_CHARS} characters"),
                    ));
                }
                match &p.answer {
                    None if need_answer => {
                        return Err(EditError::invalid(
                            format!("edits[{i}].{name}[{j}].answer"),
                            "is required",
                        ))
                    }
                    Some(a) if a.trim().is_empty() => {
                        return Err(EditError::invalid(
                            format!("edits[{i}].{name}[{j}].answer"),
                            "must not be empty",
                        ))
                    }
                    Some(a) if tok.encode_plain(&with_space(a))?.len() > MAX_TARGET_TOKENS => {
                        return Err(EditError::invalid(
                            format!("edits[{i}].{name}[{j}].answer"),
                            format!("is longer than {MAX_TARGET_TOKENS} tokens"),
                        ))
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// Where statistics are cached and which corpus they come from.
#[derive(Debug, Clone)]
pub struct EditingEnv {
    /// `<cache>/stats`: covariance statistics, keyed by model sha256, layer, samples, corpus.
    pub stats_dir: PathBuf,
    /// Trained editors (MEND), one folder per artefact.
    pub editors_dir: PathBuf,
    /// Dataset directory laid out like `shared/data` (corpus: `wikitext/AA/wiki_*`).
    pub data_dir: Option<PathBuf>,
}

/// One step of an edit job: a new version's deltas and method state, and the reports of the
/// requests in it.
#[derive(Debug, Clone)]
pub struct EditStep {
    pub deltas: Vec<Delta>,
    /// Method state the version adds (see [`Overlay::state`]).
    pub state: Vec<StateEntry>,
    pub reports: Vec<EditReport>,
    /// Resolved hyper-parameters (defaults + overrides).
    pub hparams: serde_json::Value,
    /// Method diagnostics: loss curve of `v*`, norms, layers.
    pub diagnostics: serde_json::Value,
    pub duration_ms: u64,
}

impl EditStep {
    /// The version this step makes on top of `parent`.
    pub fn version_on(&self, parent: &Arc<Overlay>) -> Arc<Overlay> {
        Overlay::push_with(parent, self.deltas.clone(), self.state.clone())
    }
}
