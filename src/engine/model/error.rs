use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model file `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid GGUF file: {msg}")]
    Gguf { path: PathBuf, msg: String },
    #[error("`{path}`: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("unsupported architecture `{0}` (supported: llama, mistral, gpt2, gpt_neox)")]
    UnsupportedArchitecture(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("tokenizer does not match the model: tokenizer has {tokenizer} tokens, the embedding has {model} rows")]
    TokenizerMismatch { tokenizer: usize, model: usize },
    #[error("input has {tokens} tokens; the model's context length is {limit}")]
    ContextOverflow { tokens: usize, limit: usize },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
