//! # peft-oft
//!
//! Orthogonal fine-tuning (OFT, BOFT) as Hugging Face PEFT 0.21 defines it, on the
//! model's [`LinearSlot`](peft_core::LinearSlot)s:
//!
//! - [`oft`]: OFT (`peft_type: OFT`), a block-diagonal rotation of each
//!   adapted layer's input, Cayley-parameterised; mergeable, several named
//!   adapters and mixed batches, in PEFT's file format.
//! - [`boft`]: BOFT (`peft_type: BOFT`), butterfly-factored rotations with
//!   PEFT's exact Cayley transform and a scale of the weight's outputs.

pub mod boft;
pub mod oft;

pub use boft::{Boft, BoftConfig, BoftLayout, BoftModel};
pub use oft::{Oft, OftConfig, OftModel};
pub use peft_core::method_config::MethodConfig;
