//! An edit log written in delta format version 1 (by the code before deltas were keyed by
//! weight; see tests/fixtures/log-v1/README.md) restores with the current code and serves the
//! same answers that server gave at each version; new edits on top are written in the current
//! format and restore as well.
mod common;

use common::server::*;
use emend::config::Config;
use reqwest::Client;
use serde_json::{json, Value};

const SESSION: &str = "dac50a58-22e1-458b-b022-b24c815ed0b9";

async fn call(base: &str, path: &str, body: Option<Value>) -> Value {
    let c = Client::new();
    let r = match body {
        Some(b) => c.post(format!("{base}{path}")).json(&b),
        None => c.get(format!("{base}{path}")),
    };
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

async fn greedy(base: &str, prompt: &str) -> (u64, String) {
    let v = call(
        base,
        &format!("/v1/sessions/{SESSION}/generate"),
        Some(json!({"prompt": prompt, "max_tokens": 3})),
    )
    .await;
    (
        v["version"].as_u64().unwrap(),
        v["text"].as_str().unwrap().to_string(),
    )
}

const EIFFEL: &str = "The Eiffel Tower is located in the city of";
const LOUVRE: &str = "The Louvre is located in the city of";

#[tokio::test]
async fn a_version_1_log_restores_and_serves_what_it_served() {
    let state = temp_dir("log-v1");
    std::fs::copy(
        common::fixtures_dir().join("log-v1/emend.db"),
        state.join("emend.db"),
    )
    .unwrap();
    let cfg = Config {
        state_dir: state.clone(),
        data_dir: Some(common::shared_dir().join("data")),
        ..Config::default()
    };
    let base = spawn_in_process(cfg);
    let s = call(&base, &format!("/v1/sessions/{SESSION}"), None).await;
    assert_eq!(
        (s["version"].as_u64(), s["edit_count"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(greedy(&base, EIFFEL).await, (1, " Rome, Italy".into()));
    assert_eq!(greedy(&base, LOUVRE).await, (1, " Paris, France".into()));
    let path = format!("/v1/sessions/{SESSION}/rollback");
    call(&base, &path, Some(json!({"version": 2}))).await;
    assert_eq!(greedy(&base, EIFFEL).await, (2, " Rome, Italy".into()));
    assert_eq!(greedy(&base, LOUVRE).await, (2, " London, and".into()));

    // A new edit on the restored chain gets the next version and is stored in format 2.
    let edit = call(
        &base,
        &format!("/v1/sessions/{SESSION}/edits"),
        Some(json!({
            "method": "ft-m",
            "hparams": {"steps": 3},
            "edits": [{"prompt": "The Colosseum is located in the city of",
                       "subject": "The Colosseum", "target_new": "Madrid"}],
        })),
    )
    .await;
    assert_eq!(edit["version"], 3);
    let after = greedy(&base, "The Colosseum is located in the city of").await;
    let restored = spawn_in_process(Config {
        state_dir: state,
        data_dir: Some(common::shared_dir().join("data")),
        ..Config::default()
    });
    assert_eq!(
        greedy(&restored, "The Colosseum is located in the city of").await,
        after
    );
    assert_eq!(greedy(&restored, LOUVRE).await, (3, " London, and".into()));
}
