//! One typed configuration for the server: compiled defaults < TOML file < `EMEND_*`
//! environment < command-line flags, validated at start and logged with secrets redacted.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub bind: String,
    /// GGUF file or Hugging Face directory; unset = the default model (fetched if missing).
    pub model: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// `f32`, `bf16`, `f16`; unset = f32 on CPU, bf16 on CUDA.
    pub dtype: Option<String>,
    /// Server state: the SQLite database `emend.db` (when `database_url` is unset).
    pub state_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; unset = `sqlite://<state_dir>/emend.db`.
    pub database_url: Option<String>,
    /// Dataset directory laid out like `shared/data` (editing datasets, the statistics corpus);
    /// unset = `$EMEND_SHARED_DIR/data`, else `../shared/data` when it exists.
    pub data_dir: Option<PathBuf>,
    /// Where ROME/MEMIT key statistics are cached; unset = `<cache dir>/stats`.
    pub stats_dir: Option<PathBuf>,
    /// Where trained editors (MEND and SERAC artefacts) are stored; unset = `<cache dir>/editors`.
    pub editors_dir: Option<PathBuf>,
    /// Most edits in one `POST /v1/sessions/{id}/edits`.
    pub max_edits_per_request: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_new_tokens: usize,
    /// Most items in one request (log-likelihood pairs, completion prompts).
    pub max_batch_items: usize,
    /// Most stop strings per request, and the longest one (bytes).
    pub max_stop_sequences: usize,
    pub max_stop_len: usize,
    /// Requests admitted per engine lane before 429.
    pub queue_interactive: usize,
    pub queue_edit: usize,
    pub queue_eval: usize,
    /// Seconds evaluation traffic waits for room in its lane before 429.
    pub eval_patience_secs: u64,
    /// Generation requests batched into one forward.
    pub max_generation_batch: usize,
    /// Evaluation jobs waiting to run before submissions answer 429.
    pub max_queued_jobs: usize,
    /// TOML file with `[[keys]] tenant = "…" sha256 = "…"` entries.
    pub api_keys_file: Option<PathBuf>,
    /// `tenant:sha256hex,tenant2:sha256hex`.
    pub api_keys: Option<String>,
    /// Allow listening beyond loopback without API keys.
    pub insecure_open: bool,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// HTTP worker threads.
    pub http_workers: usize,
    /// Comma-separated methods whose resources at their defaults (key statistics, null
    /// spaces, context templates) are made at start-up, in slices between requests, so the
    /// first edit does not wait for them; empty = none.
    pub prepare_methods: String,
    /// JSON file with the canary set the damage guard probes (`name`, `tasks`, `neighbours`);
    /// unset = the built-in `emend-canary-1`.
    pub canary_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            model: None,
            tokenizer: None,
            device: "cpu".into(),
            dtype: None,
            state_dir: default_state_dir(),
            database_url: None,
            data_dir: crate::setup::default_datasets_dir(),
            stats_dir: None,
            editors_dir: None,
            max_edits_per_request: 64,
            max_body_bytes: 1 << 20,
            max_new_tokens: 2048,
            max_batch_items: 256,
            max_stop_sequences: 16,
            max_stop_len: 256,
            queue_interactive: 64,
            queue_edit: 16,
            queue_eval: 256,
            eval_patience_secs: 120,
            max_generation_batch: 8,
            max_queued_jobs: 64,
            api_keys_file: None,
            api_keys: None,
            insecure_open: false,
            shutdown_grace_secs: 30,
            http_workers: 2,
            prepare_methods: String::new(),
            canary_file: None,
        }
    }
}

fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("emend");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/emend")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: `{field}` {msg}")]
    Invalid { field: &'static str, msg: String },
    #[error("`{path}`: {msg}")]
    Keys { path: PathBuf, msg: String },
}

#[derive(Debug, Deserialize)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    tenant: String,
    sha256: String,
}

impl Config {
    /// Defaults < `file` < `EMEND_*` environment. Command-line flags are applied by the caller.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut f = Figment::from(Serialized::defaults(Config::default()));
        if let Some(p) = file {
            f = f.merge(Toml::file_exact(p));
        }
        // Only the keys this struct knows; other EMEND_* variables (EMEND_LOG…) belong elsewhere.
        let known: Vec<String> = serde_json::to_value(Config::default())
            .ok()
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
            .unwrap_or_default();
        f = f.merge(
            Env::prefixed("EMEND_")
                .filter(move |k| known.iter().any(|n| k.as_str().eq_ignore_ascii_case(n))),
        );
        Ok(f.extract().map_err(Box::new)?)
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.state_dir.join("emend.db").display()
            )
        })
    }

    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.bind.parse().map_err(|e| ConfigError::Invalid {
            field: "bind",
            msg: format!("`{}`: {e}", self.bind),
        })
    }

    /// Range checks, and the loopback rule: no keys, no open binding unless told so.
    pub fn validate(&self, keys: &ApiKeys) -> Result<(), ConfigError> {
        let positive = [
            ("max_body_bytes", self.max_body_bytes),
            ("max_new_tokens", self.max_new_tokens),
            ("max_batch_items", self.max_batch_items),
            ("max_edits_per_request", self.max_edits_per_request),
            ("max_stop_len", self.max_stop_len),
            ("queue_interactive", self.queue_interactive),
            ("queue_edit", self.queue_edit),
            ("queue_eval", self.queue_eval),
            ("max_generation_batch", self.max_generation_batch),
            ("max_queued_jobs", self.max_queued_jobs),
            ("http_workers", self.http_workers),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    msg: "must be at least 1".into(),
                });
            }
        }
        self.methods_to_prepare()?;
        let addr = self.bind_addr()?;
        if keys.is_empty() && !addr.ip().is_loopback() && !self.insecure_open {
            return Err(ConfigError::Invalid {
                field: "bind",
                msg: format!(
                    "{addr} is not loopback and no API keys are configured; set api_keys / api_keys_file, or pass --insecure-open"
                ),
            });
        }
        Ok(())
    }

    /// The methods of `prepare_methods`.
    pub fn methods_to_prepare(&self) -> Result<Vec<crate::engine::editing::Method>, ConfigError> {
        self.prepare_methods
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| {
                m.parse().map_err(|e| ConfigError::Invalid {
                    field: "prepare_methods",
                    msg: format!("{e}"),
                })
            })
            .collect()
    }

    /// The canary set: `canary_file`'s, else the built-in one.
    pub fn canary_spec(&self) -> Result<crate::canary::CanarySpec, ConfigError> {
        let Some(path) = &self.canary_file else {
            return Ok(crate::canary::CanarySpec::default());
        };
        let bad = |msg: String| ConfigError::Invalid {
            field: "canary_file",
            msg: format!("`{}`: {msg}", path.display()),
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
    }

    /// Where trained editors (MEND and SERAC artefacts) are stored.
    pub fn editors_dir(&self) -> PathBuf {
        self.editors_dir
            .clone()
            .unwrap_or_else(|| crate::setup::cache_dir().join("editors"))
    }

    /// Where key statistics are cached.
    pub fn stats_dir(&self) -> PathBuf {
        self.stats_dir
            .clone()
            .unwrap_or_else(|| crate::setup::cache_dir().join("stats"))
    }

    /// The effective configuration for the log, secrets hidden.
    pub fn redacted(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(url) = &self.database_url {
            v["database_url"] = crate::store::redact(url).into();
        }
        if self.api_keys.is_some() {
            v["api_keys"] = "***".into();
        }
        v
    }
}

/// API key hashes → tenant. Keys are high-entropy secrets, so a plain SHA-256 is the right hash.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_hash: HashMap<String, String>,
}

impl ApiKeys {
    pub fn from_config(c: &Config) -> Result<Self, ConfigError> {
        let mut keys = Self::default();
        if let Some(p) = &c.api_keys_file {
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Keys {
                path: p.clone(),
                msg: e.to_string(),
            })?;
            let f: KeyFile = toml_from_str(&text).map_err(|msg| ConfigError::Keys {
                path: p.clone(),
                msg,
            })?;
            for k in f.keys {
                keys.add(&k.tenant, &k.sha256)
                    .map_err(|msg| ConfigError::Keys {
                        path: p.clone(),
                        msg,
                    })?;
            }
        }
        if let Some(list) = &c.api_keys {
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (tenant, hash) = entry.split_once(':').ok_or(ConfigError::Invalid {
                    field: "api_keys",
                    msg: "expected `tenant:sha256hex` entries separated by commas".into(),
                })?;
                keys.add(tenant, hash).map_err(|msg| ConfigError::Invalid {
                    field: "api_keys",
                    msg,
                })?;
            }
        }
        Ok(keys)
    }

    fn add(&mut self, tenant: &str, hash: &str) -> Result<(), String> {
        let hash = hash.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "tenant `{tenant}`: the key hash must be 64 hex characters (sha256)"
            ));
        }
        if tenant.is_empty() {
            return Err("empty tenant name".into());
        }
        self.by_hash.insert(hash, tenant.to_string());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The tenant a presented key belongs to.
    pub fn tenant_for(&self, key: &str) -> Option<&str> {
        self.by_hash
            .get(&sha256_hex(key.as_bytes()))
            .map(String::as_str)
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn toml_from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_tenants_and_open_binding_needs_them() {
        let mut c = Config {
            api_keys: Some(format!("alice:{}", sha256_hex(b"k1"))),
            ..Config::default()
        };
        let keys = ApiKeys::from_config(&c).unwrap();
        assert_eq!(keys.tenant_for("k1"), Some("alice"));
        assert_eq!(keys.tenant_for("k2"), None);
        c.bind = "0.0.0.0:8080".into();
        assert!(c.validate(&keys).is_ok());
        assert!(c.validate(&ApiKeys::default()).is_err());
        c.insecure_open = true;
        assert!(c.validate(&ApiKeys::default()).is_ok());
        c.api_keys = Some("bob:nothex".into());
        assert!(ApiKeys::from_config(&c).is_err());
    }

    #[test]
    fn zero_limits_are_refused() {
        let c = Config {
            queue_eval: 0,
            ..Config::default()
        };
        let e = c.validate(&ApiKeys::default()).unwrap_err().to_string();
        assert!(e.contains("queue_eval"), "{e}");
    }

    #[test]
    fn methods_to_prepare_are_registered_methods() {
        let mut c = Config {
            prepare_methods: " rome, memit ".into(),
            ..Config::default()
        };
        let names: Vec<_> = c
            .methods_to_prepare()
            .unwrap()
            .iter()
            .map(|m| m.name())
            .collect();
        assert_eq!(names, ["rome", "memit"]);
        c.prepare_methods = "rome,rosa".into();
        let e = c.validate(&ApiKeys::default()).unwrap_err().to_string();
        assert!(e.contains("prepare_methods") && e.contains("rosa"), "{e}");
    }
}
