//! # peft-lora
//!
//! LoRA on any model that exposes `peft-core`'s seams:
//!
//! - [`LoraModel`]: attach named adapters by PEFT's target rules (LoRA,
//!   rsLoRA, DoRA; PEFT's initialisations), activate one or several, disable,
//!   delete, merge/unmerge, merge-and-unload, mixed-batch inference.
//! - Files: `save_pretrained` / `load_adapter` read and write PEFT's
//!   `adapter_config.json` + `adapter_model.safetensors` (non-default
//!   adapters in sub-folders), so adapters move freely between this crate
//!   and Hugging Face PEFT.
//! - PiSSA / OLoRA (`init_lora_weights` `"pissa"`, `"pissa_niter_<n>"`,
//!   `"olora"`): the base weight is split as PEFT splits it, and
//!   [`ConvertToLora::save_as_lora`] writes the trained adapter as a plain
//!   LoRA of the original weights.
//! - [`adalora`]: AdaLoRA (`peft_type: ADALORA`), a LoRA in SVD form whose
//!   [`RankAllocator`] prunes triplets to a budget during training, with
//!   PEFT's orthogonal regularisation and rank-pattern files.
//! - [`weighted`]: [`AddWeightedAdapter::add_weighted_adapter`] with PEFT's `linear`, `cat`, `svd`,
//!   `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (and the `*_svd`
//!   variants).
//!
//! [`Lora`] is a `peft_core::SlotMethod`: it says which layers a config
//! targets, how an entry starts and how its tensors are named in a file.
//! The per-layer arithmetic lives in `peft_core::LinearSlot`, the
//! bookkeeping over a model's adapters in `peft_core::SlotModel`.

pub mod adalora;
mod base_split;
pub mod convert;
mod files;
mod loftq;
mod model;
pub mod rank_allocator;
pub mod weighted;

pub use adalora::{orthogonal_regularization, AdaLora, AdaLoraConfig, AdaLoraModel, RankPattern};
pub use convert::{converts_to_lora, AsLoraConfig, ConvertToLora, InitialFactors};
pub use model::{Lora, LoraModel};
pub use rank_allocator::{adalora_config, RankAllocator};
pub use weighted::{AddWeightedAdapter, Combination, WeightedOptions};
