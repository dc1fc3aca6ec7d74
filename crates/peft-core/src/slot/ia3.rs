//! (IA)³ on one linear layer ([`Ia3Entry`]): a learned vector scaling the
//! layer's input (feed-forward layers) or its output, bias included:
//!
//! ```text
//! y = (x ⊙ l)·W + b        (feed-forward)
//! y = (x·W + b) ⊙ l        (the others)
//! ```

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::error::{PeftError, Result};

use super::adapter::{BaseParts, SlotAdapter};

/// Everything about an (IA)³ entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Meta {
    /// The adapter's name.
    pub name: String,
    /// Feed-forward layers scale their *input* (`[d_in]` vector); the others
    /// scale their output, bias included (`[d_out]` vector), as in PEFT.
    pub feedforward: bool,
    /// Whether the vector is currently folded into the base weight.
    pub merged: bool,
}

/// One named (IA)³ adapter on one linear layer: a learned scaling vector.
#[derive(Module, Debug)]
pub struct Ia3Entry<B: Backend> {
    /// The vector `l`: shape `[d_in]` for feed-forward layers, else `[d_out]`.
    pub scale: Param<Tensor<B, 1>>,
    /// Name, placement and merge state.
    #[module(skip)]
    pub meta: Ia3Meta,
}

/// PEFT divides by `l + 1e-8` to unmerge (IA)³: the same guard, so that our
/// unmerged weights equal PEFT's.
const IA3_UNMERGE_EPS: f64 = 1e-8;

impl<B: Backend> Ia3Entry<B> {
    /// Multiplies the weight's rows (feed-forward: input features) or its
    /// columns and the bias (output features) by `l`.
    fn scale_base(&self, base: &mut BaseParts<B>, l: Tensor<B, 1>) {
        if self.meta.feedforward {
            base.weight = base.weight.clone() * l.unsqueeze_dim(1);
        } else {
            base.weight = base.weight.clone() * l.clone().unsqueeze_dim(0);
            base.bias = base.bias.take().map(|b| (b * l).detach());
        }
    }
}

impl<B: Backend> SlotAdapter<B> for Ia3Entry<B> {
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
        let want = if self.meta.feedforward { d_in } else { d_out };
        let found = self.scale.shape().dims::<1>()[0];
        if found != want {
            return Err(PeftError::Shape {
                name: format!("{path}.ia3_l"),
                expected: vec![want],
                found: vec![found],
            });
        }
        Ok(())
    }

    fn input_scale(&self) -> Option<Tensor<B, 1>> {
        self.meta.feedforward.then(|| self.scale.val())
    }

    fn output_scale(&self) -> Option<Tensor<B, 1>> {
        (!self.meta.feedforward).then(|| self.scale.val())
    }

    /// As PEFT's `IA3Layer.merge`.
    fn merge_into(&mut self, base: &mut BaseParts<B>) {
        self.scale_base(base, self.scale.val().detach());
    }

    /// Divides by `l + 1e-8`, as PEFT.
    fn unmerge_from(&mut self, base: &mut BaseParts<B>) {
        let l = (self.scale.val().detach() + IA3_UNMERGE_EPS).recip();
        self.scale_base(base, l);
    }
}
