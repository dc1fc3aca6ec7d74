//! LoHa on one linear layer ([`LohaEntry`]): the delta is the Hadamard
//! product of two low-rank products (FedPara; LyCORIS), as PEFT 0.21's
//! `LoHaLayer` on `nn.Linear`:
//!
//! ```text
//! ΔW = s·(W1b·W1a) ⊙ (W2b·W2a),   s = α/r
//! y  = x·W + b + x·ΔW
//! ```
//!
//! Dropouts, mixed batches and merging are [`DeltaEntry`]'s; LoHa always
//! rescales the columns that rank dropout keeps, as PEFT does.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::delta::{DeltaEntry, DeltaFactors};

/// A LoHa adapter on one linear layer.
pub type LohaEntry<B> = DeltaEntry<B, LohaFactors<B>>;

/// LoHa's four factors. PEFT's are stored transposed, as every weight here
/// (`[d_in, d_out]` layout).
#[derive(Module, Debug)]
pub struct LohaFactors<B: Backend> {
    /// `hada_w1_a`, shape `[r, d_out]` (PEFT: `[out, r]`).
    pub w1_a: Param<Tensor<B, 2>>,
    /// `hada_w1_b`, shape `[d_in, r]` (PEFT: `[r, in]`).
    pub w1_b: Param<Tensor<B, 2>>,
    /// `hada_w2_a`, shape `[r, d_out]` (PEFT: `[out, r]`).
    pub w2_a: Param<Tensor<B, 2>>,
    /// `hada_w2_b`, shape `[d_in, r]` (PEFT: `[r, in]`).
    pub w2_b: Param<Tensor<B, 2>>,
}

impl<B: Backend> DeltaFactors<B> for LohaFactors<B> {
    /// `(W1b·W1a) ⊙ (W2b·W2a)`, in PEFT's order of operations.
    fn unscaled_delta(&self) -> Tensor<B, 2> {
        let w1 = self.w1_b.val().matmul(self.w1_a.val());
        let w2 = self.w2_b.val().matmul(self.w2_a.val());
        w1 * w2
    }

    fn factors(&self) -> Vec<(&'static str, &Param<Tensor<B, 2>>)> {
        vec![
            ("hada_w1_a", &self.w1_a),
            ("hada_w1_b", &self.w1_b),
            ("hada_w2_a", &self.w2_a),
            ("hada_w2_b", &self.w2_b),
        ]
    }

    fn factors_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        vec![
            ("hada_w1_a", &mut self.w1_a),
            ("hada_w1_b", &mut self.w1_b),
            ("hada_w2_a", &mut self.w2_a),
            ("hada_w2_b", &mut self.w2_b),
        ]
    }

    fn expected_shapes(&self, r: usize, d_in: usize, d_out: usize) -> Vec<[usize; 2]> {
        vec![[r, d_out], [d_in, r], [r, d_out], [d_in, r]]
    }
}
