//! The jobs table: one row per job, its status moved only by conditional updates so that a
//! cancel and the runner picking the job up cannot both win.
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Result, Store};

/// A job as stored; `spec`, `progress` and `result` are JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub tenant: String,
    pub kind: String,
    pub spec: String,
    pub status: String,
    pub progress: Option<String>,
    pub result: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

const COLUMNS: &str =
    "id, tenant, kind, spec, status, progress, result, created_at, started_at, finished_at";

impl Store {
    pub async fn insert_job(&self, j: &JobRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, tenant, kind, spec, status, progress, result, created_at, started_at, finished_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&j.id)
        .bind(&j.tenant)
        .bind(&j.kind)
        .bind(&j.spec)
        .bind(&j.status)
        .bind(&j.progress)
        .bind(&j.result)
        .bind(&j.created_at)
        .bind(&j.started_at)
        .bind(&j.finished_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobRow>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| job_row(&r)).transpose()
    }

    /// One page of a tenant's jobs of `kind`, oldest first, and how many there are.
    pub async fn jobs_page(
        &self,
        tenant: &str,
        kind: &str,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<JobRow>, i64)> {
        let total: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE tenant = $1 AND kind = $2")
                .bind(tenant)
                .bind(kind)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE tenant = $1 AND kind = $2 \
             ORDER BY created_at, id LIMIT $3 OFFSET $4"
        ))
        .bind(tenant)
        .bind(kind)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        let page = rows.iter().map(job_row).collect::<Result<_>>()?;
        Ok((page, total))
    }

    /// The job to run next: one left running by an earlier process first (it resumes), then
    /// the oldest queued one.
    pub async fn next_job(&self) -> Result<Option<JobRow>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status IN ('queued', 'running') \
             ORDER BY CASE status WHEN 'running' THEN 0 ELSE 1 END, created_at, id LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| job_row(&r)).transpose()
    }

    /// Jobs waiting to run.
    pub async fn queued_jobs(&self) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'")
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    /// `(kind, status, count)` of every stored job, for the jobs gauge.
    pub async fn job_counts(&self) -> Result<Vec<(String, String, i64)>> {
        let rows =
            sqlx::query("SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("kind")?, r.try_get("status")?, r.try_get("n")?)))
            .collect()
    }

    /// Marks a queued (or interrupted running) job running; false when it was cancelled
    /// meanwhile.
    pub async fn start_job(&self, id: &str, started_at: &str, result: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'running', started_at = $1, result = $2 \
             WHERE id = $3 AND status IN ('queued', 'running')",
        )
        .bind(started_at)
        .bind(result)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records the progress (and, when given, the results so far) of a running job.
    pub async fn update_job(&self, id: &str, progress: &str, result: Option<&str>) -> Result<()> {
        let q = match result {
            Some(res) => sqlx::query(
                "UPDATE jobs SET progress = $1, result = $2 WHERE id = $3 AND status = 'running'",
            )
            .bind(progress)
            .bind(res)
            .bind(id),
            None => {
                sqlx::query("UPDATE jobs SET progress = $1 WHERE id = $2 AND status = 'running'")
                    .bind(progress)
                    .bind(id)
            }
        };
        q.execute(&self.pool).await?;
        Ok(())
    }

    /// Ends a running job with `status`.
    pub async fn finish_job(
        &self,
        id: &str,
        status: &str,
        finished_at: &str,
        progress: &str,
        result: &str,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = $1, finished_at = $2, progress = $3, result = $4 \
             WHERE id = $5 AND status = 'running'",
        )
        .bind(status)
        .bind(finished_at)
        .bind(progress)
        .bind(result)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Cancels a job that has not started; false when it is no longer queued.
    pub async fn cancel_queued_job(&self, id: &str, at: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', finished_at = $1 WHERE id = $2 AND status = 'queued'",
        )
        .bind(at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

fn job_row(r: &AnyRow) -> Result<JobRow> {
    Ok(JobRow {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        kind: r.try_get("kind")?,
        spec: r.try_get("spec")?,
        status: r.try_get("status")?,
        progress: r.try_get("progress")?,
        result: r.try_get("result")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, created: &str) -> JobRow {
        JobRow {
            id: id.into(),
            tenant: "t".into(),
            kind: "evaluation".into(),
            spec: "{}".into(),
            status: "queued".into(),
            progress: None,
            result: None,
            created_at: created.into(),
            started_at: None,
            finished_at: None,
        }
    }

    #[tokio::test]
    async fn jobs_move_through_their_states_once() {
        let dir = std::env::temp_dir().join(format!("emend-jobs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        let s = Store::connect(&url).await.unwrap();
        s.insert_job(&row("a", "2026-01-01T00:00:00Z"))
            .await
            .unwrap();
        s.insert_job(&row("b", "2026-01-01T00:00:01Z"))
            .await
            .unwrap();
        assert_eq!(s.next_job().await.unwrap().unwrap().id, "a");
        assert_eq!(s.queued_jobs().await.unwrap(), 2);
        // b is cancelled before it starts: it can no longer start
        assert!(s.cancel_queued_job("b", "x").await.unwrap());
        assert!(!s.start_job("b", "x", "{}").await.unwrap());
        assert!(s.start_job("a", "x", "{}").await.unwrap());
        // a running job is not cancelled as a queued one, and is picked up again (resume)
        assert!(!s.cancel_queued_job("a", "x").await.unwrap());
        s.update_job("a", r#"{"done":1}"#, None).await.unwrap();
        assert_eq!(s.next_job().await.unwrap().unwrap().id, "a");
        assert!(s
            .finish_job("a", "succeeded", "y", "{}", "{}")
            .await
            .unwrap());
        assert!(!s.finish_job("a", "failed", "y", "{}", "{}").await.unwrap());
        assert!(s.next_job().await.unwrap().is_none());
        let a = s.job("a").await.unwrap().unwrap();
        assert_eq!(
            (a.status.as_str(), a.finished_at.as_deref()),
            ("succeeded", Some("y"))
        );
        let (page, total) = s.jobs_page("t", "evaluation", 1, 10).await.unwrap();
        assert_eq!((page.len(), total), (1, 2));
        assert_eq!(page[0].id, "b");
        let mut counts = s.job_counts().await.unwrap();
        counts.sort();
        assert_eq!(
            counts,
            vec![
                ("evaluation".into(), "cancelled".into(), 1),
                ("evaluation".into(), "succeeded".into(), 1)
            ]
        );
    }
}
