//! Tokenizer: `tokenizers::Tokenizer` from `tokenizer.json`, or rebuilt from GGUF metadata
//! (byte-level BPE). Chat templates render with minijinja.
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde::Serialize;
use serde_json::json;
use tokenizers::Tokenizer;

use super::gguf::GgufFile;
use super::{ModelError, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    pub eos_id: u32,
    pub eos_token: String,
    pub bos_id: Option<u32>,
    pub bos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Whether `encode` prepends BOS (Llama-2 yes; SmolLM2 and GPT-2 no).
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// How the tokenizer was obtained, for `emend info`.
    pub source: String,
}

impl Tok {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.meta_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2` only); pass a tokenizer.json"
            )));
        }
        let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let gpt2_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match pre {
            // SmolLM2: every digit on its own, then the GPT-2 regex.
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, gpt2_level]}),
            "default" | "gpt-2" | "gpt2" => gpt2_level,
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF pre-tokenizer `{other}` is not supported (smollm, gpt-2); pass a tokenizer.json"
                )))
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            g.meta(key)
                .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata `{key}` is missing")))?
                .to_vec()
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| ModelError::Tokenizer(e.to_string()))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match g.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let added: Vec<_> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(&TOKEN_TYPE_CONTROL) | Some(&TOKEN_TYPE_USER_DEFINED)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types[i] == TOKEN_TYPE_CONTROL})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner = Tokenizer::from_bytes(
            serde_json::to_vec(&spec).map_err(|e| ModelError::Tokenizer(e.to_string()))?,
        )
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let id = |key: &str| g.meta(key).and_then(|v| v.to_u32().ok());
        let eos_id = id("tokenizer.ggml.eos_token_id").ok_or_else(|| {
            ModelError::Tokenizer("GGUF metadata `tokenizer.ggml.eos_token_id` is missing".into())
        })?;
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let name = |i: u32| tokens.get(i as usize).cloned();
        Ok(Self {
            eos_token: name(eos_id)
                .ok_or_else(|| ModelError::Tokenizer("eos id outside the vocabulary".into()))?,
            eos_id,
            bos_token: bos_id.and_then(name),
            bos_id,
            pad_token: id("tokenizer.ggml.padding_token_id").and_then(name),
            add_bos: g
                .meta("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            chat_template: g.meta_str("tokenizer.chat_template").map(str::to_string),
            inner,
            source: format!("GGUF metadata (byte-level BPE, pre-tokenizer `{pre}`)"),
        })
    }

    /// `tokenizer.json`, with `tokenizer_config.json` beside it for special tokens and template.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("`{}`: {e}", path.display())))?;
        let cfg: serde_json::Value = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .filter(|p| p.exists())
            .map(|p| -> Result<serde_json::Value> {
                let s = std::fs::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?;
                serde_json::from_str(&s).map_err(|e| ModelError::Config {
                    path: p,
                    msg: e.to_string(),
                })
            })
            .transpose()?
            .unwrap_or(serde_json::Value::Null);
        let tok_str = |key: &str| -> Option<String> {
            match &cfg[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let eos_token = tok_str("eos_token")
            .or_else(|| {
                ["<|endoftext|>", "</s>", "<|im_end|>"]
                    .iter()
                    .find(|t| inner.token_to_id(t).is_some())
                    .map(|t| t.to_string())
            })
            .ok_or_else(|| {
                ModelError::Tokenizer(format!("`{}`: no eos token found", path.display()))
            })?;
        let eos_id = inner.token_to_id(&eos_token).ok_or_else(|| {
            ModelError::Tokenizer(format!("eos token `{eos_token}` is not in the vocabulary"))
        })?;
        let bos_token = tok_str("bos_token");
        Ok(Self {
            eos_id,
            eos_token,
            bos_id: bos_token.as_deref().and_then(|t| inner.token_to_id(t)),
            bos_token,
            pad_token: tok_str("pad_token"),
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false),
            chat_template: cfg["chat_template"].as_str().map(str::to_string),
            inner,
            source: format!("{}", path.display()),
        })
    }

    /// Token ids of `text`, with BOS first when the model expects it. Special-token strings in
    /// the text map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_plain(text)?;
        if self.add_bos {
            if let Some(b) = self.bos_id {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// Token ids of `text` without BOS (continuations, lm-eval's `add_special_tokens=False`).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders chat messages with the model's template (HF `apply_chat_template`).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::InvalidInput("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib_like::python_methods);
        env.add_template("chat", template)
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))
    }
}

/// The few Python string methods HF chat templates call (`.strip()`, `.startswith()`...).
mod minijinja_contrib_like {
    use minijinja::value::Value;
    use minijinja::{Error, ErrorKind, State};

    pub fn python_methods(
        _state: &State,
        value: &Value,
        method: &str,
        args: &[Value],
    ) -> Result<Value, Error> {
        let Some(s) = value.as_str() else {
            return Err(Error::new(
                ErrorKind::UnknownMethod,
                format!("no method `{method}`"),
            ));
        };
        let arg = |i: usize| args.get(i).and_then(|a| a.as_str()).unwrap_or("");
        Ok(match method {
            "strip" => Value::from(s.trim()),
            "lstrip" => Value::from(s.trim_start()),
            "rstrip" => Value::from(s.trim_end()),
            "startswith" => Value::from(s.starts_with(arg(0))),
            "endswith" => Value::from(s.ends_with(arg(0))),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            _ => {
                return Err(Error::new(
                    ErrorKind::UnknownMethod,
                    format!("no method `{method}`"),
                ))
            }
        })
    }
}
