//! Hyper-parameters: defaults per method and architecture (from `defaults/hparams.toml`),
//! client overrides merged on top, every value range-checked with the field named.
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{EditError, Method};
use crate::engine::model::ModelSpec;

const DEFAULTS: &str = include_str!("defaults/hparams.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RomeHparams {
    /// The layer whose MLP down projection is rewritten.
    pub layer: usize,
    /// Adam learning rate and steps for `v*`.
    pub v_lr: f64,
    pub v_steps: usize,
    /// Weight decay on `v* − v` (ROME's `v_weight_decay`).
    pub v_weight_decay: f64,
    /// `‖v* − v‖` is clamped to this multiple of `‖v‖`.
    pub clamp_norm_factor: f64,
    /// Weight of the KL term on "{subject} is a" prompts.
    pub kl_factor: f64,
    /// Short model-generated prefixes the edit prompt is averaged over (0 = the prompt only).
    pub context_templates: usize,
    pub context_template_tokens: usize,
    /// Corpus sequences for the key covariance `C = E[k kᵀ]`.
    pub mom2_samples: usize,
    /// Use `C⁻¹` in the update (false: identity, the ROME ablation).
    pub mom2_adjustment: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemitHparams {
    /// The layers the update is spread over (the last one is where `v*` is optimised).
    pub layers: Vec<usize>,
    pub v_lr: f64,
    pub v_steps: usize,
    pub v_weight_decay: f64,
    pub clamp_norm_factor: f64,
    pub kl_factor: f64,
    /// λ: weight of the covariance against the new keys in the least squares.
    pub mom2_update_weight: f64,
    pub context_templates: usize,
    pub context_template_tokens: usize,
    pub mom2_samples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtHparams {
    pub layer: usize,
    /// Adam learning rate and steps.
    pub lr: f64,
    pub steps: usize,
    /// L∞ bound on each entry of the update.
    pub norm_constraint: f64,
}

/// The defaults for `method` on this model, as JSON (layers scaled when no entry matches).
pub fn defaults(method: Method, spec: &ModelSpec) -> Value {
    let table: toml::Table = toml::from_str(DEFAULTS).expect("defaults/hparams.toml parses");
    let key = match method {
        Method::Rome => "rome",
        Method::Memit => "memit",
        Method::FtL | Method::FtM => "ft",
    };
    let arch = spec.architecture.to_string();
    let by_arch = table
        .get(key)
        .and_then(|t| t.get(&arch))
        .and_then(|t| t.as_table())
        .cloned()
        .unwrap_or_default();
    let exact = by_arch.get(&spec.n_layers.to_string()).cloned();
    let mut v: Value = match exact.or_else(|| by_arch.get("default").cloned()) {
        Some(t) => serde_json::to_value(t).expect("toml converts to json"),
        None => json!({}),
    };
    let of = v
        .as_object_mut()
        .and_then(|o| o.remove("default_layers_of"))
        .and_then(|x| x.as_u64());
    if let (Some(of), Some(o)) = (of, v.as_object_mut()) {
        // Same relative depth on a model of another size.
        let scale = |l: u64| -> u64 {
            ((l as f64 * spec.n_layers as f64 / of as f64).round() as u64)
                .min(spec.n_layers.saturating_sub(1) as u64)
        };
        if let Some(l) = o.get("layer").and_then(Value::as_u64) {
            o.insert("layer".into(), json!(scale(l)));
        }
        if let Some(ls) = o.get("layers").and_then(Value::as_array) {
            let mut scaled: Vec<u64> = ls.iter().filter_map(Value::as_u64).map(scale).collect();
            scaled.dedup();
            o.insert("layers".into(), json!(scaled));
        }
    }
    v
}

/// Defaults merged with `overrides` (a JSON object of top-level fields), checked.
pub fn resolve(method: Method, spec: &ModelSpec, overrides: &Value) -> Result<Value, EditError> {
    let mut merged = defaults(method, spec);
    match overrides {
        Value::Null => {}
        Value::Object(o) => {
            let m = merged.as_object_mut().expect("defaults are an object");
            for (k, v) in o {
                if !m.contains_key(k) {
                    return Err(EditError::invalid(
                        format!("hparams.{k}"),
                        format!(
                            "is not a hyper-parameter of {method}; known: {}",
                            m.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                check_type(k, &m[k], v)?;
                m.insert(k.clone(), v.clone());
            }
        }
        _ => return Err(EditError::invalid("hparams", "must be a JSON object")),
    }
    match method {
        Method::Rome => check_rome(&parse::<RomeHparams>(&merged)?, spec)?,
        Method::Memit => check_memit(&parse::<MemitHparams>(&merged)?, spec)?,
        Method::FtL | Method::FtM => check_ft(&parse::<FtHparams>(&merged)?, spec)?,
    }
    Ok(merged)
}

/// An override must have the JSON type of the default it replaces.
fn check_type(field: &str, default: &Value, given: &Value) -> Result<(), EditError> {
    let ok = match default {
        Value::Bool(_) => given.is_boolean(),
        Value::Number(n) if n.is_u64() => given.is_u64(),
        Value::Number(_) => given.is_number(),
        Value::Array(_) => given
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_u64)),
        _ => true,
    };
    if ok {
        return Ok(());
    }
    let want = match default {
        Value::Bool(_) => "true or false",
        Value::Number(n) if n.is_u64() => "a non-negative integer",
        Value::Number(_) => "a number",
        Value::Array(_) => "an array of non-negative integers",
        _ => "a value",
    };
    Err(EditError::invalid(
        format!("hparams.{field}"),
        format!("must be {want}. Given: {given}"),
    ))
}

pub fn parse<T: DeserializeOwned>(v: &Value) -> Result<T, EditError> {
    T::deserialize(v).map_err(|e| {
        // serde names the field in its message ("invalid type: … for field `x`" is not always
        // given), so point at the first field whose type is wrong when we can find it.
        let field = v
            .as_object()
            .and_then(|o| {
                o.iter()
                    .find(|(k, _)| e.to_string().contains(&format!("`{k}`")))
                    .map(|(k, _)| format!("hparams.{k}"))
            })
            .unwrap_or_else(|| "hparams".into());
        EditError::invalid(field, e.to_string())
    })
}

fn range(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), EditError> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(EditError::invalid(
            format!("hparams.{field}"),
            format!("must be in [{lo}, {hi}]. Given: {v}"),
        ));
    }
    Ok(())
}

fn layer(field: &str, l: usize, spec: &ModelSpec) -> Result<(), EditError> {
    if l >= spec.n_layers {
        return Err(EditError::invalid(
            format!("hparams.{field}"),
            format!(
                "layer {l} does not exist; the model has layers 0..{}",
                spec.n_layers - 1
            ),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one range check per shared field, named at the call
fn common(
    v_lr: f64,
    v_steps: usize,
    wd: f64,
    clamp: f64,
    kl: f64,
    templates: usize,
    template_tokens: usize,
    samples: usize,
) -> Result<(), EditError> {
    range("v_lr", v_lr, 1e-6, 10.0)?;
    range("v_steps", v_steps as f64, 1.0, 200.0)?;
    range("v_weight_decay", wd, 0.0, 10.0)?;
    range("clamp_norm_factor", clamp, 1e-3, 100.0)?;
    range("kl_factor", kl, 0.0, 10.0)?;
    range("context_templates", templates as f64, 0.0, 50.0)?;
    range("context_template_tokens", template_tokens as f64, 1.0, 64.0)?;
    range("mom2_samples", samples as f64, 1.0, 1_000_000.0)?;
    Ok(())
}

fn check_rome(h: &RomeHparams, spec: &ModelSpec) -> Result<(), EditError> {
    layer("layer", h.layer, spec)?;
    common(
        h.v_lr,
        h.v_steps,
        h.v_weight_decay,
        h.clamp_norm_factor,
        h.kl_factor,
        h.context_templates,
        h.context_template_tokens,
        h.mom2_samples,
    )
}

fn check_memit(h: &MemitHparams, spec: &ModelSpec) -> Result<(), EditError> {
    if h.layers.is_empty() || h.layers.len() > spec.n_layers {
        return Err(EditError::invalid(
            "hparams.layers",
            "give 1 to n_layers distinct layers",
        ));
    }
    for (i, &l) in h.layers.iter().enumerate() {
        layer(&format!("layers[{i}]"), l, spec)?;
        if i > 0 && l <= h.layers[i - 1] {
            return Err(EditError::invalid(
                "hparams.layers",
                "must be strictly increasing",
            ));
        }
    }
    range("mom2_update_weight", h.mom2_update_weight, 0.0, 1e9)?;
    common(
        h.v_lr,
        h.v_steps,
        h.v_weight_decay,
        h.clamp_norm_factor,
        h.kl_factor,
        h.context_templates,
        h.context_template_tokens,
        h.mom2_samples,
    )
}

fn check_ft(h: &FtHparams, spec: &ModelSpec) -> Result<(), EditError> {
    layer("layer", h.layer, spec)?;
    range("lr", h.lr, 1e-8, 1.0)?;
    range("steps", h.steps as f64, 1.0, 500.0)?;
    range("norm_constraint", h.norm_constraint, 1e-8, 10.0)
}

/// JSON Schema of each method's hyper-parameters (for `GET /v1/methods`).
pub fn schema(method: Method) -> Value {
    let num = |d: &str, min: f64, max: f64| json!({"type": "number", "minimum": min, "maximum": max, "description": d});
    let int = |d: &str, min: u64, max: u64| json!({"type": "integer", "minimum": min, "maximum": max, "description": d});
    let mut p = Map::new();
    match method {
        Method::Rome | Method::Memit => {
            if method == Method::Rome {
                p.insert(
                    "layer".into(),
                    int("layer whose MLP down projection is edited", 0, 1023),
                );
                p.insert("mom2_adjustment".into(), json!({"type": "boolean", "description": "use the inverse key covariance (false: identity)"}));
            } else {
                p.insert("layers".into(), json!({"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "strictly increasing layers the update is spread over"}));
                p.insert(
                    "mom2_update_weight".into(),
                    num("λ: covariance weight in the least squares", 0.0, 1e9),
                );
            }
            p.insert("v_lr".into(), num("Adam learning rate for v*", 1e-6, 10.0));
            p.insert("v_steps".into(), int("Adam steps for v*", 1, 200));
            p.insert(
                "v_weight_decay".into(),
                num("weight decay on v* − v", 0.0, 10.0),
            );
            p.insert(
                "clamp_norm_factor".into(),
                num("‖v* − v‖ ≤ factor · ‖v‖", 1e-3, 100.0),
            );
            p.insert(
                "kl_factor".into(),
                num("weight of the KL term on '{subject} is a'", 0.0, 10.0),
            );
            p.insert(
                "context_templates".into(),
                int("generated prefixes the prompt is averaged over", 0, 50),
            );
            p.insert(
                "context_template_tokens".into(),
                int("tokens per generated prefix", 1, 64),
            );
            p.insert(
                "mom2_samples".into(),
                int("corpus sequences for the key covariance", 1, 1_000_000),
            );
        }
        Method::FtL | Method::FtM => {
            p.insert(
                "layer".into(),
                int("layer whose MLP down projection is tuned", 0, 1023),
            );
            p.insert("lr".into(), num("Adam learning rate", 1e-8, 1.0));
            p.insert("steps".into(), int("Adam steps", 1, 500));
            p.insert(
                "norm_constraint".into(),
                num("L∞ bound on each entry of the update", 1e-8, 10.0),
            );
        }
    }
    json!({"type": "object", "additionalProperties": false, "properties": p})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::Architecture;

    fn spec(n_layers: usize) -> ModelSpec {
        ModelSpec {
            architecture: Architecture::Llama,
            n_layers,
            hidden_size: 576,
            intermediate_size: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            context_length: 8192,
            parameters: 0,
        }
    }

    #[test]
    fn defaults_exist_for_every_method_and_scale_to_depth() {
        for m in Method::ALL {
            let v = resolve(m, &spec(30), &Value::Null).unwrap();
            assert!(v.is_object(), "{m}");
            let small = resolve(m, &spec(4), &Value::Null).unwrap();
            if let Some(l) = small.get("layer") {
                assert!(l.as_u64().unwrap() < 4);
            }
        }
        let memit = defaults(Method::Memit, &spec(30));
        assert_eq!(memit["layers"], json!([3, 4, 5, 6, 7]));
    }

    #[test]
    fn overrides_are_checked_and_name_the_field() {
        let s = spec(30);
        let e = resolve(Method::Rome, &s, &json!({"layer": 30})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.layer:"), "{e}");
        let e = resolve(Method::Rome, &s, &json!({"v_lr": -1.0})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.v_lr:"), "{e}");
        let e = resolve(Method::Rome, &s, &json!({"bogus": 1})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.bogus:"), "{e}");
        let e = resolve(Method::Memit, &s, &json!({"layers": [5, 4]})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.layers:"), "{e}");
        let e = resolve(Method::FtL, &s, &json!({"steps": "many"})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.steps:"), "{e}");
        let ok = resolve(Method::Rome, &s, &json!({"v_steps": 5})).unwrap();
        assert_eq!(ok["v_steps"], 5);
    }
}
