//! LoRA, rsLoRA and DoRA on one linear layer ([`LoraEntry`]):
//!
//! ```text
//! y = x·W + b + s·(dropout(x)·A)·B                     (LoRA, rsLoRA)
//! y = x·W + b + (g−1)·(x·W) + g·s·(dropout(x)·A)·B     (DoRA, g = m / ‖W + s·A·B‖)
//! ```
//!
//! on the activation side: `ΔW = A·B` is never formed in the forward pass
//! (only DoRA's detached column norm needs it).

use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::{PeftError, Result};

use super::adapter::{BaseParts, BasePass, LowRankRows, SlotAdapter};

/// Everything about a LoRA entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMeta {
    /// The adapter's name (`default` unless given).
    pub name: String,
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha` for this module (after `alpha_pattern`).
    pub alpha: f64,
    /// The factor applied to `x·A·B`: `α/r`, or `α/√r` with rsLoRA.
    pub scaling: f64,
    /// Dropout probability on the input of `A` (training only).
    pub dropout: f64,
    /// Whether `ΔW` is currently folded into the base weight.
    pub merged: bool,
    /// DoRA only: the column norms `‖W + ΔW‖` used at merge time, kept so that
    /// unmerge divides by exactly the same numbers.
    pub dora_merge_norm: Option<Vec<f32>>,
    /// What an initialisation moved out of the base weight into this
    /// entry (PiSSA, OLoRA); `None` for the inits that leave the base alone.
    pub base_split: Option<BaseSplit>,
}

/// The factors a base-splitting initialisation (PiSSA, OLoRA) gave an
/// entry, `W = W_res + s·A₀·B₀`: what converts the trained adapter into a
/// plain LoRA of the original weight (`[A; A₀]`, `[B, −B₀]`), and what is
/// added back to the base when the entry is removed.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseSplit {
    /// `A₀`, `[d_in, r]`, row-major `f32` (Burn's layout).
    pub a0: Vec<f32>,
    /// `B₀`, `[r, d_out]`, row-major `f32`.
    pub b0: Vec<f32>,
}

/// One named LoRA adapter on one linear layer.
#[derive(Module, Debug)]
pub struct LoraEntry<B: Backend> {
    /// Down-projection `A`, shape `[d_in, r]`.
    pub a: Param<Tensor<B, 2>>,
    /// Up-projection `B`, shape `[r, d_out]`.
    pub b: Param<Tensor<B, 2>>,
    /// DoRA magnitude `m`, shape `[d_out]`; `None` for plain LoRA.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// Name, rank, scaling and merge state.
    #[module(skip)]
    pub meta: LoraMeta,
}

/// The L2 norm of each column of `[d_in, d_out]`: `[d_out]`.
pub fn column_norm<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 1> {
    w.powf_scalar(2.0).sum_dim(0).sqrt().squeeze_dim(0)
}

impl<B: Backend> LoraEntry<B> {
    /// `s·A·B`, shape `[d_in, d_out]` (merging and DoRA's norm only).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()) * self.meta.scaling
    }

    /// Number of parameters in this entry.
    pub fn num_params(&self) -> usize {
        Module::num_params(self)
    }

    /// DoRA's per-column factor `g = m / ‖W + s·A·B‖`, shape `[d_out]`,
    /// detached from the graph through the norm as PEFT does.
    fn dora_factor(&self, weight: Tensor<B, 2>, magnitude: Tensor<B, 1>) -> Tensor<B, 1> {
        let norm = column_norm(weight + self.delta_weight().detach()).detach();
        magnitude / norm
    }

    /// `(x·A · scaling)·B` on the (dropped-out) input. The scale multiplies
    /// the rank-r intermediate `[n, r]`, not the `[n, d_out]` product: one
    /// pass over the activation fewer.
    fn product(&self, xd: Tensor<B, 2>) -> Tensor<B, 2> {
        (xd.matmul(self.a.val()) * self.meta.scaling).matmul(self.b.val())
    }

    fn dropout(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        Dropout {
            prob: self.meta.dropout,
        }
        .forward(x)
    }
}

fn shape_error(name: String, expected: &[usize], found: &[usize]) -> PeftError {
    PeftError::Shape {
        name,
        expected: expected.to_vec(),
        found: found.to_vec(),
    }
}

impl<B: Backend> SlotAdapter<B> for LoraEntry<B> {
    fn name(&self) -> &str {
        &self.meta.name
    }

    fn merged(&self) -> bool {
        self.meta.merged
    }

    fn set_merged(&mut self, merged: bool) {
        self.meta.merged = merged;
    }

    fn split_off_base(&self) -> Option<Tensor<B, 2>> {
        let split = self.meta.base_split.as_ref()?;
        let device = self.a.device();
        let [d_in, r] = self.a.shape().dims::<2>();
        let d_out = self.b.shape().dims::<2>()[1];
        let a0 = Tensor::<B, 2>::from_data(TensorData::new(split.a0.clone(), [d_in, r]), &device);
        let b0 = Tensor::<B, 2>::from_data(TensorData::new(split.b0.clone(), [r, d_out]), &device);
        Some(a0.matmul(b0) * self.meta.scaling)
    }

    fn check_fits(&self, d_in: usize, d_out: usize, path: &str) -> Result<()> {
        let r = self.meta.rank;
        let a = self.a.shape().dims::<2>();
        let b = self.b.shape().dims::<2>();
        if a != [d_in, r] {
            return Err(shape_error(format!("{path}.lora_A"), &[d_in, r], &a));
        }
        if b != [r, d_out] {
            return Err(shape_error(format!("{path}.lora_B"), &[r, d_out], &b));
        }
        if let Some(m) = &self.magnitude {
            let m = m.shape().dims::<1>();
            if m != [d_out] {
                let name = format!("{path}.lora_magnitude_vector");
                return Err(shape_error(name, &[d_out], &m));
            }
        }
        Ok(())
    }

    fn needs_base_term(&self) -> bool {
        self.magnitude.is_some()
    }

    fn add_to_output(&self, y: Tensor<B, 2>, x: &Tensor<B, 2>, pass: &BasePass<B>) -> Tensor<B, 2> {
        let xd = self.dropout(x.clone());
        let lora = self.product(xd.clone());
        let Some(m) = &self.magnitude else {
            return y + lora;
        };
        let w = &pass.weight;
        let g = self.dora_factor(w.clone(), m.val()).unsqueeze_dim(0);
        // PEFT: with dropout active, DoRA's base term is recomputed on the
        // dropped-out input.
        let base_term = match &pass.base_term {
            Some(base) if !(self.meta.dropout > 0.0 && B::ad_enabled(&xd.device())) => base.clone(),
            _ => xd.matmul(w.clone()),
        };
        y + (g.clone() - 1.0) * base_term + g * lora
    }

    fn low_rank_rows(&self, weight: &Tensor<B, 2>) -> Option<LowRankRows<B>> {
        Some(LowRankRows {
            a: self.a.val(),
            b: self.b.val(),
            scale: self.meta.scaling,
            column_factor: self
                .magnitude
                .as_ref()
                .map(|m| self.dora_factor(weight.clone(), m.val())),
        })
    }

    fn merge_into(&mut self, base: &mut BaseParts<B>) {
        let delta = self.delta_weight().detach();
        let combined = base.weight.clone() + delta;
        base.weight = match &self.magnitude {
            None => combined,
            Some(m) => {
                let norm = column_norm(combined.clone()).detach();
                self.meta.dora_merge_norm =
                    Some(norm.to_data().to_vec::<f32>().unwrap_or_default());
                let g = m.val().detach() / norm;
                combined * g.unsqueeze_dim(0)
            }
        };
    }

    fn unmerge_from(&mut self, base: &mut BaseParts<B>) {
        let delta = self.delta_weight().detach();
        let weight = base.weight.clone();
        base.weight = match &self.magnitude {
            None => weight - delta,
            Some(m) => {
                let norm = self.meta.dora_merge_norm.take().unwrap_or_default();
                let d = norm.len();
                let norm = Tensor::<B, 1>::from_data(TensorData::new(norm, [d]), &weight.device());
                let g = m.val().detach() / norm;
                weight / g.unsqueeze_dim(0) - delta
            }
        };
    }
}
