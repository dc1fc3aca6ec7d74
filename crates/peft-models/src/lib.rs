//! # peft-models
//!
//! Transformer models written exactly as a downstream author would write
//! them against `peft-core`'s seams: each adaptable linear is a
//! [`LinearSlot`](peft_core::LinearSlot), and [`PeftModel`](peft_core::PeftModel)
//! names the slots with their Hugging Face module paths.
//!
//! - [`llama::Llama`]: `LlamaForCausalLM` (RoPE, grouped-query attention,
//!   RMSNorm, SwiGLU, tied or untied head).
//! - [`gpt2::Gpt2`]: `GPT2LMHeadModel` (`Conv1D` weights are already `[in, out]`).
//! - [`bert::Bert`]: `BertModel` / `BertForSequenceClassification`.
//!
//! [`fixtures`] and [`slot_parity`] are the parity-test support the method
//! crates share.
//!
//! Each loads from a Hugging Face directory (`config.json` +
//! `model.safetensors`), converting `[out, in]` weights to Burn's `[in, out]`
//! at load time only.

pub mod activation;
pub mod assets;
pub mod attention;
pub mod bert;
pub mod checkpoint;
pub mod datasets;
pub mod fixtures;
mod fused;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod llama;
pub mod loss;
pub mod norm;
pub mod packing;
pub mod seq_cls;
pub mod slot_parity;
pub mod tokenizer;
