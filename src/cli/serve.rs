//! `emend serve`: the long-running server.
use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use emend::config::{ApiKeys, Config};

use super::Global;

#[derive(Args)]
pub struct ServeArgs {
    /// TOML configuration file (see README, "Configuration").
    #[arg(long, env = "EMEND_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    pub bind: Option<String>,
    /// Server state (the SQLite database) [default: $XDG_DATA_HOME/emend].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Dataset directory laid out like shared/data (editing datasets, statistics corpus).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// sqlite://… or postgres://…
    #[arg(long)]
    pub database_url: Option<String>,
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// Listen beyond loopback without API keys (anyone who can reach the port can use it).
    #[arg(long)]
    pub insecure_open: bool,
}

pub fn run(g: &Global, a: ServeArgs) -> Result<()> {
    let mut cfg = Config::load(a.config.as_deref())?;
    if let Some(v) = a.bind {
        cfg.bind = v;
    }
    if let Some(v) = a.state_dir {
        cfg.state_dir = v;
    }
    if let Some(v) = a.data_dir {
        cfg.data_dir = Some(v);
    }
    if let Some(v) = a.database_url {
        cfg.database_url = Some(v);
    }
    if let Some(v) = a.api_keys_file {
        cfg.api_keys_file = Some(v);
    }
    if a.insecure_open {
        cfg.insecure_open = true;
    }
    if let Some(v) = &g.model {
        cfg.model = Some(v.clone());
    }
    if let Some(v) = &g.tokenizer {
        cfg.tokenizer = Some(v.clone());
    }
    if let Some(v) = &g.device {
        cfg.device = v.clone();
    }
    if let Some(v) = &g.dtype {
        cfg.dtype = Some(v.clone());
    }
    let keys = ApiKeys::from_config(&cfg)?;
    cfg.validate(&keys)?;
    tracing::info!(config = %cfg.redacted(), "effective configuration");
    let global = Global {
        model: cfg.model.clone(),
        tokenizer: cfg.tokenizer.clone(),
        device: Some(cfg.device.clone()),
        dtype: cfg.dtype.clone(),
        ..g.clone()
    };
    let model = super::load(&global)?;
    let listener =
        TcpListener::bind(cfg.bind_addr()?).with_context(|| format!("binding {}", cfg.bind))?;
    actix_web::rt::System::new().block_on(async move {
        let running = emend::server::start(&cfg, keys, model, listener).await?;
        eprintln!("emend listening on http://{}", running.addr);
        running.wait().await
    })
}
