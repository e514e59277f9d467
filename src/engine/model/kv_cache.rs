use candle_core::Tensor;

use super::Result;

/// Keys and values of every block for a batch of sequences, `(b, kv_heads, t, head_dim)` per
/// layer. Lives outside the model so many sessions can share one set of weights.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pad_left: Vec<usize>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            pad_left: Vec::new(),
        }
    }

    /// Tokens (padding included) already cached.
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Left padding of each batch row, fixed at prefill.
    pub fn pad_left(&self) -> &[usize] {
        &self.pad_left
    }

    pub(crate) fn set_pad_left(&mut self, pad: Vec<usize>) {
        self.pad_left = pad;
    }

    /// Appends this window's keys and values for `layer`; returns the full history.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.layers[layer].take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Keeps only the given batch rows (finished sequences leave the batch).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let Some(dev) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device().clone())
        else {
            self.pad_left = rows
                .iter()
                .map(|&r| self.pad_left.get(r).copied().unwrap_or(0))
                .collect();
            return Ok(());
        };
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &dev,
        )?;
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.pad_left = rows
            .iter()
            .map(|&r| self.pad_left.get(r).copied().unwrap_or(0))
            .collect();
        Ok(())
    }
}
