//! AdapterHub's prediction heads (`adapters` 1.3's flex heads): a small
//! stack of linear layers on the encoder's output, saved beside an adapter
//! as `head_config.json` + `model_head.safetensors` and paired with it by
//! name. Three kinds, as AdapterHub builds them:
//!
//! - `classification` / `multilabel_classification`: on the first token's
//!   hidden state (or the model's pooled output with `use_pooler`), logits
//!   `[b, num_labels]` (cross-entropy, one label: MSE; multi-label: BCE);
//! - `tagging`: on every token, logits `[b, t, num_labels]`.
//!
//! The layers are AdapterHub's `nn.Sequential`: per layer a dropout, a
//! linear, and (hidden layers, with an activation) the activation; the
//! saved keys are `heads.<name>.<index in that sequence>.weight`, so the
//! index depends on whether there is an activation.
//!
//! Other head types (question answering, multiple choice, language
//! modelling, ...) are refused by name. BERT's static heads
//! (`BertForSequenceClassification` / `BertForTokenClassification`, saved
//! by an AdapterHub model with a transformers head) load converted, as
//! AdapterHub's `convert_to_flex_head` does.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Dropout, Initializer, Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::config::warn_unknown_keys;
use peft_core::io::{linear_from_torch, HostTensor};
use peft_core::loss::cross_entropy;
use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::config::Activation;

/// A head's config (AdapterHub's `head_config.json`).
pub const HEAD_CONFIG_FILE: &str = "head_config.json";
/// A head's weights (`save_adapter(..., use_safetensors=True)`).
pub const HEAD_WEIGHTS_FILE: &str = "model_head.safetensors";
/// The most outputs a head may have (see [`HeadConfig::validate`]).
pub const MAX_LABELS: usize = 1 << 20;
/// The pickle AdapterHub writes without `use_safetensors`.
pub const HEAD_PICKLE_FILE: &str = "pytorch_model_head.bin";

/// What a head predicts (AdapterHub's `head_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeadType {
    /// One label per sequence (one output: a regression).
    #[serde(rename = "classification")]
    Classification,
    /// Independent labels per sequence.
    #[serde(rename = "multilabel_classification")]
    MultiLabelClassification,
    /// One label per token.
    #[serde(rename = "tagging")]
    Tagging,
}

impl HeadType {
    /// AdapterHub's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Classification => "classification",
            Self::MultiLabelClassification => "multilabel_classification",
            Self::Tagging => "tagging",
        }
    }

    fn parse(name: &str) -> Result<Self> {
        [
            Self::Classification,
            Self::MultiLabelClassification,
            Self::Tagging,
        ]
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| {
            PeftError::Config(format!(
                "head_type `{name}` is not supported (classification, \
                 multilabel_classification, tagging)"
            ))
        })
    }
}

/// A head's config: the `config` object of `head_config.json`, with
/// AdapterHub's keys and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// What the head predicts.
    pub head_type: HeadType,
    /// Outputs per sequence, or per token for tagging.
    pub num_labels: usize,
    /// Linear layers: `layers − 1` hidden `[d, d]` ones, then `[d, num_labels]`.
    pub layers: usize,
    /// After each hidden layer; `None` (or empty): none.
    pub activation_function: Option<String>,
    /// Label names to output indices.
    pub label2id: Option<BTreeMap<String, usize>>,
    /// Classification kinds: read the model's pooled output (BERT's
    /// pooler) instead of the first token's hidden state. Absent for tagging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_pooler: Option<bool>,
    /// Classification kinds: a bias on the last layer. Absent for tagging
    /// (which always has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<bool>,
    /// Dropout before each layer while training. `None` is AdapterHub's
    /// "the model's classifier or hidden dropout"; this project's backbones
    /// run without dropout, so `None` means none here either.
    pub dropout_prob: Option<f64>,
    /// Keys this version does not model, kept and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl HeadConfig {
    /// `add_classification_head`'s defaults: 2 layers, tanh, the first token.
    pub fn classification(num_labels: usize) -> Self {
        Self::sequence(HeadType::Classification, num_labels)
    }

    /// `add_classification_head(..., multilabel=True)`'s defaults.
    pub fn multi_label(num_labels: usize) -> Self {
        Self::sequence(HeadType::MultiLabelClassification, num_labels)
    }

    /// `add_tagging_head`'s defaults: 1 layer, on every token.
    pub fn tagging(num_labels: usize) -> Self {
        HeadConfig {
            head_type: HeadType::Tagging,
            num_labels,
            layers: 1,
            activation_function: Some("tanh".into()),
            label2id: Some(default_labels(num_labels)),
            use_pooler: None,
            bias: None,
            dropout_prob: None,
            extra: Map::new(),
        }
    }

    fn sequence(head_type: HeadType, num_labels: usize) -> Self {
        HeadConfig {
            head_type,
            num_labels,
            layers: 2,
            activation_function: Some("tanh".into()),
            label2id: Some(default_labels(num_labels)),
            use_pooler: Some(false),
            bias: Some(true),
            dropout_prob: None,
            extra: Map::new(),
        }
    }

    /// Names the outputs (`label2id`), in output order.
    pub fn with_labels(mut self, names: &[String]) -> Result<Self> {
        self.label2id = Some(names.iter().cloned().zip(0..).collect());
        self.validate()?;
        Ok(self)
    }

    /// The label names in output order (`LABEL_i` where none are saved).
    pub fn labels(&self) -> Vec<String> {
        match &self.label2id {
            Some(map) => {
                let mut names: Vec<(usize, String)> =
                    map.iter().map(|(n, &i)| (i, n.clone())).collect();
                names.sort();
                names.into_iter().map(|(_, n)| n).collect()
            }
            // In output order (a map's order would put LABEL_10 before LABEL_2).
            None => (0..self.num_labels).map(|i| format!("LABEL_{i}")).collect(),
        }
    }

    /// Whether the head reads the model's pooled output.
    pub fn reads_pooler(&self) -> bool {
        self.use_pooler == Some(true)
    }

    /// Checks every field; errors name the field and value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PeftError::Config(m));
        // A bound, so that no file sizes an allocation (label names,
        // checks) by what it claims: far beyond any classification head.
        if self.num_labels == 0 || self.num_labels > MAX_LABELS {
            return bad(format!(
                "head `num_labels` must be in 1..={MAX_LABELS}, got {}",
                self.num_labels
            ));
        }
        if self.layers == 0 {
            return bad("head `layers` must be at least 1".into());
        }
        self.activation()?;
        if let Some(p) = self.dropout_prob {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("head `dropout_prob` must be in [0, 1), got {p}"));
            }
        }
        if self.head_type == HeadType::Tagging && (self.use_pooler.is_some() || self.bias.is_some())
        {
            return bad("a tagging head has no `use_pooler` or `bias`".into());
        }
        if let Some(map) = &self.label2id {
            let mut ids: Vec<usize> = map.values().copied().collect();
            ids.sort_unstable();
            if ids.len() != self.num_labels || ids.iter().enumerate().any(|(i, &id)| i != id) {
                return bad(format!(
                    "head `label2id` {map:?} must give each of the {} outputs one name",
                    self.num_labels
                ));
            }
        }
        Ok(())
    }

    fn activation(&self) -> Result<Option<Activation>> {
        match self.activation_function.as_deref() {
            None | Some("") => Ok(None),
            Some(name) => Activation::parse(name).map(Some).map_err(|_| {
                PeftError::Config(format!(
                    "head `activation_function` `{name}` is not supported \
                     (relu, swish, silu, gelu, gelu_new, tanh, sigmoid, leakyrelu)"
                ))
            }),
        }
    }

    /// Parses `head_config.json`'s `config`; unknown keys warn (naming
    /// `origin`), unknown head types and bad values are errors.
    pub fn from_json(value: Value, origin: &Path) -> Result<Self> {
        let head_type = value
            .get("head_type")
            .and_then(Value::as_str)
            .ok_or_else(|| PeftError::Checkpoint {
                path: origin.to_path_buf(),
                message: "the head config has no `head_type`".into(),
            })?;
        HeadType::parse(head_type)?;
        let config: HeadConfig =
            serde_json::from_value(value).map_err(|source| PeftError::Json {
                path: origin.to_path_buf(),
                source,
            })?;
        warn_unknown_keys(&config.extra, &[], origin);
        config.validate()?;
        Ok(config)
    }
}

/// AdapterHub's default names, `LABEL_0`, `LABEL_1`, ...
fn default_labels(n: usize) -> BTreeMap<String, usize> {
    (0..n).map(|i| (format!("LABEL_{i}"), i)).collect()
}

/// A head's logits.
#[derive(Debug, Clone)]
pub enum HeadLogits<B: Backend> {
    /// `[b, num_labels]` (classification kinds).
    PerSequence(Tensor<B, 2>),
    /// `[b, t, num_labels]` (tagging).
    PerToken(Tensor<B, 3>),
}

/// The labels of a head's loss, as AdapterHub's heads take `labels`.
#[derive(Debug, Clone)]
pub enum HeadTargets<B: Backend> {
    /// A class per sequence `[b]` (classification, two labels or more):
    /// cross-entropy.
    Classes(Tensor<B, 1, Int>),
    /// A value per sequence `[b]` (classification with one label, a
    /// regression): mean squared error.
    Values(Tensor<B, 1>),
    /// 0 or 1 per label `[b, labels]` (multi-label): binary cross-entropy
    /// on the logits.
    MultiHot(Tensor<B, 2>),
    /// A class per token `[b, t]` (tagging): cross-entropy over the tokens
    /// the attention mask keeps.
    Tags(Tensor<B, 2, Int>),
}

impl<B: Backend> HeadLogits<B> {
    /// AdapterHub's loss of these logits against `targets` (the attention
    /// mask `[b, t]` selects the tokens a tagging loss counts).
    pub fn loss(
        self,
        targets: HeadTargets<B>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 1>> {
        match (self, targets) {
            (HeadLogits::PerSequence(x), HeadTargets::Classes(y)) if x.dims()[1] > 1 => {
                Ok(cross_entropy(x, y))
            }
            (HeadLogits::PerSequence(x), HeadTargets::Values(y)) if x.dims()[1] == 1 => {
                let n = x.dims()[0];
                Ok((x.reshape([n]) - y).powi_scalar(2).mean())
            }
            (HeadLogits::PerSequence(x), HeadTargets::MultiHot(y)) => {
                // log(1 + e^x) − x·y, stably: max(x, 0) − x·y + log(1 + e^−|x|).
                let soft = relu(x.clone()) + (x.clone().abs().neg().exp() + 1.0).log();
                Ok((soft - x * y).mean())
            }
            (HeadLogits::PerToken(x), HeadTargets::Tags(y)) => {
                let [b, t, _] = x.dims();
                let picked = log_softmax(x, 2)
                    .gather(2, y.reshape([b, t, 1]))
                    .reshape([b, t])
                    .neg();
                let keep = attention_mask.unwrap_or_else(|| picked.ones_like());
                Ok((picked * keep.clone()).sum() / keep.sum().clamp_min(1.0))
            }
            (logits, targets) => Err(PeftError::Config(format!(
                "{} logits take {} labels, not {}",
                match &logits {
                    HeadLogits::PerSequence(x) if x.dims()[1] == 1 => "one-output sequence",
                    HeadLogits::PerSequence(_) => "sequence",
                    HeadLogits::PerToken(_) => "per-token",
                },
                match &logits {
                    HeadLogits::PerSequence(x) if x.dims()[1] == 1 => "value (regression)",
                    HeadLogits::PerSequence(_) => "class or multi-hot",
                    HeadLogits::PerToken(_) => "per-token class",
                },
                match targets {
                    HeadTargets::Classes(_) => "class",
                    HeadTargets::Values(_) => "value",
                    HeadTargets::MultiHot(_) => "multi-hot",
                    HeadTargets::Tags(_) => "per-token class",
                }
            ))),
        }
    }
}

/// A prediction head: AdapterHub's layer stack.
#[derive(Module, Debug)]
pub struct PredictionHead<B: Backend> {
    /// The hidden layers, each `[d, d]` with a bias, followed by the activation.
    pub hidden: Vec<Linear<B>>,
    /// The output layer `[d, num_labels]`.
    pub output: Linear<B>,
    /// After each hidden layer.
    #[module(skip)]
    activation: Option<Activation>,
    /// Before each layer while training.
    #[module(skip)]
    dropout: f64,
    /// What the head reads.
    #[module(skip)]
    head_type: HeadType,
    /// Reads the pooled output.
    #[module(skip)]
    pooled: bool,
}

impl<B: Backend> PredictionHead<B> {
    /// A fresh head for width `d`, initialised as AdapterHub does (the
    /// model's `_init_weights`: normal weights with std 0.02, zero biases).
    pub fn new(config: &HeadConfig, d: usize, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let layer = |d_out: usize, bias: bool| {
            let mut lin = LinearConfig::new(d, d_out)
                .with_bias(bias)
                .with_initializer(init.clone())
                .init::<B>(device);
            lin.bias = lin.bias.map(|b| Param::from_tensor(b.val().zeros_like()));
            lin
        };
        Ok(PredictionHead {
            hidden: (1..config.layers).map(|_| layer(d, true)).collect(),
            output: layer(config.num_labels, config.bias != Some(false)),
            activation: config.activation()?,
            dropout: config.dropout_prob.unwrap_or(0.0),
            head_type: config.head_type,
            pooled: config.reads_pooler(),
        })
    }

    /// Whether [`forward`](Self::forward) needs the pooled output.
    pub fn reads_pooler(&self) -> bool {
        self.pooled
    }

    /// The logits for the encoder's `hidden: [b, t, d]` and, for a head
    /// that reads it, the model's `pooled: [b, d]` output.
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        pooled: Option<Tensor<B, 2>>,
    ) -> Result<HeadLogits<B>> {
        if self.head_type == HeadType::Tagging {
            return Ok(HeadLogits::PerToken(self.layers(hidden)));
        }
        let x =
            match (self.pooled, pooled) {
                (false, _) => {
                    let [b, _, d] = hidden.dims();
                    hidden.slice([0..b, 0..1, 0..d]).reshape([b, d])
                }
                (true, Some(p)) => p,
                (true, None) => return Err(PeftError::Config(
                    "this head reads the pooled output (`use_pooler`) and the model has no pooler"
                        .into(),
                )),
            };
        Ok(HeadLogits::PerSequence(self.layers(x)))
    }

    fn layers<const D: usize>(&self, mut x: Tensor<B, D>) -> Tensor<B, D> {
        let dropout = Dropout { prob: self.dropout };
        for lin in &self.hidden {
            x = lin.forward(dropout.forward(x));
            if let Some(a) = self.activation {
                x = a.apply(x);
            }
        }
        self.output.forward(dropout.forward(x))
    }

    fn positions(&self) -> Vec<usize> {
        (0..=self.hidden.len())
            .map(|l| layer_position(l, self.activation.is_some()))
            .collect()
    }

    /// The tensors under AdapterHub's keys (`heads.<name>.<i>.weight`
    /// `[out, in]`, PyTorch's layout).
    pub fn tensors(&self, name: &str) -> Vec<(String, HostTensor)> {
        let mut out = Vec::new();
        for (lin, i) in self.linears().into_iter().zip(self.positions()) {
            let key = format!("heads.{name}.{i}");
            out.push((
                format!("{key}.weight"),
                HostTensor::from_tensor(lin.weight.val()).transposed(),
            ));
            if let Some(b) = &lin.bias {
                out.push((format!("{key}.bias"), HostTensor::from_tensor(b.val())));
            }
        }
        out
    }

    fn linears(&self) -> Vec<&Linear<B>> {
        self.hidden.iter().chain([&self.output]).collect()
    }

    /// The head `config` describes for width `d`, its layers taken out of
    /// `tensors` (`heads.<saved>.<i>.*`, PyTorch's `[out, in]`). Every
    /// layer's tensors are checked against the config before anything is
    /// allocated, so a file that claims a million layers or labels is an
    /// error naming the first key that does not fit, not an allocation.
    pub fn from_tensors(
        config: &HeadConfig,
        d: usize,
        saved: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let activation = config.activation()?;
        let mut layers = Vec::new();
        for l in 0..config.layers {
            let last = l + 1 == config.layers;
            let d_out = if last { config.num_labels } else { d };
            let bias = !last || config.bias != Some(false);
            let key = format!("heads.{saved}.{}", layer_position(l, activation.is_some()));
            layers.push(linear_from_torch(
                tensors,
                &key,
                [d, d_out],
                bias,
                file,
                device,
            )?);
        }
        let output = layers.pop().expect("validate: at least one layer");
        Ok(PredictionHead {
            hidden: layers,
            output,
            activation,
            dropout: config.dropout_prob.unwrap_or(0.0),
            head_type: config.head_type,
            pooled: config.reads_pooler(),
        })
    }
}

/// The position of linear layer `l` in AdapterHub's `nn.Sequential`
/// (dropout, linear and, with one, the activation per hidden layer;
/// dropout, linear last): the index in its keys.
fn layer_position(l: usize, activation: bool) -> usize {
    l * if activation { 3 } else { 2 } + 1
}

/// What `head_config.json` says: the head's config and the name it was
/// saved under, a static transformers head converted as AdapterHub's
/// `convert_to_flex_head` does (with the key renames that go with it).
pub struct SavedHead {
    /// The flex-head config.
    pub config: HeadConfig,
    /// The name in the weight keys.
    pub name: String,
    /// Static heads: `(prefix in the file, position)`, e.g. `("classifier", 1)`.
    pub renames: Vec<(String, usize)>,
}

impl SavedHead {
    /// Reads `head_config.json` (`meta`, from `origin`).
    pub fn from_meta(meta: &Value, origin: &Path) -> Result<Self> {
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        match meta.get("config") {
            Some(c) if !c.is_null() => Ok(SavedHead {
                config: HeadConfig::from_json(c.clone(), origin)?,
                name,
                renames: Vec::new(),
            }),
            _ => Self::from_static(meta, origin),
        }
    }

    /// A static head (`config: null`): BERT's sequence / token
    /// classification heads become one-layer flex heads.
    fn from_static(meta: &Value, origin: &Path) -> Result<Self> {
        let class = meta
            .get("model_class")
            .and_then(Value::as_str)
            .unwrap_or("");
        let label2id: Option<BTreeMap<String, usize>> = meta
            .get("label2id")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok());
        let num_labels = meta
            .get("num_labels")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .or_else(|| label2id.as_ref().map(BTreeMap::len))
            .unwrap_or(2);
        let head_type = match class {
            "BertForSequenceClassification" => HeadType::Classification,
            "BertForTokenClassification" => HeadType::Tagging,
            other => {
                return Err(PeftError::Checkpoint {
                    path: origin.to_path_buf(),
                    message: format!(
                        "a static head of `{other}` is not supported (flex heads, or \
                         BertForSequenceClassification / BertForTokenClassification)"
                    ),
                })
            }
        };
        let tagging = head_type == HeadType::Tagging;
        let config = HeadConfig {
            head_type,
            num_labels,
            layers: 1,
            activation_function: None,
            label2id: label2id.filter(|m| m.len() == num_labels),
            use_pooler: (!tagging).then_some(true),
            bias: (!tagging).then_some(true),
            dropout_prob: None,
            extra: Map::new(),
        };
        config.validate()?;
        Ok(SavedHead {
            config,
            name: "default".into(),
            renames: vec![("classifier".into(), 1)],
        })
    }

    /// Renames a static head's keys to the flex keys of `name`.
    pub fn rename(&self, tensors: HashMap<String, HostTensor>) -> HashMap<String, HostTensor> {
        if self.renames.is_empty() {
            return tensors;
        }
        tensors
            .into_iter()
            .map(|(k, t)| {
                let renamed = self.renames.iter().find_map(|(prefix, i)| {
                    k.strip_prefix(&format!("{prefix}."))
                        .map(|rest| format!("heads.{}.{i}.{rest}", self.name))
                });
                (renamed.unwrap_or(k), t)
            })
            .collect()
    }
}

/// The config of the head saved in `dir` (`None` without `head_config.json`).
pub fn read_head_config(dir: &Path) -> Result<Option<HeadConfig>> {
    let path = dir.join(HEAD_CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let meta = crate::config::read_json(&path)?;
    Ok(Some(SavedHead::from_meta(&meta, &path)?.config))
}

/// `head_config.json` as AdapterHub writes it for a flex head.
pub fn head_meta(config: &HeadConfig, name: &str, d: usize, model_type: Option<&str>) -> Value {
    json!({
        "config": config,
        "hidden_size": d,
        "model_class": model_type.map(adapter_model_class),
        "model_name": "",
        "model_type": model_type,
        "name": name,
        "version": "adapters.1.3.0",
    })
}

/// AdapterHub's flex-head model class of a model type (`BertAdapterModel`).
fn adapter_model_class(model_type: &str) -> String {
    let known = [("bert", "Bert"), ("gpt2", "GPT2"), ("llama", "Llama")];
    let stem = known
        .iter()
        .find(|(t, _)| *t == model_type)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| model_type.to_string());
    format!("{stem}AdapterModel")
}
