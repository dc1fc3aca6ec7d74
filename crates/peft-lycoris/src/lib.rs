//! # peft-lycoris
//!
//! The LyCORIS family as Hugging Face PEFT 0.21 defines it, on the model's
//! [`LinearSlot`](peft_core::LinearSlot)s:
//!
//! - [`loha`]: LoHa, the Hadamard product of two low-rank products
//!   (`peft_type: LOHA`), mergeable, several named adapters and mixed
//!   batches, in PEFT's file format.

pub mod loha;

pub use loha::{Loha, LohaConfig, LohaModel};
