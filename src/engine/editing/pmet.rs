//! PMET (Li et al., AAAI 2024): precise editing of the FFN's share of a fact.
//!
//! For every request, the attention output and the MLP output of the last edited layer (at the
//! subject's last token) are optimised together so the model predicts the new target; only the
//! MLP's optimised value is kept. It is then written through the down projections of the edited
//! layers, lowest first, as MEMIT spreads its residual, except that the missing part is the MLP
//! output of the last layer and each layer writes `1/√(layers left)` of it (EasyEdit's
//! `pmet_main.py`); the least squares are MEMIT's, `ΔW = R Kᵀ (λC + KKᵀ)⁻¹`.
//!
//! The values are optimised as every method here optimises them (stop at NLL < 5·10⁻², or at the
//! argmax with `early_stop_argmax`); EasyEdit's PMET also lowers the NLL weight to a tenth once
//! the target is the argmax and stops when the KL term is then small, which is left out.
use super::memit::{covariance_resources, covariance_walk, MemitHparams, Target};
use super::method::{EditInput, MethodOutput, Resource, TypedMethod};
use super::EditError;
use crate::engine::model::SiteKind;

pub struct Pmet;

/// PMET's target: attention and MLP values optimised together, the MLP's written, each layer
/// writing `1/√(layers left)` of what is missing.
const FFN_OF_BOTH: Target = Target {
    optimise: &[SiteKind::AttnOut, SiteKind::MlpOut],
    written: SiteKind::MlpOut,
    share: |left| 1.0 / (left as f64).sqrt(),
};

impl TypedMethod for Pmet {
    /// MEMIT's: the same layers, value optimisation, λ and statistics.
    type Hparams = MemitHparams;
    const NAME: &'static str = "pmet";
    const DESCRIPTION: &'static str = "Precise model editing in a transformer (Li et al. 2024): the attention and FFN values of the last edited layer optimised together, only the FFN's written through the down projections of several layers with MEMIT's least squares.";
    const BATCHED: bool = true;
    const DEFAULTS: &'static str = "pmet";

    fn resources(&self, h: &MemitHparams) -> Vec<Resource> {
        covariance_resources(h)
    }

    fn compute(&self, input: &EditInput<'_>, h: &MemitHparams) -> Result<MethodOutput, EditError> {
        covariance_walk(input, h, &FFN_OF_BOTH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmet_writes_the_root_share_where_memit_writes_the_even_share() {
        assert_eq!((FFN_OF_BOTH.share)(4), 0.5);
        assert_eq!((FFN_OF_BOTH.share)(1), 1.0);
        assert_eq!((Target::RESIDUAL.share)(4), 0.25);
        assert_eq!(FFN_OF_BOTH.optimise, [SiteKind::AttnOut, SiteKind::MlpOut]);
    }
}
