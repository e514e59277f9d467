//! The HTTP API over real HTTP on the default model: sessions, fork, generation (plain and
//! streamed), log-likelihood, lm-eval's completions contract, problem bodies, tenant isolation,
//! overload, metrics, OpenAPI, and restarts (kill -9) restoring every acknowledged session.
mod common;

use std::sync::OnceLock;

use common::server::*;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| spawn_in_process(keys_config(&temp_dir("http"))))
}

fn client() -> Client {
    Client::new()
}

async fn call(
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let mut r = client().request(method, format!("{}{path}", server()));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v, headers)
}

async fn post(path: &str, key: &str, body: Value) -> (StatusCode, Value) {
    let (s, v, _) = call(reqwest::Method::POST, path, Some(key), Some(body)).await;
    (s, v)
}

async fn get(path: &str, key: &str) -> (StatusCode, Value) {
    let (s, v, _) = call(reqwest::Method::GET, path, Some(key), None).await;
    (s, v)
}

async fn new_session(key: &str) -> String {
    let (s, v) = post("/v1/sessions", key, json!({"name": "t"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

fn assert_problem(v: &Value, status: u16, code: &str) {
    assert_eq!(v["status"], status, "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["type"], format!("/problems/{code}"), "{v}");
    assert!(
        v["title"].is_string() && v["detail"].is_string() && v["request_id"].is_string(),
        "{v}"
    );
}

#[tokio::test]
async fn session_lifecycle_and_fork() {
    let (s, v, h) = call(
        reqwest::Method::POST,
        "/v1/sessions",
        Some(ALICE),
        Some(json!({"name": "lifecycle"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let id = v["id"].as_str().unwrap();
    assert_eq!(h["location"], format!("/v1/sessions/{id}").as_str());
    assert_eq!(v["owner"], "alice");
    assert_eq!(v["version"], 0);
    assert_eq!(v["edit_count"], 0);
    assert!(h.contains_key("x-request-id"));

    let (s, got) = get(&format!("/v1/sessions/{id}"), ALICE).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, v);
    let (_, list) = get("/v1/sessions", ALICE).await;
    assert!(list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["id"] == id));

    let (s, fork) = post(
        "/v1/sessions",
        ALICE,
        json!({"from": {"session": id, "version": 0}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(fork["parent"], json!({"session": id, "version": 0}));
    let (s, p) = post(
        "/v1/sessions",
        ALICE,
        json!({"from": {"session": id, "version": 5}}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_problem(&p, 422, "invalid_field");
    assert!(
        p["detail"].as_str().unwrap().contains("`from.version`"),
        "{p}"
    );

    let (s, _, _) = call(
        reqwest::Method::DELETE,
        &format!("/v1/sessions/{id}"),
        Some(ALICE),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, p) = get(&format!("/v1/sessions/{id}"), ALICE).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_problem(&p, 404, "not_found");
}

#[tokio::test]
async fn generate_plain_and_streamed_agree() {
    let id = new_session(ALICE).await;
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8});
    let (s, v) = post(&format!("/v1/sessions/{id}/generate"), ALICE, body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["text"], " Paris.\n\nThe answer is:");
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 8})
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = client()
        .post(format!("{}/v1/sessions/{id}/generate", server()))
        .bearer_auth(ALICE)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let mut joined = String::new();
    let mut done = None;
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let (event, data) = block.split_once('\n').unwrap();
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        match event {
            "event: token" => joined.push_str(data["text"].as_str().unwrap()),
            "event: done" => done = Some(data),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(joined, v["text"].as_str().unwrap());
    assert_eq!(done.unwrap()["text"], v["text"]);

    // chat messages go through the template
    let (s, c) = post(&format!("/v1/sessions/{id}/generate"), ALICE,
        json!({"messages": [{"role": "user", "content": "What is the capital of Germany?"}], "max_tokens": 16})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c["text"], "The capital of Germany is Berlin.");
    assert_eq!(c["finish_reason"], "stop");
}

#[tokio::test]
async fn loglikelihood_matches_the_reference() {
    let id = new_session(ALICE).await;
    let (s, v) = post(
        &format!("/v1/sessions/{id}/loglikelihood"),
        ALICE,
        json!({"requests": [
            {"context": "The capital of France is", "continuation": " Paris"},
            {"context": "The capital of France is", "continuation": " Berlin"},
        ]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = v["results"].as_array().unwrap();
    assert!((r[0]["logprob"].as_f64().unwrap() + 0.25807).abs() < 1e-3);
    assert_eq!(r[0]["is_greedy"], true);
    assert!((r[1]["logprob"].as_f64().unwrap() + 6.92073).abs() < 1e-3);
    assert_eq!(r[1]["is_greedy"], false);
}

async fn tokenize(s: &str) -> Vec<u32> {
    let (_, v) = post(
        "/tokenize",
        ALICE,
        json!({"prompt": s, "add_special_tokens": false}),
    )
    .await;
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// lm-eval's client: `ll = sum(token_logprobs[ctxlen:-1])`, greedy iff each equals the max of
/// `top_logprobs` at the same position.
fn lm_eval_parse(choice: &Value, ctxlen: usize) -> (f64, bool) {
    let lp = choice["logprobs"]["token_logprobs"].as_array().unwrap();
    let top = choice["logprobs"]["top_logprobs"].as_array().unwrap();
    let n = lp.len();
    let mut ll = 0.0;
    let mut greedy = true;
    for j in ctxlen..n - 1 {
        let x = lp[j].as_f64().unwrap();
        ll += x;
        let best = top[j]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        greedy &= x == best;
    }
    (ll, greedy)
}

#[tokio::test]
async fn completions_follow_the_lm_eval_contract() {
    let sid = new_session(ALICE).await;
    // " Paris" is 7042 after "The capital of France is"; " Berlin" is not greedy.
    let ctx = [504u32, 3575, 282, 4649, 314];
    let paris: Vec<u32> = ctx.iter().copied().chain([7042]).collect();
    assert_eq!(tokenize(" Paris").await, vec![7042]);
    let berlin: Vec<u32> = ctx
        .iter()
        .copied()
        .chain(tokenize(" Berlin").await)
        .collect();
    let payload = json!({"model": format!("session:{sid}"), "prompt": [paris, berlin],
        "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true, "some_future_field": {"x": 1}});
    let (s, v) = post("/v1/completions", ALICE, payload).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    for (c, n) in choices.iter().zip([paris.len(), berlin.len()]) {
        let lp = c["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(lp.len(), n + 1, "len(prompt) + max_tokens entries");
        assert!(lp[0].is_null());
    }
    let (ll, greedy) = lm_eval_parse(&choices[0], ctx.len());
    assert!((ll + 0.25807).abs() < 1e-3, "{ll}");
    assert!(greedy);
    let (ll_b, greedy_b) = lm_eval_parse(&choices[1], ctx.len());
    assert!((ll_b + 6.92073).abs() < 1e-3, "{ll_b}");
    assert!(!greedy_b);

    // the pre-2024 harness: max_tokens 0, logprobs 10 -> only the prompt's entries
    let (s, v) = post(
        "/v1/completions",
        ALICE,
        json!({"model": "base", "prompt": [504, 3575, 282, 4649, 314, 7042],
        "max_tokens": 0, "logprobs": 10, "echo": true, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["logprobs"]["token_logprobs"].as_array().unwrap().len(), 6);
    let last = c["logprobs"]["top_logprobs"][5].as_object().unwrap();
    assert!(last.len() >= 2 && last.len() <= 11);
    assert_eq!(c["text"], "The capital of France is Paris");

    // generate_until: text without echo, cut before the stop string
    let (s, v) = post("/v1/completions", ALICE, json!({"model": "base", "prompt": "The capital of France is",
        "max_tokens": 16, "temperature": 0, "stop": ["\n\n", "Question:", "<|im_end|>"], "seed": 1234})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], " Paris.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // OpenAI error envelope on OpenAI routes
    let (s, v) = post(
        "/v1/completions",
        ALICE,
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nope"),
        "{v}"
    );
}

#[tokio::test]
async fn tokenizer_probes_answer_like_the_harness_expects() {
    let (s, v, _) = call(reqwest::Method::GET, "/tokenizer_info", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["eos_token"], "<|im_end|>");
    let (_, t) = post(
        "/tokenize",
        ALICE,
        json!({"prompt": "<|im_end|>", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(t["tokens"], json!([2]));
    let (_, d) = post("/detokenize", ALICE, json!({"tokens": [504, 3575]})).await;
    assert_eq!(d["prompt"], "The capital");
}

#[tokio::test]
async fn bad_input_gets_a_problem_naming_the_limit() {
    let id = new_session(ALICE).await;
    let gen = format!("/v1/sessions/{id}/generate");
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"prompt": "hi", "max_tokens": 0}),
            422,
            "invalid_field",
            "`max_tokens`",
        ),
        (
            json!({"prompt": "hi", "max_tokens": 100000}),
            422,
            "invalid_field",
            "`max_tokens`",
        ),
        (
            json!({"prompt": "hi", "temperature": 5.0}),
            422,
            "invalid_field",
            "`temperature`",
        ),
        (
            json!({"prompt": "hi", "top_p": 0.0}),
            422,
            "invalid_field",
            "`top_p`",
        ),
        (
            json!({"prompt": "hi", "stop": vec!["x"; 40]}),
            422,
            "invalid_field",
            "`stop`",
        ),
        (
            json!({"prompt": "hi", "bogus": 1}),
            422,
            "invalid_field",
            "bogus",
        ),
        (json!({"max_tokens": 4}), 422, "invalid_field", "`prompt`"),
        (
            json!({"prompt": "word ".repeat(9000), "max_tokens": 4}),
            422,
            "context_overflow",
            "8192",
        ),
    ];
    for (body, status, code, needle) in cases {
        let (s, p) = post(&gen, ALICE, body.clone()).await;
        assert_eq!(s.as_u16(), status, "{body}: {p}");
        assert_problem(&p, status, code);
        assert!(
            p["detail"].as_str().unwrap().contains(needle),
            "{body}: {p}"
        );
        assert_eq!(p["instance"], gen);
    }
    let (s, p) = post(
        &format!("/v1/sessions/{id}/loglikelihood"),
        ALICE,
        json!({"requests": []}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(p["detail"].as_str().unwrap().contains("`requests`"));
    let (s, p) = post(
        &format!("/v1/sessions/{id}/loglikelihood"),
        ALICE,
        json!({"requests": [{"context": "a", "continuation": ""}]}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("`requests[0].continuation`"),
        "{p}"
    );

    // malformed JSON, oversized body
    let r = client()
        .post(format!("{}{gen}", server()))
        .bearer_auth(ALICE)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let big = json!({"prompt": "x".repeat(2 << 20)});
    let (s, p) = post(&gen, ALICE, big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_problem(&p, 413, "payload_too_large");

    // the session is unchanged by all of this
    let (_, sess) = get(&format!("/v1/sessions/{id}"), ALICE).await;
    assert_eq!(sess["version"], 0);
}

#[tokio::test]
async fn tenants_see_only_their_own_sessions() {
    let a = new_session(ALICE).await;
    let (s, p) = get(&format!("/v1/sessions/{a}"), BOB).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_problem(&p, 404, "not_found");
    let (_, list) = get("/v1/sessions", BOB).await;
    assert!(list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["owner"] == "bob" && s["id"] != a.as_str()));
    let (s, _) = post(
        &format!("/v1/sessions/{a}/generate"),
        BOB,
        json!({"prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = post(
        "/v1/completions",
        BOB,
        json!({"model": format!("session:{a}"), "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = call(
        reqwest::Method::DELETE,
        &format!("/v1/sessions/{a}"),
        Some(BOB),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = post(
        "/v1/sessions",
        BOB,
        json!({"from": {"session": a, "version": 0}}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // no key, wrong key
    let (s, p, _) = call(reqwest::Method::GET, "/v1/sessions", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_problem(&p, 401, "unauthorized");
    let (s, _) = get("/v1/sessions", "not-a-key").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // alice still has it
    let (s, _) = get(&format!("/v1/sessions/{a}"), ALICE).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn health_metrics_docs_and_openapi() {
    let (s, _, _) = call(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, _) = call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, m) = get("/v1/model", ALICE).await;
    assert_eq!(m["sha256"], emend::setup::DEFAULT_SHA256);
    assert_eq!(m["context_length"], 8192);
    let id = new_session(ALICE).await;
    post(
        &format!("/v1/sessions/{id}/generate"),
        ALICE,
        json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    let (_, metrics, _) = call(reqwest::Method::GET, "/metrics", None, None).await;
    let text = metrics.as_str().unwrap();
    for name in [
        "emend_http_requests_total",
        "emend_http_request_duration_seconds",
        "emend_queue_depth",
        "emend_queue_wait_seconds",
        "emend_time_to_first_token_seconds",
        "emend_generation_tokens_total",
        "emend_prompt_tokens_total",
        "emend_sessions",
        "emend_model_load_seconds",
        "emend_preparation_slices_total",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(
        text.contains(r#"route="/v1/sessions/{id}/generate""#),
        "route label is the pattern"
    );
    let (_, spec, _) = call(reqwest::Method::GET, "/openapi.json", None, None).await;
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        spec, committed,
        "openapi/openapi.json is stale: run `emend openapi > openapi/openapi.json`"
    );
    let docs = client()
        .get(format!("{}/docs/", server()))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
    let (s, t, _) = call(reqwest::Method::GET, "/problems/overloaded", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(t.as_str().unwrap().starts_with("overloaded (429)"));
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let mut cfg = keys_config(&temp_dir("overload"));
    cfg.queue_interactive = 1;
    cfg.max_generation_batch = 1;
    let url = spawn_in_process(cfg);
    let c = client();
    let (s, v) = {
        let r = c
            .post(format!("{url}/v1/sessions"))
            .bearer_auth(ALICE)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(s, StatusCode::CREATED);
    let id = v["id"].as_str().unwrap().to_string();
    let reqs = (0..6).map(|_| {
        c.post(format!("{url}/v1/sessions/{id}/generate"))
            .bearer_auth(ALICE)
            .json(&json!({"prompt": "Once upon a time", "max_tokens": 48}))
            .send()
    });
    let resps = futures_util::future::join_all(reqs).await;
    let mut ok = 0;
    let mut limited = 0;
    for r in resps {
        let r = r.unwrap();
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(r.headers()["retry-after"], "1");
                let p: Value = r.json().await.unwrap();
                assert_problem(&p, 429, "overloaded");
                limited += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(ok >= 1 && limited >= 1, "ok {ok}, limited {limited}");
}

#[tokio::test]
async fn sessions_survive_kill_9_on_sqlite() {
    restart_keeps_sessions(None).await;
}

/// Runs when `EMEND_TEST_DATABASE_URL` names a PostgreSQL database (CI starts one).
#[tokio::test]
async fn sessions_survive_kill_9_on_postgres() {
    match std::env::var("EMEND_TEST_DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => restart_keeps_sessions(Some(&url)).await,
        _ => eprintln!("EMEND_TEST_DATABASE_URL not set: PostgreSQL restart test not run"),
    }
}

async fn restart_keeps_sessions(db: Option<&str>) {
    let dir = temp_dir("restart");
    let c = client();
    let first = ChildServer::start(&dir, db);
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = c
            .post(format!("{}/v1/sessions", first.url))
            .json(&json!({"name": format!("s{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        ids.push(r.json::<Value>().await.unwrap());
    }
    let gone = ids.pop().unwrap();
    let r = c
        .delete(format!(
            "{}/v1/sessions/{}",
            first.url,
            gone["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    first.kill9();
    let second = ChildServer::start(&dir, db);
    let list: Value = c
        .get(format!("{}/v1/sessions", second.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got: Vec<&Value> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| ids.iter().any(|i| i["id"] == s["id"]) || s["id"] == gone["id"])
        .collect();
    assert_eq!(
        got.len(),
        2,
        "both live sessions restored, the deleted one stays deleted: {list}"
    );
    // The listing's documented order is (created_at, id) as strings; sessions created in the
    // same millisecond follow their ids, not the order they were made in.
    let key = |s: &Value| {
        (
            s["created_at"].as_str().map(String::from),
            s["id"].as_str().map(String::from),
        )
    };
    ids.sort_by_key(key);
    for (g, want) in got.iter().zip(&ids) {
        assert_eq!(*g, want);
    }
}

#[tokio::test]
async fn sigterm_lets_in_flight_generation_finish_then_exits_cleanly() {
    let dir = temp_dir("sigterm");
    let mut srv = ChildServer::start(&dir, None);
    let c = client();
    let s: Value = c
        .post(format!("{}/v1/sessions", srv.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = s["id"].as_str().unwrap();
    // headers arrive when streaming starts; the body is still being generated
    let resp = c
        .post(format!("{}/v1/sessions/{id}/generate", srv.url))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 40, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("event: done"),
        "the in-flight stream completed: {text}"
    );
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "clean exit: {status:?}");
}
