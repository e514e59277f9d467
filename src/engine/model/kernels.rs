//! CPU kernels candle lacks. `small_matmul`: `x (m, k) · wᵀ` for a handful of rows (decode
//! steps), where a GEMM library's packing and threading cost more than the arithmetic. Each
//! weight row is streamed once from memory and dotted with every input row while it is in L1.
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath::{exp_sub_sum, max_of};

/// Rows of `x` up to which the streaming kernel beats the GEMM on CPU.
const SMALL_M: usize = 16;
/// Weight rows per parallel task.
const BLOCK: usize = 64;

struct SmallMatmul;

/// `x (m, k)` and `w (n, k)` as contiguous f32 slices, checked.
struct Operands<'a> {
    x: &'a [f32],
    w: &'a [f32],
    m: usize,
    n: usize,
    k: usize,
}

impl<'a> Operands<'a> {
    fn of(
        op: &str,
        s1: &'a CpuStorage,
        l1: &Layout,
        s2: &'a CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<Self> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("{op}: f32 only");
        };
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("{op}: contiguous inputs only");
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || xe - xs != m * k || we - ws != n * k {
            candle_core::bail!("{op}: shapes ({m}, {k}) x ({n}, {k2})ᵀ");
        }
        Ok(Self {
            x: &x[xs..xe],
            w: &w[ws..we],
            m,
            n,
            k,
        })
    }
}

impl CustomOp2 for SmallMatmul {
    fn name(&self) -> &'static str {
        "small-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Operands { x, w, m, n, k } = Operands::of(self.name(), s1, l1, s2, l2)?;
        // out_t is (n, m): block b owns weight rows [b*BLOCK, ..).
        let mut out_t = vec![0f32; n * m];
        out_t
            .par_chunks_mut(BLOCK * m)
            .enumerate()
            .for_each(|(b, chunk)| {
                for (r, out_row) in chunk.chunks_mut(m).enumerate() {
                    let wr = &w[(b * BLOCK + r) * k..(b * BLOCK + r + 1) * k];
                    for (i, o) in out_row.iter_mut().enumerate() {
                        *o = dot(wr, &x[i * k..(i + 1) * k]);
                    }
                }
            });
        let out = if m == 1 {
            out_t
        } else {
            let mut out = vec![0f32; m * n];
            for r in 0..n {
                for i in 0..m {
                    out[i * n + r] = out_t[r * m + i];
                }
            }
            out
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Dot product with 16 independent lanes (vectorises to two AVX2 / one AVX-512 register).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        // Fixed-size views drop the bounds checks, so the loop vectorises.
        let x: &[f32; L] = x.try_into().expect("chunk of L");
        let y: &[f32; L] = y.try_into().expect("chunk of L");
        for j in 0..L {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `x (m, k) · w (n, k)ᵀ` with OpenBLAS's sgemm (row-major, `w` transposed in place).
#[cfg(feature = "openblas")]
struct BlasMatmul;

#[cfg(feature = "openblas")]
mod cblas {
    pub const ROW_MAJOR: i32 = 101;
    pub const NO_TRANS: i32 = 111;
    pub const TRANS: i32 = 112;
    extern "C" {
        #[allow(clippy::too_many_arguments)] // the C signature
        pub fn cblas_sgemm(
            order: i32,
            ta: i32,
            tb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }
}

#[cfg(feature = "openblas")]
impl CustomOp2 for BlasMatmul {
    fn name(&self) -> &'static str {
        "blas-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Operands { x, w, m, n, k } = Operands::of(self.name(), s1, l1, s2, l2)?;
        let mut out = vec![0f32; m * n];
        // SAFETY: the slices hold exactly m*k, n*k and m*n floats, matching the dims passed.
        unsafe {
            cblas::cblas_sgemm(
                cblas::ROW_MAJOR,
                cblas::NO_TRANS,
                cblas::TRANS,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                x.as_ptr(),
                k as i32,
                w.as_ptr(),
                k as i32,
                0.0,
                out.as_mut_ptr(),
                n as i32,
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// `g (m, n) · w (n, k)`: the input gradient of `x · wᵀ`, with OpenBLAS's sgemm.
#[cfg(feature = "openblas")]
struct BlasMatmulNn;

#[cfg(feature = "openblas")]
impl CustomOp2 for BlasMatmulNn {
    fn name(&self) -> &'static str {
        "blas-matmul-nn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(g), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("blas-matmul-nn: f32 only");
        };
        let (Some((gs, ge)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("blas-matmul-nn: contiguous inputs only");
        };
        let (m, n) = l1.shape().dims2()?;
        let (n2, k) = l2.shape().dims2()?;
        if n != n2 || ge - gs != m * n || we - ws != n * k {
            candle_core::bail!("blas-matmul-nn: shapes ({m}, {n}) x ({n2}, {k})");
        }
        let mut out = vec![0f32; m * k];
        // SAFETY: the slices hold exactly m*n, n*k and m*k floats, matching the dims passed.
        unsafe {
            cblas::cblas_sgemm(
                cblas::ROW_MAJOR,
                cblas::NO_TRANS,
                cblas::NO_TRANS,
                m as i32,
                k as i32,
                n as i32,
                1.0,
                g[gs..ge].as_ptr(),
                n as i32,
                w[ws..we].as_ptr(),
                k as i32,
                0.0,
                out.as_mut_ptr(),
                k as i32,
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((m, k))))
    }
}

/// `g (m, n) · w (n, k)` on CPU in f32 (OpenBLAS when built with it).
fn cpu_matmul_nn(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "openblas")]
    {
        let cpu_f32 = g.device().is_cpu() && g.dtype() == candle_core::DType::F32;
        if cpu_f32 && w.dtype() == candle_core::DType::F32 && g.rank() == 2 {
            return g
                .contiguous()?
                .apply_op2_no_bwd(&w.contiguous()?, &BlasMatmulNn);
        }
    }
    g.matmul(w)
}

/// `x (m, k) · w (n, k)ᵀ` on CPU in f32: the streaming kernel for a few rows, OpenBLAS (when
/// built with it) for more, candle's matmul otherwise.
pub(crate) fn cpu_matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.dim(0)?;
    if m <= SMALL_M {
        return small_matmul(x, w);
    }
    #[cfg(feature = "openblas")]
    {
        x.contiguous()?.apply_op2_no_bwd(w, &BlasMatmul)
    }
    #[cfg(not(feature = "openblas"))]
    {
        x.matmul(&w.t()?)
    }
}

/// `x (m, k) · w (n, k)ᵀ` for an `x` that carries gradients and a constant weight `w`: the
/// product runs through the fast CPU kernels, and the backward pass computes only `∂x = ∂y · w`.
/// candle's own matmul backward would also form the weight's gradient (a full `(n, k)` product
/// per projection per step) that editing never uses.
pub(crate) fn cpu_matmul_t_grad_x(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let y = cpu_matmul_t(&x.detach(), w)?;
    x.apply_op1(GradThroughConstWeight { w: w.clone(), y })
}

/// Forward: hands back the precomputed product `y`; backward: `∂x = ∂y · w`.
struct GradThroughConstWeight {
    w: Tensor,
    y: Tensor,
}

impl candle_core::CustomOp1 for GradThroughConstWeight {
    fn name(&self) -> &'static str {
        "matmul-const-weight"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.y.contiguous()?;
        let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
        Ok((CpuStorage::F32(v), y.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(cpu_matmul_nn(grad_res, &self.w)?))
    }
}

/// `x (m, k) · w (n, k)ᵀ` through the streaming kernel; callers check the preconditions.
fn small_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w, &SmallMatmul)
}

/// Causal attention on CPU without materialising repeated K/V heads, score matrices or masks:
/// one task per (batch row, head), visibility computed from the same rules as
/// [`super::Forward::mask`] (causal, left padding, sliding window).
pub(crate) struct CpuAttention {
    pub pad_left: Vec<usize>,
    pub past: usize,
    pub window: Option<usize>,
    pub scale: f32,
    /// Queries per sgemm block on the sgemm path ([`QUERY_BLOCK`] outside tests).
    #[cfg_attr(not(feature = "openblas"), allow(dead_code))]
    pub query_block: usize,
}

/// Queries per block in [`CpuAttention`]'s sgemm path: 256 positions × 3 grouped heads are
/// rows enough for sgemm to run near peak, and the work past the causal diagonal a block
/// still computes is 256 / t of the whole (3 % of an 8,192-token window).
pub(crate) const QUERY_BLOCK: usize = 256;

/// Strided view of a rank-4 `(b, heads, len, d)` tensor whose last dim is contiguous.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    stride: [usize; 3],
}

impl View<'_> {
    fn new<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<View<'a>> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("cpu-attention: f32 only");
        };
        let st = l.stride();
        if l.dims().len() != 4 || st[3] != 1 {
            candle_core::bail!("cpu-attention: rank-4 inputs with a contiguous last dim");
        }
        Ok(View {
            data,
            start: l.start_offset(),
            stride: [st[0], st[1], st[2]],
        })
    }
    /// `n` rows of `d` floats from `(b, h, 0)` at the view's row stride, as one slice for BLAS
    /// (`ld` = the row stride); checked against the storage.
    #[cfg(feature = "openblas")]
    fn rows(&self, b: usize, h: usize, n: usize, d: usize) -> candle_core::Result<&[f32]> {
        let o = self.start + b * self.stride[0] + h * self.stride[1];
        let end = o + n.saturating_sub(1) * self.stride[2] + d;
        if n == 0 || self.stride[2] < d || end > self.data.len() {
            candle_core::bail!("cpu-attention: a strided view outside its storage");
        }
        Ok(&self.data[o..end])
    }
    #[inline]
    fn row(&self, b: usize, h: usize, i: usize, d: usize) -> &[f32] {
        let o = self.start + b * self.stride[0] + h * self.stride[1] + i * self.stride[2];
        &self.data[o..o + d]
    }
}

/// Query rows per KV head (grouped heads × positions) from which the sgemm path beats one
/// scalar dot per (query, key): prefill and continuation of a cached prefix, not decode steps.
#[cfg(feature = "openblas")]
const GEMM_ROWS: usize = 16;

impl CpuAttention {
    /// Query `i`'s absolute position and the first and last key it may see (causal and
    /// sliding window; left padding is checked per key).
    #[inline]
    fn visible(&self, i: usize, s: usize) -> (usize, usize, usize) {
        let qa = self.past + i;
        let lo = match self.window {
            Some(w) => (qa + 1).saturating_sub(w),
            None => 0,
        };
        (qa, lo, qa.min(s - 1))
    }

    /// Attention as sgemm calls per (batch row, KV head, block of queries): the grouped query
    /// heads of a block stacked as rows, `scores = Q·Kᵀ` over the keys the block can see, a
    /// masked softmax per row, then `P·V`. Blocking the queries bounds the score buffer (a full
    /// 8,192-token window would need 0.8 GB per KV head) and skips keys after a block's last
    /// query, so a long prefill computes about half the causal square instead of all of it.
    /// Masked scores inside a block are computed and thrown away; that is far cheaper than
    /// scalar dots once a few hundred keys are cached. OpenBLAS threads each call, so the
    /// outer loops stay sequential; the softmax runs on rayon.
    #[cfg(feature = "openblas")]
    fn attend_gemm(
        &self,
        [b, h, kvh, t, s, d]: [usize; 6],
        q: &View,
        k: &View,
        v: &View,
    ) -> candle_core::Result<Vec<f32>> {
        let group = h / kvh;
        let block = self.query_block.clamp(1, t);
        let mut out = vec![0f32; b * t * h * d];
        let mut qbuf = vec![0f32; group * block * d];
        let mut scores = vec![0f32; group * block * s];
        let mut res = vec![0f32; group * block * d];
        for bi in 0..b {
            let pad = self.pad_left.get(bi).copied().unwrap_or(0);
            for kh in 0..kvh {
                let kp = k.rows(bi, kh, s, d)?;
                let vp = v.rows(bi, kh, s, d)?;
                for c0 in (0..t).step_by(block) {
                    let n = block.min(t - c0);
                    let rows = group * n;
                    // Keys this block may see: from its first query's lowest to its last's
                    // highest (both grow with the position).
                    let (_, k_lo, _) = self.visible(c0, s);
                    let (_, _, k_hi) = self.visible(c0 + n - 1, s);
                    let keys = k_hi + 1 - k_lo;
                    for gi in 0..group {
                        for i in 0..n {
                            let r = gi * n + i;
                            qbuf[r * d..(r + 1) * d].copy_from_slice(q.row(
                                bi,
                                kh * group + gi,
                                c0 + i,
                                d,
                            ));
                        }
                    }
                    let (ks, vs) = (&kp[k_lo * k.stride[2]..], &vp[k_lo * v.stride[2]..]);
                    let sc = &mut scores[..rows * keys];
                    // SAFETY: qbuf holds rows×d floats and sc rows×keys; `rows` checked that s
                    // rows of d floats at the view's row stride lie inside the storage, and
                    // k_lo + keys <= s.
                    unsafe {
                        cblas::cblas_sgemm(
                            cblas::ROW_MAJOR,
                            cblas::NO_TRANS,
                            cblas::TRANS,
                            rows as i32,
                            keys as i32,
                            d as i32,
                            self.scale,
                            qbuf.as_ptr(),
                            d as i32,
                            ks.as_ptr(),
                            k.stride[2] as i32,
                            0.0,
                            sc.as_mut_ptr(),
                            keys as i32,
                        );
                    }
                    sc.par_chunks_mut(keys).enumerate().for_each(|(r, row)| {
                        // A row's visible keys are one run: a left-padding query sees only
                        // itself, a real one from the window's start (past the padding) to
                        // itself. Hidden scores become 0 weights.
                        let (qa, lo, hi_key) = self.visible(c0 + r % n, s);
                        let first = if qa < pad { qa } else { lo.max(pad) };
                        let (a, e) = (first - k_lo, hi_key + 1 - k_lo);
                        row[..a].fill(0.0);
                        row[e..].fill(0.0);
                        let live = &mut row[a..e];
                        let sum = exp_sub_sum(live, max_of(live));
                        let inv = 1.0 / sum;
                        live.iter_mut().for_each(|x| *x *= inv);
                    });
                    // SAFETY: sc is rows×keys, res rows×d; v's extent checked as above.
                    unsafe {
                        cblas::cblas_sgemm(
                            cblas::ROW_MAJOR,
                            cblas::NO_TRANS,
                            cblas::NO_TRANS,
                            rows as i32,
                            d as i32,
                            keys as i32,
                            1.0,
                            sc.as_ptr(),
                            keys as i32,
                            vs.as_ptr(),
                            v.stride[2] as i32,
                            0.0,
                            res.as_mut_ptr(),
                            d as i32,
                        );
                    }
                    for gi in 0..group {
                        let hi = kh * group + gi;
                        for i in 0..n {
                            let r = gi * n + i;
                            let o = ((bi * t + c0 + i) * h + hi) * d;
                            out[o..o + d].copy_from_slice(&res[r * d..(r + 1) * d]);
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

impl candle_core::CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = lq.shape().dims4()?;
        let (_, kvh, s, _) = lk.shape().dims4()?;
        let (q, k, v) = (View::new(sq, lq)?, View::new(sk, lk)?, View::new(sv, lv)?);
        let group = h / kvh;
        #[cfg(feature = "openblas")]
        if group * t >= GEMM_ROWS {
            let out = self.attend_gemm([b, h, kvh, t, s, d], &q, &k, &v)?;
            return Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))));
        }
        let mut out = vec![0f32; b * t * h * d];
        // Task (bi, hi) writes rows out[bi, i, hi*d..] for every i: disjoint, gathered after.
        let parts: Vec<Vec<f32>> = (0..b * h)
            .into_par_iter()
            .map(|task| {
                let (bi, hi) = (task / h, task % h);
                let kh = hi / group;
                let pad = self.pad_left.get(bi).copied().unwrap_or(0);
                let mut res = vec![0f32; t * d];
                let mut scores = vec![0f32; s];
                for i in 0..t {
                    let (qa, lo, hi_key) = self.visible(i, s);
                    let qi = q.row(bi, hi, i, d);
                    let visible = &mut scores[lo..=hi_key];
                    let mut max = f32::NEG_INFINITY;
                    for (off, sc) in visible.iter_mut().enumerate() {
                        let j = lo + off;
                        *sc = if j < pad && j != qa {
                            f32::NEG_INFINITY // left padding, hidden from real tokens
                        } else {
                            dot(qi, k.row(bi, kh, j, d)) * self.scale
                        };
                        max = max.max(*sc);
                    }
                    let sum = exp_sub_sum(visible, max);
                    let o = &mut res[i * d..(i + 1) * d];
                    for (off, &e) in visible.iter().enumerate() {
                        let p = e / sum;
                        if p == 0.0 {
                            continue;
                        }
                        for (x, y) in o.iter_mut().zip(v.row(bi, kh, lo + off, d)) {
                            *x = p.mul_add(*y, *x);
                        }
                    }
                }
                res
            })
            .collect();
        for (task, res) in parts.into_iter().enumerate() {
            let (bi, hi) = (task / h, task % h);
            for i in 0..t {
                let o = ((bi * t + i) * h + hi) * d;
                out[o..o + d].copy_from_slice(&res[i * d..(i + 1) * d]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values in [-1, 1): tests must not depend on an unseeded RNG.
    fn filled(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_the_gemm() {
        for &(m, k, n) in &[(1, 33, 70), (3, 64, 129), (16, 576, 200), (40, 96, 130)] {
            let x = filled(&[m, k], 1);
            let w = filled(&[n, k], 2);
            let a = small_matmul(&x, &w).unwrap();
            let b = x.matmul(&w.t().unwrap()).unwrap();
            let c = cpu_matmul_t(&x, &w).unwrap();
            let d2 = (&c - &b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d2 < 1e-4, "{m}x{k}x{n}: {d2}");
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-4, "{m}x{k}x{n}: {d}");
        }
    }

    /// The fused kernel against plain ops with the additive mask: GQA, left padding, a KV
    /// history (past > 0) and a sliding window; queries laid out as the model passes them
    /// (heads split from `(b, t, h·d)`, so strided). Five positions take the scalar path,
    /// twelve (24 query rows per KV head) the sgemm path, in one block of queries or in blocks
    /// of 5 and 1 (a last block shorter than the others; key ranges cut per block).
    #[test]
    fn fused_attention_matches_plain_ops() {
        for (t, block) in [(5, QUERY_BLOCK), (12, QUERY_BLOCK), (12, 5), (12, 1)] {
            fused_attention_case(t, block);
        }
    }

    fn fused_attention_case(t: usize, query_block: usize) {
        let dev = Device::Cpu;
        let (b, h, kvh, past, d) = (2, 4, 2, 3, 8);
        let q = filled(&[b, t, h, d], 3).transpose(1, 2).unwrap();
        let k = filled(&[b, kvh, past + t, d], 4);
        let v = filled(&[b, kvh, past + t, d], 5);
        for window in [None, Some(3)] {
            let pad = vec![0, 2];
            let mut cache = crate::engine::model::KvCache::new(1);
            cache.set_pad_left(pad.clone());
            cache
                .append(
                    0,
                    k.narrow(2, 0, past).unwrap(),
                    v.narrow(2, 0, past).unwrap(),
                )
                .unwrap();
            let fwd = crate::engine::model::Forward::new(b, t, &dev).with_cache(&mut cache);
            let fused = q
                .apply_op3_no_bwd(
                    &k,
                    &v,
                    &CpuAttention {
                        pad_left: pad.clone(),
                        past,
                        window,
                        scale: 0.3,
                        query_block,
                    },
                )
                .unwrap();
            let rep = |x: &Tensor| {
                x.unsqueeze(2)
                    .unwrap()
                    .expand((b, kvh, h / kvh, past + t, d))
                    .unwrap()
                    .reshape((b, h, past + t, d))
                    .unwrap()
            };
            let att = (q
                .contiguous()
                .unwrap()
                .matmul(&rep(&k).t().unwrap())
                .unwrap()
                * 0.3)
                .unwrap();
            let att = att
                .broadcast_add(fwd.mask(window, candle_core::DType::F32).unwrap().unwrap())
                .unwrap();
            let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
            let plain = att
                .matmul(&rep(&v))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap();
            let diff = (fused - plain)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 1e-5,
                "t {t}, block {query_block}, window {window:?}: {diff}"
            );
        }
    }
}
