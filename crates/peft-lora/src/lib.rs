//! # peft-lora
//!
//! LoRA on any model that exposes `peft-core`'s seams:
//!
//! - [`LoraModel`]: attach named adapters by PEFT's target rules (LoRA,
//!   rsLoRA, DoRA; PEFT's initialisations), activate one or several, disable,
//!   delete, merge/unmerge, merge-and-unload, mixed-batch inference.
//! - Files: [`LoraModel::save_pretrained`] / [`LoraModel::load_adapter`] read
//!   and write PEFT's `adapter_config.json` + `adapter_model.safetensors`
//!   (non-default adapters in sub-folders), so adapters move freely between
//!   this crate and Hugging Face PEFT.
//! - [`weighted`]: `add_weighted_adapter` with PEFT's `linear`, `cat`, `svd`,
//!   `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (and the `*_svd`
//!   variants).
//!
//! The per-layer arithmetic lives in `peft_core::LinearSlot`; this crate owns
//! everything that spans a model.

mod files;
mod loftq;
mod model;
pub mod weighted;

pub use model::LoraModel;
pub use weighted::{Combination, WeightedOptions};
