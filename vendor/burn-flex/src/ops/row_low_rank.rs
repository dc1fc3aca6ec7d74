//! Mixed-batch low-rank deltas (one adapter per row), peft-rs patch (see
//! `vendor/README.md` in the peft-rs workspace).
//!
//! `out[i, :] = y[i, :] + s_j · (x[i, :] · A_j) · B_j` with `j` the adapter
//! of row `i`: each row reads only its own adapter's factors, where and in
//! place. Composed from tensor ops this needs the batch's factors
//! concatenated (a copy of every used adapter per layer and step) and a
//! product with all of them masked to each row's own (`k` adapters: `k`
//! times the work), or a gather into per-row batched products (one tiny
//! product per row). A SmolLM2-135M decode step of 16 rows over 16 r-8
//! LoRA adapters (all linear layers, two Xeon cores) spent 106 of 229 ms
//! in that composition; this kernel is the BGMV/SGMV kernel of Punica and
//! S-LoRA for the CPU.

use alloc::vec::Vec;

use burn_backend::DType;

use crate::FlexTensor;

/// Row-work (rows · rank · (d_in + d_out)) from which rows are spread over
/// rayon's threads: one decode row (rank 8, ≈ 17 K) stays on one; from
/// four rows, reading the rows' factors (each row its own adapter's) on
/// both cores beats the hand-over.
#[cfg(feature = "rayon")]
const PARALLEL_WORK: usize = 1 << 16;

/// One adapter's factors: `a` `[d_in, r]`, `b` `[r, d_out]`, and the
/// scale `s` of its delta.
pub struct RowFactors<'a> {
    pub a: &'a FlexTensor,
    pub b: &'a FlexTensor,
    pub scale: f32,
}

/// `y + deltas`, `x`: `[n, d_in]`, `y`: `[n, d_out]`, `n = groups · t`:
/// rows `g·t .. (g+1)·t` take `factors[index[g] - 1]`, none where
/// `index[g]` is 0. `None` (nothing computed) when a tensor is not f32 or
/// 2-D, a shape does not fit, or an index is out of range.
pub fn add_row_low_rank(
    y: &FlexTensor,
    x: &FlexTensor,
    factors: &[RowFactors<'_>],
    index: &[usize],
) -> Option<FlexTensor> {
    let f32_2d = |t: &FlexTensor| t.dtype() == DType::F32 && t.layout().shape().num_dims() == 2;
    if !f32_2d(y) || !f32_2d(x) {
        return None;
    }
    let (ys, xs) = (y.layout().shape(), x.layout().shape());
    let (n, d_out, d_in) = (ys[0], ys[1], xs[1]);
    let groups = index.len();
    if xs[0] != n || groups == 0 || n % groups != 0 {
        return None;
    }
    // Row-major copies only where a view is not already one.
    let mut pairs = Vec::with_capacity(factors.len());
    for f in factors {
        if !f32_2d(f.a) || !f32_2d(f.b) {
            return None;
        }
        let (sa, sb) = (f.a.layout().shape(), f.b.layout().shape());
        if sa[0] != d_in || sb[1] != d_out || sa[1] != sb[0] {
            return None;
        }
        pairs.push((f.a.to_contiguous(), f.b.to_contiguous(), f.scale, sa[1]));
    }
    if index.iter().any(|&j| j > pairs.len()) {
        return None;
    }
    let x = x.to_contiguous();
    let x: &[f32] = x.as_slice()?;
    let mut out = y.to_contiguous();
    let out_rows: &mut [f32] = out.storage_mut();
    let t = n / groups;
    let rank_max = pairs.iter().map(|p| p.3).max().unwrap_or(0);
    let slices: Vec<(&[f32], &[f32], f32, usize)> = pairs
        .iter()
        .map(|(a, b, s, r)| Some((a.as_slice()?, b.as_slice()?, *s, *r)))
        .collect::<Option<_>>()?;
    let row = |(i, out_row): (usize, &mut [f32])| {
        let j = index[i / t];
        if j == 0 {
            return;
        }
        let (a, b, scale, r) = slices[j - 1];
        let x_row = &x[i * d_in..(i + 1) * d_in];
        delta_row(x_row, a, b, scale, r, out_row, &mut alloc::vec![0.0; r]);
    };
    #[cfg(feature = "rayon")]
    if n * rank_max * (d_in + d_out) >= PARALLEL_WORK {
        use rayon::prelude::*;
        out_rows.par_chunks_exact_mut(d_out).enumerate().for_each(row);
        return Some(out);
    }
    let _ = rank_max;
    out_rows.chunks_exact_mut(d_out).enumerate().for_each(row);
    Some(out)
}

/// `out += s · (x · a) · b` for one row, through the widest vectors the CPU
/// has (the loops are plain; each wrapper compiles them for its features).
fn delta_row(x: &[f32], a: &[f32], b: &[f32], s: f32, r: usize, out: &mut [f32], h: &mut [f32]) {
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        if crate::ops::exp_fast::has_avx512() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { delta_row_avx512(x, a, b, s, r, out, h) };
        }
        if crate::ops::exp_fast::has_avx2() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { delta_row_avx2(x, a, b, s, r, out, h) };
        }
    }
    delta_row_plain(x, a, b, s, r, out, h)
}

/// Output columns per register block of the second product.
const OUT_BLOCK: usize = 16;

#[inline(always)]
fn delta_row_plain(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    r: usize,
    out: &mut [f32],
    h: &mut [f32],
) {
    // h = s · x · a, a's rows `r` long: one short axpy per input value.
    h.fill(0.0);
    for (xv, a_row) in x.iter().zip(a.chunks_exact(r)) {
        for (h, av) in h.iter_mut().zip(a_row) {
            *h += xv * av;
        }
    }
    h.iter_mut().for_each(|v| *v *= s);
    // out += h · b, a block of output columns at a time, summed over b's
    // rows in registers: each output value is read and written once.
    let d_out = out.len();
    for (block, o) in out.chunks_mut(OUT_BLOCK).enumerate() {
        let start = block * OUT_BLOCK;
        let mut acc = [0.0f32; OUT_BLOCK];
        if o.len() == OUT_BLOCK {
            for (c, hv) in h.iter().enumerate() {
                let b_row: &[f32; OUT_BLOCK] = b[c * d_out + start..][..OUT_BLOCK]
                    .try_into()
                    .expect("a whole block");
                for (acc, bv) in acc.iter_mut().zip(b_row) {
                    *acc += hv * bv;
                }
            }
        } else {
            for (c, hv) in h.iter().enumerate() {
                let b_row = &b[c * d_out + start..][..o.len()];
                for (acc, bv) in acc.iter_mut().zip(b_row) {
                    *acc += hv * bv;
                }
            }
        }
        for (o, acc) in o.iter_mut().zip(acc) {
            *o += acc;
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx512f,avx512dq,fma")]
fn delta_row_avx512(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    r: usize,
    out: &mut [f32],
    h: &mut [f32],
) {
    delta_row_plain(x, a, b, s, r, out, h)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn delta_row_avx2(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    r: usize,
    out: &mut [f32],
    h: &mut [f32],
) {
    delta_row_plain(x, a, b, s, r, out, h)
}
