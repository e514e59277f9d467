//! GGUF files: metadata, dequantised tensors under Hugging Face names, and the tokenizer.
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::llama::{LlamaConfig, RopeParameters};
use super::{ModelError, Result};

pub struct GgufFile {
    pub content: Content,
    file: File,
    path: std::path::PathBuf,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| ModelError::Gguf {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            content,
            file,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_u32(&self, key: &str) -> Result<u32> {
        self.meta(key)
            .ok_or_else(|| self.err(format!("metadata `{key}` is missing")))?
            .to_u32()
            .map_err(|e| self.err(format!("metadata `{key}`: {e}")))
    }

    pub fn meta_f32(&self, key: &str) -> Result<f32> {
        self.meta(key)
            .ok_or_else(|| self.err(format!("metadata `{key}` is missing")))?
            .to_f32()
            .map_err(|e| self.err(format!("metadata `{key}`: {e}")))
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")
            .ok_or_else(|| self.err("metadata `general.architecture` is missing"))
    }

    /// The Llama config encoded in `llama.*` metadata, as if read from `config.json`.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let a = self.architecture()?.to_string();
        let key = |k: &str| format!("{a}.{k}");
        let heads = self.meta_u32(&key("attention.head_count"))? as usize;
        let vocab = match self.meta(&key("vocab_size")) {
            Some(v) => v.to_u32().map_err(|e| self.err(e.to_string()))? as usize,
            None => self.tensor_rows("token_embd.weight")?,
        };
        Ok(LlamaConfig {
            hidden_size: self.meta_u32(&key("embedding_length"))? as usize,
            intermediate_size: self.meta_u32(&key("feed_forward_length"))? as usize,
            num_hidden_layers: self.meta_u32(&key("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: self
                .meta_u32(&key("attention.head_count_kv"))
                .ok()
                .map(|v| v as usize),
            head_dim: None,
            vocab_size: vocab,
            rms_norm_eps: self.meta_f32(&key("attention.layer_norm_rms_epsilon"))? as f64,
            rope_theta: Some(self.meta_f32(&key("rope.freq_base")).unwrap_or(10_000.0) as f64),
            rope_parameters: None::<RopeParameters>,
            max_position_embeddings: self.meta_u32(&key("context_length"))? as usize,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            sliding_window: self
                .meta_u32(&key("attention.sliding_window"))
                .ok()
                .map(|v| v as usize),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            mlp_bias: false,
            hidden_act: None,
        })
    }

    fn tensor_rows(&self, name: &str) -> Result<usize> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        Ok(info.shape.dims()[0])
    }

    /// Every tensor dequantised to f32 on the CPU, renamed to Hugging Face names, with the
    /// Q/K rows put back in HF order (llama.cpp permutes them for its interleaved RoPE).
    pub fn llama_tensors(
        &mut self,
        n_heads: usize,
        n_kv_heads: usize,
    ) -> Result<HashMap<String, Tensor>> {
        let names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        let mut out = HashMap::with_capacity(names.len());
        for name in names {
            let Some(hf) = hf_name(&name) else {
                continue; // e.g. rope_freqs: derived, not a weight we need
            };
            let q = self
                .content
                .tensor(&mut self.file, &name, &Device::Cpu)
                .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
            let mut t = q.dequantize(&Device::Cpu)?;
            if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                t = unpermute(&t, n_heads)?;
            } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                t = unpermute(&t, n_kv_heads)?;
            }
            out.insert(hf, t);
        }
        Ok(out)
    }
}

/// llama.cpp tensor name → Hugging Face name.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

/// Inverse of llama.cpp's `permute`: rows grouped per head as (d/2, 2) go back to (2, d/2).
fn unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").unwrap(),
            "model.layers.12.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_q.weight").unwrap(),
            "model.layers.0.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, d/2, in).swapaxes(1, 2).reshape(w.shape)
        let dev = Device::Cpu;
        let w = Tensor::arange(0f32, 32., &dev)
            .unwrap()
            .reshape((8, 4))
            .unwrap();
        let permuted = w
            .reshape((2, 2, 2, 4))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((8, 4))
            .unwrap();
        let back = unpermute(&permuted, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
