//! Named activation sites and the hook set a forward pass consults at each of them.
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

use super::{ModelError, Result};

/// What a site holds in every block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteKind {
    /// Output of the attention block's output projection (before the residual add).
    AttnOut,
    /// The MLP's first projection before its activation (llama: the gate projection; gpt2 and
    /// gpt-neox: the up projection), where KN attributes its neurons.
    MlpPre,
    /// The key `k` entering the MLP's down/out projection (after the activation/gating).
    MlpIn,
    /// Output of the MLP's down/out projection (before the residual add).
    MlpOut,
    /// The residual stream leaving the block.
    Residual,
}

impl SiteKind {
    pub const ALL: [SiteKind; 5] = [
        Self::AttnOut,
        Self::MlpPre,
        Self::MlpIn,
        Self::MlpOut,
        Self::Residual,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Self::AttnOut => "attn.out",
            Self::MlpPre => "mlp.pre",
            Self::MlpIn => "mlp.in",
            Self::MlpOut => "mlp.out",
            Self::Residual => "residual",
        }
    }
}

/// `layers.{i}.{attn.out|mlp.pre|mlp.in|mlp.out|residual}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    pub layer: usize,
    pub kind: SiteKind,
}

impl Site {
    pub fn new(layer: usize, kind: SiteKind) -> Self {
        Self { layer, kind }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layers.{}.{}", self.layer, self.kind.suffix())
    }
}

impl FromStr for Site {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            ModelError::InvalidInput(format!(
                "`{s}` is not a site (expected e.g. `layers.3.mlp.in`)"
            ))
        };
        let rest = s.strip_prefix("layers.").ok_or_else(bad)?;
        let (layer, suffix) = rest.split_once('.').ok_or_else(bad)?;
        let layer = layer.parse().map_err(|_| bad())?;
        let kind = SiteKind::ALL
            .into_iter()
            .find(|k| k.suffix() == suffix)
            .ok_or_else(bad)?;
        Ok(Self { layer, kind })
    }
}

/// Which token positions of the current forward window a read keeps.
#[derive(Debug, Clone)]
pub enum Positions {
    /// The whole `(b, t, d)` tensor.
    All,
    /// `(batch_row, position)` pairs; the read yields `(n, d)` in this order.
    Rows(Vec<(usize, usize)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchMode {
    /// Overwrite the site's value at the rows.
    Set,
    /// Add to the site's value at the rows.
    Add,
}

/// What to do when the forward pass reaches a site.
#[derive(Debug, Clone)]
pub enum HookAction {
    Read(Positions),
    /// Replace the whole value (same shape); the tensor may carry gradients.
    Replace(Tensor),
    /// Write `values` (`(n, d)`, may carry gradients) at `(batch_row, position)` pairs.
    Patch {
        at: Vec<(usize, usize)>,
        values: Tensor,
        mode: PatchMode,
    },
}

/// A set of hooks for one forward pass. Reads are collected and can be taken afterwards.
#[derive(Debug, Default)]
pub struct Hooks {
    actions: Vec<(Site, HookAction)>,
    captured: HashMap<Site, Tensor>,
}

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn read(mut self, site: Site, positions: Positions) -> Self {
        self.actions.push((site, HookAction::Read(positions)));
        self
    }

    pub fn replace(mut self, site: Site, value: Tensor) -> Self {
        self.actions.push((site, HookAction::Replace(value)));
        self
    }

    pub fn patch(
        mut self,
        site: Site,
        at: Vec<(usize, usize)>,
        values: Tensor,
        mode: PatchMode,
    ) -> Self {
        self.actions
            .push((site, HookAction::Patch { at, values, mode }));
        self
    }

    /// The value read at `site` during the last forward pass.
    pub fn captured(&self, site: Site) -> Option<&Tensor> {
        self.captured.get(&site)
    }

    pub fn take(&mut self, site: Site) -> Option<Tensor> {
        self.captured.remove(&site)
    }

    /// Deepest layer any hook touches; lets callers stop a forward early.
    pub fn max_layer(&self) -> Option<usize> {
        self.actions.iter().map(|(s, _)| s.layer).max()
    }

    /// Called by the architectures at each site. Actions apply in the order they were added.
    pub(crate) fn apply(&mut self, site: Site, mut x: Tensor) -> Result<Tensor> {
        for (s, action) in &self.actions {
            if *s != site {
                continue;
            }
            match action {
                HookAction::Read(Positions::All) => {
                    self.captured.insert(site, x.clone());
                }
                HookAction::Read(Positions::Rows(rows)) => {
                    self.captured.insert(site, gather_rows(&x, rows)?);
                }
                HookAction::Replace(v) => {
                    if v.dims() != x.dims() {
                        return Err(ModelError::InvalidInput(format!(
                            "replacement for `{site}` has shape {:?}, the site has {:?}",
                            v.dims(),
                            x.dims()
                        )));
                    }
                    x = v.to_dtype(x.dtype())?;
                }
                HookAction::Patch { at, values, mode } => {
                    x = patch_rows(&x, at, values, *mode)?;
                }
            }
        }
        Ok(x)
    }
}

/// `(b, t, d)` → `(n, d)` rows at `(batch_row, position)`.
pub(crate) fn gather_rows(x: &Tensor, rows: &[(usize, usize)]) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let idx = flat_indices(rows, b, t)?;
    let idx = Tensor::from_vec(idx, rows.len(), x.device())?;
    Ok(x.flatten_to(1)?.index_select(&idx, 0)?)
}

fn flat_indices(rows: &[(usize, usize)], b: usize, t: usize) -> Result<Vec<u32>> {
    rows.iter()
        .map(|&(r, p)| {
            if r >= b || p >= t {
                Err(ModelError::InvalidInput(format!(
                    "hook position ({r}, {p}) is outside the ({b}, {t}) window"
                )))
            } else {
                Ok((r * t + p) as u32)
            }
        })
        .collect()
}

/// Writes `values` at rows through a one-hot selection matmul: plain ops, so gradients flow to
/// `values`, and untouched rows stay bit-identical (`x + 0`, `x * 1`).
pub(crate) fn patch_rows(
    x: &Tensor,
    at: &[(usize, usize)],
    values: &Tensor,
    mode: PatchMode,
) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let n = at.len();
    if values.dims() != [n, d] {
        return Err(ModelError::InvalidInput(format!(
            "patch values have shape {:?}, expected [{n}, {d}]",
            values.dims()
        )));
    }
    let idx = flat_indices(at, b, t)?;
    let mut sel = vec![0f32; b * t * n];
    let mut keep = vec![1f32; b * t];
    for (i, &row) in idx.iter().enumerate() {
        sel[row as usize * n + i] = 1.0;
        keep[row as usize] = 0.0;
    }
    let dev = x.device();
    let sel = Tensor::from_vec(sel, (b * t, n), dev)?.to_dtype(values.dtype())?;
    let scattered = sel
        .matmul(values)?
        .to_dtype(x.dtype())?
        .reshape((b, t, d))?;
    let out = match mode {
        PatchMode::Add => (x + scattered)?,
        PatchMode::Set => {
            let keep = Tensor::from_vec(keep, (b, t, 1), dev)?.to_dtype(x.dtype())?;
            (x.broadcast_mul(&keep)? + scattered)?
        }
    };
    Ok(out)
}

/// Applies the hook set, if any, at `site`.
#[inline]
pub(crate) fn at_site(hooks: &mut Option<&mut Hooks>, site: Site, x: Tensor) -> Result<Tensor> {
    match hooks {
        Some(h) => h.apply(site, x),
        None => Ok(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn site_names_round_trip() {
        for kind in SiteKind::ALL {
            let s = Site::new(7, kind);
            assert_eq!(s.to_string().parse::<Site>().unwrap(), s);
        }
        assert_eq!(Site::new(3, SiteKind::MlpIn).to_string(), "layers.3.mlp.in");
        assert!("layers.x.mlp.in".parse::<Site>().is_err());
        assert!("layers.1.mlp.inner".parse::<Site>().is_err());
    }

    #[test]
    fn patch_set_and_add_touch_only_their_rows() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((2, 3, 2))
            .unwrap();
        let v = Tensor::new(&[[100f32, 200.]], &dev).unwrap();
        let set = patch_rows(&x, &[(1, 2)], &v, PatchMode::Set).unwrap();
        let add = patch_rows(&x, &[(1, 2)], &v, PatchMode::Add).unwrap();
        let set: Vec<f32> = set.flatten_all().unwrap().to_vec1().unwrap();
        let add: Vec<f32> = add.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            set,
            vec![0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 100., 200.]
        );
        assert_eq!(
            add,
            vec![0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 110., 211.]
        );
        assert!(patch_rows(&x, &[(2, 0)], &v, PatchMode::Set).is_err());
    }

    #[test]
    fn gather_reads_rows_in_order() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((2, 3, 2))
            .unwrap();
        let g = gather_rows(&x, &[(1, 0), (0, 2)]).unwrap();
        assert_eq!(
            g.to_vec2::<f32>().unwrap(),
            vec![vec![6., 7.], vec![4., 5.]]
        );
    }
}
