//! Benchmark evaluation compatible with lm-evaluation-harness 0.4.x: its three request kinds,
//! its tasks' prompt formats, few-shot sampling and metrics, over dataset files in their public
//! formats. Engine-agnostic: everything model-specific sits behind [`request::LmBackend`].
pub mod data;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod pyrandom;
pub mod request;
pub mod runner;
pub mod tasks;

pub use engine::{AnswerError, EvalAnswers, EvalWork};
pub use error::{EvalError, Result};
pub use request::{GenRequest, LmBackend, ModelBackend, Request, Response};
pub use runner::{
    distinct_requests, evaluate, prepare_task, EvalOptions, Evaluator, Results, TaskResult,
};
pub use tasks::{get_task, list_tasks};
