//! `silu(gate) ⊙ up` by one kernel each way on Flex, with or without
//! autodiff (`burn_flex::ops::fused_swiglu`).

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_flex::ops::fused_swiglu;
use burn_flex::FlexTensor;

use super::{primitive, wrap, FlexAutodiff, FlexAutodiffTensor};

/// `silu(gate) ⊙ up` by the fused kernel when `B` is Flex or
/// `Autodiff<Flex>` and both operands are f32 of one shape; `None`
/// otherwise.
pub(crate) fn swiglu<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let backend = TypeId::of::<B>();
    if backend == TypeId::of::<Flex>() {
        let raw = primitive::<Flex, B, D>;
        let out = fused_swiglu::forward(&raw(gate), &raw(up))?;
        return Some(wrap::<Flex, B, D>(out));
    }
    if backend == TypeId::of::<FlexAutodiff>() {
        let raw = primitive::<FlexAutodiff, B, D>;
        let out = tracked_swiglu(raw(gate), raw(up))?;
        return Some(wrap::<FlexAutodiff, B, D>(out));
    }
    None
}

/// The backward pass recomputes `σ(gate)` from the operands.
#[derive(Debug, Clone)]
struct Saved {
    gate: FlexTensor,
    up: FlexTensor,
}

#[derive(Debug)]
struct FusedSwigluBackward;

impl Backward<Flex, 2> for FusedSwigluBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (dgate, dup) = fused_swiglu::backward(&ops.state.gate, &ops.state.up, &grad)
            .expect("the forward pass accepted these operands");
        for (node, g) in [(node_gate, dgate), (node_up, dup)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

fn tracked_swiglu(gate: FlexAutodiffTensor, up: FlexAutodiffTensor) -> Option<FlexAutodiffTensor> {
    let out = fused_swiglu::forward(&gate.primitive, &up.primitive)?;
    let prep = FusedSwigluBackward
        .prepare::<NoCheckpointing>([gate.node.clone(), up.node.clone()])
        .compute_bound()
        .stateful();
    Some(match prep {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                gate: gate.primitive,
                up: up.primitive,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    })
}
