//! The damage guard: canary probes run on every new version of a session whose setting asks for
//! them, their drift from the base model checked against the session's budget.
//!
//! [`Canary`] owns the deployment's [`CanarySet`] and the base model's [`Baseline`] (made once,
//! on first use). A reading runs the probes through the engine's evaluation lane, so it is
//! served between interactive requests, and its numbers are those an evaluation job of the same
//! tasks and limits gives on the same version.
pub mod budget;
pub mod set;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use budget::{Breach, Budget, BudgetError, CanaryMode, CanarySettings, Drift};
pub use set::{Baseline, CanaryError, CanarySet, CanarySpec, Measured};

use crate::engine::worker::{Engine, EngineBackend, ModelView};

/// The probes' result on one version, as stored with the edit that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Reading {
    /// The canary set's name and digest (`name@digest12`).
    #[schema(example = "emend-canary-1@3f5a0c2e91d4")]
    pub set: String,
    pub mode: CanaryMode,
    /// `task.metric` → value on this version.
    #[schema(value_type = Object)]
    pub scores: BTreeMap<String, f64>,
    /// Neighbour probes checked (greedy on the base model).
    pub neighbours: u32,
    pub drift: Drift,
    /// The budget at the time of the reading.
    pub budget: Budget,
    /// Limits this version breaks (in `measure` mode the edit is kept and flagged).
    pub breaches: Vec<Breach>,
    pub duration_ms: u64,
}

impl Reading {
    pub fn flagged(&self) -> bool {
        !self.breaches.is_empty()
    }
}

/// The base model's reading, for the damage curve's first point.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BaseReading {
    pub set: String,
    #[schema(value_type = Object)]
    pub scores: BTreeMap<String, f64>,
    pub neighbours: u32,
}

pub struct Canary {
    engine: Engine,
    set: Arc<CanarySet>,
    patience: Duration,
    baseline: tokio::sync::OnceCell<Arc<Baseline>>,
}

impl Canary {
    pub fn new(engine: Engine, set: CanarySet, patience: Duration) -> Self {
        Self {
            engine,
            set: Arc::new(set),
            patience,
            baseline: tokio::sync::OnceCell::new(),
        }
    }

    fn set_label(&self) -> String {
        format!("{}@{}", self.set.spec.name, &self.set.digest[..12])
    }

    /// The base model's answers and scores, measured on first use.
    pub async fn baseline(&self) -> Result<Arc<Baseline>, CanaryError> {
        self.baseline
            .get_or_try_init(|| async {
                let (engine, set, patience) =
                    (self.engine.clone(), self.set.clone(), self.patience);
                let t0 = Instant::now();
                let b = blocking(move || {
                    let mut backend = EngineBackend::new(engine, ModelView::base(), patience);
                    set.baseline(&mut backend)
                })
                .await?;
                tracing::info!(set = %self.set_label(), seconds = t0.elapsed().as_secs_f64(),
                    "canary baseline measured");
                Ok(Arc::new(b))
            })
            .await
            .cloned()
    }

    pub async fn base_reading(&self) -> Result<BaseReading, CanaryError> {
        let b = self.baseline().await?;
        Ok(BaseReading {
            set: self.set_label(),
            scores: b.measured.scores.clone(),
            neighbours: set::flips(&b.measured.greedy, &b.measured.greedy).1,
        })
    }

    /// Runs the probes on `view` and compares them with the base model under `settings`.
    pub async fn read(
        &self,
        view: ModelView,
        settings: &CanarySettings,
    ) -> Result<Reading, CanaryError> {
        let base = self.baseline().await?;
        let t0 = Instant::now();
        let (engine, set, patience) = (self.engine.clone(), self.set.clone(), self.patience);
        let answers = base.answers.clone();
        let m = blocking(move || {
            let mut backend = EngineBackend::new(engine, view, patience);
            set.measure(&mut backend, &answers)
        })
        .await?;
        let (flipped, checked) = set::flips(&base.measured.greedy, &m.greedy);
        let drift = budget::drift(&base.measured.scores, &m.scores, flipped);
        Ok(Reading {
            set: self.set_label(),
            mode: settings.mode,
            breaches: settings.budget.breaches(&drift),
            scores: m.scores,
            neighbours: checked,
            drift,
            budget: settings.budget.clone(),
            duration_ms: t0.elapsed().as_millis() as u64,
        })
    }
}

/// Runs blocking probe work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CanaryError> + Send + 'static,
) -> Result<T, CanaryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CanaryError::Failed(format!("the probe thread failed: {e}")))?
}
