//! What a served model says of itself beyond its weights: its tokenizer,
//! chat template, end-of-sequence tokens and context length, from a
//! Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`, `config.json`) or a GGUF file's metadata.

use std::path::Path;

use peft_core::Result;
use peft_models::gguf::{Gguf, MetaValue};
use peft_models::tokenizer::Tokenizer;
use serde_json::Value;

use crate::tasks::{self, problem::read_json};

/// The context length assumed when a model names none (GPT-2's and
/// SmolLM2's is 2,048 or more; a request that needs more than the model
/// has is refused, never run past its positions).
const DEFAULT_CONTEXT: usize = 2048;

/// A served model's text interface.
pub struct ModelInfo {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// The text of the beginning-of-sequence token (the template's
    /// `bos_token`).
    pub bos_token: Option<String>,
    /// The text of the end-of-sequence token (the template's `eos_token`).
    pub eos_token: Option<String>,
    /// Token ids that end a generated sequence.
    pub eos_ids: Vec<u32>,
    /// Positions the model has: prompt (and virtual tokens) plus generated
    /// tokens must fit.
    pub context: usize,
}

impl ModelInfo {
    /// Reads the model at `path` (a folder or a `.gguf` file).
    pub fn read(path: &Path) -> Result<ModelInfo> {
        let tokenizer = tasks::tokenizer_of(path)?;
        if path.extension().is_some_and(|e| e == "gguf") {
            return Self::from_gguf(&Gguf::open(path)?, tokenizer);
        }
        let config = read_json(&path.join("config.json"))?.unwrap_or(Value::Null);
        let tok_config = read_json(&path.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let generation = read_json(&path.join("generation_config.json"))?.unwrap_or(Value::Null);
        let token_text = |key: &str| match tok_config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        let bos_token = token_text("bos_token");
        let eos_token = token_text("eos_token");
        let mut eos_ids = ids_of(generation.get("eos_token_id"));
        if eos_ids.is_empty() {
            eos_ids = ids_of(config.get("eos_token_id"));
        }
        if eos_ids.is_empty() {
            eos_ids.extend(eos_token.as_deref().and_then(|t| tokenizer.token_id(t)));
        }
        let context = ["max_position_embeddings", "n_positions", "n_ctx"]
            .iter()
            .find_map(|k| config.get(*k).and_then(Value::as_u64))
            .map_or(DEFAULT_CONTEXT, |n| n as usize);
        Ok(ModelInfo {
            chat_template: chat_template_of(&tok_config),
            bos_token,
            eos_token,
            eos_ids,
            context,
            tokenizer,
        })
    }

    fn from_gguf(g: &Gguf, tokenizer: Tokenizer) -> Result<ModelInfo> {
        let id = |key: &str| {
            g.metadata
                .get(key)
                .and_then(MetaValue::as_u64)
                .map(|i| i as u32)
        };
        let arch = g
            .metadata
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .unwrap_or("llama");
        let context = id(&format!("{arch}.context_length")).map_or(DEFAULT_CONTEXT, |n| n as usize);
        let eos = id("tokenizer.ggml.eos_token_id");
        Ok(ModelInfo {
            chat_template: g
                .metadata
                .get("tokenizer.chat_template")
                .and_then(MetaValue::as_str)
                .map(String::from),
            bos_token: id("tokenizer.ggml.bos_token_id").and_then(|i| tokenizer.token_text(i)),
            eos_token: eos.and_then(|i| tokenizer.token_text(i)),
            eos_ids: eos.into_iter().collect(),
            context,
            tokenizer,
        })
    }
}

/// `tokenizer_config.json`'s `chat_template`: a string, or a list of named
/// templates of which `default` is the one chat uses.
fn chat_template_of(tok_config: &Value) -> Option<String> {
    match tok_config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}

/// An `eos_token_id` field: one id or a list.
fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|i| i as u32).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|i| i as u32)
            .collect(),
        _ => Vec::new(),
    }
}
