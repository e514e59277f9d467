//! Training runs the engine keeps between its calls: each call advances a run by one piece (a
//! training step or a few validation records), so that the lanes above it are served between
//! pieces. A run not in memory (after a restart) is reopened from its checkpoint.
use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::engine::editing::EditContext;
use crate::engine::model::LoadedModel;
use crate::engine::training::{Progress, TrainConfig, Trainer, TrainingError, Validation};

/// What a training call does to its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainAction {
    /// One piece of work.
    Advance,
    /// Stores the trained network as an artefact and lets the run go.
    Finish,
    /// Lets the run go (cancelled); its checkpoint stays on disk.
    Close,
}

/// The answer to a training call.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReply {
    pub step: usize,
    pub done: bool,
    /// The piece's progress (`Advance`).
    pub progress: Option<Progress>,
    pub history: Vec<Validation>,
    /// The stored artefact's id (`Finish`).
    pub artefact: Option<String>,
}

#[derive(Default)]
pub(super) struct Trainers {
    runs: HashMap<PathBuf, Trainer>,
}

impl Trainers {
    pub(super) fn call(
        &mut self,
        model: &LoadedModel,
        ctx: &EditContext,
        run_dir: PathBuf,
        config: &TrainConfig,
        action: TrainAction,
    ) -> Result<TrainReply, TrainingError> {
        if action == TrainAction::Close {
            self.runs.remove(&run_dir);
            return Ok(TrainReply {
                step: 0,
                done: false,
                progress: None,
                history: Vec::new(),
                artefact: None,
            });
        }
        let lm = model.model.as_ref();
        if !self.runs.contains_key(&run_dir) {
            let data = ctx
                .stats
                .data_dir()
                .ok_or_else(|| TrainingError::Data("the server has no data directory".into()))?;
            let t = Trainer::open(
                lm,
                &model.tokenizer,
                config.clone(),
                &data,
                &run_dir,
                &ctx.model_sha256,
            )?;
            self.runs.insert(run_dir.clone(), t);
        }
        let trainer = self.runs.get_mut(&run_dir).expect("inserted above");
        let piece = match action {
            TrainAction::Advance if !trainer.done() => trainer
                .advance(lm, &model.tokenizer)
                .map(|p| (Some(p), None)),
            TrainAction::Advance => Ok((None, None)),
            _ => trainer.finish(&ctx.editors).map(|id| (None, Some(id))),
        };
        // A failed run ends its job: let it go rather than keep it in memory.
        let (progress, artefact) = piece.inspect_err(|_| {
            self.runs.remove(&run_dir);
        })?;
        let trainer = self.runs.get(&run_dir).expect("kept on success");
        let reply = TrainReply {
            step: trainer.step(),
            done: trainer.done(),
            progress,
            history: trainer.history().to_vec(),
            artefact,
        };
        if reply.artefact.is_some() {
            self.runs.remove(&run_dir);
        }
        Ok(reply)
    }
}
