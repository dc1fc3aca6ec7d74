//! VeRA (Kopiczko et al., 2024) as Hugging Face PEFT 0.21 defines it
//! (`peft_type: VERA`), whole: the per-layer entry ([`VeraEntry`]), the
//! config ([`VeraConfig`]) and the method ([`Vera`]). Everything that spans
//! a model's adapters is [`SlotModel`]'s.
//!
//! Each adapter draws one pair of frozen random projections, sized by the
//! largest layer it targets, from `torch.Generator().manual_seed(
//! projection_prng_key)` exactly as PEFT draws them; every layer uses the
//! leading slices of the pair and trains two vectors:
//!
//! ```text
//! y = x·W + b + ((dropout(x)·A) ⊙ λd)·B ⊙ λb
//!     A = vera_A[:, :d_in]ᵀ  [d_in, r],   B = vera_B[:d_out, :]ᵀ  [r, d_out]
//! ```
//!
//! Files: `base_model.model.<path>.vera_lambda_b` `[out]`, `.vera_lambda_d`
//! `[r]`, and once per adapter `base_model.vera_A` `[r, max in]` and
//! `base_model.vera_B` `[max out, r]` (with `save_projection`, PEFT's
//! default; without it a load draws them again from the key).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{LayerIndices, LayersPattern, TargetModules};
use crate::error::{PeftError, Result};
use crate::io::{take_tensor, HostTensor, KEY_PREFIX};
use crate::method_config::MethodConfig;
use crate::rng::TorchGenerator;

use super::adapter::{BaseParts, BasePass, LowRankRows, SlotAdapter};
use super::method::{Init, SlotMethod};
use super::LinearSlot;

/// Everything about a VeRA entry that is not a tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct VeraMeta {
    /// The adapter's name.
    pub name: String,
    /// Rank `r` of the projections.
    pub rank: usize,
    /// Dropout probability on the input of `A` (training only).
    pub dropout: f64,
    /// Whether `ΔW` is currently folded into the base weight.
    pub merged: bool,
}

/// One named VeRA adapter on one linear layer.
#[derive(Module, Debug)]
pub struct VeraEntry<B: Backend> {
    /// The adapter's `vera_A[:, :d_in]`, transposed: `[d_in, r]`. A
    /// constant, never trained (not a parameter).
    pub a: Tensor<B, 2>,
    /// The adapter's `vera_B[:d_out, :]`, transposed: `[r, d_out]`. A
    /// constant.
    pub b: Tensor<B, 2>,
    /// `vera_lambda_d`, scaling the rank-`r` intermediate: `[r]`.
    pub lambda_d: Param<Tensor<B, 1>>,
    /// `vera_lambda_b`, scaling the output: `[d_out]`.
    pub lambda_b: Param<Tensor<B, 1>>,
    /// Name, rank, dropout and merge state.
    #[module(skip)]
    pub meta: VeraMeta,
}

impl<B: Backend> VeraEntry<B> {
    /// `A ⊙ λd` `[d_in, r]` and `B ⊙ λb` `[r, d_out]`: the layer's delta as
    /// a low-rank pair.
    fn scaled_pair(&self) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (
            self.a.clone() * self.lambda_d.val().unsqueeze_dim(0),
            self.b.clone() * self.lambda_b.val().unsqueeze_dim(0),
        )
    }

    /// `ΔW = (A ⊙ λd)·(B ⊙ λb)`, shape `[d_in, d_out]` (PEFT's
    /// `get_delta_weight`, transposed).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        let (a, b) = self.scaled_pair();
        a.matmul(b)
    }
}

impl<B: Backend> SlotAdapter<B> for VeraEntry<B> {
    fn name(&self) -> &str {
        &self.meta.name
    }

    fn merged(&self) -> bool {
        self.meta.merged
    }

    fn set_merged(&mut self, merged: bool) {
        self.meta.merged = merged;
    }

    fn check_fits(&self, d_in: usize, d_out: usize, path: &str) -> Result<()> {
        let r = self.meta.rank;
        let shapes = [
            ("vera_A", self.a.dims().to_vec(), vec![d_in, r]),
            ("vera_B", self.b.dims().to_vec(), vec![r, d_out]),
            ("vera_lambda_d", self.lambda_d.dims().to_vec(), vec![r]),
            ("vera_lambda_b", self.lambda_b.dims().to_vec(), vec![d_out]),
        ];
        match shapes.into_iter().find(|(_, found, want)| found != want) {
            Some((key, found, expected)) => Err(PeftError::Shape {
                name: format!("{path}.{key}"),
                expected,
                found,
            }),
            None => Ok(()),
        }
    }

    /// PEFT's order: `λb ⊙ ((λd ⊙ (dropout(x)·A))·B)`.
    fn add_to_output(
        &self,
        y: Tensor<B, 2>,
        x: &Tensor<B, 2>,
        _pass: &BasePass<B>,
    ) -> Tensor<B, 2> {
        let xd = Dropout {
            prob: self.meta.dropout,
        }
        .forward(x.clone());
        let h = xd.matmul(self.a.clone()) * self.lambda_d.val().unsqueeze_dim(0);
        y + h.matmul(self.b.clone()) * self.lambda_b.val().unsqueeze_dim(0)
    }

    fn low_rank_rows(&self, _weight: &Tensor<B, 2>) -> Option<LowRankRows<B>> {
        let (a, b) = self.scaled_pair();
        Some(LowRankRows {
            a,
            b,
            scale: 1.0,
            column_factor: None,
        })
    }

    fn merge_into(&mut self, base: &mut BaseParts<B>) {
        base.weight = base.weight.clone() + self.delta_weight().detach();
    }

    fn unmerge_from(&mut self, base: &mut BaseParts<B>) {
        base.weight = base.weight.clone() - self.delta_weight().detach();
    }
}

/// VeRA, as PEFT defines it (`peft_type: VERA`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Vera;

/// One adapter's frozen projections, in PEFT's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct VeraProjection {
    /// `vera_A`, `[r, largest d_in]`.
    pub a: Arc<HostTensor>,
    /// `vera_B`, `[largest d_out, r]`.
    pub b: Arc<HostTensor>,
}

impl VeraProjection {
    /// PEFT's `_init_vera_A_vera_B`: Kaiming-uniform `vera_A` then
    /// `vera_B` from one generator seeded with `key` (bound
    /// `√3·√2/√fan_in`, `fan_in` the second dimension).
    pub fn draw(key: i64, r: usize, d_in: usize, d_out: usize) -> Self {
        let mut generator = TorchGenerator::manual_seed(key);
        let mut kaiming = |shape: [usize; 2]| {
            let bound = 3f64.sqrt() * (2f64.sqrt() / (shape[1] as f64).sqrt());
            let data = generator.uniform_f32(shape[0] * shape[1], -bound, bound);
            Arc::new(HostTensor {
                shape: shape.to_vec(),
                data,
            })
        };
        let a = kaiming([r, d_in]);
        let b = kaiming([d_out, r]);
        VeraProjection { a, b }
    }

    /// The leading `d_in` columns of `vera_A`, transposed `[d_in, r]`, and
    /// the leading `d_out` rows of `vera_B`, transposed `[r, d_out]`.
    fn slices<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let r = self.a.shape[0];
        let a = HostTensor {
            shape: vec![r, d_in],
            data: self
                .a
                .data
                .chunks(self.a.shape[1])
                .flat_map(|row| &row[..d_in])
                .copied()
                .collect(),
        }
        .transposed();
        let b = HostTensor {
            shape: vec![d_out, r],
            data: self.b.data[..d_out * r].to_vec(),
        }
        .transposed();
        (
            Tensor::from_data(TensorData::new(a.data, [d_in, r]), device),
            Tensor::from_data(TensorData::new(b.data, [r, d_out]), device),
        )
    }
}

fn vera_type() -> String {
    "VERA".into()
}
fn default_r() -> usize {
    256
}
fn default_true() -> bool {
    true
}
fn default_d_initial() -> f64 {
    0.1
}
fn default_bias() -> String {
    "none".into()
}

/// PEFT's `VeraConfig`, as it appears in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VeraConfig {
    /// Always `"VERA"`.
    #[serde(default = "vera_type")]
    pub peft_type: String,
    /// Rank of the shared projections.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Which modules get an adapter; `None`: PEFT's defaults for the model
    /// type (LoRA's table).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Seed of the generator that draws the projections.
    #[serde(default)]
    pub projection_prng_key: i64,
    /// Whether the projections are saved in the adapter file (PEFT's
    /// default) or drawn again from the key on load.
    #[serde(default = "default_true")]
    pub save_projection: bool,
    /// Dropout probability on the input of `A`.
    #[serde(default)]
    pub vera_dropout: f64,
    /// The value `vera_lambda_d` starts at.
    #[serde(default = "default_d_initial")]
    pub d_initial: f64,
    /// Whether the base weight is stored `[in, out]` (GPT-2's `Conv1D`).
    /// PEFT sets it from the layer's type; so does the file boundary here.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases train: only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Layers each adapter keeps a trainable full copy of (PEFT's
    /// `modules_to_save`: a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: `λb = 0`, `λd = d_initial` (a fresh adapter is the
    /// identity); `false`: `λb = 1`, `λd` standard normal.
    #[serde(default = "default_true")]
    pub init_weights: bool,
    /// Restrict adaptation to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list in module paths, used with `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// PEFT task type (`CAUSAL_LM`, `SEQ_CLS`, ...).
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
    /// The adapter's projections once drawn for a model (or read from its
    /// file); not part of `adapter_config.json`.
    #[serde(skip)]
    pub projection: Option<VeraProjection>,
}

impl Default for VeraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid VeraConfig")
    }
}

impl VeraConfig {
    /// A config with rank `r` and the given target names.
    pub fn new(r: usize, targets: &[&str]) -> Self {
        VeraConfig {
            r,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    fn projection(&self) -> Result<&VeraProjection> {
        self.projection.as_ref().ok_or_else(|| {
            PeftError::State("VeRA: the projections are drawn when the adapter is attached".into())
        })
    }
}

impl MethodConfig for VeraConfig {
    const PEFT_TYPE: &'static str = "VERA";
    const METHOD: &'static str = "VeRA";
    const NAME: &'static str = "vera";
    const CLI_SETTINGS: &'static [(&'static str, &'static str)] =
        &[("r", "r"), ("targets", "target_modules")];

    crate::config_fields!(with [layers_to_transform, layers_pattern]);

    /// PEFT's `VeraModel._check_new_adapter_config`: every VeRA adapter of
    /// a model shares one `projection_prng_key` and one `save_projection`.
    fn check_beside(&self, existing: &Self) -> Result<()> {
        if self.projection_prng_key != existing.projection_prng_key {
            return Err(PeftError::Config(format!(
                "VeRA's projection_prng_key must be the same for all adapters of a model: got {}, but an adapter already there has {}",
                self.projection_prng_key, existing.projection_prng_key
            )));
        }
        if self.save_projection != existing.save_projection {
            return Err(PeftError::Config(format!(
                "VeRA's save_projection must be the same for all adapters of a model: got {}, but an adapter already there has {}",
                self.save_projection, existing.save_projection
            )));
        }
        Ok(())
    }

    /// PEFT's `__post_init__` and `update_layer` checks, and what is not
    /// supported here.
    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(PeftError::Config(format!("VeRA: {what}")));
        if self.r == 0 {
            return bad("`r` should be a positive integer value but the value passed is 0".into());
        }
        if !(0.0..1.0).contains(&self.vera_dropout) {
            return bad(format!(
                "`vera_dropout` must be in [0, 1), got {}",
                self.vera_dropout
            ));
        }
        if !self.d_initial.is_finite() {
            return bad(format!(
                "`d_initial` must be finite, got {}",
                self.d_initial
            ));
        }
        if self.bias != "none" {
            return bad(format!(
                "`bias`: only \"none\" is supported, got {:?}",
                self.bias
            ));
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            );
        }
        Ok(())
    }
}

impl SlotMethod for Vera {
    type Config = VeraConfig;

    /// PEFT's `_find_dim` and `_init_vera_A_vera_B`: the largest `d_in` and
    /// `d_out` over the targeted layers (each taken apart), then the pair
    /// drawn from the key.
    fn prepare_shared(config: &mut VeraConfig, layers: &[(usize, usize)]) -> Result<()> {
        let d_in = layers.iter().map(|l| l.0).max().unwrap_or(0);
        let d_out = layers.iter().map(|l| l.1).max().unwrap_or(0);
        config.projection = Some(VeraProjection::draw(
            config.projection_prng_key,
            config.r,
            d_in,
            d_out,
        ));
        Ok(())
    }

    /// PEFT's `update_layer` and `reset_vera_parameters`; placeholders are
    /// zeros.
    fn attach<B: Backend>(
        config: &VeraConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        let device = slot.device();
        let (d_in, d_out, r) = (slot.d_input(), slot.d_output(), config.r);
        let (a, b) = config.projection()?.slices(d_in, d_out, &device);
        let (lambda_d, lambda_b) = match (init, config.init_weights) {
            (Init::Placeholder, _) => {
                (Tensor::zeros([r], &device), Tensor::zeros([d_out], &device))
            }
            (Init::Fresh, true) => (
                Tensor::full([r], config.d_initial, &device),
                Tensor::zeros([d_out], &device),
            ),
            (Init::Fresh, false) => (
                Tensor::random([r], Distribution::Normal(0.0, 1.0), &device),
                Tensor::ones([d_out], &device),
            ),
        };
        let entry = VeraEntry {
            a,
            b,
            lambda_d: Param::from_tensor(lambda_d),
            lambda_b: Param::from_tensor(lambda_b),
            meta: VeraMeta {
                name: name.to_string(),
                rank: r,
                dropout: config.vera_dropout,
                merged: false,
            },
        };
        slot.add(entry, path)
    }

    fn write_tensors<B: Backend>(
        _config: &VeraConfig,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        if let Some(e) = slot.entry::<VeraEntry<B>>(name) {
            for (key, t) in [
                ("vera_lambda_b", &e.lambda_b),
                ("vera_lambda_d", &e.lambda_d),
            ] {
                out.push((
                    format!("{KEY_PREFIX}{path}.{key}"),
                    HostTensor::from_tensor(t.val()),
                ));
            }
        }
    }

    /// The vectors from the file; the layer's slices of the projections the
    /// file held (or the key drew).
    fn read_tensors<B: Backend>(
        config: &VeraConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let (d_in, d_out) = (slot.d_input(), slot.d_output());
        let device = slot.device();
        let (a, b) = config.projection()?.slices(d_in, d_out, &device);
        let entry = slot
            .entry_mut::<VeraEntry<B>>(name)
            .expect("injected before filling");
        let mut vector = |key: &str, len: usize| -> Result<Tensor<B, 1>> {
            let key = format!("{KEY_PREFIX}{path}.{key}");
            take_tensor(tensors, &key, file)?.to_tensor([len], &key, &device)
        };
        entry.lambda_b = Param::from_tensor(vector("vera_lambda_b", d_out)?);
        entry.lambda_d = Param::from_tensor(vector("vera_lambda_d", config.r)?);
        (entry.a, entry.b) = (a, b);
        Ok(())
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<VeraEntry<B>>();
    }

    fn write_shared(config: &VeraConfig, out: &mut Vec<(String, HostTensor)>) {
        if let (true, Some(p)) = (config.save_projection, &config.projection) {
            out.push(("base_model.vera_A".into(), (*p.a).clone()));
            out.push(("base_model.vera_B".into(), (*p.b).clone()));
        }
    }

    /// With `save_projection` the file must hold the projections, of the
    /// shapes the key drew (PEFT: "Specified to load vera_A and vera_B from
    /// state dictionary however they were not present!"). Without it PEFT
    /// ignores them if present, and so does this.
    fn read_shared(
        config: &mut VeraConfig,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let drawn = config.projection()?.clone();
        let mut take = |key: &str, want: &[usize]| -> Result<Option<Arc<HostTensor>>> {
            let Some(t) = tensors.remove(key) else {
                return Ok(None);
            };
            if t.shape != want {
                return Err(PeftError::Shape {
                    name: key.to_string(),
                    expected: want.to_vec(),
                    found: t.shape,
                });
            }
            Ok(Some(Arc::new(t)))
        };
        let a = take("base_model.vera_A", &drawn.a.shape)?;
        let b = take("base_model.vera_B", &drawn.b.shape)?;
        match (config.save_projection, a, b) {
            (true, Some(a), Some(b)) => config.projection = Some(VeraProjection { a, b }),
            (true, _, _) => {
                return Err(PeftError::MissingTensor {
                    path: file.to_path_buf(),
                    key: "base_model.vera_A / base_model.vera_B (save_projection is true)".into(),
                })
            }
            (false, _, _) => {}
        }
        Ok(())
    }
}
