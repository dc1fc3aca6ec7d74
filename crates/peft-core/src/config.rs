//! PEFT's `adapter_config.json`, as serde types.
//!
//! Keys this version does not model are kept in `extra` and written back
//! unchanged: newer PEFT versions add keys, and reading them must never fail.

use std::collections::BTreeMap;
use std::path::Path;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{PeftError, Result};

/// `target_modules`: a regex (full match on the module path), a list of names
/// (exact path or path suffix after a dot), or `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A single string: a regular expression matched against the whole path,
    /// or the special value `all-linear`.
    Pattern(String),
    /// A list of module names or path suffixes.
    List(Vec<String>),
}

impl TargetModules {
    /// Whether this is PEFT's special `all-linear` value.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Pattern(p) if p.eq_ignore_ascii_case("all-linear"))
    }
}

/// `layers_to_transform`: one layer index or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// A single index.
    One(usize),
    /// Several indices.
    Many(Vec<usize>),
}

/// `layers_pattern`: one or several names of the layer list (e.g. `layers`, `h`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// A single name.
    One(String),
    /// Several names.
    Many(Vec<String>),
}

/// `init_lora_weights`: `true` (Kaiming-uniform A, zero B), `false` (random
/// B, for tests), or a named scheme (`"gaussian"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// PEFT's default (`true`) or a non-identity random init (`false`).
    Bool(bool),
    /// A named scheme.
    Named(String),
}

/// PEFT's `trainable_token_indices`: token ids of the model's input
/// embedding, or token ids per embedding layer (keys: module name
/// suffixes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIndices {
    /// Rows of the input embedding.
    List(Vec<usize>),
    /// Rows per layer, by name.
    PerLayer(IndexMap<String, Vec<usize>>),
}

/// The LoRA initialisations that split each targeted base weight `W` into
/// a residual and the adapter's start, `W = W_res + s·B·A`, so the model's
/// output is unchanged and training starts from a chosen part of `W`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseSplittingInit {
    /// PiSSA: `B·A` is the rank-`r` truncated SVD of `W` (its principal
    /// singular values and vectors); `niter: Some(n)` takes PyTorch's
    /// randomized `svd_lowrank` with `n` subspace iterations instead.
    Pissa {
        /// Subspace iterations of the randomized SVD (`pissa_niter_<n>`).
        niter: Option<usize>,
    },
    /// OLoRA: `B`, `A` are the first `r` columns of `Q` and rows of `R` in
    /// the QR decomposition of `W`.
    Olora,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}
fn lora_type() -> String {
    "LORA".into()
}

/// PEFT's `LoraConfig`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "lora_type")]
    pub peft_type: String,
    /// Rank `r` of the update (`A: [in, r]`, `B: [r, out]` in Burn layout).
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator: the update is scaled by `alpha / r` (or `alpha / √r`).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout probability applied to the input of `A` in training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules get an adapter.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted (regex full match, or exact name / suffix list).
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// The base layer stores its weight as `[in, out]` (GPT-2's `Conv1D`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `"none"`: biases are not trained (the only value supported).
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Weight-decomposed LoRA (DoRA).
    #[serde(default)]
    pub use_dora: bool,
    /// Initialisation scheme.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
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
    /// Rows of the input embedding each adapter retrains and saves, the
    /// rest frozen (PEFT's trainable tokens beside LoRA).
    #[serde(default)]
    pub trainable_token_indices: Option<TokenIndices>,
    /// With tied input and output embeddings, a copy of the embedding in
    /// `modules_to_save` is the output head's too (PEFT ties them only for
    /// the layers it calls embeddings, `embed_tokens`).
    #[serde(default)]
    pub ensure_weight_tying: bool,
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

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid LoraConfig")
    }
}

/// Keys PEFT writes that this crate knows and deliberately does not model:
/// they are kept silently. Others are kept with a warning.
pub const KNOWN_UNMODELLED: &[&str] = &[
    "auto_mapping",
    "revision",
    "layer_replication",
    "loftq_config",
    "megatron_config",
    "megatron_core",
    "eva_config",
    "corda_config",
    "lora_bias",
    "runtime_config",
    "trainable_token_indices",
    "target_parameters",
    "qalora_group_size",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "ensure_weight_tying",
    "peft_version",
];

/// PEFT options that change what an adapter computes and that this crate
/// does not implement: a set value is refused with an error naming the
/// field; an unset one (null, false, empty) is kept, as PEFT writes them.
const UNSUPPORTED_WHEN_SET: &[&str] = &[
    "layer_replication",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "target_parameters",
    "megatron_config",
];

/// Whether a config value is PEFT's "not set": null, false, `{}` or `[]`.
fn is_unset(value: &Value) -> bool {
    matches!(value, Value::Null | Value::Bool(false))
        || value.as_object().is_some_and(|o| o.is_empty())
        || value.as_array().is_some_and(|a| a.is_empty())
}

/// Pretty JSON with sorted keys, as PEFT's `to_dict` writes it: files then
/// diff cleanly against PEFT's own.
pub fn sorted_json<T: Serialize>(config: &T) -> String {
    let value = serde_json::to_value(config).expect("configs always serialise");
    let sorted: BTreeMap<String, Value> = match value {
        Value::Object(map) => map.into_iter().collect(),
        _ => unreachable!("a struct serialises to an object"),
    };
    serde_json::to_string_pretty(&sorted).expect("a JSON map always serialises")
}

/// Warns about keys of `extra` that are set (non-default) and not in `known`.
/// Newer PEFT versions write many keys for features this crate does not
/// have; only a set one can change the meaning.
pub fn warn_unknown_keys(extra: &Map<String, Value>, known: &[&str], origin: &Path) {
    for (key, value) in extra {
        if !is_unset(value) && !known.contains(&key.as_str()) {
            eprintln!(
                "warning: {}: unknown key `{key}` kept as is",
                origin.display()
            );
        }
    }
}

/// Deserialises a parsed config, naming `origin` in errors.
pub fn from_value<T: serde::de::DeserializeOwned>(value: Value, origin: &Path) -> Result<T> {
    serde_json::from_value(value).map_err(|source| PeftError::Json {
        path: origin.to_path_buf(),
        source,
    })
}

/// Parses `text` as JSON, naming `origin` in errors.
pub fn parse_json(text: &str, origin: &Path) -> Result<Value> {
    serde_json::from_str(text).map_err(|source| PeftError::Json {
        path: origin.to_path_buf(),
        source,
    })
}

/// Reads a config file's text, naming it in errors.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl LoraConfig {
    /// A config with rank `r`, alpha `lora_alpha` and the given target names.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// Parses `adapter_config.json` text; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let value = parse_json(text, origin)?;
        let peft_type = value
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(PeftError::Config(format!(
                "{}: peft_type `{peft_type}` is not LORA",
                origin.display()
            )));
        }
        let config: LoraConfig = from_value(value, origin)?;
        warn_unknown_keys(&config.extra, KNOWN_UNMODELLED, origin);
        config.validate()?;
        Ok(config)
    }

    /// Reads `adapter_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json_str(&read_text(path)?, path)
    }

    /// The JSON text PEFT writes (pretty, sorted as PEFT's `to_dict`).
    pub fn to_json_string(&self) -> String {
        sorted_json(self)
    }

    /// Checks values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::Config(
                "`r` must be a positive integer, got 0".into(),
            ));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return Err(PeftError::Config(format!("rank_pattern `{k}` has rank 0")));
        }
        if !self.lora_alpha.is_finite() {
            return Err(PeftError::Config("`lora_alpha` must be finite".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::Config(format!(
                "`lora_dropout` must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        if self.bias != "none" {
            return Err(PeftError::Config(format!(
                "bias `{}` is not supported (only \"none\")",
                self.bias
            )));
        }
        for key in UNSUPPORTED_WHEN_SET {
            if let Some(v) = self.extra.get(*key).filter(|v| !is_unset(v)) {
                return Err(PeftError::Config(format!(
                    "`{key}` = {v} is not supported (only its default: unset)"
                )));
            }
        }
        match &self.init_lora_weights {
            InitLoraWeights::Bool(_) => {}
            InitLoraWeights::Named(n) if n == "gaussian" => {}
            InitLoraWeights::Named(n) if n == "loftq" => {
                self.loftq()?;
            }
            InitLoraWeights::Named(_) => {
                self.base_splitting_init()?;
            }
        }
        Ok(())
    }

    /// With `init_lora_weights` `"pissa"`, `"pissa_niter_<n>"` or
    /// `"olora"`, the initialisation that moves part of each base weight
    /// into the adapter; `None` for the inits that leave the base alone.
    /// Any other name is refused, listing the supported ones.
    pub fn base_splitting_init(&self) -> Result<Option<BaseSplittingInit>> {
        let InitLoraWeights::Named(name) = &self.init_lora_weights else {
            return Ok(None);
        };
        let refuse = || {
            PeftError::Config(format!(
                "init_lora_weights `{name}` is not supported (true, false, \"gaussian\", \"loftq\", \"pissa\", \"pissa_niter_<n>\", \"olora\")"
            ))
        };
        Ok(match name.as_str() {
            "gaussian" | "loftq" => None,
            "pissa" => Some(BaseSplittingInit::Pissa { niter: None }),
            "olora" => Some(BaseSplittingInit::Olora),
            other => match other.strip_prefix("pissa_niter_") {
                Some(n) => Some(BaseSplittingInit::Pissa {
                    niter: Some(n.parse::<usize>().map_err(|_| refuse())?),
                }),
                None => return Err(refuse()),
            },
        })
    }

    /// With `init_lora_weights: "loftq"`, PEFT's `loftq_config`
    /// (`loftq_bits`, default 4; `loftq_iter`, default 1) as
    /// `Some((bits, iterations))`; `None` for other inits. Only 4 bits (NF4)
    /// is supported.
    pub fn loftq(&self) -> Result<Option<(usize, usize)>> {
        if self.init_lora_weights != InitLoraWeights::Named("loftq".into()) {
            return Ok(None);
        }
        let c = self.extra.get("loftq_config");
        let get = |key: &str, default: u64| -> Result<usize> {
            match c.and_then(|c| c.get(key)) {
                None | Some(Value::Null) => Ok(default as usize),
                Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    PeftError::Config(format!(
                        "loftq_config.{key} must be a whole number, not {v}"
                    ))
                }),
            }
        };
        let (bits, iterations) = (get("loftq_bits", 4)?, get("loftq_iter", 1)?);
        if bits != 4 {
            return Err(PeftError::Config(format!(
                "loftq_bits {bits} is not supported (4: NF4)"
            )));
        }
        if !(1..=64).contains(&iterations) {
            return Err(PeftError::Config(format!(
                "loftq_iter {iterations} is not in 1..=64"
            )));
        }
        Ok(Some((bits, iterations)))
    }

    /// The scaling factor for a given rank and alpha: `α/r`, or `α/√r` with rsLoRA.
    pub fn scaling_for(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

fn ia3_type() -> String {
    "IA3".into()
}
fn default_true() -> bool {
    true
}

/// PEFT's `IA3Config`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    /// Always `"IA3"`.
    #[serde(default = "ia3_type")]
    pub peft_type: String,
    /// Which modules get a vector; `None`: PEFT's default for the model type
    /// ([`Ia3Config::fill_defaults`]).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Targets that scale their input (`[1, in]` in PEFT's files) rather than
    /// their output. A list entry matches a path that *ends with* it (no dot
    /// required: PEFT's rule); a string is a regex full match.
    #[serde(default)]
    pub feedforward_modules: Option<TargetModules>,
    /// The base layer stores its weight as `[in, out]` (GPT-2's `Conv1D`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Layers each adapter keeps a trainable full copy of (PEFT's
    /// `modules_to_save`: a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Vectors start at ones (identity); `false` draws them from N(0, 1).
    #[serde(default = "default_true")]
    pub init_ia3_weights: bool,
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

impl Default for Ia3Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid Ia3Config")
    }
}

/// PEFT 0.21's `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` and
/// `..._FEEDFORWARD_MODULES_MAPPING` for the architectures of this workspace.
const IA3_DEFAULTS: &[(&str, &[&str], &[&str])] = &[
    ("llama", &["k_proj", "v_proj", "down_proj"], &["down_proj"]),
    ("gpt2", &["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
    ("bert", &["key", "value", "output.dense"], &["output.dense"]),
    (
        "roberta",
        &["key", "value", "output.dense"],
        &["output.dense"],
    ),
    (
        "mistral",
        &["k_proj", "v_proj", "down_proj"],
        &["down_proj"],
    ),
];

fn names(list: &[&str]) -> Option<TargetModules> {
    Some(TargetModules::List(
        list.iter().map(|s| s.to_string()).collect(),
    ))
}

impl Ia3Config {
    /// A config with the given targets and feed-forward targets.
    pub fn new(targets: &[&str], feedforward: &[&str]) -> Self {
        Ia3Config {
            target_modules: names(targets),
            feedforward_modules: names(feedforward),
            ..Default::default()
        }
    }

    /// Parses `adapter_config.json` text; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let value = parse_json(text, origin)?;
        let peft_type = value.get("peft_type").and_then(Value::as_str);
        if peft_type != Some("IA3") {
            return Err(PeftError::Config(format!(
                "{}: peft_type {} is not IA3",
                origin.display(),
                peft_type.map_or("missing".into(), |t| format!("`{t}`"))
            )));
        }
        let config: Ia3Config = from_value(value, origin)?;
        warn_unknown_keys(&config.extra, KNOWN_UNMODELLED, origin);
        config.validate()?;
        Ok(config)
    }

    /// Reads `adapter_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json_str(&read_text(path)?, path)
    }

    /// The JSON text PEFT writes (pretty, sorted as PEFT's `to_dict`).
    pub fn to_json_string(&self) -> String {
        sorted_json(self)
    }

    /// Fills unset `target_modules` / `feedforward_modules` with PEFT's
    /// defaults for `model_type` (PEFT's `_prepare_adapter_config`).
    pub fn fill_defaults(&mut self, model_type: Option<&str>) -> Result<()> {
        if self.target_modules.is_some() && self.feedforward_modules.is_some() {
            return self.validate();
        }
        let known: Vec<&str> = IA3_DEFAULTS.iter().map(|d| d.0).collect();
        let Some((_, targets, feedforward)) = IA3_DEFAULTS.iter().find(|d| Some(d.0) == model_type)
        else {
            return Err(PeftError::Config(format!(
                "(IA)³: set `target_modules` and `feedforward_modules`; PEFT's defaults exist only \
                 for model types {known:?}, and this model's type is {}",
                model_type.map_or("unknown".into(), |t| format!("`{t}`"))
            )));
        };
        if self.target_modules.is_none() {
            self.target_modules = names(targets);
        }
        if self.feedforward_modules.is_none() {
            self.feedforward_modules = names(feedforward);
        }
        self.validate()
    }

    /// Checks values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        if let (Some(TargetModules::List(ff)), Some(TargetModules::List(t))) =
            (&self.feedforward_modules, &self.target_modules)
        {
            if let Some(extra) = ff.iter().find(|f| !t.contains(f)) {
                return Err(PeftError::Config(format!(
                    "`feedforward_modules` should be a subset of `target_modules`: `{extra}` is not a target"
                )));
            }
        }
        Ok(())
    }

    /// Whether the module at `path` is a feed-forward target (its vector
    /// scales the input), by PEFT's `_check_target_module_feedforward`.
    pub fn is_feedforward(&self, path: &str) -> Result<bool> {
        match &self.feedforward_modules {
            None => Ok(false),
            Some(TargetModules::Pattern(p)) => crate::regex_match::full_match(p, path),
            Some(TargetModules::List(l)) => Ok(l.iter().any(|n| path.ends_with(n.as_str()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_peft_config_and_keeps_unknown_keys() {
        let text = r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","v_proj"],
            "lora_dropout":0.05,"bias":"none","task_type":"CAUSAL_LM","use_rslora":false,
            "layers_to_transform":null,"rank_pattern":{},"alpha_pattern":{},"some_future_key":{"x":1}}"#;
        let c = LoraConfig::from_json_str(text, Path::new("cfg.json")).unwrap();
        assert_eq!(c.r, 4);
        assert_eq!(c.lora_alpha, 8.0);
        assert_eq!(c.extra["some_future_key"]["x"], 1);
        let back: Value = serde_json::from_str(&c.to_json_string()).unwrap();
        assert_eq!(back["some_future_key"]["x"], 1);
        assert_eq!(back["target_modules"][1], "v_proj");
    }

    #[test]
    fn rejects_bad_values_with_typed_errors() {
        let p = Path::new("c.json");
        assert!(matches!(
            LoraConfig::from_json_str(r#"{"r":0}"#, p),
            Err(PeftError::Config(_))
        ));
        assert!(matches!(
            LoraConfig::from_json_str(r#"{"r":"eight"}"#, p),
            Err(PeftError::Json { .. })
        ));
        assert!(matches!(
            LoraConfig::from_json_str(r#"{"peft_type":"IA3"}"#, p),
            Err(PeftError::Config(_))
        ));
        assert!(matches!(
            LoraConfig::from_json_str("{not json", p),
            Err(PeftError::Json { .. })
        ));
        assert!(LoraConfig::from_json_str(r#"{"r":-3}"#, p).is_err());
        // Options PEFT has and this crate does not: refused when set,
        // naming the field; accepted at PEFT's defaults.
        for (key, set) in [
            ("layer_replication", "[[0, 2], [1, 3]]"),
            ("lora_bias", "true"),
            ("use_qalora", "true"),
            ("alora_invocation_tokens", "[1, 2]"),
            ("target_parameters", r#"["experts.gate_up_proj"]"#),
            ("megatron_config", r#"{"tensor_model_parallel_size": 2}"#),
        ] {
            let json = format!(r#"{{"r":8,"target_modules":["q"],"{key}":{set}}}"#);
            match LoraConfig::from_json_str(&json, p) {
                Err(PeftError::Config(m)) => assert!(m.contains(key), "{m}"),
                other => panic!("{key} = {set}: {other:?}"),
            }
        }
        let defaults = r#"{"r":8,"target_modules":["q"],"layer_replication":null,"lora_bias":false,
            "use_qalora":false,"alora_invocation_tokens":null,"target_parameters":[],
            "trainable_token_indices":null,"megatron_config":null}"#;
        LoraConfig::from_json_str(defaults, p).unwrap();
    }

    #[test]
    fn ia3_config_defaults_and_checks() {
        let p = Path::new("ia3.json");
        let mut c = Ia3Config::from_json_str(r#"{"peft_type":"IA3"}"#, p).unwrap();
        assert!(c.init_ia3_weights);
        c.fill_defaults(Some("bert")).unwrap();
        // PEFT's suffix rule has no dot: `output.dense` also matches the
        // attention block's `attention.output.dense`.
        assert!(c
            .is_feedforward("bert.encoder.layer.0.attention.output.dense")
            .unwrap());
        assert!(!c
            .is_feedforward("bert.encoder.layer.0.attention.self.key")
            .unwrap());
        let err = Ia3Config::default().fill_defaults(Some("t5")).unwrap_err();
        assert!(err.to_string().contains("llama"), "{err}");
        let bad = r#"{"peft_type":"IA3","target_modules":["k"],"feedforward_modules":["down"]}"#;
        assert!(matches!(
            Ia3Config::from_json_str(bad, p),
            Err(PeftError::Config(_))
        ));
        assert!(matches!(
            Ia3Config::from_json_str(r#"{"peft_type":"LORA"}"#, p),
            Err(PeftError::Config(_))
        ));
    }
}
