//! Layer norm under autodiff on Flex, and RMS norm on Flex with or without
//! autodiff, by one kernel each way (`burn_flex::ops::fused_layer_norm`).

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_flex::ops::fused_layer_norm;
use burn_flex::FlexTensor;

use super::{primitive, wrap, FlexAutodiff, FlexAutodiffTensor};

/// `(x − mean) / √(var + eps) · gamma + beta` over the last dim by the fused
/// kernel when `B` is `Autodiff<Flex>`, the operands are f32 and there is a
/// bias; `None` otherwise (plain Flex already has a fused forward pass).
pub(crate) fn layer_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    beta: Option<&Tensor<B, 1>>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    if TypeId::of::<B>() != TypeId::of::<FlexAutodiff>() {
        return None;
    }
    let raw = primitive::<FlexAutodiff, B, 1>;
    let x = primitive::<FlexAutodiff, B, D>(x);
    let out = tracked_layer_norm(x, raw(gamma), beta.map(raw), eps as f32)?;
    Some(wrap::<FlexAutodiff, B, D>(out))
}

/// What the backward pass needs: the input, the scale and each row's mean
/// and inverse standard deviation.
#[derive(Debug, Clone)]
struct Saved {
    x: FlexTensor,
    gamma: FlexTensor,
    stats: FlexTensor,
}

#[derive(Debug)]
struct FusedLayerNormBackward;

impl Backward<Flex, 3> for FusedLayerNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let (dx, dgamma, dbeta) = fused_layer_norm::backward(&s.x, &s.gamma, &s.stats, &grad)
            .expect("the forward pass accepted these operands");
        for (node, g) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

fn tracked_layer_norm(
    x: FlexAutodiffTensor,
    gamma: FlexAutodiffTensor,
    beta: Option<FlexAutodiffTensor>,
    eps: f32,
) -> Option<FlexAutodiffTensor> {
    // The op has three parents; a norm without a bias (none of the models
    // here has one) keeps the composed path.
    let beta = beta?;
    let (out, stats) =
        fused_layer_norm::forward(&x.primitive, &gamma.primitive, Some(&beta.primitive), eps)?;
    let prep = FusedLayerNormBackward
        .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
        .compute_bound()
        .stateful();
    Some(match prep {
        OpsKind::Tracked(prep) => {
            let saved = Saved {
                x: x.primitive,
                gamma: gamma.primitive,
                stats,
            };
            prep.finish(saved, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    })
}

/// `x / √(mean(x²) + eps) · gamma` over the last dim (Burn's `RmsNorm`)
/// by the fused kernel when `B` is Flex or `Autodiff<Flex>` and the
/// operands are f32; `None` otherwise.
pub(crate) fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    gamma: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    let backend = TypeId::of::<B>();
    if backend == TypeId::of::<Flex>() {
        let (x, gamma) = (primitive::<Flex, B, D>(x), primitive::<Flex, B, 1>(gamma));
        let (out, _) = fused_layer_norm::forward_rms(&x, &gamma, eps as f32)?;
        return Some(wrap::<Flex, B, D>(out));
    }
    if backend != TypeId::of::<FlexAutodiff>() {
        return None;
    }
    let x = primitive::<FlexAutodiff, B, D>(x);
    let gamma = primitive::<FlexAutodiff, B, 1>(gamma);
    let (out, stats) = fused_layer_norm::forward_rms(&x.primitive, &gamma.primitive, eps as f32)?;
    let prep = FusedRmsNormBackward
        .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone()])
        .compute_bound()
        .stateful();
    let out = match prep {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                x: x.primitive,
                gamma: gamma.primitive,
                stats,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(wrap::<FlexAutodiff, B, D>(out))
}

#[derive(Debug)]
struct FusedRmsNormBackward;

impl Backward<Flex, 2> for FusedRmsNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let (dx, dgamma) = fused_layer_norm::backward_rms(&s.x, &s.gamma, &s.stats, &grad)
            .expect("the forward pass accepted these operands");
        for (node, g) in [(node_x, dx), (node_gamma, dgamma)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}
