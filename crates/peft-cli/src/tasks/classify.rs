//! Sequence classification: what the jobs need of a model
//! ([`Encoder`]: its own head, or hidden states for a mean-pooled head of
//! ours), the [`Classifier`] that trains, its loss and accuracy, and the
//! pooled head's files.

use std::path::Path;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_adapter::{AdapterModel, HeadLogits};
use peft_core::io::{read_safetensors, serialize_safetensors, write_atomic, HostTensor};
use peft_core::model::device_of;
use peft_core::{PeftError, Result};
use peft_models::bert::Bert;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::tokenizer::Tokenizer;

use super::adapted::Adapted;
use super::problem::{ProblemType, Score, Targets};
use crate::train::Metric;

/// The decoders classify with their own `score` head: `hidden` is never
/// asked of them (no mean-pooled head of ours sits on a decoder).
macro_rules! decoder_encoder {
    ($model:ident) => {
        impl<B: Backend> Encoder<B> for Adapted<B, $model<B>> {
            fn hidden(&self, _ids: Tensor<B, 2, Int>, _mask: Tensor<B, 2>) -> Result<Tensor<B, 3>> {
                Err(PeftError::State(
                    "a decoder classifies with its `score` head, not pooled hidden states".into(),
                ))
            }

            fn classify(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
                self.classify_masked(ids, mask)
            }
        }
    };
}
decoder_encoder!(Llama);
decoder_encoder!(Gpt2);

/// A model's hidden states and its own classification head.
pub trait Encoder<B: Backend> {
    /// `[b, t, d]` for `ids: [b, t]` with `mask: [b, t]`.
    fn hidden(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 3>>;

    /// The logits `[b, labels]` of the model's own head
    /// (`BertForSequenceClassification`'s pooler and classifier).
    fn classify(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 2>>;
}

impl<B: Backend> Encoder<B> for Bert<B> {
    fn hidden(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 3>> {
        Ok(self.encode(ids, Some(mask)))
    }

    fn classify(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        Bert::classify(self, ids, Some(mask))
    }
}

impl<B: Backend> Encoder<B> for AdapterModel<B, Bert<B>> {
    fn hidden(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 3>> {
        self.forward(ids, Some(mask))
    }

    /// The active AdapterHub head (saved beside the adapter), else the
    /// model's own pooler and classifier.
    fn classify(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        if self.active_head().is_none() {
            return self.model.classify_hidden(self.hidden(ids, mask)?);
        }
        match self.forward_head(ids, Some(mask))? {
            HeadLogits::PerSequence(logits) => Ok(logits),
            HeadLogits::PerToken(_) => Err(PeftError::Config(
                "a tagging head predicts per token; sequence classification needs a \
                 classification head"
                    .into(),
            )),
        }
    }
}

/// An encoder and its classification head: the model's own (`head: None`;
/// for a slot method the adapter trains its copy, PEFT's
/// `modules_to_save`; bottleneck adapters train AdapterHub's head saved
/// beside them), or a linear head over mean-pooled hidden states (runs of
/// earlier versions, evaluated as they were trained).
#[derive(Module, Debug)]
pub struct Classifier<B: Backend, E: Module<B>> {
    /// The adapted encoder.
    pub encoder: E,
    /// `[d, labels]` over mean pooling, or `None` for the model's own head.
    pub head: Option<Linear<B>>,
}

impl<B: Backend, E: Encoder<B> + Module<B>> Classifier<B, E> {
    /// Logits `[b, labels]`.
    pub fn logits(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        let Some(head) = &self.head else {
            return self.encoder.classify(ids, mask);
        };
        let h = self.encoder.hidden(ids, mask.clone())?;
        Ok(head.forward(Bert::pool_mean(h, mask, false)))
    }
}

/// Tokenised, labelled examples and what their labels mean.
pub struct Encoded {
    /// Texts (tokenised per batch, padded to the batch's longest).
    pub texts: Vec<String>,
    /// The problem (transformers' `problem_type`).
    pub problem: ProblemType,
    /// Each text's targets.
    pub targets: Targets,
}

/// Ids `[b, t]`, attention mask `[b, t]` and the token count.
type BatchTensors<B> = (Tensor<B, 2, Int>, Tensor<B, 2>, usize);

fn batch_tensors<B: Backend>(
    tok: &Tokenizer,
    data: &Encoded,
    idx: &[usize],
    device: &B::Device,
) -> Result<BatchTensors<B>> {
    let texts: Vec<&str> = idx.iter().map(|&i| data.texts[i].as_str()).collect();
    let b = tok.batch::<B>(&texts, device)?;
    let n = b.ids.dims()[0] * b.ids.dims()[1];
    Ok((b.ids, b.attention_mask, n))
}

/// The problem's loss on a batch (cross-entropy, binary cross-entropy or
/// squared error: [`ProblemType::loss`]), and its token count.
pub fn classifier_loss<B: Backend, E: Encoder<B> + Module<B>>(
    model: &Classifier<B, E>,
    tok: &Tokenizer,
    data: &Encoded,
    idx: &[usize],
) -> Result<(Tensor<B, 1>, usize)> {
    let device = device_of(&model.encoder);
    let (ids, mask, n) = batch_tensors::<B>(tok, data, idx, &device)?;
    let logits = model.logits(ids, mask)?;
    check_width(&logits, &data.targets)?;
    let targets = data.targets.batch::<B>(idx, &device);
    Ok((data.problem.loss(logits, targets), n))
}

/// A head of another width than the targets' is an error (a regression's
/// values or a multi-label's labels would be matched to the wrong outputs).
fn check_width<B: Backend>(logits: &Tensor<B, 2>, targets: &Targets) -> Result<()> {
    match targets {
        Targets::Values { width, .. } if logits.dims()[1] != *width => {
            Err(PeftError::Config(format!(
                "the head has {} outputs, the data's targets {width}",
                logits.dims()[1]
            )))
        }
        _ => Ok(()),
    }
}

/// The problem's metric on `data` (accuracy, micro-F1 or mean squared
/// error: [`Score::metric`]). Batches of 64 texts of similar length (each
/// text's prediction is its own; fewer padding tokens to compute).
pub fn classifier_metric<B: Backend, E: Encoder<B> + Module<B>>(
    model: &Classifier<B, E>,
    tok: &Tokenizer,
    data: &Encoded,
) -> Result<Metric> {
    let device = device_of(&model.encoder);
    let mut score = Score::default();
    let mut all: Vec<usize> = (0..data.texts.len()).collect();
    all.sort_by_key(|&i| data.texts[i].len());
    for idx in all.chunks(64) {
        let (ids, mask, _) = batch_tensors::<B>(tok, data, idx, &device)?;
        let logits = model.logits(ids, mask)?;
        check_width(&logits, &data.targets)?;
        let logits: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| PeftError::State(format!("predictions: {e:?}")))?;
        score.add(data.problem, &logits, &data.targets, idx);
    }
    Ok(score.metric(data.problem))
}

/// Writes the head as `head.safetensors` (`classifier.weight` `[labels, d]`, PyTorch layout).
pub fn save_head<B: Backend>(head: &Linear<B>, dir: &Path) -> Result<()> {
    let mut t = vec![(
        "classifier.weight".to_string(),
        HostTensor::from_tensor(head.weight.val()).transposed(),
    )];
    if let Some(b) = &head.bias {
        t.push((
            "classifier.bias".to_string(),
            HostTensor::from_tensor(b.val()),
        ));
    }
    write_atomic(
        &dir.join("head.safetensors"),
        &serialize_safetensors(&t, None),
    )
}

/// Reads `head.safetensors` for `d` inputs and `labels` classes: a head of
/// another width or for another number of labels is an error naming the
/// file (a head with more rows than labels would predict classes no label
/// names; one with none cannot predict at all).
pub fn load_head<B: Backend>(
    dir: &Path,
    d: usize,
    labels: usize,
    device: &B::Device,
) -> Result<Linear<B>> {
    let file = dir.join("head.safetensors");
    let mut t = read_safetensors(&file)?;
    peft_core::io::linear_from_torch(&mut t, "classifier", [d, labels], true, &file, device)
}

/// Reads a run's `labels.json` (the class names, in the head's row order):
/// a list of distinct strings, at least one.
pub fn read_labels(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("labels.json");
    let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    let labels: Vec<String> = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: path.clone(),
        source,
    })?;
    let message = if labels.is_empty() {
        Some("no labels".to_string())
    } else {
        let mut seen = std::collections::HashSet::new();
        labels
            .iter()
            .find(|l| !seen.insert(l.as_str()))
            .map(|l| format!("label `{l}` is listed twice"))
    };
    match message {
        Some(message) => Err(PeftError::Checkpoint { path, message }),
        None => Ok(labels),
    }
}

/// The names of `n` classes: the adapter folder's `labels.json` (our
/// runs), else `LABEL_i` as transformers names them.
pub fn class_names(dir: Option<&Path>, n: usize) -> Result<Vec<String>> {
    match dir {
        Some(d) if d.join("labels.json").is_file() => read_labels(d),
        _ => Ok((0..n).map(|i| format!("LABEL_{i}")).collect()),
    }
}

/// A new head `[d, labels]`.
pub fn new_head<B: Backend>(d: usize, labels: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d, labels).init(device)
}

impl<B: Backend> Encoder<B> for Adapted<B, Bert<B>> {
    /// The real tokens' hidden states (a soft prompt's positions dropped:
    /// pooling reads the real tokens, which attended to it).
    fn hidden(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 3>> {
        let t = ids.dims()[1];
        let after = |h: Tensor<B, 3>, n: usize| h.narrow(1, n, t);
        Ok(match self {
            Adapted::Slots(s) => s.model.encode(ids, Some(mask)),
            Adapted::Adapters(a) => a.forward(ids, Some(mask))?,
            Adapted::Prefix(p) => p.forward(ids, Some(mask)),
            Adapted::Prompt(p) => after(p.forward(ids, Some(mask)), p.num_virtual_tokens()),
        })
    }

    /// BERT's pooler reads the first position: the first virtual token
    /// after a soft prompt, as in PEFT.
    fn classify(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        match self {
            Adapted::Slots(s) => s.model.classify(ids, Some(mask)),
            Adapted::Adapters(a) => a.classify(ids, mask),
            Adapted::Prefix(p) => p.model.classify_hidden(p.forward(ids, Some(mask))),
            Adapted::Prompt(p) => p.model.classify_hidden(p.forward(ids, Some(mask))),
        }
    }
}
