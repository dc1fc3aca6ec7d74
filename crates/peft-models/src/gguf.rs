//! GGUF files (llama.cpp's format): metadata, tensor directory, and
//! dequantisation of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K to `f32`.
//!
//! The file is memory-mapped; a tensor is dequantised only when asked for,
//! so loading never holds the whole model twice. Every size and offset the
//! file claims is checked against the file before use: a malformed file is a
//! [`PeftError`], never a panic or an allocation of a claimed size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use peft_core::io::HostTensor;
use peft_core::quant::{
    dequantize_ggml as dequantize, ggml_block_layout as block_layout, ggml_type_name as type_name,
};
use peft_core::{PeftError, Result};

const MAGIC: &[u8; 4] = b"GGUF";

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type.
    UInt(u64),
    /// Any signed integer type.
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::UInt(v) => Some(*v),
            MetaValue::Int(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(v) => Some(*v),
            MetaValue::UInt(v) => Some(*v as f64),
            MetaValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's entry in the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the fastest-varying (columns).
    pub dims: Vec<u64>,
    /// GGML type id.
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in row-major (PyTorch) order: reversed `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct Gguf {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Metadata key → value.
    pub metadata: BTreeMap<String, MetaValue>,
    /// The tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> PeftError {
        PeftError::Checkpoint {
            path: self.path.to_path_buf(),
            message: format!("malformed GGUF at byte {}: {what}", self.pos),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end =
            end.ok_or_else(|| self.err(&format!("needs {n} more bytes, the file ends first")))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn len(&mut self, per_item: usize) -> Result<usize> {
        let n = self.u64()?;
        // A count can never exceed what the rest of the file could hold.
        let left = (self.bytes.len() - self.pos) / per_item.max(1);
        if n > left as u64 {
            return Err(self.err(&format!(
                "claims {n} items, the file has room for at most {left}"
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len(1)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::UInt(self.u8()? as u64),
            1 => MetaValue::Int(self.u8()? as i8 as i64),
            2 => MetaValue::UInt(self.u16()? as u64),
            3 => MetaValue::Int(self.u16()? as i16 as i64),
            4 => MetaValue::UInt(self.u32()? as u64),
            5 => MetaValue::Int(self.u32()? as i32 as i64),
            6 => MetaValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.len(1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::UInt(self.u64()?),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(
                self.take(8)?.try_into().expect("8 bytes"),
            )),
            other => return Err(self.err(&format!("unknown metadata type {other}"))),
        })
    }
}

impl Gguf {
    /// Opens and parses a GGUF file (version 2 or 3).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| PeftError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only and the file is not modified while mapped
        // (a concurrent truncation by another process is outside our control,
        // as with any mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| PeftError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (metadata, tensors, data_start) = Self::parse(&map, path)?;
        Ok(Gguf {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
            data_start,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        bytes: &[u8],
        path: &Path,
    ) -> Result<(BTreeMap<String, MetaValue>, Vec<TensorInfo>, usize)> {
        let mut r = Reader {
            bytes,
            pos: 0,
            path,
        };
        if r.take(4)? != MAGIC {
            return Err(r.err("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(&format!("GGUF version {version} is not supported (2, 3)")));
        }
        let n_tensors = r.len(24)?;
        let n_kv = r.len(12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.err(&format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
            .unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(r.err(&format!("alignment {align} is not a power of two")));
        }
        let data_start = r.pos.div_ceil(align) * align;
        Ok((metadata, tensors, data_start))
    }

    /// A required metadata value.
    pub fn meta(&self, key: &str) -> Result<&MetaValue> {
        self.metadata.get(key).ok_or_else(|| PeftError::Checkpoint {
            path: self.path.clone(),
            message: format!("missing metadata `{key}`"),
        })
    }

    /// A required unsigned integer metadata value.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key)?
            .as_u64()
            .ok_or_else(|| PeftError::Checkpoint {
                path: self.path.clone(),
                message: format!("metadata `{key}` is not an unsigned integer"),
            })
    }

    /// The directory entry of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Dequantises tensor `name` to a row-major `f32` host tensor.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let (info, bytes, n) = self.raw(name)?;
        let data = dequantize(info.ggml_type, bytes, n);
        Ok(HostTensor {
            shape: info.shape(),
            data,
        })
    }

    /// Tensor `name` as stored: its directory entry, its bytes (whole blocks
    /// of a supported type, checked to lie inside the file) and its number
    /// of values.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8], usize)> {
        let bad = |message: String| PeftError::Checkpoint {
            path: self.path.clone(),
            message,
        };
        let info = self.info(name).ok_or_else(|| PeftError::MissingTensor {
            path: self.path.clone(),
            key: name.to_string(),
        })?;
        let (per_block, block_bytes) = block_layout(info.ggml_type)
            .ok_or_else(|| bad(format!("tensor `{name}` has type {}, which is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)", type_name(info.ggml_type))))?;
        let n = info
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has an impossible size {:?}",
                    info.dims
                ))
            })?;
        if info.dims[0] % per_block as u64 != 0 {
            return Err(bad(format!(
                "tensor `{name}`: row length {} is not a multiple of the block size {per_block}",
                info.dims[0]
            )));
        }
        let size = (n / per_block as u64).checked_mul(block_bytes as u64);
        let start = (self.data_start as u64).checked_add(info.offset);
        let end = start.zip(size).and_then(|(s, z)| s.checked_add(z));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(bad(format!("tensor `{name}`: offset overflows")));
        };
        if end > self.map.len() as u64 {
            return Err(bad(format!(
                "tensor `{name}` lies past the end of the file (bytes {start}..{end} of {})",
                self.map.len()
            )));
        }
        Ok((info, &self.map[start as usize..end as usize], n as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantizes_each_block_type() {
        let d = half::f16::from_f32(0.5).to_le_bytes();
        let m = half::f16::from_f32(-1.0).to_le_bytes();
        // Q8_0
        let mut q8 = d.to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(8, &q8, 32);
        assert_eq!(v[0], -8.0);
        assert_eq!(v[31], 7.5);
        // Q4_1: byte j holds element j (low) and j + 16 (high).
        let mut q41 = d.to_vec();
        q41.extend(m);
        q41.extend((0..16).map(|j| (j as u8) | (((15 - j) as u8) << 4)));
        let v = dequantize(3, &q41, 32);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[15], 15.0 * 0.5 - 1.0);
        assert_eq!(v[16], 15.0 * 0.5 - 1.0);
        assert_eq!(v[31], -1.0);
        // Q4_0: (q − 8)·d
        let mut q40 = d.to_vec();
        q40.extend([0x8F_u8; 16]);
        let v = dequantize(2, &q40, 32);
        assert_eq!((v[0], v[16]), (3.5, 0.0));
    }

    /// Q4_K and Q6_K blocks of `fixtures/gguf/kquants.gguf` (random bytes)
    /// dequantise to exactly what gguf-py, llama.cpp's Python package, gives
    /// (`scripts/make_gguf_kquant_fixture.py`).
    #[test]
    fn k_quants_match_llama_cpp() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf");
        let g = Gguf::open(&dir.join("kquants.gguf")).unwrap();
        let want = peft_core::io::read_safetensors(&dir.join("kquants.safetensors")).unwrap();
        for name in ["q4k", "q6k"] {
            let got = g.tensor(name).unwrap();
            assert_eq!(got.shape, want[name].shape, "{name}");
            assert_eq!(
                got.data, want[name].data,
                "{name}: values differ from gguf-py"
            );
        }
    }

    #[test]
    fn malformed_headers_are_errors() {
        let p = Path::new("bad.gguf");
        assert!(Gguf::parse(b"GGU", p).is_err());
        assert!(Gguf::parse(b"NOPE\x03\0\0\0", p).is_err());
        let mut huge = b"GGUF\x03\0\0\0".to_vec();
        huge.extend(u64::MAX.to_le_bytes());
        huge.extend(0u64.to_le_bytes());
        let e = Gguf::parse(&huge, p).expect_err("a claimed count beyond the file is refused");
        assert!(e.to_string().contains("claims"), "{e}");
    }
}
