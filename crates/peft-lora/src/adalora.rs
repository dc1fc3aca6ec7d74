//! [`AdaLora`]: AdaLoRA as Hugging Face PEFT 0.21 defines it (`peft_type:
//! ADALORA`): its `adapter_config.json` ([`AdaLoraConfig`]), how an entry
//! starts, PEFT's files (a saved `rank_pattern` shrinks each layer to the
//! triplets it keeps, both ways), and the orthogonal regularisation PEFT
//! adds to the training loss ([`orthogonal_regularization`]). The per-layer
//! arithmetic is [`AdaLoraEntry`]'s; the budget schedule that masks
//! triplets during training is [`RankAllocator`](crate::RankAllocator)'s.
//!
//! Files: `base_model.model.<path>.lora_A` `[r, in]`, `.lora_E` `[r, 1]`,
//! `.lora_B` `[out, r]` (no `.weight`: PEFT keeps them in parameter dicts).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use peft_core::config::{LayerIndices, LayersPattern, TargetModules};
use peft_core::io::{take_tensor, HostTensor};
use peft_core::method_config::MethodConfig;
use peft_core::slot::{AdaLoraEntry, AdaLoraMeta};
use peft_core::slot_method::Init;
use peft_core::slot_model::KEY_PREFIX;
use peft_core::{LinearSlot, PeftError, PeftModel, Result, SlotMethod, SlotModel};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// AdaLoRA, as PEFT defines it (`peft_type: ADALORA`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AdaLora;

/// A model carrying named AdaLoRA adapters (see [`SlotModel`]).
pub type AdaLoraModel<B, M> = SlotModel<B, M, AdaLora>;

/// Which of a layer's `init_r` triplets a trained adapter keeps, by the
/// layer's `lora_E` name (`<module path>.lora_E`), as PEFT saves it.
pub type RankPattern = BTreeMap<String, Vec<bool>>;

fn adalora_type() -> String {
    "ADALORA".into()
}
fn default_target_r() -> usize {
    8
}
fn default_init_r() -> usize {
    12
}
fn default_one() -> usize {
    1
}
fn default_beta() -> f64 {
    0.85
}
fn default_orth() -> f64 {
    0.5
}
fn default_alpha() -> f64 {
    8.0
}
fn default_true() -> Value {
    Value::Bool(true)
}
fn default_bias() -> String {
    "none".into()
}

/// PEFT's `AdaLoraConfig`, as it appears in `adapter_config.json` (the
/// LoRA fields AdaLoRA reads, its own, and every other key kept as it was).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraConfig {
    /// Always `"ADALORA"`.
    #[serde(default = "adalora_type")]
    pub peft_type: String,
    /// LoRA's rank, which AdaLoRA does not read (PEFT warns when it is not
    /// its default 8; so do we): `init_r` and `target_r` set the ranks.
    #[serde(default = "default_target_r")]
    pub r: usize,
    /// The average rank the budget ends at.
    #[serde(default = "default_target_r")]
    pub target_r: usize,
    /// Each layer's rank before any triplet is pruned.
    #[serde(default = "default_init_r")]
    pub init_r: usize,
    /// Steps of warm-up before the budget shrinks.
    #[serde(default)]
    pub tinit: usize,
    /// Final steps at the target budget.
    #[serde(default)]
    pub tfinal: usize,
    /// Steps between two allocations.
    #[serde(default = "default_one", rename = "deltaT")]
    pub delta_t: usize,
    /// EMA factor of the sensitivity.
    #[serde(default = "default_beta")]
    pub beta1: f64,
    /// EMA factor of the uncertainty.
    #[serde(default = "default_beta")]
    pub beta2: f64,
    /// Weight of the orthogonal regularisation in the training loss.
    #[serde(default = "default_orth")]
    pub orth_reg_weight: f64,
    /// The run's number of optimizer steps (required to train, as in PEFT).
    #[serde(default)]
    pub total_step: Option<usize>,
    /// The triplets each layer keeps, once the allocator has masked some.
    #[serde(default)]
    pub rank_pattern: Option<RankPattern>,
    /// `α`: the delta is scaled by `α / (init_r + 1e-5)`.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input in training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules get an adapter; `None`: PEFT's defaults.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Layers storing `[in, out]` weights (GPT-2's `Conv1D`; the files'
    /// factors do not depend on it).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Which biases train: only `"none"` here (refused otherwise).
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Layers each adapter keeps a trainable full copy of.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Truthy: `E` zero, `A` and `B` normal(0, 0.02); `false`: standard
    /// normal, as PEFT's `torch.randn`.
    #[serde(default = "default_true")]
    pub init_lora_weights: Value,
    /// Restrict adaptation to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// The name of the layer list in module paths, used with `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// DoRA (refused: PEFT's AdaLoRA refuses it).
    #[serde(default)]
    pub use_dora: bool,
    /// LoftQ (refused: PEFT's AdaLoRA refuses it).
    #[serde(default)]
    pub loftq_config: Option<Value>,
    /// PEFT task type, informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model this adapter was trained on, informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter was saved for inference (PEFT trains one
    /// adapter at a time: at most one may have `false`).
    #[serde(default)]
    pub inference_mode: bool,
    /// Keys this version does not model (PEFT's AdaLoRA ignores the other
    /// LoRA fields too), kept and written back as they were.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty object is a valid AdaLoraConfig")
    }
}

impl AdaLoraConfig {
    /// A config with PEFT's defaults, `init_r` / `target_r`, a run of
    /// `total_step` steps and the given targets.
    pub fn new(init_r: usize, target_r: usize, total_step: usize, targets: &[&str]) -> Self {
        AdaLoraConfig {
            init_r,
            target_r,
            total_step: Some(total_step),
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// The rank a loaded layer at `path` has: the triplets its saved
    /// pattern keeps, else `init_r`.
    fn loaded_rank(&self, path: &str) -> usize {
        self.rank_pattern
            .as_ref()
            .and_then(|p| p.get(&format!("{path}.lora_E")))
            .map_or(self.init_r, |keep| keep.iter().filter(|k| **k).count())
    }

    fn init_weights(&self) -> bool {
        match &self.init_lora_weights {
            Value::Bool(b) => *b,
            Value::Null => false,
            _ => true,
        }
    }
}

impl MethodConfig for AdaLoraConfig {
    const PEFT_TYPE: &'static str = "ADALORA";
    const METHOD: &'static str = "AdaLoRA";
    const NAME: &'static str = "adalora";
    /// `--r` is the target average rank; `--alpha` the scale's numerator.
    const CLI_SETTINGS: &'static [(&'static str, &'static str)] = &[
        ("r", "target_r"),
        ("alpha", "lora_alpha"),
        ("targets", "target_modules"),
    ];

    peft_core::config_fields!();

    /// PEFT's `__post_init__` and `RankAllocator` checks, and typed
    /// refusals of what PEFT's AdaLoRA refuses.
    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(PeftError::Config(format!("AdaLoRA: {what}")));
        if self.use_dora {
            return bad("`use_dora`: ADALORA does not support DoRA.".into());
        }
        if self.loftq_config.as_ref().is_some_and(|c| match c {
            Value::Object(m) => !m.is_empty(),
            Value::Null => false,
            _ => true,
        }) {
            return bad("`loftq_config`: ADALORA does not support LOFTQ.".into());
        }
        if matches!(self.target_modules, Some(TargetModules::Pattern(_)))
            && self.layers_to_transform.is_some()
        {
            return bad(
                "`layers_to_transform` cannot be used when `target_modules` is a str.".into(),
            );
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            );
        }
        // PEFT refuses a missing `total_step` at once; here it matters only
        // to training, which refuses it ([`RankAllocator::new`]; `peft
        // train` fills in the run's step count), so that an adapter saved
        // without one still loads for inference.
        if let Some(total) = self.total_step {
            if total == 0 {
                return bad("`total_step`: AdaLoRA does not work when `total_step` is None, supply a value > 0.".into());
            }
            if self.tinit + self.tfinal >= total {
                return bad("The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or increase `total_step`.".into());
            }
        }
        if self.orth_reg_weight < 0.0 {
            return bad(format!("`orth_reg_weight` should be greater than or equal to 0, but the value passed is {}", self.orth_reg_weight));
        }
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(beta > 0.0 && beta < 1.0) {
                return bad(format!("`{field}` must be in (0, 1), got {beta}"));
            }
        }
        if self.delta_t == 0 {
            return bad("`deltaT` must be at least 1".into());
        }
        if self.target_r > self.init_r {
            return bad(format!(
                "`target_r` ({}) must not exceed `init_r` ({}): the budget only shrinks",
                self.target_r, self.init_r
            ));
        }
        if self.bias != "none" {
            return bad("`bias`: only `\"none\"` is supported".into());
        }
        if self.r != 8 {
            eprintln!("warning: AdaLoRA: `r` ({}) is not used and is ignored, as PEFT ignores it; `init_r` sets the initial rank", self.r);
        }
        Ok(())
    }

    /// PEFT trains one AdaLoRA adapter at a time: "AdaLoraModel supports
    /// only 1 trainable adapter".
    fn check_beside(&self, existing: &Self) -> Result<()> {
        if !self.inference_mode && !existing.inference_mode {
            return Err(PeftError::Config("AdaLoRA supports only 1 trainable adapter. When using multiple adapters, set inference_mode to True for all adapters except the one you want to train.".into()));
        }
        Ok(())
    }
}

impl SlotMethod for AdaLora {
    type Config = AdaLoraConfig;

    /// PEFT's `update_layer` at `init_r` (fresh) or at the rank its saved
    /// pattern keeps (loading, as `resize_modules_by_rank_pattern`); the
    /// scale keeps `ranknum = init_r` either way.
    fn attach<B: Backend>(
        config: &AdaLoraConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        let r = match init {
            Init::Fresh => config.init_r,
            Init::Placeholder => config.loaded_rank(path),
        };
        let (d_in, d_out) = (slot.d_input(), slot.d_output());
        let device = slot.device();
        let normal = |shape: [usize; 2], std: f64| {
            Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, std), &device)
        };
        let (a, e, b) = match (init, config.init_weights()) {
            (Init::Fresh, true) => (
                normal([d_in, r], 0.02),
                Tensor::zeros([1, r], &device),
                normal([r, d_out], 0.02),
            ),
            (Init::Fresh, false) => (
                normal([d_in, r], 1.0),
                normal([1, r], 1.0),
                normal([r, d_out], 1.0),
            ),
            (Init::Placeholder, _) => (
                Tensor::zeros([d_in, r], &device),
                Tensor::zeros([1, r], &device),
                Tensor::zeros([r, d_out], &device),
            ),
        };
        let numerator = if config.lora_alpha > 0.0 {
            config.lora_alpha
        } else {
            r as f64
        };
        let entry = AdaLoraEntry {
            a: Param::from_tensor(a),
            e: Param::from_tensor(e),
            b: Param::from_tensor(b),
            meta: AdaLoraMeta {
                name: name.to_string(),
                scaling: numerator / (config.init_r as f64 + 1e-5),
                dropout: config.lora_dropout,
                merged: false,
            },
        };
        slot.add(entry, path)
    }

    /// PEFT's `resize_state_dict_by_rank_pattern`: a layer still at full
    /// rank keeps only the triplets its pattern keeps.
    fn write_tensors<B: Backend>(
        config: &AdaLoraConfig,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        let Some(e) = slot.entry::<AdaLoraEntry<B>>(name) else {
            return;
        };
        let a = HostTensor::from_tensor(e.a.val()).transposed();
        let ev = HostTensor::from_tensor(e.e.val()).transposed();
        let b = HostTensor::from_tensor(e.b.val());
        let keep: Option<Vec<usize>> = config
            .rank_pattern
            .as_ref()
            .and_then(|p| p.get(&format!("{path}.lora_E")))
            .filter(|keep| keep.len() == e.rank())
            .map(|keep| (0..keep.len()).filter(|&i| keep[i]).collect());
        let (a, ev, b) = match keep {
            Some(rows) => (
                take_rows(&a, &rows),
                take_rows(&ev, &rows),
                take_rows(&b, &rows),
            ),
            None => (a, ev, b),
        };
        let key = format!("{KEY_PREFIX}{path}");
        out.push((format!("{key}.lora_A"), a));
        out.push((format!("{key}.lora_B"), b.transposed()));
        out.push((format!("{key}.lora_E"), ev));
    }

    fn read_tensors<B: Backend>(
        _config: &AdaLoraConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let entry = slot
            .entry_mut::<AdaLoraEntry<B>>(name)
            .expect("injected before filling");
        let device = entry.a.device();
        let [d_in, r] = entry.a.dims();
        let d_out = entry.b.dims()[1];
        let key = format!("{KEY_PREFIX}{path}");
        let mut read = |suffix: &str, shape: [usize; 2]| -> Result<HostTensor> {
            let k = format!("{key}.{suffix}");
            let t = take_tensor(tensors, &k, file)?;
            if t.shape != shape {
                return Err(PeftError::Shape {
                    name: k,
                    expected: shape.to_vec(),
                    found: t.shape,
                });
            }
            Ok(t)
        };
        let a = read("lora_A", [r, d_in])?.transposed();
        let ev = read("lora_E", [r, 1])?.transposed();
        let b = read("lora_B", [d_out, r])?.transposed();
        entry.a = Param::from_tensor(a.to_tensor([d_in, r], &key, &device)?);
        entry.e = Param::from_tensor(ev.to_tensor([1, r], &key, &device)?);
        entry.b = Param::from_tensor(b.to_tensor([r, d_out], &key, &device)?);
        Ok(())
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<AdaLoraEntry<B>>();
    }
}

/// The rows `rows` of a 2-D host tensor.
fn take_rows(t: &HostTensor, rows: &[usize]) -> HostTensor {
    let cols = t.shape[1];
    let mut data = Vec::with_capacity(rows.len() * cols);
    for &r in rows {
        data.extend_from_slice(&t.data[r * cols..(r + 1) * cols]);
    }
    HostTensor {
        shape: vec![rows.len(), cols],
        data,
    }
}

/// PEFT's orthogonal regularisation of adapter `name`'s factors, the term
/// `AdaLoraModel.forward` adds to the loss (times `orth_reg_weight`): the
/// mean over every layer's `A` and `B` of `‖P·Pᵀ − I‖_F` (PEFT's `lora_A
/// @ lora_A.T` and `lora_B.T @ lora_B`, `[r, r]`); `None` without factors.
pub fn orthogonal_regularization<B: Backend, M: PeftModel<B>>(
    model: &M,
    name: &str,
) -> Option<Tensor<B, 1>> {
    let mut terms = Vec::new();
    // A layer pruned to rank 0 counts, with a zero term, as in PEFT.
    let mut n = 0;
    model.visit_linears(&mut |_, slot| {
        let Some(e) = slot.entry::<AdaLoraEntry<B>>(name) else {
            return;
        };
        n += 2;
        let r = e.rank();
        if r == 0 {
            return;
        }
        let eye = Tensor::<B, 2>::eye(r, &e.a.device());
        let a = e.a.val();
        let b = e.b.val();
        for cov in [
            a.clone().transpose().matmul(a),
            b.clone().matmul(b.transpose()),
        ] {
            terms.push((cov - eye.clone()).square().sum().sqrt());
        }
    });
    terms.into_iter().reduce(|x, y| x + y).map(|s| s / n as f64)
}
