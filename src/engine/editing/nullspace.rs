//! The null space of a layer's key covariance, which AlphaEdit projects its updates onto: the
//! eigenvectors of `C = E[k kᵀ]` whose eigenvalues are below a threshold span the directions
//! the preserved knowledge's keys barely use, so an update `ΔW = R Xᵀ` with `X` in that span
//! leaves `ΔW k ≈ 0` for them. Computed once per (statistic, threshold) with an f64 symmetric
//! eigendecomposition, cached in memory and on disk beside the statistic.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::stats::LayerStats;
use super::EditError;

/// One layer's null-space basis.
pub struct NullSpace {
    /// `(ff, rank)` on the CPU: orthonormal eigenvectors with eigenvalue below the threshold.
    basis: Tensor,
    pub dim: usize,
    pub rank: usize,
    /// The covariance's smallest and largest eigenvalues.
    pub eigen_range: (f64, f64),
}

impl NullSpace {
    fn new(basis: Vec<f32>, dim: usize, rank: usize, eigen_range: (f64, f64)) -> Self {
        let basis = Tensor::from_vec(basis, (dim, rank), &Device::Cpu)
            .expect("a basis of dim × rank values");
        Self {
            basis,
            dim,
            rank,
            eigen_range,
        }
    }

    /// The basis `U₀` as a `(ff, rank)` tensor on `device` (shared, not copied, on the CPU).
    pub fn basis(&self, device: &Device) -> Result<Tensor, EditError> {
        Ok(self.basis.to_device(device)?)
    }
}

/// Null spaces in memory and under the statistics directory.
#[derive(Default)]
pub struct NullSpaceCache {
    memory: Mutex<HashMap<PathBuf, Arc<NullSpace>>>,
}

/// Where the null space of the statistic stored at `stats_file` is cached.
fn path_of(stats_file: &Path, threshold: f64) -> PathBuf {
    let stem = stats_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    stats_file.with_file_name(format!("nullspace-{stem}-t{threshold:e}.safetensors"))
}

impl NullSpaceCache {
    /// Whether the null space below `threshold` of the statistic stored at `stats_file` is in
    /// memory or on disk.
    pub fn cached(&self, stats_file: &Path, threshold: f64) -> bool {
        let path = path_of(stats_file, threshold);
        self.memory
            .lock()
            .expect("null-space lock")
            .contains_key(&path)
            || path.is_file()
    }

    /// The null space of `stats` (stored at `stats_file`) below `threshold`.
    pub fn get(
        &self,
        stats: &LayerStats,
        stats_file: &Path,
        threshold: f64,
    ) -> Result<Arc<NullSpace>, EditError> {
        let path = path_of(stats_file, threshold);
        if let Some(n) = self.memory.lock().expect("null-space lock").get(&path) {
            return Ok(n.clone());
        }
        let ns = match read(&path) {
            Some(n) if n.dim == stats.dim => n,
            _ => {
                let n = compute(stats, threshold);
                if let Err(e) = write(&path, &n) {
                    tracing::warn!(error = %e, "could not cache the null space on disk");
                }
                n
            }
        };
        let ns = Arc::new(ns);
        self.memory
            .lock()
            .expect("null-space lock")
            .insert(path, ns.clone());
        Ok(ns)
    }
}

/// Computes the null space of `stats` (stored at `stats_file`) below `threshold` into its cache
/// file, for [`NullSpaceCache::get`] to read (run off the engine thread: an f64
/// eigendecomposition takes seconds).
pub fn compute_to_disk(
    stats: &LayerStats,
    stats_file: &Path,
    threshold: f64,
) -> Result<(), EditError> {
    let path = path_of(stats_file, threshold);
    write(&path, &compute(stats, threshold))
        .map_err(|e| EditError::Stats(format!("{}: {e}", path.display())))
}

fn compute(stats: &LayerStats, threshold: f64) -> NullSpace {
    let t = Instant::now();
    let n = stats.dim;
    let c = nalgebra::DMatrix::<f64>::from_row_slice(n, n, &stats.mom2);
    let eig = nalgebra::SymmetricEigen::new(c);
    let keep: Vec<usize> = (0..n).filter(|&i| eig.eigenvalues[i] < threshold).collect();
    let mut basis = Vec::with_capacity(n * keep.len());
    for r in 0..n {
        for &j in &keep {
            basis.push(eig.eigenvectors[(r, j)] as f32);
        }
    }
    let lo = eig
        .eigenvalues
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let hi = eig
        .eigenvalues
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    tracing::info!(
        layer = stats.provenance.layer,
        rank = keep.len(),
        dim = n,
        seconds = t.elapsed().as_secs_f64(),
        "key covariance null space computed"
    );
    NullSpace::new(basis, n, keep.len(), (lo, hi))
}

fn write(path: &Path, n: &NullSpace) -> Result<(), String> {
    let values: Vec<f32> = n
        .basis
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n.dim, n.rank], &bytes)
            .map_err(|e| e.to_string())?;
    let meta: HashMap<String, String> = [
        ("eigen_min".to_string(), n.eigen_range.0.to_string()),
        ("eigen_max".to_string(), n.eigen_range.1.to_string()),
    ]
    .into();
    let out =
        safetensors::serialize(vec![("basis", view)], Some(meta)).map_err(|e| e.to_string())?;
    // Write then rename: a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, out).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

fn read(path: &Path) -> Option<NullSpace> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let meta = meta.metadata().as_ref()?;
    let lo: f64 = meta.get("eigen_min")?.parse().ok()?;
    let hi: f64 = meta.get("eigen_max")?.parse().ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor("basis").ok()?;
    let (dim, rank) = (*t.shape().first()?, *t.shape().get(1)?);
    let basis: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    (basis.len() == dim * rank).then(|| NullSpace::new(basis, dim, rank, (lo, hi)))
}
