//! The models' norm layers, over PEFT-adaptable parameters: [`LayerNorm`]
//! (BERT, GPT-2) and [`RmsNorm`] (Llama) each hold a
//! [`NormSlot`](peft_core::NormSlot) (the frozen scale and shift plus LN
//! tuning's per-adapter copies) and the epsilon they were built with
//! (Burn's own modules keep theirs private, and the fused kernels under
//! autodiff on Flex ([`crate::fused`]) need it). The forward passes are
//! Burn's (`B::layer_norm`; `nn::RmsNorm`'s ops) on every backend but
//! Flex, where one fused kernel runs each way.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use peft_core::{NormParams, NormSlot};

/// `(x − mean) / √(var + eps) · gamma + beta` over the last dim.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Scale `gamma` `[d]` (the slot's `weight`), shift `beta` `[d]` (its
    /// `bias`), and the copies adapters train.
    pub slot: NormSlot<B>,
    /// Added to the variance before the square root.
    #[module(skip)]
    pub epsilon: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// A norm of width `d`: scale 1, shift 0.
    pub fn new(d: usize, epsilon: f64, device: &B::Device) -> Self {
        Self::from_params(
            Tensor::ones([d], device),
            Some(Tensor::zeros([d], device)),
            epsilon,
        )
    }

    /// A frozen norm with scale `gamma` `[d]` and shift `beta` `[d]`.
    pub fn from_params(gamma: Tensor<B, 1>, beta: Option<Tensor<B, 1>>, epsilon: f64) -> Self {
        LayerNorm {
            slot: NormSlot::new(gamma, beta),
            epsilon,
        }
    }

    /// Normalises `x: [..., d]` with the parameters the slot gives (in a
    /// mixed batch, each row's own).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.slot.params() {
            NormParams::Shared { weight, bias } => self.normalise(x, weight, bias),
            NormParams::PerRow { weight, bias } => {
                let unit = Tensor::ones([self.slot.width()], &x.device());
                let y = self.normalise(x, unit, None) * rows::<B, D>(weight);
                match bias {
                    Some(b) => y + rows::<B, D>(b),
                    None => y,
                }
            }
        }
    }

    /// [`forward`](Self::forward) by the fused kernel with the slot's
    /// current shared parameters: `Some` under autodiff on Flex with f32
    /// operands and a shift, `None` otherwise.
    pub fn forward_fused<const D: usize>(&self, x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
        let NormParams::Shared { weight, bias } = self.slot.params() else {
            return None;
        };
        crate::fused::layer_norm::layer_norm(x, &weight, bias.as_ref(), self.epsilon)
    }

    fn normalise<const D: usize>(
        &self,
        x: Tensor<B, D>,
        gamma: Tensor<B, 1>,
        beta: Option<Tensor<B, 1>>,
    ) -> Tensor<B, D> {
        if let Some(y) =
            crate::fused::layer_norm::layer_norm(&x, &gamma, beta.as_ref(), self.epsilon)
        {
            return y;
        }
        Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
            x.into_primitive().tensor(),
            gamma.into_primitive().tensor(),
            beta.map(|b| b.into_primitive().tensor()),
            self.epsilon,
        )))
    }
}

/// `x / √(mean(x²) + eps) · gamma` over the last dim (Llama's RMSNorm).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale `gamma` `[d]` (the slot's `weight`; no shift) and the copies
    /// adapters train.
    pub slot: NormSlot<B>,
    /// Added to the mean square before the square root.
    #[module(skip)]
    pub epsilon: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm of width `d` with scale 1.
    pub fn new(d: usize, epsilon: f64, device: &B::Device) -> Self {
        Self::from_params(Tensor::ones([d], device), epsilon)
    }

    /// A frozen norm with scale `gamma` `[d]`.
    pub fn from_params(gamma: Tensor<B, 1>, epsilon: f64) -> Self {
        RmsNorm {
            slot: NormSlot::new(gamma, None),
            epsilon,
        }
    }

    /// Normalises `x: [..., d]` with the scale the slot gives (in a mixed
    /// batch, each row's own).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.slot.params() {
            NormParams::Shared { weight, .. } => self.normalise(x, weight),
            NormParams::PerRow { weight, .. } => {
                let unit = Tensor::ones([self.slot.width()], &x.device());
                self.normalise(x, unit) * rows::<B, D>(weight)
            }
        }
    }

    /// [`forward`](Self::forward) by the fused kernel with the slot's
    /// current shared scale: `Some` on Flex and `Autodiff<Flex>` with f32
    /// operands, `None` otherwise.
    pub fn forward_fused<const D: usize>(&self, x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
        let NormParams::Shared { weight, .. } = self.slot.params() else {
            return None;
        };
        crate::fused::layer_norm::rms_norm(x, &weight, self.epsilon)
    }

    /// The fused kernel where it runs; else Burn's `nn::RmsNorm` ops.
    fn normalise<const D: usize>(&self, x: Tensor<B, D>, gamma: Tensor<B, 1>) -> Tensor<B, D> {
        if let Some(y) = crate::fused::layer_norm::rms_norm(&x, &gamma, self.epsilon) {
            return y;
        }
        let dtype = x.dtype();
        let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + self.epsilon).sqrt();
        (x / rms.cast(dtype)) * gamma.unsqueeze()
    }
}

/// Per-row parameters `[rows, d]` shaped `[rows, 1, …, 1, d]` to scale an
/// input `[rows, …, d]`.
fn rows<B: Backend, const D: usize>(t: Tensor<B, 2>) -> Tensor<B, D> {
    let [r, d] = t.dims();
    let mut shape = [1usize; D];
    shape[0] = r;
    shape[D - 1] = d;
    t.reshape(shape)
}
