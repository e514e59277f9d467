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
