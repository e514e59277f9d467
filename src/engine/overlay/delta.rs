//! What one version adds to the model: weight deltas, and the method state that outlives one
//! edit.
use candle_core::{DType, Tensor};

use crate::engine::model::{Result, WeightId};

/// One update of one weight matrix (`(d_out, d_in)`, like the weight it updates).
#[derive(Debug, Clone)]
pub enum Delta {
    /// `ΔW = U Vᵀ`, `u: (d_out, r)`, `v: (d_in, r)`.
    LowRank {
        weight: WeightId,
        u: Tensor,
        v: Tensor,
    },
    /// A full `(d_out, d_in)` update.
    Dense { weight: WeightId, delta: Tensor },
}

impl Delta {
    /// The weight this delta updates.
    pub fn weight(&self) -> WeightId {
        match self {
            Self::LowRank { weight, .. } | Self::Dense { weight, .. } => *weight,
        }
    }

    pub fn layer(&self) -> usize {
        self.weight().layer
    }

    /// Rank it adds to its weight's stack (`None` for dense).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Self::LowRank { u, .. } => u.dims().get(1).copied(),
            Self::Dense { .. } => None,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::LowRank { u, v, .. } => tensor_bytes(u) + tensor_bytes(v),
            Self::Dense { delta, .. } => tensor_bytes(delta),
        }
    }

    /// The full `(d_out, d_in)` update in f32.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Self::LowRank { u, v, .. } => u
                .to_dtype(DType::F32)?
                .matmul(&v.to_dtype(DType::F32)?.t()?)?,
            Self::Dense { delta, .. } => delta.to_dtype(DType::F32)?,
        })
    }
}

/// A named f32 tensor a method keeps with a version, beside its deltas: AlphaEdit's keys of the
/// session's earlier edits, a memory editor's codebook entries. A version holds only what its
/// own edit added; [`super::Overlay::state`] gathers a name's entries along the chain, so
/// rollback and fork carry exactly the state of the version they land on.
#[derive(Debug, Clone)]
pub struct StateEntry {
    /// `{method}.{what}`, e.g. `alphaedit.keys.4`.
    pub name: String,
    pub tensor: Tensor,
}

impl StateEntry {
    pub fn new(name: impl Into<String>, tensor: Tensor) -> Self {
        Self {
            name: name.into(),
            tensor,
        }
    }

    pub fn bytes(&self) -> usize {
        tensor_bytes(&self.tensor)
    }
}

pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}
