//! Closed-loop HTTP load generator for emend (loopback only). For each concurrency level, that
//! many clients send requests back to back for a fixed time; reports requests/s, latency
//! percentiles, time to first token (streamed generation), tokens/s, 429s and errors as a
//! markdown table.
//!
//!   cargo run --release --example loadgen -- --url http://127.0.0.1:8080 --session ID \
//!       --endpoint generate --concurrency 1,8,32 --seconds 20
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

struct Args {
    url: String,
    session: String,
    key: Option<String>,
    endpoint: String,
    concurrency: Vec<usize>,
    seconds: u64,
    max_tokens: usize,
}

fn parse() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        session: String::new(),
        key: None,
        endpoint: "generate".into(),
        concurrency: vec![1, 8, 32],
        seconds: 20,
        max_tokens: 32,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"))
            .clone();
        match flag.as_str() {
            "--url" => a.url = v,
            "--session" => a.session = v,
            "--key" => a.key = Some(v),
            "--endpoint" => a.endpoint = v,
            "--concurrency" => {
                a.concurrency = v.split(',').map(|x| x.parse().expect("number")).collect()
            }
            "--seconds" => a.seconds = v.parse().expect("seconds"),
            "--max-tokens" => a.max_tokens = v.parse().expect("max tokens"),
            other => panic!("unknown flag {other}"),
        }
    }
    let host = a
        .url
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap_or("");
    assert!(
        host == "127.0.0.1" || host == "localhost" || host == "[::1]",
        "load tests only target loopback"
    );
    assert!(!a.session.is_empty(), "--session is required");
    a
}

#[derive(Default)]
struct Stats {
    latencies: Vec<f64>,
    ttft: Vec<f64>,
    tokens: u64,
    ok: u64,
    limited: u64,
    errors: u64,
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "The Eiffel Tower is located in the city of",
    "List three colours:",
];

async fn one(client: &reqwest::Client, a: &Args, i: usize, st: &mut Stats) {
    let start = Instant::now();
    let mut req = match a.endpoint.as_str() {
        "generate" => client
            .post(format!("{}/v1/sessions/{}/generate", a.url, a.session))
            .json(&json!({"prompt": PROMPTS[i % 4], "max_tokens": a.max_tokens, "stream": true})),
        "loglikelihood" => client
            .post(format!("{}/v1/sessions/{}/loglikelihood", a.url, a.session))
            .json(&json!({"requests": [
            {"context": "The capital of France is", "continuation": " Paris"},
            {"context": "The Eiffel Tower is located in the city of", "continuation": " Rome"},
            {"context": "Water boils at", "continuation": " 100 degrees Celsius"},
            {"context": "The largest planet is", "continuation": " Jupiter"}]})),
        other => panic!("unknown endpoint {other}"),
    };
    if let Some(k) = &a.key {
        req = req.bearer_auth(k);
    }
    let resp = match req.timeout(Duration::from_secs(120)).send().await {
        Ok(r) => r,
        Err(_) => {
            st.errors += 1;
            return;
        }
    };
    match resp.status().as_u16() {
        200 => {}
        429 => {
            st.limited += 1;
            // back off as Retry-After asks (1 s), so overload is measured, not hammered
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        _ => {
            st.errors += 1;
            return;
        }
    }
    if a.endpoint == "generate" {
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        let mut first = true;
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else {
                st.errors += 1;
                return;
            };
            if first {
                st.ttft.push(start.elapsed().as_secs_f64());
                first = false;
            }
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
        if let Some(done) = buf.split("event: done\ndata: ").nth(1) {
            let v: Value = serde_json::from_str(done.trim()).unwrap_or(Value::Null);
            st.tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        } else {
            st.errors += 1;
            return;
        }
    } else if resp.bytes().await.is_err() {
        st.errors += 1;
        return;
    }
    st.ok += 1;
    st.latencies.push(start.elapsed().as_secs_f64());
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let a = std::sync::Arc::new(parse());
    let client = reqwest::Client::new();
    println!("| endpoint | concurrency | requests/s | p50 s | p95 s | p99 s | TTFT p50 s | tokens/s | 429s | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &a.concurrency {
        let deadline = Instant::now() + Duration::from_secs(a.seconds);
        let start = Instant::now();
        let tasks: Vec<_> = (0..c)
            .map(|w| {
                let (a, client) = (a.clone(), client.clone());
                tokio::spawn(async move {
                    let mut st = Stats::default();
                    let mut i = w;
                    while Instant::now() < deadline {
                        one(&client, &a, i, &mut st).await;
                        i += c;
                    }
                    st
                })
            })
            .collect();
        let mut all = Stats::default();
        for t in tasks {
            let s = t.await.expect("worker");
            all.latencies.extend(s.latencies);
            all.ttft.extend(s.ttft);
            all.tokens += s.tokens;
            all.ok += s.ok;
            all.limited += s.limited;
            all.errors += s.errors;
        }
        let secs = start.elapsed().as_secs_f64();
        let tps = if a.endpoint == "generate" {
            format!("{:.1}", all.tokens as f64 / secs)
        } else {
            "—".into()
        };
        let ttft = if a.endpoint == "generate" {
            format!("{:.3}", pct(&mut all.ttft, 0.5))
        } else {
            "—".into()
        };
        println!(
            "| {} | {c} | {:.2} | {:.3} | {:.3} | {:.3} | {ttft} | {tps} | {} | {} |",
            a.endpoint,
            all.ok as f64 / secs,
            pct(&mut all.latencies, 0.5),
            pct(&mut all.latencies, 0.95),
            pct(&mut all.latencies, 0.99),
            all.limited,
            all.errors
        );
    }
}
