//! What an adapter kind is to a [`LinearSlot`](super::LinearSlot): the
//! [`SlotAdapter`] trait and the values the slot hands it.
//!
//! The slot composes *effects*, never kinds: an entry may scale the layer's
//! input or output, add to its output, and fold itself into the base weight.
//! A new per-layer method is one file implementing [`SlotAdapter`] plus one
//! line in the registry of `entry.rs`.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::error::Result;

/// The frozen layer's weight `[d_in, d_out]` and bias `[d_out]` while an
/// entry folds itself in or out (always dense `f32`, detached).
#[derive(Debug, Clone)]
pub struct BaseParts<B: Backend> {
    /// Weight `[d_in, d_out]`.
    pub weight: Tensor<B, 2>,
    /// Bias `[d_out]`, if the layer has one.
    pub bias: Option<Tensor<B, 1>>,
}

/// What the slot has computed before entries add to the output.
#[derive(Debug)]
pub struct BasePass<B: Backend> {
    /// The base weight `[d_in, d_out]`, dequantized once per pass.
    pub weight: Tensor<B, 2>,
    /// `(x ⊙ l_in)·W` `[n, d_out]`, bias added and output-scaled only when an
    /// active entry scales the output. Present whenever an active entry
    /// [`needs_base_term`](SlotAdapter::needs_base_term).
    pub base_term: Option<Tensor<B, 2>>,
}

/// An entry's per-row factors in a mixed batch, `Δy = scale · (x·a)·b`:
/// on Flex each row applies its own adapter's (one kernel); elsewhere the
/// slot sets the batch's adapters' factors side by side and applies them
/// with two matmuls, each row masked to its own adapter's columns.
#[derive(Debug)]
pub struct LowRankRows<B: Backend> {
    /// `[d_in, r]`.
    pub a: Tensor<B, 2>,
    /// `[r, d_out]`.
    pub b: Tensor<B, 2>,
    /// Multiplies the delta (LoRA's `α / r`), kept apart from `b` so that
    /// no step copies `b` to scale it.
    pub scale: f64,
    /// A per-column factor `[d_out]` multiplying base plus delta (DoRA's
    /// `m / ‖W + ΔW‖`); `None` stands for ones.
    pub column_factor: Option<Tensor<B, 1>>,
}

/// The per-layer behaviour of one adapter kind.
///
/// Every effect has a neutral default, so a kind implements what it does and
/// nothing else. Effects are only asked of entries that are active and not
/// merged, except the row methods, which a mixed batch asks of the row's
/// entry whatever its state (the wrapper refuses mixed batches while merged).
pub trait SlotAdapter<B: Backend>: std::fmt::Debug {
    /// The adapter's name.
    fn name(&self) -> &str;

    /// Whether the entry is folded into the base weight.
    fn merged(&self) -> bool;

    /// Records that the entry is (or no longer is) folded in.
    fn set_merged(&mut self, merged: bool);

    /// Checks the entry's shapes against a `d_in → d_out` layer; errors name
    /// the tensor as PEFT keys it under `path`.
    fn check_fits(&self, d_in: usize, d_out: usize, path: &str) -> Result<()>;

    /// A weight `[d_in, d_out]` and bias `[d_out]` computing the layer in
    /// place of the frozen ones (PEFT's `modules_to_save`: a trainable copy
    /// of the whole layer). Other active entries apply on top as they
    /// would on the base.
    fn replacement(&self) -> Option<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        None
    }

    /// A vector `[d_in]` multiplying the layer's input (the base weight sees
    /// the scaled input; additive entries read the unscaled one).
    fn input_scale(&self) -> Option<Tensor<B, 1>> {
        None
    }

    /// Whether [`transform_input`](Self::transform_input) changes the input.
    fn transforms_input(&self) -> bool {
        false
    }

    /// The input `[n, d_in]` as the base weight sees it, after the input
    /// scales: OFT's rotation. Applied in activation order; additive entries
    /// read the untransformed input.
    fn transform_input(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x
    }

    /// Whether the slot applies the active entries' input transforms in
    /// reverse activation order when this entry is among them (PEFT's BOFT
    /// multiplies each adapter's rotation in front of the earlier ones':
    /// `x·M_k⋯M_1`, where OFT applies `x·R_1⋯R_k`).
    fn input_transform_reversed(&self) -> bool {
        false
    }

    /// A vector `[d_out]` multiplying `x·W` but not the bias (BOFT's
    /// `boft_s`); the slot multiplies every active entry's together.
    fn weight_scale(&self) -> Option<Tensor<B, 1>> {
        None
    }

    /// A vector `[d_out]` multiplying the base output, bias included.
    fn output_scale(&self) -> Option<Tensor<B, 1>> {
        None
    }

    /// Whether [`add_to_output`](Self::add_to_output) reads
    /// [`BasePass::base_term`] (the slot then computes `x·W` and the bias
    /// apart instead of in one fused kernel).
    fn needs_base_term(&self) -> bool {
        false
    }

    /// Adds the entry's contribution to the running output `y` `[n, d_out]`;
    /// `x` `[n, d_in]` is the layer's unscaled input.
    fn add_to_output(
        &self,
        y: Tensor<B, 2>,
        _x: &Tensor<B, 2>,
        _pass: &BasePass<B>,
    ) -> Tensor<B, 2> {
        y
    }

    /// The part of the base weight `[d_in, d_out]` this entry's
    /// initialisation moved into it (PiSSA, OLoRA: `s·A₀·B₀`), added back
    /// when the entry is removed; `None` for every init that leaves the
    /// base alone.
    fn split_off_base(&self) -> Option<Tensor<B, 2>> {
        None
    }

    /// Low-rank factors for a mixed batch, given the base weight `[d_in, d_out]`.
    fn low_rank_rows(&self, _weight: &Tensor<B, 2>) -> Option<LowRankRows<B>> {
        None
    }

    /// Why the entry cannot be folded into the base, if it cannot: a fold
    /// that could not be undone (OFT: a singular rotation block). Asked
    /// before any weight changes, so a refused merge changes nothing.
    fn merge_refusal(&self) -> Option<String> {
        None
    }

    /// Folds the entry into the base (detached values). Called only when
    /// [`merge_refusal`](Self::merge_refusal) gave none.
    fn merge_into(&mut self, base: &mut BaseParts<B>);

    /// Takes the entry back out of the base, exactly undoing
    /// [`merge_into`](Self::merge_into) up to rounding.
    fn unmerge_from(&mut self, base: &mut BaseParts<B>);
}
