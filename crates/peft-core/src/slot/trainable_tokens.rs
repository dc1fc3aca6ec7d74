//! Trainable tokens (PEFT's `TrainableTokensConfig`): each adapter
//! retrains a few rows of an embedding table (new tokens, or old ones
//! relearnt) and nothing else; only those rows are saved. The rows live in
//! the model's [`EmbeddingSlot`](super::EmbeddingSlot)s;
//! [`SlotModel`](crate::SlotModel) attaches, switches, merges (PEFT's
//! `index_copy`), unloads and saves them as for any other method: the
//! method is its config ([`TrainableTokensConfig`]). With tied embeddings
//! the output head follows the rows, as PEFT ties its head layer to the
//! embedding's.
//!
//! As in PEFT, adapters retraining disjoint tokens may be active together;
//! one token retrained by two active adapters is refused. The same rows
//! beside LoRA are LoRA's `trainable_token_indices`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::method::{slot_method_without_entries, TokenRows};
use crate::config::TargetModules;
use crate::error::{PeftError, Result};
use crate::method_config::MethodConfig;

fn trainable_tokens_type() -> String {
    "TRAINABLE_TOKENS".into()
}

fn yes() -> bool {
    true
}

/// PEFT's `TrainableTokensConfig`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainableTokensConfig {
    /// Always `"TRAINABLE_TOKENS"`.
    #[serde(default = "trainable_tokens_type")]
    pub peft_type: String,
    /// The token ids (rows) retrained, distinct, each below the vocabulary.
    #[serde(default)]
    pub token_indices: Vec<usize>,
    /// Which embedding tables; `None`: the model's input embedding
    /// (`embed_tokens`, GPT-2's `wte`, BERT's `word_embeddings`).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// `true` (PEFT's default): rows start at their base values, so a new
    /// adapter changes nothing; `false`: standard normal values.
    #[serde(default = "yes")]
    pub init_weights: bool,
    /// PEFT task type (`CAUSAL_LM`, ...), informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model this adapter was trained on, informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter was saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// PEFT's config has no `modules_to_save`; kept so the shared task
    /// fields have a place, and refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// Keys this version does not model, kept and written back as they were.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for TrainableTokensConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid TrainableTokensConfig")
    }
}

impl TrainableTokensConfig {
    /// A config retraining `tokens` of the input embedding.
    pub fn new(tokens: &[usize]) -> Self {
        TrainableTokensConfig {
            token_indices: tokens.to_vec(),
            ..Default::default()
        }
    }
}

impl MethodConfig for TrainableTokensConfig {
    const PEFT_TYPE: &'static str = "TRAINABLE_TOKENS";
    const METHOD: &'static str = "Trainable tokens";
    const NAME: &'static str = "trainable_tokens";
    /// The input embedding of each architecture here (PEFT asks the model
    /// for it: `get_input_embeddings`).
    const DEFAULT_TARGETS: &'static [(&'static str, &'static [&'static str])] = &[
        ("llama", &["embed_tokens"]),
        ("mistral", &["embed_tokens"]),
        ("gpt2", &["wte"]),
        ("bert", &["word_embeddings"]),
    ];
    const CLI_SETTINGS: &'static [(&'static str, &'static str)] =
        &[("targets", "target_modules"), ("tokens", "token_indices")];

    crate::config_fields!(with []);

    fn token_rows(&self) -> Option<TokenRows<'_>> {
        Some(TokenRows {
            ids: &self.token_indices,
            random: !self.init_weights,
        })
    }

    /// PEFT's config takes any list; an empty one adapts nothing and is
    /// refused here, and the model checks each id against its vocabulary.
    fn validate(&self) -> Result<()> {
        if self.token_indices.is_empty() {
            return Err(PeftError::Config(
                "trainable tokens: `token_indices` is empty; name the token ids to retrain".into(),
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(PeftError::Config(
                "trainable tokens: PEFT's TrainableTokensConfig has no `modules_to_save`; \
                 keep full copies of layers with another method (LoRA's modules_to_save)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The trainable tokens method (a marker): its adapters are rows of
/// embedding tables, so it has no per-linear-layer entries.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainableTokens;

slot_method_without_entries!(
    TrainableTokens,
    TrainableTokensConfig,
    "trainable tokens retrain rows of embedding tables; `{path}` is a linear layer"
);
