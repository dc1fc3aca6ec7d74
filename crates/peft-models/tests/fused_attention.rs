//! The fused attention kernel (Flex, `vendor/burn-flex`) against attention
//! composed from tensor ops: outputs and the gradients of q, k and v, on
//! the shapes the models produce — BERT's padding mask, a decoder's causal
//! plus padding mask, grouped-query heads, one decoding step over a cache,
//! more query rows than the kernel's block, heads split from a `[b, t, h·d]`
//! projection (strided), no mask; and right-padded batches computed over
//! their real rows and keys only (`attend_real`).

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use peft_core::compare::{check_close_slices, Tolerance};
use peft_models::attention::{
    attend, attend_composite, attend_fused, attend_real, causal_mask, padding_mask, split_heads,
};

/// The fused kernel sums in another order than the composed ops: f32
/// rounding, relative to each tensor's scale.
const TOL: Tolerance = Tolerance::new(2e-5, 1e-7);

/// Between backends: the composed ops alone differ by 2.8e-5 of dq's scale
/// between Flex and NdArray on the two-block case.
const ACROSS_BACKENDS: Tolerance = Tolerance::new(1e-4, 1e-7);

struct Case {
    name: &'static str,
    b: usize,
    h: usize,
    kv_h: usize,
    t: usize,
    past: usize,
    d: usize,
    mask: MaskKind,
}

#[derive(Clone, Copy)]
enum MaskKind {
    None,
    Padding,
    CausalPadding,
}

const CASES: [Case; 5] = [
    Case {
        name: "bert padding",
        b: 3,
        h: 4,
        kv_h: 4,
        t: 20,
        past: 0,
        d: 8,
        mask: MaskKind::Padding,
    },
    Case {
        name: "two query blocks",
        b: 2,
        h: 2,
        kv_h: 2,
        t: 70,
        past: 0,
        d: 16,
        mask: MaskKind::CausalPadding,
    },
    Case {
        name: "grouped-query heads",
        b: 2,
        h: 6,
        kv_h: 2,
        t: 9,
        past: 0,
        d: 8,
        mask: MaskKind::CausalPadding,
    },
    Case {
        name: "one step over a cache",
        b: 2,
        h: 3,
        kv_h: 1,
        t: 1,
        past: 11,
        d: 8,
        mask: MaskKind::CausalPadding,
    },
    Case {
        name: "no mask",
        b: 1,
        h: 2,
        kv_h: 2,
        t: 5,
        past: 0,
        d: 4,
        mask: MaskKind::None,
    },
];

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 4001) as f32 / 2000.0 - 1.0)
        .collect()
}

fn tensor<B: Backend, const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data, shape), &Default::default())
}

/// q (split from a `[b, t, h·d]` projection, so strided), k, v and the mask
/// of a case on backend `B`.
#[allow(clippy::type_complexity)]
fn operands<B: Backend>(
    c: &Case,
) -> (
    Tensor<B, 4>,
    Tensor<B, 4>,
    Tensor<B, 4>,
    Option<Tensor<B, 4>>,
) {
    let s = c.past + c.t;
    let q = split_heads(
        tensor::<B, 3>(values(c.b * c.t * c.h * c.d, 1), [c.b, c.t, c.h * c.d]),
        c.h,
    );
    let k = tensor::<B, 4>(values(c.b * c.kv_h * s * c.d, 2), [c.b, c.kv_h, s, c.d]);
    let v = tensor::<B, 4>(values(c.b * c.kv_h * s * c.d, 3), [c.b, c.kv_h, s, c.d]);
    // The last row pads its first two positions.
    let mut am = vec![1.0f32; c.b * s];
    am[(c.b - 1) * s] = 0.0;
    am[(c.b - 1) * s + 1] = 0.0;
    let padding = padding_mask(tensor::<B, 2>(am, [c.b, s]));
    let mask = match c.mask {
        MaskKind::None => None,
        MaskKind::Padding => Some(padding),
        MaskKind::CausalPadding => {
            Some(causal_mask::<B>(c.t, c.past, &Default::default()) + padding)
        }
    };
    (q, k, v, mask)
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

#[test]
fn the_fused_kernel_equals_composed_attention() {
    for c in &CASES {
        let (q, k, v, mask) = operands::<Flex>(c);
        let fused = attend_fused(&q, &k, &v, mask.as_ref())
            .unwrap_or_else(|| panic!("{}: Flex must take the fused kernel", c.name));
        let composed = attend_composite(q, k, v, mask);
        assert_eq!(fused.dims(), composed.dims(), "{}", c.name);
        check_close_slices(c.name, &host(fused), &host(composed), TOL).unwrap();
    }
}

/// Gradients of `Σ w ⊙ attention(q, k, v)` with respect to q, k and v.
fn gradients<B: AutodiffBackend>(c: &Case, fused: bool) -> [Vec<f32>; 4] {
    let (q, k, v, mask) = operands::<B>(c);
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = if fused {
        attend_fused(&q, &k, &v, mask.as_ref())
            .unwrap_or_else(|| panic!("{}: Autodiff<Flex> must take the fused kernel", c.name))
    } else {
        attend_composite(q.clone(), k.clone(), v.clone(), mask)
    };
    let [b, t, hd] = out.dims();
    let w = tensor::<B, 3>(values(b * t * hd, 4), [b, t, hd]);
    let grads = (out.clone() * w).sum().backward();
    let g = |x: &Tensor<B, 4>| host(x.grad(&grads).expect("a gradient"));
    [host(out), g(&q), g(&k), g(&v)]
}

#[test]
fn the_fused_kernel_has_the_gradients_of_composed_attention() {
    for c in &CASES {
        let fused = gradients::<Autodiff<Flex>>(c, true);
        let composed = gradients::<Autodiff<Flex>>(c, false);
        for (what, (f, r)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(&composed))
        {
            check_close_slices(&format!("{}: {what}", c.name), f, r, TOL).unwrap();
        }
    }
}

#[test]
fn attend_takes_the_kernel_on_flex_only_and_agrees_across_backends() {
    let c = &CASES[1];
    let (q, k, v, mask) = operands::<NdArray>(c);
    assert!(attend_fused(&q, &k, &v, mask.as_ref()).is_none());
    let on_ndarray = host(attend(q, k, v, mask));
    let (q, k, v, mask) = operands::<Flex>(c);
    let on_flex = host(attend(q, k, v, mask));
    check_close_slices("flex vs ndarray", &on_flex, &on_ndarray, ACROSS_BACKENDS).unwrap();
    let ndarray_grads = gradients::<Autodiff<NdArray>>(c, false);
    let flex_grads = gradients::<Autodiff<Flex>>(c, true);
    for (what, (f, r)) in ["out", "dq", "dk", "dv"]
        .iter()
        .zip(flex_grads.iter().zip(&ndarray_grads))
    {
        check_close_slices(what, f, r, ACROSS_BACKENDS).unwrap();
    }
}

#[test]
fn a_mask_that_needs_a_gradient_keeps_the_composed_path() {
    let c = &CASES[0];
    let (q, k, v, mask) = operands::<Autodiff<Flex>>(c);
    let mask = mask.unwrap().require_grad();
    assert!(attend_fused(&q, &k, &v, Some(&mask)).is_none());
    let grads = attend(q, k, v, Some(mask.clone())).sum().backward();
    assert!(mask.grad(&grads).is_some(), "the mask's gradient");
}

/// A right-padded batch: 3 rows of 70 query positions (two of the kernel's
/// blocks) with 70, 66 and 0 real tokens, after `past` cached keys that
/// every row sees. Returns the operands, the mask and the real lengths.
#[allow(clippy::type_complexity)]
fn right_padded<B: Backend>(
    past: usize,
) -> (
    Tensor<B, 4>,
    Tensor<B, 4>,
    Tensor<B, 4>,
    Tensor<B, 4>,
    Vec<usize>,
) {
    let (b, h, t, d) = (3, 2, 70, 8);
    let real = vec![70, 66, 0];
    let s = past + t;
    let q = split_heads(tensor::<B, 3>(values(b * t * h * d, 5), [b, t, h * d]), h);
    let k = tensor::<B, 4>(values(b * h * s * d, 6), [b, h, s, d]);
    let v = tensor::<B, 4>(values(b * h * s * d, 7), [b, h, s, d]);
    let am: Vec<f32> = (0..b * s)
        .map(|p| f32::from(u8::from(p % s < past + real[p / s])))
        .collect();
    (q, k, v, padding_mask(tensor::<B, 2>(am, [b, s])), real)
}

/// Splits `[b, t, hd]` values into each batch row's real and padded rows.
fn real_and_padded(x: &[f32], t: usize, real: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let hd = x.len() / (real.len() * t);
    let (mut kept, mut padded) = (Vec::new(), Vec::new());
    for (i, &n) in real.iter().enumerate() {
        let row = &x[i * t * hd..(i + 1) * t * hd];
        kept.extend_from_slice(&row[..n * hd]);
        padded.extend_from_slice(&row[n * hd..]);
    }
    (kept, padded)
}

#[test]
fn attention_over_real_rows_equals_the_padded_computation_there() {
    // Buffers the kernel must overwrite whole start as NaN.
    burn_flex::ops::poison_uninit(true);
    for past in [0, 3] {
        let (q, k, v, mask, real) = right_padded::<Flex>(past);
        let t = q.dims()[2];
        let skipped = host(attend_real(
            q.clone(),
            k.clone(),
            v.clone(),
            Some(mask.clone()),
            &real,
        ));
        let whole = host(attend_composite(q, k, v, Some(mask)));
        let (kept, padded) = real_and_padded(&skipped, t, &real);
        let (want, whole_padded) = real_and_padded(&whole, t, &real);
        let name = format!("{past} cached keys");
        check_close_slices(&name, &kept, &want, TOL).unwrap();
        // The padded rows were not computed: zeros where the padded
        // computation has values.
        assert!(padded.iter().all(|&x| x == 0.0), "{name}: padded rows");
        assert!(
            whole_padded.iter().any(|&x| x != 0.0),
            "{name}: a real check"
        );
    }
}

#[test]
fn attention_over_real_rows_has_the_padded_computation_s_gradients() {
    type A = Autodiff<Flex>;
    burn_flex::ops::poison_uninit(true);
    for past in [0, 3] {
        let grads_of = |skip: bool| {
            let (q, k, v, mask, real) = right_padded::<A>(past);
            let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
            let out = if skip {
                attend_real(q.clone(), k.clone(), v.clone(), Some(mask), &real)
            } else {
                attend_composite(q.clone(), k.clone(), v.clone(), Some(mask))
            };
            // Padded rows' outputs are dropped (zero weight), as packing does.
            let [b, t, hd] = out.dims();
            let mut w = values(b * t * hd, 8);
            for (i, &n) in real.iter().enumerate() {
                w[(i * t + n) * hd..(i + 1) * t * hd].fill(0.0);
            }
            let grads = (out * tensor::<A, 3>(w, [b, t, hd])).sum().backward();
            let g = |x: &Tensor<A, 4>| host(x.grad(&grads).expect("a gradient"));
            [g(&q), g(&k), g(&v)]
        };
        let (skipped, whole) = (grads_of(true), grads_of(false));
        for (what, (f, r)) in ["dq", "dk", "dv"].iter().zip(skipped.iter().zip(&whole)) {
            check_close_slices(&format!("{past} cached keys: {what}"), f, r, TOL).unwrap();
        }
    }
}

#[test]
fn real_lengths_that_do_not_fit_fall_back_to_the_whole_computation() {
    let (q, k, v, mask, _) = right_padded::<Flex>(0);
    let whole = host(attend(q.clone(), k.clone(), v.clone(), Some(mask.clone())));
    for real in [vec![70, 66], vec![70, 71, 0]] {
        let out = attend_real(q.clone(), k.clone(), v.clone(), Some(mask.clone()), &real);
        assert_eq!(host(out), whole, "lengths {real:?}");
    }
}
