//! Fused CPU kernels where the backend is Flex, with or without autodiff
//! (`burn_flex::ops::fused_attention`, `fused_layer_norm` and
//! `fused_swiglu`, peft-rs patches in `vendor/burn-flex`): attention, layer
//! norm and Llama's gated activation, each one pass
//! forward and one backward where Burn composes them from tensor ops.
//! Every other backend keeps the composed ops.
//!
//! Why a run-time type test instead of a backend trait: the models are
//! generic over Burn's `Backend` alone, and a trait of our own would put a
//! second bound on every model, adapter and job in the workspace. The test
//! is on `TypeId`, so it costs nothing per call, and a backend it does not
//! know keeps the composed path: the kernels can only add speed, never
//! change which backends work.

use std::any::Any;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

pub(crate) mod attention;
pub(crate) mod layer_norm;
pub(crate) mod swiglu;

/// Flex under autodiff (Burn's default checkpointing: none).
pub(crate) type FlexAutodiff = Autodiff<Flex>;

/// The float tensor of [`FlexAutodiff`]: a Flex tensor and its graph node.
pub(crate) type FlexAutodiffTensor = FloatTensor<FlexAutodiff>;

/// `x` as the type `U` it is at run time. Callers compare `TypeId`s first.
pub(crate) fn same<T: 'static, U: 'static>(x: T) -> U {
    *(Box::new(x) as Box<dyn Any>)
        .downcast::<U>()
        .expect("the caller compared the TypeIds")
}

/// The float primitive of `t`, whose backend `B` is `C` at run time.
pub(crate) fn primitive<C: Backend, B: Backend, const D: usize>(
    t: &Tensor<B, D>,
) -> FloatTensor<C> {
    same::<_, Tensor<C, D>>(t.clone()).into_primitive().tensor()
}

/// A float primitive of `C` as a tensor of `B`, which is `C` at run time.
pub(crate) fn wrap<C: Backend, B: Backend, const D: usize>(out: FloatTensor<C>) -> Tensor<B, D> {
    same(Tensor::<C, D>::from_primitive(TensorPrimitive::Float(out)))
}
