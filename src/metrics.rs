//! The service's Prometheus metrics, described once (vLLM/TGI naming with base units and
//! `_total`): HTTP, sessions, edits, the damage guard's canary, jobs. The engine's own collectors (lanes, forwards, model)
//! are `engine::worker::EngineMetrics`, registered into the same [`Metrics::registry`]. Label
//! values known in advance (edit methods, job statuses) come from the layers that own them.
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::engine::worker::LATENCY_SECONDS;

pub struct Metrics {
    pub registry: Registry,
    pub http_requests_total: IntCounterVec,
    pub http_request_duration_seconds: HistogramVec,
    pub sessions: IntGauge,
    /// Edit requests by method and outcome (`ok`, `invalid`: refused input, `rejected`: over
    /// the damage budget, `failed`).
    pub edits_total: IntCounterVec,
    /// Wall time of an acknowledged edit request (queue, engine, commit).
    pub edit_duration_seconds: HistogramVec,
    /// Delta bytes of every live session's current version.
    pub session_overlay_bytes: IntGauge,
    /// Stored jobs by kind and status.
    pub jobs: IntGaugeVec,
    /// Wall time of an evaluation job from its first start to its end, by final status.
    pub eval_job_duration_seconds: HistogramVec,
    /// Per canary reading: the largest perplexity ratio to the base model.
    pub canary_perplexity_ratio: Histogram,
    /// Per canary reading: the largest accuracy drop below the base model, in points.
    pub canary_accuracy_drop: Histogram,
    pub canary_neighbour_flips: Histogram,
    /// Wall time of one canary reading (all probes on one version).
    pub canary_seconds: Histogram,
    /// Readings over their session's budget (refused or, in `measure` mode, flagged).
    pub canary_flagged_total: IntCounter,
    /// Edits refused by the damage guard, by the budget limit broken.
    pub edits_rejected_total: IntCounterVec,
    /// Training steps done by training jobs (trained editors).
    pub training_steps_total: IntCounter,
    /// The last validation of the running (or last) training job, by metric.
    pub training_validation: GaugeVec,
}

/// The validation metrics of a training job (`emend_training_validation`'s `metric` label).
pub const TRAINING_METRICS: [&str; 5] = [
    "edit_success",
    "generalization",
    "locality",
    "loss_edit",
    "loss_loc",
];

/// A perplexity ratio of 1 is no damage; the study's collapse reaches 10 and beyond.
const RATIO_BUCKETS: &[f64] = &[1.0, 1.01, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0, 5.0, 10.0, 100.0];
const DROP_BUCKETS: &[f64] = &[-5.0, 0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0];
const FLIP_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0];
/// Budget limits, the values of `emend_edits_rejected_total`'s `reason` label.
pub use crate::canary::budget::LIMITS as REJECT_REASONS;

/// Jobs run from seconds (a few documents) to hours (full benchmarks on CPU).
const JOB_SECONDS: &[f64] = &[
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
];

/// Edits take from a fraction of a second (FT, few steps) to minutes (first ROME: statistics).
const EDIT_SECONDS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

impl Metrics {
    /// The service's collectors, with the series of `edit_methods` (method names, the values
    /// of `emend_edits_total`'s `method` label) present from the start.
    pub fn new(edit_methods: &[&str]) -> Self {
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
                .buckets(LATENCY_SECONDS.to_vec()),
                &["route", "method"],
            )
            .unwrap(),
            sessions: IntGauge::new("emend_sessions", "Live sessions").unwrap(),
            edits_total: IntCounterVec::new(
                Opts::new(
                    "emend_edits_total",
                    "Edit requests by method and outcome (ok, invalid, rejected by the damage guard, failed)",
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
            canary_perplexity_ratio: histogram(
                "emend_canary_perplexity_ratio",
                "Largest perplexity ratio of a canary probe to the base model, per reading",
                RATIO_BUCKETS,
            ),
            canary_accuracy_drop: histogram(
                "emend_canary_accuracy_drop",
                "Largest accuracy drop of a canary probe below the base model (points), per reading",
                DROP_BUCKETS,
            ),
            canary_neighbour_flips: histogram(
                "emend_canary_neighbour_flips",
                "Neighbourhood facts whose greedy answer changed, per reading",
                FLIP_BUCKETS,
            ),
            canary_seconds: histogram(
                "emend_canary_seconds",
                "Wall time of one canary reading",
                EDIT_SECONDS,
            ),
            canary_flagged_total: IntCounter::new(
                "emend_canary_flagged_total",
                "Canary readings over their session's damage budget",
            )
            .unwrap(),
            edits_rejected_total: IntCounterVec::new(
                Opts::new(
                    "emend_edits_rejected_total",
                    "Edits refused by the damage guard, by the budget limit broken",
                ),
                &["reason"],
            )
            .unwrap(),
            training_steps_total: IntCounter::new(
                "emend_training_steps_total",
                "Training steps done by training jobs",
            )
            .unwrap(),
            training_validation: GaugeVec::new(
                Opts::new(
                    "emend_training_validation",
                    "The last validation of the running or last training job, by metric",
                ),
                &["metric"],
            )
            .unwrap(),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.http_requests_total.clone())).unwrap();
        r.register(Box::new(m.http_request_duration_seconds.clone()))
            .unwrap();
        r.register(Box::new(m.sessions.clone())).unwrap();
        r.register(Box::new(m.edits_total.clone())).unwrap();
        r.register(Box::new(m.edit_duration_seconds.clone()))
            .unwrap();
        r.register(Box::new(m.session_overlay_bytes.clone()))
            .unwrap();
        r.register(Box::new(m.jobs.clone())).unwrap();
        r.register(Box::new(m.eval_job_duration_seconds.clone()))
            .unwrap();
        for h in [
            &m.canary_perplexity_ratio,
            &m.canary_accuracy_drop,
            &m.canary_neighbour_flips,
            &m.canary_seconds,
        ] {
            r.register(Box::new(h.clone())).unwrap();
        }
        r.register(Box::new(m.canary_flagged_total.clone()))
            .unwrap();
        r.register(Box::new(m.edits_rejected_total.clone()))
            .unwrap();
        r.register(Box::new(m.training_steps_total.clone()))
            .unwrap();
        r.register(Box::new(m.training_validation.clone())).unwrap();
        for metric in TRAINING_METRICS {
            m.training_validation.with_label_values(&[metric]);
        }
        for reason in REJECT_REASONS {
            m.edits_rejected_total.with_label_values(&[reason]);
        }
        // Every series exists from the start, so dashboards and alerts see zeros, not gaps.
        for method in edit_methods {
            for outcome in ["ok", "invalid", "rejected", "failed"] {
                m.edits_total.with_label_values(&[method, outcome]);
            }
            m.edit_duration_seconds.with_label_values(&[method]);
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

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).unwrap()
}
