//! An emend server for HTTP tests: in-process (its own actix system on a thread) on a random
//! loopback port, or the real binary as a child process (for kill -9 restarts).
#![allow(dead_code)]
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use emend::config::{sha256_hex, ApiKeys, Config};
use emend::engine::model::{LoadOptions, LoadedModel, ModelSource};

pub const ALICE: &str = "alice-key-0123456789";
pub const BOB: &str = "bob-key-9876543210";

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("emend-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn keys_config(state_dir: &Path) -> Config {
    Config {
        state_dir: state_dir.to_path_buf(),
        api_keys: Some(format!(
            "alice:{},bob:{}",
            sha256_hex(ALICE.as_bytes()),
            sha256_hex(BOB.as_bytes())
        )),
        ..Config::default()
    }
}

/// Starts a server in-process; returns its base URL. It runs until the test binary exits.
pub fn spawn_in_process(cfg: Config) -> String {
    let keys = ApiKeys::from_config(&cfg).unwrap();
    cfg.validate(&keys).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let model_path = super::default_model_path();
    std::thread::spawn(move || {
        let model = LoadedModel::load(
            &ModelSource::from_path(&model_path).unwrap(),
            &LoadOptions::default(),
        )
        .unwrap();
        actix_web::rt::System::new().block_on(async move {
            let running = emend::server::start(&cfg, keys, model, listener)
                .await
                .unwrap();
            running.wait().await.unwrap();
        });
    });
    let url = format!("http://{addr}");
    wait_ready(&url);
    url
}

pub fn wait_ready(url: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if let Ok(mut s) = std::net::TcpStream::connect(url.trim_start_matches("http://")) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("server at {url} did not become ready");
}

/// The real binary as a child process (killed on drop).
pub struct ChildServer {
    pub child: Child,
    pub url: String,
}

impl ChildServer {
    pub fn start(state_dir: &Path, database_url: Option<&str>) -> Self {
        Self::start_with_env(state_dir, database_url, &[])
    }

    /// [`ChildServer::start`] with extra `EMEND_*` variables (data dir, canary file).
    pub fn start_with_env(
        state_dir: &Path,
        database_url: Option<&str>,
        env: &[(&str, &Path)],
    ) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_emend"));
        cmd.args([
            "serve",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
            state_dir.to_str().unwrap(),
        ])
        .env("EMEND_MODEL", super::default_model_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(u) = database_url {
            cmd.args(["--database-url", u]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("emend serve starts");
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(&url);
        Self { child, url }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
