//! f32 matrix products with one side of at most [`SMALL`]: LoRA's
//! `x·A` (`n` = rank), `(x·A)·B` (`k` = rank) and their gradients
//! (`m` = rank). peft-rs patch (see `vendor/README.md` in the peft-rs
//! workspace). `gemm` packs the long operand into 64-row panels and runs
//! 6-column micro-kernels, so a rank-8 product spends most of its time
//! packing and in edge kernels. Measured on two Sapphire Rapids cores
//! (medians of 30): 2048×384×8 0.44 ms in `gemm`, 0.20 ms here; its
//! gradient 384×2048×8 (left operand transposed) 0.53 vs 0.22 ms; a decode
//! step's tied LM head 1×576×49152 (right operand transposed) 8.6–11.7 vs
//! 3.2–3.9 ms; the others within noise of `gemm`.
//!
//! Two loop shapes, each vectorised along a contiguous run:
//! - *rows as sums* (`out[i, :] = Σ_k a[i, k] · b[k, :]`, `b`'s rows
//!   contiguous): when `k` or `m` is small. With few rows of `a` and long
//!   rows of `b` (a decode step's `m` ≤ 16 against a weight), each thread
//!   sweeps its share of `b`'s columns a band of [`x86::K_BAND`] rows at a
//!   time, prefetching the next band, so `b` streams row by row instead of
//!   being walked one 32-column strip down all `k` rows (a strip's rows are
//!   a page apart, which the hardware prefetchers do not follow).
//!   SmolLM2's products at 16 rows on two Xeon cores (medians of 40, 64
//!   distinct weights, so none is cached): 16×576×1536 0.87 → 0.28 ms,
//!   16×1536×576 0.81 → 0.46, 16×576×576 0.29 → 0.19; one row
//!   1×1536×576 0.44 → 0.22 (`gemm`: 0.63, 0.67, 0.22, 0.29);
//! - *dot products* (`out[i, j] = a[i, :] · b[j, :]`, both rows
//!   contiguous): when `n` (or `m`) is small and the shared length `k` is
//!   long. The small operand is packed first (at most `SMALL · k` values).
//!
//! Operand layouts that fit neither are packed or transposed into one that
//! does; a product with every side above `SMALL` stays with `gemm`.

use crate::FlexTensor;

/// The largest side this path takes.
pub const SMALL: usize = 16;

/// `lhs · rhs` when one side is at most [`SMALL`], the CPU has AVX2 or
/// AVX-512 and the layouts fit one of the loop shapes; `None` leaves the
/// product to `gemm` (always, off x86).
pub fn try_matmul(lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    return x86::try_matmul(lhs, rhs);
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        let _ = (lhs, rhs);
        None
    }
}

/// The kernels, written over x86's vector registers.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86 {
    use alloc::vec;
    use alloc::vec::Vec;

    use super::SMALL;
    use crate::FlexTensor;

    /// Columns per task when the rows are few: 256 columns of at most 16 rows
    /// stay in L1 while `k` rows of the other operand stream past.
    const COLUMN_BLOCK: usize = 256;

    /// Rows per task when the rows are many.
    const ROW_BLOCK: usize = 64;

    /// Work (m·n·k) below which one thread does it all.
    const PARALLEL_WORK: usize = 1 << 18;

    /// Rows of `b` per band of a sweep (see the module documentation): a
    /// band of a thread's columns stays in L1 for `a`'s second row tile.
    pub(super) const K_BAND: usize = 16;

    /// Columns of `b` from which few rows of `a` sweep `b` in bands (below
    /// it the strips are short enough, and more of them keep every thread
    /// busy: 16×576×192 0.044 ms in strips, 0.067 in bands).
    const SWEEP_COLUMNS: usize = 512;

    /// A strided f32 matrix (rows and columns may have any stride).
    #[derive(Clone, Copy)]
    struct View {
        ptr: *const f32,
        rs: isize,
        cs: isize,
    }

    // SAFETY: views only read, from tensors that outlive the product.
    unsafe impl Send for View {}
    unsafe impl Sync for View {}

    impl View {
        #[inline(always)]
        unsafe fn at(&self, i: usize, j: usize) -> f32 {
            unsafe { *self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
        }

        /// Row `i`, `len` values; the columns must be contiguous.
        #[inline(always)]
        unsafe fn row(&self, i: usize, len: usize) -> &[f32] {
            unsafe { core::slice::from_raw_parts(self.ptr.offset(i as isize * self.rs), len) }
        }

        fn transposed(self) -> View {
            View {
                ptr: self.ptr,
                rs: self.cs,
                cs: self.rs,
            }
        }

        /// A contiguous row-major copy of the `rows × cols` matrix.
        fn packed(&self, rows: usize, cols: usize) -> Vec<f32> {
            let mut out = Vec::with_capacity(rows * cols);
            for i in 0..rows {
                // SAFETY: (i, j) lies inside the viewed tensor.
                out.extend((0..cols).map(|j| unsafe { self.at(i, j) }));
            }
            out
        }

        /// Row-major `data` with rows `rs` apart.
        fn rows(data: &[f32], rs: usize) -> View {
            View {
                ptr: data.as_ptr(),
                rs: rs as isize,
                cs: 1,
            }
        }
    }

    /// Which loops a product runs, by its sizes and operand layouts.
    enum Plan {
        /// `b`'s rows contiguous, `k` or `m` small.
        SumsOfRows,
        /// `k` small, `b` packed row-major first.
        SumsOfPackedRows,
        /// `n` small, `a`'s rows contiguous: `b`'s columns packed, then dots.
        DotsWithPackedColumns,
        /// `n` small, `a`'s columns contiguous: `outᵀ = bᵀ · aᵀ` as sums.
        TransposedSums,
        /// `m` small, `b`'s columns contiguous: `a` packed, then dots.
        DotsWithColumns,
    }

    /// A raw output pointer shared by tasks that write disjoint elements.
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: every task writes its own rows or columns only.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}

    /// `lhs · rhs` when one side is at most [`SMALL`] and the layouts fit one
    /// of the loop shapes; `None` leaves the product to `gemm`.
    pub(super) fn try_matmul(lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
        let (ls, rs_) = (lhs.layout().shape(), rhs.layout().shape());
        let (m, k, n) = (ls[0], ls[1], rs_[1]);
        if m.min(n).min(k) > SMALL || m * n * k == 0 {
            return None;
        }
        let isa = isa()?;
        let view = |t: &FlexTensor, rows: usize, cols: usize| {
            let s = t.layout().strides();
            let data: &[f32] = t.storage();
            View {
                // SAFETY: the layout's start offset lies inside the storage.
                ptr: unsafe { data.as_ptr().add(t.layout().start_offset()) },
                // A side of one has no meaningful stride: call it contiguous.
                rs: if rows == 1 { cols as isize } else { s[0] },
                cs: if cols == 1 { 1 } else { s[1] },
            }
        };
        let (a, b) = (view(lhs, m, k), view(rhs, k, n));
        let plan = if b.cs == 1 && (k <= SMALL || m <= SMALL) {
            Plan::SumsOfRows
        } else if k <= SMALL {
            Plan::SumsOfPackedRows
        } else if n <= SMALL && a.cs == 1 {
            Plan::DotsWithPackedColumns
        } else if n <= SMALL && a.rs == 1 {
            Plan::TransposedSums
        } else if m <= SMALL && b.rs == 1 {
            Plan::DotsWithColumns
        } else {
            return None;
        };
        let mut output = FlexTensor::for_overwrite::<f32>(burn_std::Shape::from(vec![m, n]));
        let out: &mut [f32] = output.storage_mut();
        match plan {
            Plan::SumsOfRows => rows_as_sums(isa, m, n, k, a, b, out),
            Plan::SumsOfPackedRows => {
                let b = b.packed(k, n);
                rows_as_sums(isa, m, n, k, a, View::rows(&b, n), out);
            }
            Plan::DotsWithPackedColumns => {
                let bt = b.transposed().packed(n, k);
                dot_products(isa, m, n, k, a, View::rows(&bt, k), out, n as isize, 1);
            }
            Plan::TransposedSums => {
                // outᵀ = bᵀ · aᵀ, whose right operand (aᵀ) has contiguous rows.
                let mut t = vec![0.0f32; n * m];
                rows_as_sums(isa, n, m, k, b.transposed(), a.transposed(), &mut t);
                for (i, row) in out.chunks_exact_mut(n).enumerate() {
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = t[j * m + i];
                    }
                }
            }
            Plan::DotsWithColumns => {
                // Columns of `b` are contiguous: dot products of `a`'s
                // (packed) rows with them.
                let ap = a.packed(m, k);
                dot_products(
                    isa,
                    n,
                    m,
                    k,
                    b.transposed(),
                    View::rows(&ap, k),
                    out,
                    1,
                    n as isize,
                );
            }
        }
        Some(output)
    }

    /// `out[i, :] = Σ_k a[i, k] · b[k, :]` into row-major `out` (`m × n`);
    /// `b`'s columns are contiguous.
    #[allow(clippy::too_many_arguments)]
    fn rows_as_sums(isa: Isa, m: usize, n: usize, k: usize, a: View, b: View, out: &mut [f32]) {
        let parallel = m * n * k >= PARALLEL_WORK;
        let dst = Out(out.as_mut_ptr());
        let task = move |rows: (usize, usize), cols: (usize, usize), sweep: bool| {
            // SAFETY: tasks cover disjoint (rows × cols) blocks of `out`.
            unsafe { dispatch_sums(isa, a, b, dst, n, k, rows, cols, sweep) }
        };
        if m > SMALL {
            let blocks = m.div_ceil(ROW_BLOCK);
            run(parallel, blocks, |t| {
                task((t * ROW_BLOCK, ((t + 1) * ROW_BLOCK).min(m)), (0, n), false)
            });
        } else if n >= SWEEP_COLUMNS && k > K_BAND {
            // One even share of the columns per thread, whole tiles wide.
            let shares = if parallel { threads() } else { 1 };
            let width = n.div_ceil(shares).next_multiple_of(TILE_COLS);
            let blocks = n.div_ceil(width);
            run(parallel, blocks, |t| {
                task((0, m), (t * width, ((t + 1) * width).min(n)), true)
            });
        } else {
            // Enough column blocks to keep every thread busy, each a whole
            // number of tiles wide.
            let width = n
                .div_ceil(8)
                .next_multiple_of(TILE_COLS)
                .clamp(TILE_COLS, COLUMN_BLOCK);
            let blocks = n.div_ceil(width);
            run(parallel, blocks, |t| {
                task((0, m), (t * width, ((t + 1) * width).min(n)), false)
            });
        }
    }

    /// The threads `run` spreads tasks over.
    fn threads() -> usize {
        #[cfg(feature = "rayon")]
        return rayon::current_num_threads().max(1);
        #[cfg(not(feature = "rayon"))]
        1
    }

    /// `out[i·os_i + j·os_j] = a[i, :] · b[j, :]` for `i < m`, `j < n`
    /// (`n` ≤ [`SMALL`]); both operands' rows are contiguous.
    #[allow(clippy::too_many_arguments)]
    fn dot_products(
        isa: Isa,
        m: usize,
        n: usize,
        k: usize,
        a: View,
        b: View,
        out: &mut [f32],
        os_i: isize,
        os_j: isize,
    ) {
        let parallel = m * n * k >= PARALLEL_WORK;
        let dst = Out(out.as_mut_ptr());
        let blocks = m.div_ceil(ROW_BLOCK);
        run(parallel, blocks, |t| {
            let rows = (t * ROW_BLOCK, ((t + 1) * ROW_BLOCK).min(m));
            // SAFETY: each task writes the output of its own rows of `a`.
            unsafe { dispatch_dots(isa, a, b, dst, n, k, rows, (os_i, os_j)) }
        });
    }

    /// Runs `task(0..blocks)`, on rayon's pool when `parallel`.
    fn run(parallel: bool, blocks: usize, task: impl Fn(usize) + Send + Sync) {
        #[cfg(feature = "rayon")]
        if parallel && blocks > 1 {
            use rayon::prelude::*;
            (0..blocks).into_par_iter().for_each(task);
            return;
        }
        let _ = parallel;
        (0..blocks).for_each(task);
    }

    /// The vector registers a kernel is written over: AVX-512 (16 lanes) or
    /// AVX2 (8 lanes), both with FMA.
    trait Lanes: Copy {
        const N: usize;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn store(self, p: *mut f32);
        unsafe fn splat(s: f32) -> Self;
        unsafe fn zero() -> Self;
        /// `self + a · b`
        unsafe fn fma(self, a: Self, b: Self) -> Self;
        unsafe fn sum(self) -> f32;
        /// The first `len` (≤ N) values at `p`, zeros after.
        unsafe fn load_first(p: *const f32, len: usize) -> Self;
        /// Stores the first `len` (≤ N) lanes at `p`.
        unsafe fn store_first(self, p: *mut f32, len: usize);
    }

    #[cfg(target_arch = "x86")]
    use core::arch::x86 as arch;
    #[cfg(target_arch = "x86_64")]
    use core::arch::x86_64 as arch;

    impl Lanes for arch::__m512 {
        const N: usize = 16;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { arch::_mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { arch::_mm512_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn splat(s: f32) -> Self {
            unsafe { arch::_mm512_set1_ps(s) }
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { arch::_mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            unsafe { arch::_mm512_fmadd_ps(a, b, self) }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            unsafe { arch::_mm512_reduce_add_ps(self) }
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, len: usize) -> Self {
            // Masked-off lanes are not read (no fault past the end).
            unsafe { arch::_mm512_maskz_loadu_ps(((1u32 << len) - 1) as u16, p) }
        }
        #[inline(always)]
        unsafe fn store_first(self, p: *mut f32, len: usize) {
            unsafe { arch::_mm512_mask_storeu_ps(p, ((1u32 << len) - 1) as u16, self) }
        }
    }

    impl Lanes for arch::__m256 {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { arch::_mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { arch::_mm256_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn splat(s: f32) -> Self {
            unsafe { arch::_mm256_set1_ps(s) }
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { arch::_mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            unsafe { arch::_mm256_fmadd_ps(a, b, self) }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let mut v = [0.0f32; 8];
            unsafe { arch::_mm256_storeu_ps(v.as_mut_ptr(), self) };
            ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, len: usize) -> Self {
            // Masked-off lanes are not read (no fault past the end).
            unsafe { arch::_mm256_maskload_ps(p, first_lanes(len)) }
        }
        #[inline(always)]
        unsafe fn store_first(self, p: *mut f32, len: usize) {
            unsafe { arch::_mm256_maskstore_ps(p, first_lanes(len), self) }
        }
    }

    /// AVX2's lane mask for the first `len` of 8 lanes.
    #[inline(always)]
    unsafe fn first_lanes(len: usize) -> arch::__m256i {
        unsafe {
            arch::_mm256_cmpgt_epi32(
                arch::_mm256_set1_epi32(len as i32),
                arch::_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }

    /// Rows of one register tile of [`tile`], and its width in vectors:
    /// 8 × 2 accumulators.
    const TILE_ROWS: usize = 8;
    const TILE_VECTORS: usize = 2;
    /// A tile's width in columns with the widest vectors; column blocks are a
    /// whole number of these.
    const TILE_COLS: usize = 32;

    /// `out[r0..r0+R, c..c+width] (+)= a[r0.., k0..k1] · b[k0..k1, c..]`
    /// (added to what `out` holds when `accumulate`), the tile's
    /// accumulators held in registers over the whole sum. With `prefetch`,
    /// the same columns of the rows [`K_BAND`] further down are asked for.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<V: Lanes, const R: usize>(
        a: View,
        b: View,
        out: Out,
        n: usize,
        (k0, k1): (usize, usize),
        r0: usize,
        c: usize,
        (accumulate, prefetch): (bool, bool),
    ) {
        unsafe {
            let mut acc = [[V::zero(); TILE_VECTORS]; R];
            if accumulate {
                for (i, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: the tile lies inside `out` and belongs to this task.
                    let o = out.0.add((r0 + i) * n + c);
                    for (v, acc) in acc.iter_mut().enumerate() {
                        *acc = V::load(o.add(v * V::N));
                    }
                }
            }
            for kk in k0..k1 {
                // SAFETY: row kk of `b` holds n ≥ c + width contiguous values.
                let p = b.ptr.offset(kk as isize * b.rs).add(c);
                if prefetch {
                    // A prefetch never faults: past `b`'s end it is a no-op.
                    let ahead = p.wrapping_offset(K_BAND as isize * b.rs);
                    for v in 0..TILE_VECTORS {
                        prefetch_line(ahead.wrapping_add(v * V::N));
                    }
                }
                let bv: [V; TILE_VECTORS] = core::array::from_fn(|v| V::load(p.add(v * V::N)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let s = V::splat(a.at(r0 + i, kk));
                    for v in 0..TILE_VECTORS {
                        acc[v] = acc[v].fma(s, bv[v]);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                // SAFETY: the tile lies inside `out` and belongs to this task.
                let o = out.0.add((r0 + i) * n + c);
                for (v, acc) in acc.iter().enumerate() {
                    acc.store(o.add(v * V::N));
                }
            }
        }
    }

    /// `out[r0..r0+R, c..c+len] = a[r0.., :] · b[:, c..c+len]` for `len`
    /// (at most one vector) of the columns past the last whole tile, with
    /// masked loads and stores: a narrow product (`x·A` of rank 8) is
    /// vectorised too (16×576×8: 54 µs when these columns were summed one
    /// scalar at a time).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tail_tile<V: Lanes, const R: usize>(
        a: View,
        b: View,
        out: Out,
        n: usize,
        k: usize,
        r0: usize,
        (c, len): (usize, usize),
    ) {
        unsafe {
            let mut acc = [V::zero(); R];
            for kk in 0..k {
                // SAFETY: row kk of `b` holds n ≥ c + len contiguous values.
                let bv = V::load_first(b.ptr.offset(kk as isize * b.rs).add(c), len);
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = acc.fma(V::splat(a.at(r0 + i, kk)), bv);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                // SAFETY: the tile lies inside `out` and belongs to this task.
                acc.store_first(out.0.add((r0 + i) * n + c), len);
            }
        }
    }

    /// Rows `r0..r1`, columns `c..c + width` of [`tile`]'s sum, one register
    /// tile of at most [`TILE_ROWS`] rows after another.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn strip<V: Lanes>(
        a: View,
        b: View,
        out: Out,
        n: usize,
        ks: (usize, usize),
        (r0, r1): (usize, usize),
        c: usize,
        flags: (bool, bool),
    ) {
        let mut r = r0;
        while r < r1 {
            let rows = (r1 - r).min(TILE_ROWS);
            // SAFETY (each arm): rows r..r+rows, columns c..c+width.
            unsafe {
                match rows {
                    8 => tile::<V, 8>(a, b, out, n, ks, r, c, flags),
                    7 => tile::<V, 7>(a, b, out, n, ks, r, c, flags),
                    6 => tile::<V, 6>(a, b, out, n, ks, r, c, flags),
                    5 => tile::<V, 5>(a, b, out, n, ks, r, c, flags),
                    4 => tile::<V, 4>(a, b, out, n, ks, r, c, flags),
                    3 => tile::<V, 3>(a, b, out, n, ks, r, c, flags),
                    2 => tile::<V, 2>(a, b, out, n, ks, r, c, flags),
                    _ => tile::<V, 1>(a, b, out, n, ks, r, c, flags),
                }
            }
            r += rows;
        }
    }

    /// Rows `r0..r1`, columns `c0..c1` of `out = a · b`: whole tiles, then the
    /// columns past the last tile one at a time. The tiles take the whole
    /// sum one strip of columns at a time, or with `sweep` every strip a
    /// band of [`K_BAND`] rows of `b` at a time.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn sums_block<V: Lanes>(
        a: View,
        b: View,
        out: Out,
        n: usize,
        k: usize,
        (r0, r1): (usize, usize),
        (c0, c1): (usize, usize),
        sweep: bool,
    ) {
        let width = V::N * TILE_VECTORS;
        let tiled = c0 + (c1 - c0) / width * width;
        let rows = (r0, r1);
        // SAFETY (both): the strips lie inside `out`'s block of this task.
        if sweep {
            for k0 in (0..k).step_by(K_BAND) {
                let ks = (k0, (k0 + K_BAND).min(k));
                for c in (c0..tiled).step_by(width) {
                    unsafe { strip::<V>(a, b, out, n, ks, rows, c, (k0 > 0, true)) };
                }
            }
        } else {
            for c in (c0..tiled).step_by(width) {
                unsafe { strip::<V>(a, b, out, n, (0, k), rows, c, (false, false)) };
            }
        }
        // A vector at a time, the last one masked.
        let mut c = tiled;
        while c < c1 {
            let cols = (c, (c1 - c).min(V::N));
            let mut r = r0;
            while r < r1 {
                let rows = match r1 - r {
                    8.. => 8,
                    4..=7 => 4,
                    _ => 1,
                };
                // SAFETY (each arm): rows r..r+rows, the columns of `cols`.
                unsafe {
                    match rows {
                        8 => tail_tile::<V, 8>(a, b, out, n, k, r, cols),
                        4 => tail_tile::<V, 4>(a, b, out, n, k, r, cols),
                        _ => tail_tile::<V, 1>(a, b, out, n, k, r, cols),
                    }
                }
                r += rows;
            }
            c += cols.1;
        }
    }

    /// Asks for the cache line holding `p` (any address: never faults).
    #[inline(always)]
    fn prefetch_line(p: *const f32) {
        // SAFETY: a prefetch reads nothing architecturally.
        unsafe { arch::_mm_prefetch::<{ arch::_MM_HINT_T0 }>(p.cast::<i8>()) }
    }

    /// `J` dot products of `x` with `ys` in one pass over `x`.
    #[inline(always)]
    unsafe fn dots<V: Lanes, const J: usize>(x: &[f32], ys: [&[f32]; J]) -> [f32; J] {
        let k = x.len();
        let full = k - k % V::N;
        unsafe {
            let mut acc = [V::zero(); J];
            let mut c = 0;
            while c < full {
                // SAFETY: c + N ≤ k, and every y is k long.
                let xv = V::load(x.as_ptr().add(c));
                for (acc, y) in acc.iter_mut().zip(ys) {
                    *acc = acc.fma(xv, V::load(y.as_ptr().add(c)));
                }
                c += V::N;
            }
            core::array::from_fn(|j| acc[j].sum() + (full..k).map(|c| x[c] * ys[j][c]).sum::<f32>())
        }
    }

    #[inline(always)]
    unsafe fn dots_block<V: Lanes>(
        a: View,
        b: View,
        out: Out,
        n: usize,
        k: usize,
        (r0, r1): (usize, usize),
        (os_i, os_j): (isize, isize),
    ) {
        // SAFETY: rows of `a` and `b` hold k contiguous values; (i, j) is this
        // task's element of `out`.
        let brow = |j: usize| unsafe { b.row(j, k) };
        let put = |i: usize, j: usize, v: f32| unsafe {
            *out.0.offset(i as isize * os_i + j as isize * os_j) = v
        };
        for i in r0..r1 {
            let x = unsafe { a.row(i, k) };
            let mut j = 0;
            while j + 4 <= n {
                let ys = [brow(j), brow(j + 1), brow(j + 2), brow(j + 3)];
                let r = unsafe { dots::<V, 4>(x, ys) };
                for (t, v) in r.into_iter().enumerate() {
                    put(i, j + t, v);
                }
                j += 4;
            }
            for j in j..n {
                put(i, j, unsafe { dots::<V, 1>(x, [brow(j)]) }[0]);
            }
        }
    }

    macro_rules! kernels {
        ($sums:ident, $dots:ident, $lanes:ty, $feat:literal) => {
            #[target_feature(enable = $feat)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $sums(
                a: View,
                b: View,
                out: Out,
                n: usize,
                k: usize,
                rows: (usize, usize),
                cols: (usize, usize),
                sweep: bool,
            ) {
                unsafe { sums_block::<$lanes>(a, b, out, n, k, rows, cols, sweep) }
            }
            #[target_feature(enable = $feat)]
            unsafe fn $dots(
                a: View,
                b: View,
                out: Out,
                n: usize,
                k: usize,
                rows: (usize, usize),
                os: (isize, isize),
            ) {
                unsafe { dots_block::<$lanes>(a, b, out, n, k, rows, os) }
            }
        };
    }

    kernels!(
        sums_avx512,
        dots_avx512,
        arch::__m512,
        "avx512f,avx512dq,fma"
    );
    kernels!(sums_avx2, dots_avx2, arch::__m256, "avx2,fma");

    /// Which kernels this CPU runs; `None`: leave the product to `gemm`.
    #[derive(Clone, Copy)]
    enum Isa {
        Avx512,
        Avx2,
    }

    fn isa() -> Option<Isa> {
        #[cfg(feature = "std")]
        {
            if crate::ops::exp_fast::has_avx512() {
                return Some(Isa::Avx512);
            }
            if crate::ops::exp_fast::has_avx2() {
                return Some(Isa::Avx2);
            }
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn dispatch_sums(
        isa: Isa,
        a: View,
        b: View,
        out: Out,
        n: usize,
        k: usize,
        rows: (usize, usize),
        cols: (usize, usize),
        sweep: bool,
    ) {
        // SAFETY: `isa` was detected on this CPU.
        match isa {
            Isa::Avx512 => unsafe { sums_avx512(a, b, out, n, k, rows, cols, sweep) },
            Isa::Avx2 => unsafe { sums_avx2(a, b, out, n, k, rows, cols, sweep) },
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn dispatch_dots(
        isa: Isa,
        a: View,
        b: View,
        out: Out,
        n: usize,
        k: usize,
        rows: (usize, usize),
        os: (isize, isize),
    ) {
        // SAFETY: `isa` was detected on this CPU.
        match isa {
            Isa::Avx512 => unsafe { dots_avx512(a, b, out, n, k, rows, os) },
            Isa::Avx2 => unsafe { dots_avx2(a, b, out, n, k, rows, os) },
        }
    }
}
