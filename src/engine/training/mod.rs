//! Trained editors: MEND's gradient transform and SERAC's scope classifier, trained against
//! the resident model as a resumable run that leaves an artefact with its provenance.
pub mod adam;
pub mod artefact;
mod checkpoint;
pub mod mend;
pub mod mend_net;
pub mod records;
pub mod run;
pub mod serac;

pub use artefact::{Artefact, ArtefactStore, Provenance, TrainedEditor};
pub use records::TrainingData;
pub use run::{Progress, TrainConfig, Trainer, Validation};

use crate::engine::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// A configuration field out of range: names the field.
    #[error("{0}: {1}")]
    Field(String, String),
    /// The training file is missing or a record lacks a field.
    #[error("training data: {0}")]
    Data(String),
    #[error("{0}")]
    Invalid(String),
    /// No artefact of the method trained for this model.
    #[error("no trained {method} editor for this model; train one with `emend train --method {method}` or `POST /v1/trainings`")]
    NoArtefact { method: String },
    #[error("unknown artefact `{0}`")]
    UnknownArtefact(String),
    /// An artefact or checkpoint made for another model, method or configuration.
    #[error("{0}")]
    Mismatch(String),
    #[error("artefact: {0}")]
    Artefact(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<candle_core::Error> for TrainingError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::from(e))
    }
}

impl From<crate::engine::editing::EditError> for TrainingError {
    fn from(e: crate::engine::editing::EditError) -> Self {
        match e {
            crate::engine::editing::EditError::Model(m) => Self::Model(m),
            crate::engine::editing::EditError::Editor(t) => t,
            other => Self::Invalid(other.to_string()),
        }
    }
}
