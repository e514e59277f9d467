//! White-box transformer runtime: architectures on candle, loaders, tokenizer, hooks at named
//! sites, KV cache, generation and log-likelihood scoring.
mod arch;
pub mod batch;
mod error;
mod fastmath;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod gpt_neox;
pub mod hf;
mod hooks;
mod kernels;
mod kv_cache;
mod layers;
pub mod llama;
pub mod loader;
pub mod sampling;
pub mod score;
pub mod tokenizer;
mod weights;

pub use arch::{Architecture, CausalLm, Conditioning, ModelSpec};
pub use batch::Forward;
pub use error::{ModelError, Result};
pub(crate) use hooks::{gather_rows, patch_rows};
pub use hooks::{HookAction, Hooks, PatchMode, Positions, Site, SiteKind};
pub use kv_cache::KvCache;
pub use loader::{DeviceKind, LoadOptions, LoadedModel, ModelSource};
pub use tokenizer::Tok;
pub use weights::{Linear, WeightId};
