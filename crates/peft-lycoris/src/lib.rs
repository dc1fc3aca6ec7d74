//! # peft-lycoris
//!
//! The LyCORIS family as Hugging Face PEFT 0.21 defines it, on the model's
//! [`LinearSlot`](peft_core::LinearSlot)s, each mergeable, with several
//! named adapters and mixed batches, in PEFT's file format:
//!
//! - [`loha`]: LoHa, the Hadamard product of two low-rank products
//!   (`peft_type: LOHA`);
//! - [`lokr`]: LoKr, the Kronecker product of two factors, each full or
//!   low-rank (`peft_type: LOKR`);
//! - [`lycoris`]: what they share (rank fields and their checks, their
//!   factors in PEFT's file); reading a config, default targets and target
//!   rules are `peft-core`'s [`MethodConfig`].

pub mod loha;
pub mod lokr;
pub mod lycoris;

pub use loha::{Loha, LohaConfig, LohaModel};
pub use lokr::{Lokr, LokrConfig, LokrModel};
pub use lycoris::LycorisConfig;
pub use peft_core::method_config::MethodConfig;
