//! The methods `peft` trains and reads: [`Method`] (the slot methods as
//! one variant over [`SlotKinds`], then bottleneck adapters, prefix and
//! prompt, each with PEFT's config), how a saved folder's method is
//! detected, and the sequence-classification setup PEFT gives them; how
//! `--quantize` keeps the base.

use std::path::Path;

use peft_adapter::{BnConfig, Ia3};
use peft_core::io::read_safetensors;
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType};
use peft_core::slot::{LnTuning, TrainableTokens, Vera};
use peft_core::slot_method::{AdapterConfig, Pick, SlotMethod};
use peft_core::{PeftError, Result, SlotModel};
use peft_lora::{AdaLora, Lora};
use peft_lycoris::{Loha, Lokr};
use peft_oft::{Boft, Oft};
use serde_json::Value;

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
    /// A method whose adapters live in the model's linear slots: LoRA
    /// (rsLoRA, DoRA), (IA)³, LoHa, LoKr, OFT: one of [`SlotKinds`]'
    /// configs. Make one with [`Method::slot`].
    Slot(SlotConfig),
    /// An AdapterHub bottleneck adapter.
    Adapter(BnConfig),
    /// Prefix tuning (causal LM).
    Prefix(PromptLearningConfig),
    /// Prompt tuning (causal LM).
    Prompt(PromptLearningConfig),
}

impl Method {
    /// A slot method from its config (`Method::slot(LoraConfig::new(…))`).
    pub fn slot<C, I>(config: C) -> Method
    where
        SlotConfig: Pick<C, I>,
    {
        Method::Slot(SlotConfig::pick(config))
    }

    /// The `--method` value that trains it.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Slot(c) => c.method_name(),
            Method::Adapter(_) => "adapter",
            Method::Prefix(_) => "prefix",
            Method::Prompt(_) => "prompt",
        }
    }

    /// The config as one of [`Slots`]' methods, for a method whose adapters
    /// live in the model's linear slots.
    pub fn slot_config(&self) -> Option<SlotConfig> {
        match self {
            Method::Slot(c) => Some(c.clone()),
            Method::Adapter(_) | Method::Prefix(_) | Method::Prompt(_) => None,
        }
    }

    /// The method as PEFT sets it up for sequence classification
    /// (`task_type: SEQ_CLS`; the heads `classifier` and `score` added to
    /// `modules_to_save`, so the adapter trains and saves its own copy of
    /// the head) over the base model at `base`: every PEFT method (the
    /// slot methods and prompt learning); `None` for AdapterHub's
    /// bottleneck adapters, which keep a head of their own.
    pub fn for_seq_cls(&self, base: &Path) -> Option<Method> {
        let base = std::fs::canonicalize(base)
            .unwrap_or_else(|_| base.to_path_buf())
            .display()
            .to_string();
        let mut method = self.clone();
        match &mut method {
            Method::Slot(config) => config.for_seq_cls(&base, &SEQ_CLS_HEADS),
            Method::Prefix(config) | Method::Prompt(config) => {
                config.task_type = Some("SEQ_CLS".into());
                let keep = config.modules_to_save.get_or_insert_with(Vec::new);
                for head in SEQ_CLS_HEADS {
                    if !keep.iter().any(|m| m == head) {
                        keep.push(head.to_string());
                    }
                }
                config.base_model_name_or_path = Some(base);
            }
            Method::Adapter(_) => return None,
        }
        Some(method)
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
            (Some(t), _) if SlotConfig::reads(Some(t)) => Ok(Method::Slot(SlotConfig::read(&path)?)),
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
                "{}: peft_type `{other}` cannot be trained or evaluated by this command ({}, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, AdapterHub bottleneck)",
                path.display(),
                SlotConfig::peft_types().join(", ")
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
    // PEFT's prompt-learning files key the copy `base_model.<head>`, the
    // others `base_model.model.<head>`.
    let found = [
        peft_core::io::KEY_PREFIX,
        peft_core::modules_to_save::PROMPT_KEY_PREFIX,
    ]
    .iter()
    .find_map(|prefix| tensors.get(&format!("{prefix}{head}.weight")));
    Ok(found.and_then(|t| t.shape.first().copied()))
}

/// The slot methods the CLI runs, in one wrapper: LoRA (rsLoRA, DoRA),
/// (IA)³, LoHa, LoKr, OFT, BOFT, VeRA and AdaLoRA adapters live in the model's own linear
/// slots, LN tuning's in its norm slots, trainable tokens in its embedding
/// slots. A new slot method is one more pair level here; [`Method`],
/// [`SlotConfig`], `--method` and its flags, detection and the seq-cls
/// setup follow from it.
pub type SlotKinds = (
    Lora,
    (
        Ia3,
        (
            Loha,
            (
                Lokr,
                (Oft, (Boft, (Vera, (AdaLora, (LnTuning, TrainableTokens))))),
            ),
        ),
    ),
);

/// The model carrying adapters of any of [`SlotKinds`].
pub type Slots<B, M> = SlotModel<B, M, SlotKinds>;

/// The config of one of [`SlotKinds`]' methods.
pub type SlotConfig = <SlotKinds as SlotMethod>::Config;
