//! Wires the long-running server together: model → engine worker → store → sessions → HTTP.
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;

use crate::api::{self, AppState, Limits};
use crate::canary::{Canary, CanarySet};
use crate::config::{ApiKeys, Config};
use crate::engine::editing::{EditingEnv, Method};
use crate::engine::model::LoadedModel;
use crate::engine::worker::{Engine, EngineLimits, EngineMetrics};
use crate::jobs::{Jobs, JobsConfig};
use crate::metrics::Metrics;
use crate::sessions::{Placement, Sessions};
use crate::store::Store;

/// Everything a running server holds; `shutdown` stops the engine and closes the store.
pub struct Running {
    pub server: actix_web::dev::Server,
    pub addr: std::net::SocketAddr,
    pub state: web::Data<AppState>,
}

/// Starts serving `model` with `cfg` on an already-bound listener (tests bind port 0).
pub async fn start(
    cfg: &Config,
    keys: ApiKeys,
    model: LoadedModel,
    listener: TcpListener,
) -> anyhow::Result<Running> {
    let methods: Vec<&str> = Method::all().into_iter().map(Method::name).collect();
    let metrics = Arc::new(Metrics::new(&methods));
    // The engine records into collectors of its own, exported with the service's.
    let engine_metrics = EngineMetrics::new();
    engine_metrics.register(&metrics.registry)?;
    let limits = EngineLimits {
        lane_capacity: [cfg.queue_interactive, cfg.queue_edit, cfg.queue_eval],
        max_batch: cfg.max_generation_batch,
        ..EngineLimits::default()
    };
    let env = EditingEnv {
        stats_dir: cfg.stats_dir(),
        editors_dir: cfg.editors_dir(),
        data_dir: cfg.data_dir.clone(),
    };
    let engine = Engine::start(model, limits, engine_metrics, env);
    for method in cfg.methods_to_prepare()? {
        let engine = engine.clone();
        tokio::spawn(async move {
            match engine.prepare(method, serde_json::Value::Null).await {
                Ok(()) => tracing::info!(method = method.name(), "resources prepared"),
                Err(e) => tracing::warn!(method = method.name(), error = %e, "could not prepare"),
            }
        });
    }
    std::fs::create_dir_all(&cfg.state_dir)?;
    let store = Store::connect(&cfg.database_url()).await?;
    // Restored deltas go where the engine computes, in its dtype: the same tensors an edit made.
    let placement = Placement {
        device: engine.device().clone(),
        dtype: engine.dtype(),
    };
    // One session may queue as many edits as the edit lane holds; beyond that, 429.
    let canary = canary(cfg, &engine)?;
    let sessions = Arc::new(
        Sessions::restore(store.clone(), metrics.clone(), &placement, cfg.queue_edit)
            .await?
            .with_canary(canary),
    );
    let jobs = Jobs::new(
        store,
        sessions.clone(),
        engine.clone(),
        metrics.clone(),
        JobsConfig {
            data_dir: cfg.data_dir.clone(),
            patience: Duration::from_secs(cfg.eval_patience_secs),
            max_queued: cfg.max_queued_jobs,
            trainings_dir: cfg.state_dir.join("trainings"),
            editors_dir: cfg.editors_dir(),
        },
    );
    // After the sessions are restored: a resumed job needs its session version.
    jobs.start();
    let state = web::Data::new(AppState {
        engine,
        sessions,
        jobs,
        metrics,
        keys,
        limits: Limits::from_config(cfg),
        max_body_bytes: cfg.max_body_bytes,
        data_dir: cfg.data_dir.clone(),
        datasets: Default::default(),
    });
    let addr = listener.local_addr()?;
    let server = api::serve(
        state.clone(),
        listener,
        cfg.http_workers,
        cfg.shutdown_grace_secs,
    )?;
    tracing::info!(%addr, "listening");
    Ok(Running {
        server,
        addr,
        state,
    })
}

/// The damage guard's canary set, read from the data dir. Without a data dir there is none (every
/// session's canary stays off); a configured set that does not load stops the start.
fn canary(cfg: &Config, engine: &Engine) -> anyhow::Result<Option<Arc<Canary>>> {
    let spec = cfg.canary_spec()?;
    let Some(dir) = &cfg.data_dir else {
        tracing::info!("no data dir: the damage guard's canary probes are off");
        return Ok(None);
    };
    let set = match CanarySet::load(spec, dir) {
        Ok(set) => set,
        Err(e) if cfg.canary_file.is_none() => {
            tracing::warn!(error = %e, "the built-in canary set does not load: canary probes are off");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(set = %set.spec.name, digest = %set.digest, "canary set loaded");
    let patience = Duration::from_secs(cfg.eval_patience_secs);
    Ok(Some(Arc::new(Canary::new(engine.clone(), set, patience))))
}

impl Running {
    /// Serves until the server stops (SIGTERM/SIGINT: stop accepting, finish in-flight requests
    /// within the grace period), then stops the engine and flushes the store.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.server.await?;
        self.state.engine.shutdown();
        self.state.sessions.store().close().await;
        tracing::info!("stopped");
        Ok(())
    }
}
