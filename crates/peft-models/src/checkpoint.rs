//! Loading Hugging Face checkpoints: named tensors in, Burn modules out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Embedding;

use crate::norm::{LayerNorm, RmsNorm};
use burn::tensor::backend::Backend;
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{EmbeddingSlot, LinearSlot, PeftError, Result};
use serde::de::DeserializeOwned;

/// Buffers some checkpoints carry that are recomputed, not loaded.
const IGNORED_SUFFIXES: &[&str] = &["position_ids", "inv_freq", "attn.bias", "attn.masked_bias"];

/// The tensors of a checkpoint, taken one by one as modules are built; what
/// is left at the end is reported as unexpected.
pub struct Checkpoint<'d, B: Backend> {
    tensors: HashMap<String, HostTensor>,
    path: PathBuf,
    device: &'d B::Device,
}

/// The largest dimension a config may give: a larger one is not a model but
/// a malformed (or hostile) file, and would overflow the loaders' index
/// arithmetic before any tensor is compared with it.
pub const MAX_DIM: usize = 1 << 31;

/// Checks the dimensions a loader builds from: each in `1..=MAX_DIM`.
/// `file` names the config they come from.
pub fn check_dims(file: &Path, dims: &[(&str, usize)]) -> Result<()> {
    for &(name, v) in dims {
        if v == 0 || v > MAX_DIM {
            return Err(PeftError::Config(format!(
                "{}: `{name}` = {v} is out of range (1..={MAX_DIM})",
                file.display()
            )));
        }
    }
    Ok(())
}

/// Fails unless `heads` divides `width` (attention splits the width evenly).
pub fn check_heads(file: &Path, width: (&str, usize), heads: (&str, usize)) -> Result<()> {
    if !width.1.is_multiple_of(heads.1) {
        return Err(PeftError::Config(format!(
            "{}: `{}` = {} is not a multiple of `{}` = {}",
            file.display(),
            width.0,
            width.1,
            heads.0,
            heads.1
        )));
    }
    Ok(())
}

/// Reads and parses `dir/config.json`.
pub fn read_config<C: DeserializeOwned>(dir: &Path) -> Result<C> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| PeftError::Json { path, source })
}

impl<'d, B: Backend> Checkpoint<'d, B> {
    /// Opens `dir/model.safetensors`, or the shards listed in
    /// `dir/model.safetensors.index.json` (`weight_map`: key → file).
    pub fn open(dir: &Path, device: &'d B::Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Ok(Checkpoint {
                tensors: read_safetensors(&single)?,
                path: single,
                device,
            });
        }
        let index = dir.join("model.safetensors.index.json");
        if !index.exists() {
            return Err(PeftError::Checkpoint {
                path: dir.to_path_buf(),
                message:
                    "no model.safetensors or model.safetensors.index.json in this model directory"
                        .into(),
            });
        }
        let text = std::fs::read_to_string(&index).map_err(|source| PeftError::Io {
            path: index.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| PeftError::Json {
                path: index.clone(),
                source,
            })?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| PeftError::Checkpoint {
                path: index.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let mut tensors = HashMap::new();
        for f in files {
            if f.contains('/') || f.contains("..") {
                return Err(PeftError::Checkpoint {
                    path: index.clone(),
                    message: format!("shard name `{f}` leaves the model directory"),
                });
            }
            let shard = dir.join(f);
            for (k, t) in read_safetensors(&shard)? {
                if map.get(&k).and_then(|v| v.as_str()) == Some(f) {
                    tensors.insert(k, t);
                }
            }
        }
        if let Some(missing) = map.keys().find(|k| !tensors.contains_key(*k)) {
            return Err(PeftError::MissingTensor {
                path: index,
                key: missing.clone(),
            });
        }
        Ok(Checkpoint {
            tensors,
            path: index,
            device,
        })
    }

    /// Fails unless `config.json`'s `model_type` (when present) is `expected`.
    pub fn check_model_type(dir: &Path, expected: &[&str]) -> Result<()> {
        let config: serde_json::Value = read_config(dir)?;
        match config.get("model_type").and_then(|v| v.as_str()) {
            Some(t) if !expected.contains(&t) => Err(PeftError::Config(format!(
                "{}: model_type `{t}` is not supported by this loader (expects {expected:?})",
                dir.join("config.json").display()
            ))),
            _ => Ok(()),
        }
    }

    /// Whether a tensor named `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Whether any key starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors.keys().any(|k| k.starts_with(prefix))
    }

    fn take(&mut self, key: &str) -> Result<HostTensor> {
        self.tensors
            .remove(key)
            .ok_or_else(|| PeftError::MissingTensor {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }

    /// A `D`-dimensional parameter of the given shape.
    pub fn param<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
    ) -> Result<Param<burn::tensor::Tensor<B, D>>> {
        let t = self.take(key)?;
        Ok(Param::from_tensor(t.to_tensor(shape, key, self.device)?))
    }

    /// A PyTorch `nn.Linear` (`weight: [out, in]`) as a frozen slot.
    pub fn linear(
        &mut self,
        path: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<LinearSlot<B>> {
        let key = format!("{path}.weight");
        let w = self.take(&key)?;
        if w.shape != [d_out, d_in] {
            return Err(PeftError::Shape {
                name: key,
                expected: vec![d_out, d_in],
                found: w.shape,
            });
        }
        let weight = w.transposed().to_tensor([d_in, d_out], &key, self.device)?;
        let bias = if bias {
            Some(self.param(&format!("{path}.bias"), [d_out])?.val())
        } else {
            None
        };
        Ok(LinearSlot::from_weights(weight, bias))
    }

    /// A GPT-2 `Conv1D` (`weight: [in, out]`, already Burn's layout) as a frozen slot.
    pub fn conv1d(&mut self, path: &str, d_in: usize, d_out: usize) -> Result<LinearSlot<B>> {
        let weight = self.param(&format!("{path}.weight"), [d_in, d_out])?.val();
        let bias = self.param(&format!("{path}.bias"), [d_out])?.val();
        Ok(LinearSlot::from_weights(weight, Some(bias)))
    }

    /// An adaptable embedding table `[vocab, d]` (frozen, no copy).
    pub fn embedding_slot(
        &mut self,
        key: &str,
        vocab: usize,
        d: usize,
    ) -> Result<EmbeddingSlot<B>> {
        Ok(EmbeddingSlot::new(self.param(key, [vocab, d])?.val()))
    }

    /// An embedding table `[vocab, d]`.
    pub fn embedding(&mut self, key: &str, vocab: usize, d: usize) -> Result<Embedding<B>> {
        Ok(Embedding {
            weight: self.param(key, [vocab, d])?.set_require_grad(false),
        })
    }

    /// A LayerNorm with `weight`/`bias` under `path`.
    pub fn layer_norm(&mut self, path: &str, d: usize, eps: f64) -> Result<LayerNorm<B>> {
        let weight = self.param(&format!("{path}.weight"), [d])?.val();
        let bias = self.param(&format!("{path}.bias"), [d])?.val();
        Ok(LayerNorm::from_params(weight, Some(bias), eps))
    }

    /// An RMSNorm with `weight` under `path`.
    pub fn rms_norm(&mut self, path: &str, d: usize, eps: f64) -> Result<RmsNorm<B>> {
        let weight = self.param(&format!("{path}.weight"), [d])?.val();
        Ok(RmsNorm::from_params(weight, eps))
    }

    /// Fails if tensors remain that no module took (ignoring recomputed buffers).
    pub fn finish(self) -> Result<()> {
        let mut left: Vec<String> = self
            .tensors
            .into_keys()
            .filter(|k| !IGNORED_SUFFIXES.iter().any(|s| k.ends_with(s)))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        Err(PeftError::UnexpectedTensors {
            path: self.path,
            keys: left,
        })
    }
}

impl<B: Backend> Checkpoint<'_, B> {
    /// The shape of tensor `key`, if present.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    /// A task model's classification head `path` (`classifier` of
    /// `BertForSequenceClassification`, `score` of the decoders') over `d`
    /// features, its class count read from the file, if the checkpoint has
    /// one.
    pub fn optional_head(
        &mut self,
        path: &str,
        d: usize,
        bias: bool,
    ) -> Result<Option<LinearSlot<B>>> {
        let key = format!("{path}.weight");
        match self.shape(&key).map(|s| s.to_vec()) {
            Some(shape) if shape.len() == 2 => Ok(Some(self.linear(path, d, shape[0], bias)?)),
            Some(shape) => Err(PeftError::Shape {
                name: key,
                expected: vec![0, d],
                found: shape,
            }),
            None => Ok(None),
        }
    }
}
