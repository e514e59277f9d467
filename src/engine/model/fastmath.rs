//! A vectorisable `exp` for the attention softmax and the scoring log-softmax. `f32::exp` is a
//! libm call per element, which the compiler cannot vectorise; in a long prefill the softmax
//! runs it on every score of the causal square (about 9·10⁹ times for one 8,192-token window
//! of the default model), which costs as much as the two sgemms around it. This version works
//! on fixed-size chunks of plain arithmetic that LLVM turns into AVX2/AVX-512 code.
//!
//! Method: `eˣ = 2ⁿ · eʳ` with `n` = x·log₂e rounded to the nearest integer and
//! `r = x − n·ln 2` (ln 2 split in two for precision), `eʳ` by the minimax polynomial of
//! degree 6 on `|r| ≤ ln 2 / 2` (Cephes' `expf` coefficients) and `2ⁿ` built from the exponent
//! bits. Relative error ≤ 2 ulp for the inputs softmax gives it (`x ≤ 0`); below `MIN_ARG` the
//! result is exactly 0, as `f32::exp` would round any such value into the subnormals that
//! carry no weight next to the row's maximum.

/// Below this (ln of the smallest normal f32) `exp` returns 0.
const MIN_ARG: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const ROUNDER: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `eˣ` for `x ≤ 0` (larger inputs overflow the exponent bits; callers subtract a maximum).
/// Only bit casts and wrapping integer ops: a checked `as i32` or `+` (debug builds check
/// overflow) keeps LLVM from vectorising the loop.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    let xc = x.max(MIN_ARG);
    // Adding 1.5·2²³ rounds x·log₂e to the nearest integer n, held in the low mantissa bits.
    let shifted = xc.mul_add(LOG2E, ROUNDER);
    let n = shifted - ROUNDER;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p = P[0];
    for &c in &P[1..] {
        p = p.mul_add(r, c);
    }
    let er = (p * r).mul_add(r, r) + 1.0;
    // n ∈ [-126, 0] after the clamp, so n + 127 is a valid biased exponent.
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127).wrapping_shl(23));
    if x < MIN_ARG {
        0.0
    } else {
        er * two_n
    }
}

/// Writes `e^(x − max)` over `xs` in place and returns their sum. `max` must be at least every
/// element (the row maximum), so every argument is ≤ 0.
pub(crate) fn exp_sub_sum(xs: &mut [f32], max: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut chunks = xs.chunks_exact_mut(L);
    for c in &mut chunks {
        let c: &mut [f32; L] = c.try_into().expect("chunk of L");
        for j in 0..L {
            c[j] = exp_nonpos(c[j] - max);
            acc[j] += c[j];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_nonpos(*x - max);
        sum += *x;
    }
    sum
}

/// `Σ e^(x − max)` over `xs` without writing them (a log-softmax normaliser over logits that
/// other readers still need). `max` must be at least every element.
pub(crate) fn sum_exp_sub(xs: &[f32], max: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let chunks = xs.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        let c: &[f32; L] = c.try_into().expect("chunk of L");
        for j in 0..L {
            acc[j] += exp_nonpos(c[j] - max);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for &x in rest {
        sum += exp_nonpos(x - max);
    }
    sum
}

/// The maximum of a non-empty slice, in 16 lanes (vectorises where `fold(f32::max)` does not).
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [f32::NEG_INFINITY; L];
    let chunks = xs.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        let c: &[f32; L] = c.try_into().expect("chunk of L");
        for j in 0..L {
            acc[j] = acc[j].max(c[j]);
        }
    }
    acc.iter()
        .chain(rest)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_matches_libm_within_two_ulp() {
        let mut worst = 0;
        let mut x = 0.0f32;
        // Dense near 0 (where softmax weight lives), every representable step of 1e-4 down
        // to the cut-off.
        while x > MIN_ARG {
            let (ours, libm) = (exp_nonpos(x), x.exp());
            if libm.is_normal() {
                worst = worst.max(ulps(ours, libm));
            }
            x -= 1e-4;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-100.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn exp_sub_sum_and_max_over_chunks_and_remainders() {
        for n in [1usize, 5, 16, 17, 40, 333] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37) % 23) as f32 * 0.7 - 9.0).collect();
            let max = max_of(&xs);
            assert_eq!(max, xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let mut ys = xs.clone();
            let sum = exp_sub_sum(&mut ys, max);
            let want: Vec<f32> = xs.iter().map(|x| (x - max).exp()).collect();
            for (a, b) in ys.iter().zip(&want) {
                assert!(ulps(*a, *b) <= 2, "{a} vs {b}");
            }
            let want_sum: f32 = want.iter().sum();
            assert!(
                (sum - want_sum).abs() <= 1e-5 * want_sum,
                "{sum} vs {want_sum}"
            );
            assert_eq!(sum_exp_sub(&xs, max), sum, "same lanes, same order");
        }
    }
}
