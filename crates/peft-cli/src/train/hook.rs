//! [`StepHook`]: what a method does around each optimizer step of a run,
//! beyond the loss (AdaLoRA's rank allocation: PEFT's
//! `update_and_allocate`, which reads the step's gradients and rewrites
//! the stepped model).

use burn::optim::GradientsParams;
use peft_core::Result;

/// Called by [`Trainer::step`](super::Trainer::step) around the optimizer
/// step.
pub trait StepHook<M> {
    /// The step's gradients (averaged over micro-batches and replicas),
    /// before the optimizer consumes them.
    fn before_step(&mut self, model: &M, grads: &GradientsParams);

    /// The stepped model, `step` the 0-based index of the step just taken.
    fn after_step(&mut self, model: M, step: usize) -> Result<M>;
}
