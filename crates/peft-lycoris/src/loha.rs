//! [`Loha`]: LoHa as Hugging Face PEFT 0.21 defines it (`peft_type: LOHA`):
//! its `adapter_config.json` ([`LohaConfig`]) and how an entry starts. The
//! per-layer math is [`LohaEntry`]'s; what the LyCORIS methods share is
//! [`LycorisConfig`]'s; everything that spans the model's adapters is
//! [`SlotModel`]'s.
//!
//! Files: `base_model.model.<path>.hada_w1_a` `[out, r]`, `.hada_w1_b`
//! `[r, in]`, `.hada_w2_a`, `.hada_w2_b` likewise.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use indexmap::IndexMap;
use peft_core::config::{LayerIndices, LayersPattern, TargetModules};
use peft_core::io::HostTensor;
use peft_core::method_config::{refuse_conv1d, MethodConfig};
use peft_core::slot::{DeltaMeta, LohaEntry, LohaFactors};
use peft_core::slot_method::Init;
use peft_core::{LinearSlot, Result, SlotMethod, SlotModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lycoris::{kaiming, read_factors, write_factors, LycorisConfig, Shared};

/// LoHa, as PEFT defines it (`peft_type: LOHA`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Loha;

/// A model carrying named LoHa adapters (see [`SlotModel`]: activation,
/// merging, mixed batches, PEFT's files).
pub type LohaModel<B, M> = SlotModel<B, M, Loha>;

fn loha_type() -> String {
    "LOHA".into()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_true() -> bool {
    true
}

/// PEFT's `LoHaConfig`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LohaConfig {
    /// Always `"LOHA"`.
    #[serde(default = "loha_type")]
    pub peft_type: String,
    /// Rank of each of the two products (`ΔW` has rank up to `r²`).
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator: `ΔW` is scaled by `alpha / r`.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Probability of dropping an output row of `ΔW` in training.
    #[serde(default)]
    pub rank_dropout: f64,
    /// Probability of skipping a layer's delta in training.
    #[serde(default)]
    pub module_dropout: f64,
    /// Conv2d only in PEFT; every adaptable layer here is linear, on which
    /// PEFT ignores it too.
    #[serde(default)]
    pub use_effective_conv2d: bool,
    /// Which modules get an adapter; `None`: PEFT's defaults for the model
    /// type (LoRA's table).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// `true`: `hada_w2_b` starts at zero, so a fresh adapter is the
    /// identity; `false`: every factor random.
    #[serde(default = "default_true")]
    pub init_weights: bool,
    /// Restrict adaptation to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list in module paths, used with `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Per-module rank overrides (key: regex/suffix of the module path).
    #[serde(default)]
    pub rank_pattern: IndexMap<String, usize>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: IndexMap<String, f64>,
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

impl Default for LohaConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid LohaConfig")
    }
}

impl LohaConfig {
    /// A config with rank `r`, alpha `alpha` and the given target names.
    pub fn new(r: usize, alpha: f64, targets: &[&str]) -> Self {
        LohaConfig {
            r,
            alpha,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }
}

impl MethodConfig for LohaConfig {
    const PEFT_TYPE: &'static str = "LOHA";
    const METHOD: &'static str = "LoHa";
    const NAME: &'static str = "loha";
    const CLI_SETTINGS: &'static [(&'static str, &'static str)] = &[
        ("r", "r"),
        ("alpha", "alpha"),
        ("targets", "target_modules"),
    ];

    peft_core::config_fields!();

    fn validate(&self) -> Result<()> {
        self.validate_shared()
    }

    fn check_model_type(model_type: Option<&str>) -> Result<()> {
        refuse_conv1d(Self::METHOD, model_type)
    }
}

impl LycorisConfig for LohaConfig {
    fn shared(&self) -> Shared<'_> {
        Shared {
            r: self.r,
            alpha: self.alpha,
            rank_dropout: self.rank_dropout,
            module_dropout: self.module_dropout,
            rank_pattern: &self.rank_pattern,
            alpha_pattern: &self.alpha_pattern,
        }
    }
}

impl SlotMethod for Loha {
    type Config = LohaConfig;

    /// PEFT's `reset_adapter_parameters`: `hada_w1_a`, `hada_w1_b`,
    /// `hada_w2_a` Kaiming-uniform and `hada_w2_b` zero (random too with
    /// `init_weights: false`); placeholders are zeros.
    fn attach<B: Backend>(
        config: &LohaConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        let (r, alpha) = config.rank_and_alpha(path)?;
        let device = slot.device();
        let (d_in, d_out) = (slot.d_input(), slot.d_output());
        let fresh = init == Init::Fresh;
        let factor = |shape: [usize; 2], fan_in: usize, random: bool| {
            Param::from_tensor(match random {
                true => kaiming::<B>(shape, fan_in, &device),
                false => Tensor::zeros(shape, &device),
            })
        };
        let factors = LohaFactors {
            w1_a: factor([r, d_out], r, fresh),
            w1_b: factor([d_in, r], d_in, fresh),
            w2_a: factor([r, d_out], r, fresh),
            w2_b: factor([d_in, r], d_in, fresh && !config.init_weights),
        };
        let meta = DeltaMeta {
            name: name.to_string(),
            rank: r,
            alpha,
            scaling: alpha / r as f64,
            rank_dropout: config.rank_dropout,
            rank_dropout_scale: true,
            module_dropout: config.module_dropout,
            merged: false,
        };
        slot.add(LohaEntry::new(factors, meta), path)
    }

    fn write_tensors<B: Backend>(
        _config: &LohaConfig,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        if let Some(entry) = slot.entry::<LohaEntry<B>>(name) {
            write_factors(entry, path, out);
        }
    }

    fn read_tensors<B: Backend>(
        _config: &LohaConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let entry = slot
            .entry_mut::<LohaEntry<B>>(name)
            .expect("injected before filling");
        read_factors(entry, path, tensors, file)
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<LohaEntry<B>>();
    }
}
