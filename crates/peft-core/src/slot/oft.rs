//! OFT on one linear layer ([`OftEntry`]): the layer's input is rotated by a
//! block-diagonal orthogonal matrix before the frozen weight sees it, as
//! PEFT 0.21's `oft.Linear` (`OFTRotationModule`) does:
//!
//! ```text
//! y = (x·R)·W + b,   R = diag(R_1, …, R_k),   R_j = cayley(Q_j)
//! ```
//!
//! Each `Q_j` is a `b × b` skew-symmetric matrix whose upper triangle is one
//! row of the trained `oft_R.weight` (`[k, b(b−1)/2]`, row-major as
//! `torch.triu_indices`; one row shared by every block with `block_share`).
//! The Cayley transform `(I − Q)(I + Q)⁻¹` is PEFT's Neumann series,
//! `I + 2Q + 2Q² + … + Q^m` ([`cayley_neumann`]), or with
//! `use_cayley_neumann: false` the exact transform ([`cayley_exact`], as
//! PEFT's `torch.linalg.solve`). Merging folds `R` into the
//! weight (`W ← R·W` in Burn's layout); unmerging multiplies by each block's
//! inverse, computed in `f64`, as PEFT's `torch.linalg.inv`.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{PeftError, Result};

use super::adapter::{BaseParts, SlotAdapter};
use super::boft::cayley_exact;

/// Everything about an OFT entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct OftMeta {
    /// The adapter's name.
    pub name: String,
    /// Block size `b` (`oft_block_size`).
    pub block_size: usize,
    /// Number of blocks `k = d_in / b` (PEFT's per-layer `r`).
    pub blocks: usize,
    /// One generator shared by every block.
    pub block_share: bool,
    /// Whether the Cayley transform is the Neumann series
    /// (`use_cayley_neumann`) or exact.
    pub cayley_neumann: bool,
    /// Terms of the Neumann series (`num_cayley_neumann_terms`).
    pub neumann_terms: usize,
    /// Whether `R` is currently folded into the base weight.
    pub merged: bool,
    /// While merged: the inverse of each block that was folded in
    /// (`[k·b·b]`, computed in `f64`), so unmerging undoes exactly that.
    pub merge_inverse: Option<Vec<f32>>,
}

/// One named OFT adapter on one linear layer.
#[derive(Module, Debug)]
pub struct OftEntry<B: Backend> {
    /// `oft_R.weight`, `[k, b(b−1)/2]` (`[1, …]` with `block_share`), the
    /// same layout as PEFT's file.
    pub weight: Param<Tensor<B, 2>>,
    /// Name, block layout, series length and merge state.
    #[module(skip)]
    pub meta: OftMeta,
}

/// PEFT's `_cayley_batch` with `use_cayley_neumann`: for `q` `[k, b, b]`,
/// `I + 2Q + 2Q² + 2Q³ + … + 2Q^(t−2) + Q^(max(t−1, 3))` with `t = terms`
/// (`I` for one term, `I + 2Q` for two), exactly PEFT's loop.
pub fn cayley_neumann<B: Backend>(q: Tensor<B, 3>, terms: usize) -> Tensor<B, 3> {
    let [k, b, _] = q.dims();
    let mut r = Tensor::<B, 2>::eye(b, &q.device())
        .unsqueeze_dim::<3>(0)
        .repeat_dim(0, k);
    if terms > 1 {
        r = r + q.clone() * 2.0;
        if terms > 2 {
            let q2 = q.clone().matmul(q.clone());
            r = r + q2.clone() * 2.0;
            let mut power = q2;
            for _ in 3..terms.saturating_sub(1) {
                power = power.matmul(q.clone());
                r = r + power.clone() * 2.0;
            }
            power = power.matmul(q);
            r = r + power;
        }
    }
    r
}

/// The skew-symmetric matrices `[k, b, b]` whose upper triangles are the
/// rows of `vec` `[k, b(b−1)/2]` (row-major, as `torch.triu_indices(b, b, 1)`).
pub fn skew_symmetric<B: Backend>(vec: Tensor<B, 2>, b: usize) -> Tensor<B, 3> {
    let [k, _] = vec.dims();
    let device = vec.device();
    // Column 0 of `padded` is zero; entry (i, j), i < j, reads column
    // 1 + its triangle index; everything else column 0.
    let padded = Tensor::cat(vec![Tensor::zeros([k, 1], &device), vec], 1);
    let mut index = vec![0i64; b * b];
    let mut t = 1;
    for i in 0..b {
        for j in i + 1..b {
            index[i * b + j] = t;
            t += 1;
        }
    }
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [b * b]), &device);
    let upper = padded.select(1, index).reshape([k, b, b]);
    upper.clone() - upper.swap_dims(1, 2)
}

/// The inverse of a `b × b` matrix (row-major, `f64`), by Gauss–Jordan
/// elimination with partial pivoting; `None` when it is singular.
pub(super) fn invert(mut a: Vec<f64>, b: usize) -> Option<Vec<f64>> {
    let mut inv: Vec<f64> = (0..b * b)
        .map(|i| if i / b == i % b { 1.0 } else { 0.0 })
        .collect();
    for col in 0..b {
        let pivot =
            (col..b).max_by(|&x, &y| a[x * b + col].abs().total_cmp(&a[y * b + col].abs()))?;
        if a[pivot * b + col].abs() < 1e-300 {
            return None;
        }
        for c in 0..b {
            a.swap(col * b + c, pivot * b + c);
            inv.swap(col * b + c, pivot * b + c);
        }
        let p = a[col * b + col];
        for c in 0..b {
            a[col * b + c] /= p;
            inv[col * b + c] /= p;
        }
        for row in 0..b {
            let f = a[row * b + col];
            if row != col && f != 0.0 {
                for c in 0..b {
                    a[row * b + c] -= f * a[col * b + c];
                    inv[row * b + c] -= f * inv[col * b + c];
                }
            }
        }
    }
    Some(inv)
}

impl<B: Backend> OftEntry<B> {
    /// The blocks `R_j`, `[k, b, b]` (one per block, repeated when shared).
    pub fn rotation_blocks(&self) -> Tensor<B, 3> {
        let m = &self.meta;
        let q = skew_symmetric(self.weight.val(), m.block_size);
        let r = match m.cayley_neumann {
            true => cayley_neumann(q, m.neumann_terms),
            false => cayley_exact(q),
        };
        match m.block_share {
            true => r.repeat_dim(0, m.blocks),
            false => r,
        }
    }

    /// `x·R` for `x` `[n, d_in]`, block by block: `[k, n, b]·[k, b, b]`.
    pub fn rotate(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, d_in] = x.dims();
        let (k, b) = (self.meta.blocks, self.meta.block_size);
        x.reshape([n, k, b])
            .swap_dims(0, 1)
            .matmul(self.rotation_blocks())
            .swap_dims(0, 1)
            .reshape([n, d_in])
    }

    /// `R·W` for a weight `[d_in, d_out]`: block `j` of its rows times `R_j`.
    fn rotate_weight(blocks: Tensor<B, 3>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
        let [d_in, d_out] = weight.dims();
        let k = blocks.dims()[0];
        blocks
            .matmul(weight.reshape([k, d_in / k, d_out]))
            .reshape([d_in, d_out])
    }

    /// Each rotation block's inverse, computed in `f64` (a truncated
    /// Neumann series is not exactly orthogonal, so the transpose would not
    /// do), as `[k·b·b]`; or the index of a block that has none.
    fn block_inverses(&self) -> std::result::Result<Vec<f32>, usize> {
        let blocks = self.rotation_blocks().detach();
        let b = blocks.dims()[1];
        let values: Vec<f64> = blocks
            .into_data()
            .convert::<f64>()
            .into_vec()
            .expect("f64 data");
        let mut inverse = Vec::with_capacity(values.len());
        for (i, block) in values.chunks(b * b).enumerate() {
            let inv = invert(block.to_vec(), b).ok_or(i)?;
            inverse.extend(inv.into_iter().map(|v| v as f32));
        }
        Ok(inverse)
    }
}

impl<B: Backend> SlotAdapter<B> for OftEntry<B> {
    fn name(&self) -> &str {
        &self.meta.name
    }

    fn merged(&self) -> bool {
        self.meta.merged
    }

    fn set_merged(&mut self, merged: bool) {
        self.meta.merged = merged;
    }

    fn check_fits(&self, d_in: usize, _d_out: usize, path: &str) -> Result<()> {
        let m = &self.meta;
        let rows = if m.block_share { 1 } else { m.blocks };
        let want = [rows, m.block_size * m.block_size.saturating_sub(1) / 2];
        let found = self.weight.shape().dims::<2>();
        if m.blocks * m.block_size != d_in || found != want {
            return Err(PeftError::Shape {
                name: format!("{path}.oft_R.weight"),
                expected: want.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    fn transforms_input(&self) -> bool {
        true
    }

    fn transform_input(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.rotate(x)
    }

    /// PEFT would merge a singular rotation and fail only on unmerging
    /// (`torch.linalg.inv`); merged, the layer's weight would be lost.
    fn merge_refusal(&self) -> Option<String> {
        self.block_inverses().err().map(|i| {
            format!(
                "OFT adapter `{}` cannot be merged: its rotation block {i} is singular, so the merge could not be undone",
                self.meta.name
            )
        })
    }

    fn merge_into(&mut self, base: &mut BaseParts<B>) {
        let blocks = self.rotation_blocks().detach();
        self.meta.merge_inverse = self.block_inverses().ok();
        base.weight = Self::rotate_weight(blocks, base.weight.clone());
    }

    /// By the inverse of what [`merge_into`](SlotAdapter::merge_into) folded in.
    fn unmerge_from(&mut self, base: &mut BaseParts<B>) {
        let (k, b) = (self.meta.blocks, self.meta.block_size);
        let inverse = match self.meta.merge_inverse.take() {
            Some(inverse) => inverse,
            // A copy that lost the record (a clone keeps it): the blocks
            // are unchanged since the checked merge.
            None => self
                .block_inverses()
                .expect("a merged rotation was checked invertible"),
        };
        let device = base.weight.device();
        let inverse = Tensor::<B, 3>::from_data(TensorData::new(inverse, [k, b, b]), &device);
        base.weight = Self::rotate_weight(inverse, base.weight.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::invert;

    #[test]
    fn invert_undoes_a_matrix() {
        let a = vec![2.0, 1.0, 0.0, 1.0, 3.0, 1.0, 0.0, 1.0, 4.0];
        let inv = invert(a.clone(), 3).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let v: f64 = (0..3).map(|t| a[i * 3 + t] * inv[t * 3 + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-12, "({i}, {j}) = {v}");
            }
        }
        assert!(invert(vec![1.0, 2.0, 2.0, 4.0], 2).is_none());
    }
}
