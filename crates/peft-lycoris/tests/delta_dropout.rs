//! The LyCORIS methods' two training-only dropouts, as PEFT applies them:
//! `rank_dropout` zeroes output columns of `ΔW` and rescales the kept ones
//! by one over the kept fraction (LoHa always, LoKr with
//! `rank_dropout_scale`); `module_dropout` skips a layer's whole delta.
//! Neither acts outside training. PyTorch's random draws cannot be reproduced, so these
//! check the structure of what the draws do.

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use peft_core::io::HostTensor;
use peft_core::slot_method::Init;
use peft_core::{autodiff_backend_tests, LinearSlot, SlotMethod};
use peft_lycoris::lokr::LokrInitWeights;
use peft_lycoris::{Loha, LohaConfig, Lokr, LokrConfig};

const D_IN: usize = 12;
const D_OUT: usize = 16;
const ROWS: usize = 5;

/// The two methods under test, as configs with the dropouts given.
#[derive(Debug, Clone)]
enum Method {
    Loha(LohaConfig),
    Lokr(LokrConfig),
}

impl Method {
    fn loha(rank_dropout: f64, module_dropout: f64) -> Self {
        Method::Loha(LohaConfig {
            rank_dropout,
            module_dropout,
            init_weights: false,
            ..LohaConfig::new(3, 6.0, &["layer"])
        })
    }

    /// `r` 1 with `decompose_both`: both Kronecker factors are pairs.
    fn lokr(rank_dropout: f64, module_dropout: f64, rank_dropout_scale: bool) -> Self {
        Method::Lokr(LokrConfig {
            rank_dropout,
            module_dropout,
            rank_dropout_scale,
            decompose_both: true,
            init_weights: LokrInitWeights::Bool(false),
            ..LokrConfig::new(1, 6.0, &["layer"])
        })
    }
}

/// A slot with one random entry of `method`, active.
fn slot_with<B: Backend>(method: &Method, device: &B::Device) -> LinearSlot<B> {
    // Concrete tensors, not `LinearSlotConfig::init`'s lazily drawn ones,
    // which a clone would draw again.
    let normal = Distribution::Normal(0.0, 0.3);
    let mut slot = LinearSlot::from_weights(
        Tensor::random([D_IN, D_OUT], normal, device),
        Some(Tensor::random([D_OUT], normal, device)),
    );
    match method {
        Method::Loha(c) => Loha::attach(c, &mut slot, "layer", "default", Init::Fresh),
        Method::Lokr(c) => Lokr::attach(c, &mut slot, "layer", "default", Init::Fresh),
    }
    .unwrap();
    slot.set_active(&["default".to_string()]);
    slot
}

fn host<B: Backend>(t: Tensor<B, 2>) -> HostTensor {
    HostTensor::from_tensor(t)
}

/// `(training delta, inference delta)` of the entry on `x`, `[ROWS, D_OUT]` each.
fn deltas<B: AutodiffBackend>(slot: &LinearSlot<B>, x: Tensor<B, 2>) -> (HostTensor, HostTensor) {
    let base = {
        let mut off = slot.clone();
        off.state.disabled = true;
        host(off.forward(x.clone()))
    };
    let minus = |y: HostTensor| HostTensor {
        data: y.data.iter().zip(&base.data).map(|(a, b)| a - b).collect(),
        shape: y.shape,
    };
    let train = minus(host(slot.forward(x.clone())));
    let eval = slot.valid();
    let eval = minus(HostTensor::from_tensor(eval.forward(x.inner())));
    (train, eval)
}

fn rank_dropout_zeroes_columns_and_rescales_the_rest<B: AutodiffBackend>(device: &B::Device) {
    for (method, rescales) in [
        (Method::loha(0.5, 0.0), true),
        (Method::lokr(0.5, 0.0, true), true),
        (Method::lokr(0.5, 0.0, false), false),
    ] {
        B::seed(device, 7);
        check_rank_dropout::<B>(&method, rescales, device);
    }
}

/// Kept columns of the training delta are the inference ones times one
/// common factor: `1/mean(kept)` when the method `rescales`, else one.
fn check_rank_dropout<B: AutodiffBackend>(method: &Method, rescales: bool, device: &B::Device) {
    let slot = slot_with::<B>(method, device);
    let x = Tensor::<B, 2>::random([ROWS, D_IN], Distribution::Normal(0.0, 1.0), device);
    let (train, eval) = deltas(&slot, x);
    assert!(
        train.data.iter().chain(&eval.data).all(|v| v.is_finite()),
        "non-finite delta"
    );
    let column = |t: &HostTensor, j: usize| -> Vec<f32> {
        (0..ROWS).map(|i| t.data[i * D_OUT + j]).collect()
    };
    let scale_of_eval = eval.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        scale_of_eval > 1e-3,
        "the random adapter does nothing ({scale_of_eval:e})"
    );
    let tol = 1e-4 * scale_of_eval;
    let (mut kept, mut ratios) = (0usize, Vec::new());
    for j in 0..D_OUT {
        let (t, e) = (column(&train, j), column(&eval, j));
        if t.iter().all(|v| v.abs() <= tol) {
            continue;
        }
        kept += 1;
        // The column is the inference one times one common factor.
        let k = t.iter().zip(&e).map(|(a, b)| a * b).sum::<f32>()
            / e.iter().map(|b| b * b).sum::<f32>();
        for (a, b) in t.iter().zip(&e) {
            assert!(
                (a - k * b).abs() <= tol * k.abs().max(1.0),
                "{method:?} column {j}: not a multiple of the inference column"
            );
        }
        ratios.push(k);
    }
    assert!(
        kept > 0 && kept < D_OUT,
        "{method:?}: rank dropout 0.5 kept {kept} of {D_OUT} columns"
    );
    let want = if rescales {
        D_OUT as f32 / kept as f32
    } else {
        1.0
    };
    for k in ratios {
        assert!(
            (k - want).abs() <= 1e-3 * want,
            "{method:?}: kept columns scaled by {k}, PEFT by {want}"
        );
    }
}

fn module_dropout_skips_the_delta_in_training_only<B: AutodiffBackend>(device: &B::Device) {
    for (skipping, plain) in [
        (Method::loha(0.0, 0.999_999), Method::loha(0.0, 0.0)),
        (
            Method::lokr(0.0, 0.999_999, false),
            Method::lokr(0.0, 0.0, false),
        ),
    ] {
        B::seed(device, 11);
        check_module_dropout::<B>(&skipping, &plain, device);
    }
}

/// `skipping` drops its delta in training only; `plain`, the same method
/// without module dropout, applies it in training as in inference.
fn check_module_dropout<B: AutodiffBackend>(skipping: &Method, plain: &Method, device: &B::Device) {
    let slot = slot_with::<B>(skipping, device);
    let x = Tensor::<B, 2>::random([ROWS, D_IN], Distribution::Normal(0.0, 1.0), device);
    let (train, eval) = deltas(&slot, x.clone());
    assert!(
        train.data.iter().all(|v| *v == 0.0),
        "{skipping:?}: training kept a skipped delta"
    );
    assert!(
        eval.data.iter().any(|v| v.abs() > 1e-4),
        "{skipping:?}: inference skipped the delta"
    );
    // Without module dropout, training applies the same delta as inference.
    let plain = slot_with::<B>(plain, device);
    let (train, eval) = deltas(&plain, x);
    let gap = train
        .data
        .iter()
        .zip(&eval.data)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        gap <= 1e-5,
        "training and inference differ by {gap:e} without dropout"
    );
}

autodiff_backend_tests!(
    rank_dropout_zeroes_columns_and_rescales_the_rest,
    module_dropout_skips_the_delta_in_training_only
);
