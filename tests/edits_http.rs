//! Knowledge edits over real HTTP on the default model: validation (422 naming the field, the
//! version unchanged), the version graph (history, exact rollback, versions never reused,
//! isolation, fork from any version), methods, metrics, and kill -9 restarts that restore every
//! acknowledged version bit for bit. FT-M with 3 steps stands in wherever the method does not
//! matter: it is the fastest (ROME/MEMIT behaviour is asserted in tests/editing.rs).
mod common;

use std::sync::OnceLock;

use common::server::*;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let mut cfg = keys_config(&temp_dir("edits"));
        cfg.data_dir = Some(common::shared_dir().join("data"));
        spawn_in_process(cfg)
    })
}

async fn send(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(ALICE);
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

async fn post_at(base: &str, path: &str, body: Value) -> (StatusCode, Value) {
    send(base, reqwest::Method::POST, path, Some(body)).await
}

async fn get_at(base: &str, path: &str) -> (StatusCode, Value) {
    send(base, reqwest::Method::GET, path, None).await
}

async fn post(path: &str, body: Value) -> (StatusCode, Value) {
    post_at(server(), path, body).await
}

async fn get(path: &str) -> (StatusCode, Value) {
    get_at(server(), path).await
}

async fn new_session_at(base: &str, body: Value) -> String {
    let (s, v) = post_at(base, "/v1/sessions", body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// One fact in EasyEdit's request form.
fn fact(prompt: &str, subject: &str, target: &str) -> Value {
    json!({"prompt": prompt, "subject": subject, "target_new": target})
}

fn eiffel() -> Value {
    fact(
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        "Rome",
    )
}

fn facts() -> [Value; 3] {
    [
        eiffel(),
        fact(
            "The Colosseum is located in the city of",
            "The Colosseum",
            "Paris",
        ),
        fact(
            "Mount Fuji is located in the country of",
            "Mount Fuji",
            "Brazil",
        ),
    ]
}

/// The fast method: FT-M, 3 steps.
fn ft_m(edits: Vec<Value>) -> Value {
    json!({"method": "ft-m", "edits": edits, "hparams": {"steps": 3}})
}

async fn edit_at(base: &str, id: &str, f: Value) -> Value {
    let (s, v) = post_at(base, &format!("/v1/sessions/{id}/edits"), ft_m(vec![f])).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

/// Log-likelihoods of the probes at a version (`None`: the current one).
async fn probe_at(base: &str, id: &str, version: Option<u64>) -> Vec<f64> {
    let mut body = json!({"requests": [
        {"context": "The Eiffel Tower is located in the city of", "continuation": " Rome"},
        {"context": "The Colosseum is located in the city of", "continuation": " Paris"},
        {"context": "The capital of Japan is", "continuation": " Tokyo"},
        {"context": "Mount Fuji is located in the country of", "continuation": " Brazil"},
    ]});
    if let Some(v) = version {
        body["version"] = json!(v);
    }
    let (s, v) = post_at(base, &format!("/v1/sessions/{id}/loglikelihood"), body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["logprob"].as_f64().unwrap())
        .collect()
}

async fn version_of(base: &str, id: &str) -> u64 {
    let (s, v) = get_at(base, &format!("/v1/sessions/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["version"].as_u64().unwrap()
}

fn assert_field_problem(s: StatusCode, v: &Value, field: &str) {
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {v}");
    assert_eq!(v["code"], "invalid_field", "{v}");
    assert_eq!(v["type"], "/problems/invalid_field", "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!("`{field}`")),
        "expected the detail to name `{field}`: {detail}"
    );
}

#[tokio::test]
async fn bad_edits_answer_422_naming_the_field_and_leave_the_version() {
    let id = new_session_at(server(), json!({})).await;
    let path = format!("/v1/sessions/{id}/edits");
    let long_target = "word ".repeat(40);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"method": "bogus", "edits": [eiffel()]}), "method"),
        (
            ft_m(vec![fact("The Eiffel Tower is in", "The Louvre", "Rome")]),
            "edits[0].subject",
        ),
        (
            ft_m(vec![
                eiffel(),
                fact("The Eiffel Tower is in", "The Eiffel Tower", " "),
            ]),
            "edits[1].target_new",
        ),
        (
            ft_m(vec![fact(
                "The Eiffel Tower is in",
                "The Eiffel Tower",
                &long_target,
            )]),
            "edits[0].target_new",
        ),
        (
            json!({"method": "ft-m", "edits": [eiffel()], "hparams": {"layer": 99}}),
            "hparams.layer",
        ),
        (
            json!({"method": "rome", "edits": [eiffel()], "hparams": {"bogus": 1}}),
            "hparams.bogus",
        ),
        (
            json!({"method": "memit", "edits": [eiffel()], "hparams": {"v_steps": 0}}),
            "hparams.v_steps",
        ),
        (
            json!({"method": "alphaedit", "edits": [eiffel()], "hparams": {"nullspace_threshold": -1.0}}),
            "hparams.nullspace_threshold",
        ),
        (
            json!({"method": "alphaedit", "edits": [eiffel()], "hparams": {"layers": [3, 30]}}),
            "hparams.layers[1]",
        ),
        (
            json!({"method": "kn", "edits": [eiffel()]}),
            "edits[0].target_true",
        ),
        (
            json!({"method": "kn", "edits": [eiffel()], "hparams": {"adaptive_threshold": 1.5}}),
            "hparams.adaptive_threshold",
        ),
        (
            json!({"method": "pmet", "edits": [eiffel()], "hparams": {"layers": [3, 31]}}),
            "hparams.layers[1]",
        ),
        (
            json!({"method": "grace", "edits": [eiffel()], "hparams": {"radius": -1.0}}),
            "hparams.radius",
        ),
        (
            json!({"method": "grace", "edits": [eiffel()], "hparams": {"layer": 30}}),
            "hparams.layer",
        ),
        (
            json!({"method": "wise", "edits": [eiffel()], "hparams": {"merge_freq": 750}}),
            "hparams.merge_freq",
        ),
        (
            json!({"method": "wise", "edits": [eiffel()], "hparams": {"mask_ratio": 0.0}}),
            "hparams.mask_ratio",
        ),
        (
            json!({"method": "wise", "edits": [eiffel()], "hparams": {"layer": 30}}),
            "hparams.layer",
        ),
        (
            json!({"method": "ft-l", "edits": [eiffel()], "hparams": {"norm_constraint": 11.0}}),
            "hparams.norm_constraint",
        ),
        (
            ft_m(vec![json!({"dataset": "counterfact", "id": 987_654_321})]),
            "edits[0].id",
        ),
        (
            ft_m(vec![json!({"dataset": "wikipedia", "id": 1})]),
            "edits[0].dataset",
        ),
        (
            ft_m(vec![json!({"prompt": "x", "target_new": "y"})]),
            "edits[0].subject",
        ),
        (ft_m(vec![]), "edits"),
        (ft_m(vec![eiffel(); 65]), "edits"),
    ];
    for (body, field) in cases {
        let (s, v) = post(&path, body).await;
        assert_field_problem(s, &v, field);
    }
    let (s, v) = post(
        &format!("/v1/sessions/{id}/rollback"),
        json!({"version": 3}),
    )
    .await;
    assert_field_problem(s, &v, "version");
    let (s, v) = post(
        &format!("/v1/sessions/{id}/loglikelihood"),
        json!({"requests": [{"context": "a", "continuation": " b"}], "version": 1}),
    )
    .await;
    assert_field_problem(s, &v, "version");
    let (s, v) = post(
        &format!("/v1/sessions/{id}/generate"),
        json!({"prompt": "a", "max_tokens": 1, "version": 2}),
    )
    .await;
    assert_field_problem(s, &v, "version");
    let (s, v) = post("/v1/sessions/nope/edits", ft_m(vec![eiffel()])).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(version_of(server(), &id).await, 0);
    let (s, h) = get(&format!("/v1/sessions/{id}/edits")).await;
    assert_eq!(s, StatusCode::OK, "{h}");
    assert_eq!(h["total"], 0, "{h}");
    let (s, v) = get(&format!("/v1/sessions/{id}/edits?limit=0")).await;
    assert_field_problem(s, &v, "limit");
}

#[tokio::test]
async fn an_edit_makes_version_1_listed_in_the_history() {
    let id = new_session_at(server(), json!({})).await;
    let (s, v) = post(&format!("/v1/sessions/{id}/edits"), ft_m(vec![eiffel()])).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["session"], id.as_str());
    assert_eq!(v["version"], 1);
    let made = &v["versions"][0];
    assert_eq!(made["version"], 1, "{v}");
    assert_eq!(made["parent_version"], 0, "{v}");
    assert_eq!(made["method"], "ft-m");
    assert_eq!(made["hparams"]["steps"], 3, "resolved hparams: {v}");
    assert_eq!(made["requests"][0]["subject"], "The Eiffel Tower");
    let report = &made["reports"][0];
    assert!(
        report["pre"]["reliability"].is_number() && report["post"]["reliability"].is_number(),
        "{v}"
    );
    assert!(
        made["duration_ms"].is_u64() && made["created_at"].is_string(),
        "{v}"
    );

    let (s, sess) = get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (sess["version"].as_u64(), sess["edit_count"].as_u64()),
        (Some(1), Some(1))
    );
    let (s, h) = get(&format!("/v1/sessions/{id}/edits")).await;
    assert_eq!(s, StatusCode::OK, "{h}");
    assert_eq!(h["total"], 1, "{h}");
    assert_eq!(h["entries"][0]["kind"], "edit");
    assert_eq!(h["entries"][0]["version"], 1);
    assert_eq!(h["entries"][0]["reports"], made["reports"]);
    let (s, one) = get(&format!("/v1/sessions/{id}/edits/1")).await;
    assert_eq!(s, StatusCode::OK, "{one}");
    assert_eq!(one, *made, "GET by version returns what POST answered");
    let (s, p) = get(&format!("/v1/sessions/{id}/edits/2")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{p}");
    assert_eq!(p["code"], "not_found");

    // A dataset record by id: CounterFact case 0 (Danielle Darrieux → English).
    let (s, v) = post(
        &format!("/v1/sessions/{id}/edits"),
        ft_m(vec![json!({"dataset": "counterfact", "id": 0})]),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["version"], 2);
    assert_eq!(
        v["versions"][0]["requests"][0]["subject"],
        "Danielle Darrieux"
    );
    assert_eq!(v["versions"][0]["parent_version"], 1);
}

#[tokio::test]
async fn rollback_is_exact_forks_start_anywhere_and_sessions_are_isolated() {
    let base = server();
    let a = new_session_at(base, json!({"name": "a"})).await;
    let b = new_session_at(base, json!({"name": "b"})).await;
    let fresh = probe_at(base, &b, None).await;
    let mut at = vec![probe_at(base, &a, None).await];
    assert_eq!(at[0], fresh, "two base sessions agree");
    for (i, f) in facts().into_iter().enumerate() {
        let v = edit_at(base, &a, f).await;
        assert_eq!(v["version"], i as u64 + 1);
        at.push(probe_at(base, &a, None).await);
        assert_eq!(
            probe_at(base, &b, None).await,
            fresh,
            "session b is unaffected"
        );
    }
    assert_ne!(at[1], at[0], "the edit changed the edited model");
    assert_ne!(at[3], at[1], "later edits changed it again");

    let (s, v) = post(&format!("/v1/sessions/{a}/rollback"), json!({"version": 1})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["version"].as_u64(), v["edit_count"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        probe_at(base, &a, None).await,
        at[1],
        "rollback is bit-exact"
    );
    assert_eq!(
        probe_at(base, &a, Some(0)).await,
        fresh,
        "version 0 is the base model"
    );
    assert_eq!(
        probe_at(base, &a, Some(3)).await,
        at[3],
        "rolled-back-over versions stay scoreable"
    );

    // A fork from version 2 (above the current one) serves what the parent served there.
    let (s, f) = post(
        "/v1/sessions",
        json!({"name": "fork", "from": {"session": a, "version": 2}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{f}");
    assert_eq!(
        (f["version"].as_u64(), f["edit_count"].as_u64()),
        (Some(2), Some(2))
    );
    let fork = f["id"].as_str().unwrap();
    assert_eq!(probe_at(base, fork, None).await, at[2]);
    let (_, fh) = get(&format!("/v1/sessions/{fork}/edits")).await;
    assert_eq!(
        fh["total"], 2,
        "the fork's log holds the path to its start: {fh}"
    );
    let (s, p) = post(
        &format!("/v1/sessions/{fork}/rollback"),
        json!({"version": 3}),
    )
    .await;
    assert_field_problem(s, &p, "version");

    // After a rollback the next edit branches from the current version; numbers are not reused.
    let v = edit_at(base, &a, eiffel()).await;
    assert_eq!(v["version"], 4, "{v}");
    assert_eq!(v["versions"][0]["parent_version"], 1, "{v}");
    let (_, h) = get(&format!("/v1/sessions/{a}/edits?offset=3&limit=2")).await;
    assert_eq!(h["total"], 5, "{h}");
    let kinds: Vec<(&str, u64)> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["version"].as_u64().unwrap()))
        .collect();
    assert_eq!(kinds, vec![("rollback", 1), ("edit", 4)]);
    assert_eq!(
        probe_at(base, fork, None).await,
        at[2],
        "the fork is unaffected"
    );
    assert_eq!(probe_at(base, &b, None).await, fresh);
}

#[tokio::test]
async fn methods_are_listed_with_defaults_and_edit_metrics_are_exported() {
    let (s, v) = get("/v1/methods").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let names: Vec<&str> = v["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "rome",
            "memit",
            "pmet",
            "alphaedit",
            "kn",
            "ft-l",
            "ft-m",
            "grace",
            "wise",
            "mend",
            "serac"
        ]
    );
    for m in v["methods"].as_array().unwrap() {
        assert!(
            m["defaults"].as_object().is_some_and(|d| !d.is_empty()),
            "{m}"
        );
        assert_eq!(m["hparams_schema"]["type"], "object", "{m}");
    }
    // ROME on the default model: what it needs acquired, and a range from its type's schema.
    let rome = &v["methods"][0];
    assert_eq!(
        rome["resources"],
        json!([
            {"kind": "context_templates", "count": 5, "tokens": 10},
            {"kind": "key_stats", "layers": [4], "samples": 1000},
        ])
    );
    assert_eq!(
        rome["hparams_schema"]["properties"]["v_steps"]["maximum"],
        200
    );
    assert_eq!(v["methods"][5]["resources"], json!([]), "FT needs nothing");
    assert_eq!(
        v["methods"][9]["resources"],
        json!([{"kind": "trained_editor", "method": "mend", "artefact": null}]),
        "MEND needs the newest trained editor"
    );
    assert_eq!(
        v["methods"][10]["resources"],
        json!([{"kind": "trained_editor", "method": "serac", "artefact": null}]),
        "SERAC needs the newest trained classifier"
    );
    assert_eq!(v["methods"][4]["resources"], json!([]), "KN needs nothing");
    assert_eq!(
        v["methods"][2]["resources"][1],
        json!({"kind": "key_stats", "layers": [3, 4, 5, 6, 7], "samples": 1000}),
        "PMET reads MEMIT's statistics"
    );
    assert_eq!(
        v["methods"][3]["resources"][1],
        json!({"kind": "null_space", "layers": [3, 4, 5, 6, 7], "samples": 1000, "threshold": 0.02})
    );
    let id = new_session_at(server(), json!({})).await;
    edit_at(server(), &id, eiffel()).await;
    let text = Client::new()
        .get(format!("{}/metrics", server()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "emend_edits_total{method=\"ft-m\",outcome=\"ok\"}",
        "emend_edit_duration_seconds_count{method=\"ft-m\"}",
        "emend_session_overlay_bytes",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let bytes: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("emend_session_overlay_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes > 0.0, "an edited session holds overlay bytes");
}

#[tokio::test]
async fn edits_survive_kill_9_on_sqlite() {
    restart_keeps_versions(None).await;
}

/// Runs when `EMEND_TEST_DATABASE_URL` names a PostgreSQL database (CI starts one).
#[tokio::test]
async fn edits_survive_kill_9_on_postgres() {
    match std::env::var("EMEND_TEST_DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => restart_keeps_versions(Some(&url)).await,
        _ => eprintln!("EMEND_TEST_DATABASE_URL not set: PostgreSQL restart test not run"),
    }
}

async fn restart_keeps_versions(db: Option<&str>) {
    let dir = temp_dir("edits-restart");
    let first = ChildServer::start(&dir, db);
    let url = first.url.clone();
    // The child runs without keys: the tenant is `default`, and ALICE's header is ignored.
    let id = new_session_at(&url, json!({})).await;
    let [f1, f2, f3] = facts();
    edit_at(&url, &id, f1).await;
    edit_at(&url, &id, f2).await;
    let (s, v) = post_at(
        &url,
        &format!("/v1/sessions/{id}/rollback"),
        json!({"version": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Version 3 is a GRACE edit: its codebook must come back from the log too.
    let (s, v) = post_at(
        &url,
        &format!("/v1/sessions/{id}/edits"),
        json!({"method": "grace", "edits": [f3], "hparams": {"steps": 10}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["version"], 3);
    // Version 4 is a WISE edit: its side memory must come back from the log too.
    let (s, v) = post_at(
        &url,
        &format!("/v1/sessions/{id}/edits"),
        json!({"method": "wise", "edits": [eiffel()], "hparams": {"steps": 5}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["version"], 4);
    let fork = new_session_at(&url, json!({"from": {"session": id, "version": 2}})).await;
    let mut before = Vec::new();
    for version in 0..=4 {
        before.push(probe_at(&url, &id, Some(version)).await);
    }
    let fork_before = probe_at(&url, &fork, None).await;
    let (_, history) = get_at(&url, &format!("/v1/sessions/{id}/edits")).await;
    let (_, session) = get_at(&url, &format!("/v1/sessions/{id}")).await;
    first.kill9();

    let second = ChildServer::start(&dir, db);
    let url = second.url.clone();
    let (_, again) = get_at(&url, &format!("/v1/sessions/{id}")).await;
    assert_eq!(again, session);
    assert_eq!(
        (again["version"].as_u64(), again["edit_count"].as_u64()),
        (Some(4), Some(3))
    );
    let (_, h) = get_at(&url, &format!("/v1/sessions/{id}/edits")).await;
    assert_eq!(h, history, "the log is restored as it was");
    for (version, want) in before.iter().enumerate() {
        assert_eq!(
            &probe_at(&url, &id, Some(version as u64)).await,
            want,
            "version {version} scores bit-identically after the restart"
        );
    }
    assert_eq!(probe_at(&url, &fork, None).await, fork_before);
    // The version counter continues above every restored version.
    let v = edit_at(&url, &id, eiffel()).await;
    assert_eq!(v["version"], 5, "{v}");
}

/// Greedy continuation of `prompt` at the session's current version.
async fn continue_at(id: &str, prompt: &str) -> String {
    let (s, v) = post(
        &format!("/v1/sessions/{id}/generate"),
        json!({"prompt": prompt, "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["text"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn pmet_moves_the_eiffel_tower_over_http_and_kn_reports_its_neurons() {
    let mut f = eiffel();
    f["target_true"] = json!("Paris");
    f["locality_prompts"] =
        json!([{"prompt": "The Louvre is located in the city of", "answer": "Paris"}]);
    let id = new_session_at(server(), json!({})).await;
    let (s, v) = post(
        &format!("/v1/sessions/{id}/edits"),
        json!({"method": "pmet", "edits": [f], "hparams": {"mom2_samples": 400}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let post_edit = &v["versions"][0]["reports"][0]["post"];
    assert_eq!(post_edit["reliability"], 1.0, "{v}");
    assert_eq!(post_edit["locality"], 1.0, "{v}");
    let eiffel_now = continue_at(&id, "The Eiffel Tower is located in the city of").await;
    assert!(eiffel_now.starts_with(" Rome"), "{eiffel_now:?}");
    let louvre = continue_at(&id, "The Louvre is located in the city of").await;
    assert!(louvre.starts_with(" Paris"), "{louvre:?}");

    // KN: what it does is reported, not asserted beyond its own bookkeeping.
    let id = new_session_at(server(), json!({})).await;
    let (s, v) = post(
        &format!("/v1/sessions/{id}/edits"),
        json!({"method": "kn", "edits": [f]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let made = &v["versions"][0];
    assert!(made["diagnostics"]["neurons"].as_u64().unwrap() >= 1, "{v}");
    eprintln!(
        "KN over HTTP: {} neurons; after the edit \"The Eiffel Tower is located in the city of\" → {:?}, reports {}",
        made["diagnostics"]["neurons"],
        continue_at(&id, "The Eiffel Tower is located in the city of").await,
        made["reports"][0]
    );
}

#[tokio::test]
async fn grace_moves_the_eiffel_tower_over_http_and_rolls_back() {
    let mut f = eiffel();
    f["locality_prompts"] =
        json!([{"prompt": "The Louvre is located in the city of", "answer": "Paris"}]);
    let id = new_session_at(server(), json!({})).await;
    let (s, v) = post(
        &format!("/v1/sessions/{id}/edits"),
        json!({"method": "grace", "edits": [f], "hparams": {"steps": 25}}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let made = &v["versions"][0];
    assert_eq!(made["reports"][0]["post"]["reliability"], 1.0, "{v}");
    assert_eq!(made["reports"][0]["post"]["locality"], 1.0, "{v}");
    assert_eq!(made["diagnostics"]["entries"], 1, "{v}");
    let (s, g) = post(
        &format!("/v1/sessions/{id}/generate"),
        json!({"prompt": "The Eiffel Tower is located in the city of", "max_tokens": 16}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{g}");
    assert!(g["text"].as_str().unwrap().starts_with(" Rome"), "{g}");
    let louvre = continue_at(&id, "The Louvre is located in the city of").await;
    assert!(louvre.starts_with(" Paris"), "{louvre:?}");
    let (s, v) = post(
        &format!("/v1/sessions/{id}/rollback"),
        json!({"version": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let eiffel_now = continue_at(&id, "The Eiffel Tower is located in the city of").await;
    assert!(eiffel_now.starts_with(" Paris"), "{eiffel_now:?}");
}
