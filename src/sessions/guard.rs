//! The damage guard's part in a session: the canary setting, and the probes run on each version
//! an edit makes before anything is stored, so a refused edit leaves no trace.
use std::sync::Arc;

use super::{json_text, Session, SessionError, Sessions};
use crate::canary::{Breach, CanaryMode, CanarySettings, Reading};
use crate::engine::overlay::Overlay;
use crate::engine::worker::ModelView;

/// `perplexity_ratio 1.31 > 1.2 (wikitext.word_perplexity), …`
pub(super) fn describe(breaches: &[Breach]) -> String {
    breaches
        .iter()
        .map(|b| {
            let probe = b
                .probe
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default();
            format!("{} {:.4} > {}{probe}", b.limit, b.measured, b.allowed)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Sessions {
    /// Replaces a session's canary setting (stored first); later edits are read against it.
    pub async fn set_canary(
        &self,
        tenant: &str,
        id: &str,
        settings: CanarySettings,
    ) -> Result<Session, SessionError> {
        if settings.is_on() && self.canary.is_none() {
            return Err(SessionError::NoCanary);
        }
        let live = self.live(tenant, id)?;
        // Behind the edit lock: an edit in flight is read against the setting it started with.
        let _guard = live.edit.clone().lock_owned().await;
        if live.read().deleted {
            return Err(SessionError::NotFound(id.to_string()));
        }
        self.store
            .set_session_canary(id, &json_text(&settings))
            .await?;
        let mut st = live.write();
        st.session.canary = settings;
        Ok(st.session.clone())
    }

    /// The canary reading of each new version (`first`, `first + 1`, … on `overlays`), or
    /// `None`s when the session's canary is off. In `guard` mode the first version over budget
    /// ends the edit with [`SessionError::OverBudget`].
    pub(super) async fn read_canary(
        &self,
        id: &str,
        settings: &CanarySettings,
        first: u64,
        overlays: &[Arc<Overlay>],
    ) -> Result<Vec<Option<Reading>>, SessionError> {
        if !settings.is_on() {
            return Ok(vec![None; overlays.len()]);
        }
        let canary = self.canary.as_ref().ok_or(SessionError::NoCanary)?;
        let mut out = Vec::with_capacity(overlays.len());
        for (i, overlay) in overlays.iter().enumerate() {
            let version = first + i as u64;
            let view = ModelView::new(id, version, overlay.clone());
            let reading = canary.read(view, settings).await?;
            self.record(&reading);
            tracing::info!(session = %id, version, ppl_ratio = reading.drift.perplexity_ratio,
                acc_drop = reading.drift.accuracy_drop, flips = reading.drift.neighbour_flips,
                breaches = reading.breaches.len(), ms = reading.duration_ms, "canary read");
            if settings.mode == CanaryMode::Guard && reading.flagged() {
                for b in &reading.breaches {
                    self.metrics
                        .edits_rejected_total
                        .with_label_values(&[b.limit.as_str()])
                        .inc();
                }
                return Err(SessionError::OverBudget {
                    session: id.to_string(),
                    version,
                    reading: Box::new(reading),
                });
            }
            out.push(Some(reading));
        }
        Ok(out)
    }

    fn record(&self, r: &Reading) {
        let m = &self.metrics;
        m.canary_perplexity_ratio.observe(r.drift.perplexity_ratio);
        m.canary_accuracy_drop.observe(r.drift.accuracy_drop);
        m.canary_neighbour_flips
            .observe(f64::from(r.drift.neighbour_flips));
        m.canary_seconds.observe(r.duration_ms as f64 / 1000.0);
        if r.flagged() {
            m.canary_flagged_total.inc();
        }
    }
}

/// A session's damage curve: the canary readings of its versions.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DamageCurve {
    pub session: String,
    pub setting: CanarySettings,
    /// The base model's reading (version 0), when the server has a canary set.
    pub base: Option<crate::canary::BaseReading>,
    /// Versions with a reading, in log order (rolled-back branches included).
    pub points: Vec<DamagePoint>,
    /// The current version and the versions on its path from the base, oldest first.
    pub current_path: Vec<u64>,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DamagePoint {
    pub version: u64,
    pub parent_version: u64,
    /// Edits between the base model and this version.
    pub edits: u64,
    pub method: String,
    pub created_at: String,
    pub reading: Reading,
}

impl Sessions {
    /// The damage curve of a session from its log (readings are stored with their edits).
    pub async fn damage(&self, tenant: &str, id: &str) -> Result<DamageCurve, SessionError> {
        let (session, current_path) = {
            let live = self.live(tenant, id)?;
            let st = live.read();
            (st.session.clone(), st.chain(st.session.version))
        };
        let log = self.store.load_log(id, false).await?;
        let mut depth = std::collections::HashMap::from([(0u64, 0u64)]);
        let mut points = Vec::new();
        for e in log {
            if e.kind != crate::store::LogKind::Edit {
                continue;
            }
            let v = e.version.max(0) as u64;
            let parent = e.parent_version.unwrap_or(0).max(0) as u64;
            let d = depth.get(&parent).copied().unwrap_or(0) + 1;
            depth.insert(v, d);
            let Some(reading) = e
                .canary
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
            else {
                continue;
            };
            points.push(DamagePoint {
                version: v,
                parent_version: parent,
                edits: d,
                method: e.method.unwrap_or_default(),
                created_at: e.created_at,
                reading,
            });
        }
        let base = match (&self.canary, points.is_empty()) {
            (Some(c), false) => Some(c.base_reading().await?),
            _ => None,
        };
        Ok(DamageCurve {
            session: session.id,
            setting: session.canary,
            base,
            points,
            current_path,
        })
    }
}
