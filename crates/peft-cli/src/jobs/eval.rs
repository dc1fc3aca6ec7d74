//! `peft eval`: a saved adapter's accuracy (sequence classification) or
//! perplexity (causal LM) on held-out data.

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
use crate::tasks::{self, Adapted, Arch, CausalModel, Classifier, Encoded, Encoder};
use crate::train::Metric;

/// `peft eval`: the metric of `model` with the adapter folder `adapter`
/// (a run's `best/` for seq-cls, holding the head) on all of `data`.
pub fn eval<B: Backend>(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    task: Task,
    columns: (&str, &str),
    block_size: usize,
    device: &B::Device,
) -> Result<Metric> {
    let tok = tasks::tokenizer_of(model)?;
    match (task, tasks::arch_of(model)?) {
        (Task::SeqCls, Arch::Bert) => {
            let (dir, labels, enc) = seq_cls_eval_data(adapter, data_file, columns)?;
            let bert = Bert::<B>::load(model, device)?;
            let (bert, head) = if dir.join("head.safetensors").is_file() {
                let d = bert.config.hidden_size;
                let head = tasks::load_head::<B>(dir, d, labels.len(), device)?;
                (bert, Some(head))
            } else {
                let classes = head_classes(dir, "classifier", &labels)?;
                (bert.with_classifier(classes)?, None)
            };
            let encoder = tasks::load_adapted(bert, Some(dir))?;
            tasks::accuracy(&Classifier { encoder, head }, &tok, &enc)
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

/// The adapter folder of a seq-cls evaluation, its classes and the data.
/// Our runs name their classes in `labels.json`; an adapter trained by
/// PEFT does not, and its head's rows are then the data's labels in
/// sorted order (PEFT users' `0`, `1`, ...).
fn seq_cls_eval_data<'a>(
    adapter: Option<&'a Path>,
    data_file: &Path,
    columns: (&str, &str),
) -> Result<(&'a Path, Vec<String>, Encoded)> {
    let dir = adapter.ok_or_else(|| {
        PeftError::Config(
            "seq-cls evaluation needs --adapter (a run's best/ folder with its head)".into(),
        )
    })?;
    let examples = data::read_labelled(data_file, columns.0, columns.1)?;
    let labels = match dir.join("labels.json").is_file() {
        true => tasks::read_labels(dir)?,
        false => data::label_set(&examples),
    };
    let ids = data::label_ids(&examples, &labels, data_file)?;
    let enc = Encoded {
        texts: examples.into_iter().map(|e| e.text).collect(),
        labels: ids,
    };
    Ok((dir, labels, enc))
}

/// The classes of the copy of head `head` in adapter folder `dir` (the
/// number of `labels` when it has none), at least as many as `labels`.
fn head_classes(dir: &Path, head: &str, labels: &[String]) -> Result<usize> {
    let classes = tasks::head_labels(dir, head)?.unwrap_or(labels.len());
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
    columns: (&str, &str),
    tok: &Tokenizer,
    device: &B::Device,
) -> Result<Metric>
where
    B: Backend,
    M: CausalModel<B> + ScoreHead<B> + Module<B> + ModuleDisplay,
    Adapted<B, M>: Encoder<B>,
{
    let (dir, labels, enc) = seq_cls_eval_data(adapter, data_file, columns)?;
    let classes = head_classes(dir, "score", &labels)?;
    let decoder = M::load_from(model, device)?.with_score(classes)?;
    let encoder = tasks::load_adapted(decoder, Some(dir))?;
    tasks::accuracy(
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
