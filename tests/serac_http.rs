//! SERAC end to end over real HTTP on the default model: an edit before any training is a 409;
//! a scope classifier trains as a job; an edit (CounterFact record 0: Danielle Darrieux's
//! mother tongue, French → English) lands as memory state. In scope, every
//! inference path reads the edit (log-likelihood, `/v1/completions` with echo, generation);
//! out of scope, logits are the base model's bit for bit; restart, fork and rollback are exact.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::http::send;
use common::server::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn post(base: &str, path: &str, body: Value) -> (StatusCode, Value) {
    send(base, None, Method::POST, path, Some(body)).await
}

async fn get(base: &str, path: &str) -> (StatusCode, Value) {
    send(base, None, Method::GET, path, None).await
}

fn start(dir: &Path) -> ChildServer {
    let data = common::shared_dir().join("data");
    let editors = dir.join("editors");
    ChildServer::start_with_env(
        dir,
        None,
        &[
            ("EMEND_DATA_DIR", data.as_path()),
            ("EMEND_EDITORS_DIR", editors.as_path()),
        ],
    )
}

const IN_SCOPE: &str = "The mother tongue of Danielle Darrieux is";

/// Log-probs of ` English` after the edit's prompt, of ` Tokyo` after an unrelated prompt and
/// of ` French` after CounterFact's neighbourhood prompt (another French speaker), each
/// request alone (batch company moves float sums in the last bits).
async fn probe(url: &str, sid: &str, version: Option<u64>) -> Vec<f64> {
    let mut out = Vec::new();
    for (context, continuation) in [
        (IN_SCOPE, " English"),
        ("The capital of Japan is", " Tokyo"),
        ("Michel Rocard is a native speaker of", " French"),
    ] {
        let mut body = json!({"requests": [{"context": context, "continuation": continuation}]});
        if let Some(v) = version {
            body["version"] = json!(v);
        }
        let (s, v) = post(url, &format!("/v1/sessions/{sid}/loglikelihood"), body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        out.push(v["results"][0]["logprob"].as_f64().unwrap());
    }
    out
}

async fn train(url: &str) -> String {
    let body = json!({"method": "serac", "steps": 60, "accumulate": 5, "val_every": 30,
                      "val_records": 20, "rank": 64, "seed": 7});
    let (s, t) = post(url, "/v1/trainings", body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    loop {
        let (s, t) = get(url, &format!("/v1/trainings/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{t}");
        if t["status"] == "succeeded" {
            let v = t["validation"].as_array().unwrap();
            assert_eq!(v.len(), 2, "{t}");
            // 20 held-back edits in memory (measured: 0.65 → 0.90).
            assert!(v[1]["locality"].as_f64().unwrap() >= 0.8, "{t}");
            return t["artefact"].as_str().unwrap().to_string();
        }
        assert!(
            t["status"] != "failed" && t0.elapsed() < Duration::from_secs(600),
            "{t}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn serac_routes_every_path_and_rolls_back_exactly() {
    let dir = temp_dir("serac");
    let server = start(&dir);
    let url = server.url.clone();
    let (s, v) = post(&url, "/v1/sessions", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let sid = v["id"].as_str().unwrap().to_string();
    let edits = format!("/v1/sessions/{sid}/edits");
    let edit = json!({"method": "serac", "edits": [{"dataset": "counterfact", "id": 0}]});
    let (s, v) = post(&url, &edits, edit.clone()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("emend train"), "{v}");

    let artefact = train(&url).await;
    assert!(artefact.starts_with("serac-"), "{artefact}");
    let base = probe(&url, &sid, None).await;
    let (s, v) = post(&url, &edits, edit).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let d = &v["versions"][0]["diagnostics"];
    assert_eq!(d["artefact"], artefact.as_str(), "{v}");
    assert!(d["self_logit"][0].as_f64().unwrap() > 0.0, "{v}");
    let edited = probe(&url, &sid, None).await;
    assert!(
        edited[0] > base[0] + 2.0,
        "in scope reads the edit: {base:?} {edited:?}"
    );
    assert_eq!(
        edited[1..],
        base[1..],
        "out of scope is the base model bit for bit"
    );

    // /v1/completions with echo scores the same conditioned sequence.
    let (s, c) = post(
        &url,
        "/v1/completions",
        json!({"model": format!("session:{sid}"),
        "prompt": format!("{IN_SCOPE} English"), "max_tokens": 0, "logprobs": 1, "echo": true,
        "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let lp = c["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    let last = lp.last().unwrap().as_f64().unwrap();
    assert!((last - edited[0]).abs() < 1e-3, "{last} vs {}", edited[0]);
    // Generation reads it too, and not out of scope.
    let generate = format!("/v1/sessions/{sid}/generate");
    let (s, g) = post(
        &url,
        &generate,
        json!({"prompt": IN_SCOPE, "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{g}");
    assert!(g["text"].as_str().unwrap().contains("English"), "{g}");

    // Fork, restart and rollback are exact.
    let (s, f) = post(
        &url,
        "/v1/sessions",
        json!({"name": "fork", "from": {"session": sid, "version": 1}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{f}");
    let fork = f["id"].as_str().unwrap().to_string();
    assert_eq!(
        probe(&url, &fork, None).await,
        edited,
        "the fork serves the edit"
    );
    server.kill9();
    let server = start(&dir);
    let url = server.url.clone();
    assert_eq!(probe(&url, &sid, None).await, edited, "restart is exact");
    let (s, v) = post(
        &url,
        &format!("/v1/sessions/{sid}/rollback"),
        json!({"version": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(probe(&url, &sid, None).await, base, "rollback is exact");
    assert_eq!(
        probe(&url, &fork, None).await,
        edited,
        "the fork keeps its memory"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}
