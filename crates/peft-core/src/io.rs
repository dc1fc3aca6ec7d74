//! The file boundary: safetensors in and out, atomic writes.
//!
//! Tensors cross the boundary as [`HostTensor`] (row-major `f32` on the
//! host). PEFT's key names and PyTorch's `[out, in]` layout are handled by
//! the callers of this module and nowhere else.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{PeftError, Result};

/// PEFT's config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A tensor on the host: row-major `f32` values and a shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Copies a device tensor to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("converted to f32 above");
        HostTensor { shape, data }
    }

    /// The transpose of a 2-D tensor (PyTorch `[out, in]` ↔ Burn `[in, out]`).
    pub fn transposed(&self) -> Self {
        assert_eq!(self.shape.len(), 2, "transposed() takes a 2-D tensor");
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        HostTensor {
            shape: vec![c, r],
            data,
        }
    }

    /// Moves to a device as a `D`-dimensional tensor, checking the shape.
    pub fn to_tensor<B: Backend, const D: usize>(
        &self,
        expected: [usize; D],
        name: &str,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        if self.shape != expected {
            return Err(PeftError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(Tensor::from_data(
            TensorData::new(self.data.clone(), expected),
            device,
        ))
    }

    /// Fails if any value is NaN or infinite.
    pub fn check_finite(&self, name: &str, path: &Path) -> Result<()> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(PeftError::NonFinite(format!(
                "{}: tensor `{name}` holds {} at flat index {i}",
                path.display(),
                self.data[i]
            ))),
        }
    }
}

fn checkpoint_err(path: &Path, message: impl Into<String>) -> PeftError {
    PeftError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn to_f32(view: &TensorView<'_>, key: &str, path: &Path) -> Result<Vec<f32>> {
    let bytes = view.data();
    let out = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunk of 8")) as f32)
            .collect(),
        // Integer buffers (position ids, token ids) are converted too.
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("chunk of 8")) as f32)
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
            .collect(),
        Dtype::U8 | Dtype::BOOL => bytes.iter().map(|&b| b as f32).collect(),
        Dtype::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        other => {
            return Err(checkpoint_err(
                path,
                format!("tensor `{key}` has dtype {other:?}; supported: F32, F16, BF16, F64, I64, I32, I8, U8, BOOL"),
            ))
        }
    };
    Ok(out)
}

/// Parses safetensors bytes into host tensors. `path` names the source in errors.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<HashMap<String, HostTensor>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| checkpoint_err(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (key, view) in st.tensors() {
        let data = to_f32(&view, &key, path)?;
        out.insert(
            key,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Reads every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, HostTensor>> {
    let bytes = fs::read(path).map_err(|source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_safetensors(&bytes, path)
}

/// Serialises host tensors as an `F32` safetensors file.
pub fn serialize_safetensors(
    tensors: &[(String, HostTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, t), b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, t.shape.clone(), b).expect("shape matches data"),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, metadata).expect("F32 views always serialise")
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder,
/// flushed to disk, then renamed over `path`. A crash at any moment leaves
/// either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io_err = |source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| checkpoint_err(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

/// Writes a PEFT adapter folder's two files into `dir`: `tensors` as
/// `adapter_model.safetensors` (PyTorch's `format: pt` metadata), then
/// `config_json` as `adapter_config.json`, each atomically, so a config on
/// disk always has its weights beside it.
pub fn write_adapter_files(
    dir: &Path,
    tensors: &[(String, HostTensor)],
    config_json: &str,
) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(
        &dir.join(WEIGHTS_FILE),
        &serialize_safetensors(tensors, Some(metadata)),
    )?;
    write_atomic(&dir.join(CONFIG_FILE), config_json.as_bytes())
}

/// Where adapter `name` lives in a saved folder, as PEFT lays it out:
/// `default` in the folder itself, any other adapter in `<dir>/<name>/`.
pub fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == crate::DEFAULT_ADAPTER {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// The non-default adapters saved under `dir`: `(name, folder)` of every
/// sub-folder holding an `adapter_config.json`, sorted by name.
pub fn adapter_subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut subdirs: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|source| PeftError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(CONFIG_FILE).is_file())
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, p)
        })
        .collect();
    subdirs.sort();
    Ok(subdirs)
}

/// The prefix of every key in PEFT's weights file.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Takes tensor `key` out of `tensors`, naming `path` when it is missing.
pub fn take_tensor(
    tensors: &mut HashMap<String, HostTensor>,
    key: &str,
    path: &Path,
) -> Result<HostTensor> {
    tensors.remove(key).ok_or_else(|| PeftError::MissingTensor {
        path: path.to_path_buf(),
        key: key.to_string(),
    })
}

/// Fails with [`PeftError::UnexpectedTensors`] (keys sorted) unless every
/// tensor of `tensors` was taken.
pub fn ensure_consumed(tensors: HashMap<String, HostTensor>, path: &Path) -> Result<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<String> = tensors.into_keys().collect();
    keys.sort();
    Err(PeftError::UnexpectedTensors {
        path: path.to_path_buf(),
        keys,
    })
}

/// A weight `[d_in, d_out]` from PyTorch's `key` (`[out, in]`, transposed
/// here), taken out of `tensors` (read from `path`), its shape checked.
pub fn weight_from_torch<B: Backend>(
    tensors: &mut HashMap<String, HostTensor>,
    key: &str,
    [d_in, d_out]: [usize; 2],
    path: &Path,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    let weight = take_tensor(tensors, key, path)?;
    if weight.shape != [d_out, d_in] {
        return Err(PeftError::Shape {
            name: key.to_string(),
            expected: vec![d_out, d_in],
            found: weight.shape,
        });
    }
    weight.transposed().to_tensor([d_in, d_out], key, device)
}

/// A `burn::nn::Linear` from PyTorch's `<key>.weight` (`[out, in]`, transposed
/// here) and, with `bias`, `<key>.bias` (`[out]`), taken out of `tensors`,
/// shapes checked before anything is converted.
pub fn linear_from_torch<B: Backend>(
    tensors: &mut HashMap<String, HostTensor>,
    key: &str,
    [d_in, d_out]: [usize; 2],
    bias: bool,
    path: &Path,
    device: &B::Device,
) -> Result<burn::nn::Linear<B>> {
    let weight = weight_from_torch(
        tensors,
        &format!("{key}.weight"),
        [d_in, d_out],
        path,
        device,
    )?;
    let bias = match bias {
        true => {
            let b_key = format!("{key}.bias");
            let b = take_tensor(tensors, &b_key, path)?.to_tensor([d_out], &b_key, device)?;
            Some(burn::module::Param::from_tensor(b))
        }
        false => None,
    };
    Ok(burn::nn::Linear {
        weight: burn::module::Param::from_tensor(weight),
        bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_transpose() {
        let t = HostTensor {
            shape: vec![2, 3],
            data: vec![1., 2., 3., 4., 5., 6.],
        };
        assert_eq!(t.transposed().data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(t.transposed().transposed(), t);
        let dir = std::env::temp_dir().join(format!("peft-core-io-{}", std::process::id()));
        let path = dir.join("x.safetensors");
        write_atomic(
            &path,
            &serialize_safetensors(&[("w".into(), t.clone())], None),
        )
        .unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back["w"], t);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn malformed_files_are_typed_errors() {
        let p = Path::new("bad.safetensors");
        assert!(matches!(
            parse_safetensors(b"\x10\0\0\0\0\0\0\0{}", p),
            Err(PeftError::Checkpoint { .. })
        ));
        let good = serialize_safetensors(
            &[(
                "w".into(),
                HostTensor {
                    shape: vec![4],
                    data: vec![0.; 4],
                },
            )],
            None,
        );
        assert!(parse_safetensors(&good[..good.len() - 3], p).is_err());
        let nan = HostTensor {
            shape: vec![2],
            data: vec![0., f32::NAN],
        };
        assert!(matches!(
            nan.check_finite("w", p),
            Err(PeftError::NonFinite(_))
        ));
    }
}
