//! JSON over HTTP for tests: a request with an optional bearer key; the body back as JSON, or
//! as a JSON string when it is not JSON (CSV, SVG, metrics).
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;

pub async fn send(
    base: &str,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = Client::new().request(method, format!("{base}{path}"));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Log-likelihoods of two probe facts ("The Eiffel Tower is located in the city of" → Paris,
/// "The capital of Japan is" → Tokyo) on a session's version (`None`: its current one).
pub async fn probe_logprobs(base: &str, id: &str, version: Option<u64>) -> Vec<f64> {
    let mut body = serde_json::json!({"requests": [
        {"context": "The Eiffel Tower is located in the city of", "continuation": " Paris"},
        {"context": "The capital of Japan is", "continuation": " Tokyo"},
    ]});
    if let Some(v) = version {
        body["version"] = serde_json::json!(v);
    }
    let path = format!("/v1/sessions/{id}/loglikelihood");
    let (s, v) = send(base, None, Method::POST, &path, Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["logprob"].as_f64().unwrap())
        .collect()
}
