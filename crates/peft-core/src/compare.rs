//! How two tensors are compared in every test and parity check of the
//! workspace: one place, so that no check can pass on NaN, Inf or a shape
//! mismatch.
//!
//! `f32::max` returns its non-NaN operand, so a difference folded with it
//! hides NaN; [`max_abs_diff`] instead returns NaN as soon as either side
//! holds a non-finite value, and `NaN <= tol` is false. Tolerances are
//! relative to the values compared ([`Tolerance`]): an absolute 1e-5 on
//! gradients of size 1e-6 passes all-zero gradients.

use crate::io::HostTensor;

/// Max |aᵢ − bᵢ|; NaN when the lengths differ or any value on either side
/// is NaN or ±Inf (so every `d <= tol` comparison on it fails).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::NAN;
    }
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f32::NAN;
        }
        worst = worst.max((x - y).abs());
    }
    worst
}

/// Max |x| over finite values (the scale a relative tolerance refers to).
pub fn max_abs(v: &[f32]) -> f32 {
    v.iter()
        .filter(|x| x.is_finite())
        .fold(0.0f32, |m, x| m.max(x.abs()))
}

/// An allowed difference: `abs + rel · max|expected|`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Share of the expected tensor's largest magnitude.
    pub rel: f32,
    /// Floor, for tensors that are (near) zero.
    pub abs: f32,
}

impl Tolerance {
    /// `abs + rel · max|expected|`.
    pub const fn new(rel: f32, abs: f32) -> Self {
        Self { rel, abs }
    }

    /// The bound for `expected`.
    pub fn bound(&self, expected: &[f32]) -> f32 {
        self.abs + self.rel * max_abs(expected)
    }
}

/// Gradients against PyTorch's: relative to each tensor's own scale, with
/// no absolute floor (the tiny fixtures' gradients go down to ~1e-7, where
/// any floor large enough to matter would pass all-zero gradients). Burn
/// and PyTorch sum in different orders and NdArray's erf (GELU) differs
/// from PyTorch's in the last bits: on the fixtures that leaves up to
/// ~4e-4 of a tensor's scale (BERT LoRA on NdArray), 1e-5 typically.
pub const GRADIENTS: Tolerance = Tolerance::new(1e-3, 0.0);

/// `Ok(max |diff|)` when `actual` has `expected`'s shape, every value on
/// both sides is finite, and the largest difference is within `tol` of
/// `expected`'s scale; otherwise a message naming `what` and the reason.
pub fn check_close(
    what: &str,
    actual: &HostTensor,
    expected: &HostTensor,
    tol: Tolerance,
) -> Result<f32, String> {
    if actual.shape != expected.shape {
        return Err(format!(
            "{what}: shape {:?}, expected {:?}",
            actual.shape, expected.shape
        ));
    }
    check_close_slices(what, &actual.data, &expected.data, tol)
}

/// [`check_close`] on flat values.
pub fn check_close_slices(
    what: &str,
    actual: &[f32],
    expected: &[f32],
    tol: Tolerance,
) -> Result<f32, String> {
    if actual.len() != expected.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            actual.len(),
            expected.len()
        ));
    }
    if let Some(i) = actual.iter().position(|x| !x.is_finite()) {
        return Err(format!("{what}: non-finite value {} at {i}", actual[i]));
    }
    if let Some(i) = expected.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "{what}: the reference holds a non-finite value {} at {i}",
            expected[i]
        ));
    }
    let d = max_abs_diff(actual, expected);
    let bound = tol.bound(expected);
    if d <= bound {
        Ok(d)
    } else {
        Err(format!(
            "{what}: max |diff| {d:e} > {bound:e} (= {:e} + {:e} · max|expected| {:e})",
            tol.abs,
            tol.rel,
            max_abs(expected)
        ))
    }
}

/// Panics with [`check_close`]'s message unless `actual` is close to
/// `expected`.
#[track_caller]
pub fn assert_close(what: &str, actual: &HostTensor, expected: &HostTensor, tol: Tolerance) {
    if let Err(m) = check_close(what, actual, expected, tol) {
        panic!("{m}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: Vec<f32>) -> HostTensor {
        HostTensor {
            shape: vec![data.len()],
            data,
        }
    }

    #[test]
    fn nan_inf_and_shapes_fail_and_close_values_pass() {
        let tol = Tolerance::new(1e-4, 1e-7);
        let want = t(vec![1.0, -2.0, 3.0]);
        assert!(check_close("ok", &t(vec![1.0, -2.0, 3.0002]), &want, tol).is_ok());
        assert!(check_close("far", &t(vec![1.0, -2.0, 3.01]), &want, tol).is_err());
        assert!(check_close("nan", &t(vec![f32::NAN; 3]), &want, tol).is_err());
        assert!(check_close("inf", &t(vec![1.0, f32::INFINITY, 3.0]), &want, tol).is_err());
        assert!(check_close("ref nan", &want, &t(vec![1.0, f32::NAN, 3.0]), tol).is_err());
        assert!(check_close("short", &t(vec![1.0, -2.0]), &want, tol).is_err());
        let reshaped = HostTensor {
            shape: vec![3, 1],
            data: want.data.clone(),
        };
        assert!(check_close("shape", &reshaped, &want, tol).is_err());
        assert!(max_abs_diff(&[f32::NAN], &[0.0]).is_nan());
        assert!(max_abs_diff(&[0.0], &[0.0, 1.0]).is_nan());
    }

    #[test]
    fn the_tolerance_scales_with_the_expected_values() {
        // Gradients of size 1e-6: all zeros must not pass.
        let tol = Tolerance::new(1e-4, 1e-9);
        let grads = t(vec![2.5e-6, -1.0e-6, 0.5e-6]);
        assert!(check_close("zeros", &t(vec![0.0; 3]), &grads, tol).is_err());
        assert!(check_close("same", &grads, &grads, tol).is_ok());
    }
}
