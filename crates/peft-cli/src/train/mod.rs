//! The training loop behind `peft train`: AdamW with weight decay, warm-up
//! then linear or cosine decay, gradient accumulation and clipping,
//! evaluation on a held-out split with early stopping, a NaN guard, a
//! metrics log (JSONL) and atomic checkpoints of the best model.
//!
//! The loop is generic: the caller gives the trainable module, a loss on a
//! batch of example indices, an evaluation on the inference module and a
//! checkpoint writer ([`Trainer::fit`]). Only parameters that require
//! gradients move.
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | [`TrainConfig`], [`Schedule`], [`Cluster`] |
//! | `trainer.rs` | [`Trainer`]: `step`, `evaluate`, `checkpoint`, `fit`; [`Metric`], [`Outcome`] |
//! | `run.rs` | [`RunDir`] (metrics log, atomic checkpoints), [`RunState`] (what `--resume` reads) |
//! | `optimizer.rs` | AdamW's state in a checkpoint, keyed by visiting order |
//! | `loraplus.rs` | [`Optimizers`]: one AdamW, or LoRA+'s three parameter groups |
//! | `grads.rs` | [`BatchLoss`], the backward pass, the non-finite check |
//! | `hook.rs` | [`StepHook`]: a method's work around each step (AdaLoRA's allocator) |
//! | `peers.rs` | data parallelism over Burn's collective, [`replica_device`] |

mod config;
mod grads;
mod hook;
mod loraplus;
mod optimizer;
mod peers;
mod run;
mod trainer;

pub use config::{Cluster, Schedule, TrainConfig};
pub use grads::BatchLoss;
pub use hook::StepHook;
pub use loraplus::{groups as loraplus_groups, Group as LoraPlusGroup, Optimizers};
pub use peers::replica_device;
pub use run::{RunDir, RunState};
pub use trainer::{Metric, Outcome, Saving, Trainer};
