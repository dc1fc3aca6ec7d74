//! Layer normalisation and RMS normalisation for f32 with their gradients:
//! the forward pass keeps each row's mean (0 for RMS) and inverse standard
//! deviation (inverse root mean square), and the backward pass gives the
//! input's, the scale's and the bias's gradients in one sweep.
//! peft-rs patch (see `vendor/README.md` in the peft-rs workspace), called
//! by `peft-models` for `Autodiff<Flex>`; Burn's autodiff otherwise
//! differentiates layer norm as nine tensor ops (mean, subtract, square,
//! mean, add, sqrt, divide, scale, shift), each a pass over the activation
//! forward and again backward.

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::DType;
use burn_std::{Bytes, Shape};

use crate::ops::exp_fast::lane_sum;
use crate::{FlexTensor, Layout};

/// Rows per parallel task.
const ROWS: usize = 64;

#[inline(always)]
fn row_stats(x: &[f32], eps: f32, centred: bool) -> [f32; 2] {
    // Two passes (mean, then the centred second moment) as the composed
    // ops compute it; RMS norm (not `centred`) takes the mean as 0.
    let n = x.len() as f32;
    let mean = if centred { lane_sum(x, |v| v) / n } else { 0.0 };
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    [mean, 1.0 / (var + eps).sqrt()]
}

#[inline(always)]
fn forward_rows(
    x: &[f32],
    y: &mut [f32],
    stats: &mut [[f32; 2]],
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f32,
    centred: bool,
) {
    let d = gamma.len();
    for ((xr, yr), st) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats) {
        let [mean, rstd] = row_stats(xr, eps, centred);
        *st = [mean, rstd];
        match beta {
            Some(beta) => {
                for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                    *o = (v - mean) * rstd * g + b;
                }
            }
            None => {
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(gamma) {
                    *o = (v - mean) * rstd * g;
                }
            }
        }
    }
}

/// `dx` for rows of `x`, adding `dy ⊙ x̂` and `dy` to `dgamma` / `dbeta`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rows(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    stats: &[[f32; 2]],
    gamma: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    centred: bool,
) {
    let d = gamma.len();
    let n = d as f32;
    let rows = x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d));
    for (((xr, gr), dxr), &[mean, rstd]) in rows.zip(stats) {
        // dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)), g = dy ⊙ γ; RMS
        // norm has no mean(g) term (its mean is not subtracted).
        let (mut acc_g, mut acc_gx) = ([0.0f32; 16], [0.0f32; 16]);
        let lanes = xr
            .chunks_exact(16)
            .zip(gr.chunks_exact(16))
            .zip(gamma.chunks_exact(16));
        for ((xc, gc), gmc) in lanes {
            for i in 0..16 {
                let g = gc[i] * gmc[i];
                acc_g[i] += g;
                acc_gx[i] += g * (xc[i] - mean) * rstd;
            }
        }
        let (mut sum_g, mut sum_gx): (f32, f32) = (acc_g.iter().sum(), acc_gx.iter().sum());
        for i in d - d % 16..d {
            let g = gr[i] * gamma[i];
            sum_g += g;
            sum_gx += g * (xr[i] - mean) * rstd;
        }
        let mean_g = if centred { sum_g / n } else { 0.0 };
        let mean_gx = sum_gx / n;
        let out = dxr.iter_mut().zip(xr).zip(gr).zip(gamma);
        for ((((o, &v), &dyv), &gm), (dg, db)) in out.zip(dgamma.iter_mut().zip(dbeta.iter_mut())) {
            let xhat = (v - mean) * rstd;
            *o = rstd * (dyv * gm - mean_g - xhat * mean_gx);
            *dg += dyv * xhat;
            *db += dyv;
        }
    }
}

macro_rules! kernels {
    ($fwd:ident, $bwd:ident, $feat:literal) => {
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        #[target_feature(enable = $feat)]
        unsafe fn $fwd(
            x: &[f32],
            y: &mut [f32],
            stats: &mut [[f32; 2]],
            gamma: &[f32],
            beta: Option<&[f32]>,
            eps: f32,
            centred: bool,
        ) {
            forward_rows(x, y, stats, gamma, beta, eps, centred)
        }
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $bwd(
            x: &[f32],
            dy: &[f32],
            dx: &mut [f32],
            stats: &[[f32; 2]],
            gamma: &[f32],
            dgamma: &mut [f32],
            dbeta: &mut [f32],
            centred: bool,
        ) {
            backward_rows(x, dy, dx, stats, gamma, dgamma, dbeta, centred)
        }
    };
}

kernels!(forward_avx512, backward_avx512, "avx512f,avx512dq,fma");
kernels!(forward_avx2, backward_avx2, "avx2,fma");

#[derive(Clone, Copy, PartialEq)]
#[cfg_attr(
    not(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64"))),
    allow(dead_code)
)]
enum Isa {
    Avx512,
    Avx2,
    Baseline,
}

fn isa() -> Isa {
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        use crate::ops::exp_fast::{has_avx2, has_avx512};
        if has_avx512() {
            return Isa::Avx512;
        }
        if has_avx2() {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

/// The f32 rows of `t` with `d` columns, contiguous, or `None`.
fn rows_of(t: &FlexTensor, d: usize) -> Option<FlexTensor> {
    let l = t.layout();
    let ok = t.dtype() == DType::F32 && l.num_dims() >= 1 && l.shape()[l.num_dims() - 1] == d;
    ok.then(|| t.to_contiguous())
}

fn vector(t: &FlexTensor) -> Option<FlexTensor> {
    let l = t.layout();
    (t.dtype() == DType::F32 && l.num_dims() == 1).then(|| t.to_contiguous())
}

/// `(x − mean) / √(var + eps) · gamma + beta` over `x`'s last dim, and each
/// row's `[mean, 1/√(var + eps)]` (`[rows, 2]`) for [`backward`]. `None`
/// unless every operand is f32 and `gamma`/`beta` are vectors of `x`'s last
/// dim.
pub fn forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: Option<&FlexTensor>,
    eps: f32,
) -> Option<(FlexTensor, FlexTensor)> {
    normalise(x, gamma, beta, eps, true)
}

/// `x / √(mean(x²) + eps) · gamma` over `x`'s last dim (RMS norm), and each
/// row's `[0, 1/√(mean(x²) + eps)]` (`[rows, 2]`) for [`backward_rms`].
/// `None` unless both operands are f32 and `gamma` is a vector of `x`'s
/// last dim.
pub fn forward_rms(
    x: &FlexTensor,
    gamma: &FlexTensor,
    eps: f32,
) -> Option<(FlexTensor, FlexTensor)> {
    normalise(x, gamma, None, eps, false)
}

fn normalise(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: Option<&FlexTensor>,
    eps: f32,
    centred: bool,
) -> Option<(FlexTensor, FlexTensor)> {
    let gamma = vector(gamma)?;
    let d = gamma.layout().num_elements();
    let beta = match beta {
        Some(b) => Some(vector(b).filter(|b| b.layout().num_elements() == d)?),
        None => None,
    };
    let x = rows_of(x, d)?;
    let n = x.layout().num_elements();
    if d == 0 || n == 0 {
        return None;
    }
    let rows = n / d;
    let xs: &[f32] = &x.storage::<f32>()[..n];
    let g: &[f32] = &gamma.storage::<f32>()[..d];
    let b: Option<&[f32]> = beta.as_ref().map(|b| &b.storage::<f32>()[..d]);
    // Every row of `y` is written by the kernel below.
    let mut y = crate::ops::uninit::<f32>(n);
    let mut stats = vec![[0.0f32; 2]; rows];
    let isa = isa();
    let run = |x: &[f32], y: &mut [f32], st: &mut [[f32; 2]]| match isa {
        // SAFETY (both): the features were detected on this CPU.
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        Isa::Avx512 => unsafe { forward_avx512(x, y, st, g, b, eps, centred) },
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        Isa::Avx2 => unsafe { forward_avx2(x, y, st, g, b, eps, centred) },
        _ => forward_rows(x, y, st, g, b, eps, centred),
    };
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        y.par_chunks_mut(ROWS * d)
            .zip(xs.par_chunks(ROWS * d))
            .zip(stats.par_chunks_mut(ROWS))
            .for_each(|((y, x), st)| run(x, y, st));
    }
    #[cfg(not(feature = "rayon"))]
    run(xs, &mut y, &mut stats);
    let y = FlexTensor::new(
        Bytes::from_elems(y),
        Layout::contiguous(x.layout().shape().clone()),
        DType::F32,
    );
    let stats = FlexTensor::new(
        Bytes::from_elems(stats.concat()),
        Layout::contiguous(Shape::from(vec![rows, 2])),
        DType::F32,
    );
    Some((y, stats))
}

/// Gradients of [`forward`] with respect to `x`, `gamma` and `beta`, given
/// the upstream gradient `grad` (the output's shape) and forward's `stats`.
/// `None` under the same conditions as [`forward`].
pub fn backward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    stats: &FlexTensor,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    gradients(x, gamma, stats, grad, true)
}

/// Gradients of [`forward_rms`] with respect to `x` and `gamma`, given the
/// upstream gradient `grad` and forward's `stats`. `None` under the same
/// conditions as [`forward_rms`].
pub fn backward_rms(
    x: &FlexTensor,
    gamma: &FlexTensor,
    stats: &FlexTensor,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor)> {
    gradients(x, gamma, stats, grad, false).map(|(dx, dgamma, _)| (dx, dgamma))
}

fn gradients(
    x: &FlexTensor,
    gamma: &FlexTensor,
    stats: &FlexTensor,
    grad: &FlexTensor,
    centred: bool,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let gamma = vector(gamma)?;
    let d = gamma.layout().num_elements();
    let x = rows_of(x, d)?;
    let grad = rows_of(grad, d)?;
    let n = x.layout().num_elements();
    if d == 0 || n == 0 || grad.layout().shape() != x.layout().shape() {
        return None;
    }
    let rows = n / d;
    let stats = stats.to_contiguous();
    let st: &[[f32; 2]] = bytemuck::cast_slice(&stats.storage::<f32>()[..rows * 2]);
    let xs: &[f32] = &x.storage::<f32>()[..n];
    let dy: &[f32] = &grad.storage::<f32>()[..n];
    let g: &[f32] = &gamma.storage::<f32>()[..d];
    // Every row of `dx` is written by the kernel below.
    let mut dx = crate::ops::uninit::<f32>(n);
    let isa = isa();
    let run = |x: &[f32], dy: &[f32], dx: &mut [f32], st: &[[f32; 2]]| {
        let (mut dg, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
        match isa {
            // SAFETY (both): the features were detected on this CPU.
            #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
            Isa::Avx512 => unsafe { backward_avx512(x, dy, dx, st, g, &mut dg, &mut db, centred) },
            #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
            Isa::Avx2 => unsafe { backward_avx2(x, dy, dx, st, g, &mut dg, &mut db, centred) },
            _ => backward_rows(x, dy, dx, st, g, &mut dg, &mut db, centred),
        }
        (dg, db)
    };
    let add = |(mut a, mut b): (Vec<f32>, Vec<f32>), (c, e): (Vec<f32>, Vec<f32>)| {
        a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
        b.iter_mut().zip(&e).for_each(|(b, e)| *b += e);
        (a, b)
    };
    #[cfg(feature = "rayon")]
    let (dgamma, dbeta) = {
        use rayon::prelude::*;
        dx.par_chunks_mut(ROWS * d)
            .zip(xs.par_chunks(ROWS * d))
            .zip(dy.par_chunks(ROWS * d))
            .zip(st.par_chunks(ROWS))
            .map(|(((dx, x), dy), st)| run(x, dy, dx, st))
            .reduce(|| (vec![0.0f32; d], vec![0.0f32; d]), add)
    };
    #[cfg(not(feature = "rayon"))]
    let (dgamma, dbeta) = add((vec![0.0f32; d], vec![0.0f32; d]), run(xs, dy, &mut dx, st));
    let vec_of = |v: Vec<f32>| {
        FlexTensor::new(
            Bytes::from_elems(v),
            Layout::contiguous(Shape::from(vec![d])),
            DType::F32,
        )
    };
    let dx = FlexTensor::new(
        Bytes::from_elems(dx),
        Layout::contiguous(x.layout().shape().clone()),
        DType::F32,
    );
    Some((dx, vec_of(dgamma), vec_of(dbeta)))
}
