//! Training losses live in [`peft_core::loss`]; re-exported here.

pub use peft_core::loss::*;
