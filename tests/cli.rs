//! The `emend` binary end to end: results on stdout, clear errors and a non-zero exit on bad input.
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn emend(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_emend"))
        .args(args)
        .env("EMEND_MODEL", default_model_path())
        .output()
        .expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny_dir() -> String {
    fixtures_dir().join("golden/llama").display().to_string()
}

#[test]
fn generate_names_paris() {
    let o = emend(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.starts_with("The capital of France is Paris"), "{out}");
}

#[test]
fn score_and_info_print_json() {
    let o = emend(&[
        "score",
        "--context",
        "The capital of France is",
        "--continuation",
        " Paris",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!((v["logprob"].as_f64().unwrap() - -0.25807).abs() < 1e-3);
    assert_eq!(v["is_greedy"], true);

    let o = emend(&["info", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["n_layers"], 30);
    assert_eq!(v["sha256"], emend::setup::DEFAULT_SHA256);
    assert_eq!(v["dtype"], "f32");
}

#[test]
fn missing_model_file_is_named() {
    let o = emend(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("/nonexistent/model.gguf") && !e.contains("panicked"),
        "{e}"
    );
}

#[test]
fn corrupt_model_file_is_rejected() {
    let dir = tempdir();
    let bad = dir.join("broken.gguf");
    std::fs::write(&bad, b"this is not a gguf file at all").unwrap();
    let o = emend(&["info", "--model", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("broken.gguf") && e.contains("not a valid GGUF"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempdir();
    copy_dir(&fixtures_dir().join("golden/llama"), &dir);
    let cfg = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["model_type"] = "bert".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let o = emend(&["info", "--model", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unsupported architecture `bert`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn tokenizer_larger_than_the_embedding_is_a_mismatch() {
    let dir = tempdir();
    copy_dir(&fixtures_dir().join("golden/llama"), &dir);
    let tp = dir.join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tp).unwrap()).unwrap();
    let added = v["added_tokens"].as_array_mut().unwrap();
    for i in 0..20 {
        added.push(serde_json::json!({"id": 257 + i, "content": format!("<extra_{i}>"), "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    std::fs::write(&tp, v.to_string()).unwrap();
    let o = emend(&["info", "--model", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("tokenizer does not match the model"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn prompt_longer_than_the_context_names_the_limit() {
    // the tiny model has a 128-token context and one token per byte
    let long = "x".repeat(300);
    let o = emend(&[
        "generate",
        "--model",
        &tiny_dir(),
        "--prompt",
        &long,
        "--max-tokens",
        "4",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("300 tokens") && e.contains("context length is 128"),
        "{e}"
    );
}

#[test]
fn zero_max_tokens_is_refused() {
    let o = emend(&["generate", "--prompt", "hi", "--max-tokens", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--max-tokens"), "{}", stderr(&o));
}

#[test]
fn eval_session_file_evaluates_the_edited_model() {
    let dir = tempdir();
    let data = shared_dir().join("data").display().to_string();
    let edits = dir.join("edits.jsonl");
    std::fs::write(
        &edits,
        concat!(
            r#"{"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}"#,
            "\n\n",
            r#"{"dataset": "counterfact", "id": 0}"#,
            "\n"
        ),
    )
    .unwrap();
    let edits = edits.display().to_string();
    let eval = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "--json",
            "eval",
            "--tasks",
            "lambada_openai",
            "--limit",
            "3",
            "--data-dir",
            &data,
        ];
        args.extend_from_slice(extra);
        let o = emend(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let ppl = |v: &serde_json::Value| {
        v["results"]["lambada_openai"]["perplexity"]
            .as_f64()
            .unwrap()
    };
    let base = eval(&[]);
    let edited = eval(&[
        "--session-file",
        &edits,
        "--method",
        "ft-m",
        "--hparams",
        r#"{"steps": 3}"#,
    ]);
    assert_ne!(ppl(&base), ppl(&edited), "the edits are applied");

    // A record that does not exist is named with its line.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"dataset\": \"counterfact\", \"id\": 987654321}\n").unwrap();
    let o = emend(&[
        "eval",
        "--tasks",
        "lambada_openai",
        "--data-dir",
        &data,
        "--session-file",
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("line 1") && e.contains("987654321"), "{e}");
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "emend-cli-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn sweep_writes_its_curve() {
    let out = tempdir();
    let data = shared_dir().join("data").display().to_string();
    let o = emend(&[
        "sweep",
        "--method",
        "ft-m",
        "--n-edits",
        "1",
        "--checkpoints",
        "0,1",
        "--tasks",
        "arc_easy",
        "--limit",
        "2",
        "--hparams",
        r#"{"steps": 2}"#,
        "--data-dir",
        &data,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(out.join("curve.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[0].starts_with("method,n_edits,version,edit."),
        "{csv}"
    );
    assert!(lines[0].contains(",edit.reliability,"), "{csv}");
    assert!(lines[0].contains(",edit_at_apply.reliability,"), "{csv}");
    assert!(lines[0].contains("arc_easy.acc"), "{csv}");
    assert!(lines[2].starts_with("ft-m,1,1,"), "{csv}");
    assert_eq!(String::from_utf8(o.stdout).unwrap(), csv);
    let svg = std::fs::read_to_string(out.join("curve.svg")).unwrap();
    assert!(
        svg.contains("<polyline") && svg.contains("arc_easy acc_norm"),
        "{svg}"
    );
    let png = std::fs::read(out.join("curve.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("curve.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 2);

    let o = emend(&[
        "sweep",
        "--n-edits",
        "2",
        "--checkpoints",
        "0,3",
        "--tasks",
        "arc_easy",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--checkpoints"), "{}", stderr(&o));

    // Several methods: one line each, hparams keyed by method, the base row shared.
    let two = tempdir();
    let o = emend(&[
        "sweep",
        "--method",
        "ft-m,ft-l",
        "--n-edits",
        "1",
        "--checkpoints",
        "0,1",
        "--tasks",
        "arc_easy",
        "--limit",
        "2",
        "--hparams",
        r#"{"ft-m": {"steps": 2}, "ft-l": {"steps": 2}}"#,
        "--data-dir",
        &data,
        "--out",
        two.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(two.join("curve.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    let heads: Vec<&str> = rows.iter().map(|l| &l[..l.find(',').unwrap()]).collect();
    assert_eq!(heads, ["ft-m", "ft-m", "ft-l", "ft-l"], "{csv}");
    let cells = |l: &str| l.split(',').skip(1).map(String::from).collect::<Vec<_>>();
    assert_eq!(
        cells(rows[0]),
        cells(rows[2]),
        "the base row is shared: {csv}"
    );
    for bad in [r#"{"rome": {}}"#, r#"{"ft-l": {"bogus": 1}}"#] {
        let o = emend(&[
            "sweep",
            "--method",
            "ft-m,ft-l",
            "--n-edits",
            "1",
            "--checkpoints",
            "0,1",
            "--tasks",
            "arc_easy",
            "--hparams",
            bad,
            "--data-dir",
            &data,
            "--out",
            two.to_str().unwrap(),
        ]);
        assert!(!o.status.success(), "{bad} accepted");
        assert!(stderr(&o).contains("hparams."), "{}", stderr(&o));
    }
}

#[test]
fn bench_eval_times_tasks_beside_the_peer_and_writes_its_section() {
    let dir = tempdir();
    let data = shared_dir().join("data").display().to_string();
    let peer = dir.join("peer.json");
    // A peer report in scripts/bench_eval_peer.py's format (its numbers are the peer's, not
    // checked here: only that the table sets them beside emend's).
    std::fs::write(
        &peer,
        r#"{"peer": "lm-eval test peer", "limit": 2, "threads": 2, "peak_rss_mb": 1234.0,
            "tasks": {"arc_easy": {"wall_s": 10.0, "cpu_s": 20.0, "docs": 2, "requests": 8,
                                   "metrics": {"acc": 0.5}}}}"#,
    )
    .unwrap();
    let md = dir.join("BENCH.md");
    std::fs::write(&md, "# Benchmarks\n\nkept\n").unwrap();
    let args = [
        "bench-eval",
        "--tasks",
        "arc_easy",
        "--limit",
        "2",
        "--data-dir",
        &data,
        "--peer",
        peer.to_str().unwrap(),
        "--write-md",
        md.to_str().unwrap(),
    ];
    let o = emend(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.starts_with("# Benchmarks\n\nkept\n"), "{text}");
    assert!(text.contains("<!-- eval-bench:start -->"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("| arc_easy | 2 | 8 ("))
        .unwrap_or_else(|| panic!("no arc_easy row with 2 docs, 8 requests: {text}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // peer wall, peer docs/s, peer CPU, peer acc come from the report
    assert_eq!(
        (cells[6], cells[7], cells[10], cells[12]),
        ("10.0", "0.20", "20.0", "0.5000")
    );
    assert!(
        text.contains("lm-eval test peer") && text.contains("peer 1234 MB"),
        "{text}"
    );

    // A peer run with another limit is refused rather than compared.
    let mut other = args.to_vec();
    other[4] = "3";
    let o = emend(&other);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("limit"), "{}", stderr(&o));
}

#[test]
fn chart_draws_separate_sweeps_as_one_curve() {
    let dir = std::env::temp_dir().join(format!("emend-chart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    let curve = r#"{"columns": ["method", "n_edits", "version", "edit.reliability", "lambada_openai.acc"],
        "rows": [["rome", 0, 0, null, 0.3], ["rome", 10, 10, 1.0, 0.25]]}"#;
    std::fs::write(dir.join("a/curve.json"), curve).unwrap();
    std::fs::write(dir.join("b.json"), curve).unwrap();
    let (a, b, out) = (
        dir.join("a").display().to_string(),
        dir.join("b.json").display().to_string(),
        dir.join("out").display().to_string(),
    );
    let o = emend(&[
        "chart",
        "--curve",
        &a,
        "--curve",
        &format!("rome+early-stop={b}"),
        "--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(dir.join("out/curve.csv")).unwrap();
    assert_eq!(
        csv,
        "method,n_edits,version,edit.reliability,lambada_openai.acc\n\
         rome,0,0,,0.3\nrome,10,10,1,0.25\n\
         rome+early-stop,0,0,,0.3\nrome+early-stop,10,10,1,0.25\n"
    );
    // The same method twice without a label is two lines of one name: refused.
    let o = emend(&["chart", "--curve", &a, "--curve", &b, "--out", &out]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("give one a LABEL="), "{}", stderr(&o));
}
