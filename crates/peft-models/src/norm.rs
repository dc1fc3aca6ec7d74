//! Layer norm with the epsilon it was built with in reach: Burn's
//! `nn::LayerNorm` keeps its epsilon private, and the fused kernel under
//! autodiff on Flex ([`crate::fused`]) needs it. Same parameters and
//! record as Burn's (`gamma`, optional `beta`), same forward pass
//! (`B::layer_norm`) on every other backend. Also [`rms_norm`]: Burn's
//! `nn::RmsNorm` by the same kernel on Flex.

use burn::module::{Module, Param};
use burn::nn::RmsNorm;
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

/// `norm.forward(x)` for Burn's `RmsNorm` (`x / √(mean(x²) + eps) · gamma`
/// over the last dim): on Flex, with or without autodiff, one fused kernel
/// each way ([`rms_norm_fused`]), where Burn composes six ops; Burn's own
/// forward pass on every other backend.
pub fn rms_norm<B: Backend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    rms_norm_fused(norm, &x).unwrap_or_else(|| norm.forward(x))
}

/// [`rms_norm`] by the fused kernel: `Some` on Flex and `Autodiff<Flex>`
/// with f32 operands, `None` otherwise.
pub fn rms_norm_fused<B: Backend, const D: usize>(
    norm: &RmsNorm<B>,
    x: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    crate::fused::layer_norm::rms_norm(x, &norm.gamma.val(), norm.epsilon)
}
