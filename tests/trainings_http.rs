//! MEND end to end over real HTTP on the default model: an edit before any training is a 409
//! that says how to train; bad training configurations are 422s naming the field; a training
//! job killed with -9 after its first checkpoint resumes on restart and ends with the same
//! artefact (same bytes, same id) as an uninterrupted `emend train` of the same configuration; the artefact is
//! listed with its provenance; a MEND edit lands as a version whose logits survive a restart
//! bit for bit and roll back exactly; an unknown artefact is a 422 naming `hparams.artefact`.
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

async fn get(base: &str, path: &str) -> (StatusCode, Value) {
    send(base, None, Method::GET, path, None).await
}

/// Small enough for a test (rank 8, 20 steps), with a checkpoint at step 10.
fn config() -> Value {
    json!({"steps": 20, "accumulate": 5, "val_every": 10, "val_records": 2, "rank": 8,
           "lr": 1e-3, "edit_lr": 1e-3, "seed": 7})
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

async fn wait_for(url: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let (s, t) = get(url, &format!("/v1/trainings/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{t}");
        if done(&t) {
            return t;
        }
        assert!(
            t["status"] != "failed" && t0.elapsed() < Duration::from_secs(600),
            "{t}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The same configuration trained without interruption by `emend train` (a process of its
/// own, like the server, so that both pick the same BLAS kernels): its artefact id.
fn uninterrupted_id(dir: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_emend"))
        .args([
            "train",
            "--run",
            "uninterrupted",
            "--config",
            &config().to_string(),
        ])
        .arg("--editors-dir")
        .arg(dir.join("cli-editors"))
        .arg("--data-dir")
        .arg(common::shared_dir().join("data"))
        .env("EMEND_MODEL", common::default_model_path())
        .env("EMEND_CACHE_DIR", dir.join("cli-cache"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn mend_trains_as_a_resumable_job_and_edits_exactly() {
    let dir = temp_dir("trainings");
    let server = start(&dir);
    let url = server.url.clone();

    // No artefact yet: a MEND edit is a conflict that says how to train one.
    let (s, v) = post(&url, "/v1/sessions", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let sid = v["id"].as_str().unwrap().to_string();
    let edits = format!("/v1/sessions/{sid}/edits");
    let mend_edit = json!({"method": "mend", "edits": [{"dataset": "counterfact", "id": 0}]});
    let (s, v) = post(&url, &edits, mend_edit.clone()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("emend train"), "{v}");

    // Bad configurations name their field and queue nothing.
    for (body, field) in [
        (json!({"steps": 0}), "steps"),
        (json!({"accumulate": 5, "val_every": 7}), "val_every"),
        (json!({"layers": [29, 40]}), "layers"),
        (json!({"method": "serac-x"}), "method"),
        (json!({"val_records": 5000}), "val_records"),
    ] {
        let (s, v) = post(&url, "/v1/trainings", body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .starts_with(&format!("`{field}`")),
            "{body}: {v}"
        );
    }
    let (s, v) = post(&url, "/v1/trainings", json!({"bogus": 1})).await;
    assert!(s.is_client_error(), "{v}");
    let (_, list) = get(&url, "/v1/trainings").await;
    assert_eq!(list["total"], 0, "{list}");

    // Train; kill -9 after the first checkpoint; the restarted server resumes and finishes.
    let (s, t) = post(&url, "/v1/trainings", config()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let tid = t["id"].as_str().unwrap().to_string();
    let t = wait_for(&url, &tid, |t| {
        t["progress"]["done"].as_u64().unwrap() >= 12
    })
    .await;
    assert_eq!(t["validation"].as_array().unwrap().len(), 1, "{t}");
    server.kill9();
    let server = start(&dir);
    let url = server.url.clone();
    let t = wait_for(&url, &tid, |t| t["status"] == "succeeded").await;
    assert_eq!(t["attempts"], 2, "{t}");
    let v = t["validation"].as_array().unwrap();
    assert_eq!(v.len(), 2, "{t}");
    assert_eq!(v[1]["step"], 20, "{t}");
    let artefact = t["artefact"].as_str().unwrap().to_string();
    assert!(artefact.starts_with("mend-"), "{t}");
    // The restarted server trained steps 11–20 and exports the last validation.
    let (_, metrics) = get(&url, "/metrics").await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains("emend_training_steps_total 10"),
        "{metrics}"
    );
    let exported: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("emend_training_validation{metric=\"locality\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (exported - v[1]["locality"].as_f64().unwrap()).abs() < 1e-9,
        "{metrics}"
    );
    assert!(
        metrics.contains("emend_jobs{kind=\"training\",status=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        artefact,
        uninterrupted_id(&dir),
        "the resumed run's artefact is the uninterrupted run's, byte for byte"
    );

    // The artefact with its provenance.
    let (s, list) = get(&url, "/v1/artefacts").await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let p = &list["artefacts"][0];
    assert_eq!(p["id"], artefact.as_str(), "{list}");
    assert_eq!(p["data_file"], "zsre/zsre_mend_train-1k.json", "{p}");
    assert_eq!(p["data_sha256"].as_str().unwrap().len(), 64, "{p}");
    assert_eq!(p["net"]["layers"], json!([27, 28, 29]), "{p}");
    assert_eq!(p["steps"], 20, "{p}");
    let (s, _) = get(&url, &format!("/v1/artefacts/{artefact}")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get(&url, "/v1/artefacts/mend-0000").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A MEND edit (the newest artefact) is a version; restart and rollback are exact.
    let base = probe_logprobs(&url, &sid, None).await;
    let (s, v) = post(&url, &edits, mend_edit).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["versions"][0]["diagnostics"]["artefact"],
        artefact.as_str(),
        "{v}"
    );
    let edited = probe_logprobs(&url, &sid, None).await;
    assert_ne!(edited, base, "the edit changes the model");
    let (s, v) = post(
        &url,
        &edits,
        json!({"method": "mend", "edits": [{"dataset": "counterfact", "id": 1}],
               "hparams": {"artefact": "mend-doesnotexist"}}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .starts_with("`hparams.artefact`"),
        "{v}"
    );
    server.kill9();
    let server = start(&dir);
    let url = server.url.clone();
    assert_eq!(
        probe_logprobs(&url, &sid, None).await,
        edited,
        "restart is exact"
    );
    let (s, v) = post(
        &url,
        &format!("/v1/sessions/{sid}/rollback"),
        json!({"version": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        probe_logprobs(&url, &sid, None).await,
        base,
        "rollback is exact"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}
