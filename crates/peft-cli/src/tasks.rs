//! What `peft train` / `peft eval` run: a model (BERT for sequence
//! classification; Llama or GPT-2 for causal LM) with one method (LoRA,
//! DoRA, (IA)³, a bottleneck adapter, a prefix or a soft prompt), the loss and
//! the evaluation.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_adapter::{AdapterModel, BnConfig, Ia3};
use peft_core::io::{read_safetensors, serialize_safetensors, write_atomic, HostTensor};
use peft_core::loss::causal_lm_loss_after_prompt;
use peft_core::generate::{CausalLm, Sampler};
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType};
use peft_core::slot_method::OneOf;
use peft_core::virtual_model::{VirtualTokenModel, VirtualTokens};
use peft_core::{Ia3Config, LoraConfig, ModelInput, PeftError, PeftModel, Result, SlotModel};
use peft_lora::Lora;
use peft_lycoris::{Loha, LohaConfig, Lokr, LokrConfig, MethodConfig};
use peft_models::bert::Bert;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::cross_entropy;
use peft_models::tokenizer::Tokenizer;
use peft_oft::{Oft, OftConfig};
use peft_prefix::PrefixTuningModel;
use peft_prompt::PromptTuningModel;
use serde_json::Value;

use crate::train::Metric;

/// How `peft train --quantize` keeps the frozen base (QLoRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// The GGUF file's own blocks (Q4_1, Q8_0, ...): Llama from GGUF only.
    Gguf,
    /// NF4 with double quantization, for every adaptable linear layer.
    Nf4,
}

impl Quantize {
    /// The name used on the command line and in `train_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Quantize::Gguf => "gguf",
            Quantize::Nf4 => "nf4",
        }
    }

    /// The inverse of [`name`](Self::name).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gguf" => Ok(Quantize::Gguf),
            "nf4" => Ok(Quantize::Nf4),
            other => Err(PeftError::Config(format!(
                "quantize `{other}` is not known (gguf, nf4)"
            ))),
        }
    }
}

/// A PEFT method with its config. (Built once per run: its size does not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Method {
    /// LoRA / rsLoRA / DoRA (PEFT's `LoraConfig`).
    Lora(LoraConfig),
    /// (IA)³ (PEFT's `IA3Config`).
    Ia3(Ia3Config),
    /// LoHa (PEFT's `LoHaConfig`).
    Loha(LohaConfig),
    /// LoKr (PEFT's `LoKrConfig`).
    Lokr(LokrConfig),
    /// OFT (PEFT's `OFTConfig`).
    Oft(OftConfig),
    /// An AdapterHub bottleneck adapter.
    Adapter(BnConfig),
    /// Prefix tuning (causal LM).
    Prefix(PromptLearningConfig),
    /// Prompt tuning (causal LM).
    Prompt(PromptLearningConfig),
}

impl Method {
    /// The `--method` value that trains it.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora(c) if c.use_dora => "dora",
            Method::Lora(_) => "lora",
            Method::Ia3(_) => "ia3",
            Method::Loha(_) => "loha",
            Method::Lokr(_) => "lokr",
            Method::Oft(_) => "oft",
            Method::Adapter(_) => "adapter",
            Method::Prefix(_) => "prefix",
            Method::Prompt(_) => "prompt",
        }
    }

    /// The config as one of [`Slots`]' methods, for a method whose adapters
    /// live in the model's linear slots.
    pub fn slot_config(&self) -> Option<SlotConfig> {
        Some(match self {
            Method::Lora(c) => OneOf::First(c.clone()),
            Method::Ia3(c) => OneOf::Second(OneOf::First(c.clone())),
            Method::Loha(c) => OneOf::Second(OneOf::Second(OneOf::First(c.clone()))),
            Method::Lokr(c) => OneOf::Second(OneOf::Second(OneOf::Second(OneOf::First(c.clone())))),
            Method::Oft(c) => OneOf::Second(OneOf::Second(OneOf::Second(OneOf::Second(c.clone())))),
            Method::Adapter(_) | Method::Prefix(_) | Method::Prompt(_) => return None,
        })
    }

    /// The method as PEFT sets it up for sequence classification
    /// (`task_type: SEQ_CLS`; the heads `classifier` and `score` added to
    /// `modules_to_save`, so the adapter trains and saves its own copy of
    /// the head) over the base model at `base`; `None` for a method that
    /// does not live in the model's slots (those keep a head of their own).
    pub fn for_seq_cls(&self, base: &Path) -> Option<Method> {
        let base = std::fs::canonicalize(base)
            .unwrap_or_else(|_| base.to_path_buf())
            .display()
            .to_string();
        macro_rules! seq_cls {
            ($variant:ident, $c:expr) => {{
                let mut c = $c.clone();
                c.task_type = Some("SEQ_CLS".into());
                let mut keep = c.modules_to_save.take().unwrap_or_default();
                for head in SEQ_CLS_HEADS {
                    if !keep.iter().any(|m| m == head) {
                        keep.push(head.to_string());
                    }
                }
                c.modules_to_save = Some(keep);
                c.base_model_name_or_path = Some(base);
                Some(Method::$variant(c))
            }};
        }
        match self {
            Method::Lora(c) => seq_cls!(Lora, c),
            Method::Ia3(c) => seq_cls!(Ia3, c),
            Method::Loha(c) => seq_cls!(Loha, c),
            Method::Lokr(c) => seq_cls!(Lokr, c),
            Method::Oft(c) => seq_cls!(Oft, c),
            Method::Adapter(_) | Method::Prefix(_) | Method::Prompt(_) => None,
        }
    }

    /// Reads the method of a saved adapter folder: PEFT's
    /// `adapter_config.json` (its `peft_type`) or AdapterHub's
    /// (a `config` object).
    pub fn detect(dir: &Path) -> Result<Method> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
            path: path.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| PeftError::Json {
            path: path.clone(),
            source,
        })?;
        match (v.get("peft_type").and_then(Value::as_str), v.get("config")) {
            (Some("LORA"), _) => Ok(Method::Lora(LoraConfig::from_json_str(&text, &path)?)),
            (Some("IA3"), _) => Ok(Method::Ia3(Ia3Config::from_json_str(&text, &path)?)),
            (Some("LOHA"), _) => Ok(Method::Loha(LohaConfig::from_json_str(&text, &path)?)),
            (Some("LOKR"), _) => Ok(Method::Lokr(LokrConfig::from_json_str(&text, &path)?)),
            (Some("OFT"), _) => Ok(Method::Oft(OftConfig::from_json_str(&text, &path)?)),
            (Some("PREFIX_TUNING"), _) => Ok(Method::Prefix(PromptLearningConfig::from_file(
                &path,
                &[PromptLearningType::PrefixTuning],
            )?)),
            (Some("PROMPT_TUNING"), _) => Ok(Method::Prompt(PromptLearningConfig::from_file(
                &path,
                &[PromptLearningType::PromptTuning],
            )?)),
            (Some("P_TUNING"), _) => Ok(Method::Prompt(PromptLearningConfig::from_file(
                &path,
                &[PromptLearningType::PTuning],
            )?)),
            (None, Some(c)) => serde_json::from_value(c.clone())
                .map(Method::Adapter)
                .map_err(|source| PeftError::Json { path: path.clone(), source }),
            (Some(other), _) => Err(PeftError::Config(format!(
                "{}: peft_type `{other}` cannot be trained or evaluated by this command (LORA, IA3, LOHA, LOKR, OFT, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, AdapterHub bottleneck)",
                path.display()
            ))),
            (None, None) => Err(PeftError::Config(format!(
                "{}: neither a PEFT config (peft_type) nor an AdapterHub one (config)",
                path.display()
            ))),
        }
    }
}

/// The head modules PEFT's `PeftModelForSequenceClassification` adds to
/// `modules_to_save` (BERT's is `classifier`, Llama's `score`).
pub const SEQ_CLS_HEADS: [&str; 2] = ["classifier", "score"];

/// The number of classes of the copy of head `head` (`classifier` for
/// BERT, `score` for Llama) an adapter folder carries
/// (`base_model.model.<head>.weight`, `[labels, d]`), if it has one.
pub fn head_labels(dir: &Path, head: &str) -> Result<Option<usize>> {
    let file = dir.join(peft_core::io::WEIGHTS_FILE);
    if !file.is_file() {
        return Ok(None);
    }
    let tensors = read_safetensors(&file)?;
    let key = format!("{}{head}.weight", peft_core::io::KEY_PREFIX);
    Ok(tensors.get(&key).and_then(|t| t.shape.first().copied()))
}

/// The architectures `peft` runs, read from a model path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// BERT (sequence classification).
    Bert,
    /// Llama family (causal LM), from a Hugging Face folder or a GGUF file.
    Llama,
    /// GPT-2 (causal LM).
    Gpt2,
}

/// The architecture of the model at `path` (a `.gguf` file is Llama; a folder
/// is read from its `config.json`'s `model_type`).
pub fn arch_of(path: &Path) -> Result<Arch> {
    if path.extension().is_some_and(|e| e == "gguf") {
        return Ok(Arch::Llama);
    }
    let config = path.join("config.json");
    if !config.is_file() {
        return Err(PeftError::Checkpoint {
            path: path.to_path_buf(),
            message: "not a model: no config.json here (a Hugging Face model folder or a .gguf file is needed)".into(),
        });
    }
    let text = std::fs::read_to_string(&config).map_err(|source| PeftError::Io {
        path: config.clone(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: config.clone(),
        source,
    })?;
    match v.get("model_type").and_then(Value::as_str) {
        Some("bert") => Ok(Arch::Bert),
        Some("llama" | "mistral") => Ok(Arch::Llama),
        Some("gpt2") => Ok(Arch::Gpt2),
        other => Err(PeftError::Checkpoint {
            path: config,
            message: format!("model_type {other:?} is not supported (bert, llama, gpt2)"),
        }),
    }
}

/// The tokenizer of the model at `path`: `tokenizer.json` beside the
/// weights, or the one in the GGUF metadata.
pub fn tokenizer_of(path: &Path) -> Result<Tokenizer> {
    if path.extension().is_some_and(|e| e == "gguf") {
        return Tokenizer::from_gguf(&peft_models::gguf::Gguf::open(path)?);
    }
    Tokenizer::from_file(&path.join("tokenizer.json"))
}

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

    fn classify(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        self.model.classify_hidden(self.hidden(ids, mask)?)
    }
}

/// An encoder and its classification head: the model's own (`head: None`;
/// for a slot method the adapter trains its copy, PEFT's
/// `modules_to_save`), or a linear head over mean-pooled hidden states,
/// trained in full (the other methods).
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

/// Tokenised, labelled examples.
pub struct Encoded {
    /// Texts (tokenised per batch, padded to the batch's longest).
    pub texts: Vec<String>,
    /// Label indices.
    pub labels: Vec<usize>,
}

/// Ids `[b, t]`, attention mask `[b, t]`, labels `[b]` and the token count.
type BatchTensors<B> = (Tensor<B, 2, Int>, Tensor<B, 2>, Tensor<B, 1, Int>, usize);

fn batch_tensors<B: Backend>(
    tok: &Tokenizer,
    data: &Encoded,
    idx: &[usize],
    device: &B::Device,
) -> Result<BatchTensors<B>> {
    let texts: Vec<&str> = idx.iter().map(|&i| data.texts[i].as_str()).collect();
    let b = tok.batch::<B>(&texts, device)?;
    let labels: Vec<i64> = idx.iter().map(|&i| data.labels[i] as i64).collect();
    let n = b.ids.dims()[0] * b.ids.dims()[1];
    let labels = Tensor::from_data(TensorData::new(labels, [idx.len()]), device);
    Ok((b.ids, b.attention_mask, labels, n))
}

/// Mean cross-entropy of a batch, and its token count.
pub fn classifier_loss<B: Backend, E: Encoder<B> + Module<B>>(
    model: &Classifier<B, E>,
    tok: &Tokenizer,
    data: &Encoded,
    idx: &[usize],
) -> Result<(Tensor<B, 1>, usize)> {
    let device = device_of(&model.encoder);
    let (ids, mask, labels, n) = batch_tensors::<B>(tok, data, idx, &device)?;
    Ok((cross_entropy(model.logits(ids, mask)?, labels), n))
}

/// Accuracy on `data`. Batches of 64 texts of similar length (each text's
/// prediction is its own; fewer padding tokens to compute).
pub fn accuracy<B: Backend, E: Encoder<B> + Module<B>>(
    model: &Classifier<B, E>,
    tok: &Tokenizer,
    data: &Encoded,
) -> Result<Metric> {
    let device = device_of(&model.encoder);
    let mut correct = 0;
    let mut all: Vec<usize> = (0..data.texts.len()).collect();
    all.sort_by_key(|&i| data.texts[i].len());
    for idx in all.chunks(64) {
        let (ids, mask, _, _) = batch_tensors::<B>(tok, data, idx, &device)?;
        let pred: Vec<i64> = model
            .logits(ids, mask)?
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .map_err(|e| PeftError::State(format!("predicted classes: {e:?}")))?;
        correct += pred
            .iter()
            .zip(idx)
            .filter(|(p, &i)| **p as usize == data.labels[i])
            .count();
    }
    Ok(Metric {
        name: "accuracy",
        value: correct as f64 / data.texts.len().max(1) as f64,
        higher_is_better: true,
    })
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
    peft_core::io::linear_from_torch(&mut t, "classifier", [d, labels], &file, device)
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

/// A new head `[d, labels]`.
pub fn new_head<B: Backend>(d: usize, labels: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d, labels).init(device)
}

/// A causal LM `peft` can train: logits for ids, and the seams.
pub trait CausalModel<B: Backend>:
    PeftModel<B, Output = Tensor<B, 3>> + peft_core::layered::LayeredModel<B> + Clone
{
    /// Loads the model at `path`.
    fn load_from(path: &Path, device: &B::Device) -> Result<Self>;

    /// Loads the model at `path` with its frozen linear weights kept
    /// quantized as `quantize` says (`None`: `f32`, as `load_from`).
    fn load_quantized(path: &Path, device: &B::Device, quantize: Option<Quantize>) -> Result<Self> {
        let mut model = match quantize {
            Some(Quantize::Gguf) => {
                return Err(PeftError::Config(format!(
                    "--quantize gguf keeps the blocks of a Llama GGUF file; {} is not one",
                    path.display()
                )))
            }
            _ => Self::load_from(path, device)?,
        };
        if quantize == Some(Quantize::Nf4) {
            model.quantize_base_nf4()?;
        }
        Ok(model)
    }

    /// The causal-LM loss of `ids` and the parameter gradients, computed one
    /// layer at a time (for a quantized base).
    fn causal_loss_by_layer(&self, ids: Tensor<B, 2, Int>, seed: u64) -> (f64, GradientsParams)
    where
        B: AutodiffBackend,
        Self: AutodiffModule<B>,
    {
        peft_core::layered::loss_and_grads_by_layer(self, ids.clone(), None, seed, |logits| {
            causal_lm_loss_after_prompt(logits, ids, 0)
        })
    }
}

impl<B: Backend> CausalModel<B> for Llama<B> {
    fn load_from(path: &Path, device: &B::Device) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "gguf") {
            Llama::from_gguf(path, device)
        } else {
            Llama::load(path, device)
        }
    }

    fn load_quantized(path: &Path, device: &B::Device, quantize: Option<Quantize>) -> Result<Self> {
        let gguf = path.extension().is_some_and(|e| e == "gguf");
        match quantize {
            Some(Quantize::Gguf) if gguf => Llama::from_gguf_quantized(path, device),
            Some(Quantize::Gguf) => Err(PeftError::Config(format!(
                "--quantize gguf keeps a GGUF file's blocks; {} is a Hugging Face folder (use nf4)",
                path.display()
            ))),
            Some(Quantize::Nf4) => {
                let mut m = Self::load_from(path, device)?;
                m.quantize_base_nf4()?;
                Ok(m)
            }
            None => Self::load_from(path, device),
        }
    }
}

impl<B: Backend> CausalModel<B> for Gpt2<B> {
    fn load_from(path: &Path, device: &B::Device) -> Result<Self> {
        Gpt2::load(path, device)
    }
}

/// The slot methods the CLI runs, in one wrapper: LoRA (rsLoRA, DoRA),
/// (IA)³, LoHa, LoKr and OFT adapters live in the model's own linear slots. A
/// new slot method is one more pair level here and in [`SlotConfig`], one
/// `Method` variant and its arm in [`Method::slot_config`].
pub type Slots<B, M> = SlotModel<B, M, (Lora, (Ia3, (Loha, (Lokr, Oft))))>;

/// The config of one of [`Slots`]' methods.
pub type SlotConfig =
    OneOf<LoraConfig, OneOf<Ia3Config, OneOf<LohaConfig, OneOf<LokrConfig, OftConfig>>>>;

/// A model with its method: the model carrying LoRA / (IA)³ adapters (or
/// none) in its slots, the model with bottleneck adapters, or a frozen model
/// after trainable virtual tokens.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Adapted<B: Backend, M: Module<B>> {
    /// LoRA, DoRA, (IA)³, or no adapter.
    Slots(Slots<B, M>),
    /// Bottleneck adapters.
    Adapters(AdapterModel<B, M>),
    /// Prefixes before the frozen model (one trains).
    Prefix(PrefixTuningModel<B, M>),
    /// Soft prompts before the frozen model (one trains).
    Prompt(PromptTuningModel<B, M>),
}

impl<B: Backend, M: CausalModel<B> + Module<B>> Adapted<B, M> {
    /// Logits `[b, n + t, vocab]`, `n` = [`virtual_tokens`](Self::virtual_tokens)
    /// (a soft prompt's positions come first; a prefix has none).
    pub fn logits(&self, ids: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        match self {
            Adapted::Slots(s) => Ok(s.model.run(ModelInput::ids(ids))),
            Adapted::Adapters(a) => a.forward(ids, None),
            Adapted::Prefix(p) => Ok(p.forward(ids, None)),
            Adapted::Prompt(p) => Ok(p.forward(ids, None)),
        }
    }

    /// Class logits `[b, labels]` of a decoder with a `score` head
    /// (`LlamaForSequenceClassification`): each row's at its last token
    /// that is not padding, after any virtual tokens.
    pub fn classify(
        &self,
        ids: Tensor<B, 2, Int>,
        pad_token_id: Option<i64>,
    ) -> Result<Tensor<B, 2>> {
        self.classify_at(ids.clone(), ids, pad_token_id)
    }

    /// [`classify`](Self::classify) of a right-padded batch whose
    /// `attention_mask` `[b, t]` marks the real tokens: each row is read at
    /// its last one, whatever id the tokenizer padded with (transformers
    /// reads the last token that is not `pad_token_id`: the same position
    /// when the tokenizer pads with it).
    pub fn classify_masked(
        &self,
        ids: Tensor<B, 2, Int>,
        mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        // Real tokens as 1, padding as 0: with 0 as the padding id, the
        // last non-padding token is the last real one.
        let real = mask.greater_elem(0.5).int().reshape(ids.dims());
        self.classify_at(ids, real, Some(0))
    }

    /// Class logits of `ids`, each row's at the last position of `marks`
    /// `[b, t]` that is not `pad`.
    fn classify_at(
        &self,
        ids: Tensor<B, 2, Int>,
        marks: Tensor<B, 2, Int>,
        pad: Option<i64>,
    ) -> Result<Tensor<B, 2>> {
        let t = ids.dims()[1];
        let logits = self.logits(ids)?.narrow(1, self.virtual_tokens(), t);
        peft_models::seq_cls::last_token_logits(logits, marks, pad)
    }

    /// Virtual positions at the start of the logits (a soft prompt's).
    pub fn virtual_tokens(&self) -> usize {
        match self {
            Adapted::Prefix(p) => p.num_virtual_tokens(),
            Adapted::Prompt(p) => p.num_virtual_tokens(),
            _ => 0,
        }
    }
}

impl<B: Backend, M: CausalLm<B> + PeftModel<B, Output = Tensor<B, 3>>> Adapted<B, M> {
    /// Continues `prompt` (token ids) through the model's KV cache, with
    /// the attached adapter.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        match self {
            Adapted::Slots(s) => Ok(s.model.generate(prompt, max_new, sampler, eos, true)),
            Adapted::Adapters(a) => a.generate_checked(prompt, max_new, sampler, eos),
            Adapted::Prefix(p) => Ok(p.generate(prompt, max_new, sampler, eos)),
            Adapted::Prompt(p) => Ok(p.generate(prompt, max_new, sampler, eos)),
        }
    }
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

pub use peft_core::model::device_of;

pub fn ids_batch<B: Backend>(
    blocks: &[Vec<u32>],
    idx: &[usize],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let len = blocks[0].len();
    let flat: Vec<i64> = idx
        .iter()
        .flat_map(|&i| blocks[i].iter().map(|&t| t as i64))
        .collect();
    Tensor::from_data(TensorData::new(flat, [idx.len(), len]), device)
}

/// Mean next-token loss of a batch of blocks, and its token count.
pub fn lm_loss<B: Backend, M: CausalModel<B> + Module<B>>(
    model: &Adapted<B, M>,
    blocks: &[Vec<u32>],
    idx: &[usize],
    device: &B::Device,
) -> Result<(Tensor<B, 1>, usize)> {
    let ids = ids_batch::<B>(blocks, idx, device);
    let n = idx.len() * blocks[0].len();
    let logits = model.logits(ids.clone())?;
    Ok((
        causal_lm_loss_after_prompt(logits, ids, model.virtual_tokens()),
        n,
    ))
}

/// Perplexity on `blocks` (the exponential of the mean next-token loss).
pub fn perplexity<B: Backend, M: CausalModel<B> + Module<B>>(
    model: &Adapted<B, M>,
    blocks: &[Vec<u32>],
    device: &B::Device,
) -> Result<Metric> {
    let mut total = 0.0;
    let all: Vec<usize> = (0..blocks.len()).collect();
    for idx in all.chunks(8) {
        let (l, _) = lm_loss(model, blocks, idx, device)?;
        total += l.into_scalar().elem::<f64>() * idx.len() as f64;
    }
    let mean = total / blocks.len().max(1) as f64;
    Ok(Metric {
        name: "perplexity",
        value: mean.exp(),
        higher_is_better: false,
    })
}

/// The inference copy of a model `M` being trained on `B`.
pub type InnerAdapted<B, M> =
    Adapted<<B as AutodiffBackend>::InnerBackend, <M as AutodiffModule<B>>::InnerModule>;

/// `model` with `method` attached as adapter `default` to train (fresh, or
/// continued from the `last/` checkpoint `from`), its parameter count, and
/// what writes the trained adapter of an inference copy into a folder in
/// its method's own format.
#[allow(clippy::type_complexity)]
pub fn attach_to_train<B, M>(
    model: M,
    method: &Method,
    from: Option<&Path>,
) -> Result<(
    Adapted<B, M>,
    peft_core::ParamCount,
    Saver<InnerAdapted<B, M>>,
)>
where
    B: AutodiffBackend,
    M: PeftModel<B> + AutodiffModule<B> + Clone,
    M::InnerModule: PeftModel<B::InnerBackend> + Clone + 'static,
{
    let lost = |what: &str| format!("a {} run lost its {what}", method.name());
    Ok(match method {
        Method::Adapter(c) => {
            let a = bottleneck_to_train(model, c, from)?;
            let count = a.param_count();
            let lost = lost("adapters");
            let save: Saver<InnerAdapted<B, M>> = Box::new(move |m, dir| match m {
                Adapted::Adapters(a) => a.save_adapter(peft_core::DEFAULT_ADAPTER, dir),
                _ => Err(PeftError::State(lost.clone())),
            });
            (Adapted::Adapters(a), count, save)
        }
        Method::Prefix(c) => {
            let p = virtual_to_train(model, c, from)?;
            let count = p.param_count();
            let lost = lost("prefix");
            let save: Saver<InnerAdapted<B, M>> = Box::new(move |m, dir| match m {
                Adapted::Prefix(p) => p.save_checkpoint(peft_core::DEFAULT_ADAPTER, dir),
                _ => Err(PeftError::State(lost.clone())),
            });
            (Adapted::Prefix(p), count, save)
        }
        Method::Prompt(c) => {
            let p = virtual_to_train(model, c, from)?;
            let count = p.param_count();
            let lost = lost("prompt");
            let save: Saver<InnerAdapted<B, M>> = Box::new(move |m, dir| match m {
                Adapted::Prompt(p) => p.save_checkpoint(peft_core::DEFAULT_ADAPTER, dir),
                _ => Err(PeftError::State(lost.clone())),
            });
            (Adapted::Prompt(p), count, save)
        }
        Method::Lora(_) | Method::Ia3(_) | Method::Loha(_) | Method::Lokr(_) | Method::Oft(_) => {
            let config = method
                .slot_config()
                .ok_or_else(|| PeftError::State(lost("config")))?;
            slots_to_train(model, config, from, lost("slots"))?
        }
    })
}

/// [`attach_to_train`] for a slot method: `config` fresh, or the `last/`
/// checkpoint `from`. The saver answers `lost` when handed another variant.
#[allow(clippy::type_complexity)]
fn slots_to_train<B, M>(
    model: M,
    config: SlotConfig,
    from: Option<&Path>,
    lost: String,
) -> Result<(
    Adapted<B, M>,
    peft_core::ParamCount,
    Saver<InnerAdapted<B, M>>,
)>
where
    B: AutodiffBackend,
    M: PeftModel<B> + AutodiffModule<B> + Clone,
    M::InnerModule: PeftModel<B::InnerBackend> + Clone + 'static,
{
    let slots = match from {
        Some(dir) => Slots::from_pretrained(model, dir)?,
        None => Slots::new(model, config)?,
    };
    let count = slots.param_count();
    let save: Saver<InnerAdapted<B, M>> = Box::new(move |m, dir| match m {
        Adapted::Slots(s) => s.save_adapter(peft_core::DEFAULT_ADAPTER, dir),
        _ => Err(PeftError::State(lost.clone())),
    });
    Ok((Adapted::Slots(slots), count, save))
}

/// A bottleneck adapter `default` to train: fresh per `config`, or loaded
/// from a `last/` checkpoint to continue.
fn bottleneck_to_train<B: Backend, M: PeftModel<B>>(
    model: M,
    config: &BnConfig,
    from: Option<&Path>,
) -> Result<AdapterModel<B, M>> {
    match from {
        None => AdapterModel::new(model, peft_core::DEFAULT_ADAPTER, config.clone()),
        Some(dir) => {
            let mut a = AdapterModel::wrap(model);
            a.load_adapter(dir, Some(peft_core::DEFAULT_ADAPTER))?;
            a.train_adapter(peft_adapter::Setup::single(peft_core::DEFAULT_ADAPTER))?;
            Ok(a)
        }
    }
}

/// A prefix / prompt `default` to train: fresh per `config`, or continued
/// from a `last/` checkpoint (its full encoder when it kept one).
fn virtual_to_train<B: Backend, M: PeftModel<B>, E: VirtualTokens<B>>(
    model: M,
    config: &PromptLearningConfig,
    from: Option<&Path>,
) -> Result<VirtualTokenModel<B, M, E>> {
    match from {
        None => VirtualTokenModel::new(model, config.clone()),
        Some(dir) => VirtualTokenModel::resume(model, dir),
    }
}

/// `model` with the adapter folder `dir` attached (detected method), or
/// plain without one: what `eval`, `forward` and `generate` run.
pub fn load_adapted<B: Backend, M>(model: M, dir: Option<&Path>) -> Result<Adapted<B, M>>
where
    M: PeftModel<B> + Clone,
{
    let Some(dir) = dir else {
        return Ok(Adapted::Slots(Slots::wrap(model)));
    };
    Ok(match Method::detect(dir)? {
        Method::Lora(_) | Method::Ia3(_) | Method::Loha(_) | Method::Lokr(_) | Method::Oft(_) => {
            Adapted::Slots(Slots::from_pretrained(model, dir)?)
        }
        Method::Adapter(_) => {
            let mut a = AdapterModel::wrap(model);
            let name = a.load_adapter(dir, None)?;
            a.set_active(peft_adapter::Setup::single(&name))?;
            Adapted::Adapters(a)
        }
        Method::Prefix(_) => Adapted::Prefix(PrefixTuningModel::from_pretrained(model, dir)?),
        Method::Prompt(_) => Adapted::Prompt(PromptTuningModel::from_pretrained(model, dir)?),
    })
}

/// Saves the adapter carried by a model into a folder.
pub type Saver<M> = Box<dyn Fn(&M, &Path) -> Result<()>>;

/// The path of a run's best checkpoint.
pub fn best_dir(out: &Path) -> PathBuf {
    out.join("best")
}
