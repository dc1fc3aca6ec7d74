//! `silu(gate) ⊙ up`, the gated activation of Llama's feed-forward block,
//! and its two gradients for f32: one vectorized pass each way, split
//! across threads. peft-rs patch (see `vendor/README.md` in the peft-rs
//! workspace), called by `peft-models` on Flex and `Autodiff<Flex>`.
//! Upstream composes it as `gate · sigmoid(gate) · up` with a scalar
//! `expf` per element on one thread; under autodiff that is three ops
//! forward and, backward, the sigmoid recomputed plus five element-wise
//! passes.
//!
//! `σ(g) = 1 / (1 + e^(−g))` with the branch-free `exp` of `exp_fast`, so
//! the loops vectorize; compiled for AVX-512 and AVX2+FMA and picked at run
//! time. Saturates correctly: `e^(−g)` is `inf` for `g < −88.8` (σ = 0)
//! and tends to 0 for large `g` (σ = 1).

use alloc::vec;
use burn_backend::DType;
use burn_std::Bytes;

use crate::ops::exp_fast::exp_f32;
use crate::{FlexTensor, Layout};

/// Elements per parallel task.
#[cfg(feature = "rayon")]
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-g))
}

/// `y = g·σ(g)·u`.
#[inline(always)]
fn forward_one(g: f32, u: f32) -> f32 {
    g * sigmoid(g) * u
}

/// `(∂y/∂g, ∂y/∂u) · dy`: `u·σ(g)·(1 + g·(1 − σ(g)))` and `g·σ(g)`.
#[inline(always)]
fn backward_one(g: f32, u: f32, dy: f32) -> (f32, f32) {
    let s = sigmoid(g);
    let silu = g * s;
    (dy * u * s * (1.0 + g * (1.0 - s)), dy * silu)
}

fn forward_scalar(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = forward_one(g, u);
    }
}

fn backward_scalar(g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
    // `dg` holds `dy` on entry.
    for (((dg, du), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u) {
        (*dg, *du) = backward_one(g, u, *dg);
    }
}

macro_rules! kernels {
    ($fwd:ident, $bwd:ident, $feat:literal) => {
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        #[target_feature(enable = $feat)]
        unsafe fn $fwd(g: &[f32], u: &[f32], y: &mut [f32]) {
            forward_scalar(g, u, y)
        }
        #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
        #[target_feature(enable = $feat)]
        unsafe fn $bwd(g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
            backward_scalar(g, u, dg, du)
        }
    };
}

kernels!(forward_avx512, backward_avx512, "avx512f,avx512dq,fma");
kernels!(forward_avx2, backward_avx2, "avx2,fma");

fn forward_chunk(g: &[f32], u: &[f32], y: &mut [f32]) {
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        if crate::ops::exp_fast::has_avx512() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { forward_avx512(g, u, y) };
        }
        if crate::ops::exp_fast::has_avx2() {
            // SAFETY: as above.
            return unsafe { forward_avx2(g, u, y) };
        }
    }
    forward_scalar(g, u, y)
}

fn backward_chunk(g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
    #[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
    {
        if crate::ops::exp_fast::has_avx512() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { backward_avx512(g, u, dg, du) };
        }
        if crate::ops::exp_fast::has_avx2() {
            // SAFETY: as above.
            return unsafe { backward_avx2(g, u, dg, du) };
        }
    }
    backward_scalar(g, u, dg, du)
}

/// `t` as contiguous f32 of `shape`, or `None`.
fn operand(t: &FlexTensor, shape: &burn_std::Shape) -> Option<FlexTensor> {
    (t.dtype() == DType::F32 && t.layout().shape() == shape).then(|| t.to_contiguous())
}

fn tensor(v: alloc::vec::Vec<f32>, shape: &burn_std::Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(shape.clone()),
        DType::F32,
    )
}

/// `silu(gate) ⊙ up`. `None` unless both are f32 of one shape (no
/// broadcasting).
pub fn forward(gate: &FlexTensor, up: &FlexTensor) -> Option<FlexTensor> {
    let shape = gate.layout().shape().clone();
    let (gate, up) = (operand(gate, &shape)?, operand(up, &shape)?);
    let n = shape.num_elements();
    let (g, u) = (&gate.storage::<f32>()[..n], &up.storage::<f32>()[..n]);
    let mut y = vec![0.0f32; n];
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| forward_chunk(g, u, y));
    }
    #[cfg(not(feature = "rayon"))]
    forward_chunk(g, u, &mut y);
    Some(tensor(y, &shape))
}

/// The gradients of [`forward`] with respect to `gate` and `up`, given the
/// upstream gradient `grad` (the operands' shape). `None` under the same
/// conditions as [`forward`].
pub fn backward(
    gate: &FlexTensor,
    up: &FlexTensor,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor)> {
    let shape = gate.layout().shape().clone();
    let (gate, up) = (operand(gate, &shape)?, operand(up, &shape)?);
    let grad = operand(grad, &shape)?;
    let n = shape.num_elements();
    let (g, u) = (&gate.storage::<f32>()[..n], &up.storage::<f32>()[..n]);
    let mut dg = grad.storage::<f32>()[..n].to_vec();
    let mut du = vec![0.0f32; n];
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|((dg, du), (g, u))| backward_chunk(g, u, dg, du));
    }
    #[cfg(not(feature = "rayon"))]
    backward_chunk(g, u, &mut dg, &mut du);
    Some((tensor(dg, &shape), tensor(du, &shape)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_f64_formulas_and_saturates() {
        let gs: alloc::vec::Vec<f32> = (-4000..=4000).map(|i| i as f32 * 5e-3).collect();
        let us: alloc::vec::Vec<f32> = gs.iter().map(|g| 0.7 - g * 0.3).collect();
        let mut y = vec![0.0f32; gs.len()];
        forward_chunk(&gs, &us, &mut y);
        let (mut dg, mut du) = (vec![1.5f32; gs.len()], vec![0.0f32; gs.len()]);
        backward_chunk(&gs, &us, &mut dg, &mut du);
        for i in 0..gs.len() {
            let (g, u) = (gs[i] as f64, us[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            let want = [g * s * u, 1.5 * u * s * (1.0 + g * (1.0 - s)), 1.5 * g * s];
            for (got, want) in [y[i], dg[i], du[i]].into_iter().zip(want) {
                let err = (got as f64 - want).abs();
                assert!(err <= 1e-6 * (1.0 + want.abs()), "g {g}: {got} vs {want}");
            }
        }
        let mut y = [0.0f32; 3];
        forward_chunk(&[-200.0, 200.0, f32::NAN], &[1.0; 3], &mut y);
        assert!(y[0].abs() < 1e-30 && y[1] == 200.0, "{y:?}");
        assert!(y[2].is_nan());
    }
}
