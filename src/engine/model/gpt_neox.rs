//! GPT-NeoX (Pythia): parallel residual, partial rotary, LayerNorm, GELU, untied head.
use std::ops::Range;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::hooks::at_site;
use super::layers::{attention, get, LayerNorm, Proj, Rope};
use super::llama::lm_head;
use super::weights::missing;
use super::{Architecture, CausalLm, Forward, ModelError, ModelSpec, Result, Site, SiteKind};
use super::{Linear, WeightId};

#[derive(Debug, Clone, Deserialize)]
pub struct GptNeoxConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub rotary_pct: Option<f64>,
    pub rotary_emb_base: Option<f64>,
    /// transformers ≥ 5 keeps `partial_rotary_factor` and `rope_theta` here.
    pub rope_parameters: Option<NeoxRope>,
    #[serde(default = "yes")]
    pub use_parallel_residual: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "yes")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NeoxRope {
    pub rope_theta: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
}

fn default_ctx() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu".into()
}
fn yes() -> bool {
    true
}

struct Block {
    ln_in: LayerNorm,
    qkv: Proj,
    dense: Proj,
    ln_post: LayerNorm,
    up: Proj,
    down: Proj,
}

pub struct GptNeox {
    cfg: GptNeoxConfig,
    spec: ModelSpec,
    embed: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Tensor,
    rope: Rope,
    device: Device,
    dtype: DType,
}

impl GptNeox {
    pub fn load(vb: VarBuilder, cfg: GptNeoxConfig) -> Result<Self> {
        if cfg.hidden_act != "gelu" {
            return Err(ModelError::UnsupportedArchitecture(format!(
                "gpt_neox with hidden_act `{}`",
                cfg.hidden_act
            )));
        }
        let d = cfg.hidden_size;
        let ff = cfg.intermediate_size;
        let hd = d / cfg.num_attention_heads;
        let eps = cfg.layer_norm_eps;
        let rp = cfg.rope_parameters.as_ref();
        let pct = cfg
            .rotary_pct
            .or(rp.and_then(|r| r.partial_rotary_factor))
            .unwrap_or(0.25);
        let base = cfg
            .rotary_emb_base
            .or(rp.and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let root = vb.pp("gpt_neox");
        let embed = get(&root.pp("embed_in"), (cfg.vocab_size, d), "weight")?;
        let bias = cfg.attention_bias;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = root.pp(format!("layers.{i}"));
                Ok(Block {
                    ln_in: LayerNorm::load(&vb.pp("input_layernorm"), d, eps)?,
                    qkv: Proj::load(&vb.pp("attention.query_key_value"), d, 3 * d, bias)?,
                    dense: Proj::load(&vb.pp("attention.dense"), d, d, bias)?,
                    ln_post: LayerNorm::load(&vb.pp("post_attention_layernorm"), d, eps)?,
                    up: Proj::load(&vb.pp("mlp.dense_h_to_4h"), d, ff, true)?,
                    down: Proj::load(&vb.pp("mlp.dense_4h_to_h"), ff, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(&root.pp("final_layer_norm"), d, eps)?;
        let head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get(&vb.pp("embed_out"), (cfg.vocab_size, d), "weight")?
        };
        let device = embed.device().clone();
        let dtype = embed.dtype();
        let rot = (hd as f64 * pct) as usize;
        let rope = Rope::new(rot, base, cfg.max_position_embeddings, dtype, &device)?;
        let parameters = cfg.vocab_size * d * if cfg.tie_word_embeddings { 1 } else { 2 }
            + 2 * d
            + cfg.num_hidden_layers * (4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * ff + ff + d);
        let spec = ModelSpec {
            architecture: Architecture::GptNeox,
            n_layers: cfg.num_hidden_layers,
            hidden_size: d,
            intermediate_size: ff,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_attention_heads,
            head_dim: hd,
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position_embeddings,
            parameters,
        };
        Ok(Self {
            cfg,
            spec,
            embed,
            blocks,
            ln_f,
            head,
            rope,
            device,
            dtype,
        })
    }
}

/// The linears of a GPT-NeoX block: `attention.query_key_value`, `attention.dense`,
/// `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h`.
const LINEARS: [Linear; 4] = [
    Linear::AttnQkv,
    Linear::AttnO,
    Linear::MlpUp,
    Linear::MlpDown,
];

impl CausalLm for GptNeox {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn embed(&self, input_ids: &Tensor, _fwd: &Forward) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        Ok(self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
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
        let heads = self.cfg.num_attention_heads;
        let hd = self.spec.head_dim;
        let (cos, sin) = self.rope.tables(fwd)?;
        for i in range {
            let blk = &self.blocks[i];
            let x = blk.ln_in.forward(&h, diff)?;
            let (b, t, _) = x.dims3()?;
            // The fused projection is laid out per head as [q | k | v].
            let w = |linear| WeightId::new(i, linear);
            let qkv = fwd
                .linear(w(Linear::AttnQkv), &blk.qkv, &x)?
                .reshape((b, t, heads, 3 * hd))?
                .transpose(1, 2)?;
            let q = qkv.narrow(D::Minus1, 0, hd)?;
            let k = qkv.narrow(D::Minus1, hd, hd)?;
            let v = qkv.narrow(D::Minus1, 2 * hd, hd)?.contiguous()?;
            let q = self.rope.apply(&q.contiguous()?, &cos, &sin, diff)?;
            let k = self.rope.apply(&k.contiguous()?, &cos, &sin, diff)?;
            let (k, v) = match fwd.cache.as_deref_mut() {
                Some(c) => c.append(i, k, v)?,
                None => (k, v),
            };
            let y = attention(&q, &k, &v, fwd, None)?;
            let a = fwd.linear(w(Linear::AttnO), &blk.dense, &y)?;
            let a = at_site(&mut fwd.hooks, Site::new(i, SiteKind::AttnOut), a)?;

            // Parallel residual: the MLP reads the block input, not the post-attention stream.
            let mlp_in = if self.cfg.use_parallel_residual {
                h.clone()
            } else {
                (&h + &a)?
            };
            let x = blk.ln_post.forward(&mlp_in, diff)?;
            let pre = fwd.linear(w(Linear::MlpUp), &blk.up, &x)?;
            let key = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpPre), pre)?.gelu_erf()?;
            let key = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpIn), key)?;
            let m = fwd.linear(w(Linear::MlpDown), &blk.down, &key)?;
            let m = fwd.mlp_module(i, &key, m)?;
            let m = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpOut), m)?;
            h = if self.cfg.use_parallel_residual {
                ((h + a)? + m)?
            } else {
                (mlp_in + m)?
            };
            h = at_site(&mut fwd.hooks, Site::new(i, SiteKind::Residual), h)?;
        }
        Ok(h)
    }

    fn head(&self, h: &Tensor, differentiable: bool) -> Result<Tensor> {
        lm_head(&self.ln_f.forward(h, differentiable)?, &self.head)
    }

    fn weight(&self, id: WeightId) -> Result<Tensor> {
        let blk = self.blocks.get(id.layer).ok_or_else(|| {
            ModelError::InvalidInput(format!("{id}: the model has {} layers", self.blocks.len()))
        })?;
        let p = match id.linear {
            Linear::AttnQkv => &blk.qkv,
            Linear::AttnO => &blk.dense,
            Linear::MlpUp => &blk.up,
            Linear::MlpDown => &blk.down,
            _ => return Err(missing("gpt_neox", id, &LINEARS)),
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
