//! [`Oft`]: OFT as Hugging Face PEFT 0.21 defines it (`peft_type: OFT`):
//! its `adapter_config.json` ([`OftConfig`]), each layer's block layout and
//! how an entry starts. The rotation itself is [`OftEntry`]'s; reading a
//! config, default targets and target rules are [`MethodConfig`]'s;
//! everything that spans the model's adapters is [`SlotModel`]'s.
//!
//! Files: `base_model.model.<path>.oft_R.weight`, `[k, b(b−1)/2]` as here
//! (not a weight matrix: no transpose).

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use peft_core::config::{LayerIndices, LayersPattern, TargetModules};
use peft_core::io::{take_tensor, HostTensor};
use peft_core::method_config::{refuse_conv1d, MethodConfig};
use peft_core::slot::{OftEntry, OftMeta};
use peft_core::slot_method::Init;
use peft_core::slot_model::KEY_PREFIX;
use peft_core::{LinearSlot, PeftError, Result, SlotMethod, SlotModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// OFT, as PEFT defines it (`peft_type: OFT`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Oft;

/// A model carrying named OFT adapters (see [`SlotModel`]: activation,
/// merging, mixed batches, PEFT's files).
pub type OftModel<B, M> = SlotModel<B, M, Oft>;

fn oft_type() -> String {
    "OFT".into()
}
fn default_block_size() -> usize {
    32
}
fn default_eps() -> f64 {
    6e-5
}
fn default_true() -> bool {
    true
}
fn default_terms() -> usize {
    5
}
fn default_bias() -> String {
    "none".into()
}

/// PEFT's `OFTConfig`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OftConfig {
    /// Always `"OFT"`.
    #[serde(default = "oft_type")]
    pub peft_type: String,
    /// Number of blocks per layer; `0` when `oft_block_size` sets it (one of
    /// the two is zero).
    #[serde(default)]
    pub r: usize,
    /// Block size `b`; `0` when `r` sets it.
    #[serde(default = "default_block_size")]
    pub oft_block_size: usize,
    /// PEFT 0.21 builds a multiplicative dropout from it, but its linear
    /// layer's forward pass never applies it: neither do we.
    #[serde(default)]
    pub module_dropout: f64,
    /// Which modules get an adapter; `None`: PEFT's defaults for the model
    /// type (LoRA's table).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Layers storing `[in, out]` weights (GPT-2's `Conv1D`, refused as PEFT
    /// refuses it); PEFT resets it to `false` on `nn.Linear`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases train: only `"none"` here (refused otherwise).
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// `true`: generators start at zero (the identity rotation); `false`:
    /// normal with standard deviation 0.1.
    #[serde(default = "default_true")]
    pub init_weights: bool,
    /// Restrict adaptation to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list in module paths, used with `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Layers each adapter keeps a trainable full copy of (PEFT's
    /// `modules_to_save`: a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Constrained OFT (refused: PEFT projects the parameter in place during
    /// the forward pass, which a Burn module cannot do).
    #[serde(default)]
    pub coft: bool,
    /// COFT's radius (used only with `coft`).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// One generator shared by every block of a layer.
    #[serde(default)]
    pub block_share: bool,
    /// The Cayley transform as PEFT's Neumann series; `false`: exact (as
    /// PEFT's matrix solve).
    #[serde(default = "default_true")]
    pub use_cayley_neumann: bool,
    /// Terms of the Neumann series.
    #[serde(default = "default_terms")]
    pub num_cayley_neumann_terms: usize,
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

impl Default for OftConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid OftConfig")
    }
}

impl OftConfig {
    /// A config with block size `oft_block_size` and the given target names.
    pub fn new(oft_block_size: usize, targets: &[&str]) -> Self {
        OftConfig {
            oft_block_size,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// `(blocks, block size)` for a layer with `d_in` inputs, as PEFT's
    /// `update_layer`: the given one of `r` / `oft_block_size`, moved to the
    /// nearest divisor of `d_in` when it is not one (PEFT warns; so do we).
    pub fn layout(&self, d_in: usize, path: &str) -> (usize, usize) {
        let given = if self.r == 0 {
            self.oft_block_size
        } else {
            self.r
        };
        let adjusted = adjust_to_divisor(d_in, given);
        if adjusted != given {
            let field = if self.r == 0 { "oft_block_size" } else { "r" };
            eprintln!("warning: {path}: invalid `{field}` ({given}) for {d_in} inputs; adjusted to {adjusted}, as PEFT does");
        }
        if self.r == 0 {
            (d_in / adjusted, adjusted)
        } else {
            (adjusted, d_in / adjusted)
        }
    }
}

/// PEFT's `adjust_oft_parameters`: the divisor of `d_in` nearest `value`
/// (the lower one on a tie; `d_in` itself when `value` exceeds it).
fn adjust_to_divisor(d_in: usize, value: usize) -> usize {
    if value >= d_in {
        return d_in;
    }
    if d_in.is_multiple_of(value) {
        return value;
    }
    let mut higher = value;
    while higher <= d_in && !d_in.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = value;
    while lower > 1 && !d_in.is_multiple_of(lower) {
        lower -= 1;
    }
    if value - lower <= higher - value {
        lower
    } else {
        higher
    }
}

impl MethodConfig for OftConfig {
    const PEFT_TYPE: &'static str = "OFT";
    const METHOD: &'static str = "OFT";
    const NAME: &'static str = "oft";
    /// `--r` is OFT's number of blocks per layer.
    const CLI_SETTINGS: &'static [(&'static str, &'static str)] =
        &[("r", "r"), ("targets", "target_modules")];

    peft_core::config_fields!();

    /// PEFT's `__post_init__`, and typed refusals of what this version does
    /// not do.
    /// `--r` gives the number of blocks, so the block size follows from
    /// each layer (PEFT takes one of the two).
    fn adjust_cli(given: &[&str], config: &mut Value) {
        if given.contains(&"r") {
            config["oft_block_size"] = 0.into();
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(PeftError::Config(format!("OFT: {what}")));
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            );
        }
        if self.r == 0 && self.oft_block_size == 0 {
            return bad(format!("Either `r` or `oft_block_size` must be non-zero. Currently, r = {} and oft_block_size = {}.", self.r, self.oft_block_size));
        }
        if self.r != 0 && self.oft_block_size != 0 {
            return bad(format!("You can only specify either r ({}) or oft_block_size ({}), but not both simultaneously, because r x oft_block_size == in_features.", self.r, self.oft_block_size));
        }
        if !(0.0..1.0).contains(&self.module_dropout) {
            return bad(format!(
                "`module_dropout` must be in [0, 1), got {}",
                self.module_dropout
            ));
        }
        let refused = [
            ("coft", self.coft, "constrained OFT is not supported yet"),
            ("bias", self.bias != "none", "only `\"none\"` is supported"),
        ];
        if let Some((field, _, why)) = refused.iter().find(|r| r.1) {
            return bad(format!("`{field}`: {why}"));
        }
        Ok(())
    }

    fn check_model_type(model_type: Option<&str>) -> Result<()> {
        refuse_conv1d(Self::METHOD, model_type)
    }
}

impl SlotMethod for Oft {
    type Config = OftConfig;

    /// PEFT's `update_layer` and `reset_oft_parameters`: zeros (the identity
    /// rotation) with `init_weights`, normal(0, 0.1) without; placeholders
    /// are zeros.
    fn attach<B: Backend>(
        config: &OftConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        let (blocks, block_size) = config.layout(slot.d_input(), path);
        let rows = if config.block_share { 1 } else { blocks };
        let shape = [rows, block_size * (block_size - 1) / 2];
        let device = slot.device();
        let weight = match (init, config.init_weights) {
            (Init::Fresh, false) => Tensor::random(shape, Distribution::Normal(0.0, 0.1), &device),
            _ => Tensor::zeros(shape, &device),
        };
        let entry = OftEntry {
            weight: Param::from_tensor(weight),
            meta: OftMeta {
                name: name.to_string(),
                block_size,
                blocks,
                block_share: config.block_share,
                cayley_neumann: config.use_cayley_neumann,
                neumann_terms: config.num_cayley_neumann_terms,
                merged: false,
                merge_inverse: None,
            },
        };
        slot.add(entry, path)
    }

    fn write_tensors<B: Backend>(
        _config: &OftConfig,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        if let Some(e) = slot.entry::<OftEntry<B>>(name) {
            out.push((
                format!("{KEY_PREFIX}{path}.oft_R.weight"),
                HostTensor::from_tensor(e.weight.val()),
            ));
        }
    }

    fn read_tensors<B: Backend>(
        _config: &OftConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let entry = slot
            .entry_mut::<OftEntry<B>>(name)
            .expect("injected before filling");
        let key = format!("{KEY_PREFIX}{path}.oft_R.weight");
        let want = entry.weight.shape().dims::<2>();
        let t = take_tensor(tensors, &key, file)?;
        if t.shape != want {
            return Err(PeftError::Shape {
                name: key,
                expected: want.to_vec(),
                found: t.shape,
            });
        }
        let device = entry.weight.device();
        entry.weight = Param::from_tensor(t.to_tensor(want, &key, &device)?);
        Ok(())
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<OftEntry<B>>();
    }
}
