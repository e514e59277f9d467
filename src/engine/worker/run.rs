//! The engine thread: takes the next batch from the lanes, prepares its view's overlay (cached
//! per session version), runs it with panics isolated, and answers every item.
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::training::Trainers;
use super::{EngineError, GenEvent, Lane, ModelView, Queued, Shared, Work};
use crate::engine::editing;
use crate::engine::eval::engine::AnswerError;
use crate::engine::eval::EvalError;
use crate::engine::model::generate::generate_each;
use crate::engine::model::score::{loglikelihood, score_tokens_top, PrefixKv};
use crate::engine::model::{LoadedModel, ModelError};
use crate::engine::overlay::{Edited, Overlay, PreparedOverlay};

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
        // The overlay must be the one cached: a version number probed by the damage guard and
        // then refused is made again by the next edit, with other deltas.
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.key == key && Arc::ptr_eq(&e.overlay, &view.overlay))
        {
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

pub(super) fn worker(shared: Arc<Shared>, model: LoadedModel, env: editing::EditingEnv) {
    let _span = tracing::info_span!("engine").entered();
    let mut overlays = OverlayCache {
        entries: VecDeque::new(),
        capacity: 16,
        prefix_kv: PrefixKv::default(),
    };
    let edit_ctx = editing::EditContext::new(env, &model.info);
    let mut preparing: Option<editing::Preparation> = None;
    let mut trainers = Trainers::default();
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
        for q in batch.iter().filter(|q| !q.resumed) {
            shared
                .metrics
                .queue_wait_seconds
                .with_label_values(&[q.lane.name()])
                .observe(q.admitted.elapsed().as_secs_f64());
        }
        let Some(batch) = prepare_first(&model, &shared, &edit_ctx, &mut preparing, batch) else {
            continue;
        };
        let lanes: Vec<Lane> = batch.iter().map(|q| q.lane).collect();
        run_batch(
            &model,
            &shared,
            &mut overlays,
            &edit_ctx,
            &mut trainers,
            batch,
        );
        for l in lanes {
            shared
                .metrics
                .queue_depth
                .with_label_values(&[l.name()])
                .dec();
        }
    }
}

/// Runs a slice of what an edit lacks before the edit itself. The edit is put back at the
/// front of its lane (and `None` returned) until its resources are made, so the interactive
/// lane is served between slices; then the batch is returned to run.
fn prepare_first(
    model: &LoadedModel,
    shared: &Shared,
    ctx: &editing::EditContext,
    preparing: &mut Option<editing::Preparation>,
    mut batch: Vec<Queued>,
) -> Option<Vec<Queued>> {
    let (method, hparams, warm_up) = match &batch[0].work {
        Work::Edit {
            method, hparams, ..
        } => (*method, hparams, false),
        Work::Prepare {
            method, hparams, ..
        } => (*method, hparams, true),
        _ => return Some(batch),
    };
    if batch[0].work.abandoned() {
        return Some(batch);
    }
    let lm = model.model.as_ref();
    let plan = std::panic::catch_unwind(AssertUnwindSafe(|| ctx.preparation(lm, method, hparams)));
    let plan = match plan {
        Ok(Ok(Some(plan))) => plan,
        // Nothing missing: an edit runs now; a warm-up is done.
        Ok(Ok(None)) if !warm_up => return Some(batch),
        Ok(Ok(None)) => return finish(shared, batch, Ok(())),
        // An edit reports its own errors (an unknown layer, say) when it runs.
        _ if !warm_up => {
            *preparing = None;
            return Some(batch);
        }
        Ok(Err(e)) => return finish(shared, batch, Err(EngineError::Edit(e))),
        Err(p) => return finish(shared, batch, Err(EngineError::Panicked(panic_message(p)))),
    };
    if !preparing.as_ref().is_some_and(|p| p.same_plan(&plan)) {
        tracing::info!(
            plan = plan.plan(),
            "preparing an edit's resources in slices"
        );
        *preparing = Some(plan);
    }
    let p = preparing.as_mut().expect("set above");
    let slice = shared.limits.preparation_slice;
    let step = std::panic::catch_unwind(AssertUnwindSafe(|| {
        p.advance(ctx, lm, &model.tokenizer, slice)
    }));
    shared.metrics.preparation_slices_total.inc();
    let step = match step {
        Ok(r) => r.map_err(EngineError::Edit),
        Err(p) => Err(EngineError::Panicked(panic_message(p))),
    };
    match step {
        Ok(true) => {
            *preparing = None;
            if warm_up {
                finish(shared, batch, Ok(()))
            } else {
                Some(batch)
            }
        }
        Ok(false) => {
            let mut q = batch.pop().expect("one edit");
            q.resumed = true;
            let lane = q.lane as usize;
            shared.lanes.lock().expect("engine queue lock")[lane].push_front(q);
            None
        }
        Err(e) => {
            *preparing = None;
            finish(shared, batch, Err(e))
        }
    }
}

/// Answers the one edit or warm-up of `batch` with `r` without running it further.
fn finish(
    shared: &Shared,
    mut batch: Vec<Queued>,
    r: Result<(), EngineError>,
) -> Option<Vec<Queued>> {
    let q = batch.pop().expect("one item");
    shared
        .metrics
        .queue_depth
        .with_label_values(&[q.lane.name()])
        .dec();
    match (q.work, r) {
        (Work::Prepare { reply, .. }, r) => {
            let _ = reply.send(r);
        }
        (w, Err(e)) => fail(w, e),
        // Only a warm-up finishes without an error.
        (_, Ok(())) => {}
    }
    None
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
        | Work::Prepare { view, .. }
        | Work::Eval { view, .. }
        | Work::Train { view, .. } => view,
    }
}

fn run_batch(
    model: &LoadedModel,
    shared: &Shared,
    overlays: &mut OverlayCache,
    edit_ctx: &editing::EditContext,
    trainers: &mut Trainers,
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
        (edit_ctx, trainers),
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
        Work::Prepare { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Work::Eval { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Work::Train { reply, .. } => {
            let _ = reply.send(Err(e));
        }
    }
}

fn run_on(
    lm: &Edited<'_>,
    model: &LoadedModel,
    shared: &Shared,
    (edit_ctx, trainers): (&editing::EditContext, &mut Trainers),
    live: Vec<Queued>,
    prefix_kv: &mut PrefixKv,
) {
    let metrics = &shared.metrics;
    let tok = &model.tokenizer;
    if matches!(live[0].work, Work::Generate { .. }) {
        return generate(lm, model, shared, live);
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
            // `prepare_first` answers warm-ups; one that gets here has nothing left to make.
            Work::Prepare { reply, .. } => {
                let _ = reply.send(Ok(()));
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
                    Ok(r) => r.map_err(|e| match e {
                        AnswerError::Eval(EvalError::Model(m)) => EngineError::Model(m),
                        AnswerError::Eval(other) => EngineError::Failed(other.to_string()),
                        AnswerError::Edit(e) => EngineError::Edit(e),
                    }),
                    Err(p) => {
                        let msg = panic_message(p);
                        tracing::error!(panic = %msg, "engine panicked during evaluation");
                        Err(EngineError::Panicked(msg))
                    }
                };
                let _ = reply.send(r);
            }
            Work::Train {
                run_dir,
                config,
                action,
                reply,
                ..
            } => {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    trainers.call(model, edit_ctx, run_dir, &config, action)
                }));
                let r = match r {
                    Ok(r) => r.map_err(|e| EngineError::Edit(e.into())),
                    Err(p) => Err(EngineError::Panicked(panic_message(p))),
                };
                let _ = reply.send(r);
            }
            Work::Generate { .. } => unreachable!("generation is batched above"),
        }
    }
}

/// Runs a batch of generations of one view together, streaming each row's text to its caller.
fn generate(lm: &Edited<'_>, model: &LoadedModel, shared: &Shared, live: Vec<Queued>) {
    let metrics = &shared.metrics;
    let tok = &model.tokenizer;
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
