//! # peft-adapter
//!
//! Task modules plugged into a frozen backbone:
//!
//! - [`ia3`]: (IA)³ as Hugging Face PEFT defines it — learned vectors that
//!   rescale targeted linear layers, mergeable, in PEFT's file format.
//! - [`bottleneck`]: bottleneck adapters as AdapterHub defines them
//!   (`seq_bn` / Pfeiffer, `double_seq_bn` / Houlsby, `par_bn`), with
//!   AdapterHub's compositions (`Stack`, `Parallel`, `BatchSplit`, `Average`,
//!   `Fuse`) and its `adapter_config.json` / `pytorch_adapter.bin` layout.
//! - [`head`]: AdapterHub's prediction heads (classification, multi-label,
//!   tagging) saved beside an adapter (`head_config.json` +
//!   `model_head.safetensors`).

pub mod bottleneck;
pub mod config;
pub mod head;
pub mod ia3;
pub mod model;

pub use bottleneck::{Activation, Bottleneck, BottleneckAdapter, Fusion, FusionLayer, Setup};
pub use config::{BnConfig, FusionConfig};
pub use head::{HeadConfig, HeadLogits, HeadTargets, HeadType, PredictionHead};
pub use ia3::{Ia3, Ia3Model};
pub use model::{AdapterModel, AdapterSet};
