//! Evaluation through the engine worker: [`EngineBackend`] sends each chunk of requests to the
//! engine thread on the lowest-priority lane and blocks until it is answered, so interactive
//! and edit work is served between chunks and an evaluation never starves clients. The worker
//! answers a chunk with [`ModelBackend`] over the edited model of the chunk's view, so the
//! numbers are exactly those of an in-process evaluation of the same model.
use std::time::Duration;

use tokio::sync::oneshot;

use super::error::{EvalError, Result};
use super::request::{GenRequest, LmBackend, ModelBackend};
use crate::engine::editing::{self, EditMetrics, EditRequest};
use crate::engine::model::score::PrefixKv;
use crate::engine::model::{CausalLm, Tok};
use crate::engine::worker::{Engine, EngineError, Lane, ModelView, Work};

/// Requests per engine call: the engine is held for one chunk at a time.
pub const EVAL_CHUNK: usize = 32;

/// One chunk of evaluation requests of one kind.
#[derive(Debug, Clone)]
pub enum EvalWork {
    Loglikelihood(Vec<(String, String)>),
    Rolling(Vec<String>),
    Generate(Vec<GenRequest>),
    /// Earlier edits' metrics on this view (a sweep checkpoint's retention).
    Remeasure(Vec<EditRequest>),
}

/// The answers to an [`EvalWork`], in request order.
#[derive(Debug, Clone)]
pub enum EvalAnswers {
    Loglikelihood(Vec<(f64, bool)>),
    Rolling(Vec<(f64, usize)>),
    Text(Vec<String>),
    Metrics(Vec<EditMetrics>),
}

impl EvalWork {
    /// The request kind, as lm-evaluation-harness names it (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Loglikelihood(_) => "loglikelihood",
            Self::Rolling(_) => "loglikelihood_rolling",
            Self::Generate(_) => "generate_until",
            Self::Remeasure(_) => "edit_metrics",
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Loglikelihood(v) => v.len(),
            Self::Rolling(v) => v.len(),
            Self::Generate(v) => v.len(),
            Self::Remeasure(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answers the chunk on `lm` (the engine thread calls this with the view's edited model;
    /// `base` is the unedited one). `prefix_kv` is the engine's shared-context cache, already
    /// pointed at this view.
    pub fn answer(
        &self,
        base: &dyn CausalLm,
        lm: &dyn CausalLm,
        tok: &Tok,
        token_budget: usize,
        prefix_kv: &mut PrefixKv,
    ) -> std::result::Result<EvalAnswers, EngineError> {
        if let Self::Remeasure(reqs) = self {
            return editing::remeasure(base, lm, tok, reqs)
                .map(EvalAnswers::Metrics)
                .map_err(EngineError::Edit);
        }
        let mut b = ModelBackend {
            model: lm,
            tok,
            token_budget,
            prefix_kv: std::mem::take(prefix_kv),
        };
        let r = match self {
            Self::Loglikelihood(p) => b.loglikelihood(p).map(EvalAnswers::Loglikelihood),
            Self::Rolling(t) => b.loglikelihood_rolling(t).map(EvalAnswers::Rolling),
            Self::Generate(g) => b.generate_until(g).map(EvalAnswers::Text),
            Self::Remeasure(_) => unreachable!("answered above"),
        };
        *prefix_kv = std::mem::take(&mut b.prefix_kv);
        r.map_err(|e| match e {
            EvalError::Model(m) => EngineError::Model(m),
            other => EngineError::Failed(other.to_string()),
        })
    }
}

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
        let (tx, rx) = oneshot::channel();
        let work = Work::Eval {
            view: self.view.clone(),
            work,
            reply: tx,
        };
        self.engine
            .submit_blocking(Lane::Eval, work, self.patience)
            .map_err(|e| EvalError::Backend(e.to_string()))?;
        match rx.blocking_recv() {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(EngineError::Model(m))) => Err(EvalError::Model(m)),
            Ok(Err(e)) => Err(EvalError::Backend(e.to_string())),
            Err(_) => Err(EvalError::Backend(
                "the engine stopped before answering".into(),
            )),
        }
    }
}

/// Edit requests per engine call when re-measuring (each is a dozen short sequences, twice).
pub const REMEASURE_CHUNK: usize = 8;

impl EngineBackend {
    /// [`editing::remeasure`] of `requests` on this view, a chunk per engine call.
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
