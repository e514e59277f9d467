//! The method plug-in: the [`EditMethod`] trait every editing method implements (through
//! [`TypedMethod`], which gives it typed hyper-parameters), the resources a method declares
//! for the engine to acquire, and the one registry everything else reads (`GET /v1/methods`,
//! request validation, the CLI, the jobs).
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::nullspace::NullSpace;
use super::stats::LayerStats;
use super::{
    alphaedit, ft, grace, hparams, kn, memit, mend, pmet, rome, serac, wise, EditError, EditRequest,
};
use crate::engine::model::{ModelSpec, Tok};
use crate::engine::overlay::{Delta, Edited, Overlay, StateEntry};
use crate::engine::training::Artefact;

/// Every method emend implements, in the order listings show them. Adding a method is one
/// file, one line here and its defaults in `defaults/hparams.toml`.
static REGISTRY: &[&dyn EditMethod] = &[
    &rome::Rome,
    &memit::Memit,
    &pmet::Pmet,
    &alphaedit::AlphaEdit,
    &kn::Kn,
    &ft::FtL,
    &ft::FtM,
    &grace::Grace,
    &wise::Wise,
    &mend::Mend,
    &serac::Serac,
];

/// Something a method needs that is computed once and shared across edits; the engine acquires
/// and caches it (see [`super::EditContext::acquire`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// `E[k kᵀ]` of the keys entering `mlp.down` at `layers`, over `samples` corpus sequences
    /// of the base model.
    KeyStats { layers: Vec<usize>, samples: usize },
    /// `count` short base-model generations of `tokens` tokens the edit prompt is averaged
    /// over.
    ContextTemplates { count: usize, tokens: usize },
    /// The null space of the key covariance at `layers` (eigenvalues below `threshold`), from
    /// the statistics of `samples` sequences.
    NullSpace {
        layers: Vec<usize>,
        samples: usize,
        threshold: f64,
    },
    /// The first sentences of the statistics corpus's first `count` articles: text unrelated
    /// to any edit.
    CorpusSnippets { count: usize },
    /// A trained editor of `method`: the artefact `artefact`, or the newest one trained for the
    /// loaded model.
    TrainedEditor {
        method: String,
        artefact: Option<String>,
    },
}

/// The acquired resources of one edit.
#[derive(Default)]
pub struct Resources {
    pub(super) stats: BTreeMap<usize, Arc<LayerStats>>,
    pub(super) templates: Option<Arc<Vec<String>>>,
    pub(super) null_spaces: BTreeMap<usize, Arc<NullSpace>>,
    pub(super) snippets: Option<Arc<Vec<String>>>,
    pub(super) editor: Option<Arc<Artefact>>,
}

impl Resources {
    /// The key statistics of `layer` (declared as [`Resource::KeyStats`]).
    pub fn stats(&self, layer: usize) -> Result<&Arc<LayerStats>, EditError> {
        self.stats.get(&layer).ok_or_else(|| {
            EditError::Stats(format!("no key statistics were acquired for layer {layer}"))
        })
    }

    /// The null space of `layer` (declared as [`Resource::NullSpace`]).
    pub fn null_space(&self, layer: usize) -> Result<&Arc<NullSpace>, EditError> {
        self.null_spaces.get(&layer).ok_or_else(|| {
            EditError::Stats(format!("no null space was acquired for layer {layer}"))
        })
    }

    /// The corpus snippets (declared as [`Resource::CorpusSnippets`]).
    pub fn snippets(&self) -> Result<&[String], EditError> {
        self.snippets
            .as_deref()
            .map(Vec::as_slice)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| EditError::Stats("no corpus snippets were acquired".into()))
    }

    /// The trained editor (declared as [`Resource::TrainedEditor`]).
    pub fn editor(&self) -> Result<&Arc<Artefact>, EditError> {
        self.editor
            .as_ref()
            .ok_or_else(|| EditError::Stats("no trained editor was acquired".into()))
    }

    /// The context templates (declared as [`Resource::ContextTemplates`]).
    pub fn templates(&self) -> Result<&[String], EditError> {
        self.templates
            .as_deref()
            .map(Vec::as_slice)
            .ok_or_else(|| EditError::Stats("no context templates were acquired".into()))
    }
}

/// What a method computes on: the session's current model and version, the requests of one
/// step (one request, or the whole batch for a batched method) and its resources.
pub struct EditInput<'a> {
    /// The current model: the base with `current`'s prepared overlay.
    pub model: &'a Edited<'a>,
    /// The current version: its chain's method state, and the parent of per-layer steps.
    pub current: &'a Arc<Overlay>,
    pub tok: &'a Tok,
    pub requests: &'a [&'a EditRequest],
    pub resources: &'a Resources,
}

/// What a method returns for one step: the new version's deltas and method state, and its
/// diagnostics (loss curves, norms, layers).
#[derive(Debug)]
pub struct MethodOutput {
    pub deltas: Vec<Delta>,
    pub state: Vec<StateEntry>,
    pub diagnostics: Value,
}

/// A method's hyper-parameters: deserialised from the merged defaults and overrides, with a
/// JSON schema derived from the type (`#[schema(minimum, maximum)]` on a field is its range:
/// the schema shows it and [`hparams::resolve`] enforces it).
pub trait MethodHparams: DeserializeOwned + Serialize + utoipa::ToSchema + Send + Sync {
    /// What the schema's ranges cannot say: layers the model has, orderings, combinations.
    fn check(&self, spec: &ModelSpec) -> Result<(), EditError>;
}

/// A method with typed hyper-parameters; every `TypedMethod` is an [`EditMethod`].
pub trait TypedMethod: Send + Sync + 'static {
    type Hparams: MethodHparams;
    /// The name requests use (`rome`, `ft-m`).
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    /// True when a batch is one update; false when requests are applied one by one.
    const BATCHED: bool;
    /// The table of `defaults/hparams.toml` with its defaults (methods may share one).
    const DEFAULTS: &'static str;

    /// The resources `h` needs.
    fn resources(&self, h: &Self::Hparams) -> Vec<Resource>;

    /// Request checks of this method beyond the common ones (e.g. a required `target_true`).
    fn check_requests(&self, _requests: &[EditRequest]) -> Result<(), EditError> {
        Ok(())
    }

    fn compute(&self, input: &EditInput<'_>, h: &Self::Hparams) -> Result<MethodOutput, EditError>;
}

/// An editing method as the registry holds it (hyper-parameters as resolved JSON).
pub trait EditMethod: Send + Sync {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    fn batched(&self) -> bool;
    fn defaults_table(&self) -> &'static str;
    /// JSON Schema of the hyper-parameters.
    fn hparams_schema(&self) -> Value;
    /// Parses resolved hyper-parameters and checks them against their schema and the model.
    fn check_hparams(&self, resolved: &Value, spec: &ModelSpec) -> Result<(), EditError>;
    fn resources(&self, resolved: &Value) -> Result<Vec<Resource>, EditError>;
    fn check_requests(&self, requests: &[EditRequest]) -> Result<(), EditError>;
    fn compute(&self, input: &EditInput<'_>, resolved: &Value) -> Result<MethodOutput, EditError>;
}

impl<T: TypedMethod> EditMethod for T {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn description(&self) -> &'static str {
        T::DESCRIPTION
    }
    fn batched(&self) -> bool {
        T::BATCHED
    }
    fn defaults_table(&self) -> &'static str {
        T::DEFAULTS
    }
    fn hparams_schema(&self) -> Value {
        hparams::schema_of::<T::Hparams>()
    }
    fn check_hparams(&self, resolved: &Value, spec: &ModelSpec) -> Result<(), EditError> {
        hparams::check_ranges(&self.hparams_schema(), resolved)?;
        hparams::parse::<T::Hparams>(resolved)?.check(spec)
    }
    fn resources(&self, resolved: &Value) -> Result<Vec<Resource>, EditError> {
        Ok(TypedMethod::resources(
            self,
            &hparams::parse::<T::Hparams>(resolved)?,
        ))
    }
    fn check_requests(&self, requests: &[EditRequest]) -> Result<(), EditError> {
        TypedMethod::check_requests(self, requests)
    }
    fn compute(&self, input: &EditInput<'_>, resolved: &Value) -> Result<MethodOutput, EditError> {
        TypedMethod::compute(self, input, &hparams::parse::<T::Hparams>(resolved)?)
    }
}

/// A registered method: a cheap handle that names one entry of the registry.
#[derive(Clone, Copy)]
pub struct Method(&'static dyn EditMethod);

impl Method {
    /// Every registered method, in registry order.
    pub fn all() -> Vec<Method> {
        REGISTRY.iter().map(|m| Method(*m)).collect()
    }

    /// The registered method called `name`.
    pub fn named(name: &str) -> Option<Method> {
        REGISTRY
            .iter()
            .find(|m| m.name() == name)
            .map(|m| Method(*m))
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }

    pub fn description(self) -> &'static str {
        self.0.description()
    }

    /// True when a batch is one update; false when requests are applied one by one.
    pub fn batched(self) -> bool {
        self.0.batched()
    }

    /// The method itself.
    pub fn imp(self) -> &'static dyn EditMethod {
        self.0
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}
impl Eq for Method {}

impl std::hash::Hash for Method {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state)
    }
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Method({})", self.name())
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = EditError;
    fn from_str(s: &str) -> Result<Self, EditError> {
        Self::named(s).ok_or_else(|| {
            EditError::invalid(
                "method",
                format!(
                    "unknown method `{s}`; known: {}",
                    REGISTRY
                        .iter()
                        .map(|m| m.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    }
}

impl Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One method as `GET /v1/methods` describes it.
#[derive(Debug, Clone, Serialize)]
pub struct MethodInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// A batch is one update (`true`) or requests are applied one by one.
    pub batched: bool,
    /// JSON Schema of the hyper-parameters.
    pub hparams_schema: Value,
    /// Defaults for the loaded model's architecture.
    pub defaults: Value,
    /// What the defaults need acquired (statistics, templates).
    pub resources: Vec<Resource>,
}

/// Every method, with defaults for this model.
pub fn methods(spec: &ModelSpec) -> Vec<MethodInfo> {
    Method::all()
        .into_iter()
        .map(|m| {
            let defaults = hparams::defaults(m, spec);
            MethodInfo {
                name: m.name(),
                description: m.description(),
                batched: m.batched(),
                hparams_schema: m.imp().hparams_schema(),
                resources: m.imp().resources(&defaults).unwrap_or_default(),
                defaults,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_parse() {
        let names: Vec<&str> = Method::all().iter().map(|m| m.name()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "{names:?}");
        for m in Method::all() {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
            let json = serde_json::to_value(m).unwrap();
            assert_eq!(serde_json::from_value::<Method>(json).unwrap(), m);
        }
        let e = "bogus".parse::<Method>().unwrap_err().to_string();
        assert!(
            e.starts_with("method: unknown method `bogus`; known: rome, memit"),
            "{e}"
        );
    }
}
