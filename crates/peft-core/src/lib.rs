//! # peft-core
//!
//! The seams through which any Burn model becomes PEFT-able, and what every
//! method crate shares:
//!
//! - [`slot::LinearSlot`]: the adaptable linear layer a model holds in place of
//!   `burn::nn::Linear`. It carries the frozen base weight and the named adapter
//!   entries attached to it, and runs them (merged, unmerged, several at once,
//!   or one per batch row).
//! - [`model::PeftModel`]: the one trait a model implements: its slots named
//!   by their Hugging Face module paths, its sizes, and one forward entry
//!   over an [`input::ModelInput`] (ids or embeddings, mask, key/value cache,
//!   residual hook) through which every method reaches it.
//! - [`slot_model::SlotModel`]: the wrapper every slot method shares (named
//!   adapters, activation, merging, mixed batches, PEFT's files); a method
//!   implements [`slot_method::SlotMethod`].
//! - [`routing`]: a per-forward context (per-row adapter names for mixed-batch
//!   inference) that reaches every slot without changing forward signatures.
//! - [`config`], [`target`]: PEFT's `adapter_config.json` and its target-module
//!   rules.
//! - [`io`]: safetensors reading and atomic writing, the only place where PEFT
//!   key names and the `[out, in]` layout exist.
//! - [`error::PeftError`]: every user mistake is a typed error.
//!
//! See `docs/ARCHITECTURE.md` for the invariants.

// Linked for their features only (multi-threading, SIMD); see the workspace manifest.
use burn_flex as _;
use burn_ndarray as _;

pub mod backends;
pub mod compare;
pub mod config;
pub mod count;
pub mod error;
pub mod fused;
pub mod generate;
pub mod host;
pub mod input;
pub mod io;
pub mod kv;
pub mod layered;
pub mod loss;
pub mod memory;
pub mod method_config;
pub mod model;
pub mod modules_to_save;
pub mod named;
mod nf4_dynamic_map;
pub mod prompt_learning;
pub mod quant;
mod regex_match;
pub mod rng;
pub mod routing;
pub mod settings;
pub mod slot;
pub mod slot_model;
pub mod target;
pub mod virtual_model;

pub use config::{Ia3Config, LoraConfig, TargetModules};
pub use count::ParamCount;
pub use error::{PeftError, Result};
pub use host::AdapterHost;
pub use input::{ModelDims, ModelInput, Tokens};
pub use model::PeftModel;
pub use slot::method as slot_method;
pub use slot::{
    BaseSplit, EmbeddingSlot, Ia3Entry, Ia3Meta, LinearSlot, LoraEntry, LoraMeta, NormParams,
    NormSlot, SlotEntry,
};
pub use slot_method::SlotMethod;
pub use slot_model::SlotModel;

/// A model carrying named VeRA adapters (see [`SlotModel`]).
pub type VeraModel<B, M> = SlotModel<B, M, slot::Vera>;

/// A model carrying named LN tuning adapters (see [`SlotModel`]).
pub type LnTuningModel<B, M> = SlotModel<B, M, slot::LnTuning>;

/// A model carrying named trainable tokens adapters (see [`SlotModel`]).
pub type TrainableTokensModel<B, M> = SlotModel<B, M, slot::TrainableTokens>;

/// The adapter name PEFT uses when none is given.
pub const DEFAULT_ADAPTER: &str = "default";

/// The per-row adapter name that means "no adapter" in mixed-batch inference.
pub const BASE_ROW: &str = "__base__";
