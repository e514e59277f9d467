//! Prometheus metrics, described once (vLLM/TGI naming with base units and `_total`).
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub http_requests_total: IntCounterVec,
    pub http_request_duration_seconds: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub queue_wait_seconds: HistogramVec,
    pub time_to_first_token_seconds: Histogram,
    pub generation_tokens_total: IntCounter,
    pub prompt_tokens_total: IntCounter,
    pub sessions: IntGauge,
    pub model_load_seconds: prometheus::Gauge,
    /// Edit requests by method and outcome (`ok`, `invalid`: refused input, `failed`).
    pub edits_total: IntCounterVec,
    /// Wall time of an acknowledged edit request (queue, engine, commit).
    pub edit_duration_seconds: HistogramVec,
    /// Delta bytes of every live session's current version.
    pub session_overlay_bytes: IntGauge,
    /// Evaluation requests answered by the engine, by lm-eval request kind.
    pub eval_requests_total: IntCounterVec,
    /// Stored jobs by kind and status.
    pub jobs: IntGaugeVec,
    /// Wall time of an evaluation job from its first start to its end, by final status.
    pub eval_job_duration_seconds: HistogramVec,
}

/// Jobs run from seconds (a few documents) to hours (full benchmarks on CPU).
const JOB_SECONDS: &[f64] = &[
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
];

/// Edits take from a fraction of a second (FT, few steps) to minutes (first ROME: statistics).
const EDIT_SECONDS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            http_requests_total: IntCounterVec::new(
                Opts::new(
                    "emend_http_requests_total",
                    "HTTP requests by route pattern, method and status",
                ),
                &["route", "method", "status"],
            )
            .unwrap(),
            http_request_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "emend_http_request_duration_seconds",
                    "HTTP request latency",
                )
                .buckets(LATENCY.to_vec()),
                &["route", "method"],
            )
            .unwrap(),
            queue_depth: IntGaugeVec::new(
                Opts::new(
                    "emend_queue_depth",
                    "Engine work queued or running, per lane",
                ),
                &["lane"],
            )
            .unwrap(),
            queue_wait_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "emend_queue_wait_seconds",
                    "Time from admission to the engine picking the work up",
                )
                .buckets(LATENCY.to_vec()),
                &["lane"],
            )
            .unwrap(),
            time_to_first_token_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "emend_time_to_first_token_seconds",
                    "Admission to first generated text",
                )
                .buckets(LATENCY.to_vec()),
            )
            .unwrap(),
            generation_tokens_total: IntCounter::new(
                "emend_generation_tokens_total",
                "Tokens generated",
            )
            .unwrap(),
            prompt_tokens_total: IntCounter::new(
                "emend_prompt_tokens_total",
                "Prompt tokens processed",
            )
            .unwrap(),
            sessions: IntGauge::new("emend_sessions", "Live sessions").unwrap(),
            model_load_seconds: prometheus::Gauge::new(
                "emend_model_load_seconds",
                "Seconds the model took to load",
            )
            .unwrap(),
            edits_total: IntCounterVec::new(
                Opts::new(
                    "emend_edits_total",
                    "Edit requests by method and outcome (ok, invalid, failed)",
                ),
                &["method", "outcome"],
            )
            .unwrap(),
            edit_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "emend_edit_duration_seconds",
                    "Wall time of an acknowledged edit request",
                )
                .buckets(EDIT_SECONDS.to_vec()),
                &["method"],
            )
            .unwrap(),
            session_overlay_bytes: IntGauge::new(
                "emend_session_overlay_bytes",
                "Delta bytes of the current versions of the live sessions",
            )
            .unwrap(),
            eval_requests_total: IntCounterVec::new(
                Opts::new(
                    "emend_eval_requests_total",
                    "Evaluation requests answered by the engine, by request kind",
                ),
                &["kind"],
            )
            .unwrap(),
            jobs: IntGaugeVec::new(
                Opts::new("emend_jobs", "Stored jobs by kind and status"),
                &["kind", "status"],
            )
            .unwrap(),
            eval_job_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "emend_eval_job_duration_seconds",
                    "Wall time of an evaluation job from its first start to its end",
                )
                .buckets(JOB_SECONDS.to_vec()),
                &["status"],
            )
            .unwrap(),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.http_requests_total.clone())).unwrap();
        r.register(Box::new(m.http_request_duration_seconds.clone()))
            .unwrap();
        r.register(Box::new(m.queue_depth.clone())).unwrap();
        r.register(Box::new(m.queue_wait_seconds.clone())).unwrap();
        r.register(Box::new(m.time_to_first_token_seconds.clone()))
            .unwrap();
        r.register(Box::new(m.generation_tokens_total.clone()))
            .unwrap();
        r.register(Box::new(m.prompt_tokens_total.clone())).unwrap();
        r.register(Box::new(m.sessions.clone())).unwrap();
        r.register(Box::new(m.model_load_seconds.clone())).unwrap();
        r.register(Box::new(m.edits_total.clone())).unwrap();
        r.register(Box::new(m.edit_duration_seconds.clone()))
            .unwrap();
        r.register(Box::new(m.session_overlay_bytes.clone()))
            .unwrap();
        r.register(Box::new(m.eval_requests_total.clone())).unwrap();
        r.register(Box::new(m.jobs.clone())).unwrap();
        r.register(Box::new(m.eval_job_duration_seconds.clone()))
            .unwrap();
        // Every series exists from the start, so dashboards and alerts see zeros, not gaps.
        for method in crate::engine::editing::Method::all() {
            for outcome in ["ok", "invalid", "failed"] {
                m.edits_total.with_label_values(&[method.name(), outcome]);
            }
            m.edit_duration_seconds.with_label_values(&[method.name()]);
        }
        for kind in ["loglikelihood", "loglikelihood_rolling", "generate_until"] {
            m.eval_requests_total.with_label_values(&[kind]);
        }
        for status in crate::jobs::JobStatus::ALL {
            m.jobs.with_label_values(&["evaluation", status.as_str()]);
        }
        for status in ["succeeded", "failed", "cancelled"] {
            m.eval_job_duration_seconds.with_label_values(&[status]);
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
