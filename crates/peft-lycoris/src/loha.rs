//! [`Loha`]: LoHa as Hugging Face PEFT 0.21 defines it (`peft_type: LOHA`):
//! its `adapter_config.json` ([`LohaConfig`]), which layers it targets, how
//! an entry starts, and its tensors in PEFT's file. The per-layer math is
//! [`LohaEntry`]'s; everything that spans the model's adapters is
//! [`SlotModel`]'s.
//!
//! Files: `base_model.model.<path>.hada_w1_a` `[out, r]`, `.hada_w1_b`
//! `[r, in]`, `.hada_w2_a`, `.hada_w2_b` likewise, transposed to Burn's
//! layout here and only here.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use indexmap::IndexMap;
use peft_core::config::{
    from_value, parse_json, read_text, sorted_json, warn_unknown_keys, LayerIndices, LayersPattern,
    TargetModules, KNOWN_UNMODELLED,
};
use peft_core::io::{take_tensor, HostTensor};
use peft_core::slot::{LohaEntry, LohaMeta};
use peft_core::slot_method::{AdapterConfig, Init};
use peft_core::slot_model::KEY_PREFIX;
use peft_core::target::{pattern_value, targets_match};
use peft_core::{LinearSlot, PeftError, Result, SlotMethod, SlotModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    /// Extra modules trained and saved in full (not supported yet: must be empty).
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

/// PEFT 0.21's `TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING` (a copy
/// of LoRA's) for the architectures of this workspace.
const LOHA_DEFAULTS: &[(&str, &[&str])] = &[
    ("llama", &["q_proj", "v_proj"]),
    ("mistral", &["q_proj", "v_proj"]),
    ("bert", &["query", "value"]),
    ("roberta", &["query", "value"]),
    ("gpt2", &["c_attn"]),
];

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

    /// Parses `adapter_config.json` text; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let value = parse_json(text, origin)?;
        let peft_type = value.get("peft_type").and_then(Value::as_str);
        if peft_type != Some("LOHA") {
            return Err(PeftError::Config(format!(
                "{}: peft_type {} is not LOHA",
                origin.display(),
                peft_type.map_or("missing".into(), |t| format!("`{t}`"))
            )));
        }
        let config: LohaConfig = from_value(value, origin)?;
        warn_unknown_keys(&config.extra, KNOWN_UNMODELLED, origin);
        config.validate()?;
        Ok(config)
    }

    /// Reads `adapter_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json_str(&read_text(path)?, path)
    }

    /// The JSON text PEFT writes (pretty, keys sorted).
    pub fn to_json_string(&self) -> String {
        sorted_json(self)
    }

    /// Checks values a user can get wrong, as PEFT's `update_layer` and
    /// `__post_init__` do.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(PeftError::Config(format!("LoHa: {what}")));
        if self.r == 0 || self.rank_pattern.values().any(|&r| r == 0) {
            return bad(format!(
                "`r` should be a positive integer value but the value passed is 0 (r = {}, rank_pattern = {:?})",
                self.r, self.rank_pattern
            ));
        }
        if !self.alpha.is_finite() || self.alpha_pattern.values().any(|a| !a.is_finite()) {
            return bad("`alpha` and `alpha_pattern` must be finite".into());
        }
        for (field, p) in [
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("`{field}` must be in [0, 1), got {p}"));
            }
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            );
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return bad("`modules_to_save` is not supported yet".into());
        }
        Ok(())
    }

    /// Rank and alpha for the module at `path`, after the patterns.
    fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        Ok((
            pattern_value(&self.rank_pattern, path, self.r)?,
            pattern_value(&self.alpha_pattern, path, self.alpha)?,
        ))
    }
}

impl AdapterConfig for LohaConfig {
    fn reads(peft_type: Option<&str>) -> bool {
        peft_type == Some("LOHA")
    }

    fn read(path: &Path) -> Result<Self> {
        LohaConfig::from_file(path)
    }

    fn saved_json(&self) -> String {
        LohaConfig {
            inference_mode: true,
            ..self.clone()
        }
        .to_json_string()
    }
}

/// PyTorch's `kaiming_uniform_(a=√5)` on a `[_, fan_in]` weight: U(±1/√fan_in).
fn kaiming<B: Backend>(shape: [usize; 2], fan_in: usize, device: &B::Device) -> Tensor<B, 2> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

impl SlotMethod for Loha {
    type Config = LohaConfig;

    /// Unset targets take PEFT's defaults for the model's type. GPT-2's
    /// layers are `Conv1D`, which PEFT's LoHa refuses: so do we.
    fn prepare(config: &mut LohaConfig, model_type: Option<&str>) -> Result<()> {
        if model_type == Some("gpt2") {
            return Err(PeftError::Config(
                "LoHa: Target module of type Conv1D not supported, currently only adapters for \
                 Conv2d, Conv1d, Linear are supported (GPT-2's layers are Conv1D, as in PEFT)"
                    .into(),
            ));
        }
        if config.target_modules.is_none() {
            let known: Vec<&str> = LOHA_DEFAULTS.iter().map(|d| d.0).collect();
            let Some((_, targets)) = LOHA_DEFAULTS.iter().find(|d| Some(d.0) == model_type) else {
                return Err(PeftError::Config(format!(
                    "LoHa: set `target_modules`; PEFT's defaults exist only for model types \
                     {known:?}, and this model's type is {}",
                    model_type.map_or("unknown".into(), |t| format!("`{t}`"))
                )));
            };
            config.target_modules = Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            ));
        }
        config.validate()
    }

    fn targets(config: &LohaConfig, path: &str, output_layers: &[String]) -> Result<bool> {
        targets_match(
            config.target_modules.as_ref(),
            config.exclude_modules.as_ref(),
            config.layers_to_transform.as_ref(),
            config.layers_pattern.as_ref(),
            path,
            output_layers,
        )
    }

    fn target_rule(config: &LohaConfig) -> String {
        serde_json::to_string(&config.target_modules).unwrap_or_else(|_| "?".into())
    }

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
        let entry = LohaEntry {
            w1_a: factor([r, d_out], r, fresh),
            w1_b: factor([d_in, r], d_in, fresh),
            w2_a: factor([r, d_out], r, fresh),
            w2_b: factor([d_in, r], d_in, fresh && !config.init_weights),
            meta: LohaMeta {
                name: name.to_string(),
                rank: r,
                alpha,
                scaling: alpha / r as f64,
                rank_dropout: config.rank_dropout,
                module_dropout: config.module_dropout,
                merged: false,
            },
        };
        slot.add(entry, path)
    }

    fn write_tensors<B: Backend>(
        _config: &LohaConfig,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        let Some(e) = slot.entry::<LohaEntry<B>>(name) else {
            return;
        };
        for (key, p) in [
            ("hada_w1_a", &e.w1_a),
            ("hada_w1_b", &e.w1_b),
            ("hada_w2_a", &e.w2_a),
            ("hada_w2_b", &e.w2_b),
        ] {
            out.push((
                format!("{KEY_PREFIX}{path}.{key}"),
                HostTensor::from_tensor(p.val()).transposed(),
            ));
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
        let device = slot.device();
        let (d_in, d_out) = (slot.d_input(), slot.d_output());
        let entry = slot
            .entry_mut::<LohaEntry<B>>(name)
            .expect("injected before filling");
        let r = entry.meta.rank;
        let mut take = |key: &str, torch_shape: [usize; 2]| -> Result<Param<Tensor<B, 2>>> {
            let key = format!("{KEY_PREFIX}{path}.{key}");
            let t = take_tensor(tensors, &key, file)?;
            if t.shape != torch_shape {
                return Err(PeftError::Shape {
                    name: key,
                    expected: torch_shape.to_vec(),
                    found: t.shape,
                });
            }
            let [rows, cols] = torch_shape;
            Ok(Param::from_tensor(t.transposed().to_tensor(
                [cols, rows],
                &key,
                &device,
            )?))
        };
        entry.w1_a = take("hada_w1_a", [d_out, r])?;
        entry.w1_b = take("hada_w1_b", [r, d_in])?;
        entry.w2_a = take("hada_w2_a", [d_out, r])?;
        entry.w2_b = take("hada_w2_b", [r, d_in])?;
        Ok(())
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<LohaEntry<B>>();
    }
}
