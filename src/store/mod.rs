//! The durable log: sqlx over SQLite (a file in the data dir, the default) or PostgreSQL (when
//! the URL says so, for many replicas). Every write a response acknowledges is committed first.
use std::str::FromStr;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor, Row, Transaction};

mod jobs;
mod log;
pub use jobs::JobRow;
pub use log::{LogEntry, LogKind, NewEdit};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database `{url}`: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("unsupported database URL `{0}` (sqlite://… or postgres://…)")]
    Url(String),
    /// The session was deleted while a change to it was being written; nothing was written.
    #[error("session `{0}` no longer exists")]
    SessionGone(String),
    #[error("the stored log is inconsistent: {0}")]
    Inconsistent(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl FromStr for Backend {
    type Err = StoreError;
    fn from_str(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Self::Postgres)
        } else {
            Err(StoreError::Url(url.to_string()))
        }
    }
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub id: String,
    pub tenant: String,
    pub name: Option<String>,
    pub created_at: String,
    pub parent_id: Option<String>,
    pub parent_version: Option<i64>,
    pub current_version: i64,
    /// The canary setting as JSON (`None`: off).
    pub canary: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Connects and runs the migrations of the URL's backend.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend: Backend = url.parse()?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 1 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Durable before acknowledged: WAL with a full fsync per commit.
                        conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|source| StoreError::Connect { url: redact(url), source })?;
        match backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("migrations/postgres").run(&pool).await?,
        }
        Ok(Self { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn insert_session(&self, s: &SessionRow) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_session_in(&mut tx, s).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Soft delete: the row and its log stay for audit; returns whether a live row was hit.
    pub async fn delete_session(&self, id: &str, at: &str) -> Result<bool> {
        let r =
            sqlx::query("UPDATE sessions SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
                .bind(at)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Replaces a live session's canary setting (JSON).
    pub async fn set_session_canary(&self, id: &str, canary: &str) -> Result<()> {
        let r = sqlx::query("UPDATE sessions SET canary = $1 WHERE id = $2 AND deleted_at IS NULL")
            .bind(canary)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() != 1 {
            return Err(StoreError::SessionGone(id.to_string()));
        }
        Ok(())
    }

    /// Live sessions, oldest first.
    pub async fn load_sessions(&self) -> Result<Vec<SessionRow>> {
        let rows = sqlx::query(
            "SELECT id, tenant, name, created_at, parent_id, parent_version, current_version, canary \
             FROM sessions WHERE deleted_at IS NULL ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_row).collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn insert_session_in(tx: &mut Transaction<'_, Any>, s: &SessionRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO sessions (id, tenant, name, created_at, parent_id, parent_version, current_version, canary) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&s.id)
    .bind(&s.tenant)
    .bind(&s.name)
    .bind(&s.created_at)
    .bind(&s.parent_id)
    .bind(s.parent_version)
    .bind(s.current_version)
    .bind(&s.canary)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn session_row(r: &AnyRow) -> Result<SessionRow> {
    Ok(SessionRow {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
        parent_id: r.try_get("parent_id")?,
        parent_version: r.try_get("parent_version")?,
        current_version: r.try_get("current_version")?,
        canary: r.try_get("canary")?,
    })
}

/// Hides a password in a database URL before it reaches logs or errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://emend:secret@db:5432/emend"),
            "postgres://emend:***@db:5432/emend"
        );
        assert_eq!(redact("sqlite:///data/emend.db"), "sqlite:///data/emend.db");
    }

    #[tokio::test]
    async fn sessions_survive_a_reconnect() {
        let dir = std::env::temp_dir().join(format!("emend-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        let row = SessionRow {
            id: "s1".into(),
            tenant: "t".into(),
            name: Some("n".into()),
            created_at: "2026-01-01T00:00:00Z".into(),
            parent_id: None,
            parent_version: None,
            current_version: 0,
            canary: Some("{\"mode\":\"guard\"}".into()),
        };
        {
            let s = Store::connect(&url).await.unwrap();
            s.insert_session(&row).await.unwrap();
            s.close().await;
        }
        let s = Store::connect(&url).await.unwrap();
        assert_eq!(s.load_sessions().await.unwrap(), vec![row]);
        assert!(s
            .delete_session("s1", "2026-01-02T00:00:00Z")
            .await
            .unwrap());
        assert!(!s
            .delete_session("s1", "2026-01-02T00:00:00Z")
            .await
            .unwrap());
        assert!(s.load_sessions().await.unwrap().is_empty());
    }
}
