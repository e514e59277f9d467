//! The edit log: one row per edit step or rollback, in `seq` order per session. Every write that
//! changes a session's current version updates `sessions.current_version` in the same
//! transaction, so the row and the pointer never disagree after a crash.
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{Result, SessionRow, Store, StoreError};

/// What a log row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    Edit,
    Rollback,
}

impl LogKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edit => "edit",
            Self::Rollback => "rollback",
        }
    }
}

/// One new version, as the store writes it. JSON columns are already serialised.
#[derive(Debug, Clone)]
pub struct NewEdit {
    pub version: i64,
    pub parent_version: i64,
    pub method: String,
    /// JSON array of the edit requests this version applied.
    pub request: String,
    /// JSON of the resolved hyper-parameters.
    pub hparams: String,
    /// JSON array of the requests' reports (pre/post metrics).
    pub metrics: String,
    pub diagnostics: String,
    /// The version's deltas as safetensors bytes.
    pub delta: Vec<u8>,
    pub duration_ms: i64,
    pub created_at: String,
    /// JSON of the canary reading of this version, when the probes ran.
    pub canary: Option<String>,
}

/// A stored log row. `delta` is only loaded where asked for (restore); listings leave it out.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub seq: i64,
    pub kind: LogKind,
    pub version: i64,
    pub parent_version: Option<i64>,
    pub method: Option<String>,
    pub request: Option<String>,
    pub hparams: Option<String>,
    pub metrics: Option<String>,
    pub diagnostics: Option<String>,
    pub delta: Option<Vec<u8>>,
    pub duration_ms: Option<i64>,
    pub created_at: String,
    pub canary: Option<String>,
}

const COLUMNS: &str =
    "seq, kind, version, parent_version, method, request, hparams, metrics, diagnostics, duration_ms, created_at, canary";

impl Store {
    /// Appends the versions of one edit request and moves the session to `current_version`, in
    /// one transaction. Fails (and writes nothing) when the session is deleted meanwhile.
    pub async fn append_edits(
        &self,
        session_id: &str,
        edits: &[NewEdit],
        current_version: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let mut seq = next_seq(&mut tx, session_id).await?;
        for e in edits {
            sqlx::query(
                "INSERT INTO edit_log (session_id, seq, kind, version, parent_version, method, request, hparams, metrics, diagnostics, delta, duration_ms, created_at, canary) \
                 VALUES ($1, $2, 'edit', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(session_id)
            .bind(seq)
            .bind(e.version)
            .bind(e.parent_version)
            .bind(&e.method)
            .bind(&e.request)
            .bind(&e.hparams)
            .bind(&e.metrics)
            .bind(&e.diagnostics)
            .bind(&e.delta)
            .bind(e.duration_ms)
            .bind(&e.created_at)
            .bind(&e.canary)
            .execute(&mut *tx)
            .await?;
            seq += 1;
        }
        set_current(&mut tx, session_id, current_version).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Logs a rollback to `version` and makes it current, in one transaction.
    pub async fn append_rollback(&self, session_id: &str, version: i64, at: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let seq = next_seq(&mut tx, session_id).await?;
        sqlx::query(
            "INSERT INTO edit_log (session_id, seq, kind, version, created_at) VALUES ($1, $2, 'rollback', $3, $4)",
        )
        .bind(session_id)
        .bind(seq)
        .bind(version)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        set_current(&mut tx, session_id, version).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Inserts a forked session and copies the parent's edit rows of `chain` (the versions from
    /// the base up to the fork point, oldest first) into its log, in one transaction, so every
    /// session's log replays on its own.
    pub async fn insert_fork(&self, s: &SessionRow, parent_id: &str, chain: &[i64]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        super::insert_session_in(&mut tx, s).await?;
        for (i, v) in chain.iter().enumerate() {
            let r = sqlx::query(
                "INSERT INTO edit_log (session_id, seq, kind, version, parent_version, method, request, hparams, metrics, diagnostics, delta, duration_ms, created_at, canary) \
                 SELECT $1, $2, kind, version, parent_version, method, request, hparams, metrics, diagnostics, delta, duration_ms, created_at, canary \
                 FROM edit_log WHERE session_id = $3 AND kind = 'edit' AND version = $4",
            )
            .bind(&s.id)
            .bind(i as i64 + 1)
            .bind(parent_id)
            .bind(*v)
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() != 1 {
                return Err(StoreError::Inconsistent(format!(
                    "session `{parent_id}` has no stored edit for version {v}"
                )));
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A session's whole log in `seq` order; `with_deltas` also loads the delta bytes.
    pub async fn load_log(&self, session_id: &str, with_deltas: bool) -> Result<Vec<LogEntry>> {
        let delta = if with_deltas { ", delta" } else { "" };
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS}{delta} FROM edit_log WHERE session_id = $1 ORDER BY seq"
        ))
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| log_entry(r, with_deltas)).collect()
    }

    /// One page of a session's log (no deltas) and the total number of rows.
    pub async fn log_page(
        &self,
        session_id: &str,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<LogEntry>, i64)> {
        let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM edit_log WHERE session_id = $1")
            .bind(session_id)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM edit_log WHERE session_id = $1 ORDER BY seq LIMIT $2 OFFSET $3"
        ))
        .bind(session_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        let page = rows
            .iter()
            .map(|r| log_entry(r, false))
            .collect::<Result<_>>()?;
        Ok((page, total))
    }

    /// The edit row that made `version` (no delta), if any.
    pub async fn edit_entry(&self, session_id: &str, version: i64) -> Result<Option<LogEntry>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM edit_log WHERE session_id = $1 AND kind = 'edit' AND version = $2"
        ))
        .bind(session_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| log_entry(&r, false)).transpose()
    }
}

async fn next_seq(tx: &mut Transaction<'_, Any>, session_id: &str) -> Result<i64> {
    let last: Option<i64> =
        sqlx::query("SELECT MAX(seq) AS last FROM edit_log WHERE session_id = $1")
            .bind(session_id)
            .fetch_one(&mut **tx)
            .await?
            .try_get("last")?;
    Ok(last.unwrap_or(0) + 1)
}

async fn set_current(tx: &mut Transaction<'_, Any>, session_id: &str, version: i64) -> Result<()> {
    let r = sqlx::query(
        "UPDATE sessions SET current_version = $1 WHERE id = $2 AND deleted_at IS NULL",
    )
    .bind(version)
    .bind(session_id)
    .execute(&mut **tx)
    .await?;
    if r.rows_affected() != 1 {
        // Dropping the transaction rolls the log rows back.
        return Err(StoreError::SessionGone(session_id.to_string()));
    }
    Ok(())
}

fn log_entry(r: &AnyRow, with_delta: bool) -> Result<LogEntry> {
    let kind: String = r.try_get("kind")?;
    let kind = match kind.as_str() {
        "edit" => LogKind::Edit,
        "rollback" => LogKind::Rollback,
        other => {
            return Err(StoreError::Inconsistent(format!(
                "edit_log row of kind `{other}`"
            )))
        }
    };
    Ok(LogEntry {
        seq: r.try_get("seq")?,
        kind,
        version: r.try_get("version")?,
        parent_version: r.try_get("parent_version")?,
        method: r.try_get("method")?,
        request: r.try_get("request")?,
        hparams: r.try_get("hparams")?,
        metrics: r.try_get("metrics")?,
        diagnostics: r.try_get("diagnostics")?,
        delta: if with_delta {
            r.try_get("delta")?
        } else {
            None
        },
        duration_ms: r.try_get("duration_ms")?,
        created_at: r.try_get("created_at")?,
        canary: r.try_get("canary")?,
    })
}
