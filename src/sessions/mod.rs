//! Who owns what. A session is the base model plus an ordered edit log; this registry keeps the
//! live ones in memory (restored from the store on start) and writes every change through.
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use dashmap::DashMap;
use serde::Serialize;

use crate::metrics::Metrics;
use crate::store::{SessionRow, Store, StoreError};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Session {
    pub id: String,
    pub owner: String,
    pub name: Option<String>,
    pub created_at: String,
    /// 0 is the base model; each edit adds one.
    pub version: u64,
    pub edit_count: u64,
    pub parent: Option<Parent>,
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
    #[error("session `{session}` has no version {version} (latest is {latest})")]
    VersionNotFound {
        session: String,
        version: u64,
        latest: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Sessions {
    store: Store,
    live: DashMap<String, Session>,
    metrics: Arc<Metrics>,
}

impl Sessions {
    /// Loads every live session from the store.
    pub async fn restore(store: Store, metrics: Arc<Metrics>) -> Result<Self, SessionError> {
        let live = DashMap::new();
        for row in store.load_sessions().await? {
            let s = from_row(row);
            live.insert(s.id.clone(), s);
        }
        metrics.sessions.set(live.len() as i64);
        tracing::info!(sessions = live.len(), "sessions restored");
        Ok(Self {
            store,
            live,
            metrics,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Creates a session, optionally forked from `(session, version)` of the same tenant.
    /// Answers only after the store committed it.
    pub async fn create(
        &self,
        tenant: &str,
        name: Option<String>,
        from: Option<(String, u64)>,
    ) -> Result<Session, SessionError> {
        let parent = match from {
            Some((sid, version)) => {
                let p = self.get(tenant, &sid)?;
                if version > p.version {
                    return Err(SessionError::VersionNotFound {
                        session: sid,
                        version,
                        latest: p.version,
                    });
                }
                Some(Parent {
                    session: sid,
                    version,
                })
            }
            None => None,
        };
        let s = Session {
            id: uuid::Uuid::new_v4().to_string(),
            owner: tenant.to_string(),
            name,
            created_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            version: parent.as_ref().map_or(0, |p| p.version),
            edit_count: parent.as_ref().map_or(0, |p| p.version),
            parent,
        };
        self.store.insert_session(&to_row(&s)).await?;
        self.live.insert(s.id.clone(), s.clone());
        self.metrics.sessions.set(self.live.len() as i64);
        Ok(s)
    }

    /// A tenant's session; other tenants' ids are indistinguishable from missing ones.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Session, SessionError> {
        match self.live.get(id) {
            Some(s) if s.owner == tenant => Ok(s.clone()),
            _ => Err(SessionError::NotFound(id.to_string())),
        }
    }

    pub fn list(&self, tenant: &str) -> Vec<Session> {
        let mut v: Vec<Session> = self
            .live
            .iter()
            .filter(|s| s.owner == tenant)
            .map(|s| s.clone())
            .collect();
        v.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        v
    }

    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), SessionError> {
        self.get(tenant, id)?;
        let at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        self.store.delete_session(id, &at).await?;
        self.live.remove(id);
        self.metrics.sessions.set(self.live.len() as i64);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

fn to_row(s: &Session) -> SessionRow {
    SessionRow {
        id: s.id.clone(),
        tenant: s.owner.clone(),
        name: s.name.clone(),
        created_at: s.created_at.clone(),
        parent_id: s.parent.as_ref().map(|p| p.session.clone()),
        parent_version: s.parent.as_ref().map(|p| p.version as i64),
        current_version: s.version as i64,
    }
}

fn from_row(r: SessionRow) -> Session {
    Session {
        version: r.current_version.max(0) as u64,
        edit_count: r.current_version.max(0) as u64,
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
    }
}
