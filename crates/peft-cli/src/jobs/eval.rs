//! `peft eval`: a saved adapter's accuracy, micro-F1 or mean squared error
//! (sequence classification, by [`ProblemType`]) or perplexity (causal LM)
//! on held-out data.

use std::path::Path;

use burn::module::{Module, ModuleDisplay};
use burn::tensor::backend::Backend;
use peft_core::{PeftError, Result};
use peft_models::bert::Bert;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::seq_cls::ScoreHead;
use peft_models::tokenizer::Tokenizer;

use super::Task;
use crate::data;
use crate::tasks::{self, Adapted, Arch, CausalModel, Classifier, Encoded, Encoder, ProblemType};
use crate::train::Metric;

/// How a seq-cls evaluation reads its data: the text and label columns, and
/// the problem type (`None`: the run's, or inferred). `("text", "label")`
/// converts, with the problem type left to the run.
#[derive(Debug, Clone, Copy)]
pub struct SeqClsColumns<'a> {
    /// The text column.
    pub text: &'a str,
    /// The label column.
    pub label: &'a str,
    /// transformers' `problem_type`, overriding the run's.
    pub problem_type: Option<&'a str>,
}

impl<'a> From<(&'a str, &'a str)> for SeqClsColumns<'a> {
    fn from((text, label): (&'a str, &'a str)) -> Self {
        SeqClsColumns {
            text,
            label,
            problem_type: None,
        }
    }
}

/// `peft eval`: the metric of `model` with the adapter folder `adapter`
/// (a run's `best/` for seq-cls, holding the head) on all of `data`.
pub fn eval<'c, B: Backend>(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    task: Task,
    columns: impl Into<SeqClsColumns<'c>>,
    block_size: usize,
    device: &B::Device,
) -> Result<Metric> {
    let columns = columns.into();
    let tok = tasks::tokenizer_of(model)?;
    match (task, tasks::arch_of(model)?) {
        (Task::SeqCls, Arch::Bert) => {
            let dir = adapter_dir(adapter)?;
            let bert = Bert::<B>::load(model, device)?;
            let adapterhub_head = peft_adapter::head::read_head_config(dir)?;
            let (bert, head, enc) = if dir.join("head.safetensors").is_file() {
                let (labels, enc) = seq_cls_eval_data(dir, None, None, data_file, columns)?;
                let d = bert.config.hidden_size;
                let head = tasks::load_head::<B>(dir, d, labels.len(), device)?;
                (bert, Some(head), enc)
            } else if let Some(h) = adapterhub_head {
                // AdapterHub's head, loaded with the adapter: its labels
                // name the outputs when the folder has no labels.json.
                let outputs = Some(h.num_labels);
                let names = Some(h.labels());
                let (labels, enc) = seq_cls_eval_data(dir, outputs, names, data_file, columns)?;
                head_classes(dir, outputs, &labels)?;
                (bert, None, enc)
            } else {
                let outputs = tasks::head_labels(dir, "classifier")?;
                let (labels, enc) = seq_cls_eval_data(dir, outputs, None, data_file, columns)?;
                let classes = head_classes(dir, outputs, &labels)?;
                (bert.with_classifier(classes)?, None, enc)
            };
            let encoder = tasks::load_adapted(bert, Some(dir))?;
            tasks::classifier_metric(&Classifier { encoder, head }, &tok, &enc)
        }
        (Task::SeqCls, Arch::Llama) => {
            eval_seq_cls_decoder::<B, Llama<B>>(model, adapter, data_file, columns, &tok, device)
        }
        (Task::SeqCls, Arch::Gpt2) => {
            eval_seq_cls_decoder::<B, Gpt2<B>>(model, adapter, data_file, columns, &tok, device)
        }
        (Task::CausalLm, Arch::Llama) => {
            eval_lm::<B, Llama<B>>(model, adapter, data_file, &tok, block_size, device)
        }
        (Task::CausalLm, Arch::Gpt2) => {
            eval_lm::<B, Gpt2<B>>(model, adapter, data_file, &tok, block_size, device)
        }
        (t, a) => Err(PeftError::Config(format!(
            "task {t:?} does not fit a {a:?} model"
        ))),
    }
}

/// The adapter folder of a seq-cls evaluation.
fn adapter_dir(adapter: Option<&Path>) -> Result<&Path> {
    adapter.ok_or_else(|| {
        PeftError::Config(
            "seq-cls evaluation needs --adapter (a run's best/ folder with its head)".into(),
        )
    })
}

/// The outputs' names and the data of a seq-cls evaluation with the
/// adapter folder `dir`, whose head copy has `outputs` rows if it has one.
/// Our runs name their outputs in `labels.json` and their problem type in
/// `task.json`; an adapter trained by PEFT has neither: its head's rows are
/// then the data's labels in sorted order (PEFT users' `0`, `1`, ...), and
/// its problem is transformers' inference (one output: a regression).
fn seq_cls_eval_data(
    dir: &Path,
    outputs: Option<usize>,
    head_names: Option<Vec<String>>,
    data_file: &Path,
    columns: SeqClsColumns<'_>,
) -> Result<(Vec<String>, Encoded)> {
    let examples = data::read_labelled(data_file, columns.text, columns.label)?;
    let problem = match columns.problem_type {
        Some(name) => ProblemType::parse(name)?,
        None => {
            let outputs = outputs.unwrap_or(0);
            ProblemType::of_adapter(Some(dir), outputs, ProblemType::inferred(&examples))?
        }
    };
    let (labels, targets) = match dir.join("labels.json").is_file() {
        true => {
            let labels = tasks::read_labels(dir)?;
            let targets = problem.targets_for(&examples, &labels, data_file)?;
            (labels, targets)
        }
        false => match head_names.filter(|n| names_every_label(n, &examples)) {
            Some(labels) => {
                let targets = problem.targets_for(&examples, &labels, data_file)?;
                (labels, targets)
            }
            None => problem.targets(&examples, columns.label, data_file)?,
        },
    };
    let enc = Encoded {
        texts: examples.into_iter().map(|e| e.text).collect(),
        problem,
        targets,
    };
    Ok((labels, enc))
}

/// Whether a head's label names cover every label of the data (AdapterHub
/// heads name their outputs; `LABEL_i` defaults name no data's labels).
fn names_every_label(names: &[String], examples: &[data::Example]) -> bool {
    examples
        .iter()
        .all(|e| e.label_list().iter().all(|l| names.contains(l)))
}

/// The classes of a head copy with `outputs` rows (the number of `labels`
/// when there is no copy), at least as many as `labels`.
fn head_classes(dir: &Path, outputs: Option<usize>, labels: &[String]) -> Result<usize> {
    let classes = outputs.unwrap_or(labels.len());
    if labels.len() > classes {
        return Err(PeftError::Config(format!(
            "{}: the adapter's head has {classes} classes, the data {} labels ({labels:?})",
            dir.display(),
            labels.len()
        )));
    }
    Ok(classes)
}

/// Accuracy of a decoder's `score` head with a SEQ_CLS adapter.
fn eval_seq_cls_decoder<B, M>(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    columns: SeqClsColumns<'_>,
    tok: &Tokenizer,
    device: &B::Device,
) -> Result<Metric>
where
    B: Backend,
    M: CausalModel<B> + ScoreHead<B> + Module<B> + ModuleDisplay,
    Adapted<B, M>: Encoder<B>,
{
    let dir = adapter_dir(adapter)?;
    let outputs = tasks::head_labels(dir, "score")?;
    let (labels, enc) = seq_cls_eval_data(dir, outputs, None, data_file, columns)?;
    let classes = head_classes(dir, outputs, &labels)?;
    let decoder = M::load_from(model, device)?.with_score(classes)?;
    let encoder = tasks::load_adapted(decoder, Some(dir))?;
    tasks::classifier_metric(
        &Classifier {
            encoder,
            head: None,
        },
        tok,
        &enc,
    )
}

fn eval_lm<B: Backend, M: CausalModel<B> + Module<B>>(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    tok: &Tokenizer,
    block_size: usize,
    device: &B::Device,
) -> Result<Metric> {
    let ids = tok.encode(&data::read_text(data_file)?)?;
    let blocks = data::blocks(&ids, block_size);
    if blocks.is_empty() {
        return Err(PeftError::Checkpoint {
            path: data_file.to_path_buf(),
            message: format!("{} tokens: not one block of {block_size}", ids.len()),
        });
    }
    let base = M::load_from(model, device)?;
    let lm = tasks::load_adapted(base, adapter)?;
    tasks::perplexity(&lm, &blocks, device)
}
