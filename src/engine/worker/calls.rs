//! The engine's typed calls. Each builds its work item and reply channel, is admitted to its
//! lane, and waits for the answer. The caller holds the receiving end: when it goes away (an
//! HTTP client disconnects and actix drops the handler's future), the engine sees the channel
//! closed and skips the work instead of computing an answer nobody reads.
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Engine, EngineError, GenEvents, Lane, ModelView, Work};
use crate::engine::editing::{EditRequest, EditStep, MeasureOptions, Method};
use crate::engine::eval::engine::{EvalAnswers, EvalWork};
use crate::engine::model::generate::GenParams;
use crate::engine::model::score::{Loglikelihood, TokenScores};

/// How a call waits for room in its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Refused at once with `Overloaded` when the lane is full (HTTP clients get a 429 with
    /// `Retry-After`).
    Immediate,
    /// Waits up to this long for room: evaluation clients and jobs retry badly, so their work
    /// queues rather than being refused at once.
    Patient(Duration),
}

impl Engine {
    async fn admit(&self, lane: Lane, work: Work, admission: Admission) -> Result<(), EngineError> {
        match admission {
            Admission::Immediate => self.try_submit(lane, work),
            Admission::Patient(patience) => self.submit_waiting(lane, work, patience).await,
        }
    }

    /// Starts a generation on the interactive lane (refused at once when it is full);
    /// generations of the same view are batched into one forward.
    pub fn generate(
        &self,
        view: ModelView,
        prompt: Vec<u32>,
        params: GenParams,
    ) -> Result<GenEvents, EngineError> {
        let (events, rx) = mpsc::unbounded_channel();
        self.try_submit(
            Lane::Interactive,
            Work::Generate {
                view,
                prompt,
                params,
                events,
            },
        )?;
        Ok(rx)
    }

    /// lm-evaluation-harness log-likelihoods of `(context, continuation)` pairs, on the
    /// interactive lane (refused at once when it is full).
    pub async fn loglikelihood(
        &self,
        view: ModelView,
        pairs: Vec<(String, String)>,
    ) -> Result<Vec<Loglikelihood>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.try_submit(
            Lane::Interactive,
            Work::Loglikelihood { view, pairs, reply },
        )?;
        answer(rx).await
    }

    /// Per-token log-probs of `seqs[i][from[i]..]`, with the `top_n` best tokens per position,
    /// on the evaluation lane: its callers are harness clients scoring prompts in bulk.
    pub async fn score(
        &self,
        view: ModelView,
        seqs: Vec<Vec<u32>>,
        from: Vec<usize>,
        top_n: usize,
        admission: Admission,
    ) -> Result<Vec<TokenScores>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let work = Work::Score {
            view,
            seqs,
            from,
            top_n,
            reply,
        };
        self.admit(Lane::Eval, work, admission).await?;
        answer(rx).await
    }

    /// Applies `requests` on top of `view` with `method`, on the edit lane: one step per
    /// request, or one step for the whole batch when the method is batched (MEMIT), each
    /// computed against the model the previous one left.
    pub async fn edit(
        &self,
        view: ModelView,
        method: Method,
        requests: Vec<EditRequest>,
        hparams: serde_json::Value,
        opts: MeasureOptions,
        admission: Admission,
    ) -> Result<Vec<EditStep>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let work = Work::Edit {
            view,
            method,
            requests,
            hparams,
            opts,
            reply,
        };
        self.admit(Lane::Edit, work, admission).await?;
        answer(rx).await
    }

    /// Makes the resources an edit by `method` with `hparams` needs (key statistics, null
    /// spaces, context templates), on the edit lane, a slice at a time between other work;
    /// answers once they are cached.
    pub async fn prepare(
        &self,
        method: Method,
        hparams: serde_json::Value,
    ) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        let work = Work::Prepare {
            view: super::ModelView::base(),
            method,
            hparams,
            reply,
        };
        self.admit(Lane::Edit, work, Admission::Immediate).await?;
        answer(rx).await
    }

    /// One piece of the training run in `run_dir` (a step, or a few validation records), its
    /// artefact stored (`Finish`), or the run let go (`Close`), on the edit lane.
    pub async fn train(
        &self,
        run_dir: std::path::PathBuf,
        config: crate::engine::training::TrainConfig,
        action: super::TrainAction,
        admission: Admission,
    ) -> Result<super::TrainReply, EngineError> {
        let (reply, rx) = oneshot::channel();
        let work = Work::Train {
            view: ModelView::base(),
            run_dir,
            config,
            action,
            reply,
        };
        self.admit(Lane::Edit, work, admission).await?;
        answer(rx).await
    }

    /// One chunk of an evaluation, on the evaluation lane, from a plain thread (evaluations
    /// run on threads of their own, not on the async runtime): waits up to `patience` for room,
    /// then blocks until the chunk is answered.
    pub fn eval_blocking(
        &self,
        view: ModelView,
        work: EvalWork,
        patience: Duration,
    ) -> Result<EvalAnswers, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.submit_blocking(Lane::Eval, Work::Eval { view, work, reply }, patience)?;
        rx.blocking_recv().map_err(|_| EngineError::Dropped)?
    }
}

/// The engine's answer; a reply channel closed without one means the engine stopped with the
/// work still queued.
async fn answer<T>(rx: oneshot::Receiver<Result<T, EngineError>>) -> Result<T, EngineError> {
    rx.await.map_err(|_| EngineError::Dropped)?
}
