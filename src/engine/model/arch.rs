use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::{Forward, Result, Site, WeightId};

/// Architecture families emend implements itself (one file each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// Llama-2, Mistral (sliding window), SmolLM2, Qwen2-style: RoPE, GQA, RMSNorm, SwiGLU.
    Llama,
    /// GPT-2 family (GPT2-XL): learned positions, LayerNorm, GELU (tanh).
    Gpt2,
    /// GPT-NeoX (Pythia): parallel residual, partial rotary, LayerNorm, GELU.
    GptNeox,
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Llama => "llama",
            Self::Gpt2 => "gpt2",
            Self::GptNeox => "gpt_neox",
        })
    }
}

/// Shape facts every architecture resolves from its config.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub n_layers: usize,
    pub hidden_size: usize,
    /// Width of the key entering the MLP's down/out projection (`mlp.in`).
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub parameters: usize,
}

/// One transformer family, split so that editing can run any slice of it:
/// `embed` → `run_layers(a..b)` → `head`. Weights are immutable (`&self`); per-sequence state
/// (KV cache, hooks, masks) lives in [`Forward`].
pub trait CausalLm: Send + Sync {
    fn spec(&self) -> &ModelSpec;

    /// Token (and, for learned-position models, position) embeddings: `(b, t)` → `(b, t, d)`.
    fn embed(&self, input_ids: &Tensor, fwd: &Forward) -> Result<Tensor>;

    /// Rows of the input embedding (no positions): `(n,)` ids → `(n, d)`.
    fn token_embeddings(&self, ids: &Tensor) -> Result<Tensor>;

    /// Runs blocks `range` starting from hidden state `h` (`(b, t, d)`), applying hooks at sites.
    fn run_layers(&self, h: Tensor, range: Range<usize>, fwd: &mut Forward) -> Result<Tensor>;

    /// Final norm and LM head: `(.., d)` → `(.., vocab)` logits.
    fn head(&self, h: &Tensor, differentiable: bool) -> Result<Tensor>;

    /// The weight `id` names, as `(out, in)`; an error for a linear this architecture does not
    /// have. A base model returns its own weight; an edited view returns the edited one.
    fn weight(&self, id: WeightId) -> Result<Tensor>;

    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;

    /// True when a run-time module decides per sequence (WISE's router), so that a KV-cached
    /// prefix of one sequence must not be reused for another.
    fn routes_per_sequence(&self) -> bool {
        false
    }

    /// Per input, the tokens a module conditions it on (SERAC's retrieved edit), or `None`
    /// for every input when no module does. Scoring and generation run a conditioned
    /// sequence as [`Conditioning::apply`] makes it.
    #[allow(clippy::type_complexity)]
    fn condition(&self, _inputs: &[&[u32]]) -> Result<Option<Vec<Option<Arc<Conditioning>>>>> {
        Ok(None)
    }

    /// Every site this model exposes, in forward order.
    fn sites(&self) -> Vec<Site> {
        (0..self.spec().n_layers)
            .flat_map(|layer| {
                super::SiteKind::ALL
                    .iter()
                    .map(move |&kind| Site { layer, kind })
            })
            .collect()
    }

    /// Hidden states after the last block (before the final norm).
    fn hidden(&self, input_ids: &Tensor, fwd: &mut Forward) -> Result<Tensor> {
        let h = self.embed(input_ids, fwd)?;
        self.run_layers(h, 0..self.spec().n_layers, fwd)
    }

    /// Logits at every position: `(b, t)` → `(b, t, vocab)`.
    fn forward(&self, input_ids: &Tensor, fwd: &mut Forward) -> Result<Tensor> {
        let h = self.hidden(input_ids, fwd)?;
        self.head(&h, fwd.differentiable)
    }
}

/// Tokens put in front of a sequence: an edit written out, for the model to read before the
/// input (SERAC's counterfactual model is the session's model conditioned this way).
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioning {
    pub text: Vec<u32>,
    /// A token a sequence may start with that stays first (the stand-in for an empty context).
    pub lead: u32,
}

impl Conditioning {
    /// `seq` with the text in front (after its lead token, when it starts with one): every
    /// position of `seq` past the first moves by the text's length.
    pub fn apply(&self, seq: &[u32]) -> Vec<u32> {
        let mut out = Vec::with_capacity(seq.len() + self.text.len());
        let rest = match seq.first() {
            Some(&t) if t == self.lead => {
                out.push(t);
                &seq[1..]
            }
            _ => seq,
        };
        out.extend_from_slice(&self.text);
        out.extend_from_slice(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Conditioning;

    #[test]
    fn conditioning_keeps_a_lead_token_first() {
        let c = Conditioning {
            text: vec![100, 101],
            lead: 0,
        };
        assert_eq!(c.apply(&[0, 5, 6]), vec![0, 100, 101, 5, 6]);
        assert_eq!(c.apply(&[5, 6]), vec![100, 101, 5, 6]);
    }
}
