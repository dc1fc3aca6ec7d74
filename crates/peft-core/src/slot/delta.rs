//! Kinds whose effect on a layer is one weight delta built from factors
//! ([`DeltaEntry`]): the LyCORIS family (LoHa, LoKr), as PEFT 0.21's
//! `LycorisLayer` treats them on `nn.Linear`:
//!
//! ```text
//! ΔW = s·f(factors),   s = α/r
//! y  = x·W + b + x·ΔW
//! ```
//!
//! A kind of this family is its factors alone ([`DeltaFactors`]: the
//! tensors, `f`, their PEFT keys); the entry around them does the rest, the
//! same way for each: module dropout (the whole delta skipped with
//! probability `module_dropout`, one draw per layer and pass, training only),
//! rank dropout (each output column of `ΔW` dropped with probability
//! `rank_dropout`, the kept ones rescaled by one over the kept fraction when
//! the kind asks for it), mixed batches, merge and unmerge.

use std::marker::PhantomData;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};

use crate::error::{PeftError, Result};

use super::adapter::{BaseParts, BasePass, LowRankRows, SlotAdapter};

/// Everything about a delta entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaMeta {
    /// The adapter's name.
    pub name: String,
    /// The rank `r` of the factors (after `rank_pattern`).
    pub rank: usize,
    /// `alpha` for this module (after `alpha_pattern`).
    pub alpha: f64,
    /// `s = α/r`.
    pub scaling: f64,
    /// Probability of dropping an output column of `ΔW` (training only).
    pub rank_dropout: f64,
    /// Whether the kept columns are rescaled by one over the kept fraction
    /// (LoHa always; LoKr's `rank_dropout_scale`).
    pub rank_dropout_scale: bool,
    /// Probability of skipping the whole delta (training only).
    pub module_dropout: f64,
    /// Whether `ΔW` is currently folded into the base weight.
    pub merged: bool,
}

/// The factors of one delta kind, stored transposed as every weight here
/// (`[d_in, d_out]` layout; PEFT's files hold `[out, in]`).
pub trait DeltaFactors<B: Backend>: Module<B> + std::fmt::Debug {
    /// `f(factors)`, shape `[d_in, d_out]`, before the scaling `s`, in
    /// PEFT's order of operations.
    fn unscaled_delta(&self) -> Tensor<B, 2>;

    /// The factors this entry holds, under their PEFT key suffixes
    /// (`hada_w1_a`, `lokr_w1`, …), in the order PEFT's file lists them.
    fn factors(&self) -> Vec<(&'static str, &Param<Tensor<B, 2>>)>;

    /// The same factors, mutably (filled from a file).
    fn factors_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)>;

    /// The shape each factor must have at rank `rank` on a `d_in → d_out`
    /// layer, in [`factors`](Self::factors)' order (Burn's layout).
    fn expected_shapes(&self, rank: usize, d_in: usize, d_out: usize) -> Vec<[usize; 2]>;
}

/// One named adapter of a delta kind on one linear layer: its factors `F`
/// and its [`DeltaMeta`].
#[derive(Module, Debug)]
pub struct DeltaEntry<B: Backend, F> {
    /// The kind's trainable factors.
    pub factors: F,
    /// Name, rank, scaling, dropouts and merge state.
    #[module(skip)]
    pub meta: DeltaMeta,
    /// `F` carries the backend; the entry names it for the derive.
    _backend: PhantomData<B>,
}

impl<B: Backend, F: DeltaFactors<B>> DeltaEntry<B, F> {
    /// An entry of `factors` described by `meta`.
    pub fn new(factors: F, meta: DeltaMeta) -> Self {
        DeltaEntry {
            factors,
            meta,
            _backend: PhantomData,
        }
    }

    /// `ΔW = s·f(factors)`, shape `[d_in, d_out]`.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.factors.unscaled_delta() * self.meta.scaling
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
        let keep = match self.meta.rank_dropout_scale {
            true => keep.clone() / keep.mean(),
            false => keep,
        };
        Some(delta * keep.unsqueeze_dim(0))
    }
}

impl<B: Backend, F: DeltaFactors<B>> SlotAdapter<B> for DeltaEntry<B, F> {
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
        let want = self.factors.expected_shapes(self.meta.rank, d_in, d_out);
        for ((key, p), want) in self.factors.factors().into_iter().zip(want) {
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

    /// `ΔW` need not have a small rank (LoHa's is up to `r²`, LoKr's a
    /// Kronecker product): a mixed batch applies it exactly, as the pair
    /// `(I, ΔW)` or `(ΔW, I)`, whichever side is narrower.
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
            scale: 1.0,
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
