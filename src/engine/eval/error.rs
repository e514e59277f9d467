//! Errors of the evaluation layer: unknown tasks, missing or malformed data files, backend
//! failures. Each names the task, file or option at fault.
use std::path::PathBuf;

use crate::engine::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("unknown task `{name}` (known tasks: {known})")]
    UnknownTask { name: String, known: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("invalid option: {0}")]
    Option(String),
    #[error("evaluation cancelled")]
    Cancelled,
    #[error("backend: {0}")]
    Backend(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

impl EvalError {
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        EvalError::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
