//! What `peft train` / `peft eval` run: a model (BERT for sequence
//! classification; Llama or GPT-2 for causal LM) with one method (LoRA,
//! DoRA, (IA)³, LoHa, LoKr, OFT, a bottleneck adapter, a prefix or a soft
//! prompt), the loss and the evaluation. One file per concern:
//! [`method`] (which method, from flags or a folder), [`adalora`]
//! (what an AdaLoRA run adds to the loop), [`arch`] (which
//! model), [`adapted`] (the model with its method), [`classify`]
//! (sequence classification), [`problem`] (what its labels mean: one
//! class, a subset of labels, or real values).

use std::path::{Path, PathBuf};

pub mod adalora;
pub mod adapted;
pub mod arch;
pub mod classify;
pub mod method;
pub mod problem;

pub use adapted::*;
pub use arch::*;
pub use classify::*;
pub use method::*;
pub use peft_core::model::device_of;
pub use problem::{read_problem_type, write_problem_type, ProblemType, Targets};

/// The path of a run's best checkpoint.
pub fn best_dir(out: &Path) -> PathBuf {
    out.join("best")
}
