//! What the LyCORIS methods share, as PEFT 0.21's `LycorisConfig` and
//! `LycorisTuner` define it: the config fields every one of them has
//! ([`LycorisConfig`]: reading, checking, default targets, rank/alpha
//! patterns), and their factors in PEFT's file ([`write_factors`],
//! [`read_factors`]). A method file adds its own fields and how its factors
//! start.

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
use peft_core::slot::{DeltaEntry, DeltaFactors};
use peft_core::slot_model::KEY_PREFIX;
use peft_core::target::{pattern_value, targets_match};
use peft_core::{PeftError, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The fields PEFT's `LycorisConfig` gives every LyCORIS method, borrowed
/// from a method's config.
#[derive(Debug, Clone, Copy)]
pub struct Shared<'a> {
    /// Rank `r`.
    pub r: usize,
    /// Scaling numerator: `ΔW` is scaled by `alpha / r`.
    pub alpha: f64,
    /// Probability of dropping an output row of `ΔW` in training.
    pub rank_dropout: f64,
    /// Probability of skipping a layer's delta in training.
    pub module_dropout: f64,
    /// Which modules get an adapter.
    pub target_modules: Option<&'a TargetModules>,
    /// Modules never adapted.
    pub exclude_modules: Option<&'a TargetModules>,
    /// Restrict adaptation to these layer indices.
    pub layers_to_transform: Option<&'a LayerIndices>,
    /// The name of the layer list in module paths.
    pub layers_pattern: Option<&'a LayersPattern>,
    /// Per-module rank overrides.
    pub rank_pattern: &'a IndexMap<String, usize>,
    /// Per-module alpha overrides.
    pub alpha_pattern: &'a IndexMap<String, f64>,
    /// Extra modules trained and saved in full.
    pub modules_to_save: Option<&'a Vec<String>>,
}

/// PEFT 0.21's `TRANSFORMERS_MODELS_TO_{LOHA,LOKR}_TARGET_MODULES_MAPPING`
/// (copies of LoRA's) for the architectures of this workspace.
const DEFAULT_TARGETS: &[(&str, &[&str])] = &[
    ("llama", &["q_proj", "v_proj"]),
    ("mistral", &["q_proj", "v_proj"]),
    ("bert", &["query", "value"]),
    ("roberta", &["query", "value"]),
    ("gpt2", &["c_attn"]),
];

/// A LyCORIS method's `adapter_config.json`: what it shares with the family
/// is read through [`shared`](Self::shared), and everything else (parsing,
/// checks, defaults, patterns, target rules) is provided.
pub trait LycorisConfig: Serialize + DeserializeOwned + Clone {
    /// The file's `peft_type` (`"LOHA"`).
    const PEFT_TYPE: &'static str;
    /// The method's name in messages (`"LoHa"`).
    const METHOD: &'static str;

    /// The family's fields.
    fn shared(&self) -> Shared<'_>;

    /// `target_modules`, to fill with PEFT's defaults.
    fn target_modules_mut(&mut self) -> &mut Option<TargetModules>;

    /// Keys of the file this version does not model.
    fn extra(&self) -> &serde_json::Map<String, Value>;

    /// Checks of the method's own fields.
    fn validate_own(&self) -> Result<()> {
        Ok(())
    }

    /// Parses `adapter_config.json` text; `origin` names the source in errors.
    fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let value = parse_json(text, origin)?;
        let peft_type = value.get("peft_type").and_then(Value::as_str);
        if peft_type != Some(Self::PEFT_TYPE) {
            return Err(PeftError::Config(format!(
                "{}: peft_type {} is not {}",
                origin.display(),
                peft_type.map_or("missing".into(), |t| format!("`{t}`")),
                Self::PEFT_TYPE
            )));
        }
        let config: Self = from_value(value, origin)?;
        warn_unknown_keys(config.extra(), KNOWN_UNMODELLED, origin);
        config.validate()?;
        Ok(config)
    }

    /// Reads `adapter_config.json` from a file.
    fn from_file(path: &Path) -> Result<Self> {
        Self::from_json_str(&read_text(path)?, path)
    }

    /// The JSON text PEFT writes (pretty, keys sorted).
    fn to_json_string(&self) -> String {
        sorted_json(self)
    }

    /// The JSON PEFT writes into a saved adapter folder
    /// (`inference_mode: true`).
    fn saved_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("configs always serialise");
        value["inference_mode"] = Value::Bool(true);
        sorted_json(&value)
    }

    /// Checks values a user can get wrong, as PEFT's `update_layer` and
    /// `__post_init__` do.
    fn validate(&self) -> Result<()> {
        let s = self.shared();
        let bad = |what: String| Err(PeftError::Config(format!("{}: {what}", Self::METHOD)));
        if s.r == 0 || s.rank_pattern.values().any(|&r| r == 0) {
            return bad(format!(
                "`r` should be a positive integer value but the value passed is 0 (r = {}, rank_pattern = {:?})",
                s.r, s.rank_pattern
            ));
        }
        if !s.alpha.is_finite() || s.alpha_pattern.values().any(|a| !a.is_finite()) {
            return bad("`alpha` and `alpha_pattern` must be finite".into());
        }
        for (field, p) in [
            ("rank_dropout", s.rank_dropout),
            ("module_dropout", s.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("`{field}` must be in [0, 1), got {p}"));
            }
        }
        if s.layers_pattern.is_some() && s.layers_to_transform.is_none() {
            return bad(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            );
        }
        if s.modules_to_save.is_some_and(|m| !m.is_empty()) {
            return bad("`modules_to_save` is not supported yet".into());
        }
        self.validate_own()
    }

    /// Checks the config and fills PEFT's default targets for a model of
    /// type `model_type`. GPT-2's layers are `Conv1D`, which PEFT's LyCORIS
    /// methods refuse: so do we.
    fn prepare(&mut self, model_type: Option<&str>) -> Result<()> {
        if model_type == Some("gpt2") {
            return Err(PeftError::Config(format!(
                "{}: Target module of type Conv1D not supported, currently only adapters for \
                 Conv2d, Conv1d, Linear are supported (GPT-2's layers are Conv1D, as in PEFT)",
                Self::METHOD
            )));
        }
        let targets = self.target_modules_mut();
        if targets.is_none() {
            let known: Vec<&str> = DEFAULT_TARGETS.iter().map(|d| d.0).collect();
            let Some((_, names)) = DEFAULT_TARGETS.iter().find(|d| Some(d.0) == model_type) else {
                return Err(PeftError::Config(format!(
                    "{}: set `target_modules`; PEFT's defaults exist only for model types \
                     {known:?}, and this model's type is {}",
                    Self::METHOD,
                    model_type.map_or("unknown".into(), |t| format!("`{t}`"))
                )));
            };
            *targets = Some(TargetModules::List(
                names.iter().map(|s| s.to_string()).collect(),
            ));
        }
        self.validate()
    }

    /// Whether the config adapts the linear layer at `path`.
    fn targets(&self, path: &str, output_layers: &[String]) -> Result<bool> {
        let s = self.shared();
        targets_match(
            s.target_modules,
            s.exclude_modules,
            s.layers_to_transform,
            s.layers_pattern,
            path,
            output_layers,
        )
    }

    /// The target rule, to name in an error when nothing matched.
    fn target_rule(&self) -> String {
        serde_json::to_string(&self.shared().target_modules).unwrap_or_else(|_| "?".into())
    }

    /// Rank and alpha for the module at `path`, after the patterns.
    fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let s = self.shared();
        Ok((
            pattern_value(s.rank_pattern, path, s.r)?,
            pattern_value(s.alpha_pattern, path, s.alpha)?,
        ))
    }
}

/// PyTorch's `kaiming_uniform_(a=√5)` on a weight whose fan-in is
/// `fan_in`: U(±1/√fan_in).
pub fn kaiming<B: Backend>(shape: [usize; 2], fan_in: usize, device: &B::Device) -> Tensor<B, 2> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

/// Appends the entry's factors to `out` under PEFT's keys for module `path`,
/// in PEFT's `[out, in]` layout.
pub fn write_factors<B: Backend, F: DeltaFactors<B>>(
    entry: &DeltaEntry<B, F>,
    path: &str,
    out: &mut Vec<(String, HostTensor)>,
) {
    for (key, p) in entry.factors.factors() {
        out.push((
            format!("{KEY_PREFIX}{path}.{key}"),
            HostTensor::from_tensor(p.val()).transposed(),
        ));
    }
}

/// Moves the entry's factors for module `path` out of `tensors` (read from
/// `file`): each must have the shape of the placeholder it replaces, in
/// PEFT's layout.
pub fn read_factors<B: Backend, F: DeltaFactors<B>>(
    entry: &mut DeltaEntry<B, F>,
    path: &str,
    tensors: &mut HashMap<String, HostTensor>,
    file: &Path,
) -> Result<()> {
    for (key, param) in entry.factors.factors_mut() {
        let key = format!("{KEY_PREFIX}{path}.{key}");
        let [cols, rows] = param.shape().dims::<2>();
        let t = take_tensor(tensors, &key, file)?;
        if t.shape != [rows, cols] {
            return Err(PeftError::Shape {
                name: key,
                expected: vec![rows, cols],
                found: t.shape,
            });
        }
        let device = param.device();
        *param = Param::from_tensor(t.transposed().to_tensor([cols, rows], &key, &device)?);
    }
    Ok(())
}
