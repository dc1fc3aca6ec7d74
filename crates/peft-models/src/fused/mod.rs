//! Fused CPU kernels where the backend is Flex, with or without autodiff
//! (`burn_flex::ops::fused_attention`, `fused_layer_norm` and
//! `fused_swiglu`, peft-rs patches in `vendor/burn-flex`): attention, layer
//! norm and Llama's gated activation, each one pass
//! forward and one backward where Burn composes them from tensor ops.
//! Every other backend keeps the composed ops.
//!
//! Why a run-time type test instead of a backend trait: see
//! `peft_core::fused`, which holds the type tests shared with the linear
//! layers' kernel.

pub(crate) mod attention;
pub(crate) mod layer_norm;
pub(crate) mod swiglu;

pub(crate) use peft_core::fused::{primitive, wrap, FlexAutodiff, FlexAutodiffTensor};
