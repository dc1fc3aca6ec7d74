//! Fused scaled-dot-product attention for f32: the forward pass and its
//! gradient, one (batch, head) pair per task. peft-rs patch (see
//! `vendor/README.md` in the peft-rs workspace), called by `peft-models`'
//! `attend` for `Flex` and `Autodiff<Flex>`.
//!
//! Burn composes attention from tensor ops: on BERT-sized inputs every one
//! of them (scale, mask, max, exp, sum, divide, and as many again backward)
//! is a pass over the `[b, h, t, s]` scores, ~12 MB at 16 × 128, twice the
//! L2 cache. Here a block of `BLOCK` query rows is scored, masked and
//! normalised while it is in cache; the backward pass recomputes the
//! probabilities from the scores and each row's stored maximum and sum (as
//! FlashAttention does) instead of keeping them.
//!
//! Layouts: `q: [b, h, t, dh]`, `k: [b, h, s, dh]`, `v: [b, h, s, dv]`, an
//! optional additive `bias` broadcastable to `[b, h, t, s]`, any
//! non-negative strides. Outputs and gradients are `[b, h, t, d]` tensors
//! stored as `[b, t, h, d]`, so that merging heads afterwards is free.
//!
//! Padded batches: with an [`Extent`] per batch row, only that row's real
//! query rows and key columns are computed. A right-padded batch of
//! sentences of mean length 27 padded to 52 spends most of its attention
//! work on padding otherwise.

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::DType;
use burn_std::{Bytes, Shape};

use crate::ops::exp_fast::{softmax_rows_from_stats_inplace, softmax_rows_stats_inplace};
use crate::{FlexTensor, Layout};

/// Query rows scored at a time: 64 rows × 128 keys is 32 KB.
const BLOCK: usize = 64;

/// The real part of one batch row: query rows `0..queries` and key columns
/// `0..keys`, the rest padding. Skipping the padding is exact under the
/// caller's promise that the bias masks every key column past `keys` for
/// the real query rows (weight `exp(-1e30) = 0`), and that the outputs of
/// query rows past `queries` are dropped: they are written as zeros, and
/// [`backward`] treats their upstream gradient as zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Real query rows, at the start of the row's `t`.
    pub queries: usize,
    /// Real key columns, at the start of the row's `s` (cached or prefix
    /// keys included).
    pub keys: usize,
}

/// A 4-D f32 operand read through its strides.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: isize,
    shape: [usize; 4],
    strides: [isize; 4],
}

impl<'a> View<'a> {
    fn of(t: &'a FlexTensor) -> Option<Self> {
        let l = t.layout();
        if t.dtype() != DType::F32 || l.num_dims() != 4 || l.strides().iter().any(|&s| s < 0) {
            return None;
        }
        let dims = l.shape();
        let shape = [dims[0], dims[1], dims[2], dims[3]];
        let mut strides = [0isize; 4];
        for (i, s) in strides.iter_mut().enumerate() {
            // A size-1 dim is broadcast: stride 0 reads its one entry.
            *s = if shape[i] == 1 { 0 } else { l.strides()[i] };
        }
        Some(Self {
            data: t.storage::<f32>(),
            offset: l.start_offset() as isize,
            shape,
            strides,
        })
    }

    /// Element `(b, h, row, 0)`.
    fn at(&self, b: usize, h: usize, row: usize) -> *const f32 {
        let off = self.offset
            + b as isize * self.strides[0]
            + h as isize * self.strides[1]
            + row as isize * self.strides[2];
        // SAFETY: the indices are within the tensor's shape (or broadcast
        // with stride 0), so the offset is within its storage.
        unsafe { self.data.as_ptr().offset(off) }
    }

    fn row_stride(&self) -> isize {
        self.strides[2]
    }

    fn col_stride(&self) -> isize {
        self.strides[3]
    }
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes only its own (batch, head)'s elements.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `dst (m × n, row stride dst_rs) ← [dst +] scale · lhs · rhs`, one thread.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    scale: f32,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// An uninitialised `[b, h, rows, d]` f32 buffer laid out `[b, rows, h, d]`.
fn heads_major(b: usize, h: usize, rows: usize, d: usize) -> (Vec<f32>, Layout) {
    // The kernels write every element.
    let data = crate::ops::uninit::<f32>(b * h * rows * d);
    let strides = vec![(rows * h * d) as isize, d as isize, (h * d) as isize, 1];
    (
        data,
        Layout::new(Shape::from(vec![b, h, rows, d]), strides, 0),
    )
}

struct Dims {
    b: usize,
    h: usize,
    t: usize,
    s: usize,
    dh: usize,
    dv: usize,
}

/// Each batch row's extent: `extents` checked against the shapes, or the
/// whole row when there are none. `None` when they do not fit.
fn extents_of(d: &Dims, extents: Option<&[Extent]>) -> Option<Vec<Extent>> {
    let whole = Extent {
        queries: d.t,
        keys: d.s,
    };
    match extents {
        None => Some(vec![whole; d.b]),
        Some(e) => {
            let fits = e.len() == d.b
                && e.iter()
                    .all(|e| e.queries <= d.t && e.keys <= d.s && (e.keys > 0 || e.queries == 0));
            fits.then(|| e.to_vec())
        }
    }
}

/// Writes zeros into rows `from..rows` of head `hi` of batch row `bi` of a
/// `[b, h, rows, d]` buffer stored `[b, rows, h, d]`.
///
/// # Safety
/// `out` addresses such a buffer, and no other task writes those rows.
unsafe fn zero_rows(out: Out, bi: usize, hi: usize, h: usize, rows: usize, d: usize, from: usize) {
    for r in from..rows {
        // SAFETY: row r of head hi lies within the buffer (see above).
        unsafe {
            core::ptr::write_bytes(out.0.add(((bi * rows + r) * h + hi) * d), 0, d);
        }
    }
}

fn dims(q: &View, k: &View, v: &View, bias: Option<&View>) -> Option<Dims> {
    let [b, h, t, dh] = q.shape;
    let s = k.shape[2];
    let dv = v.shape[3];
    let ok = k.shape == [b, h, s, dh]
        && v.shape == [b, h, s, dv]
        && t > 0
        && s > 0
        && dh > 0
        && dv > 0
        && bias.is_none_or(|m| {
            (m.shape[0] == 1 || m.shape[0] == b)
                && (m.shape[1] == 1 || m.shape[1] == h)
                && (m.shape[2] == 1 || m.shape[2] == t)
                && (m.shape[3] == 1 || m.shape[3] == s)
        });
    ok.then_some(Dims { b, h, t, s, dh, dv })
}

/// Scores of query rows `q0..q0 + rows` of one head against its first
/// `cols` keys into `buf` (`rows × cols`): `scale · q kᵀ + bias`.
#[allow(clippy::too_many_arguments)]
fn scores(
    buf: &mut [f32],
    q: &View,
    k: &View,
    bias: Option<&View>,
    d: &Dims,
    bi: usize,
    hi: usize,
    q0: usize,
    rows: usize,
    cols: usize,
    scale: f32,
) {
    // SAFETY: `buf` holds rows × cols, cols ≤ s; the operands' strides
    // describe them.
    unsafe {
        gemm(
            rows,
            cols,
            d.dh,
            buf.as_mut_ptr(),
            cols as isize,
            false,
            q.at(bi, hi, q0),
            q.row_stride(),
            q.col_stride(),
            k.at(bi, hi, 0),
            k.col_stride(),
            k.row_stride(),
            scale,
        );
    }
    if let Some(m) = bias {
        let step = m.col_stride();
        for (r, row) in buf.chunks_exact_mut(cols).enumerate() {
            let p = m.at(bi, hi, q0 + r);
            if step == 1 {
                // SAFETY: the bias row has s ≥ cols elements at unit stride.
                let add = unsafe { core::slice::from_raw_parts(p, cols) };
                for (x, a) in row.iter_mut().zip(add) {
                    *x += a;
                }
            } else {
                for (j, x) in row.iter_mut().enumerate() {
                    // SAFETY: j < cols ≤ s along the bias's last dim (or stride 0).
                    *x += unsafe { *p.offset(j as isize * step) };
                }
            }
        }
    }
}

fn for_each_head(b: usize, h: usize, task: impl Fn(usize, usize) + Send + Sync) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        (0..b * h)
            .into_par_iter()
            .for_each(|bh| task(bh / h, bh % h));
    }
    #[cfg(not(feature = "rayon"))]
    for bh in 0..b * h {
        task(bh / h, bh % h);
    }
}

/// `softmax(scale · q kᵀ + bias) · v`: the output `[b, h, t, dv]` (stored
/// `[b, t, h, dv]`) and each query row's softmax statistics `[b, h, t, 2]`
/// (maximum score, inverse sum), which [`backward`] needs; with `extents`,
/// only each batch row's real part (padded query rows get zeros). `None`
/// when the operands are not f32 4-D tensors with non-negative strides and
/// matching shapes, or the extents do not fit them: the caller composes
/// attention from tensor ops instead.
pub fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: Option<&FlexTensor>,
    scale: f32,
    extents: Option<&[Extent]>,
) -> Option<(FlexTensor, FlexTensor)> {
    let (qv, kv, vv) = (View::of(q)?, View::of(k)?, View::of(v)?);
    let mv = match bias {
        Some(m) => Some(View::of(m)?),
        None => None,
    };
    let d = dims(&qv, &kv, &vv, mv.as_ref())?;
    let extents = extents_of(&d, extents)?;
    let (mut out, out_layout) = heads_major(d.b, d.h, d.t, d.dv);
    let mut stats = vec![0.0f32; d.b * d.h * d.t * 2];
    let (out_ptr, stats_ptr) = (Out(out.as_mut_ptr()), Out(stats.as_mut_ptr()));
    for_each_head(d.b, d.h, |bi, hi| {
        let (out_ptr, stats_ptr) = (out_ptr, stats_ptr);
        let Extent { queries, keys } = extents[bi];
        let mut buf = vec![0.0f32; BLOCK.min(queries) * keys];
        for q0 in (0..queries).step_by(BLOCK) {
            let rows = BLOCK.min(queries - q0);
            let block = &mut buf[..rows * keys];
            scores(block, &qv, &kv, mv.as_ref(), &d, bi, hi, q0, rows, keys, scale);
            // SAFETY: this head's statistics rows, written by this task only.
            let stats_rows = unsafe {
                let first = stats_ptr.0.add(((bi * d.h + hi) * d.t + q0) * 2);
                core::slice::from_raw_parts_mut(first.cast::<[f32; 2]>(), rows)
            };
            softmax_rows_stats_inplace(block, keys, stats_rows);
            // SAFETY: output rows (bi, q0.., hi, ·), written by this task only.
            unsafe {
                gemm(
                    rows,
                    d.dv,
                    keys,
                    out_ptr.0.add(((bi * d.t + q0) * d.h + hi) * d.dv),
                    (d.h * d.dv) as isize,
                    false,
                    block.as_ptr(),
                    keys as isize,
                    1,
                    vv.at(bi, hi, 0),
                    vv.row_stride(),
                    vv.col_stride(),
                    1.0,
                );
            }
        }
        // SAFETY: this head's padded output rows, written by this task only.
        unsafe { zero_rows(out_ptr, bi, hi, d.h, d.t, d.dv, queries) };
    });
    let out = FlexTensor::new(Bytes::from_elems(out), out_layout, DType::F32);
    let stats = FlexTensor::new(
        Bytes::from_elems(stats),
        Layout::contiguous(Shape::from(vec![d.b, d.h, d.t, 2])),
        DType::F32,
    );
    Some((out, stats))
}

/// Gradients of [`forward`]'s output with respect to `q`, `k` and `v`,
/// given the upstream gradient `grad` (`[b, h, t, dv]`, any non-negative
/// strides) and forward's `out` and `stats`, for the `extents` forward
/// took: padded query rows send back nothing and get a zero gradient, as
/// do padded key columns. The bias gets no gradient. `None` under the same
/// conditions as [`forward`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: Option<&FlexTensor>,
    scale: f32,
    extents: Option<&[Extent]>,
    out: &FlexTensor,
    stats: &FlexTensor,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let (qv, kv, vv) = (View::of(q)?, View::of(k)?, View::of(v)?);
    let mv = match bias {
        Some(m) => Some(View::of(m)?),
        None => None,
    };
    let d = dims(&qv, &kv, &vv, mv.as_ref())?;
    let extents = extents_of(&d, extents)?;
    let (ov, gv) = (View::of(out)?, View::of(grad)?);
    let stats = stats.to_contiguous();
    if ov.shape != [d.b, d.h, d.t, d.dv] || gv.shape != ov.shape {
        return None;
    }
    let stats: &[f32] = &stats.storage::<f32>()[..d.b * d.h * d.t * 2];
    let stats: &[[f32; 2]] = bytemuck::cast_slice(stats);
    let (mut dq, dq_layout) = heads_major(d.b, d.h, d.t, d.dh);
    let (mut dk, dk_layout) = heads_major(d.b, d.h, d.s, d.dh);
    let (mut dvv, dv_layout) = heads_major(d.b, d.h, d.s, d.dv);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Out(dq.as_mut_ptr()),
        Out(dk.as_mut_ptr()),
        Out(dvv.as_mut_ptr()),
    );
    for_each_head(d.b, d.h, |bi, hi| {
        let (dq_ptr, dk_ptr, dv_ptr) = (dq_ptr, dk_ptr, dv_ptr);
        let Extent { queries, keys } = extents[bi];
        let cap = BLOCK.min(queries) * keys;
        let (mut p, mut ds) = (vec![0.0f32; cap], vec![0.0f32; cap]);
        let head_stats = &stats[(bi * d.h + hi) * d.t..][..d.t];
        for q0 in (0..queries).step_by(BLOCK) {
            let rows = BLOCK.min(queries - q0);
            let first = q0 == 0;
            let (p, ds) = (&mut p[..rows * keys], &mut ds[..rows * keys]);
            // P, recomputed from the scores and the forward's log-sum-exp.
            scores(p, &qv, &kv, mv.as_ref(), &d, bi, hi, q0, rows, keys, scale);
            softmax_rows_from_stats_inplace(p, keys, &head_stats[q0..q0 + rows]);
            let g = gv.at(bi, hi, q0);
            // SAFETY: the pointers address this head's rows; each output
            // element belongs to this task only.
            unsafe {
                // dV (+)= Pᵀ · dO
                gemm(
                    keys,
                    d.dv,
                    rows,
                    dv_ptr.0.add((bi * d.s * d.h + hi) * d.dv),
                    (d.h * d.dv) as isize,
                    !first,
                    p.as_ptr(),
                    1,
                    keys as isize,
                    g,
                    gv.row_stride(),
                    gv.col_stride(),
                    1.0,
                );
                // dP = dO · Vᵀ
                gemm(
                    rows,
                    keys,
                    d.dv,
                    ds.as_mut_ptr(),
                    keys as isize,
                    false,
                    g,
                    gv.row_stride(),
                    gv.col_stride(),
                    vv.at(bi, hi, 0),
                    vv.col_stride(),
                    vv.row_stride(),
                    1.0,
                );
            }
            // dS = scale · P ⊙ (dP − rowsum(dO ⊙ O))
            for r in 0..rows {
                let (o, gr) = (ov.at(bi, hi, q0 + r), gv.at(bi, hi, q0 + r));
                let mut dot = 0.0f32;
                for c in 0..d.dv as isize {
                    // SAFETY: c < dv along both rows.
                    unsafe {
                        dot += *o.offset(c * ov.col_stride()) * *gr.offset(c * gv.col_stride())
                    };
                }
                let (pr, dr) = (&p[r * keys..][..keys], &mut ds[r * keys..][..keys]);
                for (x, &pv) in dr.iter_mut().zip(pr) {
                    *x = scale * pv * (*x - dot);
                }
            }
            unsafe {
                // dQ = dS · K
                gemm(
                    rows,
                    d.dh,
                    keys,
                    dq_ptr.0.add(((bi * d.t + q0) * d.h + hi) * d.dh),
                    (d.h * d.dh) as isize,
                    false,
                    ds.as_ptr(),
                    keys as isize,
                    1,
                    kv.at(bi, hi, 0),
                    kv.row_stride(),
                    kv.col_stride(),
                    1.0,
                );
                // dK (+)= dSᵀ · Q
                gemm(
                    keys,
                    d.dh,
                    rows,
                    dk_ptr.0.add((bi * d.s * d.h + hi) * d.dh),
                    (d.h * d.dh) as isize,
                    !first,
                    ds.as_ptr(),
                    1,
                    keys as isize,
                    qv.at(bi, hi, q0),
                    qv.row_stride(),
                    qv.col_stride(),
                    1.0,
                );
            }
        }
        // Padding's gradients, and every key's when no query row is real
        // (the loop above wrote nothing then).
        let first_unwritten = if queries == 0 { 0 } else { keys };
        // SAFETY: this head's rows, written by this task only.
        unsafe {
            zero_rows(dq_ptr, bi, hi, d.h, d.t, d.dh, queries);
            zero_rows(dk_ptr, bi, hi, d.h, d.s, d.dh, first_unwritten);
            zero_rows(dv_ptr, bi, hi, d.h, d.s, d.dv, first_unwritten);
        }
    });
    let wrap =
        |data: Vec<f32>, layout| FlexTensor::new(Bytes::from_elems(data), layout, DType::F32);
    Some((
        wrap(dq, dq_layout),
        wrap(dk, dk_layout),
        wrap(dvv, dv_layout),
    ))
}
