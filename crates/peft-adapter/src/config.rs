//! AdapterHub's configs (`adapters` 1.3): `BnConfig` for bottleneck adapters
//! and `AdapterFusionConfig`, as serde types that read and write the
//! `adapter_config.json` / `adapter_fusion_config.json` AdapterHub saves.

use std::collections::BTreeMap;
use std::path::Path;

use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `reduction_factor`: one number, or per-layer values with a `default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReductionFactor {
    /// The same factor on every layer.
    One(f64),
    /// `{"<layer>": factor, ..., "default": factor}`.
    PerLayer(BTreeMap<String, f64>),
}

/// `scaling`: a fixed factor, `"learned"` (one learned scalar) or
/// `"channel"` (one learned factor per hidden unit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scaling {
    /// A fixed factor.
    Fixed(f64),
    /// `"learned"` or `"channel"`.
    Learned(String),
}

/// `residual_before_ln`: `true`, `false` or `"post_add"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResidualBeforeLn {
    /// `true`: the adapter's residual is the sub-block output before the
    /// model's residual add; `false`: after add and norm.
    Flag(bool),
    /// `"post_add"`: after the residual add, before the norm.
    Named(String),
}

fn f_true() -> bool {
    true
}
fn bert_init() -> String {
    "bert".into()
}
fn unit_scaling() -> Scaling {
    Scaling::Fixed(1.0)
}
fn residual_true() -> ResidualBeforeLn {
    ResidualBeforeLn::Flag(true)
}

/// AdapterHub's `BnConfig`: the architecture of a bottleneck adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BnConfig {
    /// An adapter after the attention block (`AfterAttention`).
    pub mh_adapter: bool,
    /// An adapter after the feed-forward block (`AfterFeedForward`).
    pub output_adapter: bool,
    /// Bottleneck width = `hidden // reduction_factor` (at least 1).
    pub reduction_factor: ReductionFactor,
    /// `relu`, `swish`/`silu`, `gelu`, `gelu_new`, `tanh`, `sigmoid`, `leakyrelu`.
    pub non_linearity: String,
    /// Apply the model's residual add + norm before the adapter.
    #[serde(default)]
    pub original_ln_before: bool,
    /// Apply the model's residual add + norm after the adapter.
    #[serde(default = "f_true")]
    pub original_ln_after: bool,
    /// A layer norm inside the adapter before the down-projection (not supported).
    #[serde(default)]
    pub ln_before: bool,
    /// A layer norm inside the adapter after the up-projection (not supported).
    #[serde(default)]
    pub ln_after: bool,
    /// `bert` (N(0, 0.02), zero biases), `mam_adapter` (Kaiming-uniform
    /// down, zero up: identity) or `houlsby` (N(0, 0.01) truncated at ±0.02).
    #[serde(default = "bert_init")]
    pub init_weights: String,
    /// Seed of the initialisation: the same seed draws the same weights
    /// whatever the adapter's name (our draws, not PyTorch's). Without it
    /// the seed is derived from the name.
    #[serde(default)]
    pub init_weights_seed: Option<u64>,
    /// A parallel adapter: reads the join's residual input, adds to its output.
    #[serde(default)]
    pub is_parallel: bool,
    /// The factor on the up-projection's output.
    #[serde(default = "unit_scaling")]
    pub scaling: Scaling,
    /// Gating units (not supported).
    #[serde(default)]
    pub use_gating: bool,
    /// Where the adapter's own residual is taken.
    #[serde(default = "residual_true")]
    pub residual_before_ln: ResidualBeforeLn,
    /// Add the adapter residual before its (absent) output norm.
    #[serde(default)]
    pub adapter_residual_before_ln: bool,
    /// Layers without this adapter.
    #[serde(default)]
    pub leave_out: Vec<usize>,
    /// Dropout on the adapter output (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Compacter's PHM layers (not supported).
    #[serde(default)]
    pub phm_layer: bool,
    /// Invertible adapters (not supported).
    #[serde(default)]
    pub inv_adapter: Option<String>,
    /// Cross-attention adapters (not supported).
    #[serde(default)]
    pub cross_adapter: bool,
    /// Stochastic depth (not supported).
    #[serde(default)]
    pub stochastic_depth: f64,
    /// Keys this version does not model, kept and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn preset(json: &str) -> BnConfig {
    serde_json::from_str(json).expect("presets are valid BnConfigs")
}

impl BnConfig {
    /// `seq_bn` (Pfeiffer et al.): one adapter after the feed-forward block,
    /// the model's add + norm before it, ReLU, reduction 16.
    pub fn seq_bn() -> Self {
        preset(
            r#"{"mh_adapter":false,"output_adapter":true,"reduction_factor":16,
            "non_linearity":"relu","original_ln_before":true,"original_ln_after":true}"#,
        )
    }

    /// `double_seq_bn` (Houlsby et al.): adapters after attention and after
    /// the feed-forward block, swish, reduction 16.
    pub fn double_seq_bn() -> Self {
        preset(
            r#"{"mh_adapter":true,"output_adapter":true,"reduction_factor":16,
            "non_linearity":"swish","original_ln_before":false,"original_ln_after":true}"#,
        )
    }

    /// `par_bn` (He et al.): parallel to the feed-forward block, ReLU,
    /// reduction 2, scaling 4, identity init (`mam_adapter`).
    pub fn par_bn() -> Self {
        preset(
            r#"{"mh_adapter":false,"output_adapter":true,"reduction_factor":2,
            "non_linearity":"relu","original_ln_before":false,"original_ln_after":true,
            "init_weights":"mam_adapter","is_parallel":true,"scaling":4.0}"#,
        )
    }

    /// A preset by AdapterHub's name (`seq_bn`/`pfeiffer`, `double_seq_bn`/`houlsby`, `par_bn`/`parallel`).
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "seq_bn" | "pfeiffer" => Ok(Self::seq_bn()),
            "double_seq_bn" | "houlsby" => Ok(Self::double_seq_bn()),
            "par_bn" | "parallel" => Ok(Self::par_bn()),
            other => Err(PeftError::Config(format!(
                "unknown bottleneck preset `{other}` (seq_bn, double_seq_bn, par_bn)"
            ))),
        }
    }

    /// Sets the reduction factor.
    pub fn with_reduction_factor(mut self, factor: f64) -> Self {
        self.reduction_factor = ReductionFactor::One(factor);
        self
    }

    /// Sets the layers left without the adapter.
    pub fn with_leave_out(mut self, layers: Vec<usize>) -> Self {
        self.leave_out = layers;
        self
    }

    /// Checks what this crate supports and what a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        let unsupported = [
            (self.ln_before, "ln_before"),
            (self.ln_after, "ln_after"),
            (self.use_gating, "use_gating"),
            (self.phm_layer, "phm_layer (Compacter)"),
            (self.inv_adapter.is_some(), "inv_adapter"),
            (self.cross_adapter, "cross_adapter"),
            (self.stochastic_depth > 0.0, "stochastic_depth"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(PeftError::Config(format!(
                "bottleneck option `{what}` is not supported"
            )));
        }
        Activation::parse(&self.non_linearity)?;
        if !matches!(
            self.init_weights.as_str(),
            "bert" | "mam_adapter" | "houlsby"
        ) {
            return Err(PeftError::Config(format!(
                "init_weights `{}` is unknown (bert, mam_adapter, houlsby)",
                self.init_weights
            )));
        }
        match &self.scaling {
            Scaling::Fixed(s) if !s.is_finite() => {
                return Err(PeftError::Config("`scaling` must be finite".into()))
            }
            Scaling::Learned(s) if s != "learned" && s != "channel" => {
                return Err(PeftError::Config(format!(
                    "scaling `{s}` is unknown (a number, \"learned\", \"channel\")"
                )))
            }
            _ => {}
        }
        if let ResidualBeforeLn::Named(n) = &self.residual_before_ln {
            if n != "post_add" {
                return Err(PeftError::Config(format!(
                    "residual_before_ln `{n}` is unknown (true, false, \"post_add\")"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(PeftError::Config(format!(
                "`dropout` must be in [0, 1), got {}",
                self.dropout
            )));
        }
        match &self.reduction_factor {
            ReductionFactor::One(f) if *f > 0.0 => Ok(()),
            ReductionFactor::PerLayer(m) if m.values().all(|f| *f > 0.0) => Ok(()),
            _ => Err(PeftError::Config(
                "`reduction_factor` must be positive".into(),
            )),
        }
    }

    /// The reduction factor of `layer` (AdapterHub: the layer's entry, else
    /// `default`).
    pub fn reduction_for(&self, layer: usize) -> Result<f64> {
        match &self.reduction_factor {
            ReductionFactor::One(f) => Ok(*f),
            ReductionFactor::PerLayer(m) => m
                .get(&layer.to_string())
                .or_else(|| m.get("default"))
                .copied()
                .ok_or_else(|| {
                    PeftError::Config(format!(
                        "reduction_factor has no entry for layer {layer} and no `default`"
                    ))
                }),
        }
    }
}

/// AdapterHub's `AdapterFusionConfig` (`dynamic` by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusionConfig {
    /// A learned key projection.
    pub key: bool,
    /// A learned query projection.
    pub query: bool,
    /// A learned value projection (no bias).
    pub value: bool,
    /// The query is taken before the model's norm.
    pub query_before_ln: bool,
    /// Regularisation of the value matrix towards identity, a training loss
    /// term: [`AdapterModel::fusion_regularization_loss`](crate::AdapterModel::fusion_regularization_loss)
    /// gives it, for the training loop to add (as AdapterHub's trainer does).
    pub regularization: bool,
    /// The residual is added to the values before attention (not supported).
    pub residual_before: bool,
    /// Temperature annealing (not supported: AdapterHub's is stateful).
    pub temperature: bool,
    /// The value projection applies before the attention sum.
    pub value_before_softmax: bool,
    /// The value projection starts as identity (1e-6 off the diagonal).
    pub value_initialized: Value,
    /// Attention dropout (training only): read and written back; training a
    /// fusion with a non-zero value is refused (not implemented).
    #[serde(default)]
    pub dropout_prob: Option<f64>,
}

impl FusionConfig {
    /// AdapterHub's `dynamic` fusion config (its default).
    pub fn dynamic() -> Self {
        FusionConfig {
            key: true,
            query: true,
            value: true,
            query_before_ln: false,
            regularization: true,
            residual_before: false,
            temperature: false,
            value_before_softmax: true,
            value_initialized: Value::Bool(true),
            dropout_prob: None,
        }
    }

    /// AdapterHub's `static` fusion config (no value projection).
    pub fn static_() -> Self {
        FusionConfig {
            value: false,
            regularization: false,
            value_initialized: Value::Bool(false),
            ..Self::dynamic()
        }
    }

    /// Checks what this crate supports.
    pub fn validate(&self) -> Result<()> {
        if self.residual_before || self.temperature {
            return Err(PeftError::Config(
                "fusion with `residual_before` or `temperature` is not supported".into(),
            ));
        }
        if !(self.query || self.key || self.value) {
            return Err(PeftError::Config(
                "fusion without query, key and value projections is not supported".into(),
            ));
        }
        Ok(())
    }

    /// Whether the value projection starts as identity.
    pub fn value_identity_init(&self) -> bool {
        match &self.value_initialized {
            Value::Bool(b) => *b,
            Value::String(s) => !s.is_empty() && s != "False",
            _ => false,
        }
    }
}

/// Parses a JSON file's text, naming it in errors.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Deserialises `value`, naming `path` in errors.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(value: Value, path: &Path) -> Result<T> {
    serde_json::from_value(value).map_err(|source| PeftError::Json {
        path: path.to_path_buf(),
        source,
    })
}
/// The non-linearity of a bottleneck (AdapterHub's `get_activation` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `swish` / `silu`.
    Silu,
    /// `gelu` (exact, erf).
    Gelu,
    /// `gelu_new` (tanh approximation).
    GeluNew,
    /// `tanh`.
    Tanh,
    /// `sigmoid`.
    Sigmoid,
    /// `leakyrelu` (slope 0.01).
    LeakyRelu,
}

impl Activation {
    /// Parses AdapterHub's `non_linearity` (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_lowercase().as_str() {
            "relu" => Self::Relu,
            "swish" | "silu" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluNew,
            "tanh" => Self::Tanh,
            "sigmoid" => Self::Sigmoid,
            "leakyrelu" => Self::LeakyRelu,
            other => {
                return Err(PeftError::Config(format!(
                    "non_linearity `{other}` is not supported \
                     (relu, swish, silu, gelu, gelu_new, tanh, sigmoid, leakyrelu)"
                )))
            }
        })
    }
}
