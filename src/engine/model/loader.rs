//! Picks the architecture from a model file or directory and loads weights and tokenizer.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::gguf::GgufFile;
use super::gpt2::{Gpt2, Gpt2Config};
use super::gpt_neox::{GptNeox, GptNeoxConfig};
use super::hf::{read_config, safetensors_files, ArchProbe};
use super::llama::{Llama, LlamaConfig};
use super::{CausalLm, ModelError, ModelSpec, Result, Tok};

/// Where weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelSource {
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Self::HfDir(path.to_path_buf()))
        } else if path.exists() {
            Ok(Self::Gguf(path.to_path_buf()))
        } else {
            Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfDir(p) => p,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda(usize),
}

impl DeviceKind {
    pub fn device(self) -> Result<Device> {
        Ok(match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(i) => Device::new_cuda(i)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: DeviceKind,
    /// Compute dtype; default f32 on CPU, bf16 on CUDA.
    pub dtype: Option<DType>,
    /// Overrides the tokenizer found with the model.
    pub tokenizer: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceKind::Cpu,
            dtype: None,
            tokenizer: None,
        }
    }
}

/// Facts about a loaded model, for `emend info` and `/v1/model`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub format: &'static str,
    pub sha256: String,
    #[serde(flatten)]
    pub spec: ModelSpec,
    pub dtype: String,
    pub device: String,
    pub tokenizer: String,
    pub tokenizer_vocab_size: usize,
    pub eos_token: String,
    pub has_chat_template: bool,
    pub load_seconds: f64,
}

pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tok,
    pub info: ModelInfo,
}

impl LoadedModel {
    pub fn load(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let start = Instant::now();
        let device = opts.device.device()?;
        let dtype = opts.dtype.unwrap_or(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        });
        let _span = tracing::info_span!("load_model", path = %source.path().display()).entered();
        let (model, tokenizer, format): (Box<dyn CausalLm>, Tok, &'static str) = match source {
            ModelSource::Gguf(path) => {
                let mut g = GgufFile::open(path)?;
                let arch = g.architecture()?.to_string();
                if !matches!(arch.as_str(), "llama" | "mistral") {
                    return Err(ModelError::UnsupportedArchitecture(format!(
                        "{arch} (GGUF files are supported for llama/mistral; use a Hugging Face directory)"
                    )));
                }
                let cfg = g
                    .llama_config()?
                    .resolve()
                    .map_err(|msg| ModelError::Gguf {
                        path: path.clone(),
                        msg,
                    })?;
                let tensors = g.llama_tensors(cfg.n_heads, cfg.n_kv_heads)?;
                let vb = VarBuilder::from_tensors(tensors, dtype, &device);
                let model = Llama::load(vb, cfg)?;
                let tok = match &opts.tokenizer {
                    Some(p) => Tok::from_file(p)?,
                    None => Tok::from_gguf(&g)?,
                };
                (Box::new(model), tok, "gguf")
            }
            ModelSource::HfDir(dir) => {
                let (cfg_path, text) = read_config(dir)?;
                let bad = |e: serde_json::Error| ModelError::Config {
                    path: cfg_path.clone(),
                    msg: e.to_string(),
                };
                let probe: ArchProbe = serde_json::from_str(&text).map_err(bad)?;
                let kind = probe
                    .model_type
                    .clone()
                    .or_else(|| probe.architectures.first().cloned())
                    .unwrap_or_default();
                let files = safetensors_files(dir)?;
                for f in &files {
                    if !f.exists() {
                        return Err(ModelError::io(
                            f,
                            std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "weight shard missing",
                            ),
                        ));
                    }
                }
                // SAFETY: the files are memory-mapped read-only; emend never writes model files.
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &device)? };
                let model: Box<dyn CausalLm> = match kind.as_str() {
                    "llama" | "mistral" | "qwen2" | "LlamaForCausalLM" | "MistralForCausalLM" => {
                        let cfg: LlamaConfig = serde_json::from_str(&text).map_err(bad)?;
                        let cfg = cfg.resolve().map_err(|msg| ModelError::Config {
                            path: cfg_path.clone(),
                            msg,
                        })?;
                        Box::new(Llama::load(vb, cfg)?)
                    }
                    "gpt2" | "GPT2LMHeadModel" => {
                        let cfg: Gpt2Config = serde_json::from_str(&text).map_err(bad)?;
                        cfg.validate().map_err(|msg| ModelError::Config {
                            path: cfg_path.clone(),
                            msg,
                        })?;
                        Box::new(Gpt2::load(vb, cfg)?)
                    }
                    "gpt_neox" | "GPTNeoXForCausalLM" => {
                        let cfg: GptNeoxConfig = serde_json::from_str(&text).map_err(bad)?;
                        Box::new(GptNeox::load(vb, cfg)?)
                    }
                    other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
                };
                let tok_path = opts
                    .tokenizer
                    .clone()
                    .unwrap_or_else(|| dir.join("tokenizer.json"));
                (model, Tok::from_file(&tok_path)?, "safetensors")
            }
        };
        let spec = model.spec().clone();
        if tokenizer.vocab_size() > spec.vocab_size {
            return Err(ModelError::TokenizerMismatch {
                tokenizer: tokenizer.vocab_size(),
                model: spec.vocab_size,
            });
        }
        let path = source.path().to_path_buf();
        let info = ModelInfo {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: fingerprint(source)?,
            path,
            format,
            spec,
            dtype: format!("{dtype:?}").to_lowercase(),
            device: match opts.device {
                super::DeviceKind::Cpu => "cpu".into(),
                super::DeviceKind::Cuda(i) => format!("cuda:{i}"),
            },
            tokenizer: tokenizer.source.clone(),
            tokenizer_vocab_size: tokenizer.vocab_size(),
            eos_token: tokenizer.eos_token.clone(),
            has_chat_template: tokenizer.chat_template.is_some(),
            load_seconds: start.elapsed().as_secs_f64(),
        };
        tracing::info!(seconds = info.load_seconds, arch = %info.spec.architecture, "model loaded");
        Ok(Self {
            model,
            tokenizer,
            info,
        })
    }
}

/// sha256 of the model file, or of config + weight files in order for a directory.
pub fn fingerprint(source: &ModelSource) -> Result<String> {
    let files = match source {
        ModelSource::Gguf(p) => vec![p.clone()],
        ModelSource::HfDir(d) => {
            let mut f = vec![d.join("config.json")];
            f.extend(safetensors_files(d)?);
            f
        }
    };
    let mut h = Sha256::new();
    for f in files {
        let mut file = std::fs::File::open(&f).map_err(|e| ModelError::io(&f, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| ModelError::io(&f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}
