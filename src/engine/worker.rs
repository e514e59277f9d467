//! The engine worker: the one thread that owns the model. Work arrives through three bounded
//! lanes served in priority order (interactive > edit > evaluation); admission is a semaphore
//! per lane, so a full lane answers `Overloaded` (HTTP 429) instead of growing a backlog.
//! Concurrent generation requests for the same session version are batched into one forward.
//!
//! Callers use the typed calls of [`Engine`] (`generate`, `loglikelihood`, `score`, `edit`,
//! `eval_blocking`, in `calls.rs`); the work items and reply channels behind them stay private
//! to this module. The thread's loop is in `run.rs`, its Prometheus collectors in `metrics.rs`.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::editing::{EditError, EditRequest, EditStep, EditingEnv, MeasureOptions, Method};
use super::eval::engine::{EvalAnswers, EvalWork};
use super::model::generate::{GenParams, Generation};
use super::model::loader::ModelInfo;
use super::model::score::{Loglikelihood, TokenScores};
use super::model::{LoadedModel, ModelError, Tok};
use super::overlay::Overlay;

pub mod backend;
mod calls;
mod metrics;
mod run;
mod training;

pub use backend::EngineBackend;
pub use calls::Admission;
pub use metrics::{EngineMetrics, LATENCY_SECONDS};
pub use training::{TrainAction, TrainReply};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Interactive = 0,
    Edit = 1,
    Eval = 2,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Interactive, Lane::Edit, Lane::Eval];
    pub fn name(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Edit => "edit",
            Lane::Eval => "eval",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the {lane} queue is full ({capacity} requests); retry later")]
    Overloaded { lane: &'static str, capacity: usize },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the engine failed while running this request: {0}")]
    Panicked(String),
    #[error("{0}")]
    Failed(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The engine let go of the request without answering it (it stopped with the request
    /// still queued).
    #[error("the engine dropped the request")]
    Dropped,
    #[error(transparent)]
    Edit(#[from] EditError),
}

/// Which model view a request runs against: a session's version and its overlay (the chain of
/// deltas over the base weights). `(session, version)` names one overlay forever (versions are
/// never reused), so it keys the engine's cache of prepared overlays and generation batching.
#[derive(Debug, Clone)]
pub struct ModelView {
    pub session: Option<String>,
    pub version: u64,
    pub overlay: Arc<Overlay>,
}

impl PartialEq for ModelView {
    fn eq(&self, other: &Self) -> bool {
        self.session == other.session && self.version == other.version
    }
}
impl Eq for ModelView {}

impl ModelView {
    pub fn base() -> Self {
        Self {
            session: None,
            version: 0,
            overlay: Overlay::base(),
        }
    }

    pub fn new(session: &str, version: u64, overlay: Arc<Overlay>) -> Self {
        Self {
            session: Some(session.to_string()),
            version,
            overlay,
        }
    }

    fn key(&self) -> Option<(String, u64)> {
        match &self.session {
            Some(s) if !self.overlay.is_base() => Some((s.clone(), self.version)),
            _ => None,
        }
    }
}

pub enum GenEvent {
    Text(String),
    Done(Result<Generation, EngineError>),
}

/// A generation's events: text as it is decoded, then its end. Dropping the receiver tells the
/// engine that nobody reads them any more.
pub type GenEvents = mpsc::UnboundedReceiver<GenEvent>;

enum Work {
    Generate {
        view: ModelView,
        prompt: Vec<u32>,
        params: GenParams,
        events: mpsc::UnboundedSender<GenEvent>,
    },
    /// Per-token log-probs of `seqs[i][from[i]..]`, with the `top_n` best tokens per position.
    Score {
        view: ModelView,
        seqs: Vec<Vec<u32>>,
        from: Vec<usize>,
        top_n: usize,
        reply: oneshot::Sender<Result<Vec<TokenScores>, EngineError>>,
    },
    Loglikelihood {
        view: ModelView,
        pairs: Vec<(String, String)>,
        reply: oneshot::Sender<Result<Vec<Loglikelihood>, EngineError>>,
    },
    /// Applies `requests` on top of `view` with `method`: one step per request, or one step for
    /// the whole batch when the method is batched (MEMIT). Each step is computed against the
    /// model left by the previous one (sequential editing).
    Edit {
        view: ModelView,
        method: Method,
        requests: Vec<EditRequest>,
        hparams: serde_json::Value,
        opts: MeasureOptions,
        reply: oneshot::Sender<Result<Vec<EditStep>, EngineError>>,
    },
    /// Makes what an edit by `method` with `hparams` would need (statistics, null spaces,
    /// templates) without editing: a warm-up, in slices like an edit's own preparation.
    Prepare {
        view: ModelView,
        method: Method,
        hparams: serde_json::Value,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// A chunk of an evaluation's requests, answered by the same code as the in-process
    /// backend so that the numbers are the same.
    Eval {
        view: ModelView,
        work: EvalWork,
        reply: oneshot::Sender<Result<EvalAnswers, EngineError>>,
    },
    /// A piece of a training run (on the base model).
    Train {
        view: ModelView,
        run_dir: std::path::PathBuf,
        config: crate::engine::training::TrainConfig,
        action: TrainAction,
        reply: oneshot::Sender<Result<TrainReply, EngineError>>,
    },
}

impl Work {
    /// The client is gone: nobody reads the answer.
    fn abandoned(&self) -> bool {
        match self {
            Work::Generate { events, .. } => events.is_closed(),
            Work::Score { reply, .. } => reply.is_closed(),
            Work::Loglikelihood { reply, .. } => reply.is_closed(),
            Work::Edit { reply, .. } => reply.is_closed(),
            Work::Prepare { reply, .. } => reply.is_closed(),
            Work::Eval { reply, .. } => reply.is_closed(),
            Work::Train { reply, .. } => reply.is_closed(),
        }
    }
}

struct Queued {
    work: Work,
    lane: Lane,
    admitted: Instant,
    /// Put back after a piece of its preparation ran (its queue wait is already recorded).
    resumed: bool,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug, Clone)]
pub struct EngineLimits {
    /// Requests admitted (queued or running) per lane: interactive, edit, eval.
    pub lane_capacity: [usize; 3],
    /// Generation requests batched into one forward.
    pub max_batch: usize,
    /// Tokens per scoring forward.
    pub token_budget: usize,
    /// How long the engine works on an edit's missing resources (key statistics, null spaces)
    /// before it serves the other lanes again (at least one piece: one layer of one batch).
    pub preparation_slice: Duration,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            lane_capacity: [64, 16, 256],
            max_batch: 8,
            token_budget: super::model::score::DEFAULT_TOKEN_BUDGET,
            preparation_slice: Duration::from_millis(50),
        }
    }
}

struct Shared {
    device: candle_core::Device,
    dtype: candle_core::DType,
    lanes: Mutex<[VecDeque<Queued>; 3]>,
    wake: Condvar,
    admission: [Arc<Semaphore>; 3],
    limits: EngineLimits,
    shutdown: AtomicBool,
    metrics: EngineMetrics,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<Tok>,
}

impl Engine {
    /// Starts the engine thread; it records into `metrics` (register them where they are
    /// exported).
    pub fn start(
        model: LoadedModel,
        limits: EngineLimits,
        metrics: EngineMetrics,
        env: EditingEnv,
    ) -> Self {
        metrics.model_load_seconds.set(model.info.load_seconds);
        let shared = Arc::new(Shared {
            device: model.model.device().clone(),
            dtype: model.model.dtype(),
            lanes: Mutex::new([VecDeque::new(), VecDeque::new(), VecDeque::new()]),
            wake: Condvar::new(),
            admission: limits.lane_capacity.map(|c| Arc::new(Semaphore::new(c))),
            limits,
            shutdown: AtomicBool::new(false),
            metrics,
        });
        let info = Arc::new(model.info.clone());
        let tokenizer = Arc::new(model.tokenizer.clone());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("emend-engine".into())
            .spawn(move || run::worker(s, model, env))
            .expect("spawn the engine thread");
        Self {
            shared,
            info,
            tokenizer,
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Device and dtype of the model, for tensors restored from the store (deltas).
    pub fn device(&self) -> &candle_core::Device {
        &self.shared.device
    }

    pub fn dtype(&self) -> candle_core::DType {
        self.shared.dtype
    }

    pub fn spec(&self) -> &crate::engine::model::ModelSpec {
        &self.info.spec
    }

    pub fn tokenizer(&self) -> &Tok {
        &self.tokenizer
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.shared.limits
    }

    pub fn is_running(&self) -> bool {
        !self.shared.shutdown.load(Ordering::Relaxed)
    }

    /// Admits work if its lane has room, else `Overloaded`.
    fn try_submit(&self, lane: Lane, work: Work) -> Result<(), EngineError> {
        let sem = self.shared.admission[lane as usize].clone();
        let permit = sem
            .try_acquire_owned()
            .map_err(|_| EngineError::Overloaded {
                lane: lane.name(),
                capacity: self.shared.limits.lane_capacity[lane as usize],
            })?;
        self.enqueue(lane, work, permit)
    }

    /// Waits up to `patience` for room in the lane (evaluation clients retry badly, so their
    /// lane queues rather than refusing at once).
    async fn submit_waiting(
        &self,
        lane: Lane,
        work: Work,
        patience: Duration,
    ) -> Result<(), EngineError> {
        let sem = self.shared.admission[lane as usize].clone();
        let permit = match tokio::time::timeout(patience, sem.acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Err(EngineError::Overloaded {
                    lane: lane.name(),
                    capacity: self.shared.limits.lane_capacity[lane as usize],
                })
            }
        };
        self.enqueue(lane, work, permit)
    }

    /// [`Self::submit_waiting`] for a plain thread (evaluation jobs run on their own thread,
    /// not on the async runtime): polls the lane for room up to `patience`.
    fn submit_blocking(
        &self,
        lane: Lane,
        work: Work,
        patience: Duration,
    ) -> Result<(), EngineError> {
        let sem = self.shared.admission[lane as usize].clone();
        let start = Instant::now();
        loop {
            match sem.clone().try_acquire_owned() {
                Ok(p) => return self.enqueue(lane, work, p),
                Err(_) if start.elapsed() < patience && self.is_running() => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => {
                    return Err(EngineError::Overloaded {
                        lane: lane.name(),
                        capacity: self.shared.limits.lane_capacity[lane as usize],
                    })
                }
            }
        }
    }

    fn enqueue(
        &self,
        lane: Lane,
        work: Work,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), EngineError> {
        if !self.is_running() {
            return Err(EngineError::ShuttingDown);
        }
        self.shared
            .metrics
            .queue_depth
            .with_label_values(&[lane.name()])
            .inc();
        let mut lanes = self.shared.lanes.lock().expect("engine queue lock");
        lanes[lane as usize].push_back(Queued {
            work,
            lane,
            admitted: Instant::now(),
            resumed: false,
            _permit: permit,
        });
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Stops taking work; the engine thread exits after the job in hand.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }
}
