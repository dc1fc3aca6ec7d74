//! [`Boft`]: BOFT as Hugging Face PEFT 0.21 defines it (`peft_type: BOFT`):
//! its `adapter_config.json` ([`BoftConfig`]), each layer's block layout and
//! butterfly permutations (PEFT's `update_layer`, with its errors), and how
//! an entry starts. The rotation itself is [`BoftEntry`]'s.
//!
//! Files: `base_model.model.<path>.boft_R` (`[N, D, H, H]`) and
//! `.boft_s` (`[d_out, 1]`), as here (no transpose).
//!
//! Butterfly factors: PEFT computes `boft_n_butterfly_factor` factors only
//! with its CUDA extension; without it (any CPU, or a GPU where the
//! extension does not build) it warns and uses one factor, so its file then
//! holds `boft_R` `[1, D, H, H]` whatever the config says. A fresh adapter
//! here has the config's factors (PEFT's definition, its CUDA path); a file
//! with one factor where the config names more loads as the one factor it
//! was trained with.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use peft_core::config::{LayerIndices, LayersPattern, TargetModules};
use peft_core::io::{take_tensor, HostTensor};
use peft_core::method_config::{refuse_conv1d, MethodConfig};
use peft_core::slot::{butterfly_permutation, BoftEntry, BoftMeta};
use peft_core::slot_method::Init;
use peft_core::slot_model::KEY_PREFIX;
use peft_core::{LinearSlot, PeftError, Result, SlotMethod, SlotModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// BOFT, as PEFT defines it (`peft_type: BOFT`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Boft;

/// A model carrying named BOFT adapters (see [`SlotModel`]: activation,
/// merging, mixed batches, PEFT's files).
pub type BoftModel<B, M> = SlotModel<B, M, Boft>;

fn boft_type() -> String {
    "BOFT".into()
}
fn default_block_size() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_bias() -> String {
    "none".into()
}

/// PEFT's `BOFTConfig`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoftConfig {
    /// Always `"BOFT"`.
    #[serde(default = "boft_type")]
    pub peft_type: String,
    /// Block size `H`; `0` when `boft_block_num` sets it (exactly one of the
    /// two is non-zero).
    #[serde(default = "default_block_size")]
    pub boft_block_size: usize,
    /// Number of blocks `D` per layer; `0` when `boft_block_size` sets it.
    #[serde(default)]
    pub boft_block_num: usize,
    /// Number of butterfly factors `N` (1: OFT's single block-diagonal
    /// rotation, with BOFT's exact Cayley transform and output scale).
    #[serde(default = "default_one")]
    pub boft_n_butterfly_factor: usize,
    /// Which modules get an adapter; `None`: PEFT's defaults for the model
    /// type (LoRA's table).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// In training, the share of one random factor's blocks set to the
    /// identity (PEFT's multiplicative dropout); in `[0, 1]`.
    #[serde(default)]
    pub boft_dropout: f64,
    /// Layers storing `[in, out]` weights (GPT-2's `Conv1D`, refused as PEFT
    /// refuses it).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases train: only `"none"` here (refused otherwise).
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Layers each adapter keeps a trainable full copy of (PEFT's
    /// `modules_to_save`: a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: generators start at zero and `boft_s` at one (the identity);
    /// `false`: normal(0, 0.1) and normal(1, 0.1).
    #[serde(default = "default_true")]
    pub init_weights: bool,
    /// Restrict adaptation to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list in module paths, used with `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
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

impl Default for BoftConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid BoftConfig")
    }
}

/// One layer's BOFT layout: blocks `D`, block size `H`, and each factor's
/// permutation.
#[derive(Debug, Clone, PartialEq)]
pub struct BoftLayout {
    /// Blocks per factor.
    pub blocks: usize,
    /// Block size.
    pub block_size: usize,
    /// One permutation per factor (`None`: the identity).
    pub perms: Vec<Option<Vec<usize>>>,
}

impl BoftConfig {
    /// A config with block size `boft_block_size`, `factors` butterfly
    /// factors and the given target names.
    pub fn new(boft_block_size: usize, factors: usize, targets: &[&str]) -> Self {
        BoftConfig {
            boft_block_size,
            boft_n_butterfly_factor: factors,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// PEFT's `update_layer` for a layer with `d_in` inputs and `factors`
    /// butterfly factors: the block count and size, the checks (PEFT's
    /// messages, naming the layer) and the permutations.
    pub fn layout(&self, d_in: usize, factors: usize, path: &str) -> Result<BoftLayout> {
        let bad = |what: String| Err(PeftError::Config(format!("BOFT: {path}: {what}")));
        if factors == 0 {
            return bad(
                "You can only specify boft_n_butterfly_factor 0 to be a positive integer number."
                    .into(),
            );
        }
        // PEFT's `boft_n_butterfly_factor - 1`, "the paper's notation".
        let extra = factors - 1;
        let (mut num, mut size) = (self.boft_block_num, self.boft_block_size);
        if size == 0 && num != 0 {
            if !d_in.is_multiple_of(num) {
                return bad(format!(
                    "in_features ({d_in}) must be divisible by boft_block_num ({num})!"
                ));
            }
            if extra != 0 {
                if extra > num.ilog2() as usize {
                    return bad(format!("Invalid combination of boft_n_butterfly_factor ({factors}) and boft_block_num ({num})!"));
                }
                if !num.is_multiple_of(1 << extra) {
                    return bad(format!("boft_block_num ({num}) must be a multiple of 2 raised to the power of boft_n_butterfly_factor ({factors})!"));
                }
            }
            size = d_in / num;
        } else if size != 0 && num == 0 {
            if !d_in.is_multiple_of(size) {
                return bad(format!(
                    "in_features ({d_in}) must be divisible by boft_block_size ({size})!"
                ));
            }
            if extra != 0 && (d_in < size << extra || !d_in.is_multiple_of(size << extra)) {
                return bad(format!("Invalid combination of in_features ({d_in}), boft_n_butterfly_factor ({factors}) and boft_block_size ({size})!"));
            }
            num = d_in / size;
        } else {
            return bad(
                "exactly one of boft_block_size and boft_block_num must be non-zero".into(),
            );
        }
        if extra != 0 {
            if num % 2 != 0 {
                return bad(format!("boft_block_num ({num}) must be an even number!"));
            }
            if size % 2 != 0 {
                return bad(format!("boft_block_size ({size}) must be an even number!"));
            }
        }
        let perms = (0..factors)
            .map(|i| butterfly_permutation(d_in, num >> i, size / 2, extra != 0))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| match e {
                PeftError::Config(why) => PeftError::Config(format!("{path}: {why}")),
                e => e,
            })?;
        Ok(BoftLayout {
            blocks: num,
            block_size: size,
            perms,
        })
    }
}

impl MethodConfig for BoftConfig {
    const PEFT_TYPE: &'static str = "BOFT";
    const METHOD: &'static str = "BOFT";
    const NAME: &'static str = "boft";
    /// `--r` is BOFT's number of blocks per layer (`boft_block_num`).
    const CLI_SETTINGS: &'static [(&'static str, &'static str)] =
        &[("r", "boft_block_num"), ("targets", "target_modules")];

    peft_core::config_fields!();

    /// `--r` gives the number of blocks, so the block size follows from
    /// each layer (PEFT takes one of the two).
    fn adjust_cli(given: &[&str], config: &mut Value) {
        if given.contains(&"r") {
            config["boft_block_size"] = 0.into();
        }
    }

    /// PEFT's `__post_init__`, and typed refusals of what this version does
    /// not do.
    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(PeftError::Config(format!("BOFT: {what}")));
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            );
        }
        let (size, num) = (self.boft_block_size, self.boft_block_num);
        if size == 0 && num == 0 {
            return bad(format!("Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, boft_block_size = {size} and boft_block_num = {num}."));
        }
        if size != 0 && num != 0 {
            return bad(format!("You can only specify either boft_block_size ({size}) or boft_block_num ({num}), but not both simultaneously, because boft_block_size x boft_block_num == in_features."));
        }
        if self.boft_n_butterfly_factor == 0 {
            return bad(
                "You can only specify boft_n_butterfly_factor 0 to be a positive integer number."
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.boft_dropout) {
            return bad(format!(
                "`boft_dropout` must be in [0, 1], got {}",
                self.boft_dropout
            ));
        }
        if self.bias != "none" {
            return bad("`bias`: only `\"none\"` is supported".into());
        }
        Ok(())
    }

    fn check_model_type(model_type: Option<&str>) -> Result<()> {
        refuse_conv1d(Self::METHOD, model_type)
    }
}

impl SlotMethod for Boft {
    type Config = BoftConfig;

    /// PEFT's `update_layer` and `reset_boft_parameters`: zeros and ones
    /// (the identity) with `init_weights`, normal(0, 0.1) and normal(1, 0.1)
    /// without; placeholders are the identity.
    fn attach<B: Backend>(
        config: &BoftConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        let factors = config.boft_n_butterfly_factor;
        let layout = config.layout(slot.d_input(), factors, path)?;
        let (d, h) = (layout.blocks, layout.block_size);
        let device = slot.device();
        let shape_r = [factors, d, h, h];
        let shape_s = [slot.d_output(), 1];
        let (rotation, scale) = match (init, config.init_weights) {
            (Init::Fresh, false) => (
                Tensor::random(shape_r, Distribution::Normal(0.0, 0.1), &device),
                Tensor::random(shape_s, Distribution::Normal(1.0, 0.1), &device),
            ),
            _ => (
                Tensor::zeros(shape_r, &device),
                Tensor::ones(shape_s, &device),
            ),
        };
        let entry = BoftEntry {
            rotation: Param::from_tensor(rotation),
            scale: Param::from_tensor(scale),
            meta: BoftMeta {
                name: name.to_string(),
                blocks: d,
                block_size: h,
                perms: layout.perms,
                dropout: config.boft_dropout,
                merged: false,
            },
        };
        slot.add(entry, path)
    }

    fn write_tensors<B: Backend>(
        _config: &BoftConfig,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        if let Some(e) = slot.entry::<BoftEntry<B>>(name) {
            out.push((
                format!("{KEY_PREFIX}{path}.boft_R"),
                HostTensor::from_tensor(e.rotation.val()),
            ));
            out.push((
                format!("{KEY_PREFIX}{path}.boft_s"),
                HostTensor::from_tensor(e.scale.val()),
            ));
        }
    }

    /// A file with one factor where the config names more is PEFT's
    /// without its CUDA extension: it loads as that one factor.
    fn read_tensors<B: Backend>(
        _config: &BoftConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let entry = slot
            .entry_mut::<BoftEntry<B>>(name)
            .expect("injected before filling");
        let device = entry.rotation.device();
        let key = format!("{KEY_PREFIX}{path}.boft_R");
        let want = entry.rotation.shape().dims::<4>();
        let t = take_tensor(tensors, &key, file)?;
        let one_factor = [1, want[1], want[2], want[3]];
        let shape = match t.shape.as_slice() {
            s if s == want => want,
            s if s == one_factor => {
                entry.meta.perms.truncate(1);
                entry.meta.perms[0] = None;
                one_factor
            }
            _ => {
                return Err(PeftError::Shape {
                    name: key,
                    expected: want.to_vec(),
                    found: t.shape,
                })
            }
        };
        entry.rotation = Param::from_tensor(t.to_tensor(shape, &key, &device)?);
        let key = format!("{KEY_PREFIX}{path}.boft_s");
        let want = entry.scale.shape().dims::<2>();
        let t = take_tensor(tensors, &key, file)?;
        if t.shape != want {
            return Err(PeftError::Shape {
                name: key,
                expected: want.to_vec(),
                found: t.shape,
            });
        }
        entry.scale = Param::from_tensor(t.to_tensor(want, &key, &device)?);
        Ok(())
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<BoftEntry<B>>();
    }
}
