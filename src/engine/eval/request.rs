//! The three request kinds of lm-evaluation-harness and the backend that answers them.
//!
//! Tasks only build [`Request`]s and read [`Response`]s; what computes them (the in-process
//! runtime here, a remote session later) sits behind [`LmBackend`].
use serde::Serialize;

use super::error::{EvalError, Result};
use crate::engine::model::generate::{generate, GenParams};
use crate::engine::model::sampling::Sampling;
use crate::engine::model::score::{self, PrefixKv, DEFAULT_TOKEN_BUDGET};
use crate::engine::model::{CausalLm, Tok};

/// lm-eval's default `max_gen_toks` for `generate_until`.
pub const DEFAULT_MAX_GEN_TOKS: usize = 256;

/// A greedy generation request: stop before the first of `until`, at EOS, or after
/// `max_gen_toks` tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct GenRequest {
    pub context: String,
    pub until: Vec<String>,
    pub max_gen_toks: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// `log P(continuation | context)`; word-boundary spaces belong to the continuation.
    Loglikelihood {
        context: String,
        continuation: String,
    },
    /// Log-likelihood of a whole text with disjoint windows (perplexity).
    LoglikelihoodRolling {
        text: String,
    },
    GenerateUntil(GenRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Loglikelihood { logprob: f64, is_greedy: bool },
    Rolling { logprob: f64, tokens: usize },
    Text(String),
}

impl Response {
    pub fn logprob(&self) -> f64 {
        match self {
            Response::Loglikelihood { logprob, .. } | Response::Rolling { logprob, .. } => *logprob,
            Response::Text(_) => f64::NAN,
        }
    }
    pub fn is_greedy(&self) -> bool {
        matches!(
            self,
            Response::Loglikelihood {
                is_greedy: true,
                ..
            }
        )
    }
    pub fn text(&self) -> &str {
        match self {
            Response::Text(t) => t,
            _ => "",
        }
    }
}

/// What an evaluation needs from a model. Answers come back in request order.
pub trait LmBackend {
    /// `(logprob, is_greedy)` for each `(context, continuation)`.
    fn loglikelihood(&mut self, requests: &[(String, String)]) -> Result<Vec<(f64, bool)>>;
    /// `(logprob, tokens scored)` for each text.
    fn loglikelihood_rolling(&mut self, texts: &[String]) -> Result<Vec<(f64, usize)>>;
    /// Greedy continuations, cut before the first stop string.
    fn generate_until(&mut self, requests: &[GenRequest]) -> Result<Vec<String>>;
}

/// The in-process runtime as a backend.
pub struct ModelBackend<'a> {
    pub model: &'a dyn CausalLm,
    pub tok: &'a Tok,
    /// Tokens per scoring forward pass.
    pub token_budget: usize,
    /// The last shared context's KV cache, reused by the next call (`model` never changes).
    pub prefix_kv: PrefixKv,
}

impl<'a> ModelBackend<'a> {
    pub fn new(model: &'a dyn CausalLm, tok: &'a Tok) -> Self {
        Self {
            model,
            tok,
            token_budget: DEFAULT_TOKEN_BUDGET,
            prefix_kv: PrefixKv::default(),
        }
    }
}

impl LmBackend for ModelBackend<'_> {
    fn loglikelihood(&mut self, requests: &[(String, String)]) -> Result<Vec<(f64, bool)>> {
        let out = score::loglikelihood_shared(
            self.model,
            self.tok,
            requests,
            self.token_budget,
            Some(&mut self.prefix_kv),
        )?;
        Ok(out.into_iter().map(|l| (l.logprob, l.is_greedy)).collect())
    }

    fn loglikelihood_rolling(&mut self, texts: &[String]) -> Result<Vec<(f64, usize)>> {
        texts
            .iter()
            .map(|t| {
                if t.is_empty() {
                    // No tokens to predict: lm-eval scores an empty document as 0.
                    return Ok((0.0, 0));
                }
                Ok(score::loglikelihood_rolling(
                    self.model,
                    self.tok,
                    t,
                    None,
                    self.token_budget,
                )?)
            })
            .collect()
    }

    fn generate_until(&mut self, requests: &[GenRequest]) -> Result<Vec<String>> {
        let ctx_len = self.model.spec().context_length;
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            let mut ids = self.tok.encode(&r.context)?;
            // lm-eval's HF backend keeps the last `max_length - max_gen_toks` context tokens.
            let keep = ctx_len.saturating_sub(r.max_gen_toks).max(1);
            if ids.len() > keep {
                ids.drain(..ids.len() - keep);
            }
            let params = GenParams {
                max_tokens: r.max_gen_toks,
                sampling: Sampling::default(),
                stop: r.until.clone(),
                // The harness adds the EOS string to `until`.
                stop_at_eos: true,
            };
            let g = generate(self.model, self.tok, &[ids], &params, &mut |_, _| {})?;
            let text = g
                .into_iter()
                .next()
                .ok_or_else(|| EvalError::Backend("generation returned no row".into()))?
                .text;
            out.push(text);
        }
        Ok(out)
    }
}
