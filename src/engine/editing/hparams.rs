//! Hyper-parameters: defaults per method and architecture (from `defaults/hparams.toml`),
//! client overrides merged on top, each value checked against the range its method's type
//! declares (the same schema `GET /v1/methods` shows), then by the method's own checks.
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::{EditError, Method};
use crate::engine::model::ModelSpec;

const DEFAULTS: &str = include_str!("defaults/hparams.toml");

/// The defaults for `method` on this model, as JSON (layers scaled when no entry matches).
pub fn defaults(method: Method, spec: &ModelSpec) -> Value {
    let table: toml::Table = toml::from_str(DEFAULTS).expect("defaults/hparams.toml parses");
    let arch = spec.architecture.to_string();
    let by_arch = table
        .get(method.imp().defaults_table())
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
    method.imp().check_hparams(&merged, spec)?;
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

/// The JSON Schema of a hyper-parameter type as overrides see it: flattened parts (`allOf`)
/// merged into one object whose unknown fields are refused, and no field required (the
/// defaults fill in what a request leaves out).
pub fn schema_of<T: utoipa::ToSchema>() -> Value {
    let raw = serde_json::to_value(T::schema()).expect("a schema serialises");
    let mut properties = serde_json::Map::new();
    collect(&raw, &mut properties);
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
    })
}

fn collect(s: &Value, props: &mut serde_json::Map<String, Value>) {
    if let Some(parts) = s.get("allOf").and_then(Value::as_array) {
        for p in parts {
            collect(p, props);
        }
    }
    if let Some(p) = s.get("properties").and_then(Value::as_object) {
        props.extend(p.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

/// Checks every numeric field (and every number in an array field) of `v` against the
/// `minimum`/`maximum` its schema declares.
pub fn check_ranges(schema: &Value, v: &Value) -> Result<(), EditError> {
    let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) else {
        return Ok(());
    };
    for (field, s) in props {
        let Some(given) = obj.get(field) else {
            continue;
        };
        let bound = |k: &str| {
            s.get(k)
                .or_else(|| s.get("items").and_then(|i| i.get(k)))
                .and_then(Value::as_f64)
        };
        let (lo, hi) = (bound("minimum"), bound("maximum"));
        let numbers: Vec<f64> = match given {
            Value::Array(a) => a.iter().filter_map(Value::as_f64).collect(),
            x => x.as_f64().into_iter().collect(),
        };
        for x in numbers {
            let below = lo.is_some_and(|lo| x < lo);
            let above = hi.is_some_and(|hi| x > hi);
            if !x.is_finite() || below || above {
                let range = match (lo, hi) {
                    (Some(lo), Some(hi)) => format!("in [{lo}, {hi}]"),
                    (Some(lo), None) => format!("at least {lo}"),
                    (None, Some(hi)) => format!("at most {hi}"),
                    (None, None) => "finite".into(),
                };
                return Err(EditError::invalid(
                    format!("hparams.{field}"),
                    format!("must be {range}. Given: {x}"),
                ));
            }
        }
    }
    Ok(())
}

/// `layer` must be one of the model's.
pub fn check_layer(field: &str, l: usize, spec: &ModelSpec) -> Result<(), EditError> {
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

/// `layers` must be 1 to `n_layers` strictly increasing layers of the model.
pub fn check_layers(field: &str, layers: &[usize], spec: &ModelSpec) -> Result<(), EditError> {
    if layers.is_empty() || layers.len() > spec.n_layers {
        return Err(EditError::invalid(
            format!("hparams.{field}"),
            "give 1 to n_layers distinct layers",
        ));
    }
    for (i, &l) in layers.iter().enumerate() {
        check_layer(&format!("{field}[{i}]"), l, spec)?;
        if i > 0 && l <= layers[i - 1] {
            return Err(EditError::invalid(
                format!("hparams.{field}"),
                "must be strictly increasing",
            ));
        }
    }
    Ok(())
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

    fn m(name: &str) -> Method {
        name.parse().unwrap()
    }

    #[test]
    fn defaults_exist_for_every_method_and_scale_to_depth() {
        for method in Method::all() {
            let v = resolve(method, &spec(30), &Value::Null).unwrap();
            let schema = method.imp().hparams_schema();
            let props = schema["properties"].as_object().unwrap();
            // The defaults give exactly the fields the type declares.
            let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            let mut want: Vec<&String> = props.keys().collect();
            keys.sort();
            want.sort();
            assert_eq!(keys, want, "{method}");
            let small = resolve(method, &spec(4), &Value::Null).unwrap();
            if let Some(l) = small.get("layer") {
                assert!(l.as_u64().unwrap() < 4, "{method}: {small}");
            }
        }
        assert_eq!(
            defaults(m("memit"), &spec(30))["layers"],
            json!([3, 4, 5, 6, 7])
        );
        assert_eq!(defaults(m("rome"), &spec(30))["layer"], json!(4));
        assert_eq!(defaults(m("rome"), &spec(60))["layer"], json!(8));
    }

    #[test]
    fn schema_ranges_are_enforced_and_shown() {
        let schema = m("rome").imp().hparams_schema();
        assert_eq!(schema["properties"]["v_steps"]["minimum"], json!(1));
        assert_eq!(schema["properties"]["v_steps"]["maximum"], json!(200));
        assert_eq!(schema["additionalProperties"], json!(false));
        let s = spec(30);
        let e = resolve(m("rome"), &s, &json!({"v_steps": 201})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hparams.v_steps: must be in [1, 200]. Given: 201"
        );
        let e = resolve(m("memit"), &s, &json!({"mom2_update_weight": -1.0})).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hparams.mom2_update_weight: must be in [0, "),
            "{e}"
        );
    }

    #[test]
    fn overrides_are_checked_and_name_the_field() {
        let s = spec(30);
        let e = resolve(m("rome"), &s, &json!({"layer": 30})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.layer:"), "{e}");
        let e = resolve(m("rome"), &s, &json!({"v_lr": -1.0})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.v_lr:"), "{e}");
        let e = resolve(m("rome"), &s, &json!({"bogus": 1})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.bogus:"), "{e}");
        let e = resolve(m("memit"), &s, &json!({"layers": [5, 4]})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.layers:"), "{e}");
        let e = resolve(m("ft-l"), &s, &json!({"steps": "many"})).unwrap_err();
        assert!(e.to_string().starts_with("hparams.steps:"), "{e}");
        let ok = resolve(m("rome"), &s, &json!({"v_steps": 5})).unwrap();
        assert_eq!(ok["v_steps"], 5);
    }
}
