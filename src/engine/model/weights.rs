//! Names of the linear projections a layer holds, so that edits can address any weight of the
//! model and not only the MLP's down projection. Every architecture maps its own tensor names
//! onto these kinds; GPT-2 and GPT-NeoX keep one fused `attn.qkv` projection instead of
//! separate `attn.q`, `attn.k` and `attn.v`.
use serde::{Deserialize, Serialize};

use super::{ModelError, Result};

/// A linear projection of a transformer block, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Linear {
    #[serde(rename = "attn.q")]
    AttnQ,
    #[serde(rename = "attn.k")]
    AttnK,
    #[serde(rename = "attn.v")]
    AttnV,
    /// The fused query/key/value projection (GPT-2 `attn.c_attn`, GPT-NeoX
    /// `attention.query_key_value`).
    #[serde(rename = "attn.qkv")]
    AttnQkv,
    /// The attention output projection (Llama `o_proj`, GPT-2 `attn.c_proj`, GPT-NeoX
    /// `attention.dense`).
    #[serde(rename = "attn.o")]
    AttnO,
    /// Llama's gate projection (SwiGLU).
    #[serde(rename = "mlp.gate")]
    MlpGate,
    /// The MLP's input projection (Llama `up_proj`, GPT-2 `mlp.c_fc`, GPT-NeoX
    /// `mlp.dense_h_to_4h`).
    #[serde(rename = "mlp.up")]
    MlpUp,
    /// The MLP's output projection, which reads the `mlp.in` site and writes `mlp.out` (Llama
    /// `down_proj`, GPT-2 `mlp.c_proj`, GPT-NeoX `mlp.dense_4h_to_h`).
    #[serde(rename = "mlp.down")]
    MlpDown,
}

impl Linear {
    pub const ALL: [Linear; 8] = [
        Self::AttnQ,
        Self::AttnK,
        Self::AttnV,
        Self::AttnQkv,
        Self::AttnO,
        Self::MlpGate,
        Self::MlpUp,
        Self::MlpDown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::AttnQ => "attn.q",
            Self::AttnK => "attn.k",
            Self::AttnV => "attn.v",
            Self::AttnQkv => "attn.qkv",
            Self::AttnO => "attn.o",
            Self::MlpGate => "mlp.gate",
            Self::MlpUp => "mlp.up",
            Self::MlpDown => "mlp.down",
        }
    }
}

impl std::fmt::Display for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Linear {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "unknown linear `{s}`; known: {}",
                    Self::ALL.map(Linear::name).join(", ")
                ))
            })
    }
}

/// One weight matrix of the model: a linear of one layer, `(out, in)` like every weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WeightId {
    pub layer: usize,
    pub linear: Linear,
}

impl WeightId {
    pub fn new(layer: usize, linear: Linear) -> Self {
        Self { layer, linear }
    }

    /// The MLP down projection of `layer`: where ROME, MEMIT and FT write.
    pub fn mlp_down(layer: usize) -> Self {
        Self::new(layer, Linear::MlpDown)
    }
}

impl std::fmt::Display for WeightId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layers.{}.{}", self.layer, self.linear)
    }
}

/// The error for a linear an architecture does not have (e.g. `attn.q` on GPT-2, whose query
/// projection is part of the fused `attn.qkv`).
pub(crate) fn missing(arch: &str, id: WeightId, has: &[Linear]) -> ModelError {
    ModelError::InvalidInput(format!(
        "{arch} has no `{}`; its linears are {}",
        id.linear,
        has.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_names_round_trip() {
        for l in Linear::ALL {
            assert_eq!(l.name().parse::<Linear>().unwrap(), l);
            assert_eq!(serde_json::to_value(l).unwrap(), l.name());
        }
        assert!("mlp.fc".parse::<Linear>().is_err());
        assert_eq!(WeightId::mlp_down(4).to_string(), "layers.4.mlp.down");
    }
}
