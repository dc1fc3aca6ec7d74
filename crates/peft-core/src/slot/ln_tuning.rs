//! LN tuning (PEFT's `LNTuningConfig`, arXiv 2312.11420): each adapter
//! trains its own copy of the targeted norm layers (LayerNorm's scale and
//! shift, RMSNorm's scale) and nothing else. The copies live in the
//! model's [`NormSlot`](super::NormSlot)s; [`SlotModel`](crate::SlotModel)
//! attaches, switches, merges (a swap, as in PEFT) and saves them for this
//! method as for any other: the method is its config ([`LnTuningConfig`])
//! and the key its tensors are saved under (`ln_tuning_layers`).
//!
//! As in PEFT, one LN tuning adapter may be active on a layer at a time
//! (activating two is refused), and merging two at once is refused. Unlike
//! PEFT, a mixed batch may route rows to different LN tuning adapters
//! ([`NormParams::PerRow`](super::NormParams)).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::method::slot_method_without_entries;
use crate::config::TargetModules;
use crate::error::Result;
use crate::method_config::MethodConfig;

fn ln_tuning_type() -> String {
    "LN_TUNING".into()
}

/// PEFT's `LNTuningConfig`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LnTuningConfig {
    /// Always `"LN_TUNING"`.
    #[serde(default = "ln_tuning_type")]
    pub peft_type: String,
    /// Which norm layers get a trained copy; `None`: PEFT's defaults for
    /// the model type (Llama: `input_layernorm`, `post_attention_layernorm`,
    /// `norm`; GPT-2: `ln_1`, `ln_2`, `ln_f`; none for BERT).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Layers each adapter keeps a trainable full copy of (PEFT's
    /// `modules_to_save`: a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT task type (`CAUSAL_LM`, `SEQ_CLS`, ...), informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model this adapter was trained on, informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter was saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// Keys this version does not model, kept and written back as they were.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LnTuningConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid LnTuningConfig")
    }
}

impl LnTuningConfig {
    /// A config training copies of the named norm layers.
    pub fn new(targets: &[&str]) -> Self {
        LnTuningConfig {
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }
}

impl MethodConfig for LnTuningConfig {
    const PEFT_TYPE: &'static str = "LN_TUNING";
    const METHOD: &'static str = "LN tuning";
    const NAME: &'static str = "ln_tuning";
    /// PEFT 0.21's `TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING`
    /// for the architectures here (BERT has no row: name the targets).
    const DEFAULT_TARGETS: &'static [(&'static str, &'static [&'static str])] = &[
        (
            "llama",
            &["input_layernorm", "post_attention_layernorm", "norm"],
        ),
        (
            "mistral",
            &["input_layernorm", "post_attention_layernorm", "norm"],
        ),
        ("gpt2", &["ln_1", "ln_2", "ln_f"]),
    ];
    const CLI_SETTINGS: &'static [(&'static str, &'static str)] = &[("targets", "target_modules")];
    const NORM_COPY_KEY: Option<&'static str> = Some("ln_tuning_layers");

    crate::config_fields!(with[exclude_modules]);

    /// PEFT's `LNTuningConfig` checks nothing beyond its fields' types.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// The LN tuning method (a marker): its adapters are norm copies, so it has
/// no per-linear-layer entries.
#[derive(Debug, Clone, Copy, Default)]
pub struct LnTuning;

slot_method_without_entries!(LnTuning, LnTuningConfig, "LN tuning trains copies of norm layers; `{path}` is a linear layer (keep a full copy of it with modules_to_save)");
