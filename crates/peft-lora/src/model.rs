//! [`LoraModel`]: a model with named LoRA adapters.

use std::marker::PhantomData;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use indexmap::IndexMap;
use peft_core::config::InitLoraWeights;
use peft_core::io::HostTensor;
use peft_core::slot::column_norm;
use peft_core::target::{is_target, rank_and_alpha};
use peft_core::{
    linear_adapters, LinearSlot, LoraConfig, LoraEntry, LoraMeta, ParamCount, PeftError, PeftModel,
    Result, BASE_ROW,
};

/// A model carrying named LoRA adapters.
///
/// The wrapped model stays a plain Burn module (`model`): train it with any
/// Burn optimizer; only adapter parameters receive gradients.
#[derive(Debug, Clone)]
pub struct LoraModel<B: Backend, M: PeftModel<B>> {
    /// The model, its slots carrying the adapters.
    pub model: M,
    configs: IndexMap<String, LoraConfig>,
    active: Vec<String>,
    disabled: bool,
    _backend: PhantomData<B>,
}

/// How a new entry's parameters start.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Init<'a> {
    /// By the config's `init_lora_weights`.
    Config(&'a InitLoraWeights),
    /// Zeros, to be overwritten from a file or by arithmetic.
    Zeros,
}

fn uniform<B: Backend>(shape: [usize; 2], bound: f64, device: &B::Device) -> Tensor<B, 2> {
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

/// A new entry for `slot`, initialised as PEFT initialises it.
fn new_entry<B: Backend>(
    slot: &LinearSlot<B>,
    meta: LoraMeta,
    use_dora: bool,
    init: Init<'_>,
) -> LoraEntry<B> {
    let device = slot.device();
    let (d_in, d_out, r) = (slot.d_input(), slot.d_output(), meta.rank);
    // PyTorch's kaiming_uniform_(a=√5) on `[r, d_in]` is U(±1/√d_in).
    let (a, b) = match init {
        Init::Zeros => (
            Tensor::zeros([d_in, r], &device),
            Tensor::zeros([r, d_out], &device),
        ),
        Init::Config(InitLoraWeights::Named(n)) if n == "gaussian" => (
            Tensor::random(
                [d_in, r],
                Distribution::Normal(0.0, 1.0 / r as f64),
                &device,
            ),
            Tensor::zeros([r, d_out], &device),
        ),
        // `false`: both factors keep nn.Linear's default init (B ≠ 0).
        Init::Config(InitLoraWeights::Bool(false)) => (
            uniform([d_in, r], 1.0 / (d_in as f64).sqrt(), &device),
            uniform([r, d_out], 1.0 / (r as f64).sqrt(), &device),
        ),
        Init::Config(_) => (
            uniform([d_in, r], 1.0 / (d_in as f64).sqrt(), &device),
            Tensor::zeros([r, d_out], &device),
        ),
    };
    let magnitude = use_dora.then(|| {
        let delta = a.clone().matmul(b.clone()) * meta.scaling;
        Param::from_tensor(column_norm(slot.base_weight() + delta).detach())
    });
    LoraEntry {
        a: Param::from_tensor(a),
        b: Param::from_tensor(b),
        magnitude,
        meta,
    }
}

/// A LoftQ entry for `slot` (rank `meta.rank`, `iterations` rounds): the
/// slot's dense base weight becomes NF4 and the factors start at the
/// low-rank part of what quantization lost (see [`crate::loftq`]).
fn loftq_entry<B: Backend>(
    slot: &mut LinearSlot<B>,
    meta: LoraMeta,
    use_dora: bool,
    iterations: usize,
    path: &str,
) -> Result<LoraEntry<B>> {
    if slot.is_quantized() {
        return Err(PeftError::Config(format!(
            "{path}: LoftQ quantizes the f32 base weight itself; this one is already quantized"
        )));
    }
    if slot.any_merged() {
        return Err(PeftError::State(format!(
            "{path}: unmerge its adapters before a LoftQ init"
        )));
    }
    let device = slot.device();
    let (d_in, d_out, r) = (slot.d_input(), slot.d_output(), meta.rank);
    let w = HostTensor::from_tensor(slot.base_weight()).transposed(); // [out, in]
    let q = crate::loftq::loftq(&w.data, d_out, d_in, r, iterations)
        .map_err(|e| PeftError::Config(format!("{path}: {e}")))?;
    let root = meta.scaling.sqrt();
    let a: Vec<f32> = (0..d_in * r)
        .map(|k| (q.r[(k % r, k / r)] / root) as f32)
        .collect();
    let b: Vec<f32> = (0..r * d_out)
        .map(|k| (q.l[(k % d_out, k / d_out)] / root) as f32)
        .collect();
    slot.set_quantized_base(std::sync::Arc::new(q.base))?;
    let a = Tensor::<B, 2>::from_data(TensorData::new(a, [d_in, r]), &device);
    let b = Tensor::<B, 2>::from_data(TensorData::new(b, [r, d_out]), &device);
    let magnitude = use_dora.then(|| {
        let delta = a.clone().matmul(b.clone()) * meta.scaling;
        Param::from_tensor(column_norm(slot.base_weight() + delta).detach())
    });
    Ok(LoraEntry {
        a: Param::from_tensor(a),
        b: Param::from_tensor(b),
        magnitude,
        meta,
    })
}

impl<B: Backend, M: PeftModel<B>> LoraModel<B, M> {
    /// Wraps `model` and attaches `config` as the adapter `default`.
    pub fn new(model: M, config: LoraConfig) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.add_adapter(peft_core::DEFAULT_ADAPTER, config)?;
        Ok(this)
    }

    /// Wraps `model` with no adapter. Every parameter of the model is frozen.
    pub fn wrap(model: M) -> Self {
        LoraModel {
            model: model.no_grad(),
            configs: IndexMap::new(),
            active: Vec::new(),
            disabled: false,
            _backend: PhantomData,
        }
    }

    /// The same adapters (configs, activation) around another model that
    /// carries them, e.g. the inference copy of a trained model
    /// (`AutodiffModule::valid`), to save it.
    pub fn with_model<B2: Backend, M2: PeftModel<B2>>(&self, model: M2) -> LoraModel<B2, M2> {
        LoraModel {
            model,
            configs: self.configs.clone(),
            active: self.active.clone(),
            disabled: self.disabled,
            _backend: PhantomData,
        }
    }

    /// Adds adapter `name` per `config` (freshly initialised) and makes it the
    /// only active adapter, as PEFT's `add_adapter` + `set_adapter` would.
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig) -> Result<()> {
        self.inject(name, config, None)?;
        self.set_adapter(&[name])
    }

    /// Attaches entries for `name` on every slot `config` targets.
    /// Returns the adapted paths.
    pub(crate) fn inject(
        &mut self,
        name: &str,
        config: LoraConfig,
        zeros: Option<()>,
    ) -> Result<Vec<String>> {
        config.validate()?;
        if self.configs.contains_key(name) {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        if name == BASE_ROW {
            return Err(PeftError::Config(format!("`{BASE_ROW}` is reserved")));
        }
        let outputs = self.model.output_layers();
        let mut plan = Vec::new();
        let mut paths = Vec::new();
        self.model
            .visit_linears(&mut |path, _| paths.push(path.to_string()));
        for path in &paths {
            if is_target(&config, path, &outputs)? {
                let (r, alpha) = rank_and_alpha(&config, path)?;
                plan.push((path.clone(), r, alpha));
            }
        }
        if plan.is_empty() {
            return Err(PeftError::NoTargetMatched {
                targets: serde_json::to_string(&config.target_modules)
                    .unwrap_or_else(|_| "?".into()),
                available: paths,
            });
        }
        let init = match zeros {
            Some(()) => Init::Zeros,
            None => Init::Config(&config.init_lora_weights),
        };
        // LoftQ replaces base weights: only for a fresh adapter, not for
        // one whose factors a file or arithmetic will fill.
        let loftq = match init {
            Init::Config(_) => config.loftq()?.map(|(_, iterations)| iterations),
            Init::Zeros => None,
        };
        let mut result = Ok(());
        let mut i = 0;
        self.model.visit_linears_mut(&mut |path, slot| {
            if result.is_err() || i >= plan.len() || plan[i].0 != path {
                return;
            }
            let (_, r, alpha) = plan[i];
            i += 1;
            let meta = LoraMeta {
                name: name.to_string(),
                rank: r,
                alpha,
                scaling: config.scaling_for(r, alpha),
                dropout: config.lora_dropout,
                merged: false,
                dora_merge_norm: None,
            };
            let entry = match loftq {
                Some(iterations) => loftq_entry(slot, meta, config.use_dora, iterations, path),
                None => Ok(new_entry(slot, meta, config.use_dora, init)),
            };
            result = entry.and_then(|e| slot.add_lora(e, path));
        });
        result?;
        let adapted = plan.into_iter().map(|(p, _, _)| p).collect();
        self.configs.insert(name.to_string(), config);
        Ok(adapted)
    }

    /// Names of all adapters, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.keys().cloned().collect()
    }

    /// The config of adapter `name`.
    pub fn config(&self, name: &str) -> Result<&LoraConfig> {
        self.configs.get(name).ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> PeftError {
        PeftError::UnknownAdapter {
            name: name.to_string(),
            available: self.adapter_names(),
        }
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Activates `names` (one or several; their deltas add up). Only active
    /// adapters train.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.config(n)?;
        }
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        linear_adapters::set_active(&mut self.model, &names);
        self.active = names;
        Ok(())
    }

    /// Removes adapter `name` everywhere (unmerging it first if merged).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.config(name)?;
        linear_adapters::remove(&mut self.model, name);
        self.configs.shift_remove(name);
        self.active.retain(|n| n != name);
        Ok(())
    }

    /// Bypasses every unmerged adapter: the model computes its base output.
    /// Fails while adapters are merged (unmerge first).
    pub fn disable_adapters(&mut self) -> Result<()> {
        linear_adapters::set_disabled(&mut self.model, true)?;
        self.disabled = true;
        Ok(())
    }

    /// Undoes [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) {
        linear_adapters::set_disabled(&mut self.model, false).expect("enabling never fails");
        self.disabled = false;
    }

    /// Whether adapters are disabled.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Folds the active adapters into the base weights. Afterwards the
    /// forward pass is exactly the base computation on the merged weights.
    pub fn merge_adapter(&mut self) -> Result<()> {
        let names = self.active.clone();
        self.merge(&names)
    }

    /// Folds the named adapters into the base weights.
    pub fn merge(&mut self, names: &[String]) -> Result<()> {
        for n in names {
            self.config(n)?;
        }
        linear_adapters::merge(&mut self.model, names);
        Ok(())
    }

    /// Takes every merged adapter back out of the base weights (in reverse
    /// merge order, so that several merged adapters restore exactly).
    pub fn unmerge_adapter(&mut self) {
        let names: Vec<String> = self.configs.keys().rev().cloned().collect();
        linear_adapters::unmerge(&mut self.model, &names);
    }

    /// Merges the active adapters and removes all adapters: the plain model,
    /// with `W' = W + ΔW`.
    pub fn merge_and_unload(mut self) -> Result<M> {
        self.merge_adapter()?;
        self.strip_adapters();
        Ok(self.model)
    }

    /// Removes all adapters without merging: the base model.
    pub fn unload(mut self) -> M {
        self.unmerge_adapter();
        self.strip_adapters();
        self.model
    }

    /// Removes every LoRA entry and its routing state from every slot.
    fn strip_adapters(&mut self) {
        self.model.visit_linears_mut(&mut |_, slot| {
            slot.lora.clear();
            slot.state = Default::default();
        });
    }

    /// Trainable and total parameters (PEFT's `get_nb_trainable_parameters`).
    pub fn param_count(&self) -> ParamCount {
        self.model.param_count()
    }

    /// Mixed-batch inference: runs `f` (the model's forward pass on a batch of
    /// `batch_size` rows) with row `i` routed through adapter `names[i]`
    /// (`__base__` for none). Merged adapters are not allowed, as in PEFT.
    pub fn forward_mixed<R>(
        &self,
        names: &[&str],
        batch_size: usize,
        f: impl FnOnce(&M) -> R,
    ) -> Result<R> {
        let known = |n: &str| self.config(n).map(|_| ());
        linear_adapters::route_rows(&self.model, names, batch_size, known, f)
    }
}
