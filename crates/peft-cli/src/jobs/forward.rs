//! `peft forward`: the model's outputs on given token ids, the hook for
//! checking parity with any reference.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use peft_adapter::HeadLogits;
use peft_core::io::HostTensor;
use peft_core::{PeftError, Result};
use peft_models::bert::Bert;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::seq_cls::ScoreHead;

use crate::tasks::{self, Arch, CausalModel, Encoder};

/// `peft forward`: runs the model (with an adapter folder or none) on the
/// token ids of a JSON file (`[[id, ...], ...]`, rows of equal length) and
/// writes the output — logits `[b, t, vocab]` for Llama / GPT-2, last hidden
/// states `[b, t, d]` for BERT, a head's logits where the model or the
/// adapter folder has one (a `*ForSequenceClassification` head or its
/// copy, an AdapterHub prediction head) — as `output` in a safetensors
/// file: the hook for checking parity with any reference.
pub fn forward<B: Backend>(
    model: &Path,
    adapter: Option<&Path>,
    ids_file: &Path,
    out: &Path,
    device: &B::Device,
) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(ids_file).map_err(|source| PeftError::Io {
        path: ids_file.to_path_buf(),
        source,
    })?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: ids_file.to_path_buf(),
        source,
    })?;
    let t = rows.first().map_or(0, Vec::len);
    if t == 0 || rows.iter().any(|r| r.len() != t) {
        return Err(PeftError::Checkpoint {
            path: ids_file.to_path_buf(),
            message: "token ids must be a non-empty list of non-empty rows of equal length".into(),
        });
    }
    let flat: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
    let ids = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(flat, [rows.len(), t]),
        device,
    );
    let output = match tasks::arch_of(model)? {
        Arch::Llama => forward_decoder::<B, Llama<B>>(model, adapter, ids)?,
        Arch::Gpt2 => forward_decoder::<B, Gpt2<B>>(model, adapter, ids)?,
        Arch::Bert => {
            let mut bert = Bert::<B>::load(model, device)?;
            // A sequence-classification adapter carries its head's copy:
            // the model gets a head of that many classes to carry it.
            if let Some(labels) = adapter
                .map(|dir| tasks::head_labels(dir, "classifier"))
                .transpose()?
                .flatten()
            {
                bert = bert.with_classifier(labels)?;
            }
            let has_head = bert.pooler.is_some() && bert.classifier.is_some();
            let mask = burn::tensor::Tensor::ones([rows.len(), t], device);
            let adapted = tasks::load_adapted(bert, adapter)?;
            match &adapted {
                // An AdapterHub head saved beside the adapter: its logits,
                // `[b, labels]` or, tagging, `[b, t, labels]`.
                tasks::Adapted::Adapters(a) if a.active_head().is_some() => {
                    match a.forward_head(ids, Some(mask))? {
                        HeadLogits::PerSequence(x) => HostTensor::from_tensor(x),
                        HeadLogits::PerToken(x) => HostTensor::from_tensor(x),
                    }
                }
                _ if has_head => HostTensor::from_tensor(adapted.classify(ids, mask)?),
                _ => HostTensor::from_tensor(adapted.hidden(ids, mask)?),
            }
        }
    };
    let shape = output.shape.clone();
    peft_core::io::write_atomic(
        out,
        &peft_core::io::serialize_safetensors(&[("output".to_string(), output)], None),
    )?;
    Ok(shape)
}

/// A decoder's logits, or its class logits when it has a `score` head
/// (`*ForSequenceClassification`, or an adapter carrying a copy of one).
fn forward_decoder<B: Backend, M: CausalModel<B> + ScoreHead<B> + Module<B>>(
    model: &Path,
    adapter: Option<&Path>,
    ids: burn::tensor::Tensor<B, 2, burn::tensor::Int>,
) -> Result<peft_core::io::HostTensor> {
    let mut decoder = M::load_from(model, &ids.device())?;
    if let Some(labels) = adapter
        .map(|dir| tasks::head_labels(dir, "score"))
        .transpose()?
        .flatten()
    {
        decoder = decoder.with_score(labels)?;
    }
    if decoder.score().is_none() {
        return forward_lm::<B, M>(model, adapter, ids);
    }
    let pad = decoder.pad_token_id();
    let adapted = tasks::load_adapted(decoder, adapter)?;
    Ok(peft_core::io::HostTensor::from_tensor(
        adapted.classify(ids, pad)?,
    ))
}

fn forward_lm<B: Backend, M: CausalModel<B> + Module<B>>(
    model: &Path,
    adapter: Option<&Path>,
    ids: burn::tensor::Tensor<B, 2, burn::tensor::Int>,
) -> Result<peft_core::io::HostTensor> {
    let base = M::load_from(model, &ids.device())?;
    let lm = tasks::load_adapted(base, adapter)?;
    Ok(peft_core::io::HostTensor::from_tensor(lm.logits(ids)?))
}
