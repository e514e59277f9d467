//! Evaluation jobs over real HTTP on the default model: a job's scores equal an in-process
//! evaluation, a job runs on the session version pinned at submit, cancel, 422s that name the
//! field and create nothing, kill -9 mid-job and resume. Also the engine backend itself: the
//! same numbers as the in-process backend over the same edited model. Model work stays small
//! (limit ≤ 5).
mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::server::*;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use emend::engine::editing::EditingEnv;
use emend::engine::eval::request::GenRequest;
use emend::engine::eval::{evaluate, prepare_task, EvalOptions, LmBackend, ModelBackend, Request};
use emend::engine::model::{LoadOptions, LoadedModel, ModelSource};
use emend::engine::overlay::{Delta, Edited, Overlay};
use emend::engine::worker::{Engine, EngineLimits, EngineMetrics, ModelView};
use emend::jobs::EngineBackend;

fn data_dir() -> std::path::PathBuf {
    common::shared_dir().join("data")
}

fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let mut cfg = keys_config(&temp_dir("evals"));
        cfg.data_dir = Some(data_dir());
        spawn_in_process(cfg)
    })
}

async fn send(
    base: &str,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(key);
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

async fn post(base: &str, key: &str, path: &str, body: Value) -> (StatusCode, Value) {
    send(base, key, reqwest::Method::POST, path, Some(body)).await
}

async fn get(base: &str, key: &str, path: &str) -> (StatusCode, Value) {
    send(base, key, reqwest::Method::GET, path, None).await
}

/// A GET whose body is not JSON (CSV, SVG, PNG).
async fn get_raw(base: &str, key: &str, path: &str) -> reqwest::Response {
    Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn delete(base: &str, key: &str, path: &str) -> (StatusCode, Value) {
    send(base, key, reqwest::Method::DELETE, path, None).await
}

async fn new_session(base: &str, key: &str) -> String {
    let (s, v) = post(base, key, "/v1/sessions", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn submit(base: &str, key: &str, body: Value) -> Value {
    let (s, v) = post(base, key, "/v1/evaluations", body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v
}

/// Polls the job until `done` says so (or panics after `secs`).
async fn wait_for(
    base: &str,
    key: &str,
    id: &str,
    secs: u64,
    every: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let (s, v) = get(base, key, &format!("/v1/evaluations/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "job {id} timed out: {v}"
        );
        tokio::time::sleep(every).await;
    }
}

fn terminal(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

async fn finish(base: &str, key: &str, id: &str) -> Value {
    wait_for(base, key, id, 900, Duration::from_millis(200), terminal).await
}

fn assert_field_problem(s: StatusCode, v: &Value, field: &str) {
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {v}");
    assert_eq!(v["code"], "invalid_field", "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!("`{field}`")),
        "expected the detail to name `{field}`: {detail}"
    );
}

#[test]
fn the_engine_backend_gives_the_in_process_numbers_on_an_edited_model() {
    let local = common::default_model();
    let spec = local.model.spec().clone();
    // A rank-one delta large enough to move every score.
    let dev = local.model.device();
    let u =
        (candle_core::Tensor::randn(0f32, 1.0, (spec.hidden_size, 1), dev).unwrap() * 0.1).unwrap();
    let v = (candle_core::Tensor::randn(0f32, 1.0, (spec.intermediate_size, 1), dev).unwrap()
        * 0.1)
        .unwrap();
    let overlay = Overlay::push(
        &Overlay::base(),
        vec![Delta::LowRank {
            weight: emend::engine::model::WeightId::mlp_down(4),
            u,
            v,
        }],
    );
    let edited = Edited::new(
        local.model.as_ref(),
        Arc::new(overlay.prepare(local.model.as_ref()).unwrap()),
    );

    let owned = LoadedModel::load(
        &ModelSource::from_path(&common::default_model_path()).unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let metrics = EngineMetrics::new();
    let engine = Engine::start(
        owned,
        EngineLimits::default(),
        metrics.clone(),
        EditingEnv {
            stats_dir: temp_dir("evals-stats"),
            editors_dir: temp_dir("evals-editors"),
            data_dir: None,
        },
    );
    let view = ModelView::new("s", 1, overlay);
    let mut remote = EngineBackend::new(engine, view, Duration::from_secs(60));
    let mut inproc = ModelBackend::new(&edited, &local.tokenizer);

    let tasks = vec!["arc_easy".to_string(), "lambada_openai".to_string()];
    let opts = EvalOptions {
        limit: Some(3),
        ..Default::default()
    };
    let dir = data_dir();
    let a = evaluate(&tasks, &opts, &dir, &mut remote, &mut |_, _| true).unwrap();
    let b = evaluate(&tasks, &opts, &dir, &mut inproc, &mut |_, _| true).unwrap();
    assert_eq!(
        serde_json::to_value(&a.results).unwrap(),
        serde_json::to_value(&b.results).unwrap()
    );
    let mut base = ModelBackend::new(local.model.as_ref(), &local.tokenizer);
    let c = evaluate(&tasks, &opts, &dir, &mut base, &mut |_, _| true).unwrap();
    let ppl = |r: &emend::engine::eval::Results| r.results["lambada_openai"].metrics["perplexity"];
    assert_ne!(ppl(&a), ppl(&c), "the delta is applied");

    let text = vec!["The quick brown fox jumps over the lazy dog. ".repeat(4)];
    assert_eq!(
        remote.loglikelihood_rolling(&text).unwrap(),
        inproc.loglikelihood_rolling(&text).unwrap()
    );
    let gen = vec![GenRequest {
        context: "The capital of France is".into(),
        until: vec!["\n".into()],
        max_gen_toks: 8,
    }];
    assert_eq!(
        remote.generate_until(&gen).unwrap(),
        inproc.generate_until(&gen).unwrap()
    );
    let counted = metrics
        .eval_requests_total
        .with_label_values(&["loglikelihood"])
        .get();
    assert_eq!(counted as usize, a.requests.unique);
}

#[tokio::test]
async fn a_job_on_the_base_model_scores_what_the_in_process_evaluation_does() {
    let base = server();
    let sid = new_session(base, ALICE).await;
    let (s, v) = post(
        base,
        ALICE,
        "/v1/evaluations",
        json!({"session": sid, "tasks": ["arc_easy", "piqa"], "limit": 5}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["kind"], "evaluation");
    assert_eq!(v["version"], 0, "pinned to the current version");
    assert!(v["progress"]["total"].as_u64().unwrap() > 0, "{v}");
    let job = finish(base, ALICE, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["done"], job["progress"]["total"]);
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    assert_eq!(job["attempts"], 1);
    let order: Vec<&str> = job["finished_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["arc_easy", "piqa"]);

    let m = common::default_model();
    let mut backend = ModelBackend::new(m.model.as_ref(), &m.tokenizer);
    let opts = EvalOptions {
        limit: Some(5),
        ..Default::default()
    };
    let tasks = vec!["arc_easy".to_string(), "piqa".to_string()];
    let want = evaluate(&tasks, &opts, &data_dir(), &mut backend, &mut |_, _| true).unwrap();
    for t in &tasks {
        let got = &job["results"][t];
        let w = serde_json::to_value(&want.results[t]).unwrap();
        for metric in ["acc", "acc_norm", "acc_stderr"] {
            assert_eq!(got[metric], w[metric], "{t} {metric}: {got}");
        }
        assert_eq!(
            got["meta"], w["meta"],
            "{t}: task version, data sha256, few-shot, limit"
        );
        assert_eq!(got["meta"]["limit"], 5);
        assert!(got["meta"]["data_files"][0]["sha256"].is_string());
    }

    // listed for its tenant (without results), invisible to another
    let (s, list) = get(base, ALICE, "/v1/evaluations?limit=1000").await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let mine = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id.as_str())
        .expect("listed");
    assert!(mine.get("results").is_none());
    assert_eq!(mine["status"], "succeeded");
    let (s, _) = get(base, BOB, &format!("/v1/evaluations/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, bobs) = get(base, BOB, "/v1/evaluations").await;
    assert!(!bobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));
    // a finished job cannot be cancelled
    let (s, v) = delete(base, ALICE, &format!("/v1/evaluations/{id}")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    let (_, metrics) = get(base, ALICE, "/metrics").await;
    let text = metrics.as_str().unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in metrics"))
    };
    assert!(value("emend_eval_requests_total{kind=\"loglikelihood\"}") >= 30.0);
    assert!(value("emend_jobs{kind=\"evaluation\",status=\"succeeded\"}") >= 1.0);
    assert!(value("emend_eval_job_duration_seconds_count{status=\"succeeded\"}") >= 1.0);
}

#[tokio::test]
async fn a_job_runs_on_the_version_pinned_at_submit() {
    let base = server();
    let sid = new_session(base, ALICE).await;
    let (s, v) = post(
        base,
        ALICE,
        &format!("/v1/sessions/{sid}/edits"),
        json!({"method": "ft-m", "hparams": {"steps": 3}, "edits": [{
            "prompt": "The Eiffel Tower is located in the city of",
            "subject": "The Eiffel Tower", "target_new": "Rome"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let body = json!({"session": sid, "tasks": ["lambada_openai"], "limit": 3});
    let edited = submit(base, ALICE, body.clone()).await;
    assert_eq!(edited["version"], 1);
    // moving the session afterwards does not change what the job evaluates
    let (s, v) = post(
        base,
        ALICE,
        &format!("/v1/sessions/{sid}/rollback"),
        json!({"version": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let original = submit(base, ALICE, body).await;
    assert_eq!(original["version"], 0);
    let e = finish(base, ALICE, edited["id"].as_str().unwrap()).await;
    let o = finish(base, ALICE, original["id"].as_str().unwrap()).await;
    assert_eq!(
        (&e["status"], &o["status"]),
        (&json!("succeeded"), &json!("succeeded"))
    );
    let ppl = |j: &Value| {
        j["results"]["lambada_openai"]["perplexity"]
            .as_f64()
            .unwrap()
    };

    // The same documents scored through the loglikelihood route at version 1.
    let p = prepare_task(
        "lambada_openai",
        &EvalOptions {
            limit: Some(3),
            ..Default::default()
        },
        &data_dir(),
    )
    .unwrap();
    let requests: Vec<Value> = p
        .instances
        .iter()
        .map(|i| match &i.requests[0] {
            Request::Loglikelihood {
                context,
                continuation,
            } => json!({"context": context, "continuation": continuation}),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let (s, v) = post(
        base,
        ALICE,
        &format!("/v1/sessions/{sid}/loglikelihood"),
        json!({"version": 1, "requests": requests}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lls: Vec<f64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["logprob"].as_f64().unwrap())
        .collect();
    let http_ppl = (-lls.iter().sum::<f64>() / lls.len() as f64).exp();
    let off = (ppl(&e) - http_ppl).abs();
    assert!(
        off <= 1e-6 * http_ppl,
        "job {} vs route {http_ppl}",
        ppl(&e)
    );
    assert!(
        (ppl(&e) - ppl(&o)).abs() > off,
        "the edited version scores differently: {} vs {}",
        ppl(&e),
        ppl(&o)
    );
}

#[tokio::test]
async fn cancel_stops_queued_and_running_jobs() {
    let base = server();
    let sid = new_session(base, ALICE).await;
    // MMLU zero-shot, one question per subject: 228 requests in 8 chunks.
    let long = submit(
        base,
        ALICE,
        json!({"session": sid, "tasks": ["mmlu"], "limit": 1, "num_fewshot": 0}),
    )
    .await;
    let queued = submit(
        base,
        ALICE,
        json!({"session": sid, "tasks": ["arc_easy"], "limit": 1}),
    )
    .await;
    let qid = queued["id"].as_str().unwrap();
    let (s, v) = delete(base, ALICE, &format!("/v1/evaluations/{qid}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "cancelled");
    assert!(v["started_at"].is_null(), "it never ran: {v}");

    let lid = long["id"].as_str().unwrap();
    wait_for(base, ALICE, lid, 900, Duration::from_millis(50), |v| {
        v["status"] == "running" || terminal(v)
    })
    .await;
    let (s, v) = delete(base, ALICE, &format!("/v1/evaluations/{lid}")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["cancel_requested"], true, "{v}");
    let v = finish(base, ALICE, lid).await;
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(
        v["progress"]["done"].as_u64() < v["progress"]["total"].as_u64(),
        "stopped early: {v}"
    );
    assert!(v["results"].as_object().unwrap().is_empty());
    // cancelling again is harmless; the queued job stays cancelled
    let (s, _) = delete(base, ALICE, &format!("/v1/evaluations/{lid}")).await;
    assert_eq!(s, StatusCode::OK);
    let (_, q) = get(base, ALICE, &format!("/v1/evaluations/{qid}")).await;
    assert_eq!(q["status"], "cancelled");
    assert!(q["started_at"].is_null());
}

#[tokio::test]
async fn invalid_evaluations_answer_422_naming_the_field_and_create_nothing() {
    let base = server();
    // Bob's jobs are only ever invalid ones, so his list must stay empty.
    let sid = new_session(base, BOB).await;
    let alices = new_session(base, ALICE).await;
    let ok = json!({"session": sid, "tasks": ["arc_easy"], "limit": 2});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let cases = [
        (with("tasks", json!(["arc_easy", "nope"])), "tasks[1]"),
        (with("tasks", json!(["piqa", "piqa"])), "tasks[1]"),
        (with("tasks", json!([])), "tasks"),
        (with("session", json!("no-such-session")), "session"),
        (with("session", json!(alices)), "session"),
        (with("version", json!(7)), "version"),
        (with("version", json!(-1)), "version"),
        (with("limit", json!(0)), "limit"),
        (with("limit", json!(1_000_000_000)), "limit"),
        (with("num_fewshot", json!(1000)), "num_fewshot"),
        (
            json!({"session": sid, "tasks": ["lambada_openai"], "num_fewshot": 2}),
            "num_fewshot",
        ),
    ];
    for (body, field) in cases {
        let (s, v) = post(base, BOB, "/v1/evaluations", body).await;
        assert_field_problem(s, &v, field);
    }
    let (s, v) = post(base, BOB, "/v1/evaluations", with("extra", json!(1))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, list) = get(base, BOB, "/v1/evaluations").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["total"], 0, "nothing was created: {list}");
    let (s, v) = get(base, BOB, "/v1/evaluations/no-such-job").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = delete(base, BOB, "/v1/evaluations/no-such-job").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = get(base, BOB, "/v1/evaluations?limit=0").await;
    assert_field_problem(s, &v, "limit");
}

#[tokio::test]
async fn a_job_killed_mid_run_resumes_after_restart_without_redoing_tasks() {
    resumes_after_kill9(None).await;
}

/// Runs when `EMEND_TEST_DATABASE_URL` names a PostgreSQL database (CI starts one).
#[tokio::test]
async fn a_job_killed_mid_run_resumes_after_restart_on_postgres() {
    match std::env::var("EMEND_TEST_DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => resumes_after_kill9(Some(&url)).await,
        _ => eprintln!("EMEND_TEST_DATABASE_URL not set: PostgreSQL restart test not run"),
    }
}

async fn resumes_after_kill9(db: Option<&str>) {
    let dir = temp_dir("evals-restart");
    let first = ChildServer::start(&dir, db);
    let url = first.url.clone();
    // The child runs without keys: the tenant is `default`, the header is ignored.
    let sid = new_session(&url, ALICE).await;
    let tasks = ["arc_easy", "piqa", "sciq"];
    let job = submit(
        &url,
        ALICE,
        json!({"session": sid, "tasks": tasks, "limit": 5}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_string();
    let before = wait_for(&url, ALICE, &id, 900, Duration::from_millis(20), |v| {
        terminal(v) || !v["finished_tasks"].as_array().unwrap().is_empty()
    })
    .await;
    assert_eq!(before["status"], "running", "killed mid-run: {before}");
    first.kill9();
    let done_before: Vec<Value> = before["finished_tasks"].as_array().unwrap().clone();

    let second = ChildServer::start(&dir, db);
    let url = second.url.clone();
    let after = finish(&url, ALICE, &id).await;
    assert_eq!(after["status"], "succeeded", "{after}");
    assert_eq!(after["attempts"], 2);
    let finished = after["finished_tasks"].as_array().unwrap();
    let names: Vec<&str> = finished
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    assert_eq!(names, tasks, "each task ran to the end once");
    for t in finished {
        let was_done = done_before.iter().any(|d| d["task"] == t["task"]);
        assert_eq!(
            t["attempt"],
            if was_done { 1 } else { 2 },
            "tasks finished before the kill are kept: {t}"
        );
    }
    for t in tasks {
        assert!(after["results"][t]["acc"].is_number(), "{after}");
    }
    assert_eq!(after["progress"]["done"], after["progress"]["total"]);
}

#[tokio::test]
async fn a_sweep_edits_one_by_one_and_evaluates_each_checkpoint() {
    let base = server();
    let ok = json!({"method": "ft-m", "dataset": "counterfact", "n_edits": 2,
        "checkpoints": [0, 2], "tasks": ["arc_easy"], "limit": 3, "hparams": {"steps": 3}});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    for (body, field) in [
        (with("method", json!("nope")), "method"),
        (with("dataset", json!("wiki")), "dataset"),
        (with("n_edits", json!(0)), "n_edits"),
        (with("checkpoints", json!([0, 3])), "checkpoints[1]"),
        (with("checkpoints", json!([2, 1])), "checkpoints[1]"),
        (with("checkpoints", json!([])), "checkpoints"),
        (with("tasks", json!(["nope"])), "tasks[0]"),
    ] {
        let (s, v) = post(base, BOB, "/v1/sweeps", body).await;
        assert_field_problem(s, &v, field);
    }
    let (_, bobs) = get(base, BOB, "/v1/sweeps").await;
    assert_eq!(bobs["total"], 0, "nothing was created: {bobs}");

    let (s, v) = post(base, ALICE, "/v1/sweeps", ok).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let start = Instant::now();
    let sweep = loop {
        let (s, v) = get(base, ALICE, &format!("/v1/sweeps/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if terminal(&v) {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(900), "{v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(sweep["status"], "succeeded", "{sweep}");
    assert_eq!(sweep["progress"]["done"], 4);
    assert_eq!(sweep["progress"]["total"], 4);
    let curve = sweep["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 2, "{sweep}");
    assert_eq!(
        (&curve[0]["n_edits"], &curve[0]["version"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(
        (&curve[1]["n_edits"], &curve[1]["version"]),
        (&json!(2), &json!(2))
    );
    assert!(curve[0]["edit"].as_object().unwrap().is_empty());

    // The session holds the two edits, one version each.
    let sid = sweep["session"].as_str().unwrap();
    let (_, session) = get(base, ALICE, &format!("/v1/sessions/{sid}")).await;
    assert_eq!(
        (&session["version"], &session["edit_count"]),
        (&json!(2), &json!(2))
    );
    let mut reliability = Vec::new();
    for v in 1..=2 {
        let (s, e) = get(base, ALICE, &format!("/v1/sessions/{sid}/edits/{v}")).await;
        assert_eq!(s, StatusCode::OK, "{e}");
        reliability.push(e["reports"][0]["post"]["reliability"].as_f64().unwrap());
    }
    let mean = (reliability[0] + reliability[1]) / 2.0;
    assert_eq!(
        curve[1]["edit_at_apply"]["reliability"].as_f64().unwrap(),
        mean
    );
    // Retention: both edits measured again on version 2, locality against the base model.
    for k in ["reliability", "generalization", "locality"] {
        let x = curve[1]["edit"][k].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&x), "edit.{k} = {x}: {sweep}");
    }

    // Checkpoint 0 is the base model: the in-process score.
    let m = common::default_model();
    let mut backend = ModelBackend::new(m.model.as_ref(), &m.tokenizer);
    let opts = EvalOptions {
        limit: Some(3),
        ..Default::default()
    };
    let want = evaluate(
        &["arc_easy".to_string()],
        &opts,
        &data_dir(),
        &mut backend,
        &mut |_, _| true,
    )
    .unwrap();
    assert_eq!(
        curve[0]["tasks"]["arc_easy"]["acc"].as_f64().unwrap(),
        want.results["arc_easy"].metrics["acc"]
    );

    let csv = get_raw(base, ALICE, &format!("/v1/sweeps/{id}/curve?format=csv")).await;
    assert_eq!(csv.status(), StatusCode::OK);
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("method,n_edits,version,edit."),
        "{text}"
    );
    assert!(lines[0].contains("arc_easy.acc"), "{text}");
    assert!(lines[2].starts_with("ft-m,2,2,"), "{text}");
    let file = get_raw(base, ALICE, &format!("/v1/sweeps/{id}/results.csv")).await;
    assert_eq!(file.status(), StatusCode::OK);
    assert_eq!(
        file.text().await.unwrap(),
        text,
        "results.csv is the curve's CSV"
    );
    for path in ["curve?format=svg", "chart.svg"] {
        let svg = get_raw(base, ALICE, &format!("/v1/sweeps/{id}/{path}")).await;
        assert_eq!(svg.status(), StatusCode::OK, "{path}");
        assert_eq!(svg.headers()["content-type"], "image/svg+xml");
        let svg = svg.text().await.unwrap();
        // A panel per task and retention metric, ft-m's line in each.
        for text in [
            "<svg",
            "<polyline",
            "arc_easy acc_norm",
            "edit reliability",
            ">\nft-m\n<",
        ] {
            assert!(svg.contains(text), "{path}: no {text}");
        }
    }
    for path in ["curve?format=png", "chart.png"] {
        let png = get_raw(base, ALICE, &format!("/v1/sweeps/{id}/{path}")).await;
        assert_eq!(png.status(), StatusCode::OK, "{path}");
        assert_eq!(png.headers()["content-type"], "image/png");
        let bytes = png.bytes().await.unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{path}");
    }
    let (s, j) = get(base, ALICE, &format!("/v1/sweeps/{id}/curve")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["rows"].as_array().unwrap().len(), 2);
    let (s, v) = get(base, ALICE, &format!("/v1/sweeps/{id}/curve?format=gif")).await;
    assert_field_problem(s, &v, "format");
    let (s, _) = get(base, BOB, &format!("/v1/sweeps/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = delete(base, ALICE, &format!("/v1/sweeps/{id}")).await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_sweep_compares_methods_each_on_its_own_session() {
    let base = server();
    let ok = json!({"methods": ["ft-m", "ft-l"], "dataset": "counterfact", "n_edits": 1,
        "checkpoints": [0, 1], "tasks": ["arc_easy"], "limit": 2,
        "hparams": {"ft-m": {"steps": 2}, "ft-l": {"steps": 2}}});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    for (body, field) in [
        (with("method", json!("rome")), "methods"),
        (with("methods", json!([])), "methods"),
        (with("methods", json!(["ft-m", "ft-m"])), "methods[1]"),
        (with("methods", json!(["ft-m", "nope"])), "methods[1]"),
        (with("hparams", json!({"rome": {}})), "hparams.rome"),
        (
            with("hparams", json!({"ft-l": {"bogus": 1}})),
            "hparams.ft-l.bogus",
        ),
        (with("hparams", json!([1])), "hparams"),
    ] {
        let (s, v) = post(base, ALICE, "/v1/sweeps", body).await;
        assert_field_problem(s, &v, field);
    }
    let (s, v) = post(base, ALICE, "/v1/sweeps", ok).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["methods"], json!(["ft-m", "ft-l"]));
    assert_eq!(
        v["progress"]["total"], 6,
        "(1 edit + 2 checkpoints) per method"
    );
    let id = v["id"].as_str().unwrap().to_string();
    let start = Instant::now();
    let sweep = loop {
        let (_, v) = get(base, ALICE, &format!("/v1/sweeps/{id}")).await;
        if terminal(&v) {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(900), "{v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(sweep["status"], "succeeded", "{sweep}");
    assert_eq!(sweep["progress"]["done"], 6);
    let sessions = sweep["sessions"].as_object().unwrap();
    let (m, l) = (&sessions["ft-m"], &sessions["ft-l"]);
    assert_ne!(m, l, "each method edits its own session");
    assert_eq!(&sweep["session"], m);
    for sid in [m, l] {
        let (_, s) = get(
            base,
            ALICE,
            &format!("/v1/sessions/{}", sid.as_str().unwrap()),
        )
        .await;
        assert_eq!(s["edit_count"], 1, "{s}");
    }
    let curve = sweep["curve"].as_array().unwrap();
    let points: Vec<(&str, u64)> = curve
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap(),
                r["n_edits"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(points, [("ft-m", 0), ("ft-m", 1), ("ft-l", 0), ("ft-l", 1)]);
    // The base model is evaluated once and shared.
    assert_eq!(curve[0]["tasks"], curve[2]["tasks"]);
    assert!(curve[3]["edit"]["reliability"].is_number(), "{sweep}");

    let csv = get_raw(base, ALICE, &format!("/v1/sweeps/{id}/results.csv"))
        .await
        .text()
        .await
        .unwrap();
    let firsts: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| &l[..l.find(',').unwrap()])
        .collect();
    assert_eq!(firsts, ["ft-m", "ft-m", "ft-l", "ft-l"], "{csv}");
    let svg = get_raw(base, ALICE, &format!("/v1/sweeps/{id}/chart.svg"))
        .await
        .text()
        .await
        .unwrap();
    for line in ["ft-m", "ft-l", "base"] {
        assert!(
            svg.contains(&format!(">\n{line}\n<")),
            "no {line} in the legend"
        );
    }
}

#[tokio::test]
async fn a_sweep_killed_mid_run_resumes_from_its_last_checkpoint() {
    let dir = temp_dir("sweep-restart");
    let first = ChildServer::start(&dir, None);
    let url = first.url.clone();
    let (s, v) = post(
        &url,
        ALICE,
        "/v1/sweeps",
        json!({"method": "ft-m", "dataset": "counterfact", "n_edits": 2,
            "checkpoints": [0, 1, 2], "tasks": ["arc_easy"], "limit": 2,
            "hparams": {"steps": 3}}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/v1/sweeps/{id}");
    let start = Instant::now();
    let before = loop {
        let (_, v) = get(&url, ALICE, &path).await;
        if terminal(&v) || !v["curve"].as_array().unwrap().is_empty() {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(900), "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(before["status"], "running", "killed mid-run: {before}");
    first.kill9();

    let second = ChildServer::start(&dir, None);
    let url = second.url.clone();
    let start = Instant::now();
    let after = loop {
        let (_, v) = get(&url, ALICE, &path).await;
        if terminal(&v) {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(900), "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(after["status"], "succeeded", "{after}");
    assert_eq!(after["attempts"], 2);
    assert_eq!(
        after["session"], before["session"],
        "the same session goes on"
    );
    let curve = after["curve"].as_array().unwrap();
    let ns: Vec<u64> = curve
        .iter()
        .map(|r| r["n_edits"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [0, 1, 2], "each checkpoint once: {after}");
    for (i, r) in before["curve"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            &curve[i], r,
            "checkpoints finished before the kill are kept"
        );
    }
    // no edit was applied twice
    let sid = after["session"].as_str().unwrap();
    let (_, s) = get(&url, ALICE, &format!("/v1/sessions/{sid}")).await;
    assert_eq!(
        (&s["version"], &s["edit_count"]),
        (&json!(2), &json!(2)),
        "{s}"
    );
}
