//! The architectures `peft` runs: which one a model path holds, its
//! tokenizer, and what the causal-LM jobs need of a decoder
//! ([`CausalModel`]).

use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use peft_core::loss::causal_lm_loss_after_prompt;
use peft_core::{PeftError, PeftModel, Result};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::tokenizer::Tokenizer;
use serde_json::Value;

use super::method::Quantize;

/// The architectures `peft` runs, read from a model path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// BERT (sequence classification).
    Bert,
    /// Llama family (causal LM), from a Hugging Face folder or a GGUF file.
    Llama,
    /// GPT-2 (causal LM).
    Gpt2,
}

/// The architecture of the model at `path` (a `.gguf` file is Llama; a folder
/// is read from its `config.json`'s `model_type`).
pub fn arch_of(path: &Path) -> Result<Arch> {
    if path.extension().is_some_and(|e| e == "gguf") {
        return Ok(Arch::Llama);
    }
    let config = path.join("config.json");
    if !config.is_file() {
        return Err(PeftError::Checkpoint {
            path: path.to_path_buf(),
            message: "not a model: no config.json here (a Hugging Face model folder or a .gguf file is needed)".into(),
        });
    }
    let text = std::fs::read_to_string(&config).map_err(|source| PeftError::Io {
        path: config.clone(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: config.clone(),
        source,
    })?;
    match v.get("model_type").and_then(Value::as_str) {
        Some("bert") => Ok(Arch::Bert),
        Some("llama" | "mistral") => Ok(Arch::Llama),
        Some("gpt2") => Ok(Arch::Gpt2),
        other => Err(PeftError::Checkpoint {
            path: config,
            message: format!("model_type {other:?} is not supported (bert, llama, gpt2)"),
        }),
    }
}

/// The tokenizer of the model at `path`: `tokenizer.json` beside the
/// weights, or the one in the GGUF metadata.
pub fn tokenizer_of(path: &Path) -> Result<Tokenizer> {
    if path.extension().is_some_and(|e| e == "gguf") {
        return Tokenizer::from_gguf(&peft_models::gguf::Gguf::open(path)?);
    }
    Tokenizer::from_file(&path.join("tokenizer.json"))
}

/// A causal LM `peft` can train: logits for ids, and the seams.
pub trait CausalModel<B: Backend>:
    PeftModel<B, Output = Tensor<B, 3>> + peft_core::layered::LayeredModel<B> + Clone
{
    /// Loads the model at `path`.
    fn load_from(path: &Path, device: &B::Device) -> Result<Self>;

    /// Loads the model at `path` with its frozen linear weights kept
    /// quantized as `quantize` says (`None`: `f32`, as `load_from`).
    fn load_quantized(path: &Path, device: &B::Device, quantize: Option<Quantize>) -> Result<Self> {
        let mut model = match quantize {
            Some(Quantize::Gguf) => {
                return Err(PeftError::Config(format!(
                    "--quantize gguf keeps the blocks of a Llama GGUF file; {} is not one",
                    path.display()
                )))
            }
            _ => Self::load_from(path, device)?,
        };
        if quantize == Some(Quantize::Nf4) {
            model.quantize_base_nf4()?;
        }
        Ok(model)
    }

    /// The causal-LM loss of `ids` and the parameter gradients, computed one
    /// layer at a time (for a quantized base).
    fn causal_loss_by_layer(&self, ids: Tensor<B, 2, Int>, seed: u64) -> (f64, GradientsParams)
    where
        B: AutodiffBackend,
        Self: AutodiffModule<B>,
    {
        peft_core::layered::loss_and_grads_by_layer(self, ids.clone(), None, seed, |logits| {
            causal_lm_loss_after_prompt(logits, ids, 0)
        })
    }
}

impl<B: Backend> CausalModel<B> for Llama<B> {
    fn load_from(path: &Path, device: &B::Device) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "gguf") {
            Llama::from_gguf(path, device)
        } else {
            Llama::load(path, device)
        }
    }

    fn load_quantized(path: &Path, device: &B::Device, quantize: Option<Quantize>) -> Result<Self> {
        let gguf = path.extension().is_some_and(|e| e == "gguf");
        match quantize {
            Some(Quantize::Gguf) if gguf => Llama::from_gguf_quantized(path, device),
            Some(Quantize::Gguf) => Err(PeftError::Config(format!(
                "--quantize gguf keeps a GGUF file's blocks; {} is a Hugging Face folder (use nf4)",
                path.display()
            ))),
            Some(Quantize::Nf4) => {
                let mut m = Self::load_from(path, device)?;
                m.quantize_base_nf4()?;
                Ok(m)
            }
            None => Self::load_from(path, device),
        }
    }
}

impl<B: Backend> CausalModel<B> for Gpt2<B> {
    fn load_from(path: &Path, device: &B::Device) -> Result<Self> {
        Gpt2::load(path, device)
    }
}
