//! The engine's Prometheus collectors: what the worker records about its lanes, its forwards and
//! the model. The engine only records; whoever exports metrics registers them
//! ([`EngineMetrics::register`]), so the engine knows nothing of the service around it.
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry,
};

/// Latency buckets from milliseconds (a queued request picked up at once) to minutes (a
/// request waiting behind an edit that computes key statistics).
pub const LATENCY_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Clones share their series, so the engine and the registry can each hold one.
#[derive(Clone)]
pub struct EngineMetrics {
    pub queue_depth: IntGaugeVec,
    pub queue_wait_seconds: HistogramVec,
    pub time_to_first_token_seconds: Histogram,
    pub generation_tokens_total: IntCounter,
    pub prompt_tokens_total: IntCounter,
    pub model_load_seconds: Gauge,
    /// Evaluation requests answered, by lm-eval request kind.
    pub eval_requests_total: IntCounterVec,
    /// Slices of resource preparation run (statistics pieces, templates, waits on background
    /// work) between other requests.
    pub preparation_slices_total: IntCounter,
}

impl EngineMetrics {
    pub fn new() -> Self {
        let m = Self {
            queue_depth: IntGaugeVec::new(
                Opts::new(
                    "emend_queue_depth",
                    "Engine work queued or running, per lane",
                ),
                &["lane"],
            )
            .expect("valid metric"),
            queue_wait_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "emend_queue_wait_seconds",
                    "Time from admission to the engine picking the work up",
                )
                .buckets(LATENCY_SECONDS.to_vec()),
                &["lane"],
            )
            .expect("valid metric"),
            time_to_first_token_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "emend_time_to_first_token_seconds",
                    "Admission to first generated text",
                )
                .buckets(LATENCY_SECONDS.to_vec()),
            )
            .expect("valid metric"),
            generation_tokens_total: IntCounter::new(
                "emend_generation_tokens_total",
                "Tokens generated",
            )
            .expect("valid metric"),
            prompt_tokens_total: IntCounter::new(
                "emend_prompt_tokens_total",
                "Prompt tokens processed",
            )
            .expect("valid metric"),
            model_load_seconds: Gauge::new(
                "emend_model_load_seconds",
                "Seconds the model took to load",
            )
            .expect("valid metric"),
            eval_requests_total: IntCounterVec::new(
                Opts::new(
                    "emend_eval_requests_total",
                    "Evaluation requests answered by the engine, by request kind",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            preparation_slices_total: IntCounter::new(
                "emend_preparation_slices_total",
                "Slices of an edit's resource preparation run on the engine thread",
            )
            .expect("valid metric"),
        };
        // Every series exists from the start, so dashboards and alerts see zeros, not gaps.
        for kind in ["loglikelihood", "loglikelihood_rolling", "generate_until"] {
            m.eval_requests_total.with_label_values(&[kind]);
        }
        m
    }

    /// Adds every collector to `registry` (fails on a name it already holds).
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.queue_depth.clone()))?;
        registry.register(Box::new(self.queue_wait_seconds.clone()))?;
        registry.register(Box::new(self.time_to_first_token_seconds.clone()))?;
        registry.register(Box::new(self.generation_tokens_total.clone()))?;
        registry.register(Box::new(self.prompt_tokens_total.clone()))?;
        registry.register(Box::new(self.model_load_seconds.clone()))?;
        registry.register(Box::new(self.eval_requests_total.clone()))?;
        registry.register(Box::new(self.preparation_slices_total.clone()))
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}
