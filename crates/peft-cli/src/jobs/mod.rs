//! The jobs behind the `peft` subcommands, as library functions: one file
//! per subcommand, and here what they share (the training job's
//! description, the report a run writes).

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use peft_core::{ParamCount, PeftError, Result};
use serde_json::json;

use crate::tasks::Method;
pub use crate::tasks::Quantize;
use crate::train::{Metric, TrainConfig};

mod eval;
mod forward;
mod generate;
mod inspect;
mod merge;
mod train;

pub use eval::{eval, SeqClsColumns};
pub use forward::forward;
pub use generate::generate;
pub use inspect::inspect;
pub use merge::{merge, MergeDtype};
/// Beside a reparameterised prefix's or prompt's adapter in a checkpoint:
/// the full encoder, from which `--resume` continues.
pub use peft_core::prompt_learning::ENCODER_STATE_FILE;
pub use train::train;

/// What to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sequence classification (BERT): labelled text.
    SeqCls,
    /// Causal language modelling (Llama, GPT-2): plain text.
    CausalLm,
}

/// Everything `peft train` needs.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Model folder or GGUF file.
    pub model: PathBuf,
    /// Dataset file.
    pub data: PathBuf,
    /// The task.
    pub task: Task,
    /// The method and its config.
    pub method: Method,
    /// Run folder (metrics, checkpoints).
    pub out: PathBuf,
    /// Optimiser, schedule, evaluation.
    pub train: TrainConfig,
    /// Text column (seq-cls).
    pub text_column: String,
    /// Label column (seq-cls).
    pub label_column: String,
    /// transformers' `problem_type` (seq-cls); `None`: the model's
    /// `config.json`, else inferred from the labels
    /// ([`ProblemType::of_run`](crate::tasks::ProblemType::of_run)).
    pub problem_type: Option<String>,
    /// Held-out share.
    pub held_out: f64,
    /// Use at most this many training examples (blocks for causal LM).
    pub max_train: Option<usize>,
    /// Tokens per block (causal LM).
    pub block_size: usize,
    /// Continue the run in `out` from its `last/` checkpoint.
    pub resume: bool,
    /// Keep the frozen base quantized (QLoRA); `None`: `f32`.
    pub quantize: Option<Quantize>,
}

impl TrainJob {
    /// The job of the run in `dir`, from its `train_config.json` and the
    /// method of its `last/` checkpoint, to continue it.
    pub fn resume_from(dir: &Path) -> Result<TrainJob> {
        let path = dir.join("train_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
            path: path.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| PeftError::Json {
                path: path.clone(),
                source,
            })?;
        fn get<T: serde::de::DeserializeOwned>(
            v: &serde_json::Value,
            k: &str,
            path: &Path,
        ) -> Result<T> {
            let x = v.get(k).cloned().ok_or_else(|| PeftError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("no `{k}`: not a run folder of this version"),
            })?;
            serde_json::from_value(x).map_err(|source| PeftError::Json {
                path: path.to_path_buf(),
                source,
            })
        }
        let task: String = get(&v, "task", &path)?;
        let quantize = match v.get("quantize").and_then(|q| q.as_str()) {
            Some(q) => Some(Quantize::parse(q)?),
            None => None,
        };
        Ok(TrainJob {
            model: get(&v, "model", &path)?,
            data: get(&v, "data", &path)?,
            task: if task == "seq-cls" {
                Task::SeqCls
            } else {
                Task::CausalLm
            },
            method: Method::detect(&dir.join("last"))?,
            out: dir.to_path_buf(),
            train: get(&v, "train", &path)?,
            text_column: get(&v, "text_column", &path)?,
            label_column: get(&v, "label_column", &path)?,
            // Runs from before problem types were single-label.
            problem_type: v
                .get("problem_type")
                .and_then(|p| p.as_str())
                .map(str::to_string),
            held_out: get(&v, "held_out", &path)?,
            max_train: get(&v, "max_train", &path)?,
            block_size: get(&v, "block_size", &path)?,
            resume: true,
            quantize,
        })
    }

    fn config_json(&self, extra: serde_json::Value) -> serde_json::Value {
        let task = match self.task {
            Task::SeqCls => "seq-cls",
            Task::CausalLm => "causal-lm",
        };
        let mut v = json!({
            "method": self.method.name(), "task": task, "model": self.model, "data": self.data,
            "train": self.train, "held_out": self.held_out, "text_column": self.text_column,
            "label_column": self.label_column, "problem_type": self.problem_type,
            "max_train": self.max_train,
            "block_size": self.block_size,
            "quantize": self.quantize.map(Quantize::name),
        });
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    }

    fn last(&self) -> Option<PathBuf> {
        self.resume.then(|| self.out.join("last"))
    }
}

/// What a run reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// Held-out metric before training.
    pub before: Metric,
    /// Held-out metric of the kept (best) model.
    pub after: Metric,
    /// Trainable and all parameters (the head included for seq-cls).
    pub params: ParamCount,
    /// Of `params.all`, the frozen base's parameters held quantized (GGUF
    /// blocks or NF4 codes, per `--quantize`) rather than in `f32`; 0 for an
    /// `f32` base.
    pub quantized_params: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Where the best checkpoint is.
    pub best: PathBuf,
    /// Training and held-out sizes.
    pub sizes: (usize, usize),
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    peft_core::io::write_atomic(path, text.as_bytes())
}

/// Parameters of `model` held quantized: its count of all parameters less
/// those that tensors hold (a quantized weight is a parameter no tensor
/// holds).
fn quantized_params<B: Backend, M: peft_core::PeftModel<B>>(model: &M) -> usize {
    model.param_count().all - model.num_params()
}
