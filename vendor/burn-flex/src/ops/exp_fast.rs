//! `exp` and the last-axis softmax for f32, vectorized and split across
//! threads. peft-rs patch (see `vendor/README.md` in the peft-rs workspace):
//! upstream evaluates `expf` one element at a time, on one thread for
//! `float_exp`, which made `exp` 7–8 % of a BERT training step (autodiff
//! decomposes softmax into max/sub/exp/sum/div).
//!
//! `exp` is a Cody–Waite reduction with a degree-7 polynomial (relative
//! error about 2 ulp), branch-free so that the loops vectorize; compiled for
//! AVX-512 and AVX2+FMA and picked at run time. Full range: overflow gives
//! `inf`, underflow gradual subnormals then 0, NaN stays NaN.

/// Elements per parallel task.
#[cfg(feature = "rayon")]
const CHUNK: usize = 1 << 15;

/// `e^y` for every f32 `y`, branch-free.
#[inline(always)]
pub(crate) fn exp_f32(y: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Beyond 88.8 the result is inf, below -104 it rounds to 0; the clamp
    // keeps `n` in [-150, 128] (NaN passes through `clamp`).
    let y = y.clamp(-104.0, 88.8);
    let n = (y * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, y));
    // e^r on |r| ≤ ln2/2: Taylor to degree 7 (truncation < 1e-8).
    let mut p: f32 = 1.0 / 5040.0;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    let n = if n.is_nan() { 0.0 } else { n };
    // SAFETY: `n` is finite and within [-150, 128].
    let n = unsafe { n.to_int_unchecked::<i32>() };
    // 2^n as two normal powers of two, so that n = 128 (overflow to inf)
    // and n < -126 (subnormal results) come out right.
    let half = n >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - half + 127) as u32) << 23);
    p * s1 * s2
}

/// `Σ f(x)` over a row in sixteen partial sums (one accumulator does not
/// vectorize). Also layer norm's reduction (`fused_layer_norm`).
#[inline(always)]
pub(crate) fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for &v in chunks.remainder() {
        sum += f(v);
    }
    sum
}

/// Maximum of a row in sixteen partial maxima, so that it vectorizes. A NaN
/// is skipped here and propagates through `exp` instead.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        max = if v > max { v } else { max };
    }
    max
}

/// Softmax of one row in place; returns its maximum and the inverse of
/// `Σ e^(x − max)`. (Not the log-sum-exp: `max + ln Σ` loses the sum where
/// masked scores of −1e30 make the maximum huge.)
#[inline(always)]
fn softmax_row_stats(row: &mut [f32]) -> [f32; 2] {
    let max = row_max(row);
    for x in row.iter_mut() {
        *x = exp_f32(*x - max);
    }
    let inv = 1.0 / lane_sum(row, |v| v);
    for x in row.iter_mut() {
        *x *= inv;
    }
    [max, inv]
}

/// The probabilities of a row of scores from [`softmax_row_stats`]' result.
#[inline(always)]
fn softmax_row_from_stats(row: &mut [f32], [max, inv]: [f32; 2]) {
    for x in row.iter_mut() {
        *x = exp_f32(*x - max) * inv;
    }
}

/// Softmax of `input` into `output`. (A row of -inf, everything masked,
/// gives NaN as upstream's does.)
#[inline(always)]
fn softmax_row(input: &[f32], output: &mut [f32]) {
    output.copy_from_slice(input);
    softmax_row_stats(output);
}

/// The row kernels with statistics, auto-vectorized for `$feat` (the
/// AVX-512 ones are written out in [`avx512`] instead).
macro_rules! row_kernels {
    ($stats_rows:ident, $from_stats_rows:ident, $feat:literal) => {
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        #[target_feature(enable = $feat)]
        unsafe fn $stats_rows(x: &mut [f32], row: usize, stats: &mut [[f32; 2]]) {
            for (r, st) in x.chunks_exact_mut(row).zip(stats) {
                *st = softmax_row_stats(r);
            }
        }
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        #[target_feature(enable = $feat)]
        unsafe fn $from_stats_rows(x: &mut [f32], row: usize, stats: &[[f32; 2]]) {
            for (r, &st) in x.chunks_exact_mut(row).zip(stats) {
                softmax_row_from_stats(r, st);
            }
        }
    };
}

macro_rules! kernels {
    ($exp_inplace:ident, $softmax_rows:ident, $feat:literal) => {
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        #[target_feature(enable = $feat)]
        unsafe fn $exp_inplace(v: &mut [f32]) {
            for x in v.iter_mut() {
                *x = exp_f32(*x);
            }
        }
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        #[target_feature(enable = $feat)]
        unsafe fn $softmax_rows(input: &[f32], output: &mut [f32], row: usize) {
            for (i, o) in input.chunks_exact(row).zip(output.chunks_exact_mut(row)) {
                softmax_row(i, o);
            }
        }
    };
}

kernels!(exp_avx512, softmax_avx512, "avx512f,avx512dq,fma");
kernels!(exp_avx2, softmax_avx2, "avx2,fma");
row_kernels!(stats_avx2, from_stats_avx2, "avx2,fma");

/// Attention's softmax rows with statistics, written out for AVX-512
/// (peft-rs patch). Attention rows are as long as the batch's longest
/// sentence (about 55 in the main job's batches), and the auto-vectorized
/// loops ran each row's last `len % 16` values four wide and one at a time:
/// those tails took half the kernel's time. Here a row is whole 16-lane
/// vectors, the last one masked.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
mod avx512 {
    use core::arch::x86_64::*;

    /// [`super::exp_f32`] on 16 lanes: the same reduction and polynomial;
    /// `2^n` by `vscalefps`, which overflows to `inf` and underflows
    /// gradually as the two-step scaling does.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    fn exp(y: __m512) -> __m512 {
        // `max`/`min` return their second operand when one is NaN: `y`
        // second lets NaN through, as `clamp` does.
        let y = _mm512_min_ps(_mm512_set1_ps(88.8), _mm512_max_ps(_mm512_set1_ps(-104.0), y));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(y, _mm512_set1_ps(core::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(
            n,
            _mm512_set1_ps(1.428_606_8e-6),
            _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), y),
        );
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// Lanes `0..len` of the row's last vector.
    fn tail_mask(row: usize) -> __mmask16 {
        ((1u32 << (row % 16)) - 1) as __mmask16
    }

    /// # Safety
    /// AVX-512F/DQ and FMA are available; `x.len() == row * stats.len()`.
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub(super) unsafe fn stats_rows(x: &mut [f32], row: usize, stats: &mut [[f32; 2]]) {
        let (full, mask) = (row / 16, tail_mask(row));
        for (r, st) in x.chunks_exact_mut(row).zip(stats) {
            let p = r.as_mut_ptr();
            // SAFETY (every access): vector `i < full` covers r[16i..16i+16]
            // and the masked tail r[16·full..row], all inside the row.
            unsafe {
                // A NaN lane is skipped here (the loaded value goes first)
                // and propagates through `exp` instead.
                let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
                for i in 0..full {
                    m = _mm512_max_ps(_mm512_loadu_ps(p.add(16 * i)), m);
                }
                let tail = _mm512_mask_loadu_ps(m, mask, p.add(16 * full));
                let max = _mm512_reduce_max_ps(_mm512_max_ps(tail, m));
                let mv = _mm512_set1_ps(max);
                let mut sum = _mm512_setzero_ps();
                for i in 0..full {
                    let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(16 * i)), mv));
                    _mm512_storeu_ps(p.add(16 * i), e);
                    sum = _mm512_add_ps(sum, e);
                }
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p.add(16 * full)), mv));
                _mm512_mask_storeu_ps(p.add(16 * full), mask, e);
                sum = _mm512_mask_add_ps(sum, mask, sum, e);
                let inv = 1.0 / _mm512_reduce_add_ps(sum);
                let iv = _mm512_set1_ps(inv);
                for i in 0..full {
                    let q = p.add(16 * i);
                    _mm512_storeu_ps(q, _mm512_mul_ps(_mm512_loadu_ps(q), iv));
                }
                let q = p.add(16 * full);
                _mm512_mask_storeu_ps(q, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, q), iv));
                *st = [max, inv];
            }
        }
    }

    /// # Safety
    /// As [`stats_rows`]. Gives bit for bit what `stats_rows` wrote: the
    /// same operations on the same values.
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub(super) unsafe fn from_stats_rows(x: &mut [f32], row: usize, stats: &[[f32; 2]]) {
        let (full, mask) = (row / 16, tail_mask(row));
        for (r, &[max, inv]) in x.chunks_exact_mut(row).zip(stats) {
            let p = r.as_mut_ptr();
            let (mv, iv) = (_mm512_set1_ps(max), _mm512_set1_ps(inv));
            // SAFETY: as in `stats_rows`.
            unsafe {
                for i in 0..full {
                    let q = p.add(16 * i);
                    let e = exp(_mm512_sub_ps(_mm512_loadu_ps(q), mv));
                    _mm512_storeu_ps(q, _mm512_mul_ps(e, iv));
                }
                let q = p.add(16 * full);
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, q), mv));
                _mm512_mask_storeu_ps(q, mask, _mm512_mul_ps(e, iv));
            }
        }
    }
}

#[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

fn exp_chunk(v: &mut [f32]) {
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        if has_avx512() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { exp_avx512(v) };
        }
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { exp_avx2(v) };
        }
    }
    for x in v.iter_mut() {
        *x = exp_f32(*x);
    }
}

fn softmax_chunk(input: &[f32], output: &mut [f32], row: usize) {
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        if has_avx512() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { softmax_avx512(input, output, row) };
        }
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { softmax_avx2(input, output, row) };
        }
    }
    for (i, o) in input.chunks_exact(row).zip(output.chunks_exact_mut(row)) {
        softmax_row(i, o);
    }
}

/// Softmax of each `row`-long row of `x` in place, on this thread, with
/// each row's `[max, 1 / Σ e^(x − max)]` in `stats`, from which
/// [`softmax_rows_from_stats_inplace`] gives the same probabilities again.
pub fn softmax_rows_stats_inplace(x: &mut [f32], row: usize, stats: &mut [[f32; 2]]) {
    assert!(row > 0 && x.len() == row * stats.len());
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the features were detected on this CPU; the lengths
            // were asserted above.
            return unsafe { avx512::stats_rows(x, row, stats) };
        }
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { stats_avx2(x, row, stats) };
        }
    }
    for (r, st) in x.chunks_exact_mut(row).zip(stats) {
        *st = softmax_row_stats(r);
    }
}

/// Scores to probabilities with the `stats` of
/// [`softmax_rows_stats_inplace`], in place, on this thread.
pub fn softmax_rows_from_stats_inplace(x: &mut [f32], row: usize, stats: &[[f32; 2]]) {
    assert!(row > 0 && x.len() == row * stats.len());
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the features were detected on this CPU; the lengths
            // were asserted above.
            return unsafe { avx512::from_stats_rows(x, row, stats) };
        }
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { from_stats_avx2(x, row, stats) };
        }
    }
    for (r, &st) in x.chunks_exact_mut(row).zip(stats) {
        softmax_row_from_stats(r, st);
    }
}

/// `e^x` of every value, in place.
pub fn exp_inplace(v: &mut [f32]) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        if v.len() > CHUNK {
            v.par_chunks_mut(CHUNK).for_each(exp_chunk);
            return;
        }
    }
    exp_chunk(v)
}

/// Softmax of each `row`-long row of `input` into `output`.
pub fn softmax_rows(input: &[f32], output: &mut [f32], row: usize) {
    assert_eq!(input.len(), output.len());
    assert!(row > 0 && input.len() % row == 0);
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        if input.len() > CHUNK {
            let rows_per_task = (CHUNK / row).max(1);
            output
                .par_chunks_mut(rows_per_task * row)
                .zip(input.par_chunks(rows_per_task * row))
                .for_each(|(o, i)| softmax_chunk(i, o, row));
            return;
        }
    }
    softmax_chunk(input, output, row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_whole_range() {
        let xs: alloc::vec::Vec<f32> = (-1_100_000..=1_000_000)
            .map(|i| i as f32 * 1e-4)
            .chain([88.7, 88.72, 88.8, 100.0, -103.0, -110.0, f32::INFINITY])
            .chain([f32::NEG_INFINITY])
            .collect();
        let mut fast = xs.clone();
        exp_inplace(&mut fast);
        for (&x, &got) in xs.iter().zip(&fast) {
            let want = libm::exp(x as f64);
            if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            } else if want < f32::MIN_POSITIVE as f64 {
                assert!(
                    (got as f64 - want).abs() <= 2e-45,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                let rel = ((got as f64 - want) / want).abs();
                assert!(rel < 4e-7, "exp({x}) = {got}, want {want}: rel {rel}");
            }
        }
        let mut nan = [f32::NAN];
        exp_inplace(&mut nan);
        assert!(nan[0].is_nan());
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_f64() {
        let row = 37;
        let input: alloc::vec::Vec<f32> = (0..row * 5000)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.03 - 15.0)
            .collect();
        let mut out = alloc::vec![0.0f32; input.len()];
        softmax_rows(&input, &mut out, row);
        for (i, o) in input.chunks(row).zip(out.chunks(row)) {
            let max = i.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let sum: f64 = i.iter().map(|&x| (x as f64 - max).exp()).sum();
            for (&x, &y) in i.iter().zip(o) {
                let want = (x as f64 - max).exp() / sum;
                assert!((y as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-9);
            }
        }
    }
}
