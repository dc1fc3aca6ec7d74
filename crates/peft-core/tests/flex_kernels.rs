//! The patched kernels of the vendored Flex backend (`vendor/README.md`)
//! against references: GELU and its derivative against the f64 formula,
//! row broadcasts against NdArray (which computes them element by element),
//! `exp` and softmax against f64, matrix products with a side of at most 16
//! (LoRA's rank) against f64, the linear layer's product-plus-bias kernel
//! and its gradients against f64, element-wise operations on shared
//! operands (written to a new buffer, in parallel) against f64, and the
//! mixed-batch kernel (each row through its own adapter's low-rank
//! factors) against f64.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use peft_core::compare::{check_close_slices, Tolerance};

fn values(t: Tensor<Flex, 1>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn gelu_f64(x: f64) -> (f64, f64) {
    let erf = erf_f64(x / std::f64::consts::SQRT_2);
    let value = 0.5 * x * (1.0 + erf);
    let slope = 0.5 * (1.0 + erf) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (value, slope)
}

/// erf in f64 to ~1e-15: the Maclaurin series for |x| < 3, the continued
/// fraction of erfc beyond.
fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        // erf(a) = 2/√π Σ (-1)^n a^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        for n in 1..200 {
            term *= -a * a / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = e^{-a²}/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

#[test]
fn flex_gelu_and_its_gradient_match_the_exact_formula() {
    let device = Default::default();
    let xs: Vec<f32> = (-60_000..=60_000).map(|i| i as f32 * 2e-4).collect();
    let n = xs.len();
    let x = Tensor::<Flex, 1>::from_data(TensorData::new(xs.clone(), [n]), &device);
    let (want, slope): (Vec<f32>, Vec<f32>) = xs
        .iter()
        .map(|&x| {
            let (v, s) = gelu_f64(x as f64);
            (v as f32, s as f32)
        })
        .unzip();
    let tol = Tolerance::new(0.0, 2e-6);
    // Not unique (the input is still held): written to a new buffer, and
    // the input must not be overwritten.
    check_close_slices("gelu", &values(gelu(x.clone())), &want, tol).unwrap();
    check_close_slices(
        "input kept",
        &values(x.clone()),
        &xs,
        Tolerance::new(0.0, 0.0),
    )
    .unwrap();
    // Unique: rewritten in place.
    let unique = Tensor::<Flex, 1>::from_data(TensorData::new(xs.clone(), [n]), &device);
    check_close_slices("gelu in place", &values(gelu(unique)), &want, tol).unwrap();

    let xa = Tensor::<Autodiff<Flex>, 1>::from_data(TensorData::new(xs.clone(), [n]), &device)
        .require_grad();
    let grads = gelu(xa.clone()).sum().backward();
    let g = xa
        .grad(&grads)
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    check_close_slices("gelu'", &g, &slope, tol).unwrap();

    let special = Tensor::<Flex, 1>::from_floats([-200.0, 200.0, f32::NAN], &device);
    let out = values(gelu(special));
    assert_eq!(&out[..2], &[0.0, 200.0]);
    assert!(out[2].is_nan(), "NaN must stay NaN: {out:?}");
}

/// `lhs [b, h, t, s]` with `rhs [b, 1, 1, s]` added, subtracted,
/// multiplied and divided on backend `B`.
fn row_ops<B: Backend>(lhs: &[f32], rhs: &[f32], [b, h, t, s]: [usize; 4]) -> [Vec<f32>; 4] {
    let d = Default::default();
    let l = Tensor::<B, 4>::from_data(TensorData::new(lhs.to_vec(), [b, h, t, s]), &d);
    let r =
        Tensor::<B, 2>::from_data(TensorData::new(rhs.to_vec(), [b, s]), &d).reshape([b, 1, 1, s]);
    [
        l.clone() + r.clone(),
        l.clone() - r.clone(),
        l.clone() * r.clone(),
        l / r,
    ]
    .map(|t| t.into_data().to_vec::<f32>().unwrap())
}

#[test]
fn flex_row_broadcasts_equal_ndarray() {
    let (b, h, t, s) = (3, 4, 5, 16);
    let lhs: Vec<f32> = (0..b * h * t * s)
        .map(|i| (i % 97) as f32 * 0.25 - 3.0)
        .collect();
    let rhs: Vec<f32> = (0..b * s).map(|i| (i % 13) as f32 * 0.5 + 0.5).collect();
    let shape = [b, h, t, s];
    let (f, n) = (
        row_ops::<Flex>(&lhs, &rhs, shape),
        row_ops::<NdArray>(&lhs, &rhs, shape),
    );
    for (op, (f, n)) in ["add", "sub", "mul", "div"].iter().zip(f.iter().zip(&n)) {
        check_close_slices(op, f, n, Tolerance::new(0.0, 0.0)).unwrap();
    }
    // A right operand whose outer dims are permuted: rows stay contiguous,
    // the outer strides are out of order.
    let d = Default::default();
    let l = Tensor::<Flex, 3>::from_data(TensorData::new(lhs.clone(), [b * h, t, s]), &d);
    let r = Tensor::<Flex, 3>::from_data(TensorData::new(lhs.clone(), [t, b * h, s]), &d)
        .swap_dims(0, 1);
    let dn = Default::default();
    let l_nd = Tensor::<NdArray, 3>::from_data(TensorData::new(lhs.clone(), [b * h, t, s]), &dn);
    let r_nd =
        Tensor::<NdArray, 3>::from_data(TensorData::new(lhs, [t, b * h, s]), &dn).swap_dims(0, 1);
    check_close_slices(
        "permuted rows",
        &(l + r).into_data().to_vec::<f32>().unwrap(),
        &(l_nd + r_nd).into_data().to_vec::<f32>().unwrap(),
        Tolerance::new(0.0, 0.0),
    )
    .unwrap();
}

#[test]
fn flex_exp_matches_f64_over_the_whole_range() {
    let device = Default::default();
    let mut xs: Vec<f32> = (-1_100_000..=900_000).map(|i| i as f32 * 1e-4).collect();
    xs.extend([
        88.7,
        88.72,
        88.8,
        100.0,
        -103.0,
        -110.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ]);
    let n = xs.len();
    let x = Tensor::<Flex, 1>::from_data(TensorData::new(xs.clone(), [n]), &device);
    let got = values(x.exp());
    for (&x, &got) in xs.iter().zip(&got) {
        let want = (x as f64).exp();
        if want > f32::MAX as f64 {
            assert_eq!(got, f32::INFINITY, "exp({x})");
        } else if want < f32::MIN_POSITIVE as f64 {
            // Subnormal results: within one subnormal step.
            assert!(
                (got as f64 - want).abs() <= 1.5e-45,
                "exp({x}) = {got}, want {want}"
            );
        } else {
            let rel = ((got as f64 - want) / want).abs();
            assert!(
                rel < 4e-7,
                "exp({x}) = {got}, want {want}: relative error {rel}"
            );
        }
    }
    let nan = values(Tensor::<Flex, 1>::from_floats([f32::NAN], &device).exp());
    assert!(nan[0].is_nan(), "NaN must stay NaN");
}

/// Softmax of each `row`-long row of `xs`, in f64.
fn softmax_f64(xs: &[f32], row: usize) -> Vec<f32> {
    xs.chunks(row)
        .flat_map(|r| {
            let max = r.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let sum: f64 = r.iter().map(|&x| (x as f64 - max).exp()).sum();
            r.iter()
                .map(move |&x| ((x as f64 - max).exp() / sum) as f32)
        })
        .collect()
}

#[test]
fn flex_softmax_matches_f64() {
    let device = Default::default();
    // Rows of 37 (not a multiple of the 16 lanes), a masked -1e30 entry in
    // each, 4,000 rows (several parallel tasks).
    let row = 37;
    let xs: Vec<f32> = (0..row * 4000)
        .map(|i| {
            if i % row == 5 {
                -1e30
            } else {
                ((i * 7919) % 1000) as f32 * 0.03 - 15.0
            }
        })
        .collect();
    let x = Tensor::<Flex, 2>::from_data(TensorData::new(xs.clone(), [4000, row]), &device);
    let got = burn::tensor::activation::softmax(x, 1)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let want = softmax_f64(&xs, row);
    check_close_slices("softmax", &got, &want, Tolerance::new(1e-6, 1e-9)).unwrap();
}

/// `x [a, b, c, d]` permuted by `axes`, then made contiguous by a reshape
/// to one dim, on backend `B`.
fn permuted_copy<B: Backend>(xs: &[f32], shape: [usize; 4], axes: [usize; 4]) -> Vec<f32> {
    let t = Tensor::<B, 4>::from_data(TensorData::new(xs.to_vec(), shape), &Default::default());
    t.permute(axes)
        .reshape([xs.len()])
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

#[test]
fn flex_strided_copies_equal_ndarray() {
    // Small (one thread) and large (blocks split across threads); inner
    // rows contiguous (heads merged back) and not (a transposed inner pair).
    for shape in [[3, 4, 5, 6], [16, 12, 32, 16]] {
        let n: usize = shape.iter().product();
        let xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
        for axes in [[0, 2, 1, 3], [0, 1, 3, 2], [2, 0, 3, 1], [1, 0, 2, 3]] {
            check_close_slices(
                &format!("{shape:?} permuted {axes:?}"),
                &permuted_copy::<Flex>(&xs, shape, axes),
                &permuted_copy::<NdArray>(&xs, shape, axes),
                Tolerance::new(0.0, 0.0),
            )
            .unwrap();
        }
    }
}

/// A `rows × cols` operand on Flex with the given layout: row-major,
/// transposed (stored as `cols × rows`), or a window (offset start, rows
/// two columns longer than it shows). Returns the tensor and its values in
/// logical row-major order.
fn operand(rows: usize, cols: usize, layout: &str, seed: usize) -> (Tensor<Flex, 2>, Vec<f32>) {
    let device = Default::default();
    let value = |i: usize| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0;
    let logical: Vec<f32> = (0..rows * cols).map(value).collect();
    let t = match layout {
        "row-major" => Tensor::from_data(TensorData::new(logical.clone(), [rows, cols]), &device),
        "transposed" => {
            let stored: Vec<f32> = (0..cols * rows)
                .map(|s| logical[(s % rows) * cols + s / rows])
                .collect();
            Tensor::<Flex, 2>::from_data(TensorData::new(stored, [cols, rows]), &device).transpose()
        }
        "window" => {
            let wide = cols + 2;
            let stored: Vec<f32> = (0..(rows + 1) * wide)
                .map(|s| match (s / wide, s % wide) {
                    (r, c) if r >= 1 && (1..=cols).contains(&c) => logical[(r - 1) * cols + c - 1],
                    _ => f32::NAN,
                })
                .collect();
            Tensor::<Flex, 2>::from_data(TensorData::new(stored, [rows + 1, wide]), &device)
                .slice([1..rows + 1, 1..cols + 1])
        }
        other => unreachable!("layout {other}"),
    };
    (t, logical)
}

#[test]
fn flex_skinny_matmuls_match_f64_in_every_layout() {
    // LoRA's shapes (x·A, (x·A)·B and the gradients' transposed operands)
    // with sides that are not multiples of the kernels' tiles (8 rows,
    // 32 columns, 16 lanes), plus a decode step (m = 1) and its tied LM
    // head, and products big enough to run on several threads.
    let shapes = [
        (2048, 384, 8),
        (2048, 8, 384),
        (384, 2048, 8),
        (8, 2048, 384),
        (203, 45, 13),
        (13, 45, 203),
        (203, 5, 77),
        (1, 576, 1531),
        (11, 17, 3),
        (3, 1, 70),
        // Few rows against a wide `b`: swept in bands of 16 rows of `b`
        // (k a multiple of the band or not; columns past the last tile).
        (16, 300, 1000),
        (5, 33, 530),
        (9, 64, 512),
        // Narrower than one vector: masked columns (x·A of rank 8 or 4 at
        // up to 16 rows, 8 + 4 + 1 rows, 17 columns = one vector + 1).
        (16, 576, 8),
        (13, 100, 4),
        (6, 40, 17),
    ];
    let layouts = ["row-major", "transposed", "window"];
    for (m, k, n) in shapes {
        for la in layouts {
            for lb in layouts {
                let (a, av) = operand(m, k, la, 1);
                let (b, bv) = operand(k, n, lb, 2);
                let got = a.matmul(b).into_data();
                assert_eq!(got.shape, vec![m, n].into(), "{m}×{k}×{n} {la}·{lb}: shape");
                let want: Vec<f32> = (0..m * n)
                    .map(|o| {
                        let (i, j) = (o / n, o % n);
                        (0..k)
                            .map(|t| av[i * k + t] as f64 * bv[t * n + j] as f64)
                            .sum::<f64>() as f32
                    })
                    .collect();
                // f32 sums of k products of magnitude ≤ 1: rounding grows
                // with √k; relative to the result's largest entry.
                check_close_slices(
                    &format!("{m}×{k}×{n} {la}·{lb}"),
                    &got.to_vec::<f32>().unwrap(),
                    &want,
                    Tolerance::new(1e-5, 1e-6),
                )
                .unwrap();
            }
        }
    }
}

#[test]
fn flex_row_low_rank_matches_f64() {
    // Three adapters of ranks 2, 8 and 5 (each its own scale) over groups
    // of `t` rows, some groups with none (index 0); factors in every layout
    // (the kernel copies views to row-major); `d_out` not a multiple of the
    // kernel's 16-column blocks; one thread (2 groups × 1 row) and several
    // (16 groups × 3 rows).
    let ranks = [2, 8, 5];
    let scales = [0.5f32, 2.0, -1.25];
    for (groups, t, d_in, d_out) in [(2, 1, 40, 70), (16, 3, 96, 150)] {
        for layout in ["row-major", "transposed", "window"] {
            let n = groups * t;
            let (x, xv) = operand(n, d_in, "row-major", 11);
            let (y, yv) = operand(n, d_out, layout, 12);
            let factors: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(j, &r)| {
                    (
                        operand(d_in, r, layout, 20 + j),
                        operand(r, d_out, layout, 30 + j),
                    )
                })
                .collect();
            let index: Vec<usize> = (0..groups).map(|g| [1, 0, 2, 3][g % 4]).collect();
            let pairs: Vec<_> = factors
                .iter()
                .zip(scales)
                .map(|(((a, _), (b, _)), s)| (a, b, s))
                .collect();
            let got = peft_core::fused::add_row_low_rank(&y, &x, &pairs, &index)
                .unwrap_or_else(|| panic!("{n} rows, {layout}: the kernel declined"));
            assert_eq!(got.dims(), [n, d_out], "{layout}: shape");
            let want: Vec<f32> = (0..n * d_out)
                .map(|o| {
                    let (i, c) = (o / d_out, o % d_out);
                    let j = index[i / t];
                    if j == 0 {
                        return yv[o];
                    }
                    let (((_, av), (_, bv)), r) = (&factors[j - 1], ranks[j - 1]);
                    let h = |q: usize| -> f64 {
                        (0..d_in)
                            .map(|k| xv[i * d_in + k] as f64 * av[k * r + q] as f64)
                            .sum()
                    };
                    let delta: f64 = (0..r).map(|q| h(q) * bv[q * d_out + c] as f64).sum();
                    (yv[o] as f64 + scales[j - 1] as f64 * delta) as f32
                })
                .collect();
            // Not a no-op: the deltas move the routed rows.
            let moved = want
                .iter()
                .zip(&yv)
                .map(|(w, y)| (w - y).abs())
                .fold(0.0, f32::max);
            assert!(moved > 0.1, "the deltas are too small to test: {moved}");
            check_close_slices(
                &format!("{n} rows {layout}"),
                &host(got),
                &want,
                Tolerance::new(1e-5, 1e-6),
            )
            .unwrap();
        }
    }
    // What the kernel does not take is left to the composed path: another
    // backend, factors that do not fit, an adapter index out of range.
    let (x, _) = operand(4, 10, "row-major", 1);
    let (y, _) = operand(4, 6, "row-major", 2);
    let (a, _) = operand(10, 2, "row-major", 3);
    let (b, _) = operand(2, 6, "row-major", 4);
    let (wrong, _) = operand(3, 6, "row-major", 5);
    let fused = |pairs: &[(&Tensor<Flex, 2>, &Tensor<Flex, 2>, f32)], index: &[usize]| {
        peft_core::fused::add_row_low_rank(&y, &x, pairs, index).is_some()
    };
    assert!(fused(&[(&a, &b, 1.0)], &[1, 0]));
    assert!(!fused(&[(&a, &wrong, 1.0)], &[1, 0]), "rank 2 · rank 3");
    assert!(!fused(&[(&a, &b, 1.0)], &[2, 0]), "index past the adapters");
    assert!(!fused(&[(&a, &b, 1.0)], &[1, 0, 1]), "4 rows in 3 groups");
    let nd = Default::default();
    let zeros = |r: usize, c: usize| Tensor::<NdArray, 2>::zeros([r, c], &nd);
    let (nx, ny, na, nb) = (zeros(4, 10), zeros(4, 6), zeros(10, 2), zeros(2, 6));
    assert!(peft_core::fused::add_row_low_rank(&ny, &nx, &[(&na, &nb, 1.0)], &[1, 0]).is_none());
}

/// `a · b (+ bias)` in f64 from logical row-major values.
fn product_f64(
    av: &[f32],
    bv: &[f32],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    (0..m * n)
        .map(|o| {
            let (i, j) = (o / n, o % n);
            let dot: f64 = (0..k)
                .map(|t| av[i * k + t] as f64 * bv[t * n + j] as f64)
                .sum();
            (dot + bias.map_or(0.0, |b| b[j] as f64)) as f32
        })
        .collect()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn flex_linear_with_bias_matches_f64_in_every_layout() {
    // One thread (under 192³ multiply-adds) and several; sides that are not
    // multiples of gemm's tiles. The bias is a vector or a window of one.
    let device = Default::default();
    let layouts = ["row-major", "transposed", "window"];
    for (m, k, n) in [(203, 45, 77), (300, 200, 130)] {
        for la in layouts {
            for lb in layouts {
                let (x, xv) = operand(m, k, la, 3);
                let (w, wv) = operand(k, n, lb, 4);
                let (wide, bv) = operand(2, n, lb, 5);
                let bias = wide.slice([1..2, 0..n]).reshape([n]);
                let got = peft_core::fused::linear_fused(&x, &w, &bias)
                    .unwrap_or_else(|| panic!("{m}×{k}×{n} {la}·{lb}: the kernel declined"));
                assert_eq!(got.dims(), [m, n], "{m}×{k}×{n} {la}·{lb}: shape");
                check_close_slices(
                    &format!("linear {m}×{k}×{n} {la}·{lb}"),
                    &host(got),
                    &product_f64(&xv, &wv, Some(&bv[n..]), (m, k, n)),
                    Tolerance::new(1e-5, 1e-6),
                )
                .unwrap();
            }
        }
    }
    // LoRA-rank and single-row products are Flex's skinny kernels' (the
    // kernel declines them), and other backends compose: `linear` still
    // adds the bias.
    for (m, k, n) in [(64, 8, 40), (1, 40, 64), (40, 64, 8)] {
        let (x, xv) = operand(m, k, "row-major", 6);
        let (w, wv) = operand(k, n, "row-major", 7);
        let bias = Tensor::<Flex, 1>::from_data(TensorData::new(wv[..n].to_vec(), [n]), &device);
        assert!(
            peft_core::fused::linear_fused(&x, &w, &bias).is_none(),
            "{m}×{k}×{n}"
        );
        let got = host(peft_core::fused::linear(x, &w, Some(&bias)));
        let want = product_f64(&xv, &wv, Some(&wv[..n]), (m, k, n));
        check_close_slices(
            &format!("composed {m}×{k}×{n}"),
            &got,
            &want,
            Tolerance::new(1e-5, 1e-6),
        )
        .unwrap();
    }
    let nd_device = Default::default();
    let nd = |v: &[f32], shape: [usize; 2]| {
        Tensor::<NdArray, 2>::from_data(TensorData::new(v.to_vec(), shape), &nd_device)
    };
    let b = Tensor::<NdArray, 1>::zeros([64], &nd_device);
    assert!(peft_core::fused::linear_fused(
        &nd(&[0.5; 64 * 40], [64, 40]),
        &nd(&[0.5; 40 * 64], [40, 64]),
        &b
    )
    .is_none());
}

#[test]
fn flex_linear_with_bias_gradients_match_f64() {
    type A = Autodiff<Flex>;
    let device = Default::default();
    let (m, k, n) = (150, 90, 70);
    let value = |i: usize, seed: usize| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0;
    let data = |len: usize, seed: usize| (0..len).map(|i| value(i, seed)).collect::<Vec<f32>>();
    let (xv, wv, bv, gv) = (data(m * k, 1), data(k * n, 2), data(n, 3), data(m * n, 4));
    let tensor = |v: &[f32], shape: [usize; 2]| {
        Tensor::<A, 2>::from_data(TensorData::new(v.to_vec(), shape), &device)
    };
    let upstream = tensor(&gv, [m, n]);
    // dx = g·wᵀ, dw = xᵀ·g, db = Σ_rows g (f64).
    let transpose = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        (0..rows * cols)
            .map(|o| v[(o % rows) * cols + o / rows])
            .collect()
    };
    let dx = product_f64(&gv, &transpose(&wv, k, n), None, (m, n, k));
    let dw = product_f64(&transpose(&xv, m, k), &gv, None, (k, m, n));
    let db: Vec<f32> = (0..n)
        .map(|j| (0..m).map(|i| gv[i * n + j] as f64).sum::<f64>() as f32)
        .collect();
    let tol = Tolerance::new(1e-5, 0.0);
    for tracked in [
        [true, true, true],
        [true, false, false],
        [false, true, true],
    ] {
        let track = |t: Tensor<A, 2>, on: bool| if on { t.require_grad() } else { t };
        let x = track(tensor(&xv, [m, k]), tracked[0]);
        let w = track(tensor(&wv, [k, n]), tracked[1]);
        let b = Tensor::<A, 1>::from_data(TensorData::new(bv.clone(), [n]), &device);
        let b = if tracked[2] { b.require_grad() } else { b };
        let y = peft_core::fused::linear_fused(&x, &w, &b).expect("the kernel takes these shapes");
        check_close_slices(
            "forward",
            &host(y.clone()),
            &product_f64(&xv, &wv, Some(&bv), (m, k, n)),
            tol,
        )
        .unwrap();
        let grads = (y * upstream.clone()).sum().backward();
        let what = format!("tracked {tracked:?}");
        match x.grad(&grads) {
            Some(g) if tracked[0] => {
                check_close_slices(&format!("{what}: dx"), &host(g), &dx, tol).unwrap()
            }
            None if !tracked[0] => 0.0,
            g => panic!("{what}: dx {:?}", g.map(|g| g.dims())),
        };
        match w.grad(&grads) {
            Some(g) if tracked[1] => {
                check_close_slices(&format!("{what}: dw"), &host(g), &dw, tol).unwrap()
            }
            None if !tracked[1] => 0.0,
            g => panic!("{what}: dw {:?}", g.map(|g| g.dims())),
        };
        match b.grad(&grads) {
            Some(g) if tracked[2] => {
                check_close_slices(&format!("{what}: db"), &host(g), &db, tol).unwrap()
            }
            None if !tracked[2] => 0.0,
            g => panic!("{what}: db {:?}", g.map(|g| g.dims())),
        };
    }
}

#[test]
fn flex_elementwise_ops_on_shared_operands_match_f64() {
    // Above and below the parallel thresholds (128 K elements; 128 K for
    // the shared-operand path); a length that is no multiple of the chunks.
    let device = Default::default();
    for len in [1000usize, 131_072 + 37, 786_432] {
        let a: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..len)
            .map(|i| ((i * 104_729) % 1999) as f32 / 1000.0 + 0.5)
            .collect();
        let t =
            |v: &[f32]| Tensor::<Flex, 1>::from_data(TensorData::new(v.to_vec(), [len]), &device);
        type Op = fn(f64, f64) -> f64;
        let ops: [(&str, Op); 4] = [
            ("add", |x, y| x + y),
            ("sub", |x, y| x - y),
            ("mul", |x, y| x * y),
            ("div", |x, y| x / y),
        ];
        for (name, f) in ops {
            let want: Vec<f32> = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f(x as f64, y as f64) as f32)
                .collect();
            let run = |lhs: Tensor<Flex, 1>, rhs: Tensor<Flex, 1>| match name {
                "add" => lhs + rhs,
                "sub" => lhs - rhs,
                "mul" => lhs * rhs,
                _ => lhs / rhs,
            };
            let tol = Tolerance::new(1e-6, 0.0);
            // lhs unique: in place.
            check_close_slices(
                &format!("{name} {len} in place"),
                &values(run(t(&a), t(&b))),
                &want,
                tol,
            )
            .unwrap();
            // lhs shared: a new buffer, lhs left as it was.
            let lhs = t(&a);
            let got = values(run(lhs.clone(), t(&b)));
            check_close_slices(&format!("{name} {len} shared"), &got, &want, tol).unwrap();
            check_close_slices(
                &format!("{name} {len} lhs kept"),
                &values(lhs),
                &a,
                Tolerance::new(0.0, 0.0),
            )
            .unwrap();
        }
    }
}

/// Attention's softmax with statistics (`exp_fast::softmax_rows_stats_inplace`
/// and its recomputation from the statistics in the backward pass) at every
/// row length from 1 to 40 and at 55, 64, 128: whole 16-lane vectors, a
/// masked tail, or both. Against f64; the recomputation must equal the
/// forward's probabilities bit for bit (the backward pass relies on it).
#[test]
fn flex_attention_softmax_rows_match_f64_at_every_tail_length() {
    use burn_flex::ops::exp_fast::{softmax_rows_from_stats_inplace, softmax_rows_stats_inplace};
    let rows = 7;
    for len in (1..=40).chain([55, 64, 128]) {
        let scores: Vec<f32> = (0..rows * len)
            .map(|i| match (i % len, i / len) {
                // A masked key (BERT's padding) in rows of more than two.
                (1, _) if len > 2 => -1e30,
                (_, r) => ((i * 7919 + r) % 1000) as f32 * 0.02 - 10.0,
            })
            .collect();
        let mut probs = scores.clone();
        let mut stats = vec![[0.0f32; 2]; rows];
        softmax_rows_stats_inplace(&mut probs, len, &mut stats);
        let want = softmax_f64(&scores, len);
        check_close_slices(
            &format!("softmax rows of {len}"),
            &probs,
            &want,
            Tolerance::new(1e-6, 1e-9),
        )
        .unwrap();
        let mut again = scores.clone();
        softmax_rows_from_stats_inplace(&mut again, len, &stats);
        let same = again
            .iter()
            .zip(&probs)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "rows of {len}: recomputed from the statistics, the probabilities differ"
        );
    }
    // NaN in a row makes that row NaN and leaves the next one alone.
    let len = 21;
    let mut x: Vec<f32> = (0..2 * len).map(|i| i as f32 * 0.1).collect();
    x[len - 1] = f32::NAN;
    let mut stats = vec![[0.0f32; 2]; 2];
    softmax_rows_stats_inplace(&mut x, len, &mut stats);
    assert!(
        x[..len].iter().all(|v| v.is_nan()),
        "a NaN score must poison its row"
    );
    assert!(
        x[len..].iter().all(|v| v.is_finite()),
        "the next row must stay finite"
    );
}
