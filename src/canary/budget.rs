//! A session's canary setting and damage budget, and what a reading says against them: the drift
//! of the probes from the base model and the limits it breaks.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What happens after each edit of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CanaryMode {
    /// No probes run.
    #[default]
    Off,
    /// Probes run on every new version; an edit over budget is accepted and flagged.
    Measure,
    /// Probes run on every new version; an edit over budget is refused (409).
    Guard,
}

/// Limits on the drift of the canary probes from the base model. A limit left out is not
/// checked; an empty budget flags nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Largest ratio of a probe's perplexity to the base model's (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 1.2, minimum = 1.0)]
    pub perplexity_ratio: Option<f64>,
    /// Largest drop of a probe's accuracy below the base model's, in points (0 to 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 3.0, minimum = 0.0, maximum = 100.0)]
    pub accuracy_drop: Option<f64>,
    /// Most neighbourhood facts whose greedy answer may change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 2, minimum = 0, maximum = 1000000)]
    pub neighbour_flips: Option<u32>,
}

impl Default for Budget {
    /// The limits issue 29 names: the study's collapse breaks them within dozens of edits.
    fn default() -> Self {
        Self {
            perplexity_ratio: Some(1.2),
            accuracy_drop: Some(3.0),
            neighbour_flips: Some(2),
        }
    }
}

/// The largest `neighbour_flips` limit (far above any canary set's neighbour count).
pub const MAX_FLIPS: u32 = 1_000_000;

/// A budget value out of range: the field (`budget.perplexity_ratio`, …) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}` {message}")]
pub struct BudgetError {
    pub field: String,
    pub message: String,
}

/// The budget's limits, in the order of its fields: the names breaches carry, and the values
/// of `emend_edits_rejected_total`'s `reason` label.
pub const LIMITS: [&str; 3] = ["perplexity_ratio", "accuracy_drop", "neighbour_flips"];

impl Budget {
    pub fn validate(&self) -> Result<(), BudgetError> {
        let bad = |field: &str, message: String| {
            Err(BudgetError {
                field: format!("budget.{field}"),
                message,
            })
        };
        if let Some(r) = self.perplexity_ratio {
            if !r.is_finite() || r < 1.0 {
                return bad(
                    "perplexity_ratio",
                    format!("must be a number of at least 1. Given: {r}"),
                );
            }
        }
        if let Some(d) = self.accuracy_drop {
            if !d.is_finite() || !(0.0..=100.0).contains(&d) {
                return bad(
                    "accuracy_drop",
                    format!("must be a number of points from 0 to 100. Given: {d}"),
                );
            }
        }
        if let Some(n) = self.neighbour_flips.filter(|n| *n > MAX_FLIPS) {
            return bad(
                "neighbour_flips",
                format!("must be an integer from 0 to {MAX_FLIPS}. Given: {n}"),
            );
        }
        Ok(())
    }

    /// The limits `drift` breaks, in the order of the budget's fields.
    pub fn breaches(&self, drift: &Drift) -> Vec<Breach> {
        let mut out = Vec::new();
        if let Some(max) = self.perplexity_ratio {
            if drift.perplexity_ratio > max {
                out.push(Breach::new(
                    LIMITS[0],
                    drift.perplexity_ratio,
                    max,
                    drift.worst_perplexity.clone(),
                ));
            }
        }
        if let Some(max) = self.accuracy_drop {
            if drift.accuracy_drop > max {
                out.push(Breach::new(
                    LIMITS[1],
                    drift.accuracy_drop,
                    max,
                    drift.worst_accuracy.clone(),
                ));
            }
        }
        if let Some(max) = self.neighbour_flips {
            if drift.neighbour_flips > max {
                out.push(Breach::new(
                    LIMITS[2],
                    drift.neighbour_flips as f64,
                    max as f64,
                    None,
                ));
            }
        }
        out
    }
}

/// A session's canary setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanarySettings {
    #[serde(default)]
    pub mode: CanaryMode,
    /// Limits checked in `measure` (flag) and `guard` (refuse) modes; default: perplexity
    /// ratio 1.2, accuracy drop 3 points, 2 neighbour flips.
    #[serde(default)]
    pub budget: Budget,
}

impl CanarySettings {
    pub fn is_on(&self) -> bool {
        self.mode != CanaryMode::Off
    }
}

/// How far a version's probes are from the base model's, worst probe first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Drift {
    /// The largest ratio of a perplexity to the base model's (1 = unchanged).
    pub perplexity_ratio: f64,
    /// The probe score it comes from, e.g. `lambada_openai.perplexity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_perplexity: Option<String>,
    /// The largest accuracy drop below the base model's, in points (negative: all improved).
    pub accuracy_drop: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_accuracy: Option<String>,
    /// Neighbourhood facts whose base greedy answer is no longer the greedy answer.
    pub neighbour_flips: u32,
}

/// Perplexity scores are those whose metric name ends in `perplexity`. The accuracy drop is
/// that of the pooled accuracy over all accuracy probes ([`super::set::POOLED_ACC`]) where the
/// readings have one, else the largest drop of a score named `acc`.
pub fn drift(
    base: &BTreeMap<String, f64>,
    now: &BTreeMap<String, f64>,
    neighbour_flips: u32,
) -> Drift {
    let mut d = Drift {
        perplexity_ratio: 1.0,
        accuracy_drop: f64::NEG_INFINITY,
        neighbour_flips,
        ..Drift::default()
    };
    let pooled = base.contains_key(super::set::POOLED_ACC);
    for (key, b) in base {
        let Some(v) = now.get(key) else { continue };
        let metric = key.rsplit('.').next().unwrap_or(key);
        if metric.ends_with("perplexity") && *b > 0.0 {
            // A NaN perplexity (a collapsed model) counts as infinitely worse.
            let r = if v.is_nan() { f64::INFINITY } else { v / b };
            if r > d.perplexity_ratio || d.worst_perplexity.is_none() {
                d.perplexity_ratio = r;
                d.worst_perplexity = Some(key.clone());
            }
        } else if metric == "acc" && (!pooled || key == super::set::POOLED_ACC) {
            let drop = (b - v) * 100.0;
            if drop > d.accuracy_drop {
                d.accuracy_drop = drop;
                d.worst_accuracy = Some(key.clone());
            }
        }
    }
    if d.accuracy_drop == f64::NEG_INFINITY {
        d.accuracy_drop = 0.0;
    }
    d
}

/// One limit of the budget that a reading breaks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Breach {
    /// The budget's field: `perplexity_ratio`, `accuracy_drop` or `neighbour_flips`.
    pub limit: String,
    pub measured: f64,
    pub allowed: f64,
    /// The probe score behind the measurement, where one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
}

impl Breach {
    fn new(limit: &str, measured: f64, allowed: f64, probe: Option<String>) -> Self {
        Self {
            limit: limit.into(),
            measured,
            allowed,
            probe,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::set::POOLED_ACC as POOLED;

    fn scores(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn drift_takes_the_worst_probe() {
        let base = scores(&[
            ("lambada_openai.acc", 0.5),
            ("lambada_openai.perplexity", 40.0),
            ("wikitext.word_perplexity", 20.0),
            ("arc_easy.acc", 0.5),
            ("arc_easy.acc_norm", 0.5),
        ]);
        let now = scores(&[
            ("lambada_openai.acc", 0.46875),
            ("lambada_openai.perplexity", 50.0),
            ("wikitext.word_perplexity", 30.0),
            ("arc_easy.acc", 0.4375),
            ("arc_easy.acc_norm", 0.1),
        ]);
        let d = drift(&base, &now, 3);
        assert_eq!(d.perplexity_ratio, 1.5);
        assert_eq!(
            d.worst_perplexity.as_deref(),
            Some("wikitext.word_perplexity")
        );
        assert_eq!(d.accuracy_drop, 6.25);
        assert_eq!(d.worst_accuracy.as_deref(), Some("arc_easy.acc"));
        // With a pooled accuracy, that is the one checked.
        let mut pb = base.clone();
        pb.insert(POOLED.into(), 0.5);
        let mut pn = now.clone();
        pn.insert(POOLED.into(), 0.49);
        let p = drift(&pb, &pn, 0);
        assert!((p.accuracy_drop - 1.0).abs() < 1e-9, "{p:?}");
        assert_eq!(p.worst_accuracy.as_deref(), Some(POOLED));
        let b = Budget::default().breaches(&d);
        let limits: Vec<&str> = b.iter().map(|b| b.limit.as_str()).collect();
        assert_eq!(
            limits,
            ["perplexity_ratio", "accuracy_drop", "neighbour_flips"]
        );
        assert_eq!(b[2].measured, 3.0);
        assert_eq!(b[2].allowed, 2.0);
        // Unchanged scores drift by nothing and break nothing.
        let same = drift(&base, &base, 0);
        assert_eq!((same.perplexity_ratio, same.accuracy_drop), (1.0, 0.0));
        assert!(Budget::default().breaches(&same).is_empty());
        // A collapsed model's NaN perplexity breaks any ratio.
        let nan = drift(&base, &scores(&[("wikitext.word_perplexity", f64::NAN)]), 0);
        assert_eq!(nan.perplexity_ratio, f64::INFINITY);
    }

    #[test]
    fn budgets_name_the_bad_field() {
        let e = Budget {
            perplexity_ratio: Some(0.9),
            ..Budget::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "budget.perplexity_ratio");
        let e = Budget {
            accuracy_drop: Some(-1.0),
            ..Budget::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "budget.accuracy_drop");
        assert!(Budget::default().validate().is_ok());
        let e = serde_json::from_value::<CanarySettings>(
            serde_json::json!({"mode": "guard", "budget": {"ppl": 2}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `ppl`"), "{e}");
    }
}
