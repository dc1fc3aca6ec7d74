//! LoKr on one linear layer ([`LokrEntry`]): the delta is the Kronecker
//! product of two factors, each either a full matrix or a rank-`r` product
//! (LyCORIS; PEFT 0.21's `LoKrLayer` on `nn.Linear`):
//!
//! ```text
//! ΔW = s·(W1 ⊗ W2),   W1 = lokr_w1 or lokr_w1_a·lokr_w1_b,   likewise W2
//! ```
//!
//! With PEFT's keys (`[out, in]`): `W1` is `[out_l, in_m]` and `W2`
//! `[out_k, in_n]`, where `in = in_m·in_n` and `out = out_l·out_k` are
//! [`factorization`]s of the layer's sizes. Here every factor is stored
//! transposed, and `(A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ` keeps the product's form.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::delta::{DeltaEntry, DeltaFactors};

/// A LoKr adapter on one linear layer.
pub type LokrEntry<B> = DeltaEntry<B, LokrFactors<B>>;

/// PEFT's `factorization`: `dimension = m·n` with `m ≤ n`. A positive
/// `factor` that divides `dimension` is `m` itself; otherwise `m` is the
/// divisor closest to `√dimension`, and not above `factor` when one is set
/// (`-1`: no bound).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    let bound = if factor == -1 {
        dimension
    } else {
        factor.max(0) as usize
    };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > bound {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    (m.min(n), m.max(n))
}

/// How a layer's LoKr factors are laid out, decided once per layer as PEFT
/// decides it from the layer's sizes and the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LokrLayout {
    /// `(in_m, in_n)`: `factorization(d_in, decompose_factor)`.
    pub input: (usize, usize),
    /// `(out_l, out_k)`: `factorization(d_out, decompose_factor)`.
    pub output: (usize, usize),
    /// The rank `r` of the factors that are products.
    pub rank: usize,
    /// `W1` is one full matrix (`lokr_w1`), not `lokr_w1_a·lokr_w1_b`.
    pub full_w1: bool,
    /// `W2` is one full matrix (`lokr_w2`), not `lokr_w2_a·lokr_w2_b`.
    pub full_w2: bool,
}

impl LokrLayout {
    /// PEFT's `update_layer` for `nn.Linear`: `W1` is decomposed only with
    /// `decompose_both` and `r < max(out_l, in_m)/2`; `W2` whenever
    /// `r < max(out_k, in_n)/2`.
    pub fn new(
        d_in: usize,
        d_out: usize,
        rank: usize,
        decompose_factor: i64,
        decompose_both: bool,
    ) -> Self {
        let input = factorization(d_in, decompose_factor);
        let output = factorization(d_out, decompose_factor);
        let below_half = |a: usize, b: usize| (rank as f64) < a.max(b) as f64 / 2.0;
        LokrLayout {
            input,
            output,
            rank,
            full_w1: !(decompose_both && below_half(output.0, input.0)),
            full_w2: !below_half(output.1, input.1),
        }
    }
}

/// One factor of the Kronecker product: a full matrix or a rank-`r` pair.
#[derive(Module, Debug)]
pub enum KronFactor<B: Backend> {
    /// `lokr_wN`, `[in_*, out_*]` (PEFT: `[out_*, in_*]`).
    Full(Param<Tensor<B, 2>>),
    /// `lokr_wN_a` and `lokr_wN_b`.
    Product(FactorPair<B>),
}

/// A rank-`r` factor `a @ b` in PEFT's terms.
#[derive(Module, Debug)]
pub struct FactorPair<B: Backend> {
    /// `lokr_wN_a`, `[r, out_*]` (PEFT: `[out_*, r]`).
    pub a: Param<Tensor<B, 2>>,
    /// `lokr_wN_b`, `[in_*, r]` (PEFT: `[r, in_*]`).
    pub b: Param<Tensor<B, 2>>,
}

impl<B: Backend> KronFactor<B> {
    /// The factor's matrix, `[in_*, out_*]` (`b·a` for a pair: the
    /// transpose of PEFT's `a @ b`).
    fn matrix(&self) -> Tensor<B, 2> {
        match self {
            KronFactor::Full(w) => w.val(),
            KronFactor::Product(p) => p.b.val().matmul(p.a.val()),
        }
    }

    /// The factor's parameters under PEFT's key suffixes for factor `n`
    /// (1 or 2), with the Burn-layout shape each must have when the
    /// factor's matrix is `[rows, cols]` and the rank `r`.
    fn keyed(&self, n: u8, [rows, cols]: [usize; 2], r: usize) -> Vec<FactorSpec<'_, B>> {
        match self {
            KronFactor::Full(w) => vec![(full_key(n), w, [rows, cols])],
            KronFactor::Product(p) => vec![
                (pair_keys(n).0, &p.a, [r, cols]),
                (pair_keys(n).1, &p.b, [rows, r]),
            ],
        }
    }

    fn params_mut(&mut self) -> Vec<&mut Param<Tensor<B, 2>>> {
        match self {
            KronFactor::Full(w) => vec![w],
            KronFactor::Product(p) => vec![&mut p.a, &mut p.b],
        }
    }
}

/// A factor's key suffix, parameter and required shape.
type FactorSpec<'a, B> = (&'static str, &'a Param<Tensor<B, 2>>, [usize; 2]);

fn full_key(n: u8) -> &'static str {
    if n == 1 {
        "lokr_w1"
    } else {
        "lokr_w2"
    }
}

fn pair_keys(n: u8) -> (&'static str, &'static str) {
    if n == 1 {
        ("lokr_w1_a", "lokr_w1_b")
    } else {
        ("lokr_w2_a", "lokr_w2_b")
    }
}

/// The two factors of a LoKr delta and their layout.
#[derive(Module, Debug)]
pub struct LokrFactors<B: Backend> {
    /// `W1ᵀ`, `[in_m, out_l]` as a matrix.
    pub w1: KronFactor<B>,
    /// `W2ᵀ`, `[in_n, out_k]` as a matrix.
    pub w2: KronFactor<B>,
    /// Sizes and rank.
    #[module(skip)]
    pub layout: LokrLayout,
}

impl<B: Backend> LokrFactors<B> {
    /// Factors in `layout`, each parameter made by `init(key, shape)`
    /// (Burn-layout shape).
    pub fn new(
        layout: LokrLayout,
        mut init: impl FnMut(&'static str, [usize; 2]) -> Tensor<B, 2>,
    ) -> Self {
        let ((in_m, in_n), (out_l, out_k), r) = (layout.input, layout.output, layout.rank);
        let mut factor = |n: u8, full: bool, [rows, cols]: [usize; 2]| match full {
            true => KronFactor::Full(Param::from_tensor(init(full_key(n), [rows, cols]))),
            false => KronFactor::Product(FactorPair {
                a: Param::from_tensor(init(pair_keys(n).0, [r, cols])),
                b: Param::from_tensor(init(pair_keys(n).1, [rows, r])),
            }),
        };
        LokrFactors {
            w1: factor(1, layout.full_w1, [in_m, out_l]),
            w2: factor(2, layout.full_w2, [in_n, out_k]),
            layout,
        }
    }

    fn specs(&self) -> Vec<FactorSpec<'_, B>> {
        let ((in_m, in_n), (out_l, out_k), r) =
            (self.layout.input, self.layout.output, self.layout.rank);
        let mut specs = self.w1.keyed(1, [in_m, out_l], r);
        specs.extend(self.w2.keyed(2, [in_n, out_k], r));
        specs
    }
}

/// `A ⊗ B` for `A` `[p, q]` and `B` `[r, s]`: `[p·r, q·s]`, element
/// `(i·r + k, j·s + l)` = `A[i, j]·B[k, l]`, as `torch.kron`.
pub fn kron<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let [p, q] = a.dims();
    let [r, s] = b.dims();
    let a = a.reshape([p, 1, q, 1]);
    let b = b.reshape([1, r, 1, s]);
    (a * b).reshape([p * r, q * s])
}

impl<B: Backend> DeltaFactors<B> for LokrFactors<B> {
    fn unscaled_delta(&self) -> Tensor<B, 2> {
        kron(self.w1.matrix(), self.w2.matrix())
    }

    fn factors(&self) -> Vec<(&'static str, &Param<Tensor<B, 2>>)> {
        self.specs().into_iter().map(|(k, p, _)| (k, p)).collect()
    }

    fn factors_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        let keys: Vec<_> = self.specs().into_iter().map(|s| s.0).collect();
        let params = self.w1.params_mut().into_iter().chain(self.w2.params_mut());
        keys.into_iter().zip(params).collect()
    }

    /// The shapes the layout gives, provided its products are the layer's
    /// sizes and its rank the entry's; otherwise the layer's sizes
    /// themselves, which no factor has, so the check names the mismatch.
    fn expected_shapes(&self, rank: usize, d_in: usize, d_out: usize) -> Vec<[usize; 2]> {
        let l = &self.layout;
        let fits =
            l.input.0 * l.input.1 == d_in && l.output.0 * l.output.1 == d_out && l.rank == rank;
        self.specs()
            .into_iter()
            .map(|(_, _, shape)| if fits { shape } else { [d_in, d_out] })
            .collect()
    }
}
