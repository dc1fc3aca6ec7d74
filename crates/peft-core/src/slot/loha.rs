//! LoHa on one linear layer ([`LohaEntry`]): the delta is the Hadamard
//! product of two low-rank products (FedPara; LyCORIS), as PEFT 0.21's
//! `LoHaLayer` on `nn.Linear`:
//!
//! ```text
//! ΔW = s·(W1b·W1a) ⊙ (W2b·W2a),   s = α/r
//! y  = x·W + b + x·ΔW
//! ```
//!
//! In training, the whole delta is skipped with probability `module_dropout`
//! (one draw per layer and pass) and each output column of `ΔW` is dropped
//! with probability `rank_dropout`, the kept ones rescaled by one over the
//! kept fraction, as PEFT does.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};

use crate::error::{PeftError, Result};

use super::adapter::{BaseParts, BasePass, LowRankRows, SlotAdapter};

/// Everything about a LoHa entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct LohaMeta {
    /// The adapter's name.
    pub name: String,
    /// Rank `r` of each of the two products.
    pub rank: usize,
    /// `alpha` for this module (after `alpha_pattern`).
    pub alpha: f64,
    /// `α/r`.
    pub scaling: f64,
    /// Probability of dropping an output column of `ΔW` (training only).
    pub rank_dropout: f64,
    /// Probability of skipping the whole delta (training only).
    pub module_dropout: f64,
    /// Whether `ΔW` is currently folded into the base weight.
    pub merged: bool,
}

/// One named LoHa adapter on one linear layer. PEFT's factors are stored
/// transposed, as every weight here (`[d_in, d_out]` layout).
#[derive(Module, Debug)]
pub struct LohaEntry<B: Backend> {
    /// `hada_w1_a`, shape `[r, d_out]` (PEFT: `[out, r]`).
    pub w1_a: Param<Tensor<B, 2>>,
    /// `hada_w1_b`, shape `[d_in, r]` (PEFT: `[r, in]`).
    pub w1_b: Param<Tensor<B, 2>>,
    /// `hada_w2_a`, shape `[r, d_out]` (PEFT: `[out, r]`).
    pub w2_a: Param<Tensor<B, 2>>,
    /// `hada_w2_b`, shape `[d_in, r]` (PEFT: `[r, in]`).
    pub w2_b: Param<Tensor<B, 2>>,
    /// Name, rank, scaling, dropouts and merge state.
    #[module(skip)]
    pub meta: LohaMeta,
}

impl<B: Backend> LohaEntry<B> {
    /// `ΔW = s·(W1b·W1a) ⊙ (W2b·W2a)`, shape `[d_in, d_out]`, in PEFT's
    /// order of operations.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        let w1 = self.w1_b.val().matmul(self.w1_a.val());
        let w2 = self.w2_b.val().matmul(self.w2_a.val());
        (w1 * w2) * self.meta.scaling
    }

    /// `ΔW` as the training forward pass uses it: `None` when module dropout
    /// skips it, columns dropped by rank dropout.
    fn training_delta(&self, device: &B::Device) -> Option<Tensor<B, 2>> {
        let training = B::ad_enabled(device);
        let (module_p, rank_p) = (self.meta.module_dropout, self.meta.rank_dropout);
        if training && module_p > 0.0 {
            let draw: f64 = Tensor::<B, 1>::random([1], Distribution::Default, device)
                .into_scalar()
                .elem();
            if draw <= module_p {
                return None;
            }
        }
        let delta = self.delta_weight();
        if !(training && rank_p > 0.0) {
            return Some(delta);
        }
        let d_out = delta.dims()[1];
        let keep = Tensor::<B, 1>::random([d_out], Distribution::Default, device)
            .greater_elem(rank_p)
            .float();
        let keep = keep.clone() / keep.mean();
        Some(delta * keep.unsqueeze_dim(0))
    }
}

impl<B: Backend> SlotAdapter<B> for LohaEntry<B> {
    fn name(&self) -> &str {
        &self.meta.name
    }

    fn merged(&self) -> bool {
        self.meta.merged
    }

    fn set_merged(&mut self, merged: bool) {
        self.meta.merged = merged;
    }

    fn check_fits(&self, d_in: usize, d_out: usize, path: &str) -> Result<()> {
        let r = self.meta.rank;
        let factors = [
            ("hada_w1_a", &self.w1_a, [r, d_out]),
            ("hada_w1_b", &self.w1_b, [d_in, r]),
            ("hada_w2_a", &self.w2_a, [r, d_out]),
            ("hada_w2_b", &self.w2_b, [d_in, r]),
        ];
        for (key, p, want) in factors {
            let found = p.shape().dims::<2>();
            if found != want {
                return Err(PeftError::Shape {
                    name: format!("{path}.{key}"),
                    expected: want.to_vec(),
                    found: found.to_vec(),
                });
            }
        }
        Ok(())
    }

    fn add_to_output(
        &self,
        y: Tensor<B, 2>,
        x: &Tensor<B, 2>,
        _pass: &BasePass<B>,
    ) -> Tensor<B, 2> {
        match self.training_delta(&x.device()) {
            Some(delta) => y + x.clone().matmul(delta),
            None => y,
        }
    }

    /// `ΔW` has rank up to `r²`, not `r`: a mixed batch applies it exactly,
    /// as the pair `(I, ΔW)` or `(ΔW, I)`, whichever side is narrower.
    fn low_rank_rows(&self, _weight: &Tensor<B, 2>) -> Option<LowRankRows<B>> {
        let delta = self.delta_weight();
        let [d_in, d_out] = delta.dims();
        let device = delta.device();
        let (a, b) = if d_in <= d_out {
            (Tensor::eye(d_in, &device), delta)
        } else {
            (delta, Tensor::eye(d_out, &device))
        };
        Some(LowRankRows {
            a,
            b,
            column_factor: None,
        })
    }

    fn merge_into(&mut self, base: &mut BaseParts<B>) {
        base.weight = base.weight.clone() + self.delta_weight().detach();
    }

    fn unmerge_from(&mut self, base: &mut BaseParts<B>) {
        base.weight = base.weight.clone() - self.delta_weight().detach();
    }
}
