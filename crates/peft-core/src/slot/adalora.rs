//! AdaLoRA on one linear layer ([`AdaLoraEntry`]): PEFT 0.21's
//! `SVDLinear`, a LoRA in SVD form whose singular values `E` the rank
//! allocator masks during training:
//!
//! ```text
//! y = x·W + b + (α / (ranknum + 1e-5))·(dropout(x)·(A ⊙ E))·B
//! ```
//!
//! In Burn's layout: `A` `[d_in, r]` (PEFT's `lora_A` `[r, in]`
//! transposed), `E` `[1, r]` (`lora_E` `[r, 1]`), `B` `[r, d_out]`
//! (`lora_B` `[out, r]` transposed). `ranknum` is the adapter's `init_r`
//! (PEFT keeps it when a saved rank pattern shrinks a layer), so the scale
//! is fixed per adapter.

use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::error::{PeftError, Result};

use super::adapter::{BaseParts, BasePass, LowRankRows, SlotAdapter};

/// Everything about an AdaLoRA entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaLoraMeta {
    /// The adapter's name.
    pub name: String,
    /// `lora_alpha / (ranknum + 1e-5)`.
    pub scaling: f64,
    /// `lora_dropout`.
    pub dropout: f64,
    /// Whether the entry is currently folded into the base weight.
    pub merged: bool,
}

/// One named AdaLoRA adapter on one linear layer.
#[derive(Module, Debug)]
pub struct AdaLoraEntry<B: Backend> {
    /// Right singular vectors `A`, `[d_in, r]`.
    pub a: Param<Tensor<B, 2>>,
    /// Singular values `E`, `[1, r]` (masked to zero where the allocator
    /// prunes a triplet).
    pub e: Param<Tensor<B, 2>>,
    /// Left singular vectors `B`, `[r, d_out]`.
    pub b: Param<Tensor<B, 2>>,
    /// Name, scale, dropout and merge state.
    #[module(skip)]
    pub meta: AdaLoraMeta,
}

impl<B: Backend> AdaLoraEntry<B> {
    /// The entry's rank `r` (0 once a rank pattern pruned every triplet).
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// `A ⊙ E`, `[d_in, r]`.
    fn scaled_a(&self) -> Tensor<B, 2> {
        self.a.val() * self.e.val()
    }

    /// `s·(A ⊙ E)·B`, `[d_in, d_out]`, detached.
    fn delta(&self) -> Tensor<B, 2> {
        (self.scaled_a().matmul(self.b.val()) * self.meta.scaling).detach()
    }
}

fn shape_error(name: String, expected: &[usize], found: &[usize]) -> PeftError {
    PeftError::Shape {
        name,
        expected: expected.to_vec(),
        found: found.to_vec(),
    }
}

impl<B: Backend> SlotAdapter<B> for AdaLoraEntry<B> {
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
        let r = self.rank();
        let found = self.a.dims();
        if found != [d_in, r] {
            return Err(shape_error(
                format!("{path}.lora_A"),
                &[r, d_in],
                &[found[1], found[0]],
            ));
        }
        let found = self.e.dims();
        if found != [1, r] {
            return Err(shape_error(
                format!("{path}.lora_E"),
                &[r, 1],
                &[found[1], found[0]],
            ));
        }
        let found = self.b.dims();
        if found != [r, d_out] {
            return Err(shape_error(
                format!("{path}.lora_B"),
                &[d_out, r],
                &[found[1], found[0]],
            ));
        }
        Ok(())
    }

    fn add_to_output(
        &self,
        y: Tensor<B, 2>,
        x: &Tensor<B, 2>,
        _pass: &BasePass<B>,
    ) -> Tensor<B, 2> {
        if self.rank() == 0 {
            return y;
        }
        let xd = Dropout {
            prob: self.meta.dropout,
        }
        .forward(x.clone());
        y + (xd.matmul(self.scaled_a()) * self.meta.scaling).matmul(self.b.val())
    }

    fn low_rank_rows(&self, _weight: &Tensor<B, 2>) -> Option<LowRankRows<B>> {
        (self.rank() > 0).then(|| LowRankRows {
            a: self.scaled_a(),
            b: self.b.val(),
            scale: self.meta.scaling,
            column_factor: None,
        })
    }

    fn merge_into(&mut self, base: &mut BaseParts<B>) {
        if self.rank() > 0 {
            base.weight = base.weight.clone() + self.delta();
        }
    }

    fn unmerge_from(&mut self, base: &mut BaseParts<B>) {
        if self.rank() > 0 {
            base.weight = base.weight.clone() - self.delta();
        }
    }
}
