//! PEFT's `modules_to_save` on one linear layer ([`ModuleCopyEntry`]): a
//! trainable full copy of the layer (a classifier head, `lm_head`), used
//! in place of the frozen one while its adapter is active:
//!
//! ```text
//! y = x·W' + b'
//! ```
//!
//! PEFT keeps one copy per adapter beside the original
//! (`ModulesToSaveWrapper`) and lets one of them be active per layer; so
//! does [`SlotModel`](crate::SlotModel). Merging swaps the copy into the
//! base (exactly undone by swapping back), which is what PEFT's
//! `merge_and_unload` and `unload` both leave in the layer.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::error::{PeftError, Result};

use super::adapter::{BaseParts, SlotAdapter};
use super::LinearSlot;

/// Everything about a copy that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleCopyMeta {
    /// The adapter's name.
    pub name: String,
    /// Whether the copy is swapped into the base (the entry then holds the
    /// original).
    pub merged: bool,
}

/// One adapter's trainable copy of a linear layer (PEFT's
/// `modules_to_save`).
#[derive(Module, Debug)]
pub struct ModuleCopyEntry<B: Backend> {
    /// The copy's weight `[d_in, d_out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// The copy's bias `[d_out]`, present when the layer has one.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Name and merge state.
    #[module(skip)]
    pub meta: ModuleCopyMeta,
}

impl<B: Backend> ModuleCopyEntry<B> {
    /// A copy of `slot`'s base layer (dequantized if kept quantized) for
    /// adapter `name`, as PEFT's `copy.deepcopy(original_module)`.
    pub fn of_base(slot: &LinearSlot<B>, name: &str) -> Self {
        let copy = |t: Tensor<B, 2>| Param::from_tensor(t.detach());
        ModuleCopyEntry {
            weight: copy(slot.base_weight()),
            bias: slot
                .base
                .bias
                .as_ref()
                .map(|b| Param::from_tensor(b.val().detach())),
            meta: ModuleCopyMeta {
                name: name.to_string(),
                merged: false,
            },
        }
    }

    /// Exchanges the copy with the base layer's values.
    fn swap(&mut self, base: &mut BaseParts<B>) {
        let weight = self.weight.val().detach();
        self.weight = self.weight.clone().map(|_| base.weight.clone().detach());
        base.weight = weight;
        if let (Some(mine), Some(theirs)) = (&mut self.bias, &mut base.bias) {
            let bias = mine.val().detach();
            *mine = mine.clone().map(|_| theirs.clone().detach());
            *theirs = bias;
        }
    }
}

impl<B: Backend> SlotAdapter<B> for ModuleCopyEntry<B> {
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
        let found = self.weight.shape().dims::<2>();
        if found != [d_in, d_out] {
            return Err(PeftError::Shape {
                name: format!("{path}.weight (modules_to_save)"),
                expected: vec![d_out, d_in],
                found: vec![found[1], found[0]],
            });
        }
        if let Some(b) = &self.bias {
            let found = b.shape().dims::<1>()[0];
            if found != d_out {
                return Err(PeftError::Shape {
                    name: format!("{path}.bias (modules_to_save)"),
                    expected: vec![d_out],
                    found: vec![found],
                });
            }
        }
        Ok(())
    }

    fn replacement(&self) -> Option<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        Some((self.weight.val(), self.bias.as_ref().map(|b| b.val())))
    }

    fn merge_into(&mut self, base: &mut BaseParts<B>) {
        self.swap(base);
    }

    fn unmerge_from(&mut self, base: &mut BaseParts<B>) {
        self.swap(base);
    }
}
