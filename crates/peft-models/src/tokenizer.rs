//! Tokenizers from `tokenizer.json` (the `tokenizers` crate), with batches
//! padded to their longest row.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{PeftError, Result};

/// Runs a call into the `tokenizers` crate, turning a panic into an error:
/// it panics on some malformed `tokenizer.json` files (an `expect` in its
/// decoder deserialiser, found by `cargo fuzz run tokenizer`), and a bad
/// file must be an error, not a crash.
fn guarded<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    peft_core::error::catch_panic(f, "the tokenizer library failed")
}

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
        let bad = |message: String| PeftError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("not a valid tokenizer.json: {message}"),
        };
        let mut inner = guarded(|| tokenizers::Tokenizer::from_file(path))
            .map_err(bad)?
            .map_err(|e| bad(e.to_string()))?;
        let pad_id = inner.get_padding().map(|p| p.pad_id).unwrap_or(0);
        inner.with_padding(None);
        Ok(Tokenizer { inner, pad_id })
    }

    /// Rebuilds the tokenizer stored in a GGUF file's metadata (`gpt2`-style
    /// byte-level BPE: `tokenizer.ggml.tokens`, `.merges`, `.token_type`).
    /// Control tokens (type 3) become special tokens, matched whole.
    pub fn from_gguf(g: &crate::gguf::Gguf) -> Result<Self> {
        use serde_json::{json, Map, Value};
        let model = g.meta("tokenizer.ggml.model")?.as_str().unwrap_or("");
        if model != "gpt2" {
            return Err(PeftError::Config(format!(
                "GGUF tokenizer model `{model}` is not supported (gpt2 byte-level BPE)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            g.meta(key)?
                .as_array()
                .ok_or_else(|| PeftError::Config(format!("`{key}` is not an array")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| PeftError::Config(format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = g
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let mut vocab = Map::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
        }
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| types.get(*i) == Some(&3))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                                 "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        // llama.cpp's `smollm` pre-tokenizer is SmolLM2's own: digits one by one, then byte-level.
        let pre = match g
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
        {
            Some("smollm") => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level.clone()]}),
            _ => byte_level.clone(),
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": pre, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let spec = spec.to_string();
        let inner: tokenizers::Tokenizer = guarded(|| spec.parse::<tokenizers::Tokenizer>())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| {
                PeftError::Config(format!("the GGUF tokenizer could not be rebuilt: {e}"))
            })?;
        let pad_id = g
            .metadata
            .get("tokenizer.ggml.padding_token_id")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32;
        Ok(Tokenizer { inner, pad_id })
    }

    /// The id batches are padded with: the tokenizer's own padding token,
    /// a GGUF file's `tokenizer.ggml.padding_token_id`, else 0. What a
    /// sequence-classification model's `pad_token_id` must name for
    /// transformers to read each row at its last real token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The tokenizer as a `tokenizer.json` document (Hugging Face's format),
    /// e.g. to write one beside a model converted from GGUF.
    pub fn to_json(&self) -> Result<String> {
        guarded(|| self.inner.to_string(true))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| PeftError::Config(format!("cannot write the tokenizer as JSON: {e}")))
    }

    /// Token ids of `text` (special tokens added as the tokenizer says).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        guarded(|| self.inner.encode(text, true))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PeftError::Config(format!("cannot tokenize {text:?}: {e}")))
    }

    /// Token ids of `text` without the special tokens the tokenizer would
    /// add around it (BOS, ...): what a chat template's output is encoded
    /// with, the template writing those tokens itself. Special tokens
    /// written in `text` are still matched whole.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        guarded(|| self.inner.encode(text, false))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PeftError::Config(format!("cannot tokenize {text:?}: {e}")))
    }

    /// The text of token `id` in the vocabulary (e.g. `<|im_end|>`), if
    /// there is one.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the token whose text is `token`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Decodes ids back to text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        guarded(|| self.inner.decode(ids, true))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| PeftError::Config(format!("cannot decode: {e}")))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenizes `texts` into a right-padded batch on `device`.
    pub fn batch<B: Backend>(&self, texts: &[&str], device: &B::Device) -> Result<Batch<B>> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>>>()?;
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
