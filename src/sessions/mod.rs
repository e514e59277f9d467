//! Who owns what. A session is the base model plus a graph of versions: every edit adds a
//! version on top of the one it was applied to, a rollback moves the current pointer back, a
//! fork starts a new session at any version of another. This registry keeps each live session's
//! graph in memory (each version's overlay shares its history with its parent), restores it from
//! the store's log on start without recomputing anything, and writes every change through to the
//! store before memory changes, so what a response acknowledged survives a crash.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{SecondsFormat, Utc};
use dashmap::DashMap;
use serde::Serialize;

use crate::canary::{Canary, CanaryError, CanarySettings, Reading};
use crate::engine::editing::{EditReport, EditRequest, EditStep, Method};
use crate::engine::model::ModelError;
use crate::engine::overlay::{self, Overlay};
use crate::engine::worker::{EngineError, ModelView};
use crate::metrics::Metrics;
use crate::store::{NewEdit, SessionRow, Store, StoreError};

mod guard;
mod restore;

pub use guard::{DamageCurve, DamagePoint};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Session {
    pub id: String,
    pub owner: String,
    pub name: Option<String>,
    pub created_at: String,
    /// The current version; 0 is the base model.
    pub version: u64,
    /// Edits between the base model and the current version.
    pub edit_count: u64,
    pub parent: Option<Parent>,
    /// Canary probes after each edit, and the damage budget.
    pub canary: CanarySettings,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Parent {
    pub session: String,
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session `{0}` does not exist")]
    NotFound(String),
    /// `field` is the request field that named the version (`version`, `from.version`).
    #[error("session `{session}` has no version {version} (latest is {latest})")]
    VersionNotFound {
        field: &'static str,
        session: String,
        version: u64,
        latest: u64,
    },
    /// Too many edit requests already wait for this session's edit lock.
    #[error("session `{session}` already has {waiting} edit requests waiting; retry later")]
    Busy { session: String, waiting: usize },
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A delta could not be serialised for the store or read back from it.
    #[error("session `{session}`: {source}")]
    Delta {
        session: String,
        #[source]
        source: ModelError,
    },
    /// The stored log of a session does not replay (restore refuses to guess).
    #[error("session `{session}`, log entry {seq}: {msg}")]
    Corrupt {
        session: String,
        seq: i64,
        msg: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// In `guard` mode, a new version breaks the session's damage budget; nothing was stored.
    #[error("the edit is refused: version {version} would break session `{session}`'s damage budget ({})", guard::describe(&reading.breaches))]
    OverBudget {
        session: String,
        version: u64,
        reading: Box<Reading>,
    },
    /// A canary setting other than `off` on a server without a canary set.
    #[error("this server has no canary set (it needs a dataset directory: configure `data_dir`)")]
    NoCanary,
    #[error(transparent)]
    Canary(#[from] CanaryError),
}

/// What a version records besides its deltas (the full entry lives in the store's log).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VersionSummary {
    pub method: String,
    pub created_at: String,
    pub duration_ms: u64,
    /// The reports of the requests in this version (pre/post metrics).
    pub metrics: serde_json::Value,
}

/// One node of a session's version graph.
#[derive(Debug, Clone)]
struct Node {
    /// `None` for version 0 (the base model).
    parent: Option<u64>,
    overlay: Arc<Overlay>,
    /// Bytes of the deltas of the whole chain (for the overlay-bytes gauge).
    bytes: usize,
    summary: Option<VersionSummary>,
}

#[derive(Debug)]
struct State {
    session: Session,
    versions: BTreeMap<u64, Node>,
    /// Removed from the registry; a waiting edit must not resurrect it.
    deleted: bool,
}

impl State {
    fn new(session: Session) -> Self {
        let mut versions = BTreeMap::new();
        versions.insert(
            0,
            Node {
                parent: None,
                overlay: Overlay::base(),
                bytes: 0,
                summary: None,
            },
        );
        Self {
            session,
            versions,
            deleted: false,
        }
    }

    fn latest(&self) -> u64 {
        self.versions.keys().next_back().copied().unwrap_or(0)
    }

    fn node(&self, field: &'static str, version: u64) -> Result<&Node, SessionError> {
        self.versions
            .get(&version)
            .ok_or_else(|| SessionError::VersionNotFound {
                field,
                session: self.session.id.clone(),
                version,
                latest: self.latest(),
            })
    }

    fn current(&self) -> &Node {
        &self.versions[&self.session.version]
    }

    /// Versions from the first edit up to `version`, oldest first (0 excluded).
    fn chain(&self, version: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut at = Some(version);
        while let Some(v) = at.filter(|v| *v != 0) {
            out.push(v);
            at = self.versions.get(&v).and_then(|n| n.parent);
        }
        out.reverse();
        out
    }

    fn set_current(&mut self, version: u64) {
        self.session.version = version;
        self.session.edit_count = self.versions[&version].overlay.depth() as u64;
    }

    fn push(&mut self, version: u64, parent: u64, data: overlay::VersionData, s: VersionSummary) {
        let overlay = Overlay::push_with(&self.versions[&parent].overlay, data.deltas, data.state);
        self.push_overlay(version, parent, overlay, s);
    }

    /// Adds a version whose overlay is already built on `parent`'s.
    fn push_overlay(
        &mut self,
        version: u64,
        parent: u64,
        overlay: Arc<Overlay>,
        s: VersionSummary,
    ) {
        let p = &self.versions[&parent];
        let node = Node {
            parent: Some(parent),
            bytes: p.bytes + overlay.own_bytes(),
            overlay,
            summary: Some(s),
        };
        self.versions.insert(version, node);
    }
}

/// A live session: its graph behind a short-held lock, and the lock that serialises its edits
/// (held across the engine call, so it is async).
struct Live {
    state: RwLock<State>,
    edit: Arc<tokio::sync::Mutex<()>>,
    waiting: AtomicUsize,
}

impl Live {
    fn new(state: State) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(state),
            edit: Arc::new(tokio::sync::Mutex::new(())),
            waiting: AtomicUsize::new(0),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: every mutation is
        // a single insert or assignment, so a poisoned lock's data is still consistent.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// One version an edit request produced, with what the response reports about it.
#[derive(Debug, Clone)]
pub struct AppliedVersion {
    pub version: u64,
    pub parent_version: u64,
    pub requests: Vec<EditRequest>,
    pub reports: Vec<EditReport>,
    pub hparams: serde_json::Value,
    pub diagnostics: serde_json::Value,
    pub duration_ms: u64,
    pub created_at: String,
    /// The canary reading of this version, when the session's setting ran the probes.
    pub canary: Option<Reading>,
}

/// The outcome of one edit request.
#[derive(Debug, Clone)]
pub struct Applied {
    pub session: Session,
    pub versions: Vec<AppliedVersion>,
}

pub struct Sessions {
    store: Store,
    live: DashMap<String, Arc<Live>>,
    metrics: Arc<Metrics>,
    /// Edit requests that may wait for one session's edit lock before 429.
    max_waiting: usize,
    /// The deployment's canary probes (`None`: no data dir, so every session's canary is off).
    canary: Option<Arc<Canary>>,
}

/// Device and dtype restored deltas are placed on (the engine's).
pub struct Placement {
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
}

impl Sessions {
    /// Runs `canary`'s probes after the edits of sessions whose setting asks for them.
    pub fn with_canary(mut self, canary: Option<Arc<Canary>>) -> Self {
        self.canary = canary;
        self
    }

    pub fn canary(&self) -> Option<&Arc<Canary>> {
        self.canary.as_ref()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn live(&self, tenant: &str, id: &str) -> Result<Arc<Live>, SessionError> {
        match self.live.get(id) {
            Some(l) if l.read().session.owner == tenant => Ok(l.value().clone()),
            _ => Err(SessionError::NotFound(id.to_string())),
        }
    }

    /// Creates a session, optionally forked from `(session, version)` of the same tenant: the
    /// fork starts at that version's overlay (any version of the graph) and its log gets a copy
    /// of the edits on the path to it. A fork keeps its parent's canary setting unless `canary`
    /// names one. Answers only after the store committed it.
    pub async fn create(
        &self,
        tenant: &str,
        name: Option<String>,
        from: Option<(String, u64)>,
        canary: Option<CanarySettings>,
    ) -> Result<Session, SessionError> {
        if canary.as_ref().is_some_and(CanarySettings::is_on) && self.canary.is_none() {
            return Err(SessionError::NoCanary);
        }
        let created_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let id = uuid::Uuid::new_v4().to_string();
        let Some((sid, version)) = from else {
            let st = State::new(Session {
                id: id.clone(),
                owner: tenant.to_string(),
                name,
                created_at,
                version: 0,
                edit_count: 0,
                parent: None,
                canary: canary.unwrap_or_default(),
            });
            self.store.insert_session(&to_row(&st.session)).await?;
            let s = st.session.clone();
            self.live.insert(id, Live::new(st));
            self.metrics.sessions.set(self.live.len() as i64);
            return Ok(s);
        };
        let parent = self.live(tenant, &sid)?;
        // Copy the path to the fork point: nodes are immutable once in the graph, so holding
        // the read lock only for the copy is enough (a concurrent edit only adds nodes).
        let (st, chain) = {
            let p = parent.read();
            p.node("from.version", version)?;
            let chain = p.chain(version);
            let mut st = State::new(Session {
                id: id.clone(),
                owner: tenant.to_string(),
                name,
                created_at,
                version: 0,
                edit_count: 0,
                parent: Some(Parent {
                    session: sid.clone(),
                    version,
                }),
                canary: canary.unwrap_or_else(|| p.session.canary.clone()),
            });
            for v in &chain {
                st.versions.insert(*v, p.versions[v].clone());
            }
            st.set_current(version);
            (st, chain)
        };
        let chain_i: Vec<i64> = chain.iter().map(|v| *v as i64).collect();
        self.store
            .insert_fork(&to_row(&st.session), &sid, &chain_i)
            .await?;
        let s = st.session.clone();
        self.metrics
            .session_overlay_bytes
            .add(st.current().bytes as i64);
        self.live.insert(id, Live::new(st));
        self.metrics.sessions.set(self.live.len() as i64);
        Ok(s)
    }

    /// A tenant's session; other tenants' ids are indistinguishable from missing ones.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Session, SessionError> {
        Ok(self.live(tenant, id)?.read().session.clone())
    }

    /// The model view of a session at `version` (default: the current one).
    pub fn view(
        &self,
        tenant: &str,
        id: &str,
        version: Option<u64>,
    ) -> Result<ModelView, SessionError> {
        let live = self.live(tenant, id)?;
        let st = live.read();
        let v = version.unwrap_or(st.session.version);
        let node = st.node("version", v)?;
        Ok(ModelView::new(id, v, node.overlay.clone()))
    }

    /// The summary of one version (`None` for version 0), or `VersionNotFound`.
    pub fn version_summary(
        &self,
        tenant: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<VersionSummary>, SessionError> {
        let live = self.live(tenant, id)?;
        let st = live.read();
        Ok(st.node("version", version)?.summary.clone())
    }

    pub fn list(&self, tenant: &str) -> Vec<Session> {
        let mut v: Vec<Session> = self
            .live
            .iter()
            .map(|l| l.read().session.clone())
            .filter(|s| s.owner == tenant)
            .collect();
        v.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        v
    }

    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), SessionError> {
        let live = self.live(tenant, id)?;
        let at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        self.store.delete_session(id, &at).await?;
        let bytes = {
            let mut st = live.write();
            st.deleted = true;
            st.current().bytes
        };
        if self.live.remove(id).is_some() {
            self.metrics.session_overlay_bytes.sub(bytes as i64);
        }
        self.metrics.sessions.set(self.live.len() as i64);
        Ok(())
    }

    /// Applies one edit request to a session: takes the session's edit lock, runs `compute` on
    /// the current version's view (the engine call), writes the new versions to the store, then
    /// updates memory. If `compute` or the store fails, nothing changes.
    pub async fn apply_edit<F, Fut>(
        &self,
        tenant: &str,
        id: &str,
        method: Method,
        requests: Vec<EditRequest>,
        compute: F,
    ) -> Result<Applied, SessionError>
    where
        F: FnOnce(ModelView) -> Fut,
        Fut: Future<Output = Result<Vec<EditStep>, EngineError>>,
    {
        let live = self.live(tenant, id)?;
        let waiting = live.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = {
            // Waiters are counted so that one session cannot queue an unbounded backlog.
            let _count = Decrement(&live.waiting);
            if waiting >= self.max_waiting {
                return Err(SessionError::Busy {
                    session: id.to_string(),
                    waiting,
                });
            }
            live.edit.clone().lock_owned().await
        };
        let (base_version, base_overlay, settings) = {
            let st = live.read();
            if st.deleted {
                return Err(SessionError::NotFound(id.to_string()));
            }
            let s = &st.session;
            (s.version, st.current().overlay.clone(), s.canary.clone())
        };
        let view = ModelView::new(id, base_version, base_overlay.clone());
        let steps = compute(view).await?;
        if steps.is_empty() {
            let session = live.read().session.clone();
            return Ok(Applied {
                session,
                versions: Vec::new(),
            });
        }
        // Versions are never reused: the next one is above every version of the graph, even
        // after a rollback to an older one.
        let first = live.read().latest() + 1;
        // Each new version's overlay, chained on the version the edit ran on: the canary reads
        // these and the commit keeps them, so what the engine prepared for the probes is reused.
        let mut overlays: Vec<Arc<Overlay>> = Vec::with_capacity(steps.len());
        for step in &steps {
            let parent = overlays.last().unwrap_or(&base_overlay);
            overlays.push(step.version_on(parent));
        }
        let readings = self.read_canary(id, &settings, first, &overlays).await?;
        let created_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut rows = Vec::with_capacity(steps.len());
        let mut applied = Vec::with_capacity(steps.len());
        let mut offset = 0;
        for (i, step) in steps.iter().enumerate() {
            let version = first + i as u64;
            let parent_version = if i == 0 { base_version } else { version - 1 };
            // A step covers as many requests as it reports on (one, or the whole MEMIT batch).
            let end = (offset + step.reports.len().max(1)).min(requests.len());
            let reqs: Vec<EditRequest> = requests[offset.min(end)..end].to_vec();
            offset = end;
            let delta = overlay::encode(&step.deltas, &step.state).map_err(|source| {
                SessionError::Delta {
                    session: id.to_string(),
                    source,
                }
            })?;
            rows.push(NewEdit {
                version: version as i64,
                parent_version: parent_version as i64,
                method: method.name().to_string(),
                request: json_text(&reqs),
                hparams: json_text(&step.hparams),
                metrics: json_text(&step.reports),
                diagnostics: json_text(&step.diagnostics),
                delta,
                duration_ms: step.duration_ms as i64,
                created_at: created_at.clone(),
                canary: readings[i].as_ref().map(json_text),
            });
            applied.push(AppliedVersion {
                version,
                parent_version,
                requests: reqs,
                reports: step.reports.clone(),
                hparams: step.hparams.clone(),
                diagnostics: step.diagnostics.clone(),
                duration_ms: step.duration_ms,
                created_at: created_at.clone(),
                canary: readings[i].clone(),
            });
        }
        let last = first + steps.len() as u64 - 1;
        // The write and the memory update run as their own task: if the client goes away while
        // the commit is in flight, dropping this future must not leave a committed log entry
        // that memory does not know (the next edit would then reuse its version number).
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let sid = id.to_string();
        let live2 = live.clone();
        let task = tokio::spawn(async move {
            let _guard = guard;
            store.append_edits(&sid, &rows, last as i64).await?;
            let mut st = live2.write();
            let before = st.current().bytes;
            for (overlay, a) in overlays.into_iter().zip(&applied) {
                let summary = VersionSummary {
                    method: method.name().to_string(),
                    created_at: a.created_at.clone(),
                    duration_ms: a.duration_ms,
                    metrics: serde_json::to_value(&a.reports).unwrap_or_default(),
                };
                st.push_overlay(a.version, a.parent_version, overlay, summary);
            }
            st.set_current(last);
            if !st.deleted {
                metrics
                    .session_overlay_bytes
                    .add(st.current().bytes as i64 - before as i64);
            }
            Ok::<_, SessionError>(Applied {
                session: st.session.clone(),
                versions: applied,
            })
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(SessionError::Engine(EngineError::Failed(format!(
                "the edit commit task failed: {e}"
            )))),
        }
    }

    /// Makes `version` (any version of the graph) current; logged as a rollback.
    pub async fn rollback(
        &self,
        tenant: &str,
        id: &str,
        version: u64,
    ) -> Result<Session, SessionError> {
        let live = self.live(tenant, id)?;
        // Behind the edit lock: a rollback between an edit's engine call and its commit would
        // otherwise be overwritten by the edit's parent pointer.
        let _guard = live.edit.clone().lock_owned().await;
        {
            let st = live.read();
            if st.deleted {
                return Err(SessionError::NotFound(id.to_string()));
            }
            st.node("version", version)?;
        }
        let at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        self.store.append_rollback(id, version as i64, &at).await?;
        let mut st = live.write();
        let before = st.current().bytes;
        st.set_current(version);
        if !st.deleted {
            self.metrics
                .session_overlay_bytes
                .add(st.current().bytes as i64 - before as i64);
        }
        Ok(st.session.clone())
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn json_text<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn to_row(s: &Session) -> SessionRow {
    SessionRow {
        canary: Some(json_text(&s.canary)),
        id: s.id.clone(),
        tenant: s.owner.clone(),
        name: s.name.clone(),
        created_at: s.created_at.clone(),
        parent_id: s.parent.as_ref().map(|p| p.session.clone()),
        parent_version: s.parent.as_ref().map(|p| p.version as i64),
        current_version: s.version as i64,
    }
}

fn from_row(r: SessionRow) -> Result<Session, SessionError> {
    // A setting that does not parse is refused rather than read as `off`: a guard must not
    // silently stop guarding after a restart.
    let canary = match r.canary.as_deref() {
        None => CanarySettings::default(),
        Some(t) => serde_json::from_str(t).map_err(|e| SessionError::Corrupt {
            session: r.id.clone(),
            seq: 0,
            msg: format!("the stored canary setting is unreadable: {e}"),
        })?,
    };
    Ok(Session {
        canary,
        version: 0,
        edit_count: 0,
        parent: match (r.parent_id, r.parent_version) {
            (Some(session), Some(v)) => Some(Parent {
                session,
                version: v.max(0) as u64,
            }),
            _ => None,
        },
        id: r.id,
        owner: r.tenant,
        name: r.name,
        created_at: r.created_at,
    })
}
