//! The engine worker: the one thread that owns the model. Work arrives through three bounded
//! lanes served in priority order (interactive > edit > evaluation); admission is a semaphore
//! per lane, so a full lane answers `Overloaded` (HTTP 429) instead of growing a backlog.
//! Concurrent generation requests for the same session version are batched into one forward.
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::editing::{self, EditError, EditRequest, EditStep, EditingEnv, MeasureOptions, Method};
use super::eval::engine::{EvalAnswers, EvalWork};
use super::model::generate::{generate_each, GenParams, Generation};
use super::model::loader::ModelInfo;
use super::model::score::{loglikelihood, score_tokens_top, Loglikelihood, PrefixKv, TokenScores};
use super::model::{LoadedModel, ModelError, Tok};
use super::overlay::{Edited, Overlay, PreparedOverlay};
use crate::metrics::Metrics;

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

pub enum Work {
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
    /// A chunk of an evaluation's requests (see `eval::engine::EngineBackend`), answered by
    /// the same code as the in-process backend so that the numbers are the same.
    Eval {
        view: ModelView,
        work: EvalWork,
        reply: oneshot::Sender<Result<EvalAnswers, EngineError>>,
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
            Work::Eval { reply, .. } => reply.is_closed(),
        }
    }
}

struct Queued {
    work: Work,
    lane: Lane,
    admitted: Instant,
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
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            lane_capacity: [64, 16, 256],
            max_batch: 8,
            token_budget: super::model::score::DEFAULT_TOKEN_BUDGET,
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
    metrics: Arc<Metrics>,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<Tok>,
}

impl Engine {
    pub fn start(
        model: LoadedModel,
        limits: EngineLimits,
        metrics: Arc<Metrics>,
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
            .spawn(move || worker(s, model, env))
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
    pub fn try_submit(&self, lane: Lane, work: Work) -> Result<(), EngineError> {
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
    pub async fn submit_waiting(
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
    pub fn submit_blocking(
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

/// Prepared overlays kept per `(session, version)`; derived data, rebuilt on a miss.
struct OverlayCache {
    /// Most recently used first; each with the version it was prepared for, so a miss can
    /// start from its parent's entry.
    entries: VecDeque<CachedOverlay>,
    capacity: usize,
    /// The last shared evaluation context's KV cache (one MMLU subject's few-shot prefix
    /// spans many evaluation chunks).
    prefix_kv: PrefixKv,
}

struct CachedOverlay {
    key: (String, u64),
    overlay: Arc<Overlay>,
    prepared: Arc<PreparedOverlay>,
}

impl OverlayCache {
    fn get(
        &mut self,
        model: &LoadedModel,
        view: &ModelView,
    ) -> Result<Arc<PreparedOverlay>, ModelError> {
        let Some(key) = view.key() else {
            return Ok(Arc::new(PreparedOverlay::default()));
        };
        if let Some(i) = self.entries.iter().position(|e| e.key == key) {
            let e = self.entries.remove(i).expect("index in range");
            let p = e.prepared.clone();
            self.entries.push_front(e);
            return Ok(p);
        }
        // A session's next version usually follows one that is cached (the edit that made it
        // ran on it): prepare only the new deltas on top.
        let parent = view.overlay.parent().and_then(|parent| {
            self.entries
                .iter()
                .find(|e| Arc::ptr_eq(&e.overlay, parent))
        });
        let lm = model.model.as_ref();
        let p = Arc::new(match parent {
            Some(e) => view.overlay.prepare_on(lm, &e.prepared)?,
            None => view.overlay.prepare(lm)?,
        });
        self.entries.push_front(CachedOverlay {
            key,
            overlay: view.overlay.clone(),
            prepared: p.clone(),
        });
        self.entries.truncate(self.capacity);
        Ok(p)
    }
}

fn worker(shared: Arc<Shared>, model: LoadedModel, env: EditingEnv) {
    let _span = tracing::info_span!("engine").entered();
    let mut overlays = OverlayCache {
        entries: VecDeque::new(),
        capacity: 16,
        prefix_kv: PrefixKv::default(),
    };
    let edit_ctx = editing::EditContext::new(env, &model.info);
    loop {
        let batch = {
            let mut lanes = shared.lanes.lock().expect("engine queue lock");
            loop {
                if shared.shutdown.load(Ordering::Relaxed) {
                    // Dropping queued work closes its reply channels, so a caller blocked on
                    // an answer (an evaluation thread) gets an error instead of waiting forever.
                    for l in lanes.iter_mut() {
                        l.clear();
                    }
                    return;
                }
                if let Some(b) = next_batch(&mut lanes, shared.limits.max_batch) {
                    break b;
                }
                lanes = shared.wake.wait(lanes).expect("engine queue lock");
            }
        };
        for q in &batch {
            shared
                .metrics
                .queue_wait_seconds
                .with_label_values(&[q.lane.name()])
                .observe(q.admitted.elapsed().as_secs_f64());
        }
        let lanes: Vec<Lane> = batch.iter().map(|q| q.lane).collect();
        run_batch(&model, &shared, &mut overlays, &edit_ctx, batch);
        for l in lanes {
            shared
                .metrics
                .queue_depth
                .with_label_values(&[l.name()])
                .dec();
        }
    }
}

/// The next unit of work: the oldest job of the highest non-empty lane, plus (for generation)
/// the other queued generation jobs against the same model view.
fn next_batch(lanes: &mut [VecDeque<Queued>; 3], max_batch: usize) -> Option<Vec<Queued>> {
    for lane in lanes.iter_mut() {
        let Some(first) = lane.pop_front() else {
            continue;
        };
        let mut batch = vec![first];
        if let Work::Generate { view, .. } = &batch[0].work {
            let view = view.clone();
            let mut i = 0;
            while i < lane.len() && batch.len() < max_batch {
                if matches!(&lane[i].work, Work::Generate { view: v, .. } if *v == view) {
                    batch.push(lane.remove(i).expect("index in range"));
                } else {
                    i += 1;
                }
            }
        }
        return Some(batch);
    }
    None
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn view_of(work: &Work) -> &ModelView {
    match work {
        Work::Generate { view, .. }
        | Work::Score { view, .. }
        | Work::Loglikelihood { view, .. }
        | Work::Edit { view, .. }
        | Work::Eval { view, .. } => view,
    }
}

fn run_batch(
    model: &LoadedModel,
    shared: &Shared,
    overlays: &mut OverlayCache,
    edit_ctx: &editing::EditContext,
    batch: Vec<Queued>,
) {
    let live: Vec<Queued> = batch.into_iter().filter(|q| !q.work.abandoned()).collect();
    if live.is_empty() {
        return;
    }
    // A batch shares one view (generation batches are grouped by view; others are single).
    let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| {
        overlays.get(model, view_of(&live[0].work))
    }));
    let prepared = match flatten(prepared) {
        Ok(p) => p,
        Err(e) => {
            let msg = e.to_string();
            for q in live {
                fail(q.work, EngineError::Failed(msg.clone()));
            }
            return;
        }
    };
    let view_key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        view_of(&live[0].work).key().hash(&mut h);
        h.finish()
    };
    overlays.prefix_kv.retarget(view_key);
    let edited = Edited::new(model.model.as_ref(), prepared);
    run_on(
        &edited,
        model,
        shared,
        edit_ctx,
        live,
        &mut overlays.prefix_kv,
    );
}

/// Answers a piece of work with an error.
fn fail(work: Work, e: EngineError) {
    match work {
        Work::Generate { events, .. } => {
            let _ = events.send(GenEvent::Done(Err(e)));
        }
        Work::Score { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Work::Loglikelihood { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Work::Edit { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Work::Eval { reply, .. } => {
            let _ = reply.send(Err(e));
        }
    }
}

fn run_on(
    lm: &Edited<'_>,
    model: &LoadedModel,
    shared: &Shared,
    edit_ctx: &editing::EditContext,
    live: Vec<Queued>,
    prefix_kv: &mut PrefixKv,
) {
    let metrics = &shared.metrics;
    let tok = &model.tokenizer;
    if matches!(live[0].work, Work::Generate { .. }) {
        let mut prompts = Vec::new();
        let mut params = Vec::new();
        let mut senders = Vec::new();
        let mut admitted = Vec::new();
        for q in live {
            if let Work::Generate {
                prompt,
                params: p,
                events,
                ..
            } = q.work
            {
                metrics.prompt_tokens_total.inc_by(prompt.len() as u64);
                prompts.push(prompt);
                params.push(p);
                senders.push(events);
                admitted.push(q.admitted);
            }
        }
        let _span = tracing::debug_span!("generate", batch = prompts.len()).entered();
        let mut first = vec![true; senders.len()];
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            generate_each(lm, tok, &prompts, &params, &mut |row, delta| {
                if std::mem::take(&mut first[row]) {
                    metrics
                        .time_to_first_token_seconds
                        .observe(admitted[row].elapsed().as_secs_f64());
                }
                senders[row].send(GenEvent::Text(delta.to_string())).is_ok()
            })
        }));
        match result {
            Ok(Ok(gens)) => {
                for (g, s) in gens.into_iter().zip(&senders) {
                    metrics
                        .generation_tokens_total
                        .inc_by(g.token_ids.len() as u64);
                    let _ = s.send(GenEvent::Done(Ok(g)));
                }
            }
            Ok(Err(e)) => {
                // One error for the whole batch; errors are not Clone, so rows share its text.
                let msg = e.to_string();
                for s in &senders {
                    let _ = s.send(GenEvent::Done(Err(EngineError::Failed(msg.clone()))));
                }
            }
            Err(p) => {
                let msg = panic_message(p);
                tracing::error!(panic = %msg, "engine panicked during generation");
                for s in &senders {
                    let _ = s.send(GenEvent::Done(Err(EngineError::Panicked(msg.clone()))));
                }
            }
        }
        return;
    }
    for q in live {
        match q.work {
            Work::Score {
                seqs,
                from,
                top_n,
                reply,
                ..
            } => {
                let n: usize = seqs.iter().map(Vec::len).sum();
                metrics.prompt_tokens_total.inc_by(n as u64);
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    score_tokens_top(lm, &seqs, &from, top_n, shared.limits.token_budget)
                }));
                let _ = reply.send(flatten(r));
            }
            Work::Loglikelihood { pairs, reply, .. } => {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    loglikelihood(lm, tok, &pairs, shared.limits.token_budget)
                }));
                let _ = reply.send(flatten(r));
            }
            Work::Edit {
                view,
                method,
                requests,
                hparams,
                opts,
                reply,
            } => {
                let _span =
                    tracing::info_span!("edit", method = %method, requests = requests.len())
                        .entered();
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    editing::apply_prepared(
                        model,
                        &view.overlay,
                        lm.overlay.clone(),
                        method,
                        &requests,
                        &hparams,
                        opts,
                        edit_ctx,
                    )
                }));
                let r = match r {
                    Ok(Ok(steps)) => Ok(steps),
                    Ok(Err(e)) => Err(EngineError::Edit(e)),
                    Err(p) => {
                        let msg = panic_message(p);
                        tracing::error!(panic = %msg, "engine panicked during an edit");
                        Err(EngineError::Panicked(msg))
                    }
                };
                let _ = reply.send(r);
            }
            Work::Eval { work, reply, .. } => {
                metrics
                    .eval_requests_total
                    .with_label_values(&[work.kind()])
                    .inc_by(work.len() as u64);
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    work.answer(
                        model.model.as_ref(),
                        lm,
                        tok,
                        shared.limits.token_budget,
                        prefix_kv,
                    )
                }));
                let r = match r {
                    Ok(r) => r,
                    Err(p) => {
                        let msg = panic_message(p);
                        tracing::error!(panic = %msg, "engine panicked during evaluation");
                        Err(EngineError::Panicked(msg))
                    }
                };
                let _ = reply.send(r);
            }
            Work::Generate { .. } => unreachable!("generation is batched above"),
        }
    }
}

fn flatten<T>(r: std::thread::Result<Result<T, ModelError>>) -> Result<T, EngineError> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(EngineError::Model(e)),
        Err(p) => {
            let msg = panic_message(p);
            tracing::error!(panic = %msg, "engine panicked");
            Err(EngineError::Panicked(msg))
        }
    }
}
