//! Layer norm under autodiff on Flex (one fused kernel each way,
//! `vendor/burn-flex`) against the composed ops Burn's autodiff uses
//! elsewhere (NdArray): the output and the gradients of the input, the
//! scale and the shift, for a trained norm and a frozen one; the same for
//! RMS norm (Llama's), on Flex with and without autodiff.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::Param;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use peft_core::compare::{check_close_slices, Tolerance};
use peft_models::norm::{LayerNorm, RmsNorm};

/// f32 against the f64 formulas, relative to each tensor's scale.
const TOL: Tolerance = Tolerance::new(1e-5, 1e-7);

/// Burn's composed ops against the same formulas: their `dx` is 1.4e-5 of
/// its scale away on MiniLM's width.
const LOOSE: Tolerance = Tolerance::new(1e-4, 1e-7);

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 4001) as f32 / 1000.0 - 2.0)
        .collect()
}

/// Output and gradients (x, gamma, beta) of `Σ w ⊙ norm(x)` on `B`, for
/// `x: [3, 70, d]` (rows in more than one parallel task) with an offset
/// mean; `None` gradients for a frozen norm.
fn run<B: AutodiffBackend>(d: usize, trained: bool, fused: bool) -> Vec<Option<Vec<f32>>> {
    let device = Default::default();
    let rows = 3 * 70;
    let x: Vec<f32> = values(rows * d, 1).iter().map(|v| v * 3.0 + 5.0).collect();
    let x = Tensor::<B, 3>::from_data(TensorData::new(x, [3, 70, d]), &device).require_grad();
    let param = |v: Vec<f32>| {
        Param::from_tensor(Tensor::<B, 1>::from_data(TensorData::new(v, [d]), &device))
            .set_require_grad(trained)
    };
    let mut norm = LayerNorm::<B>::new(d, 1e-12, &device);
    norm.slot.weight = param(values(d, 2));
    norm.slot.bias = Some(param(values(d, 3)));
    let y = if fused {
        norm.forward_fused(&x)
            .expect("Autodiff<Flex> takes the fused kernel")
    } else {
        assert!(
            norm.forward_fused(&x).is_none(),
            "only Autodiff<Flex> is fused"
        );
        norm.forward(x.clone())
    };
    let beta = norm.slot.bias.as_ref().unwrap().val();
    outputs(y, &x, &[norm.slot.weight.val(), beta])
}

/// `y` and the gradients of `Σ w ⊙ y` (`w` fixed values) for `x` and
/// `params` (`None` where one is frozen), as host vectors.
fn outputs<B: AutodiffBackend>(
    y: Tensor<B, 3>,
    x: &Tensor<B, 3>,
    params: &[Tensor<B, 1>],
) -> Vec<Option<Vec<f32>>> {
    let dims = y.dims();
    let n = dims.iter().product();
    let w = Tensor::<B, 3>::from_data(TensorData::new(values(n, 4), dims), &y.device());
    let grads = (y.clone() * w).sum().backward();
    let host =
        |t: Option<Tensor<B::InnerBackend, 1>>| t.map(|t| t.into_data().to_vec::<f32>().unwrap());
    let mut out = vec![
        Some(y.into_data().to_vec::<f32>().unwrap()),
        host(x.grad(&grads).map(|g| g.flatten(0, 2))),
    ];
    out.extend(params.iter().map(|p| host(p.grad(&grads))));
    out
}

/// The same in f64 from the formulas: `y`, `dx`, `dgamma`, `dbeta`.
fn reference(d: usize) -> [Vec<f32>; 4] {
    let rows = 3 * 70;
    let x: Vec<f64> = values(rows * d, 1)
        .iter()
        .map(|&v| (v * 3.0 + 5.0) as f64)
        .collect();
    let (gamma, beta, w) = (values(d, 2), values(d, 3), values(rows * d, 4));
    let (mut y, mut dx) = (vec![0.0f64; rows * d], vec![0.0f64; rows * d]);
    let (mut dgamma, mut dbeta) = (vec![0.0f64; d], vec![0.0f64; d]);
    for r in 0..rows {
        let xr = &x[r * d..][..d];
        let mean = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + 1e-12).sqrt();
        let xhat: Vec<f64> = xr.iter().map(|v| (v - mean) * rstd).collect();
        let g: Vec<f64> = (0..d)
            .map(|i| w[r * d + i] as f64 * gamma[i] as f64)
            .collect();
        let mean_g = g.iter().sum::<f64>() / d as f64;
        let mean_gx = g.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>() / d as f64;
        for i in 0..d {
            y[r * d + i] = xhat[i] * gamma[i] as f64 + beta[i] as f64;
            dx[r * d + i] = rstd * (g[i] - mean_g - xhat[i] * mean_gx);
            dgamma[i] += w[r * d + i] as f64 * xhat[i];
            dbeta[i] += w[r * d + i] as f64;
        }
    }
    [y, dx, dgamma, dbeta].map(|v| v.into_iter().map(|x| x as f32).collect())
}

#[test]
fn the_fused_layer_norm_has_the_exact_outputs_and_gradients() {
    // 384 (MiniLM), 37 (not a multiple of the 16 lanes).
    for d in [384, 37] {
        let want = reference(d);
        for trained in [true, false] {
            let fused = run::<Autodiff<Flex>>(d, trained, true);
            let composed = run::<Autodiff<NdArray>>(d, trained, false);
            let names = ["y", "dx", "dgamma", "dbeta"];
            let label = format!("d {d}, trained {trained}");
            check_all(&label, &names, &fused, &composed, &want, |i| {
                trained || i < 2
            });
        }
    }
}

/// Each of `names` (outputs of [`outputs`]): the fused result within
/// [`TOL`] of the f64 reference and Burn's composed one within [`LOOSE`]
/// where `due(i)`; both `None` (a frozen parameter) where not.
fn check_all(
    label: &str,
    names: &[&str],
    fused: &[Option<Vec<f32>>],
    composed: &[Option<Vec<f32>>],
    want: &[Vec<f32>],
    due: impl Fn(usize) -> bool,
) {
    for (i, name) in names.iter().enumerate() {
        let what = format!("{label}: {name}");
        match (&fused[i], &composed[i]) {
            (Some(f), Some(c)) if due(i) => {
                check_close_slices(&what, f, &want[i], TOL).unwrap();
                // The reference itself, against Burn's composed ops.
                check_close_slices(&format!("{what} (composed)"), c, &want[i], LOOSE).unwrap();
            }
            (None, None) if !due(i) => {}
            _ => panic!("{what}: a gradient where none is due, or none where one is"),
        }
    }
}

/// Output and gradients (x, gamma) of `Σ w ⊙ rms_norm(x)` on `B` for
/// `x: [3, 70, d]`; `None` for a frozen scale.
fn run_rms<B: AutodiffBackend>(d: usize, trained: bool, fused: bool) -> Vec<Option<Vec<f32>>> {
    let device = Default::default();
    let rows = 3 * 70;
    let x: Vec<f32> = values(rows * d, 1).iter().map(|v| v * 3.0 + 1.0).collect();
    let x = Tensor::<B, 3>::from_data(TensorData::new(x, [3, 70, d]), &device).require_grad();
    let mut norm = RmsNorm::<B>::new(d, 1e-5, &device);
    norm.slot.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(values(d, 2), [d]),
        &device,
    ))
    .set_require_grad(trained);
    let y = if fused {
        norm.forward_fused(&x)
            .expect("Autodiff<Flex> takes the fused kernel")
    } else {
        assert!(norm.forward_fused(&x).is_none(), "only Flex is fused");
        norm.forward(x.clone())
    };
    outputs(y, &x, &[norm.slot.weight.val()])
}

/// `y`, `dx`, `dgamma` of [`run_rms`] in f64 from the formulas.
fn reference_rms(d: usize) -> [Vec<f32>; 3] {
    let rows = 3 * 70;
    let x: Vec<f64> = values(rows * d, 1)
        .iter()
        .map(|&v| (v * 3.0 + 1.0) as f64)
        .collect();
    let (gamma, w) = (values(d, 2), values(rows * d, 4));
    let (mut y, mut dx, mut dgamma) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; d]);
    for r in 0..rows {
        let xr = &x[r * d..][..d];
        let rstd = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-5).sqrt();
        let g: Vec<f64> = (0..d)
            .map(|i| w[r * d + i] as f64 * gamma[i] as f64)
            .collect();
        let mean_gx = (0..d).map(|i| g[i] * xr[i] * rstd).sum::<f64>() / d as f64;
        for i in 0..d {
            let xhat = xr[i] * rstd;
            y[r * d + i] = xhat * gamma[i] as f64;
            dx[r * d + i] = rstd * (g[i] - xhat * mean_gx);
            dgamma[i] += w[r * d + i] as f64 * xhat;
        }
    }
    [y, dx, dgamma].map(|v: Vec<f64>| v.into_iter().map(|x| x as f32).collect())
}

#[test]
fn the_fused_rms_norm_has_the_exact_outputs_and_gradients() {
    // 576 (SmolLM2), 37 (not a multiple of the 16 lanes).
    for d in [576, 37] {
        let want = reference_rms(d);
        for trained in [true, false] {
            let fused = run_rms::<Autodiff<Flex>>(d, trained, true);
            let composed = run_rms::<Autodiff<NdArray>>(d, trained, false);
            let label = format!("RMS d {d}, trained {trained}");
            let names = ["y", "dx", "dgamma"];
            check_all(&label, &names, &fused, &composed, &want, |i| {
                trained || i < 2
            });
        }
        // Without autodiff, Flex's fused forward pass.
        let device = Default::default();
        let norm = RmsNorm::<Flex>::from_params(
            Tensor::from_data(TensorData::new(values(d, 2), [d]), &device),
            1e-5,
        );
        let x: Vec<f32> = values(3 * 70 * d, 1)
            .iter()
            .map(|v| v * 3.0 + 1.0)
            .collect();
        let x = Tensor::<Flex, 3>::from_data(TensorData::new(x, [3, 70, d]), &device);
        let y = norm.forward_fused(&x).expect("Flex takes the fused kernel");
        let y = y.into_data().to_vec::<f32>().unwrap();
        check_close_slices(&format!("RMS d {d}: Flex y"), &y, &want[0], TOL).unwrap();
    }
}
