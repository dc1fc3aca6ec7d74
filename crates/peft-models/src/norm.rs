//! Layer norm with the epsilon it was built with in reach: Burn's
//! `nn::LayerNorm` keeps its epsilon private, and the fused kernel under
//! autodiff on Flex ([`crate::fused`]) needs it. Same parameters and
//! record as Burn's (`gamma`, optional `beta`), same forward pass
//! (`B::layer_norm`) on every other backend.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

/// `(x − mean) / √(var + eps) · gamma + beta` over the last dim.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Scale `[d]`.
    pub gamma: Param<Tensor<B, 1>>,
    /// Shift `[d]`, if any.
    pub beta: Option<Param<Tensor<B, 1>>>,
    /// Added to the variance before the square root.
    #[module(skip)]
    pub epsilon: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// A norm of width `d`: scale 1, shift 0.
    pub fn new(d: usize, epsilon: f64, device: &B::Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([d], device)),
            beta: Some(Param::from_tensor(Tensor::zeros([d], device))),
            epsilon,
        }
    }

    /// Normalises `x: [..., d]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if let Some(y) = self.forward_fused(&x) {
            return y;
        }
        let beta = self.beta.as_ref().map(|b| b.val());
        Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
            x.into_primitive().tensor(),
            self.gamma.val().into_primitive().tensor(),
            beta.map(|b| b.into_primitive().tensor()),
            self.epsilon,
        )))
    }

    /// [`forward`](Self::forward) by the fused kernel: `Some` under
    /// autodiff on Flex with f32 operands and a shift, `None` otherwise.
    pub fn forward_fused<const D: usize>(&self, x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
        let beta = self.beta.as_ref().map(|b| b.val());
        crate::fused::layer_norm::layer_norm(x, &self.gamma.val(), beta.as_ref(), self.epsilon)
    }
}
