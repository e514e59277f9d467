//! Evaluation through the engine worker: [`EngineBackend`] sends each chunk of requests to the
//! engine thread on the lowest-priority lane and blocks until it is answered, so interactive
//! and edit work is served between chunks and an evaluation never starves clients. The engine
//! answers a chunk with the in-process backend over the chunk's view, so the numbers are
//! exactly those of `emend eval` on the same model.
use std::time::Duration;

use super::{Engine, EngineError, ModelView};
use crate::engine::editing::{EditMetrics, EditRequest};
use crate::engine::eval::{EvalAnswers, EvalError, EvalWork, GenRequest, LmBackend, Result};

/// Requests per engine call: the engine is held for one chunk at a time.
pub const EVAL_CHUNK: usize = 32;

/// An [`LmBackend`] over the engine worker for one model view. It blocks: run it on a thread
/// of its own, never on the async runtime.
pub struct EngineBackend {
    engine: Engine,
    view: ModelView,
    /// How long a chunk may wait for room in the evaluation lane.
    patience: Duration,
}

impl EngineBackend {
    pub fn new(engine: Engine, view: ModelView, patience: Duration) -> Self {
        Self {
            engine,
            view,
            patience,
        }
    }

    fn call(&self, work: EvalWork) -> Result<EvalAnswers> {
        match self
            .engine
            .eval_blocking(self.view.clone(), work, self.patience)
        {
            Ok(a) => Ok(a),
            Err(EngineError::Model(m)) => Err(EvalError::Model(m)),
            Err(EngineError::Dropped) => Err(EvalError::Backend(
                "the engine stopped before answering".into(),
            )),
            Err(e) => Err(EvalError::Backend(e.to_string())),
        }
    }
}

/// Edit requests per engine call when re-measuring (each is a dozen short sequences, twice).
pub const REMEASURE_CHUNK: usize = 8;

impl EngineBackend {
    /// `editing::remeasure` of `requests` on this view, a chunk per engine call.
    pub fn remeasure(&self, requests: &[EditRequest]) -> Result<Vec<EditMetrics>> {
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(REMEASURE_CHUNK) {
            match self.call(EvalWork::Remeasure(chunk.to_vec()))? {
                EvalAnswers::Metrics(v) => out.extend(v),
                _ => return Err(mismatch()),
            }
        }
        Ok(out)
    }
}

fn mismatch() -> EvalError {
    EvalError::Backend("the engine answered with another request kind".into())
}

impl LmBackend for EngineBackend {
    fn loglikelihood(&mut self, requests: &[(String, String)]) -> Result<Vec<(f64, bool)>> {
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(EVAL_CHUNK) {
            match self.call(EvalWork::Loglikelihood(chunk.to_vec()))? {
                EvalAnswers::Loglikelihood(v) => out.extend(v),
                _ => return Err(mismatch()),
            }
        }
        Ok(out)
    }

    fn loglikelihood_rolling(&mut self, texts: &[String]) -> Result<Vec<(f64, usize)>> {
        let mut out = Vec::with_capacity(texts.len());
        // A rolling text can be thousands of tokens: one per engine call.
        for t in texts {
            match self.call(EvalWork::Rolling(vec![t.clone()]))? {
                EvalAnswers::Rolling(v) => out.extend(v),
                _ => return Err(mismatch()),
            }
        }
        Ok(out)
    }

    fn generate_until(&mut self, requests: &[GenRequest]) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(requests.len());
        // A generation holds the engine for up to `max_gen_toks` decode steps: one per call.
        for r in requests {
            match self.call(EvalWork::Generate(vec![r.clone()]))? {
                EvalAnswers::Text(v) => out.extend(v),
                _ => return Err(mismatch()),
            }
        }
        Ok(out)
    }
}
