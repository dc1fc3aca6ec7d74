//! Tokenizers from `tokenizer.json` (the `tokenizers` crate), with batches
//! padded to their longest row.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{PeftError, Result};

/// A Hugging Face tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
}

/// A tokenized batch, padded on the right.
pub struct Batch<B: Backend> {
    /// Token ids `[b, t]`.
    pub ids: Tensor<B, 2, Int>,
    /// 1 for tokens, 0 for padding, `[b, t]`.
    pub attention_mask: Tensor<B, 2>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`. Its own padding setting is dropped: batches
    /// are padded to their longest row. Truncation is kept.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| PeftError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("not a valid tokenizer.json: {e}"),
        })?;
        let pad_id = inner.get_padding().map(|p| p.pad_id).unwrap_or(0);
        inner.with_padding(None);
        Ok(Tokenizer { inner, pad_id })
    }

    /// Token ids of `text`, with the tokenizer's special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PeftError::Config(format!("cannot tokenize {text:?}: {e}")))
    }

    /// Decodes ids back to text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| PeftError::Config(format!("cannot decode: {e}")))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenizes `texts` into a right-padded batch on `device`.
    pub fn batch<B: Backend>(&self, texts: &[&str], device: &B::Device) -> Result<Batch<B>> {
        let rows = texts.iter().map(|t| self.encode(t)).collect::<Result<Vec<_>>>()?;
        let len = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for r in &rows {
            for j in 0..len {
                ids.push(r.get(j).copied().unwrap_or(self.pad_id) as i64);
                mask.push(if j < r.len() { 1.0f32 } else { 0.0 });
            }
        }
        Ok(Batch {
            ids: Tensor::from_data(TensorData::new(ids, [rows.len(), len]), device),
            attention_mask: Tensor::from_data(TensorData::new(mask, [rows.len(), len]), device),
        })
    }
}
