//! Kernels of the vendored Flex CPU backend (`vendor/burn-flex`, peft-rs
//! patches) behind generic tensor functions: where the backend is Flex,
//! with or without autodiff, a function runs the kernel; on every other
//! backend it composes Burn's tensor ops, with the same result up to f32
//! rounding. This module holds the linear layer's (`x·W + b`); the models'
//! attention, norms and gated activation are in `peft-models`' `fused`,
//! which shares the type tests below.
//!
//! Why a run-time type test instead of a backend trait: the models are
//! generic over Burn's `Backend` alone, and a trait of our own would put a
//! second bound on every model, adapter and job in the workspace. The test
//! is on `TypeId`, so it costs nothing per call, and a backend it does not
//! know keeps the composed path: the kernels can only add speed, never
//! change which backends work.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_flex::ops::matmul_bias::matmul_bias;
use burn_flex::ops::row_low_rank::{self, RowFactors};
use burn_flex::FlexTensor;

/// Flex under autodiff (Burn's default checkpointing: none).
pub type FlexAutodiff = Autodiff<Flex>;

/// The float tensor of [`FlexAutodiff`]: a Flex tensor and its graph node.
pub type FlexAutodiffTensor = FloatTensor<FlexAutodiff>;

/// `x` as the type `U` it is at run time. Callers compare `TypeId`s first.
pub fn same<T: 'static, U: 'static>(x: T) -> U {
    *(Box::new(x) as Box<dyn Any>)
        .downcast::<U>()
        .expect("the caller compared the TypeIds")
}

/// The float primitive of `t`, whose backend `B` is `C` at run time.
pub fn primitive<C: Backend, B: Backend, const D: usize>(t: &Tensor<B, D>) -> FloatTensor<C> {
    same::<_, Tensor<C, D>>(t.clone()).into_primitive().tensor()
}

/// A float primitive of `C` as a tensor of `B`, which is `C` at run time.
pub fn wrap<C: Backend, B: Backend, const D: usize>(out: FloatTensor<C>) -> Tensor<B, D> {
    same(Tensor::<C, D>::from_primitive(TensorPrimitive::Float(out)))
}

/// A linear layer's `x·w + b` (`x: [n, d_in]`, `w: [d_in, d_out]`, `b:
/// [d_out]`): [`linear_fused`] where it applies, else the product and a
/// broadcast add.
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    b: Option<&Tensor<B, 1>>,
) -> Tensor<B, 2> {
    match b {
        None => x.matmul(w.clone()),
        Some(b) => linear_fused(&x, w, b)
            .unwrap_or_else(|| x.matmul(w.clone()) + b.clone().unsqueeze_dim(0)),
    }
}

/// `x·w + b` by one kernel (`burn_flex::ops::matmul_bias`): the bias is
/// written into the output and gemm adds the product onto it, one pass over
/// the output fewer than the product and a broadcast add. `Some` on Flex
/// and `Autodiff<Flex>` (gradients for whichever of `x`, `w`, `b` are
/// tracked) when the operands are f32 and every side exceeds 16; `None`
/// otherwise: LoRA-rank and single-row products have kernels of their own
/// in Flex's matmul.
pub fn linear_fused<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    b: &Tensor<B, 1>,
) -> Option<Tensor<B, 2>> {
    let backend = TypeId::of::<B>();
    if backend == TypeId::of::<Flex>() {
        let [x, w] = [x, w].map(primitive::<Flex, B, 2>);
        matmul_bias(&x, &w, &primitive::<Flex, B, 1>(b)).map(wrap::<Flex, B, 2>)
    } else if backend == TypeId::of::<FlexAutodiff>() {
        let [x, w] = [x, w].map(primitive::<FlexAutodiff, B, 2>);
        tracked_linear(x, w, primitive::<FlexAutodiff, B, 1>(b)).map(wrap::<FlexAutodiff, B, 2>)
    } else {
        None
    }
}

/// One adapter's factors in a mixed batch: `a` `[d_in, r]`, `b`
/// `[r, d_out]` and the scale `s` of its delta `s·(x·a)·b`.
pub type RowPair<'a, B> = (&'a Tensor<B, 2>, &'a Tensor<B, 2>, f32);

/// `y + s_j·(x_i·a_j)·b_j` for every row `i` of `x` `[n, d_in]` / `y`
/// `[n, d_out]` (`n` = `index.len()` groups of equal length), `j` =
/// `index[group] - 1`, nothing where the index is 0: each row reads its own
/// adapter's factors (`burn_flex::ops::row_low_rank`) instead of all of the
/// batch's, concatenated and masked. `Some` on Flex alone (mixed batches are
/// inference; under autodiff the slot composes tensor ops), `None` where the
/// kernel declines (a shape or dtype it does not take).
pub fn add_row_low_rank<B: Backend>(
    y: &Tensor<B, 2>,
    x: &Tensor<B, 2>,
    pairs: &[RowPair<'_, B>],
    index: &[usize],
) -> Option<Tensor<B, 2>> {
    if TypeId::of::<B>() != TypeId::of::<Flex>() {
        return None;
    }
    let held: Vec<(FlexTensor, FlexTensor, f32)> = pairs
        .iter()
        .map(|(a, b, s)| (primitive::<Flex, B, 2>(a), primitive::<Flex, B, 2>(b), *s))
        .collect();
    let factors: Vec<RowFactors<'_>> = held
        .iter()
        .map(|(a, b, scale)| RowFactors {
            a,
            b,
            scale: *scale,
        })
        .collect();
    let (y, x) = (primitive::<Flex, B, 2>(y), primitive::<Flex, B, 2>(x));
    row_low_rank::add_row_low_rank(&y, &x, &factors, index).map(wrap::<Flex, B, 2>)
}

/// What the backward pass needs: `x` when `w` takes a gradient, `w` when
/// `x` does (as Burn's matmul keeps them: a frozen layer's input is not held
/// for a gradient nobody asked for).
#[derive(Debug, Clone)]
struct Saved {
    x: Option<FlexTensor>,
    w: Option<FlexTensor>,
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let Saved { x, w } = ops.state;
        if let Some(node) = node_b {
            let d_out = grad.layout().shape()[1];
            let db = Flex::float_sum_dim(grad.clone(), 0);
            grads.register::<Flex>(node.id, Flex::float_reshape(db, [d_out].into()));
        }
        if let (Some(node), Some(x)) = (node_w, x) {
            let dw = Flex::float_matmul(Flex::float_transpose(x), grad.clone());
            grads.register::<Flex>(node.id, dw);
        }
        if let (Some(node), Some(w)) = (node_x, w) {
            grads.register::<Flex>(node.id, Flex::float_matmul(grad, Flex::float_transpose(w)));
        }
    }
}

fn tracked_linear(
    x: FlexAutodiffTensor,
    w: FlexAutodiffTensor,
    b: FlexAutodiffTensor,
) -> Option<FlexAutodiffTensor> {
    let out = matmul_bias(&x.primitive, &w.primitive, &b.primitive)?;
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    let prep = LinearBackward
        .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful();
    Some(match prep {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                x: w_tracked.then_some(x.primitive),
                w: x_tracked.then_some(w.primitive),
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    })
}
