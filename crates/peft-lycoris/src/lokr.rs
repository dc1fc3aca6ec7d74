//! [`Lokr`]: LoKr as Hugging Face PEFT 0.21 defines it (`peft_type: LOKR`):
//! its `adapter_config.json` ([`LokrConfig`]) and how an entry starts. The
//! per-layer math (the Kronecker product, PEFT's `factorization`) is
//! [`LokrEntry`]'s; what the LyCORIS methods share is [`LycorisConfig`]'s;
//! everything that spans the model's adapters is [`SlotModel`]'s.
//!
//! Files: `base_model.model.<path>.lokr_w1` `[out_l, in_m]` (or `lokr_w1_a`
//! `[out_l, r]` and `lokr_w1_b` `[r, in_m]` with `decompose_both`), and
//! `lokr_w2` `[out_k, in_n]` (or `lokr_w2_a` / `lokr_w2_b` when `r` is below
//! half its larger side).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use indexmap::IndexMap;
use peft_core::config::{LayerIndices, LayersPattern, TargetModules};
use peft_core::io::HostTensor;
use peft_core::method_config::{refuse_conv1d, MethodConfig};
use peft_core::slot::{DeltaMeta, LokrEntry, LokrFactors, LokrLayout};
use peft_core::slot_method::Init;
use peft_core::{LinearSlot, Result, SlotMethod, SlotModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lycoris::{kaiming, read_factors, write_factors, LycorisConfig, Shared};

/// LoKr, as PEFT defines it (`peft_type: LOKR`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Lokr;

/// A model carrying named LoKr adapters (see [`SlotModel`]: activation,
/// merging, mixed batches, PEFT's files).
pub type LokrModel<B, M> = SlotModel<B, M, Lokr>;

fn lokr_type() -> String {
    "LOKR".into()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_factor() -> i64 {
    -1
}

/// PEFT's `init_weights` for LoKr: `true`, `false` or `"lycoris"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LokrInitWeights {
    /// `true`: `W1` starts at zero (a fresh adapter is the identity), `W2`
    /// Kaiming-uniform; `false`: every factor Kaiming-uniform.
    Bool(bool),
    /// `"lycoris"`: the LyCORIS repository's way, `W2` (`lokr_w2`, or
    /// `lokr_w2_b`) at zero and the rest Kaiming-uniform.
    Named(LycorisWay),
}

/// The one named initialisation, `"lycoris"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LycorisWay {
    /// `"lycoris"`.
    #[serde(rename = "lycoris")]
    Lycoris,
}

impl Default for LokrInitWeights {
    fn default() -> Self {
        LokrInitWeights::Bool(true)
    }
}

/// PEFT's `LoKrConfig`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LokrConfig {
    /// Always `"LOKR"`.
    #[serde(default = "lokr_type")]
    pub peft_type: String,
    /// Rank of the factors that are decomposed.
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
    /// Also decompose the left factor `W1` into `lokr_w1_a·lokr_w1_b` (when
    /// `r` is below half its larger side).
    #[serde(default)]
    pub decompose_both: bool,
    /// The size one side of each factorisation aims at (`-1`: the divisor
    /// nearest the square root), as PEFT's `factorization`.
    #[serde(default = "default_factor")]
    pub decompose_factor: i64,
    /// Rescale the output rows kept by rank dropout by one over the kept
    /// fraction.
    #[serde(default)]
    pub rank_dropout_scale: bool,
    /// Which modules get an adapter; `None`: PEFT's defaults for the model
    /// type (LoRA's table).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// How the factors start.
    #[serde(default)]
    pub init_weights: LokrInitWeights,
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

impl Default for LokrConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid LokrConfig")
    }
}

impl LokrConfig {
    /// A config with rank `r`, alpha `alpha` and the given target names.
    pub fn new(r: usize, alpha: f64, targets: &[&str]) -> Self {
        LokrConfig {
            r,
            alpha,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }
}

impl MethodConfig for LokrConfig {
    const PEFT_TYPE: &'static str = "LOKR";
    const METHOD: &'static str = "LoKr";
    const NAME: &'static str = "lokr";
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

impl LycorisConfig for LokrConfig {
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

impl SlotMethod for Lokr {
    type Config = LokrConfig;

    /// PEFT's `update_layer` for `nn.Linear`: the layout from the layer's
    /// sizes, then `reset_adapter_parameters` (`init_weights: true`: `W1`
    /// zero), `_random` (`false`) or `_lycoris_way` (`"lycoris"`: `W2`
    /// zero); placeholders are zeros.
    fn attach<B: Backend>(
        config: &LokrConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        let (r, alpha) = config.rank_and_alpha(path)?;
        let device = slot.device();
        let layout = LokrLayout::new(
            slot.d_input(),
            slot.d_output(),
            r,
            config.decompose_factor,
            config.decompose_both,
        );
        let zero = |key: &str| match (init, config.init_weights) {
            (Init::Placeholder, _) => true,
            (Init::Fresh, LokrInitWeights::Bool(false)) => false,
            (Init::Fresh, LokrInitWeights::Bool(true)) => matches!(key, "lokr_w1" | "lokr_w1_a"),
            (Init::Fresh, LokrInitWeights::Named(LycorisWay::Lycoris)) => {
                matches!(key, "lokr_w2" | "lokr_w2_b")
            }
        };
        // Kaiming's fan-in is PEFT's `size(1)`: the first side here.
        let factors = LokrFactors::new(layout, |key, shape| match zero(key) {
            true => Tensor::zeros(shape, &device),
            false => kaiming::<B>(shape, shape[0], &device),
        });
        let meta = DeltaMeta {
            name: name.to_string(),
            rank: r,
            alpha,
            scaling: alpha / r as f64,
            rank_dropout: config.rank_dropout,
            rank_dropout_scale: config.rank_dropout_scale,
            module_dropout: config.module_dropout,
            merged: false,
        };
        slot.add(LokrEntry::new(factors, meta), path)
    }

    fn write_tensors<B: Backend>(
        _config: &LokrConfig,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        if let Some(entry) = slot.entry::<LokrEntry<B>>(name) {
            write_factors(entry, path, out);
        }
    }

    fn read_tensors<B: Backend>(
        _config: &LokrConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let entry = slot
            .entry_mut::<LokrEntry<B>>(name)
            .expect("injected before filling");
        read_factors(entry, path, tensors, file)
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<LokrEntry<B>>();
    }
}
