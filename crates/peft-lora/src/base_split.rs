//! PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024): LoRA
//! initialisations that split each targeted weight `W` `[out, in]` into a
//! residual and the adapter's start, `W = W_res + s·B·A`, as PEFT 0.21's
//! `pissa_init` / `olora_init` do (`fixtures/base_split`,
//! `tests/base_split_parity.rs`):
//!
//! - PiSSA: `W = V·S·Uᵀ` (thin SVD); with `S_r` the `r` largest values
//!   divided by `s`, `A = √S_r·U_rᵀ`, `B = V_r·√S_r`. `pissa_niter_<n>`
//!   takes PyTorch's `svd_lowrank(W, r, niter=n)` (Halko et al.'s
//!   randomized range finder with `n` QR-orthonormalised power iterations,
//!   then the SVD of the small projection) instead of the exact SVD.
//! - OLoRA: `W = Q·R` (thin Householder QR with LAPACK's signs, `R`'s
//!   diagonal `−sign(pivot)·‖column‖`), `B = Q[:, :r]`, `A = R[:r]`.
//!
//! Computed in `f64` from the `f32` weight (PEFT: `f32` throughout). The
//! exact SVD's vectors are PEFT's up to each pair's sign, which `B·A`, the
//! residual and every output do not see. The randomized variant draws its
//! Gaussian test matrix from [`SplitMix64`] seeded by the module's path, so
//! a run (and a resumed run) is reproducible; PEFT draws from PyTorch's
//! global generator, so its factors are another sample of the same method.

use nalgebra::DMatrix;
use peft_core::config::BaseSplittingInit;
use peft_core::rng::SplitMix64;
use peft_core::{PeftError, Result};

/// The split of one weight: `a` `[r, in]`, `b` `[out, r]` (PyTorch's
/// layouts) and the residual `w - s·b·a` `[out, in]`.
#[derive(Debug)]
pub(crate) struct Split {
    pub a: DMatrix<f64>,
    pub b: DMatrix<f64>,
    pub residual: DMatrix<f64>,
}

/// Splits `w` `[out, in]` (row-major) for rank `rank` and LoRA scaling `s`.
/// `path` names the module in errors and seeds the randomized SVD.
pub(crate) fn split(
    w: &[f32],
    out: usize,
    inp: usize,
    rank: usize,
    scaling: f64,
    init: BaseSplittingInit,
    path: &str,
) -> Result<Split> {
    let k = out.min(inp);
    if rank > k {
        return Err(PeftError::Config(format!(
            "{path}: rank {rank} exceeds the {out} × {inp} weight's rank bound {k}, which {} cannot fill",
            name(init)
        )));
    }
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(PeftError::Config(format!(
            "{path}: {} needs a positive LoRA scaling, got {scaling}",
            name(init)
        )));
    }
    let m =
        DMatrix::<f64>::from_row_slice(out, inp, &w.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let (a, b) = match init {
        BaseSplittingInit::Olora => {
            let (q, r) = householder_qr(&m);
            (
                r.rows(0, rank).into_owned(),
                q.columns(0, rank).into_owned(),
            )
        }
        BaseSplittingInit::Pissa { niter } => {
            let (v, s, u) = match niter {
                None => top_svd(&m, rank, path)?,
                Some(n) => svd_lowrank(&m, rank, n, seed_of(path))?,
            };
            // A = √(S_r/s)·U_rᵀ, B = V_r·√(S_r/s).
            let root: Vec<f64> = s.iter().map(|&x| (x / scaling).max(0.0).sqrt()).collect();
            let mut a = u.transpose();
            let mut b = v;
            for (c, r) in root.iter().enumerate() {
                a.row_mut(c).scale_mut(*r);
                b.column_mut(c).scale_mut(*r);
            }
            (a, b)
        }
    };
    let residual = &m - (&b * &a) * scaling;
    Ok(Split { a, b, residual })
}

fn name(init: BaseSplittingInit) -> &'static str {
    match init {
        BaseSplittingInit::Olora => "OLoRA",
        BaseSplittingInit::Pissa { .. } => "PiSSA",
    }
}

/// FNV-1a of the module path: the randomized SVD's seed.
fn seed_of(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The `rank` largest singular triplets of `m` `[out, in]`: `V` `[out, r]`,
/// the values (descending), `U` `[in, r]`, with `m ≈ V·diag(S)·Uᵀ`.
fn top_svd(
    m: &DMatrix<f64>,
    rank: usize,
    path: &str,
) -> Result<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let svd = m
        .clone()
        .try_svd(true, true, f64::EPSILON, 0)
        .ok_or_else(|| PeftError::State(format!("{path}: the SVD did not converge")))?;
    let (u, v_t) = (svd.u.expect("asked for"), svd.v_t.expect("asked for"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let order = &order[..rank];
    let left = DMatrix::from_fn(m.nrows(), rank, |i, c| u[(i, order[c])]);
    let right = DMatrix::from_fn(m.ncols(), rank, |j, c| v_t[(order[c], j)]);
    let values = order.iter().map(|&i| svd.singular_values[i]).collect();
    Ok((left, values, right))
}

/// PyTorch's `svd_lowrank(m, q=rank, niter)` for `m` `[out, in]` with
/// `in > rank` (PEFT's case; its other branch is for `in ≤ rank`, which
/// [`split`] refuses before): a basis `Q` `[in, r]` of `mᵀ`'s range from a
/// Gaussian test matrix and `niter` power iterations, then the exact SVD of
/// `m·Q` `[out, r]`. Returns `(V, S, U)` as [`top_svd`].
fn svd_lowrank(
    m: &DMatrix<f64>,
    rank: usize,
    niter: usize,
    seed: u64,
) -> Result<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let mut rng = SplitMix64(seed);
    let mut normal = || {
        let (u, v) = (rng.next_f64().max(1e-300), rng.next_f64());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    };
    let m_t = m.transpose();
    let test = DMatrix::<f64>::from_fn(m.nrows(), rank, |_, _| normal());
    let mut q = householder_qr(&(&m_t * test)).0;
    for _ in 0..niter {
        q = householder_qr(&(m * &q)).0;
        q = householder_qr(&(&m_t * &q)).0;
    }
    let small = m * &q; // [out, r]
    let (v, s, w) = top_svd(&small, rank, "svd_lowrank")?;
    Ok((v, s, q * w))
}

/// The thin QR decomposition of `m` `[rows, cols]` by Householder
/// reflections as LAPACK's `geqrf` + `orgqr` compute it (so as
/// `torch.linalg.qr`): `Q` `[rows, k]`, `R` `[k, cols]`, `k = min(rows,
/// cols)`, each reflection choosing `R[j, j] = −sign(m_jj)·‖m_{j:, j}‖`
/// (`dlarfg`), and no reflection where the column below the diagonal is
/// already zero.
pub(crate) fn householder_qr(m: &DMatrix<f64>) -> (DMatrix<f64>, DMatrix<f64>) {
    let (rows, cols) = m.shape();
    let k = rows.min(cols);
    let mut a = m.clone();
    let mut taus = vec![0.0f64; k];
    for j in 0..k {
        let alpha = a[(j, j)];
        let xnorm = (j + 1..rows).map(|i| a[(i, j)].powi(2)).sum::<f64>().sqrt();
        if xnorm == 0.0 {
            continue;
        }
        let beta = -alpha.signum() * alpha.hypot(xnorm);
        // Fortran's SIGN(x, 0.0) is +|x|: a zero pivot reflects to −‖x‖.
        let beta = if alpha == 0.0 {
            -alpha.hypot(xnorm)
        } else {
            beta
        };
        taus[j] = (beta - alpha) / beta;
        let scale = 1.0 / (alpha - beta);
        for i in j + 1..rows {
            a[(i, j)] *= scale;
        }
        a[(j, j)] = beta;
        // Apply H = I − τ·v·vᵀ (v = [1, a[j+1.., j]]) to the columns right of j.
        for c in j + 1..cols {
            let dot = a[(j, c)] + (j + 1..rows).map(|i| a[(i, j)] * a[(i, c)]).sum::<f64>();
            let t = taus[j] * dot;
            a[(j, c)] -= t;
            for i in j + 1..rows {
                a[(i, c)] -= t * a[(i, j)];
            }
        }
    }
    let r = DMatrix::from_fn(k, cols, |i, c| if c >= i { a[(i, c)] } else { 0.0 });
    // Q = H₀·H₁·…·H_{k−1} applied to the first k columns of the identity,
    // innermost reflection first.
    let mut q = DMatrix::<f64>::from_fn(rows, k, |i, c| if i == c { 1.0 } else { 0.0 });
    for j in (0..k).rev() {
        if taus[j] == 0.0 {
            continue;
        }
        for c in j..k {
            let dot = q[(j, c)] + (j + 1..rows).map(|i| a[(i, j)] * q[(i, c)]).sum::<f64>();
            let t = taus[j] * dot;
            q[(j, c)] -= t;
            for i in j + 1..rows {
                q[(i, c)] -= t * a[(i, j)];
            }
        }
    }
    (q, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
        let mut rng = SplitMix64(seed);
        DMatrix::from_fn(rows, cols, |_, _| rng.next_f64() - 0.5)
    }

    /// `Q·R = M`, `QᵀQ = I`, `R` upper triangular with LAPACK's signs
    /// (each diagonal value opposite in sign to the pivot it replaced), on
    /// tall, wide and square matrices.
    #[test]
    fn householder_qr_is_lapacks() {
        for (rows, cols) in [(12, 5), (5, 12), (7, 7)] {
            let m = random(rows, cols, (rows * 31 + cols) as u64);
            let (q, r) = householder_qr(&m);
            let k = rows.min(cols);
            assert_eq!((q.shape(), r.shape()), ((rows, k), (k, cols)));
            assert!((&q * &r - &m).norm() < 1e-12 * m.norm());
            let gram = q.transpose() * &q;
            assert!((gram - DMatrix::<f64>::identity(k, k)).norm() < 1e-12);
            for i in 0..k {
                for c in 0..i {
                    assert_eq!(r[(i, c)], 0.0);
                }
            }
            // The first pivot is m[0, 0] itself.
            assert_eq!(r[(0, 0)].signum(), -m[(0, 0)].signum());
        }
    }

    /// PiSSA's factors are the top singular pairs (balanced, scaled by
    /// `1/s`) and the residual adds back to `W`; the randomized variant
    /// with power iterations finds the same `B·A` on a matrix with a clear
    /// spectral gap; OLoRA's `B·A` is `Q_r·R_r`. Rank beyond the matrix is
    /// refused.
    #[test]
    fn splits_add_back_to_the_weight() {
        let (out, inp, rank, s) = (20, 30, 4, 2.0);
        // Planted rank-4 part far above a small full-rank rest.
        let m = random(out, rank, 1) * random(rank, inp, 2) * 10.0 + random(out, inp, 3) * 0.01;
        let w: Vec<f32> = m.transpose().iter().map(|&v| v as f32).collect(); // row-major
        let exact = split(
            &w,
            out,
            inp,
            rank,
            s,
            BaseSplittingInit::Pissa { niter: None },
            "x",
        )
        .unwrap();
        let w64 =
            DMatrix::from_row_slice(out, inp, &w.iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert!((&exact.residual + (&exact.b * &exact.a) * s - &w64).norm() < 1e-12 * w64.norm());
        let svd = w64.clone().svd(false, false);
        let mut values: Vec<f64> = svd.singular_values.iter().copied().collect();
        values.sort_by(|a, b| b.total_cmp(a));
        for c in 0..rank {
            let (an, bn) = (exact.a.row(c).norm(), exact.b.column(c).norm());
            assert!((an * an * s - values[c]).abs() < 1e-9 * values[0], "{c}");
            assert!((an - bn).abs() < 1e-9 * an, "{c}: unbalanced");
        }
        // The residual's largest singular value is the (r+1)-th of W.
        let rest = exact
            .residual
            .clone()
            .svd(false, false)
            .singular_values
            .max();
        assert!((rest - values[rank]).abs() < 1e-9 * values[0]);
        let fast = split(
            &w,
            out,
            inp,
            rank,
            s,
            BaseSplittingInit::Pissa { niter: Some(4) },
            "x",
        )
        .unwrap();
        let gap = (&fast.b * &fast.a - &exact.b * &exact.a).norm() / (&exact.b * &exact.a).norm();
        assert!(gap < 1e-6, "randomized SVD off by {gap}");
        let olora = split(&w, out, inp, rank, s, BaseSplittingInit::Olora, "x").unwrap();
        let (q, r) = householder_qr(&w64);
        let qr_r = q.columns(0, rank) * r.rows(0, rank);
        assert!((&olora.b * &olora.a - qr_r).norm() < 1e-12 * w64.norm());
        assert!((&olora.residual + (&olora.b * &olora.a) * s - &w64).norm() < 1e-12 * w64.norm());
        let err = split(&w, out, inp, 21, s, BaseSplittingInit::Olora, "layer.q").unwrap_err();
        assert!(err.to_string().contains("layer.q: rank 21"), "{err}");
    }
}
