//! BOFT on one linear layer ([`BoftEntry`]): the layer's input is rotated
//! by a product of butterfly factors, each a permuted block-diagonal
//! orthogonal matrix, and the weight's output columns are scaled, as PEFT
//! 0.21's `boft.Linear` does:
//!
//! ```text
//! y = ((x·M)·W) ⊙ s + b,   M = B_{N−1}⋯B_1·B_0,   B_i = P_i·diag(Q_i1, …, Q_iD)·P_iᵀ
//! ```
//!
//! `Q_ij = (I − S)(I + S)⁻¹` with `S` the skew-symmetric part of the trained
//! `boft_R[i, j]` (`[N, D, H, H]`), PEFT's exact Cayley transform
//! ([`cayley_exact`]); `P_i` is PEFT's `block_butterfly_perm` for factor
//! `i` (the identity with one factor), `s` the trained `boft_s` (`[d_out,
//! 1]`). The bias is not scaled. Merging folds both in (`W ← (M·W) ⊙ s` in
//! Burn's layout); unmerging divides by `s` and multiplies by `Mᵀ`, as PEFT
//! does (`M` is orthogonal to rounding).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use crate::error::{PeftError, Result};

use super::adapter::{BaseParts, SlotAdapter};
use super::oft::invert;

/// Everything about a BOFT entry that is not a parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct BoftMeta {
    /// The adapter's name.
    pub name: String,
    /// Number of blocks `D` per factor (`boft_block_num`).
    pub blocks: usize,
    /// Block size `H` (`boft_block_size`).
    pub block_size: usize,
    /// Per butterfly factor, PEFT's permutation indices `[d_in]` (`P[i,
    /// perm[i]] = 1`); `None` where it is the identity.
    pub perms: Vec<Option<Vec<usize>>>,
    /// `boft_dropout`: in training, the share of one random factor's blocks
    /// replaced by the identity (PEFT's `MultiplicativeDropoutLayer`).
    pub dropout: f64,
    /// Whether the entry is currently folded into the base weight.
    pub merged: bool,
}

/// One named BOFT adapter on one linear layer.
#[derive(Module, Debug)]
pub struct BoftEntry<B: Backend> {
    /// `boft_R`, `[N, D, H, H]`: one generator per factor and block, as
    /// PEFT's file holds it (only its skew-symmetric part acts).
    pub rotation: Param<Tensor<B, 4>>,
    /// `boft_s`, `[d_out, 1]`: scales `x·W`'s columns (not the bias).
    pub scale: Param<Tensor<B, 2>>,
    /// Name, layout, permutations, dropout and merge state.
    #[module(skip)]
    pub meta: BoftMeta,
}

/// PEFT's `cayley_batch`: for generators `data` `[k, b, b]`, `(I − S)(I +
/// S)⁻¹` with `S = (data − dataᵀ)/2`, exactly (PEFT solves; Burn has no
/// solve, so the inverse is taken on the host in `f64`). Autodiff sees the
/// inverse's derivative `d(A⁻¹) = −A⁻¹·dA·A⁻¹` through `X − X̄·(S − S̄)·C`,
/// where `C = (I + S)⁻¹` is a constant, `X = (I − S)·C` and bars are
/// detached copies: the correction is zero in value and gives `dX = −dS·C
/// − X·dS·C`, the exact derivative. `I + S` is never singular for a
/// skew-symmetric `S`; non-finite generators give NaN blocks.
pub fn cayley_exact<B: Backend>(data: Tensor<B, 3>) -> Tensor<B, 3> {
    let [k, b, _] = data.dims();
    let device = data.device();
    let skew = (data.clone() - data.swap_dims(1, 2)) * 0.5;
    let eye = Tensor::<B, 2>::eye(b, &device)
        .unsqueeze_dim::<3>(0)
        .repeat_dim(0, k);
    let values: Vec<f64> = (eye.clone() + skew.clone())
        .detach()
        .into_data()
        .convert::<f64>()
        .into_vec()
        .expect("f64 data");
    let mut inverse = Vec::with_capacity(values.len());
    for block in values.chunks(b * b) {
        match invert(block.to_vec(), b) {
            Some(inv) => inverse.extend(inv.into_iter().map(|v| v as f32)),
            None => inverse.extend(std::iter::repeat_n(f32::NAN, b * b)),
        }
    }
    let c = Tensor::<B, 3>::from_data(TensorData::new(inverse, [k, b, b]), &device);
    let x = (eye - skew.clone()).matmul(c.clone());
    if !B::ad_enabled(&device) {
        return x;
    }
    let correction = x
        .clone()
        .detach()
        .matmul(skew.clone() - skew.detach())
        .matmul(c);
    x - correction
}

/// PEFT's `block_butterfly_perm(n, b, r, n_butterfly_factor)`: within each
/// of `b` groups of `n / b` indices, sub-blocks of `r` taken even ones
/// first, then odd ones; `None` (the identity) without butterfly factors.
pub fn butterfly_permutation(
    n: usize,
    b: usize,
    r: usize,
    butterfly: bool,
) -> Result<Option<Vec<usize>>> {
    if !butterfly {
        return Ok(None);
    }
    if b == 0 || r == 0 || b * r * 2 > n {
        return Err(PeftError::Config(
            "BOFT: Invalid number of blocks!".to_string(),
        ));
    }
    let group = n / b;
    // `sort_block(group, r)`: even sub-blocks of r first, then odd ones.
    let step = group as f64 / r as f64;
    let order: Vec<usize> = (0..)
        .map(|i| 2 * i)
        .take_while(|&p| (p as f64) < step)
        .chain((0..).map(|i| 2 * i + 1).take_while(|&p| (p as f64) < step))
        .collect();
    let mut sorted: Vec<usize> = (0..group).collect();
    for (i, pos) in order.iter().enumerate() {
        for c in 0..r {
            let (to, from) = (i * r + c, pos * r + c);
            if to < group && from < group {
                sorted[to] = from;
            }
        }
    }
    let mut indices: Vec<usize> = (0..n).collect();
    for start in (0..n).step_by(group) {
        let end = (start + group).min(n);
        let chunk: Vec<usize> = indices[start..end].to_vec();
        for (j, &s) in sorted.iter().enumerate().take(end - start) {
            indices[start + j] = chunk[s];
        }
    }
    Ok(Some(indices))
}

fn index<B: Backend>(values: impl Iterator<Item = usize>, device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = values.map(|i| i as i64).collect();
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

impl<B: Backend> BoftEntry<B> {
    /// The orthogonal blocks `[N, D, H, H]`; in training with
    /// `boft_dropout`, PEFT's multiplicative dropout: `⌊p·D⌋` random blocks
    /// of one random factor become the identity.
    fn blocks(&self, train: bool) -> Tensor<B, 4> {
        let [n, d, h, _] = self.rotation.dims();
        let q = cayley_exact(self.rotation.val().reshape([n * d, h, h])).reshape([n, d, h, h]);
        let device = q.device();
        let p = self.meta.dropout;
        if !(train && p > 0.0 && B::ad_enabled(&device)) {
            return q;
        }
        let draw: Vec<f32> = Tensor::<B, 1>::random([d + 1], Distribution::Default, &device)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 data");
        let factor = ((draw[0] as f64 * n as f64) as usize).min(n - 1);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| draw[1 + a].total_cmp(&draw[1 + b]));
        let mut mask = vec![0f32; n * d];
        for &j in order.iter().take((p * d as f64) as usize) {
            mask[factor * d + j] = 1.0;
        }
        let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [n, d, 1, 1]), &device);
        let eye = Tensor::<B, 2>::eye(h, &device).reshape([1, 1, h, h]);
        q * (mask.clone().neg() + 1.0) + eye * mask
    }

    /// `x·M` for `x` `[n, d_in]`: factor `N − 1` first, each as `x·P_i`
    /// (a gather by the inverse permutation), the blocks, then `·P_iᵀ`.
    fn rotate_with(&self, x: Tensor<B, 2>, train: bool) -> Tensor<B, 2> {
        let blocks = self.blocks(train);
        let [factors, d, h, _] = blocks.dims();
        let device = x.device();
        let mut x = x;
        for i in (0..factors).rev() {
            let [rows, d_in] = x.dims();
            let perm = &self.meta.perms[i];
            if let Some(p) = perm {
                let mut inverse = vec![0; d_in];
                for (from, &to) in p.iter().enumerate() {
                    inverse[to] = from;
                }
                x = x.select(1, index::<B>(inverse.into_iter(), &device));
            }
            let b = blocks.clone().narrow(0, i, 1).reshape([d, h, h]);
            x = x
                .reshape([rows, d, h])
                .swap_dims(0, 1)
                .matmul(b)
                .swap_dims(0, 1)
                .reshape([rows, d_in]);
            if let Some(p) = perm {
                x = x.select(1, index::<B>(p.iter().copied(), &device));
            }
        }
        x
    }

    /// The rotation `M` `[d_in, d_in]` (no dropout), detached.
    pub fn matrix(&self) -> Tensor<B, 2> {
        let d_in = self.meta.blocks * self.meta.block_size;
        let eye = Tensor::<B, 2>::eye(d_in, &self.rotation.device());
        self.rotate_with(eye, false).detach()
    }

    /// `boft_s` as a vector `[d_out]`.
    fn scale_vector(&self) -> Tensor<B, 1> {
        let [d_out, _] = self.scale.dims();
        self.scale.val().reshape([d_out])
    }
}

impl<B: Backend> SlotAdapter<B> for BoftEntry<B> {
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
        let m = &self.meta;
        let want = [m.perms.len(), m.blocks, m.block_size, m.block_size];
        let found = self.rotation.shape().dims::<4>();
        if m.blocks * m.block_size != d_in || found != want {
            return Err(PeftError::Shape {
                name: format!("{path}.boft_R"),
                expected: want.to_vec(),
                found: found.to_vec(),
            });
        }
        let found = self.scale.shape().dims::<2>();
        if found != [d_out, 1] {
            return Err(PeftError::Shape {
                name: format!("{path}.boft_s"),
                expected: vec![d_out, 1],
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    fn transforms_input(&self) -> bool {
        true
    }

    fn transform_input(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.rotate_with(x, true)
    }

    /// PEFT composes several active BOFT adapters as `x·M_k⋯M_1`.
    fn input_transform_reversed(&self) -> bool {
        true
    }

    fn weight_scale(&self) -> Option<Tensor<B, 1>> {
        Some(self.scale_vector())
    }

    /// A zero in `boft_s` would erase a column of the weight for good.
    fn merge_refusal(&self) -> Option<String> {
        let s: Vec<f32> = self
            .scale
            .val()
            .detach()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 data");
        s.iter().position(|v| *v == 0.0 || !v.is_finite()).map(|i| {
            format!(
                "BOFT adapter `{}` cannot be merged: boft_s[{i}] is {}, so the merge could not be undone",
                self.meta.name, s[i]
            )
        })
    }

    fn merge_into(&mut self, base: &mut BaseParts<B>) {
        let s = self.scale_vector().detach().unsqueeze_dim::<2>(0);
        base.weight = self.matrix().matmul(base.weight.clone()) * s;
    }

    fn unmerge_from(&mut self, base: &mut BaseParts<B>) {
        let s = self.scale_vector().detach().unsqueeze_dim::<2>(0);
        base.weight = self.matrix().transpose().matmul(base.weight.clone() / s);
    }
}

#[cfg(test)]
mod tests {
    use super::butterfly_permutation;

    /// PEFT's `block_butterfly_perm` (its outputs, printed by PEFT 0.21.2):
    /// 16 inputs in blocks of 4 (r = 2): factor 0 is the identity, factor 1
    /// interleaves pairs within groups of 8, a third factor within all 16;
    /// 24 inputs with r = 3 in two groups.
    #[test]
    fn permutations_are_peft_s() {
        assert_eq!(butterfly_permutation(16, 4, 2, false).unwrap(), None);
        let first = butterfly_permutation(16, 4, 2, true).unwrap().unwrap();
        assert_eq!(first, (0..16).collect::<Vec<_>>());
        let second = butterfly_permutation(16, 2, 2, true).unwrap().unwrap();
        assert_eq!(
            second,
            vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
        );
        let third = butterfly_permutation(16, 1, 2, true).unwrap().unwrap();
        assert_eq!(
            third,
            vec![0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
        );
        let odd = butterfly_permutation(24, 2, 3, true).unwrap().unwrap();
        assert_eq!(
            odd,
            vec![
                0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11, 12, 13, 14, 18, 19, 20, 15, 16, 17, 21, 22,
                23
            ]
        );
        assert!(butterfly_permutation(16, 8, 2, true).is_err());
    }
}
