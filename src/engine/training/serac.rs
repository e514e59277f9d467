//! SERAC's scope classifier (Mitchell et al., ICML 2022), trained against the resident model.
//!
//! The paper's classifier is a distilbert cross-encoder or embedding model beside the edited
//! model; at 135M parameters a second encoder would cost as much as the model it guards, so
//! emend's classifier reads the model's own hidden states: the mean over an input's tokens of
//! the residual stream leaving one layer, standardised, projected to `width` and compared by
//! cosine with each memory key, `logit = scale · cos + bias` (the paper's embedding variant,
//! with the model as the encoder). Only the head trains: the projection, the scale and the
//! bias.
//!
//! A training step takes one record: its prompt is the anchor, its rephrasing the positive,
//! its unrelated prompt and the prompts and rephrasings of [`NEGATIVES`] other records the
//! negatives (in-batch negatives, as SERAC's training batches give them); the losses are the
//! binary cross-entropies of the positive (`loss_edit`) and of the negatives (`loss_loc`).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::mend_net::standard_normal;
use super::records::TrainingRecord;
use super::TrainingError;
use crate::engine::model::{CausalLm, Tok};
use crate::engine::overlay::{pooled, ScopeHead};

/// Other records' texts per step used as negatives.
pub const NEGATIVES: usize = 6;
/// Training records whose prompts and rephrasings fix the feature standardisation.
const NORM_RECORDS: usize = 64;

/// The classifier's dimensions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeShape {
    /// The layer whose output is pooled.
    pub layer: usize,
    pub hidden: usize,
    pub width: usize,
}

/// The trainable head and its fixed standardisation.
pub struct ScopeNet {
    pub shape: ScopeShape,
    mean: Tensor,
    std: Tensor,
    proj: Var,
    scale: Var,
    bias: Var,
}

impl ScopeNet {
    /// A fresh head: the projection standard normal over `sqrt(hidden)` from `seed`, scale 10
    /// and bias −5 (in scope from cosine 0.5), the identity standardisation.
    pub fn new(shape: ScopeShape, seed: u64, dev: &Device) -> Result<Self, TrainingError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let s = 1.0 / (shape.hidden as f32).sqrt();
        let w: Vec<f32> = (0..shape.width * shape.hidden)
            .map(|_| standard_normal(&mut rng) * s)
            .collect();
        Ok(Self {
            mean: Tensor::zeros((1, shape.hidden), DType::F32, dev)?,
            std: Tensor::ones((1, shape.hidden), DType::F32, dev)?,
            proj: Var::from_tensor(&Tensor::from_vec(w, (shape.width, shape.hidden), dev)?)?,
            scale: Var::from_tensor(&Tensor::new(&[10f32], dev)?)?,
            bias: Var::from_tensor(&Tensor::new(&[-5f32], dev)?)?,
            shape,
        })
    }

    /// Fixes the standardisation to the mean and deviation of `feats` `(n, hidden)`.
    pub fn fit(&mut self, feats: &Tensor) -> Result<(), TrainingError> {
        let mean = feats.mean_keepdim(0)?;
        let var = feats.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
        self.mean = mean;
        self.std = (var.sqrt()? + 1e-6)?;
        Ok(())
    }

    pub fn vars(&self) -> Vec<Var> {
        vec![self.proj.clone(), self.scale.clone(), self.bias.clone()]
    }

    /// The head over the variables (differentiable while they train).
    pub fn head(&self) -> ScopeHead {
        ScopeHead {
            layer: self.shape.layer,
            mean: self.mean.clone(),
            std: self.std.clone(),
            proj: self.proj.as_tensor().clone(),
            scale: self.scale.as_tensor().clone(),
            bias: self.bias.as_tensor().clone(),
        }
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        HashMap::from([
            ("mean".to_string(), self.mean.clone()),
            ("std".to_string(), self.std.clone()),
            ("proj".to_string(), self.proj.as_tensor().detach()),
            ("scale".to_string(), self.scale.as_tensor().detach()),
            ("bias".to_string(), self.bias.as_tensor().detach()),
        ])
    }

    /// The head `tensors` wrote, checked against `shape`.
    pub fn from_tensors(
        shape: ScopeShape,
        t: &HashMap<String, Tensor>,
        dev: &Device,
    ) -> Result<Self, TrainingError> {
        let get = |name: &str, dims: &[usize]| -> Result<Tensor, TrainingError> {
            Ok(super::artefact::checked(t, name, dims)?.to_device(dev)?)
        };
        let (h, w) = (shape.hidden, shape.width);
        Ok(Self {
            mean: get("mean", &[1, h])?,
            std: get("std", &[1, h])?,
            proj: Var::from_tensor(&get("proj", &[w, h])?)?,
            scale: Var::from_tensor(&get("scale", &[1])?)?,
            bias: Var::from_tensor(&get("bias", &[1])?)?,
            shape,
        })
    }
}

/// Pooled features `(n, hidden)` of `texts`, each from its own pass.
pub fn features(
    model: &dyn CausalLm,
    tok: &Tok,
    layer: usize,
    texts: &[&str],
) -> Result<Tensor, TrainingError> {
    let rows = texts
        .iter()
        .map(|t| Ok(pooled(model, &tok.encode(t)?, layer)?))
        .collect::<Result<Vec<_>, TrainingError>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Fits a fresh head's standardisation to the first training records' prompts and
/// rephrasings.
pub fn fit_fresh(
    net: &mut ScopeNet,
    model: &dyn CausalLm,
    tok: &Tok,
    train: &[TrainingRecord],
) -> Result<(), TrainingError> {
    let texts: Vec<&str> = train
        .iter()
        .take(NORM_RECORDS)
        .flat_map(|r| [r.prompt.as_str(), r.rephrase.as_str()])
        .collect();
    let feats = features(model, tok, net.shape.layer, &texts)?;
    net.fit(&feats)
}

/// `log(1 + exp(x))`, stable for large `|x|`.
fn softplus(x: &Tensor) -> Result<Tensor, TrainingError> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// The losses of training step `step` on record `at` of `train`: the positive's and the
/// negatives' binary cross-entropy.
pub fn losses(
    net: &ScopeNet,
    model: &dyn CausalLm,
    tok: &Tok,
    train: &[TrainingRecord],
    at: usize,
    step: usize,
) -> Result<(Tensor, Tensor), TrainingError> {
    let rec = &train[at];
    let n = train.len();
    let mut texts = vec![
        rec.prompt.as_str(),
        rec.rephrase.as_str(),
        rec.loc_prompt.as_str(),
    ];
    // Deterministic in the step, so a resumed run draws the same negatives.
    for j in 0..NEGATIVES {
        let other = (at + 1 + (step.wrapping_mul(7919) + j * 104_729) % (n - 1)) % n;
        let r = &train[other];
        texts.push(if j % 2 == 0 { &r.prompt } else { &r.rephrase });
    }
    let feats = features(model, tok, net.shape.layer, &texts)?;
    let head = net.head();
    let e = head.embed(&feats)?;
    let z = head.logits(&e.narrow(0, 0, 1)?, &e.narrow(0, 1, texts.len() - 1)?)?;
    let z = z.flatten_all()?;
    let pos = softplus(&z.narrow(0, 0, 1)?.neg()?)?.mean_all()?;
    let neg = softplus(&z.narrow(0, 1, texts.len() - 2)?)?.mean_all()?;
    Ok((pos, neg))
}

/// The held-back records' memory: unit keys `(n, width)` of their prompts.
pub fn memory_keys(
    net: &ScopeNet,
    model: &dyn CausalLm,
    tok: &Tok,
    held: &[TrainingRecord],
) -> Result<Tensor, TrainingError> {
    let texts: Vec<&str> = held.iter().map(|r| r.prompt.as_str()).collect();
    Ok(net
        .head()
        .embed(&features(model, tok, net.shape.layer, &texts)?)?
        .detach())
}

/// One held-back record `i` against the memory of all of them: 1 when its prompt routes to
/// its own entry, 1 when its rephrasing does, 1 when its unrelated prompt routes nowhere.
pub fn validate_one(
    net: &ScopeNet,
    model: &dyn CausalLm,
    tok: &Tok,
    keys: &Tensor,
    rec: &TrainingRecord,
    i: usize,
) -> Result<(f64, f64, f64), TrainingError> {
    let texts = [
        rec.prompt.as_str(),
        rec.rephrase.as_str(),
        rec.loc_prompt.as_str(),
    ];
    let head = net.head();
    let q = head.embed(&features(model, tok, net.shape.layer, &texts)?)?;
    let z = head.logits(&q, keys)?.to_vec2::<f32>()?;
    let route = |row: &[f32]| -> Option<usize> {
        let (j, best) =
            row.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |b, (j, &x)| if x > b.1 { (j, x) } else { b },
            );
        (best > 0.0).then_some(j)
    };
    let hit = |r: Option<usize>| if r == Some(i) { 1.0 } else { 0.0 };
    Ok((
        hit(route(&z[0])),
        hit(route(&z[1])),
        if route(&z[2]).is_none() { 1.0 } else { 0.0 },
    ))
}
