//! Generation lives in [`peft_core::generate`] (prefix and prompt tuning
//! drive it too); re-exported here for the models' users.

pub use peft_core::generate::{CausalLm, Sampler};
pub use peft_core::kv::{KvCache, LayerCache};
