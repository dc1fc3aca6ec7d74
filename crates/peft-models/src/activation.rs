//! The gated activation of Llama's feed-forward block.

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `silu(gate) ⊙ up` for operands of one shape. On Flex, with or without
/// autodiff, one fused kernel each way (`burn_flex::ops::fused_swiglu`);
/// elsewhere, and for operands the kernel does not take, [`swiglu_composite`].
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    swiglu_fused(&gate, &up).unwrap_or_else(|| swiglu_composite(gate, up))
}

/// [`swiglu`] by the fused kernel: `Some` on Flex and `Autodiff<Flex>` with
/// f32 operands of one shape, `None` otherwise.
pub fn swiglu_fused<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    crate::fused::swiglu::swiglu(gate, up)
}

/// [`swiglu`] composed from Burn's ops: the path of every other backend,
/// and the reference the kernel is tested against.
pub fn swiglu_composite<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    silu(gate) * up
}
