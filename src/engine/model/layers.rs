//! Building blocks shared by the architectures. Each has a fused fast path for inference and a
//! plain-ops path (with a backward) used when a forward must carry gradients.
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use super::kernels::{cpu_matmul_t, cpu_matmul_t_grad_x, CpuAttention};
use super::{Forward, ModelError, Result};

pub(crate) fn get(
    vb: &VarBuilder,
    shape: impl Into<candle_core::Shape>,
    name: &str,
) -> Result<Tensor> {
    let shape = shape.into();
    if !vb.contains_tensor(name) {
        return Err(ModelError::MissingTensor {
            name: format!("{}{}", prefix(vb), name),
        });
    }
    Ok(vb.get(shape, name)?)
}

fn prefix(vb: &VarBuilder) -> String {
    let p = vb.prefix();
    if p.is_empty() {
        p
    } else {
        format!("{p}.")
    }
}

/// A linear projection with weight `(out, in)` and optional bias.
#[derive(Debug, Clone)]
pub(crate) struct Proj {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Proj {
    pub fn load(vb: &VarBuilder, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = get(vb, (d_out, d_in), "weight")?;
        let bias = if bias {
            Some(get(vb, d_out, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Flatten leading dims: one (n, in) x (in, out) GEMM instead of a batched matmul that
        // re-reads the weight per batch row.
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("projection input has a feature dim");
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, d_in))?;
        // The fused kernels have no backward for the weight: a weight that carries gradients
        // (MEND's update during training) takes candle's matmul.
        let y = if x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.is_contiguous()
            && !x.track_op()
            && !self.weight.track_op()
        {
            cpu_matmul_t(&x2, &self.weight)?
        } else if x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.is_contiguous()
            && !self.weight.track_op()
        {
            cpu_matmul_t_grad_x(&x2, &self.weight)?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        let y = y.reshape(out_dims)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, d: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: get(vb, d, "weight")?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        Ok(if differentiable {
            candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32)?
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)?
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, d: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: get(vb, d, "weight")?,
            bias: get(vb, d, "bias")?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        Ok(if differentiable {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)?
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)?
        })
    }
}

/// Rotary tables for the non-interleaved ("rotate half") convention of HF Llama and GPT-NeoX.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Leading dims of each head that rotate (GPT-NeoX rotates only a fraction).
    pub dims: usize,
}

impl Rope {
    pub fn new(dims: usize, base: f64, max_len: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let inv: Vec<f32> = (0..dims / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f64 / dims as f64) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, dims / 2), dev)?;
        let t = Tensor::arange(0u32, max_len as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let freqs = t.matmul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            dims,
        })
    }

    /// `(t, dims/2)` tables when rows share positions, else `(b, t, dims/2)`.
    pub fn tables(&self, fwd: &Forward) -> Result<(Tensor, Tensor)> {
        if fwd.unpadded() {
            let (cos, sin) = (
                self.cos.narrow(0, fwd.past(), fwd.seq())?,
                self.sin.narrow(0, fwd.past(), fwd.seq())?,
            );
            return Ok((cos, sin));
        }
        let pos = fwd.positions()?.flatten_all()?;
        let shape = (fwd.batch(), fwd.seq(), self.dims / 2);
        Ok((
            self.cos.index_select(&pos, 0)?.reshape(shape)?,
            self.sin.index_select(&pos, 0)?.reshape(shape)?,
        ))
    }

    /// Rotates `x` (`(b, h, t, head_dim)`); only the first `dims` features when partial.
    pub fn apply(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        differentiable: bool,
    ) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let (rot, pass) = if self.dims < hd {
            (
                x.narrow(D::Minus1, 0, self.dims)?,
                Some(x.narrow(D::Minus1, self.dims, hd - self.dims)?),
            )
        } else {
            (x.clone(), None)
        };
        let rot = if differentiable {
            rope_plain(&rot, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&rot.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)?
        };
        Ok(match pass {
            Some(p) => Tensor::cat(&[&rot, &p], D::Minus1)?,
            None => rot,
        })
    }
}

/// `x * cos + rotate_half(x) * sin` from plain ops (has a backward).
fn rope_plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (cos, sin) = match cos.rank() {
        2 => (
            Tensor::cat(&[cos, cos], D::Minus1)?
                .unsqueeze(0)?
                .unsqueeze(0)?,
            Tensor::cat(&[sin, sin], D::Minus1)?
                .unsqueeze(0)?
                .unsqueeze(0)?,
        ),
        _ => (
            Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?,
            Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?,
        ),
    };
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// Scaled dot-product attention over `(b, h, t, hd)` queries and `(b, kv_h, s, hd)` keys/values,
/// with grouped-query heads shared. Returns `(b, t, h * hd)`. On CPU in f32 (no gradients) a
/// fused kernel computes visibility itself; elsewhere plain ops with the additive mask.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &Forward,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let scale = 1.0 / (hd as f64).sqrt();
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if q.device().is_cpu() && q.dtype() == DType::F32 && !tracked && !fwd.differentiable {
        let op = CpuAttention {
            pad_left: fwd.pad_left().to_vec(),
            past: fwd.past(),
            window,
            scale: scale as f32,
            query_block: super::kernels::QUERY_BLOCK,
        };
        return Ok(q.apply_op3_no_bwd(k, v, &op)?);
    }
    let kv_h = k.dim(1)?;
    let (k, v) = if kv_h == h {
        (k.clone(), v.clone())
    } else {
        (repeat_kv(k, h / kv_h)?, repeat_kv(v, h / kv_h)?)
    };
    let att = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let att = match fwd.mask(window, q.dtype())? {
        Some(m) => att.broadcast_add(m)?,
        None => att,
    };
    let att = if fwd.differentiable {
        candle_nn::ops::softmax(&att, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&att)?
    };
    let y = att.matmul(&v.contiguous()?)?;
    Ok(y.transpose(1, 2)?.reshape((b, t, h * hd))?)
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    let (b, kv_h, s, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv_h, n_rep, s, hd))?
        .reshape((b, kv_h * n_rep, s, hd))?)
}

/// `(b, t, h * hd)` → `(b, h, t, hd)`.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    Ok(x.reshape((b, t, heads, d / heads))?.transpose(1, 2)?)
}
