use std::collections::BTreeMap;

use candle_core::Tensor;

use super::Result;

/// Keys and values of every block for a batch of sequences, `(b, kv_heads, t, head_dim)` per
/// layer. Lives outside the model so many sessions can share one set of weights.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pad_left: Vec<usize>,
    /// A shared prefix read by a batch: one row broadcast to every row, never appended to.
    frozen: bool,
    /// Per layer, the memory each row's sequence was routed to by a per-sequence module
    /// (WISE), decided on its first window and held for the rest of it.
    routes: BTreeMap<usize, Vec<Option<usize>>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            pad_left: Vec::new(),
            frozen: false,
            routes: BTreeMap::new(),
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

    /// The routes held for `layer`, one per row, if a window decided them.
    pub(crate) fn routes(&self, layer: usize) -> Option<&[Option<usize>]> {
        self.routes.get(&layer).map(Vec::as_slice)
    }

    pub(crate) fn set_routes(&mut self, layer: usize, routes: Vec<Option<usize>>) {
        self.routes.insert(layer, routes);
    }

    /// Appends this window's keys and values for `layer`; returns the full history.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if self.frozen {
            let Some((pk, pv)) = &self.layers[layer] else {
                return Ok((k, v));
            };
            let (pk, pv) = if pk.dim(0)? == 1 && k.dim(0)? > 1 {
                let (b, h, _, d) = k.dims4()?;
                let p = pk.dim(2)?;
                (
                    pk.broadcast_as((b, h, p, d))?,
                    pv.broadcast_as((b, h, p, d))?,
                )
            } else {
                (pk.clone(), pv.clone())
            };
            return Ok((Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?));
        }
        let (k, v) = match self.layers[layer].take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// A read-only view of this one-row cache for a batch of `batch` rows continuing it: each
    /// forward sees the prefix's keys and values broadcast, and nothing is appended, so one
    /// prefix serves any number of batches without copies.
    pub fn frozen_prefix(&self, batch: usize) -> Self {
        let routes = self
            .routes
            .iter()
            .map(|(&l, r)| match r.as_slice() {
                [one] => (l, vec![*one; batch]),
                _ => (l, r.clone()),
            })
            .collect();
        Self {
            layers: self.layers.clone(),
            pad_left: vec![0; batch],
            frozen: true,
            routes,
        }
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            if k.dim(2)? > len {
                *k = k.narrow(2, 0, len)?;
                *v = v.narrow(2, 0, len)?;
            }
        }
        Ok(())
    }

    /// Keeps only the given batch rows (finished sequences leave the batch).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        for r in self.routes.values_mut() {
            *r = rows.iter().map(|&i| r.get(i).copied().flatten()).collect();
        }
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
