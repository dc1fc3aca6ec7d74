//! The patched kernels of the vendored Flex backend (`vendor/README.md`)
//! against references: GELU and its derivative against the f64 formula,
//! row broadcasts against NdArray (which computes them element by element).

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use peft_core::compare::{check_close_slices, Tolerance};

fn values(t: Tensor<Flex, 1>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn gelu_f64(x: f64) -> (f64, f64) {
    let erf = erf_f64(x / std::f64::consts::SQRT_2);
    let value = 0.5 * x * (1.0 + erf);
    let slope = 0.5 * (1.0 + erf) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (value, slope)
}

/// erf in f64 to ~1e-15: the Maclaurin series for |x| < 3, the continued
/// fraction of erfc beyond.
fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        // erf(a) = 2/√π Σ (-1)^n a^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        for n in 1..200 {
            term *= -a * a / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = e^{-a²}/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

#[test]
fn flex_gelu_and_its_gradient_match_the_exact_formula() {
    let device = Default::default();
    let xs: Vec<f32> = (-60_000..=60_000).map(|i| i as f32 * 2e-4).collect();
    let n = xs.len();
    let x = Tensor::<Flex, 1>::from_data(TensorData::new(xs.clone(), [n]), &device);
    let (want, slope): (Vec<f32>, Vec<f32>) = xs
        .iter()
        .map(|&x| {
            let (v, s) = gelu_f64(x as f64);
            (v as f32, s as f32)
        })
        .unzip();
    let tol = Tolerance::new(0.0, 2e-6);
    check_close_slices("gelu", &values(gelu(x.clone())), &want, tol).unwrap();
    // Not unique (the input is still held): the result must not overwrite it.
    let held = x.clone();
    let _ = gelu(x.clone());
    check_close_slices("input kept", &values(held), &xs, Tolerance::new(0.0, 0.0)).unwrap();

    let xa = Tensor::<Autodiff<Flex>, 1>::from_data(TensorData::new(xs.clone(), [n]), &device)
        .require_grad();
    let grads = gelu(xa.clone()).sum().backward();
    let g = xa
        .grad(&grads)
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    check_close_slices("gelu'", &g, &slope, tol).unwrap();

    let special = Tensor::<Flex, 1>::from_floats([-200.0, 200.0, f32::NAN], &device);
    let out = values(gelu(special));
    assert_eq!(&out[..2], &[0.0, 200.0]);
    assert!(out[2].is_nan(), "NaN must stay NaN: {out:?}");
}

/// `lhs [b, h, t, s]` with `rhs [b, 1, 1, s]` added, subtracted,
/// multiplied and divided on backend `B`.
fn row_ops<B: Backend>(lhs: &[f32], rhs: &[f32], [b, h, t, s]: [usize; 4]) -> [Vec<f32>; 4] {
    let d = Default::default();
    let l = Tensor::<B, 4>::from_data(TensorData::new(lhs.to_vec(), [b, h, t, s]), &d);
    let r =
        Tensor::<B, 2>::from_data(TensorData::new(rhs.to_vec(), [b, s]), &d).reshape([b, 1, 1, s]);
    [
        l.clone() + r.clone(),
        l.clone() - r.clone(),
        l.clone() * r.clone(),
        l / r,
    ]
    .map(|t| t.into_data().to_vec::<f32>().unwrap())
}

#[test]
fn flex_row_broadcasts_equal_ndarray() {
    let (b, h, t, s) = (3, 4, 5, 16);
    let lhs: Vec<f32> = (0..b * h * t * s)
        .map(|i| (i % 97) as f32 * 0.25 - 3.0)
        .collect();
    let rhs: Vec<f32> = (0..b * s).map(|i| (i % 13) as f32 * 0.5 + 0.5).collect();
    let shape = [b, h, t, s];
    let (f, n) = (
        row_ops::<Flex>(&lhs, &rhs, shape),
        row_ops::<NdArray>(&lhs, &rhs, shape),
    );
    for (op, (f, n)) in ["add", "sub", "mul", "div"].iter().zip(f.iter().zip(&n)) {
        check_close_slices(op, f, n, Tolerance::new(0.0, 0.0)).unwrap();
    }
    // A right operand whose outer dims are permuted: rows stay contiguous,
    // the outer strides are out of order.
    let d = Default::default();
    let l = Tensor::<Flex, 3>::from_data(TensorData::new(lhs.clone(), [b * h, t, s]), &d);
    let r = Tensor::<Flex, 3>::from_data(TensorData::new(lhs.clone(), [t, b * h, s]), &d)
        .swap_dims(0, 1);
    let dn = Default::default();
    let l_nd = Tensor::<NdArray, 3>::from_data(TensorData::new(lhs.clone(), [b * h, t, s]), &dn);
    let r_nd =
        Tensor::<NdArray, 3>::from_data(TensorData::new(lhs, [t, b * h, s]), &dn).swap_dims(0, 1);
    check_close_slices(
        "permuted rows",
        &(l + r).into_data().to_vec::<f32>().unwrap(),
        &(l_nd + r_nd).into_data().to_vec::<f32>().unwrap(),
        Tolerance::new(0.0, 0.0),
    )
    .unwrap();
}
