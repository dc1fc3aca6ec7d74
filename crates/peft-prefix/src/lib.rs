//! # peft-prefix
//!
//! Prefix tuning (Li & Liang, 2021) as Hugging Face PEFT defines it, for any
//! Burn model implementing [`PeftModel`](peft_core::PeftModel) (through its
//! [`ModelInput::cache`](peft_core::ModelInput::cache)):
//! `num_virtual_tokens` learned keys and values for every attention layer,
//! put before the real tokens' own in each layer's [`KvCache`](peft_core::kv::KvCache)
//! entry. Real tokens attend to all of them and their positions start at
//! `num_virtual_tokens`; no RoPE touches the prefix.
//!
//! - [`PrefixEncoder`]: the learned prefix, either stored directly or
//!   reparameterised (Embedding → Linear → Tanh → Linear) for training and
//!   folded away for saving, as PEFT does.
//! - [`PrefixTuningModel`]: a model with named prefixes: switch per request,
//!   route batch rows to different prefixes, generate through the model's own
//!   KV cache, save and load PEFT's files (`prompt_embeddings`).

mod encoder;
mod model;

pub use encoder::{PrefixEncoder, PrefixProjection};
pub use model::PrefixTuningModel;
pub use peft_core::prompt_learning::PromptLearningConfig;
