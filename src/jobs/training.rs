//! `training` jobs: an editor (MEND or SERAC) trained against the resident model through the engine's
//! edit lane, one piece of work per call, so that interactive traffic is served between
//! steps. Progress and the validation curve are written to the job's row as they come; the
//! run's checkpoints live in `<trainings_dir>/<job id>`, so a restarted server resumes a
//! running job from its last checkpoint; the finished job names its artefact.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{invalid, json, Decoded, JobError, JobProgress, JobStatus, Jobs, Record};
use crate::engine::eval::EvalError;
use crate::engine::training::{records, TrainConfig, Validation};
use crate::engine::worker::{Admission, TrainAction};
use crate::store::JobRow;

pub(super) const TRAINING: &str = "training";

/// What a training job has made so far (the `result` column's `training`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct TrainingRecord {
    step: usize,
    history: Vec<Validation>,
    artefact: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Training {
    pub id: String,
    pub status: JobStatus,
    pub config: TrainConfig,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Training steps done, of `config.steps`.
    pub progress: JobProgress,
    /// Validation on the held-back records, every `val_every` steps and at the end.
    pub validation: Vec<Validation>,
    /// The trained editor, once the job succeeded: name it as an edit's `hparams.artefact`.
    pub artefact: Option<String>,
    pub attempts: u32,
    pub cancel_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Jobs {
    /// Validates and queues a training run; nothing is stored when a field is invalid.
    pub async fn submit_training(
        &self,
        tenant: &str,
        config: TrainConfig,
    ) -> Result<Training, JobError> {
        let spec = self.engine.spec();
        config.check(spec.n_layers).map_err(|e| match e {
            crate::engine::training::TrainingError::Field(f, m) => invalid(f, m),
            other => invalid("config", other.to_string()),
        })?;
        let dir = self.cfg.data_dir.clone().ok_or(JobError::NoData)?;
        let data = config.data;
        let set = tokio::task::spawn_blocking(move || records::load(&dir, data))
            .await
            .map_err(|e| invalid("data", e.to_string()))?
            .map_err(|e| invalid("data", e.to_string()))?;
        if set.records.len() <= config.val_records {
            return Err(invalid(
                "val_records",
                format!(
                    "must be below the file's {} usable records",
                    set.records.len()
                ),
            ));
        }
        let row = self
            .insert(tenant, TRAINING, json(&config), config.steps as u64)
            .await?;
        tracing::info!(job = %row.id, method = %config.method, data = config.data.file(), steps = config.steps, "training queued");
        self.to_training(row)
    }

    /// Every trained editor's provenance, newest first (reads the artefact folder).
    pub fn artefacts(&self) -> Vec<crate::engine::training::Provenance> {
        crate::engine::training::ArtefactStore::new(self.cfg.editors_dir.clone()).list()
    }

    pub async fn get_training(&self, tenant: &str, id: &str) -> Result<Training, JobError> {
        let row = self.row(tenant, TRAINING, id).await?;
        self.to_training(row)
    }

    /// A page of the tenant's trainings, oldest first, and their number.
    pub async fn list_trainings(
        &self,
        tenant: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<Training>, u64), JobError> {
        let (rows, total) = self
            .store
            .jobs_page(
                tenant,
                TRAINING,
                offset.min(i64::MAX as u64) as i64,
                limit as i64,
            )
            .await?;
        let list = rows
            .into_iter()
            .map(|r| self.to_training(r))
            .collect::<Result<_, _>>()?;
        Ok((list, total.max(0) as u64))
    }

    fn to_training(&self, row: JobRow) -> Result<Training, JobError> {
        let Decoded {
            spec: config,
            status,
            progress,
            rec,
            cancel_requested,
        } = self.decode::<TrainConfig>(&row)?;
        let t = rec.training.unwrap_or_default();
        Ok(Training {
            id: row.id,
            status,
            config,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            progress,
            validation: t.history,
            artefact: t.artefact,
            attempts: rec.attempts,
            cancel_requested,
            error: rec.error,
        })
    }
}

/// How often a running training's progress is written.
const WRITE_EVERY: Duration = Duration::from_secs(2);

/// Runs (or resumes) a training job. The outer error is the store's (the job stays running and
/// is retried); the inner result is the run's outcome.
pub(super) async fn run(
    jobs: &Jobs,
    row: &JobRow,
    rec: &mut Record,
    progress: &mut JobProgress,
    flag: &Arc<AtomicBool>,
) -> Result<Result<(), EvalError>, JobError> {
    let config: TrainConfig = match serde_json::from_str(&row.spec) {
        Ok(c) => c,
        Err(e) => {
            return Ok(Err(EvalError::Backend(format!(
                "stored configuration: {e}"
            ))))
        }
    };
    let run_dir = jobs.cfg.trainings_dir.join(&row.id);
    let engine = &jobs.engine;
    let patience = Admission::Patient(jobs.cfg.patience);
    let call = |action| engine.train(run_dir.clone(), config.clone(), action, patience);
    let t0 = Instant::now();
    let mut done0: Option<usize> = None;
    let mut written = Instant::now();
    loop {
        if flag.load(Ordering::Relaxed) {
            let _ = call(TrainAction::Close).await;
            return Ok(Err(EvalError::Cancelled));
        }
        let reply = match call(TrainAction::Advance).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(EvalError::Backend(e.to_string()))),
        };
        let first = *done0.get_or_insert(reply.step);
        if reply
            .progress
            .as_ref()
            .is_some_and(|p| p.validation.is_none() && p.loss_edit.is_finite())
        {
            jobs.metrics.training_steps_total.inc();
        }
        if let Some(v) = reply.progress.as_ref().and_then(|p| p.validation.as_ref()) {
            let g = &jobs.metrics.training_validation;
            for (metric, x) in [
                ("edit_success", v.edit_success),
                ("generalization", v.generalization),
                ("locality", v.locality),
                ("loss_edit", v.loss_edit),
                ("loss_loc", v.loss_loc),
            ] {
                g.with_label_values(&[metric]).set(x);
            }
        }
        progress.done = reply.step as u64;
        let ran = reply.step.saturating_sub(first);
        progress.eta_seconds = (ran > 0).then(|| {
            t0.elapsed().as_secs_f64() / ran as f64 * config.steps.saturating_sub(reply.step) as f64
        });
        let t = rec.training.get_or_insert_with(Default::default);
        let new_validation = t.history.len() != reply.history.len();
        t.step = reply.step;
        t.history = reply.history;
        if reply.done {
            match call(TrainAction::Finish).await {
                Ok(r) => rec.training.get_or_insert_with(Default::default).artefact = r.artefact,
                Err(e) => return Ok(Err(EvalError::Backend(e.to_string()))),
            }
            tracing::info!(job = %row.id, artefact = ?rec.training.as_ref().and_then(|t| t.artefact.clone()), "training finished");
            return Ok(Ok(()));
        }
        if new_validation || written.elapsed() >= WRITE_EVERY {
            jobs.store
                .update_job(&row.id, &json(progress), Some(&json(rec)))
                .await?;
            written = Instant::now();
        }
    }
}
