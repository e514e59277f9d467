//! Restoring the registry from the store's log at start: deltas are read back from their stored
//! bytes (never recomputed) and pushed on their parent version; rollbacks move the pointer.
use std::sync::Arc;

use dashmap::DashMap;

use super::{from_row, Live, Placement, SessionError, Sessions, State, VersionSummary};
use crate::engine::overlay;
use crate::metrics::Metrics;
use crate::store::{LogKind, Store};

impl Sessions {
    /// Loads every live session and replays its log: deltas are read back from their stored
    /// bytes (never recomputed) and pushed on their parent version; rollbacks move the pointer.
    pub async fn restore(
        store: Store,
        metrics: Arc<Metrics>,
        placement: &Placement,
        max_waiting: usize,
    ) -> Result<Self, SessionError> {
        let live = DashMap::new();
        let mut versions = 0usize;
        let mut bytes = 0usize;
        for row in store.load_sessions().await? {
            let stored_current = row.current_version;
            let mut st = State::new(from_row(row)?);
            let id = st.session.id.clone();
            let log = store.load_log(&id, true).await?;
            let mut current = 0u64;
            for e in log {
                let corrupt = |msg: String| SessionError::Corrupt {
                    session: id.clone(),
                    seq: e.seq,
                    msg,
                };
                let v = u64::try_from(e.version).map_err(|_| corrupt("negative version".into()))?;
                match e.kind {
                    LogKind::Rollback => {
                        if !st.versions.contains_key(&v) {
                            return Err(corrupt(format!("rollback to unknown version {v}")));
                        }
                        current = v;
                    }
                    LogKind::Edit => {
                        let parent = e.parent_version.map(|p| p.max(0) as u64).unwrap_or(current);
                        if v == 0 || st.versions.contains_key(&v) {
                            return Err(corrupt(format!("version {v} is logged twice")));
                        }
                        if !st.versions.contains_key(&parent) {
                            return Err(corrupt(format!("parent version {parent} is unknown")));
                        }
                        let raw = e.delta.as_deref().unwrap_or_default();
                        let data = overlay::decode(raw, &placement.device, placement.dtype)
                            .map_err(|err| corrupt(err.to_string()))?;
                        let summary = VersionSummary {
                            method: e.method.clone().unwrap_or_default(),
                            created_at: e.created_at.clone(),
                            duration_ms: e.duration_ms.unwrap_or(0).max(0) as u64,
                            metrics: e
                                .metrics
                                .as_deref()
                                .and_then(|m| serde_json::from_str(m).ok())
                                .unwrap_or(serde_json::Value::Null),
                        };
                        st.push(v, parent, data, summary);
                        current = v;
                        versions += 1;
                    }
                }
            }
            if current as i64 != stored_current {
                // Both are written in one transaction, so this only happens when the row was
                // changed by hand; the log is the truth.
                tracing::warn!(session = %id, log = current, row = stored_current, "current version differs from the log; using the log");
            }
            st.set_current(current);
            bytes += st.current().bytes;
            live.insert(id, Live::new(st));
        }
        metrics.sessions.set(live.len() as i64);
        metrics.session_overlay_bytes.set(bytes as i64);
        tracing::info!(
            sessions = live.len(),
            versions,
            overlay_bytes = bytes,
            "sessions restored"
        );
        Ok(Self {
            store,
            live,
            metrics,
            max_waiting,
            canary: None,
        })
    }
}
