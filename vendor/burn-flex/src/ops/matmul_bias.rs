//! `lhs · rhs + bias` in one pass over the output. peft-rs patch (see
//! `vendor/README.md` in the peft-rs workspace), called by `peft-core`'s
//! linear layers on `Flex` and `Autodiff<Flex>`.
//!
//! Burn computes a linear layer as a matrix product followed by a broadcast
//! add, which reads and writes the whole `[m, n]` output a second time
//! (0.35 ms at 2048 × 384, 1.4 ms at 2048 × 1536 on two cores: about a tenth
//! of a MiniLM forward pass). Here the bias rows are written into the output
//! first and `gemm` adds the product onto them (`read_dst`), while each
//! output tile is in cache anyway.

use burn_backend::DType;
use burn_std::Shape;

use crate::ops::matmul::{get_2d_strides, get_parallelism};
use crate::ops::skinny_matmul::SMALL;
use crate::FlexTensor;

/// Output rows per bias-filling task.
#[cfg(feature = "rayon")]
const FILL_ROWS: usize = 64;

/// `lhs · rhs + bias` for f32 `lhs: [m, k]`, `rhs: [k, n]` (any strides) and
/// `bias: [n]`: a contiguous `[m, n]` tensor. `None` for other dtypes,
/// ranks or shapes, and when a side is at most [`SMALL`] (those products
/// have kernels of their own in `matmul`): the caller composes the product
/// and the add instead.
pub fn matmul_bias(lhs: &FlexTensor, rhs: &FlexTensor, bias: &FlexTensor) -> Option<FlexTensor> {
    let f32s = [lhs, rhs, bias].iter().all(|t| t.dtype() == DType::F32);
    let (ls, rs, bs) = (lhs.layout().shape(), rhs.layout().shape(), bias.layout().shape());
    if !f32s || ls.num_dims() != 2 || rs.num_dims() != 2 || bs.num_dims() != 1 {
        return None;
    }
    let (m, k, n) = (ls[0], ls[1], rs[1]);
    if rs[0] != k || bs[0] != n || m.min(n).min(k) <= SMALL {
        return None;
    }
    let bias = bias.to_contiguous();
    let row: &[f32] = &bias.storage::<f32>()[bias.layout().start_offset()..][..n];
    let mut output = FlexTensor::for_overwrite::<f32>(Shape::from(alloc::vec![m, n]));
    let out: &mut [f32] = output.storage_mut();
    let fill = |rows: &mut [f32]| {
        for r in rows.chunks_exact_mut(n) {
            r.copy_from_slice(row);
        }
    };
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(FILL_ROWS * n).for_each(fill);
    }
    #[cfg(not(feature = "rayon"))]
    fill(out);
    let (l_rs, l_cs) = get_2d_strides(lhs.layout());
    let (r_rs, r_cs) = get_2d_strides(rhs.layout());
    let l_data: &[f32] = lhs.storage();
    let r_data: &[f32] = rhs.storage();
    // SAFETY: the start offsets and strides describe `lhs` and `rhs` inside
    // their storage; `out` holds `m · n` initialised values (the bias rows),
    // which gemm reads (`read_dst`, scaled by 1) and overwrites.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            l_data.as_ptr().add(lhs.layout().start_offset()),
            l_cs,
            l_rs,
            r_data.as_ptr().add(rhs.layout().start_offset()),
            r_cs,
            r_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            get_parallelism(m, n, k),
        );
    }
    Some(output)
}
