//! Frozen weights kept quantized: the storage behind QLoRA.
//!
//! A [`QuantizedMatrix`] holds a linear layer's weight in PyTorch's
//! `[out, in]` layout, as compact blocks, and dequantizes it to `f32` on
//! demand. Two families of formats:
//!
//! - llama.cpp's GGML blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, and F16/BF16),
//!   kept exactly as a GGUF file stores them: each row of `in` values is a
//!   run of whole blocks, so rows can be permuted or gathered without
//!   re-encoding (the q/k RoPE permutation, embedding lookups).
//! - NF4 as QLoRA defines it (Dettmers et al., 2023): 4-bit NormalFloat codes
//!   in blocks of 64 over the row-major data, one absmax per block, and the
//!   absmax values double-quantized to 8 bits in groups of 256 (after
//!   subtracting their mean), ≈ 4.127 bits per weight; or, for a LoftQ
//!   base, the absmax values kept exact (4.5 bits per weight), as PEFT's
//!   LoftQ quantizes.
//!
//! Invariant: dequantization is deterministic and exact to the format, so a
//! quantized base gives the same numbers on every run and backend; the
//! `f32` matrix exists only while a forward (or recomputed backward) pass of
//! its layer runs.

use crate::error::{PeftError, Result};

/// `(elements per block, bytes per block)` of a GGML type this crate reads.
pub fn ggml_block_layout(ggml_type: u32) -> Option<(usize, usize)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        30 => (1, 2),     // BF16
        2 => (32, 18),    // Q4_0: f16 scale + 16 bytes
        3 => (32, 20),    // Q4_1: f16 scale, f16 min + 16 bytes
        8 => (32, 34),    // Q8_0: f16 scale + 32 i8
        12 => (256, 144), // Q4_K: f16 d, f16 dmin, 12 packed 6-bit scales/mins, 128 nibble bytes
        14 => (256, 210), // Q6_K: 128 low-nibble bytes, 64 high-bit bytes, 16 i8 scales, f16 d
        _ => return None,
    })
}

/// llama.cpp's name of GGML type `t` (`Q4_1`).
pub fn ggml_type_name(t: u32) -> String {
    match t {
        0 => "F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        8 => "Q8_0".into(),
        10..=15 => format!("Q{}_K", t - 8),
        30 => "BF16".into(),
        t => format!("type {t}"),
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantises `n` elements of `ggml_type` from `bytes` (whole blocks,
/// as [`ggml_block_layout`] sizes them).
pub fn dequantize_ggml(ggml_type: u32, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ggml_type {
        0 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        1 => out.extend(bytes.chunks_exact(2).map(f16)),
        30 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        8 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16(&blk[..2]);
                out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        2 | 3 => {
            let size = if ggml_type == 2 { 18 } else { 20 };
            for blk in bytes.chunks_exact(size) {
                let d = f16(&blk[..2]);
                let (min, qs) = if ggml_type == 2 {
                    (-8.0 * d, &blk[2..])
                } else {
                    (f16(&blk[2..4]), &blk[4..])
                };
                // Low nibbles are elements 0..16, high nibbles 16..32.
                out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + min));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + min));
            }
        }
        12 => bytes
            .chunks_exact(144)
            .for_each(|b| dequantize_q4_k(b, &mut out)),
        14 => bytes
            .chunks_exact(210)
            .for_each(|b| dequantize_q6_k(b, &mut out)),
        _ => unreachable!("checked by ggml_block_layout"),
    }
    out
}

/// One Q4_K super-block (256 values in 8 sub-blocks of 32): value =
/// `d·sc[j]·q − dmin·m[j]`, with 6-bit `sc`/`m` packed in 12 bytes as
/// llama.cpp's `get_scale_min_k4`; sub-blocks `2c` and `2c+1` are the low
/// and high nibbles of bytes `32c..32c+32`.
fn dequantize_q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
    let s = &b[4..16];
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[4 + j] & 0x3F;
        sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    let qs = &b[16..144];
    for chunk in 0..4 {
        let bytes = &qs[32 * chunk..32 * chunk + 32];
        for (half, shift) in [(0, 0), (1, 4)] {
            let j = 2 * chunk + half;
            let (scale, min) = (d * sc[j] as f32, dmin * mn[j] as f32);
            out.extend(
                bytes
                    .iter()
                    .map(|&q| ((q >> shift) & 0x0F) as f32 * scale - min),
            );
        }
    }
}

/// One Q6_K super-block (256 values in 16 sub-blocks of 16): a 6-bit `q`
/// from a low nibble (`ql`) and two high bits (`qh`), value `d·scale[i/16]·(q − 32)`,
/// in llama.cpp's order (two halves of 128; in each, `ql` bytes 0..64 low then
/// high nibbles, `qh` bytes 0..32 bit pairs 0, 2, 4, 6).
fn dequantize_q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales, d) = (&b[0..128], &b[128..192], &b[192..208], f16(&b[208..210]));
    for i in 0..256 {
        let (half, within) = (i / 128, i % 128);
        let low = (ql[64 * half + within % 64] >> (4 * (within / 64))) & 0x0F;
        let high = (qh[32 * half + within % 32] >> (2 * (within / 32))) & 0x03;
        let q = (low | (high << 4)) as i32 - 32;
        out.push(d * scales[i / 16] as i8 as f32 * q as f32);
    }
}

/// The 16 NF4 levels (QLoRA's `NF4` data type, as in bitsandbytes):
/// quantiles of a unit normal rescaled to `[-1, 1]`, with an exact zero.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// NF4 block size (values per absmax), as QLoRA.
pub const NF4_BLOCK: usize = 64;
/// Absmax values per second-level (8-bit) quantization group, as QLoRA.
pub const NF4_SCALE_GROUP: usize = 256;

/// How a [`QuantizedMatrix`] encodes its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// A GGML block type, by its GGML type id (8 = Q8_0, 3 = Q4_1, ...).
    Ggml(u32),
    /// 4-bit NormalFloat with double-quantized block scales.
    Nf4,
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantFormat::Ggml(t) => f.write_str(&ggml_type_name(*t)),
            QuantFormat::Nf4 => f.write_str("NF4"),
        }
    }
}

/// NF4's block absmax values, in either of the two ways bitsandbytes
/// stores them.
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Scales {
    /// `compress_statistics=True`: QLoRA's double quantization (what a
    /// QLoRA base is kept as, ≈ 4.127 bits per weight).
    Double(Nf4DoubleScales),
    /// `compress_statistics=False`: one exact `f32` absmax per block (4.5
    /// bits per weight). PEFT's LoftQ quantizes this way, so a LoftQ base
    /// dequantizes to exactly the weight PEFT puts in the model.
    Exact(Vec<f32>),
}

/// NF4's second-level scales, as bitsandbytes' double quantization:
/// `absmax[i] = DYNAMIC_MAP[code[i]] · scale[i / 256] + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4DoubleScales {
    /// The mean of all block absmax values, subtracted before quantizing.
    pub offset: f32,
    /// One `f32` per group of 256 blocks: the largest |absmax − offset|.
    pub group_scale: Vec<f32>,
    /// One 8-bit code per block: an index into bitsandbytes' dynamic code
    /// book (`create_dynamic_map`).
    pub block_code: Vec<u8>,
}

/// A frozen weight matrix kept quantized, `[rows = out, cols = in]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedMatrix {
    /// The encoding of `data`.
    pub format: QuantFormat,
    /// Output features (rows of the PyTorch weight).
    pub rows: usize,
    /// Input features (columns of the PyTorch weight).
    pub cols: usize,
    /// GGML: `rows` runs of `cols / block` blocks. NF4: two codes per byte
    /// over the row-major values (element `2i` in the high nibble, as
    /// bitsandbytes packs them), padded with zero codes to whole blocks.
    pub data: Vec<u8>,
    /// NF4 only: the block scales.
    pub nf4: Option<Nf4Scales>,
}

impl QuantizedMatrix {
    /// Wraps the bytes of a GGML tensor of `rows × cols` values (GGUF's
    /// `dims = [cols, rows]`), checking that they are whole blocks of a
    /// supported type and exactly as long as the shape needs.
    pub fn from_ggml(ggml_type: u32, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let (per_block, block_bytes) = ggml_block_layout(ggml_type).ok_or_else(|| {
            PeftError::Config(format!(
                "GGML type {} cannot be kept quantized (F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)",
                ggml_type_name(ggml_type)
            ))
        })?;
        if cols == 0 || rows == 0 || !cols.is_multiple_of(per_block) {
            return Err(PeftError::Config(format!(
                "a {rows}×{cols} {} matrix: rows must be whole blocks of {per_block}",
                ggml_type_name(ggml_type)
            )));
        }
        let want = rows
            .checked_mul(cols / per_block)
            .and_then(|n| n.checked_mul(block_bytes));
        if want != Some(data.len()) {
            return Err(PeftError::Config(format!(
                "a {rows}×{cols} {} matrix needs {want:?} bytes, got {}",
                ggml_type_name(ggml_type),
                data.len()
            )));
        }
        Ok(QuantizedMatrix {
            format: QuantFormat::Ggml(ggml_type),
            rows,
            cols,
            data,
            nf4: None,
        })
    }

    /// Quantizes row-major `values: [rows, cols]` to NF4 with double
    /// quantization of the block absmax values, exactly as bitsandbytes'
    /// `quantize_4bit(quant_type="nf4", blocksize=64,
    /// compress_statistics=True)` does on the CPU (same codes, same scales;
    /// `tests/nf4_bitsandbytes.rs`).
    pub fn nf4(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        Self::nf4_with(values, rows, cols, true)
    }

    /// NF4 with one exact `f32` absmax per block, as bitsandbytes'
    /// `quantize_4bit(quant_type="nf4", blocksize=64,
    /// compress_statistics=False)`: the codes equal [`Self::nf4`]'s, only
    /// the scales are not compressed.
    pub fn nf4_exact_absmax(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        Self::nf4_with(values, rows, cols, false)
    }

    fn nf4_with(values: &[f32], rows: usize, cols: usize, double_quant: bool) -> Result<Self> {
        if values.len() != rows * cols || values.is_empty() {
            return Err(PeftError::Config(format!(
                "NF4: {} values do not make a {rows}×{cols} matrix",
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(PeftError::Config(format!(
                "NF4: value {i} is {}, which cannot be quantized",
                values[i]
            )));
        }
        let blocks = values.len().div_ceil(NF4_BLOCK);
        let absmax: Vec<f32> = values
            .chunks(NF4_BLOCK)
            .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
            .collect();
        // Midpoints between neighbouring levels: the level of `x` is the
        // number of midpoints below it (`torch.bucketize`).
        let mids: Vec<f32> = NF4_LEVELS.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let mut data = vec![0u8; blocks * NF4_BLOCK / 2];
        for (b, block) in values.chunks(NF4_BLOCK).enumerate() {
            // Each block is normalised by its exact absmax (its stored
            // scale is quantized afterwards): whole blocks by multiplying
            // with the reciprocal, a short last block by dividing, as
            // bitsandbytes does.
            let a = absmax[b].max(1e-38);
            let inv = 1.0 / a;
            for (j, &v) in block.iter().enumerate() {
                let x = if block.len() == NF4_BLOCK {
                    v * inv
                } else {
                    v / a
                };
                let x = x.clamp(-1.0, 1.0);
                let code = mids.iter().take_while(|&&m| x > m).count() as u8;
                let i = b * NF4_BLOCK + j;
                data[i / 2] |= if i.is_multiple_of(2) { code << 4 } else { code };
            }
            // Padding past the end keeps code 0 (−1) but is never read.
        }
        let scales = if double_quant {
            Nf4Scales::Double(Nf4DoubleScales::quantize(&absmax))
        } else {
            Nf4Scales::Exact(absmax)
        };
        Ok(QuantizedMatrix {
            format: QuantFormat::Nf4,
            rows,
            cols,
            data,
            nf4: Some(scales),
        })
    }

    /// Bytes held (codes and scales).
    pub fn stored_bytes(&self) -> usize {
        self.data.len()
            + self.nf4.as_ref().map_or(0, |s| match s {
                Nf4Scales::Double(d) => 4 + 4 * d.group_scale.len() + d.block_code.len(),
                Nf4Scales::Exact(a) => 4 * a.len(),
            })
    }

    /// Number of values, `rows · cols`.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the matrix has no values (never, once constructed).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(values per block, bytes per block)` of a GGML matrix.
    fn ggml_layout(&self) -> Option<(u32, usize, usize)> {
        match self.format {
            QuantFormat::Ggml(t) => ggml_block_layout(t).map(|(n, b)| (t, n, b)),
            QuantFormat::Nf4 => None,
        }
    }

    /// Dequantizes values `start..start + out.len()` of the row-major data
    /// into `out`. GGML ranges must start and end on row boundaries.
    fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        match (self.ggml_layout(), &self.nf4) {
            (Some((t, per_block, block_bytes)), _) => {
                debug_assert!(
                    start.is_multiple_of(self.cols) && out.len().is_multiple_of(self.cols)
                );
                let row_bytes = self.cols / per_block * block_bytes;
                let (r0, r1) = (start / self.cols, (start + out.len()) / self.cols);
                let v = dequantize_ggml(t, &self.data[r0 * row_bytes..r1 * row_bytes], out.len());
                out.copy_from_slice(&v);
            }
            (None, Some(s)) => {
                let mut block = usize::MAX;
                let mut a = 0.0;
                for (k, o) in out.iter_mut().enumerate() {
                    let i = start + k;
                    if i / NF4_BLOCK != block {
                        block = i / NF4_BLOCK;
                        a = s.absmax(block);
                    }
                    let code = (self.data[i / 2] >> (4 * (1 - i % 2))) & 0x0F;
                    *o = NF4_LEVELS[code as usize] * a;
                }
            }
            (None, None) => unreachable!("an NF4 matrix always has its scales"),
        }
    }

    /// The whole matrix as row-major `f32` `[rows, cols]`, dequantized on
    /// every available core (rows split in contiguous chunks).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.len()];
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(self.rows)
            .max(1);
        let rows_per = self.rows.div_ceil(threads);
        std::thread::scope(|s| {
            for (c, chunk) in out.chunks_mut(rows_per * self.cols).enumerate() {
                s.spawn(move || self.dequantize_range(c * rows_per * self.cols, chunk));
            }
        });
        out
    }

    /// Rows `ids` (each `< rows`) as row-major `f32` `[ids.len(), cols]`:
    /// an embedding lookup that dequantizes only what it returns.
    pub fn gather_rows(&self, ids: &[usize]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; ids.len() * self.cols];
        for (k, &r) in ids.iter().enumerate() {
            if r >= self.rows {
                return Err(PeftError::Config(format!(
                    "row {r} of a matrix with {} rows",
                    self.rows
                )));
            }
            self.dequantize_range(r * self.cols, &mut out[k * self.cols..(k + 1) * self.cols]);
        }
        Ok(out)
    }

    /// Reorders the rows of a GGML matrix: row `i` of the result is row
    /// `source[i]` of `self` (whole blocks move, nothing is re-encoded).
    pub fn permute_rows(&self, source: &[usize]) -> Result<Self> {
        let Some((_, per_block, block_bytes)) = self.ggml_layout() else {
            return Err(PeftError::Config(
                "only GGML block matrices can be permuted without re-encoding".into(),
            ));
        };
        if source.len() != self.rows || source.iter().any(|&r| r >= self.rows) {
            return Err(PeftError::Config(format!(
                "a row permutation of {} entries for {} rows",
                source.len(),
                self.rows
            )));
        }
        let row_bytes = self.cols / per_block * block_bytes;
        let mut data = Vec::with_capacity(self.data.len());
        for &r in source {
            data.extend_from_slice(&self.data[r * row_bytes..(r + 1) * row_bytes]);
        }
        Ok(QuantizedMatrix {
            data,
            ..self.clone()
        })
    }
}

impl Nf4Scales {
    /// The absmax of block `b`, as dequantization uses it.
    fn absmax(&self, b: usize) -> f32 {
        match self {
            Nf4Scales::Double(d) => d.absmax(b),
            Nf4Scales::Exact(a) => a[b],
        }
    }
}

impl Nf4DoubleScales {
    /// bitsandbytes' `quantize_blockwise(absmax − mean, blocksize=256)`
    /// with its dynamic code book: per group of 256 blocks, each
    /// `(a − offset) / max|a − offset|` to the nearest code (the lower one
    /// on a tie).
    fn quantize(absmax: &[f32]) -> Self {
        let map = dynamic_map();
        let sum: f64 = absmax.iter().map(|&a| a as f64).sum();
        let offset = (sum / absmax.len() as f64) as f32;
        let mut group_scale = Vec::with_capacity(absmax.len().div_ceil(NF4_SCALE_GROUP));
        let mut block_code = Vec::with_capacity(absmax.len());
        for group in absmax.chunks(NF4_SCALE_GROUP) {
            let centred: Vec<f32> = group.iter().map(|a| a - offset).collect();
            let scale = centred.iter().fold(0.0f32, |m, c| m.max(c.abs()));
            group_scale.push(scale);
            block_code.extend(centred.iter().map(|&c| {
                let x = if scale > 0.0 { c / scale } else { 0.0 };
                let left = map.partition_point(|&m| m <= x).saturating_sub(1);
                let right = (left + 1).min(255);
                if (x - map[right]).abs() < (x - map[left]).abs() {
                    right as u8
                } else {
                    left as u8
                }
            }));
        }
        Nf4DoubleScales {
            offset,
            group_scale,
            block_code,
        }
    }

    /// The dequantized absmax of block `b`.
    fn absmax(&self, b: usize) -> f32 {
        dynamic_map()[self.block_code[b] as usize] * self.group_scale[b / NF4_SCALE_GROUP]
            + self.offset
    }
}

/// bitsandbytes' 8-bit dynamic code book, ascending.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(|| crate::nf4_dynamic_map::DYNAMIC_MAP_BITS.map(f32::from_bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal_values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64(seed);
        (0..n)
            .map(|_| {
                // Box–Muller from two uniforms.
                let (u, v) = (rng.next_f64().max(1e-12), rng.next_f64());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * 0.02) as f32
            })
            .collect()
    }

    /// NF4's levels are those of bitsandbytes' `create_normal_map`: an exact
    /// zero, ±1 at the ends, sorted.
    #[test]
    fn nf4_levels_are_normal_quantiles() {
        assert_eq!(NF4_LEVELS[7], 0.0);
        assert_eq!((NF4_LEVELS[0], NF4_LEVELS[15]), (-1.0, 1.0));
        assert!(NF4_LEVELS.windows(2).all(|w| w[0] < w[1]));
    }

    /// Round trip of normal data (the case NF4 is built for): every value
    /// lands on the nearest level of its block up to the second-level
    /// rounding of the absmax, and the storage is ≈ 4.13 bits per value.
    #[test]
    fn nf4_round_trip_error_is_bounded() {
        let (rows, cols) = (96, 160); // 15,360 values, 240 blocks
        let v = normal_values(rows * cols, 7);
        let q = QuantizedMatrix::nf4(&v, rows, cols).unwrap();
        let d = q.dequantize();
        let Some(Nf4Scales::Double(s)) = q.nf4.as_ref() else {
            panic!("NF4 keeps double-quantized scales");
        };
        let widest_gap = NF4_LEVELS
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0.0f32, f32::max);
        for (b, (orig, back)) in v.chunks(NF4_BLOCK).zip(d.chunks(NF4_BLOCK)).enumerate() {
            let true_max = orig.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let a = s.absmax(b);
            // Second-level rounding: half a step of the group's scale.
            assert!((a - true_max).abs() <= 0.5 * s.group_scale[b / NF4_SCALE_GROUP] + 1e-7);
            for (x, y) in orig.iter().zip(back) {
                assert!(
                    (x - y).abs() <= 0.5 * widest_gap * a + (a - true_max).abs() + 1e-6,
                    "block {b}: {x} came back as {y}"
                );
            }
        }
        let rel = (v.iter().zip(&d).map(|(x, y)| (x - y).powi(2)).sum::<f32>()
            / v.iter().map(|x| x * x).sum::<f32>())
        .sqrt();
        assert!(rel < 0.12, "relative RMS error {rel}");
        let bits = 8.0 * q.stored_bytes() as f64 / (rows * cols) as f64;
        assert!((4.12..4.14).contains(&bits), "{bits} bits per value");
        // Rows gathered one by one equal the whole matrix's rows.
        let g = q.gather_rows(&[95, 0, 37]).unwrap();
        assert_eq!(&g[..cols], &d[95 * cols..96 * cols]);
        assert_eq!(&g[2 * cols..], &d[37 * cols..38 * cols]);
        assert!(q.gather_rows(&[96]).is_err());
    }

    /// Exact block scales: the same 4-bit codes as the double-quantized
    /// form, each value exactly `level · absmax` of its block's true
    /// absmax, 4.5 bits per value.
    #[test]
    fn nf4_with_exact_absmax_keeps_the_codes_and_the_true_scales() {
        let (rows, cols) = (30, 70); // a short last block
        let v = normal_values(rows * cols, 11);
        let double = QuantizedMatrix::nf4(&v, rows, cols).unwrap();
        let exact = QuantizedMatrix::nf4_exact_absmax(&v, rows, cols).unwrap();
        assert_eq!(exact.data, double.data);
        let Some(Nf4Scales::Exact(absmax)) = exact.nf4.as_ref() else {
            panic!("exact scales expected");
        };
        let d = exact.dequantize();
        for (b, block) in v.chunks(NF4_BLOCK).enumerate() {
            let true_max = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert_eq!(absmax[b], true_max, "block {b}");
            for (j, _) in block.iter().enumerate() {
                let i = b * NF4_BLOCK + j;
                let code = (exact.data[i / 2] >> (4 * (1 - i % 2))) & 0x0F;
                assert_eq!(d[i], NF4_LEVELS[code as usize] * true_max, "value {i}");
            }
        }
        assert_ne!(d, double.dequantize(), "the scales must differ somewhere");
        let blocks = (rows * cols).div_ceil(NF4_BLOCK);
        assert_eq!(exact.stored_bytes(), blocks * NF4_BLOCK / 2 + 4 * blocks);
        assert!(QuantizedMatrix::nf4_exact_absmax(&[f32::INFINITY], 1, 1).is_err());
    }

    #[test]
    fn nf4_refuses_what_it_cannot_encode() {
        assert!(QuantizedMatrix::nf4(&[1.0, f32::NAN], 1, 2).is_err());
        assert!(QuantizedMatrix::nf4(&[1.0; 5], 2, 3).is_err());
        // A constant zero matrix round-trips exactly.
        let q = QuantizedMatrix::nf4(&[0.0; 70], 7, 10).unwrap();
        assert!(q.dequantize().iter().all(|&x| x == 0.0));
    }

    /// GGML rows permute as whole blocks: dequantizing the permuted matrix
    /// equals permuting the dequantized rows.
    #[test]
    fn ggml_rows_permute_and_gather() {
        let d = half::f16::from_f32(0.25).to_le_bytes();
        let mut bytes = Vec::new();
        for r in 0..3u8 {
            bytes.extend(d);
            bytes.extend((0..32).map(|i| (i as i8 - 16 + r as i8) as u8));
        }
        let q = QuantizedMatrix::from_ggml(8, 3, 32, bytes).unwrap();
        let all = q.dequantize();
        let p = q.permute_rows(&[2, 0, 1]).unwrap().dequantize();
        assert_eq!(&p[..32], &all[64..]);
        assert_eq!(&p[32..64], &all[..32]);
        assert_eq!(q.gather_rows(&[1]).unwrap(), all[32..64].to_vec());
        assert!(QuantizedMatrix::from_ggml(8, 3, 32, vec![0; 10]).is_err());
        assert!(QuantizedMatrix::from_ggml(99, 1, 32, vec![0; 34]).is_err());
    }
}
