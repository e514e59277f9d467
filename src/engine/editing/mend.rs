//! MEND (Mitchell et al., ICLR 2022): one forward and backward of the request's target loss on
//! the session's current model gives the rank-one gradient factors at the edited layers' MLP
//! down projections; the trained gradient transform (an artefact of `emend train`) turns them
//! into a low-rank update per layer, stored as an ordinary delta of the overlay.
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::method::{EditInput, MethodHparams, MethodOutput, Resource, TypedMethod};
use super::EditError;
use crate::engine::model::{CausalLm, ModelSpec, WeightId};
use crate::engine::overlay::Delta;
use crate::engine::training::mend::{factors, hidden_at, updates, TargetRow};

pub struct Mend;

/// The hyper-parameters of a trained editor's method (MEND, SERAC): which artefact edits.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtefactHparams {
    /// The trained editor's id (`GET /v1/artefacts`); empty: the newest one of the method
    /// trained for the loaded model.
    #[schema(max_length = 128)]
    pub artefact: String,
}

impl ArtefactHparams {
    /// The resource that acquires the artefact for `method`.
    pub(super) fn resource(&self, method: &str) -> Resource {
        Resource::TrainedEditor {
            method: method.into(),
            artefact: (!self.artefact.is_empty()).then(|| self.artefact.clone()),
        }
    }
}

impl MethodHparams for ArtefactHparams {
    fn check(&self, _spec: &ModelSpec) -> Result<(), EditError> {
        if self.artefact.len() > 128 {
            return Err(EditError::invalid(
                "hparams.artefact",
                "at most 128 characters",
            ));
        }
        Ok(())
    }
}

impl TypedMethod for Mend {
    type Hparams = ArtefactHparams;
    const NAME: &'static str = "mend";
    const DESCRIPTION: &'static str = "MEND (Mitchell et al. 2022): a hyper-network trained for the loaded model (`emend train`, `POST /v1/trainings`) maps the request's fine-tuning gradient, as rank-one factors at the top layers' MLP down projections, to a low-rank update.";
    const BATCHED: bool = false;
    const DEFAULTS: &'static str = "mend";

    fn resources(&self, h: &ArtefactHparams) -> Vec<Resource> {
        vec![h.resource(Self::NAME)]
    }

    fn compute(
        &self,
        input: &EditInput<'_>,
        _h: &ArtefactHparams,
    ) -> Result<MethodOutput, EditError> {
        let artefact = input.resources.editor()?;
        let net = artefact.editor.mend()?;
        let model = input.model;
        let layers = &net.shape.layers;
        let mut deltas = Vec::new();
        for req in input.requests {
            let (prompt, _) = req.filled();
            let row = TargetRow::new(input.tok, &prompt, &req.target_new_text())?;
            let h = hidden_at(model, &row.ids, layers[0])?;
            let fs = factors(model, &h, &row, layers)?;
            for (layer, up, down_t) in updates(net, &fs)? {
                deltas.push(Delta::LowRank {
                    weight: WeightId::mlp_down(layer),
                    u: up.detach().to_dtype(model.dtype())?,
                    v: down_t.detach().t()?.contiguous()?.to_dtype(model.dtype())?,
                });
            }
        }
        Ok(MethodOutput {
            deltas,
            state: Vec::new(),
            diagnostics: json!({
                "artefact": artefact.provenance.id,
                "layers": layers,
                "edit_lrs": net.edit_lrs().map_err(EditError::from)?,
            }),
        })
    }
}
