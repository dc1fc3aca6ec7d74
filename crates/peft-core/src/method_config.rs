//! [`MethodConfig`]: what every slot method's `adapter_config.json` does the
//! same way (its `peft_type`, reading and writing as PEFT does, PEFT's
//! default targets per model type, the target rule), so that a method's
//! config type is its fields and its checks.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{
    from_value, parse_json, read_text, sorted_json, warn_unknown_keys, LayerIndices, LayersPattern,
    TargetModules, KNOWN_UNMODELLED,
};
use crate::error::{PeftError, Result};
use crate::target::targets_match;

/// PEFT 0.21's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` for the
/// architectures of this workspace; LoHa, LoKr, OFT and BOFT use copies.
pub const LORA_DEFAULT_TARGETS: &[(&str, &[&str])] = &[
    ("llama", &["q_proj", "v_proj"]),
    ("mistral", &["q_proj", "v_proj"]),
    ("bert", &["query", "value"]),
    ("roberta", &["query", "value"]),
    ("gpt2", &["c_attn"]),
];

/// The fields that say which layers a config adapts, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct TargetSpec<'a> {
    /// Which modules get an adapter.
    pub target_modules: Option<&'a TargetModules>,
    /// Modules never adapted.
    pub exclude_modules: Option<&'a TargetModules>,
    /// Restrict adaptation to these layer indices.
    pub layers_to_transform: Option<&'a LayerIndices>,
    /// The name of the layer list in module paths.
    pub layers_pattern: Option<&'a LayersPattern>,
    /// Layers trained and saved in full beside the adapter (PEFT's
    /// `modules_to_save`).
    pub modules_to_save: Option<&'a Vec<String>>,
}

/// The fields of an `adapter_config.json` that say which task the adapter
/// is for and on which base (`AdapterConfig::for_seq_cls` sets them).
pub struct TaskFields<'a> {
    /// PEFT's `task_type` (`CAUSAL_LM`, `SEQ_CLS`, ...).
    pub task_type: &'a mut Option<String>,
    /// PEFT's `modules_to_save`.
    pub modules_to_save: &'a mut Option<Vec<String>>,
    /// The base model's name or path.
    pub base_model_name_or_path: &'a mut Option<String>,
}

/// The four field accessors of [`MethodConfig`] (`target_spec`,
/// `target_modules_mut`, `task_fields`, `extra`) for a config whose fields
/// carry PEFT's names (`target_modules`, `exclude_modules`,
/// `layers_to_transform`, `layers_pattern`, `modules_to_save`,
/// `task_type`, `base_model_name_or_path`, and the unmodelled keys in
/// `extra`): write `peft_core::config_fields!();` in the `impl
/// MethodConfig`, so that a method's file holds only what is its own. A
/// config PEFT gives fewer of the optional target fields (LN tuning has no
/// layer selection, trainable tokens none at all) names those it has:
/// `config_fields!(with [exclude_modules])`, `config_fields!(with [])`.
#[macro_export]
macro_rules! config_fields {
    () => {
        $crate::config_fields!(with [exclude_modules, layers_to_transform, layers_pattern]);
    };
    (with [$($field:ident),* $(,)?]) => {
        fn target_spec(&self) -> $crate::method_config::TargetSpec<'_> {
            #[allow(unused_mut)]
            let mut spec = $crate::method_config::TargetSpec {
                target_modules: self.target_modules.as_ref(),
                exclude_modules: None,
                layers_to_transform: None,
                layers_pattern: None,
                modules_to_save: self.modules_to_save.as_ref(),
            };
            $(spec.$field = self.$field.as_ref();)*
            spec
        }

        fn target_modules_mut(&mut self) -> &mut Option<$crate::config::TargetModules> {
            &mut self.target_modules
        }

        fn task_fields(&mut self) -> $crate::method_config::TaskFields<'_> {
            $crate::method_config::TaskFields {
                task_type: &mut self.task_type,
                modules_to_save: &mut self.modules_to_save,
                base_model_name_or_path: &mut self.base_model_name_or_path,
            }
        }

        fn extra(&self) -> &::serde_json::Map<String, ::serde_json::Value> {
            &self.extra
        }
    };
}

/// The rows a trainable tokens adapter retrains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRows<'a> {
    /// Token ids.
    pub ids: &'a [usize],
    /// Whether they start random (PEFT's `init_weights=False`) rather than
    /// at the base rows.
    pub random: bool,
}

/// A slot method's `adapter_config.json`: the method gives its fields
/// ([`target_spec`](Self::target_spec), [`extra`](Self::extra)) and checks
/// ([`validate`](Self::validate)); reading, writing, default targets and
/// target matching are provided.
pub trait MethodConfig: Serialize + DeserializeOwned + Clone {
    /// The file's `peft_type` (`"LOKR"`).
    const PEFT_TYPE: &'static str;
    /// The method's name in messages (`"LoKr"`).
    const METHOD: &'static str;
    /// The method's name on the command line (`peft train --method lokr`).
    const NAME: &'static str;
    /// PEFT's default targets per model type.
    const DEFAULT_TARGETS: &'static [(&'static str, &'static [&'static str])] =
        LORA_DEFAULT_TARGETS;

    /// The command-line settings the method takes, each with the key it
    /// sets (`("targets", "target_modules")`); see the `settings` module.
    const CLI_SETTINGS: &'static [(&'static str, &'static str)];

    /// `Some(key)` for a method that trains copies of norm layers (LN
    /// tuning: `ln_tuning_layers`); see `AdapterConfig::norm_copy_key`.
    const NORM_COPY_KEY: Option<&'static str> = None;

    /// The fields that choose the adapted layers.
    fn target_spec(&self) -> TargetSpec<'_>;

    /// For a method that retrains rows of embedding tables instead of
    /// adapting linear layers (trainable tokens): the rows, and whether
    /// they start random; see `AdapterConfig::token_rows`.
    fn token_rows(&self) -> Option<TokenRows<'_>> {
        None
    }

    /// Fixes up the JSON after the command-line settings `given` were
    /// written into it (OFT: `--r` replaces the block size).
    fn adjust_cli(_given: &[&str], _config: &mut Value) {}

    /// `target_modules`, to fill with PEFT's defaults.
    fn target_modules_mut(&mut self) -> &mut Option<TargetModules>;

    /// `task_type`, `modules_to_save` and `base_model_name_or_path`.
    fn task_fields(&mut self) -> TaskFields<'_>;

    /// Keys of the file this version does not model.
    fn extra(&self) -> &Map<String, Value>;

    /// Checks values a user can get wrong, as PEFT's `__post_init__` and
    /// `update_layer` do.
    fn validate(&self) -> Result<()>;

    /// Refuses this config beside `existing`, another adapter of the same
    /// method in the model, where PEFT's `_check_new_adapter_config` does
    /// (VeRA: one projection key and one `save_projection` per model).
    fn check_beside(&self, _existing: &Self) -> Result<()> {
        Ok(())
    }

    /// Refuses a model type whose layers PEFT's method does not take
    /// (GPT-2's `Conv1D` for the LyCORIS and orthogonal methods).
    fn check_model_type(_model_type: Option<&str>) -> Result<()> {
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

    /// Checks the config for a model of type `model_type` and fills PEFT's
    /// default targets when it names none.
    fn prepare(&mut self, model_type: Option<&str>) -> Result<()> {
        Self::check_model_type(model_type)?;
        let targets = self.target_modules_mut();
        if targets.is_none() {
            let known: Vec<&str> = Self::DEFAULT_TARGETS.iter().map(|d| d.0).collect();
            let found = Self::DEFAULT_TARGETS
                .iter()
                .find(|d| Some(d.0) == model_type);
            let Some((_, names)) = found else {
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
        let s = self.target_spec();
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
        serde_json::to_string(&self.target_spec().target_modules).unwrap_or_else(|_| "?".into())
    }

    /// PEFT's `modules_to_save`: suffixes of the layers copied in full.
    fn modules_to_save(&self) -> &[String] {
        self.target_spec()
            .modules_to_save
            .map_or(&[], |m| m.as_slice())
    }
}

/// PEFT's refusal of GPT-2's `Conv1D` layers by a method that takes only
/// `nn.Linear` (and convolutions).
pub fn refuse_conv1d(method: &str, model_type: Option<&str>) -> Result<()> {
    if model_type == Some("gpt2") {
        return Err(PeftError::Config(format!(
            "{method}: Target module of type Conv1D not supported, currently only adapters for \
             Conv2d, Conv1d, Linear are supported (GPT-2's layers are Conv1D, as in PEFT)"
        )));
    }
    Ok(())
}
