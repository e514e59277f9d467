//! GPT-2 family (GPT2-XL): learned positions, pre-LayerNorm, fused QKV, GELU (tanh), tied head.
//! HF stores GPT-2 projections as `Conv1D` (`(in, out)`); they are transposed at load so every
//! projection in emend is `(out, in)`.
use std::ops::Range;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::hooks::at_site;
use super::layers::{attention, get, split_heads, LayerNorm, Proj};
use super::llama::lm_head;
use super::weights::missing;
use super::{Architecture, CausalLm, Forward, ModelError, ModelSpec, Result, Site, SiteKind};
use super::{Linear, WeightId};

#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

impl Gpt2Config {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(format!(
                "activation_function `{}` is not supported (gelu_new only)",
                self.activation_function
            ));
        }
        if !self.scale_attn_weights || self.scale_attn_by_inverse_layer_idx {
            return Err("only the standard 1/sqrt(head_dim) attention scaling is supported".into());
        }
        Ok(())
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Proj,
    attn_proj: Proj,
    ln_2: LayerNorm,
    c_fc: Proj,
    mlp_proj: Proj,
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    spec: ModelSpec,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    device: Device,
    dtype: DType,
}

/// Loads a `Conv1D` (`(in, out)` weight) as an `(out, in)` projection.
fn conv1d(vb: &VarBuilder, d_in: usize, d_out: usize) -> Result<Proj> {
    let w = get(vb, (d_in, d_out), "weight")?;
    Ok(Proj {
        weight: w.t()?.contiguous()?,
        bias: Some(get(vb, d_out, "bias")?),
    })
}

impl Gpt2 {
    pub fn load(vb: VarBuilder, cfg: Gpt2Config) -> Result<Self> {
        // Checkpoints saved from GPT2LMHeadModel prefix everything with `transformer.`.
        let vb = if vb.contains_tensor("transformer.wte.weight") {
            vb.pp("transformer")
        } else {
            vb
        };
        let d = cfg.n_embd;
        let ff = cfg.n_inner.unwrap_or(4 * d);
        let wte = get(&vb.pp("wte"), (cfg.vocab_size, d), "weight")?;
        let wpe = get(&vb.pp("wpe"), (cfg.n_positions, d), "weight")?;
        let eps = cfg.layer_norm_epsilon;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let vb = vb.pp(format!("h.{i}"));
                Ok(Block {
                    ln_1: LayerNorm::load(&vb.pp("ln_1"), d, eps)?,
                    c_attn: conv1d(&vb.pp("attn.c_attn"), d, 3 * d)?,
                    attn_proj: conv1d(&vb.pp("attn.c_proj"), d, d)?,
                    ln_2: LayerNorm::load(&vb.pp("ln_2"), d, eps)?,
                    c_fc: conv1d(&vb.pp("mlp.c_fc"), d, ff)?,
                    mlp_proj: conv1d(&vb.pp("mlp.c_proj"), ff, d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(&vb.pp("ln_f"), d, eps)?;
        let parameters = cfg.vocab_size * d
            + cfg.n_positions * d
            + 2 * d
            + cfg.n_layer * (4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * ff + ff + d);
        let spec = ModelSpec {
            architecture: Architecture::Gpt2,
            n_layers: cfg.n_layer,
            hidden_size: d,
            intermediate_size: ff,
            n_heads: cfg.n_head,
            n_kv_heads: cfg.n_head,
            head_dim: d / cfg.n_head,
            vocab_size: cfg.vocab_size,
            context_length: cfg.n_positions,
            parameters,
        };
        let device = wte.device().clone();
        let dtype = wte.dtype();
        Ok(Self {
            cfg,
            spec,
            wte,
            wpe,
            blocks,
            ln_f,
            device,
            dtype,
        })
    }
}

/// The linears of a GPT-2 block: `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`.
const LINEARS: [Linear; 4] = [
    Linear::AttnQkv,
    Linear::AttnO,
    Linear::MlpUp,
    Linear::MlpDown,
];

impl CausalLm for Gpt2 {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn embed(&self, input_ids: &Tensor, fwd: &Forward) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if fwd.past() + t > self.cfg.n_positions {
            return Err(ModelError::ContextOverflow {
                tokens: fwd.past() + t,
                limit: self.cfg.n_positions,
            });
        }
        let d = self.cfg.n_embd;
        let tok = self
            .wte
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let pos = self
            .wpe
            .index_select(&fwd.positions()?.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        Ok((tok + pos)?)
    }

    fn token_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.wte.index_select(ids, 0)?)
    }

    fn run_layers(&self, mut h: Tensor, range: Range<usize>, fwd: &mut Forward) -> Result<Tensor> {
        if range.end > self.blocks.len() {
            return Err(ModelError::InvalidInput(format!(
                "layer range {range:?} exceeds {} layers",
                self.blocks.len()
            )));
        }
        let diff = fwd.differentiable;
        let d = self.cfg.n_embd;
        let heads = self.cfg.n_head;
        for i in range {
            let blk = &self.blocks[i];
            let x = blk.ln_1.forward(&h, diff)?;
            let w = |linear| WeightId::new(i, linear);
            let qkv = fwd.linear(w(Linear::AttnQkv), &blk.c_attn, &x)?;
            let q = split_heads(&qkv.narrow(D::Minus1, 0, d)?, heads)?;
            let k = split_heads(&qkv.narrow(D::Minus1, d, d)?, heads)?;
            let v = split_heads(&qkv.narrow(D::Minus1, 2 * d, d)?, heads)?;
            let (k, v) = match fwd.cache.as_deref_mut() {
                Some(c) => c.append(i, k, v)?,
                None => (k, v),
            };
            let y = attention(&q, &k, &v, fwd, None)?;
            let a = fwd.linear(w(Linear::AttnO), &blk.attn_proj, &y)?;
            let a = at_site(&mut fwd.hooks, Site::new(i, SiteKind::AttnOut), a)?;
            h = (h + a)?;

            let x = blk.ln_2.forward(&h, diff)?;
            let pre = fwd.linear(w(Linear::MlpUp), &blk.c_fc, &x)?;
            let key = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpPre), pre)?.gelu()?;
            let key = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpIn), key)?;
            let m = fwd.linear(w(Linear::MlpDown), &blk.mlp_proj, &key)?;
            let m = fwd.mlp_module(i, &key, m)?;
            let m = at_site(&mut fwd.hooks, Site::new(i, SiteKind::MlpOut), m)?;
            h = (h + m)?;
            h = at_site(&mut fwd.hooks, Site::new(i, SiteKind::Residual), h)?;
        }
        Ok(h)
    }

    fn head(&self, h: &Tensor, differentiable: bool) -> Result<Tensor> {
        lm_head(&self.ln_f.forward(h, differentiable)?, &self.wte)
    }

    fn weight(&self, id: WeightId) -> Result<Tensor> {
        let blk = self.blocks.get(id.layer).ok_or_else(|| {
            ModelError::InvalidInput(format!("{id}: the model has {} layers", self.blocks.len()))
        })?;
        let p = match id.linear {
            Linear::AttnQkv => &blk.c_attn,
            Linear::AttnO => &blk.attn_proj,
            Linear::MlpUp => &blk.c_fc,
            Linear::MlpDown => &blk.mlp_proj,
            _ => return Err(missing("gpt2", id, &LINEARS)),
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
