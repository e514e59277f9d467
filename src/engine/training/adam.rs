//! Adam (Kingma & Ba) with gradient-norm clipping, whose moments are plain tensors so that a
//! checkpoint holds them and a resumed run continues bit for bit.
use std::collections::HashMap;

use candle_core::{backprop::GradStore, Tensor, Var};

use super::TrainingError;

pub struct Adam {
    vars: Vec<Var>,
    lrs: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Adam {
    /// One learning rate per variable (MEND trains the network and its edit learning rates at
    /// different rates).
    pub fn new(vars: Vec<Var>, lrs: Vec<f64>) -> Result<Self, TrainingError> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            vars,
            lrs,
            t: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// One step on `grads` (summed over accumulated batches, then divided by `accumulate`),
    /// after scaling them down to a global L2 norm of at most `clip`. Returns the norm before
    /// clipping.
    pub fn step(&mut self, grads: &[Option<Tensor>], clip: f64) -> Result<f64, TrainingError> {
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        let factor = if norm > clip {
            clip / (norm + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        let t = self.t as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = (g * factor)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&self.m[i] / (1.0 - b1.powi(t)))?;
            let v_hat = (&self.v[i] / (1.0 - b2.powi(t)))?;
            let step = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let var = &self.vars[i];
            var.set(&(var.as_tensor() - (step * self.lrs[i])?)?)?;
        }
        Ok(norm)
    }

    /// The moments as named tensors (`adam.m.{i}`, `adam.v.{i}`).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.insert(format!("adam.m.{i}"), m.clone());
            out.insert(format!("adam.v.{i}"), v.clone());
        }
        out
    }

    /// Restores the moments `tensors` wrote and the step count.
    pub fn restore(
        &mut self,
        t: &HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<(), TrainingError> {
        for i in 0..self.vars.len() {
            for (name, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adam.{name}.{i}");
                let x = t
                    .get(&key)
                    .ok_or_else(|| TrainingError::Artefact(format!("checkpoint lacks `{key}`")))?;
                if x.dims() != slot.dims() {
                    return Err(TrainingError::Artefact(format!(
                        "checkpoint's `{key}` has the wrong shape"
                    )));
                }
                *slot = x.clone();
            }
        }
        self.t = steps;
        Ok(())
    }
}

/// Adds `store`'s gradients of `vars` into `acc` (the accumulated batch).
pub fn accumulate(
    acc: &mut [Option<Tensor>],
    vars: &[Var],
    store: &GradStore,
) -> Result<(), TrainingError> {
    for (slot, var) in acc.iter_mut().zip(vars) {
        if let Some(g) = store.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                None => g.clone(),
                Some(a) => (a + g)?,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn minimises_a_quadratic_and_clips_the_gradient() {
        let x = Var::new(&[3f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![x.clone()], vec![0.1]).unwrap();
        for _ in 0..200 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let store = loss.backward().unwrap();
            let mut acc = vec![None];
            accumulate(&mut acc, std::slice::from_ref(&x), &store).unwrap();
            opt.step(&acc, 1.0).unwrap();
        }
        let v = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|a| a.abs() < 0.05), "{v:?}");
        let norm = opt
            .step(
                &[Some(Tensor::new(&[30f32, 40.0], &Device::Cpu).unwrap())],
                1.0,
            )
            .unwrap();
        assert_eq!(norm, 50.0);
    }
}
