//! What the engine thread runs for an evaluation: a chunk of requests of one kind
//! ([`EvalWork`]) answered with [`ModelBackend`] over the edited model of the chunk's view, so
//! the numbers are exactly those of an in-process evaluation of the same model. The clients
//! that send chunks and wait for their answers live above the engine.
use super::error::EvalError;
use super::request::{GenRequest, LmBackend, ModelBackend};
use crate::engine::editing::{self, EditError, EditMetrics, EditRequest};
use crate::engine::model::score::PrefixKv;
use crate::engine::model::{CausalLm, Tok};

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

/// Why a chunk could not be answered: a scoring failure, or (re-measuring) an edit metric's.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Edit(#[from] EditError),
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
    ) -> Result<EvalAnswers, AnswerError> {
        if let Self::Remeasure(reqs) = self {
            return Ok(EvalAnswers::Metrics(editing::remeasure(
                base, lm, tok, reqs,
            )?));
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
        Ok(r?)
    }
}
