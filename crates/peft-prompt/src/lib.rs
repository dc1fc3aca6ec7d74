//! # peft-prompt
//!
//! Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021) as
//! Hugging Face PEFT defines them, for any Burn model implementing
//! [`PeftModel`](peft_core::PeftModel) (through
//! [`Tokens::Embeds`](peft_core::Tokens::Embeds)): `num_virtual_tokens`
//! learned embeddings put before the input embeddings, the attention mask
//! extended over them, positions `0..n_virtual + t`.
//!
//! - [`PromptEncoder`]: the soft prompt, stored directly (prompt tuning, and
//!   any loaded adapter) or produced by P-tuning's MLP or bidirectional-LSTM
//!   encoder, which is folded away for saving as PEFT does.
//! - [`PromptTuningModel`]: a model with named prompts: switch per request,
//!   route batch rows to different prompts, generate through the model's KV
//!   cache, save and load PEFT's files (`prompt_embeddings`).
//!
//! The model's output covers the virtual positions too (as PEFT's); for a
//! causal-LM loss use [`causal_lm_loss_after_prompt`](peft_core::loss::causal_lm_loss_after_prompt).

mod encoder;
mod model;

pub use encoder::{BiLstm, LstmDirection, MlpHead, PromptEncoder};
pub use model::PromptTuningModel;
pub use peft_core::prompt_learning::{PromptEncoderType, PromptLearningConfig, PromptTuningInit};
