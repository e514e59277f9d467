//! The damage guard over real HTTP on the default model: canary readings stored with their
//! edits, a `guard` session refusing the edit that breaks its budget (409 with the reading,
//! nothing stored, the version and its logits unchanged), the setting and the history across a
//! kill -9 restart, readings equal to an evaluation job of the same probe, the damage curve, the
//! metrics, and 422s naming the bad budget field. FT-L with a high learning rate makes damage
//! that a 4-document probe sees within one edit.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::http::{probe_logprobs, send};
use common::server::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn post(base: &str, path: &str, body: Value) -> (StatusCode, Value) {
    send(base, None, Method::POST, path, Some(body)).await
}

async fn put(base: &str, path: &str, body: Value) -> (StatusCode, Value) {
    send(base, None, Method::PUT, path, Some(body)).await
}

async fn get(base: &str, path: &str) -> (StatusCode, Value) {
    send(base, None, Method::GET, path, None).await
}

/// A damaging FT-L edit of a CounterFact record.
fn ft_l(record: u64) -> Value {
    json!({"method": "ft-l", "edits": [{"dataset": "counterfact", "id": record}],
           "hparams": {"lr": 0.005, "steps": 5, "norm_constraint": 10.0}})
}

fn ratio(reading: &Value) -> f64 {
    reading["drift"]["perplexity_ratio"].as_f64().unwrap()
}

fn start(dir: &Path, canary_file: &Path) -> ChildServer {
    let data = common::shared_dir().join("data");
    ChildServer::start_with_env(
        dir,
        None,
        &[
            ("EMEND_DATA_DIR", data.as_path()),
            ("EMEND_CANARY_FILE", canary_file),
        ],
    )
}

#[tokio::test]
async fn the_guard_refuses_the_edit_over_budget_and_keeps_everything_else() {
    let dir = temp_dir("canary");
    let canary_file = dir.join("canary.json");
    std::fs::write(
        &canary_file,
        r#"{"name": "test-canary", "tasks": [{"task": "lambada_openai", "limit": 4}],
            "neighbours": {"count": 4}}"#,
    )
    .unwrap();
    let server = start(&dir, &canary_file);
    let url = server.url.clone();

    // Bad settings name their field and create nothing.
    for (bad, field) in [
        (
            json!({"mode": "guard", "budget": {"perplexity_ratio": 0.5}}),
            "canary.budget.perplexity_ratio",
        ),
        (
            json!({"mode": "guard", "budget": {"accuracy_drop": -1}}),
            "canary.budget.accuracy_drop",
        ),
        (
            json!({"mode": "guard", "budget": {"neighbour_flips": -2}}),
            "canary.budget.neighbour_flips",
        ),
        (
            json!({"mode": "guard", "budget": {"neighbour_flips": 2_147_483_648u64}}),
            "canary.budget.neighbour_flips",
        ),
        (
            json!({"mode": "guard", "budget": {"ppl": 1.1}}),
            "canary.budget.ppl",
        ),
        (json!({"mode": "always"}), "canary.mode"),
        (json!({"mode": "guard", "limits": {}}), "canary.limits"),
    ] {
        let (s, v) = post(&url, "/v1/sessions", json!({"canary": bad})).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .starts_with(&format!("`{field}`")),
            "{v}"
        );
    }
    let (_, list) = get(&url, "/v1/sessions").await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 0, "{list}");

    // A generous guard accepts two edits; each version's reading comes back and is stored.
    let (s, v) = post(
        &url,
        "/v1/sessions",
        json!({"canary": {"mode": "guard", "budget": {"perplexity_ratio": 1000}}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let edits = format!("/v1/sessions/{id}/edits");
    let (s, v1) = post(&url, &edits, ft_l(0)).await;
    assert_eq!(s, StatusCode::CREATED, "{v1}");
    let r1 = v1["versions"][0]["canary"].clone();
    assert!(
        r1["set"].as_str().unwrap().starts_with("test-canary@"),
        "{r1}"
    );
    // A neighbour is checked where its base answer re-tokenises to its own greedy path (3 of
    // these 4 on the default model).
    assert!(r1["neighbours"].as_u64().unwrap() >= 3, "{r1}");
    assert!(r1["breaches"].as_array().unwrap().is_empty(), "{r1}");
    let at_v1 = probe_logprobs(&url, &id, None).await;
    let (s, v2) = post(&url, &edits, ft_l(1)).await;
    assert_eq!(s, StatusCode::CREATED, "{v2}");
    let r2 = v2["versions"][0]["canary"].clone();
    assert!(
        ratio(&r2) > 1.001,
        "FT-L at lr 0.005 raises LAMBADA's perplexity: {r2}"
    );

    // The reading at version 1 is what an evaluation job of the same probe gives, digit for digit.
    let (s, job) = post(
        &url,
        "/v1/evaluations",
        json!({"session": id, "version": 1, "tasks": ["lambada_openai"], "limit": 4}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{job}");
    let job_id = job["id"].as_str().unwrap();
    let t0 = Instant::now();
    let done = loop {
        let (_, j) = get(&url, &format!("/v1/evaluations/{job_id}")).await;
        if j["status"] == "succeeded" {
            break j;
        }
        assert!(
            j["status"] != "failed" && t0.elapsed() < Duration::from_secs(300),
            "{j}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for metric in ["acc", "perplexity"] {
        assert_eq!(
            done["results"]["lambada_openai"][metric],
            r1["scores"][format!("lambada_openai.{metric}")],
            "{metric}: {done} vs {r1}"
        );
    }

    // Back at version 1, a budget just under version 2's ratio refuses the same edit again.
    let (s, v) = post(
        &url,
        &format!("/v1/sessions/{id}/rollback"),
        json!({"version": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let limit = ratio(&r2) - 1e-9;
    let (s, v) = put(
        &url,
        &format!("/v1/sessions/{id}/canary"),
        json!({"mode": "guard", "budget": {"perplexity_ratio": limit}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["canary"]["budget"]["perplexity_ratio"],
        json!(limit),
        "{v}"
    );
    let (_, history_before) = get(&url, &edits).await;
    let (s, p) = post(&url, &edits, ft_l(1)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{p}");
    assert_eq!(p["code"], "conflict");
    let b = &p["canary"]["breaches"][0];
    assert_eq!(b["limit"], "perplexity_ratio", "{p}");
    assert_eq!(b["allowed"], json!(limit));
    assert_eq!(
        ratio(&p["canary"]),
        ratio(&r2),
        "the refused edit measures as it did before: {p}"
    );
    let (_, session) = get(&url, &format!("/v1/sessions/{id}")).await;
    assert_eq!(session["version"], 1, "{session}");
    let (_, history_after) = get(&url, &edits).await;
    assert_eq!(
        history_after, history_before,
        "nothing of the refused edit is stored"
    );
    assert_eq!(
        probe_logprobs(&url, &id, None).await,
        at_v1,
        "the session scores as version 1, bit for bit"
    );
    let (_, metrics) = get(&url, "/metrics").await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains("emend_edits_rejected_total{reason=\"perplexity_ratio\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("emend_canary_seconds_count 3"),
        "{metrics}"
    );

    // The damage curve: the base model, then versions 1 and 2 with their readings.
    let (s, curve) = get(&url, &format!("/v1/sessions/{id}/damage")).await;
    assert_eq!(s, StatusCode::OK, "{curve}");
    let versions: Vec<u64> = curve["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(curve["points"][1]["reading"], r2);
    assert_eq!(curve["current_path"], json!([1]));
    assert!(
        curve["base"]["scores"]["lambada_openai.perplexity"]
            .as_f64()
            .unwrap()
            > 1.0,
        "{curve}"
    );
    let (s, csv) = get(&url, &format!("/v1/sessions/{id}/damage?format=csv")).await;
    assert_eq!(s, StatusCode::OK);
    let csv = csv.as_str().unwrap().to_string();
    assert_eq!(csv.lines().count(), 4, "header, base, two versions: {csv}");
    assert!(
        csv.lines().nth(3).unwrap().starts_with("2,1,2,ft-l,false,"),
        "{csv}"
    );

    // After kill -9 the setting, the readings and the refusal hold.
    server.kill9();
    let server = start(&dir, &canary_file);
    let url = server.url.clone();
    let (_, canary) = get(&url, &format!("/v1/sessions/{id}/canary")).await;
    assert_eq!(
        canary["budget"]["perplexity_ratio"],
        json!(limit),
        "{canary}"
    );
    assert_eq!(get(&url, &edits).await.1, history_before);
    let (_, v) = get(&url, &format!("/v1/sessions/{id}/edits/2")).await;
    assert_eq!(v["canary"], r2);
    let (s, p) = post(&url, &edits, ft_l(1)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{p}");
    assert_eq!(probe_logprobs(&url, &id, None).await, at_v1);

    // A sweep reads the canary at its checkpoints, beside its tasks: no drift at 0 edits.
    let (s, sw) = post(
        &url,
        "/v1/sweeps",
        json!({"method": "ft-m", "dataset": "counterfact",
        "n_edits": 1, "checkpoints": [0, 1], "tasks": ["lambada_openai"], "limit": 2,
        "hparams": {"steps": 2}, "canary": true}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{sw}");
    let sweep = sw["id"].as_str().unwrap();
    let t0 = Instant::now();
    let done = loop {
        let (_, j) = get(&url, &format!("/v1/sweeps/{sweep}")).await;
        if j["status"] == "succeeded" {
            break j;
        }
        assert!(
            j["status"] != "failed" && t0.elapsed() < Duration::from_secs(300),
            "{j}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let base = &done["curve"][0]["tasks"]["canary"];
    assert_eq!(base["perplexity_ratio"], 1.0, "{done}");
    assert_eq!(base["accuracy_drop"], 0.0);
    assert_eq!(base["neighbour_flips"], 0.0);
    assert_eq!(
        base["acc"], curve["base"]["scores"]["pooled.acc"],
        "{curve}"
    );
    assert!(
        done["curve"][1]["tasks"]["canary"]["perplexity_ratio"].is_number(),
        "{done}"
    );
}
