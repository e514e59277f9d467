//! Llama family (Llama-2, Mistral incl. sliding window, SmolLM2): RoPE, GQA, RMSNorm, SwiGLU.
//! Tensor names follow Hugging Face's `state_dict` (`model.layers.{i}.mlp.down_proj.weight`).
use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::hooks::at_site;
use super::layers::{attention, get, split_heads, Proj, RmsNorm, Rope};
use super::weights::missing;
use super::{Architecture, CausalLm, Forward, ModelError, ModelSpec, Result, Site, SiteKind};
use super::{Linear, WeightId};

/// Mirror of a Hugging Face `config.json` for `LlamaForCausalLM` / `MistralForCausalLM`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    /// transformers ≥ 5 moves `rope_theta` here.
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub hidden_act: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_ctx() -> usize {
    4096
}

/// Resolved configuration: no options left.
#[derive(Debug, Clone)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn resolve(self) -> std::result::Result<Config, String> {
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "hidden_act `{act}` is not supported for llama (silu only)"
                ));
            }
        }
        if let Some(rt) = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
        {
            if rt != "default" {
                return Err(format!("rope_type `{rt}` is not supported (default only)"));
            }
        }
        let n_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if !self.num_attention_heads.is_multiple_of(n_kv_heads) {
            return Err("num_attention_heads must be a multiple of num_key_value_heads".into());
        }
        let rope_theta = self
            .rope_theta
            .or(self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        Ok(Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads,
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            context_length: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            sliding_window: self.sliding_window,
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
        })
    }
}

struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
}

struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

pub struct Llama {
    cfg: Config,
    spec: ModelSpec,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
    device: Device,
    dtype: DType,
}

impl Llama {
    pub fn load(vb: VarBuilder, cfg: Config) -> Result<Self> {
        let (d, ff, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let embed = get(&vb.pp("model.embed_tokens"), (cfg.vocab_size, d), "weight")?;
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let vb = vb.pp(format!("model.layers.{i}"));
                let a = vb.pp("self_attn");
                let m = vb.pp("mlp");
                Ok(Block {
                    attn_norm: RmsNorm::load(&vb.pp("input_layernorm"), d, cfg.rms_norm_eps)?,
                    attn: Attention {
                        q: Proj::load(&a.pp("q_proj"), d, cfg.n_heads * hd, cfg.attention_bias)?,
                        k: Proj::load(&a.pp("k_proj"), d, cfg.n_kv_heads * hd, cfg.attention_bias)?,
                        v: Proj::load(&a.pp("v_proj"), d, cfg.n_kv_heads * hd, cfg.attention_bias)?,
                        o: Proj::load(&a.pp("o_proj"), cfg.n_heads * hd, d, cfg.attention_bias)?,
                    },
                    mlp_norm: RmsNorm::load(
                        &vb.pp("post_attention_layernorm"),
                        d,
                        cfg.rms_norm_eps,
                    )?,
                    mlp: Mlp {
                        gate: Proj::load(&m.pp("gate_proj"), d, ff, cfg.mlp_bias)?,
                        up: Proj::load(&m.pp("up_proj"), d, ff, cfg.mlp_bias)?,
                        down: Proj::load(&m.pp("down_proj"), ff, d, cfg.mlp_bias)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&vb.pp("model.norm"), d, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            embed.clone()
        } else {
            get(&vb.pp("lm_head"), (cfg.vocab_size, d), "weight")?
        };
        let device = embed.device().clone();
        let dtype = embed.dtype();
        let rope = Rope::new(hd, cfg.rope_theta, cfg.context_length, dtype, &device)?;
        let per_layer = 2 * d + d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 3 * d * ff;
        let parameters = cfg.vocab_size * d * if cfg.tie_word_embeddings { 1 } else { 2 }
            + d
            + cfg.n_layers * per_layer;
        let spec = ModelSpec {
            architecture: Architecture::Llama,
            n_layers: cfg.n_layers,
            hidden_size: d,
            intermediate_size: ff,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
            vocab_size: cfg.vocab_size,
            context_length: cfg.context_length,
            parameters,
        };
        Ok(Self {
            cfg,
            spec,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            device,
            dtype,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

/// The linears of a Llama block.
const LINEARS: [Linear; 7] = [
    Linear::AttnQ,
    Linear::AttnK,
    Linear::AttnV,
    Linear::AttnO,
    Linear::MlpGate,
    Linear::MlpUp,
    Linear::MlpDown,
];

impl CausalLm for Llama {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn embed(&self, input_ids: &Tensor, _fwd: &Forward) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = self.embed.index_select(&input_ids.flatten_all()?, 0)?;
        Ok(flat.reshape((b, t, self.cfg.hidden_size))?)
    }

    fn token_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.index_select(ids, 0)?)
    }

    fn run_layers(&self, mut h: Tensor, range: Range<usize>, fwd: &mut Forward) -> Result<Tensor> {
        if range.end > self.blocks.len() {
            return Err(ModelError::InvalidInput(format!(
                "layer range {range:?} exceeds {} layers",
                self.blocks.len()
            )));
        }
        let diff = fwd.differentiable;
        let (cos, sin) = self.rope.tables(fwd)?;
        for i in range {
            let blk = &self.blocks[i];
            let x = blk.attn_norm.forward(&h, diff)?;
            let w = |linear| WeightId::new(i, linear);
            let q = fwd.linear(w(Linear::AttnQ), &blk.attn.q, &x)?;
            let k = fwd.linear(w(Linear::AttnK), &blk.attn.k, &x)?;
            let v = fwd.linear(w(Linear::AttnV), &blk.attn.v, &x)?;
            let q = split_heads(&q, self.cfg.n_heads)?;
            let k = split_heads(&k, self.cfg.n_kv_heads)?;
            let v = split_heads(&v, self.cfg.n_kv_heads)?;
            let q = self.rope.apply(&q, &cos, &sin, diff)?;
            let k = self.rope.apply(&k, &cos, &sin, diff)?;
            let (k, v) = match fwd.cache.as_deref_mut() {
                Some(c) => c.append(i, k, v)?,
                None => (k, v),
            };
            let y = attention(&q, &k, &v, fwd, self.cfg.sliding_window)?;
            let a = fwd.linear(w(Linear::AttnO), &blk.attn.o, &y)?;
            let a = at_site(&mut fwd.hooks, Site::new(i, SiteKind::AttnOut), a)?;
            h = (h + a)?;

            let x = blk.mlp_norm.forward(&h, diff)?;
            let gate = fwd.linear(w(Linear::MlpGate), &blk.mlp.gate, &x)?;
            let gate = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpPre), gate)?.silu()?;
            let key = (gate * fwd.linear(w(Linear::MlpUp), &blk.mlp.up, &x)?)?;
            let key = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpIn), key)?;
            let m = fwd.linear(w(Linear::MlpDown), &blk.mlp.down, &key)?;
            let m = fwd.mlp_module(i, &key, m)?;
            let m = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpOut), m)?;
            h = (h + m)?;
            h = at_site(&mut fwd.hooks, Site::new(i, SiteKind::Residual), h)?;
        }
        Ok(h)
    }

    fn head(&self, h: &Tensor, differentiable: bool) -> Result<Tensor> {
        let x = self.norm.forward(h, differentiable)?;
        lm_head(&x, &self.lm_head)
    }

    fn weight(&self, id: WeightId) -> Result<Tensor> {
        let blk = self.blocks.get(id.layer).ok_or_else(|| {
            ModelError::InvalidInput(format!("{id}: the model has {} layers", self.blocks.len()))
        })?;
        let p = match id.linear {
            Linear::AttnQ => &blk.attn.q,
            Linear::AttnK => &blk.attn.k,
            Linear::AttnV => &blk.attn.v,
            Linear::AttnO => &blk.attn.o,
            Linear::MlpGate => &blk.mlp.gate,
            Linear::MlpUp => &blk.mlp.up,
            Linear::MlpDown => &blk.mlp.down,
            Linear::AttnQkv => return Err(missing("llama", id, &LINEARS)),
        };
        Ok(p.weight.clone())
    }

    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// `(.., d)` @ `(vocab, d)ᵀ` with leading dims flattened into one GEMM.
pub(crate) fn lm_head(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Proj {
        weight: w.clone(),
        bias: None,
    }
    .forward(x)
}
