//! MEND's gradient transform (Mitchell et al., ICLR 2022, as EasyEdit's `GradientTransform` with
//! `combine: true`, `mlp_class: IDMLP`, `n_hidden: 1`, `init: id`, `shared: true`): one network
//! for all edited weights of one shape, fed the rank-one factors of a weight's fine-tuning
//! gradient (the layer input `u` and the output gradient `δ` at each token), standardised by
//! running statistics, with a per-weight scale and shift ("mode") in each of its two low-rank
//! residual layers. Its outputs `ũ`, `δ̃` make the update `ΔW = −lr · δ̃ᵀ ũ` (rank ≤ tokens).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::TrainingError;

/// The network's shape: what an artefact must match to be loaded for a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetShape {
    /// The layers whose MLP down projection MEND edits (one mode each, in this order).
    pub layers: Vec<usize>,
    /// Width of the down projection's input (the MLP's intermediate size).
    pub x_dim: usize,
    /// Width of its output (the hidden size).
    pub delta_dim: usize,
    /// Rank of each residual layer (EasyEdit: `rank`, capped at the input width).
    pub rank: usize,
}

impl NetShape {
    fn width(&self) -> usize {
        self.x_dim + self.delta_dim
    }
    fn mid(&self) -> usize {
        self.rank.min(self.width())
    }
}

/// Welford running mean and variance of the factors (EasyEdit's `u_mean`, `u_s`, `k`).
#[derive(Debug, Clone)]
pub struct RunningNorm {
    pub mean: Vec<f32>,
    pub s: Vec<f32>,
    pub k: f32,
}

impl RunningNorm {
    fn new(dim: usize) -> Self {
        Self {
            mean: vec![0.0; dim],
            s: vec![0.0; dim],
            k: 0.0,
        }
    }

    fn update(&mut self, rows: &[Vec<f32>]) {
        for row in rows {
            if self.k == 0.0 {
                self.mean.copy_from_slice(row);
                self.s.iter_mut().for_each(|s| *s = 0.0);
                self.k = 1.0;
                continue;
            }
            self.k += 1.0;
            for ((m, s), &x) in self.mean.iter_mut().zip(self.s.iter_mut()).zip(row) {
                let new_m = *m + (x - *m) / self.k;
                *s += (x - *m) * (x - new_m);
                *m = new_m;
            }
        }
    }

    /// `(x − mean) / (std + 1e-7)` for `(n, dim)` rows.
    fn standardise(&self, x: &Tensor) -> Result<Tensor, TrainingError> {
        if self.k < 2.0 {
            return Err(TrainingError::Invalid(
                "the gradient transform needs statistics of at least two tokens".into(),
            ));
        }
        let dim = self.mean.len();
        let dev = x.device();
        let mean = Tensor::from_slice(&self.mean, (1, dim), dev)?;
        let std: Vec<f32> = self
            .s
            .iter()
            .map(|s| (s / (self.k - 1.0)).sqrt() + 1e-7)
            .collect();
        let std = Tensor::from_slice(&std, (1, dim), dev)?;
        Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }
}

/// The trainable parameters and statistics of one gradient transform.
pub struct MendNet {
    pub shape: NetShape,
    /// Per residual layer: `u (width, mid)`, `v (mid, width)`, `bias (width)`,
    /// `scale (modes, width)`, `shift (modes, width)`.
    params: Vec<(String, Var)>,
    /// One learned edit learning rate per edited weight.
    edit_lrs: Var,
    pub u_norm: RunningNorm,
    pub v_norm: RunningNorm,
}

const RESIDUAL_LAYERS: usize = 2;

impl MendNet {
    /// A fresh network: `u` zero (so it starts as the identity), `v` standard normal from
    /// `seed`, unit scales, zero shifts, every edit learning rate `edit_lr`.
    pub fn new(
        shape: NetShape,
        edit_lr: f64,
        seed: u64,
        dev: &Device,
    ) -> Result<Self, TrainingError> {
        let (w, mid, modes) = (shape.width(), shape.mid(), shape.layers.len());
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Vec::new();
        for l in 0..RESIDUAL_LAYERS {
            let normal: Vec<f32> = (0..mid * w).map(|_| standard_normal(&mut rng)).collect();
            params.push((format!("mlp.{l}.u"), Var::zeros((w, mid), DType::F32, dev)?));
            params.push((
                format!("mlp.{l}.v"),
                Var::from_tensor(&Tensor::from_vec(normal, (mid, w), dev)?)?,
            ));
            params.push((format!("mlp.{l}.bias"), Var::zeros(w, DType::F32, dev)?));
            params.push((
                format!("mlp.{l}.scale"),
                Var::ones((modes, w), DType::F32, dev)?,
            ));
            params.push((
                format!("mlp.{l}.shift"),
                Var::zeros((modes, w), DType::F32, dev)?,
            ));
        }
        let edit_lrs = Var::from_tensor(&Tensor::full(edit_lr as f32, modes, dev)?)?;
        Ok(Self {
            u_norm: RunningNorm::new(shape.x_dim),
            v_norm: RunningNorm::new(shape.delta_dim),
            shape,
            params,
            edit_lrs,
        })
    }

    /// Every trainable variable (the network's, then the edit learning rates).
    pub fn vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.params.iter().map(|(_, p)| p.clone()).collect();
        v.push(self.edit_lrs.clone());
        v
    }

    /// The learned edit learning rates, one per layer.
    pub fn edit_lrs(&self) -> Result<Vec<f32>, TrainingError> {
        Ok(self.edit_lrs.as_tensor().to_vec1::<f32>()?)
    }

    fn param(&self, name: &str) -> &Tensor {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor())
            .expect("every parameter name is built in `new`")
    }

    /// Adds the tokens' factors to the running statistics (training only, as EasyEdit).
    pub fn observe(&mut self, u: &Tensor, delta: &Tensor) -> Result<(), TrainingError> {
        let (u, delta) = nonzero_rows(u, delta)?;
        self.u_norm.update(&u);
        self.v_norm.update(&delta);
        Ok(())
    }

    /// The update of the weight at `mode` (index into `shape.layers`) from the factors `u`
    /// `(n, x_dim)` and `δ` `(n, delta_dim)`: `(up, down_t)` with `ΔW = up · down_t`,
    /// `up: (delta_dim, n)` = `−lr · δ̃ᵀ`, `down_t: (n, x_dim)` = `ũ`.
    pub fn update(
        &self,
        mode: usize,
        u: &Tensor,
        delta: &Tensor,
    ) -> Result<(Tensor, Tensor), TrainingError> {
        let (u_rows, d_rows) = nonzero_rows(u, delta)?;
        let n = u_rows.len();
        if n == 0 {
            return Err(TrainingError::Invalid(
                "the edit's gradient is zero at every token".into(),
            ));
        }
        let dev = u.device();
        let flat = |rows: Vec<Vec<f32>>, dim: usize| -> candle_core::Result<Tensor> {
            Tensor::from_vec(rows.concat(), (n, dim), dev)
        };
        let u_in = self.u_norm.standardise(&flat(u_rows, self.shape.x_dim)?)?;
        let v_in = self
            .v_norm
            .standardise(&flat(d_rows, self.shape.delta_dim)?)?;
        let mut x = Tensor::cat(&[u_in, v_in], 1)?;
        for l in 0..RESIDUAL_LAYERS {
            x = self.residual(l, mode, &x)?;
        }
        let u_t = x.narrow(1, 0, self.shape.x_dim)?;
        let d_t = x.narrow(1, self.shape.x_dim, self.shape.delta_dim)?;
        let lr = self.edit_lrs.as_tensor().narrow(0, mode, 1)?;
        let up = d_t.t()?.broadcast_mul(&lr.neg()?)?;
        Ok((up, u_t.contiguous()?))
    }

    /// `x + relu((x vᵀ uᵀ + b) · scale[mode] + shift[mode])` (EasyEdit's `LRLinear`, `init: id`).
    fn residual(&self, l: usize, mode: usize, x: &Tensor) -> Result<Tensor, TrainingError> {
        let p = |what: &str| self.param(&format!("mlp.{l}.{what}"));
        let pre = x
            .matmul(&p("v").t()?)?
            .matmul(&p("u").t()?)?
            .broadcast_add(p("bias"))?;
        let scale = p("scale").narrow(0, mode, 1)?;
        let shift = p("shift").narrow(0, mode, 1)?;
        let pre = pre.broadcast_mul(&scale)?.broadcast_add(&shift)?;
        Ok((pre.relu()? + x)?)
    }

    /// Parameters, edit learning rates and statistics as named tensors (an artefact's body).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>, TrainingError> {
        let dev = self.edit_lrs.device();
        let mut out: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        out.insert("edit_lrs".into(), self.edit_lrs.as_tensor().detach());
        for (name, norm) in [("u", &self.u_norm), ("v", &self.v_norm)] {
            out.insert(
                format!("norm.{name}.mean"),
                Tensor::from_slice(&norm.mean, norm.mean.len(), dev)?,
            );
            out.insert(
                format!("norm.{name}.s"),
                Tensor::from_slice(&norm.s, norm.s.len(), dev)?,
            );
            out.insert(
                format!("norm.{name}.k"),
                Tensor::from_slice(&[norm.k], 1, dev)?,
            );
        }
        Ok(out)
    }

    /// The network `tensors` wrote, checked against `shape`.
    pub fn from_tensors(
        shape: NetShape,
        t: &HashMap<String, Tensor>,
    ) -> Result<Self, TrainingError> {
        let dev = t
            .values()
            .next()
            .map(|x| x.device().clone())
            .unwrap_or(Device::Cpu);
        let mut net = Self::new(shape, 0.0, 0, &dev)?;
        let get = |name: &str, dims: &[usize]| super::artefact::checked(t, name, dims);
        for (name, var) in &net.params {
            var.set(&get(name, var.as_tensor().dims())?)?;
        }
        net.edit_lrs
            .set(&get("edit_lrs", &[net.shape.layers.len()])?)?;
        for (name, dim) in [("u", net.shape.x_dim), ("v", net.shape.delta_dim)] {
            let norm = RunningNorm {
                mean: get(&format!("norm.{name}.mean"), &[dim])?.to_vec1()?,
                s: get(&format!("norm.{name}.s"), &[dim])?.to_vec1()?,
                k: get(&format!("norm.{name}.k"), &[1])?.to_vec1::<f32>()?[0],
            };
            if name == "u" {
                net.u_norm = norm;
            } else {
                net.v_norm = norm;
            }
        }
        Ok(net)
    }
}

/// Rows of a factor, as `Vec`s.
type Rows = Vec<Vec<f32>>;

/// The rows where both factors are non-zero (EasyEdit's `nz_mask`), as `Vec`s.
fn nonzero_rows(u: &Tensor, delta: &Tensor) -> Result<(Rows, Rows), TrainingError> {
    let u = u.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let d = delta.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(u.into_iter()
        .zip(d)
        .filter(|(a, b)| a.iter().any(|x| *x != 0.0) && b.iter().any(|x| *x != 0.0))
        .unzip())
}

/// A standard normal sample (Box–Muller), so the initialisation depends only on the seed.
pub(super) fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Rows' mean of a `(n, vocab)` KL term: `Σ p_base (log p_base − log p_post)`, averaged.
pub fn kl_rows(base_logits: &Tensor, post_logits: &Tensor) -> Result<Tensor, TrainingError> {
    let lp_base = candle_nn::ops::log_softmax(&base_logits.to_dtype(DType::F32)?, D::Minus1)?;
    let lp_post = candle_nn::ops::log_softmax(&post_logits.to_dtype(DType::F32)?, D::Minus1)?;
    let kl = lp_base.exp()?.mul(&(lp_base - lp_post)?)?.sum(D::Minus1)?;
    Ok(kl.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> NetShape {
        NetShape {
            layers: vec![1, 2],
            x_dim: 6,
            delta_dim: 4,
            rank: 3,
        }
    }

    #[test]
    fn a_fresh_net_is_the_standardised_identity_times_the_edit_lr() {
        let dev = Device::Cpu;
        let mut net = MendNet::new(shape(), 0.5, 7, &dev).unwrap();
        let u = Tensor::arange(0f32, 18.0, &dev)
            .unwrap()
            .reshape((3, 6))
            .unwrap();
        let d = Tensor::arange(1f32, 13.0, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        net.observe(&u, &d).unwrap();
        let (up, down_t) = net.update(1, &u, &d).unwrap();
        assert_eq!(up.dims(), &[4, 3]);
        assert_eq!(down_t.dims(), &[3, 6]);
        // Rows 0, 1, 2 standardise to −1, 0, 1 in every column; relu(0 · …) adds nothing.
        let got = down_t.to_vec2::<f32>().unwrap();
        assert!(
            (got[0][0] + 1.0).abs() < 1e-5 && got[1][3].abs() < 1e-5,
            "{got:?}"
        );
        let up = up.to_vec2::<f32>().unwrap();
        assert!((up[0][2] + 0.5).abs() < 1e-5, "{up:?}");
    }

    #[test]
    fn tensors_round_trip_and_a_wrong_shape_is_refused() {
        let dev = Device::Cpu;
        let mut net = MendNet::new(shape(), 1e-4, 3, &dev).unwrap();
        let u = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((2, 6))
            .unwrap();
        let d = Tensor::arange(0f32, 8.0, &dev)
            .unwrap()
            .reshape((2, 4))
            .unwrap();
        net.observe(&u, &d).unwrap();
        let t = net.tensors().unwrap();
        let back = MendNet::from_tensors(shape(), &t).unwrap();
        let (a, b) = (
            net.update(0, &u, &d).unwrap(),
            back.update(0, &u, &d).unwrap(),
        );
        assert_eq!(a.0.to_vec2::<f32>().unwrap(), b.0.to_vec2::<f32>().unwrap());
        let mut other = shape();
        other.rank = 2;
        let e = MendNet::from_tensors(other, &t).err().unwrap().to_string();
        assert!(e.contains("mlp.0.u"), "{e}");
    }
}
