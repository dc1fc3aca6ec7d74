//! `silu(gate) ⊙ up` on Flex (one fused kernel each way, `vendor/burn-flex`)
//! against the f64 formulas and against Burn's composed ops (NdArray): the
//! output without autodiff, and under autodiff the output and the
//! gradients of both operands, with either operand frozen.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use peft_core::compare::{check_close_slices, Tolerance};
use peft_models::activation::{swiglu, swiglu_composite, swiglu_fused};

/// f32 against the f64 formulas, relative to each tensor's scale.
const TOL: Tolerance = Tolerance::new(1e-5, 1e-7);

/// Deterministic values in `[-2, 2) · scale`.
fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 4001) as f32 / 1000.0 - 2.0) * scale)
        .collect()
}

/// `y`, `dgate`, `dup` of `Σ w ⊙ swiglu(gate, up)` in f64.
fn reference(n: usize) -> [Vec<f32>; 3] {
    let (g, u, w) = (values(n, 1, 5.0), values(n, 2, 1.0), values(n, 3, 1.0));
    let mut out = [vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]];
    for i in 0..n {
        let (g, u, w) = (g[i] as f64, u[i] as f64, w[i] as f64);
        let s = 1.0 / (1.0 + (-g).exp());
        out[0][i] = (g * s * u) as f32;
        out[1][i] = (w * u * s * (1.0 + g * (1.0 - s))) as f32;
        out[2][i] = (w * g * s) as f32;
    }
    out
}

fn tensor<B: Backend>(v: Vec<f32>, shape: [usize; 3]) -> Tensor<B, 3> {
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

/// Output and the gradients of (gate, up) on `B`; `None` for a frozen operand.
fn run<B: AutodiffBackend>(
    shape: [usize; 3],
    fused: bool,
    trained: [bool; 2],
) -> [Option<Vec<f32>>; 3] {
    let n = shape.iter().product();
    let track = |t: Tensor<B, 3>, on: bool| if on { t.require_grad() } else { t };
    let gate = track(tensor(values(n, 1, 5.0), shape), trained[0]);
    let up = track(tensor(values(n, 2, 1.0), shape), trained[1]);
    let y = if fused {
        swiglu_fused(&gate, &up).expect("Autodiff<Flex> takes the fused kernel")
    } else {
        assert!(swiglu_fused(&gate, &up).is_none(), "only Flex is fused");
        swiglu(gate.clone(), up.clone())
    };
    let grads = (y.clone() * tensor(values(n, 3, 1.0), shape))
        .sum()
        .backward();
    let host = |t: &Tensor<B, 3>| {
        t.grad(&grads)
            .map(|g| g.into_data().to_vec::<f32>().unwrap())
    };
    [
        Some(y.into_data().to_vec::<f32>().unwrap()),
        host(&gate),
        host(&up),
    ]
}

#[test]
fn the_fused_swiglu_has_the_exact_outputs_and_gradients() {
    // 37 (not a multiple of the 16 lanes), and 4 × 64 × 384 (several
    // parallel tasks of 2¹⁴ elements, with a ragged last one).
    for shape in [[3, 70, 37], [4, 64, 385]] {
        let n: usize = shape.iter().product();
        let want = reference(n);
        for trained in [[true, true], [true, false], [false, true]] {
            let fused = run::<Autodiff<Flex>>(shape, true, trained);
            let composed = run::<Autodiff<NdArray>>(shape, false, trained);
            for (i, what) in ["y", "dgate", "dup"].iter().enumerate() {
                let what = format!("{shape:?}, trained {trained:?}: {what}");
                let due = i == 0 || trained[i - 1];
                match (&fused[i], &composed[i]) {
                    (Some(f), Some(c)) if due => {
                        check_close_slices(&what, f, &want[i], TOL).unwrap();
                        check_close_slices(&format!("{what} (composed)"), c, &want[i], TOL)
                            .unwrap();
                    }
                    (None, None) if !due => {}
                    _ => panic!("{what}: a gradient where none is due, or none where one is"),
                }
            }
        }
        // Without autodiff: Flex's fused forward pass, NdArray's composed one.
        let flex = swiglu_fused::<Flex, 3>(
            &tensor(values(n, 1, 5.0), shape),
            &tensor(values(n, 2, 1.0), shape),
        )
        .expect("Flex takes the fused kernel");
        let composed = swiglu_composite::<NdArray, 3>(
            tensor(values(n, 1, 5.0), shape),
            tensor(values(n, 2, 1.0), shape),
        );
        for (what, t) in [
            ("Flex", flex.into_data().to_vec::<f32>().unwrap()),
            ("NdArray", composed.into_data().to_vec::<f32>().unwrap()),
        ] {
            check_close_slices(&format!("{shape:?} {what} y"), &t, &want[0], TOL).unwrap();
        }
    }
}

#[test]
fn operands_of_different_shapes_keep_the_composed_path() {
    let gate = tensor::<Flex>(values(6, 1, 1.0), [1, 2, 3]);
    let up = Tensor::<Flex, 3>::from_data(
        TensorData::new(values(3, 2, 1.0), [1, 1, 3]),
        &Default::default(),
    );
    assert!(swiglu_fused(&gate, &up).is_none());
    let want = swiglu_composite(gate.clone(), up.clone()).into_data();
    swiglu(gate, up).into_data().assert_eq(&want, true);
}
