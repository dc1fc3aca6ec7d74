//! [`AdapterModel`]: a frozen model with named bottleneck adapters and
//! fusions, run through the model's residual joins
//! ([`ModelInput::hook`](peft_core::ModelInput::hook)) with an active [`Setup`].

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::generate::{CausalLm, Sampler};
use peft_core::io::{
    ensure_consumed, linear_from_torch, read_safetensors, serialize_safetensors, take_tensor,
    write_atomic, HostTensor,
};
use peft_core::model::{device_of, InsertionPoint};
use peft_core::named::NamedModules;
use peft_core::{
    AdapterHost, ModelDims, ModelInput, ParamCount, PeftError, PeftModel, Result, Tokens,
};
use serde_json::{json, Value};

use crate::bottleneck::{
    Bottleneck, BottleneckAdapter, Composer, Fusion, FusionLayer, Lookup, Setup,
};
use crate::config::{from_json, read_json, BnConfig, FusionConfig};
use crate::head::{HeadConfig, PredictionHead};

mod heads;

/// AdapterHub's file names.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// Adapter weights (AdapterHub's `save_adapter(..., use_safetensors=True)`).
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter.safetensors";
/// Fusion config.
pub const FUSION_CONFIG_FILE: &str = "adapter_fusion_config.json";
/// Fusion weights.
pub const FUSION_WEIGHTS_FILE: &str = "model_adapter_fusion.safetensors";
const POINTS: [InsertionPoint; 2] = [
    InsertionPoint::AfterAttention,
    InsertionPoint::AfterFeedForward,
];

/// Every adapter and fusion of an [`AdapterModel`]: the Burn module an
/// optimizer steps (`set = optim.step(lr, set, grads)`).
#[derive(Module, Debug)]
pub struct AdapterSet<B: Backend> {
    /// Adapters by name, with their configs, in the order added.
    pub adapters: NamedModules<B, BottleneckAdapter<B>, BnConfig>,
    /// Fusions by AdapterHub's name (`a,b`), with their configs, in the
    /// order added.
    pub fusions: NamedModules<B, Fusion<B>, FusionConfig>,
    /// Prediction heads by name (paired with the adapter of that name),
    /// with their configs, in the order added.
    pub heads: NamedModules<B, PredictionHead<B>, HeadConfig>,
}

impl<B: Backend> Lookup<B> for AdapterSet<B> {
    fn adapter(&self, name: &str) -> Option<&BottleneckAdapter<B>> {
        self.adapters.get(name).ok().map(|(a, _)| a)
    }

    fn fusion(&self, name: &str) -> Option<(&Fusion<B>, &FusionConfig)> {
        self.fusions.get(name).ok()
    }
}

struct RequireGrad(bool);

impl<B: Backend> ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(self.0)
    }
}

/// A frozen model with bottleneck adapters: itself a Burn module, so an
/// optimizer steps it whole (`model = optim.step(lr, model, grads)`); only
/// the adapters being trained have gradients.
#[derive(Module, Debug)]
pub struct AdapterModel<B: Backend, M: Module<B>> {
    /// The frozen model.
    pub model: M,
    /// The adapters and fusions (the trainable part).
    pub set: AdapterSet<B>,
    /// The active setup.
    #[module(skip)]
    setup: Option<Setup>,
    /// Adapters whose parameters train.
    #[module(skip)]
    trainable_adapters: Vec<String>,
    /// Fusions whose parameters train.
    #[module(skip)]
    trainable_fusions: Vec<String>,
    /// The head [`forward_head`](Self::forward_head) runs (AdapterHub's
    /// `active_head`).
    #[module(skip)]
    active_head: Option<String>,
    /// The head that trains with the adapters or fusions being trained.
    #[module(skip)]
    trainable_head: Option<String>,
}

impl<B: Backend, M: PeftModel<B>> AdapterModel<B, M> {
    /// Wraps `model` with no adapter; every model parameter is frozen.
    pub fn wrap(model: M) -> Self {
        AdapterModel {
            model: model.no_grad(),
            set: AdapterSet {
                adapters: NamedModules::new(),
                fusions: NamedModules::new(),
                heads: NamedModules::new(),
            },
            setup: None,
            trainable_adapters: Vec::new(),
            trainable_fusions: Vec::new(),
            active_head: None,
            trainable_head: None,
        }
    }

    /// Wraps `model`, adds `config` as adapter `name` and trains it
    /// (AdapterHub's `add_adapter` + `train_adapter`).
    pub fn new(model: M, name: &str, config: BnConfig) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.add_adapter(name, config)?;
        this.train_adapter(Setup::single(name))?;
        Ok(this)
    }

    /// Adds adapter `name` (freshly initialised per `config.init_weights`),
    /// inactive and frozen: activate it with [`set_active`](Self::set_active)
    /// or [`train_adapter`](Self::train_adapter).
    pub fn add_adapter(&mut self, name: &str, config: BnConfig) -> Result<()> {
        config.validate()?;
        if self.set.adapters.index_of(name).is_some() {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        if name.contains(',') || name.contains('.') || name.is_empty() {
            return Err(PeftError::Config(format!(
                "adapter name `{name}` must be non-empty without `,` or `.`"
            )));
        }
        let device = device_of(&self.model);
        let ModelDims {
            layers, d_model: d, ..
        } = self.model.dims();
        let mut adapter = BottleneckAdapter {
            attention: Vec::new(),
            output: Vec::new(),
        };
        let seed = config.init_weights_seed.unwrap_or_else(|| {
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            })
        });
        for layer in 0..layers {
            let m = ((d as f64 / config.reduction_for(layer)?).floor() as usize).max(1);
            let keep = !config.leave_out.contains(&layer);
            for (point, wanted) in [
                (InsertionPoint::AfterAttention, config.mh_adapter),
                (InsertionPoint::AfterFeedForward, config.output_adapter),
            ] {
                let site = (keep && wanted)
                    .then(|| {
                        let s = seed ^ ((layer as u64) << 8) ^ point as u64;
                        Bottleneck::init(&config, d, m, s, &device).map(|b| b.no_grad())
                    })
                    .transpose()?;
                match point {
                    InsertionPoint::AfterAttention => adapter.attention.push(site),
                    InsertionPoint::AfterFeedForward => adapter.output.push(site),
                }
            }
        }
        self.set.adapters.insert(name, adapter, config)
    }

    /// Adds a fusion layer over `names` (AdapterHub's `add_adapter_fusion`)
    /// at every point all of them use. Returns its name (`a,b`).
    pub fn add_fusion(&mut self, names: &[&str], config: FusionConfig) -> Result<String> {
        config.validate()?;
        if names.len() < 2 {
            return Err(PeftError::Config(
                "a fusion needs at least two adapters".into(),
            ));
        }
        let configs: Vec<&BnConfig> = names
            .iter()
            .map(|n| self.config(n))
            .collect::<Result<_>>()?;
        let name = names.join(",");
        if self.set.fusions.index_of(&name).is_some() {
            return Err(PeftError::DuplicateAdapter(name));
        }
        let device = device_of(&self.model);
        let ModelDims {
            layers, d_model: d, ..
        } = self.model.dims();
        let all = |f: fn(&BnConfig) -> bool| {
            let first = f(configs[0]);
            configs.iter().all(|c| f(c) == first).then_some(first)
        };
        let (Some(mh), Some(out)) = (all(|c| c.mh_adapter), all(|c| c.output_adapter)) else {
            return Err(PeftError::Config(format!(
                "fusion {name}: the adapters must agree on mh_adapter and output_adapter"
            )));
        };
        let layer = |on: bool| -> Vec<Option<FusionLayer<B>>> {
            (0..layers)
                .map(|_| on.then(|| FusionLayer::init(&config, d, &device).no_grad()))
                .collect()
        };
        let fusion = Fusion {
            attention: layer(mh),
            output: layer(out),
        };
        self.set.fusions.insert(&name, fusion, config)?;
        Ok(name)
    }

    /// Names of the adapters, in the order added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.set.adapters.names()
    }

    /// Names of the fusions.
    pub fn fusion_names(&self) -> Vec<String> {
        self.set.fusions.names()
    }

    /// The config of adapter `name`.
    pub fn config(&self, name: &str) -> Result<&BnConfig> {
        Ok(self.set.adapters.get(name)?.1)
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.set.adapters.find(name)
    }

    fn check_setup(&self, setup: &Setup) -> Result<()> {
        for leaf in setup.leaves() {
            self.index(leaf)?;
        }
        setup.parallel_channels()?;
        check_fusions(setup, &self.set.fusions.names())
    }

    /// The active setup (`None`: the plain model).
    pub fn active_setup(&self) -> Option<&Setup> {
        self.setup.as_ref()
    }

    /// Activates `setup` for inference; which parameters train is
    /// unchanged. As AdapterHub's `set_active_adapters`, a head named as the
    /// setup's last adapter becomes the active head.
    pub fn set_active(&mut self, setup: Setup) -> Result<()> {
        self.check_setup(&setup)?;
        self.follow_head(&setup);
        self.setup = Some(setup);
        Ok(())
    }

    /// Deactivates every adapter: the forward pass is the base model's.
    pub fn disable(&mut self) {
        self.setup = None;
    }

    /// Activates `setup` and makes its adapters the only trainable
    /// parameters (AdapterHub's `train_adapter`).
    pub fn train_adapter(&mut self, setup: Setup) -> Result<()> {
        self.check_setup(&setup)?;
        let leaves: Vec<String> = setup.leaves().iter().map(|s| s.to_string()).collect();
        self.follow_head(&setup);
        self.set_trainable(&leaves, &[]);
        self.setup = Some(setup);
        Ok(())
    }

    /// Activates `setup` (which must contain a `Fuse`) and makes its fusion
    /// layers the only trainable parameters (AdapterHub's `train_adapter_fusion`).
    pub fn train_fusion(&mut self, setup: Setup) -> Result<()> {
        self.check_setup(&setup)?;
        let mut fusions = Vec::new();
        collect_fusions(&setup, &mut fusions);
        if fusions.is_empty() {
            return Err(PeftError::Config(
                "train_fusion: the setup has no Fuse block".into(),
            ));
        }
        for name in &fusions {
            let i = self.fusion_index(name)?;
            if let Some(p) = self
                .set
                .fusions
                .config(i)
                .dropout_prob
                .filter(|&p| p != 0.0)
            {
                return Err(PeftError::Config(format!(
                    "fusion `{name}`: training with dropout_prob {p} is not supported (set it to 0 or null)"
                )));
            }
        }
        self.follow_head(&setup);
        self.set_trainable(&[], &fusions);
        self.setup = Some(setup);
        Ok(())
    }

    /// AdapterHub's fusion regularisation, `0.01 · Σ ‖I − V‖²` over the
    /// value matrices of the fusions being trained whose config has
    /// `regularization` (`None` when there are none): a term for the
    /// training loop to add to its loss, as AdapterHub's trainer adds
    /// `get_fusion_regularization_loss()`.
    pub fn fusion_regularization_loss(&self) -> Option<Tensor<B, 1>> {
        let mut total: Option<Tensor<B, 1>> = None;
        for (name, fusion, config) in self.set.fusions.iter() {
            if !config.regularization || !self.trainable_fusions.iter().any(|f| f == name) {
                continue;
            }
            let layers = fusion.attention.iter().chain(&fusion.output).flatten();
            for value in layers.filter_map(|l| l.value.as_ref()) {
                let w = value.weight.val();
                let [d, _] = w.dims();
                let eye = Tensor::<B, 2>::eye(d, &w.device());
                let term = (eye - w).powi_scalar(2).sum().mul_scalar(0.01);
                total = Some(match total {
                    Some(t) => t + term,
                    None => term,
                });
            }
        }
        total
    }

    fn set_trainable(&mut self, adapters: &[String], fusions: &[String]) {
        let trains = |names: &[String], n: &str| RequireGrad(names.iter().any(|t| t == n));
        self.set
            .adapters
            .map_modules(|n, a| a.map(&mut trains(adapters, n)));
        self.set
            .fusions
            .map_modules(|n, f| f.map(&mut trains(fusions, n)));
        self.trainable_adapters = adapters.to_vec();
        self.trainable_fusions = fusions.to_vec();
        // The active head trains with whatever trains (AdapterHub leaves
        // every head trainable; only the active one gets gradients).
        let head = self
            .active_head
            .clone()
            .filter(|_| !(adapters.is_empty() && fusions.is_empty()));
        self.set
            .heads
            .map_modules(|n, h| h.map(&mut RequireGrad(head.as_deref() == Some(n))));
        self.trainable_head = head;
    }

    /// Removes adapter `name` (and every fusion that uses it).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.set.adapters.remove(name)?;
        for fusion in self.set.fusions.names() {
            if fusion.split(',').any(|n| n == name) {
                self.set.fusions.remove(&fusion)?;
            }
        }
        if self
            .setup
            .as_ref()
            .is_some_and(|s| s.leaves().contains(&name))
        {
            self.setup = None;
        }
        self.trainable_adapters.retain(|n| n != name);
        // The head paired with it goes too (AdapterHub keeps it until
        // `delete_head`; a head without its adapter serves nothing here, and
        // a server evicting adapters must not keep their heads).
        if self.set.heads.index_of(name).is_some() {
            self.delete_head(name)?;
        }
        Ok(())
    }

    /// The forward pass of `ids: [b, t]` with the active setup. With a
    /// `Parallel` block the output has `channels · b` rows, child `i`'s at
    /// rows `i·b..(i+1)·b`.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<M::Output> {
        let Some(setup) = &self.setup else {
            return Ok(self.model.run(ModelInput::ids(ids).mask(attention_mask)));
        };
        let (ids, mask) = match setup.parallel_channels()? {
            Some(n) => (
                Tensor::cat(vec![ids; n], 0),
                attention_mask.map(|m| Tensor::cat(vec![m; n], 0)),
            ),
            None => (ids, attention_mask),
        };
        setup.check_rows(ids.dims()[0])?;
        let hook = Composer {
            lookup: &self.set,
            setup,
            _b: std::marker::PhantomData,
        };
        Ok(self.model.run(ModelInput::ids(ids).mask(mask).hook(&hook)))
    }

    /// Trainable (the adapters / fusions being trained) and all parameters.
    pub fn param_count(&self) -> ParamCount {
        let trained = |names: &[String], n: &str| names.iter().any(|t| t == n);
        let adapters: usize = self
            .set
            .adapters
            .iter()
            .filter(|(n, _, _)| trained(&self.trainable_adapters, n))
            .map(|(_, a, _)| a.num_params())
            .sum();
        let fusions: usize = self
            .set
            .fusions
            .iter()
            .filter(|(n, _, _)| trained(&self.trainable_fusions, n))
            .map(|(_, f, _)| f.num_params())
            .sum();
        let head: usize = self
            .set
            .heads
            .iter()
            .filter(|(n, _, _)| self.trainable_head.as_deref() == Some(n))
            .map(|(_, h, _)| h.num_params())
            .sum();
        ParamCount {
            trainable: adapters + fusions + head,
            all: self.model.num_params() + self.set.num_params(),
        }
    }

    /// The tensors of adapter `name` under AdapterHub's keys and PyTorch's
    /// layouts (`<site>.adapters.<name>.adapter_down.0.weight: [m, d]`, ...).
    pub fn adapter_tensors(&self, name: &str) -> Result<Vec<(String, HostTensor)>> {
        let adapter = self.set.adapters.module(self.index(name)?);
        let mut out = Vec::new();
        for layer in 0..self.model.dims().layers {
            for point in POINTS {
                let Some(b) = adapter.at(point, layer) else {
                    continue;
                };
                let key = format!("{}.adapters.{name}", self.model.hook_path(point, layer));
                push_linear(&mut out, &format!("{key}.adapter_down.0"), &b.down);
                push_linear(&mut out, &format!("{key}.adapter_up"), &b.up);
                if let Some(s) = &b.learned_scaling {
                    out.push((format!("{key}.scaling"), HostTensor::from_tensor(s.val())));
                }
            }
        }
        Ok(out)
    }

    /// Writes adapter `name` as AdapterHub's `save_adapter(...,
    /// use_safetensors=True)` does: `adapter.safetensors` (weights first),
    /// then `adapter_config.json`; each file atomically.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let config = self.config(name)?;
        let tensors = self.adapter_tensors(name)?;
        write_atomic(
            &dir.join(ADAPTER_WEIGHTS_FILE),
            &serialize_safetensors(&tensors, None),
        )?;
        let meta = json!({
            "config": config,
            "hidden_size": self.model.dims().d_model,
            "model_class": Value::Null,
            "model_name": "",
            "model_type": self.model.model_type(),
            "name": name,
            "version": "adapters.1.3.0",
        });
        let text = serde_json::to_string_pretty(&meta).expect("JSON values serialise");
        write_atomic(&dir.join(ADAPTER_CONFIG_FILE), text.as_bytes())?;
        if self.set.heads.index_of(name).is_some() {
            self.save_head(name, dir)?;
        }
        Ok(())
    }

    /// Loads an AdapterHub adapter folder (`adapter_config.json` +
    /// `adapter.safetensors`) as `name` (default: the name saved in it),
    /// inactive and frozen. Every tensor must fit a site of this model and
    /// every site must find its tensors; on error nothing is added.
    pub fn load_adapter(&mut self, dir: &Path, name: Option<&str>) -> Result<String> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let meta = read_json(&config_path)?;
        let saved = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("adapter")
            .to_string();
        let config: BnConfig = from_json(
            meta.get("config").cloned().unwrap_or(Value::Null),
            &config_path,
        )?;
        check_hidden_size(&meta, self.model.dims().d_model, &config_path)?;
        let name = name.unwrap_or(&saved).to_string();
        let file = weights_file(dir, ADAPTER_WEIGHTS_FILE, "pytorch_adapter.bin")?;
        let mut tensors = read_safetensors(&file)?;
        for (k, t) in &tensors {
            t.check_finite(k, &file)?;
        }
        self.add_adapter(&name, config)?;
        let filled = self.fill_adapter(&name, &saved, &mut tensors, &file);
        let mut outcome = filled.and_then(|()| ensure_consumed(tensors, &file));
        // AdapterHub's `with_head=True`: a head saved beside the adapter
        // loads under the same name (active once its adapter is).
        if outcome.is_ok() && dir.join(crate::head::HEAD_CONFIG_FILE).is_file() {
            outcome = self.load_head(dir, &name);
        }
        if outcome.is_err() {
            self.delete_adapter(&name)?;
        }
        outcome.map(|()| name)
    }

    fn fill_adapter(
        &mut self,
        name: &str,
        saved: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let i = self.index(name)?;
        let device = device_of(&self.model);
        let paths: Vec<(InsertionPoint, usize, String)> = (0..self.model.dims().layers)
            .flat_map(|l| POINTS.map(|p| (p, l, self.model.hook_path(p, l))))
            .collect();
        for (point, layer, path) in paths {
            let Some(Some(b)) = self.set.adapters.module_mut(i).site_mut(point, layer) else {
                continue;
            };
            let key = format!("{path}.adapters.{saved}");
            take_linear(
                tensors,
                &format!("{key}.adapter_down.0"),
                &mut b.down,
                file,
                &device,
            )?;
            take_linear(
                tensors,
                &format!("{key}.adapter_up"),
                &mut b.up,
                file,
                &device,
            )?;
            if let Some(s) = &mut b.learned_scaling {
                let k = format!("{key}.scaling");
                let n = s.shape().dims::<1>()[0];
                let t = take_tensor(tensors, &k, file)?;
                *s = Param::from_tensor(t.to_tensor([n], &k, &device)?).set_require_grad(false);
            }
        }
        Ok(())
    }

    /// Writes fusion `name` (`a,b`) as AdapterHub's `save_adapter_fusion`.
    pub fn save_fusion(&self, name: &str, dir: &Path) -> Result<()> {
        let i = self.fusion_index(name)?;
        let fusion = self.set.fusions.module(i);
        let mut tensors = Vec::new();
        for layer in 0..self.model.dims().layers {
            for point in POINTS {
                let Some(f) = fusion.at(point, layer) else {
                    continue;
                };
                let key = format!(
                    "{}.adapter_fusion_layer.{name}",
                    self.model.hook_path(point, layer)
                );
                for (part, lin) in [("query", &f.query), ("key", &f.key), ("value", &f.value)] {
                    if let Some(lin) = lin {
                        push_linear(&mut tensors, &format!("{key}.{part}"), lin);
                    }
                }
            }
        }
        write_atomic(
            &dir.join(FUSION_WEIGHTS_FILE),
            &serialize_safetensors(&tensors, None),
        )?;
        let meta = json!({
            "adapter_names": name.split(',').collect::<Vec<_>>(),
            "config": self.set.fusions.config(i),
            "hidden_size": self.model.dims().d_model,
            "model_type": self.model.model_type(),
            "name": name,
            "version": "adapters.1.3.0",
        });
        let text = serde_json::to_string_pretty(&meta).expect("JSON values serialise");
        write_atomic(&dir.join(FUSION_CONFIG_FILE), text.as_bytes())
    }

    fn fusion_index(&self, name: &str) -> Result<usize> {
        self.set.fusions.find(name)
    }

    /// Loads an AdapterHub fusion folder; its adapters must be loaded first.
    /// Returns the fusion's name.
    pub fn load_fusion(&mut self, dir: &Path) -> Result<String> {
        let config_path = dir.join(FUSION_CONFIG_FILE);
        let meta = read_json(&config_path)?;
        let config: FusionConfig = from_json(
            meta.get("config").cloned().unwrap_or(Value::Null),
            &config_path,
        )?;
        check_hidden_size(&meta, self.model.dims().d_model, &config_path)?;
        let names: Vec<String> = from_json(
            meta.get("adapter_names").cloned().unwrap_or(Value::Null),
            &config_path,
        )?;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let file = weights_file(dir, FUSION_WEIGHTS_FILE, "pytorch_model_adapter_fusion.bin")?;
        let mut tensors = read_safetensors(&file)?;
        for (k, t) in &tensors {
            t.check_finite(k, &file)?;
        }
        let name = self.add_fusion(&refs, config)?;
        let i = self.fusion_index(&name)?;
        let device = device_of(&self.model);
        let mut filled = Ok(());
        for layer in 0..self.model.dims().layers {
            for point in POINTS {
                let key = format!(
                    "{}.adapter_fusion_layer.{name}",
                    self.model.hook_path(point, layer)
                );
                let sites = match point {
                    InsertionPoint::AfterAttention => &mut self.set.fusions.module_mut(i).attention,
                    InsertionPoint::AfterFeedForward => &mut self.set.fusions.module_mut(i).output,
                };
                let Some(Some(f)) = sites.get_mut(layer) else {
                    continue;
                };
                for (part, lin) in [
                    ("query", &mut f.query),
                    ("key", &mut f.key),
                    ("value", &mut f.value),
                ] {
                    if let (Some(lin), true) = (lin, filled.is_ok()) {
                        filled = take_linear(
                            &mut tensors,
                            &format!("{key}.{part}"),
                            lin,
                            &file,
                            &device,
                        );
                    }
                }
            }
        }
        let outcome = filled.and_then(|()| ensure_consumed(tensors, &file));
        if outcome.is_err() {
            self.set.fusions.remove(&name)?;
        }
        outcome.map(|()| name)
    }
}

impl<B, M> AdapterModel<B, M>
where
    B: Backend,
    M: PeftModel<B, Output = Tensor<B, 3>> + CausalLm<B>,
{
    /// Greedy or sampled generation through the model's KV cache with the
    /// active setup (with a `Parallel` block, row 0's channel — the first
    /// child — is the one continued). Checks the setup first: a `BatchSplit`
    /// must fit one row.
    pub fn generate_checked(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        self.check_generation()?;
        Ok(self.generate(prompt, max_new, sampler, eos, true))
    }

    /// Whether the active setup can generate: a `BatchSplit` must fit the
    /// one row generation runs (a `Parallel` block's channels included).
    /// [`CausalLm`]'s methods assume it can.
    pub fn check_generation(&self) -> Result<()> {
        if let Some(setup) = &self.setup {
            setup.check_rows(setup.parallel_channels()?.unwrap_or(1))?;
        }
        Ok(())
    }

    fn replicate<const D: usize, K: burn::tensor::TensorKind<B> + burn::tensor::BasicOps<B>>(
        &self,
        t: Tensor<B, D, K>,
    ) -> Tensor<B, D, K> {
        match self
            .setup
            .as_ref()
            .and_then(|s| s.parallel_channels().ok().flatten())
        {
            Some(n) => Tensor::cat(vec![t; n], 0),
            None => t,
        }
    }
}

/// Generation with bottleneck adapters (decoders): the adapters run at every
/// join of every step, the model's own KV cache holds the keys and values.
/// Setups are checked by [`AdapterModel::generate_checked`]; these methods
/// assume a valid one.
impl<B, M> CausalLm<B> for AdapterModel<B, M>
where
    B: Backend,
    M: PeftModel<B, Output = Tensor<B, 3>> + CausalLm<B>,
{
    fn device(&self) -> B::Device {
        self.model.device()
    }

    fn forward_logits(&self, input: ModelInput<'_, B>) -> Tensor<B, 3> {
        let mut input = input;
        input.tokens = match input.tokens {
            Tokens::Ids(ids) => Tokens::Ids(self.replicate(ids)),
            Tokens::Embeds(e) => Tokens::Embeds(self.replicate(e)),
        };
        input.attention_mask = input.attention_mask.map(|m| self.replicate(m));
        let Some(setup) = &self.setup else {
            return self.model.run(input);
        };
        let hook = Composer {
            lookup: &self.set,
            setup,
            _b: std::marker::PhantomData,
        };
        self.model.run(input.hook(&hook))
    }
}

fn check_fusions(setup: &Setup, known: &[String]) -> Result<()> {
    let mut names = Vec::new();
    collect_fusions(setup, &mut names);
    match names.into_iter().find(|n| !known.contains(n)) {
        Some(missing) => Err(PeftError::UnknownAdapter {
            name: missing,
            available: known.to_vec(),
        }),
        None => Ok(()),
    }
}

fn collect_fusions(setup: &Setup, out: &mut Vec<String>) {
    match setup {
        Setup::Single(_) => {}
        Setup::Fuse(c) => {
            out.push(Setup::fusion_name(c));
            c.iter().for_each(|s| collect_fusions(s, out));
        }
        Setup::Stack(c) | Setup::Parallel(c) | Setup::BatchSplit(c, _) | Setup::Average(c, _) => {
            c.iter().for_each(|s| collect_fusions(s, out))
        }
    }
}

fn check_hidden_size(meta: &Value, width: usize, path: &Path) -> Result<()> {
    match meta.get("hidden_size").and_then(Value::as_u64) {
        Some(h) if h as usize != width => Err(PeftError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("hidden_size {h} does not fit this model's {width}"),
        }),
        _ => Ok(()),
    }
}

/// The safetensors file of an AdapterHub folder, or an error that says how
/// to get one when only PyTorch's pickle is there.
fn weights_file(dir: &Path, name: &str, pickle: &str) -> Result<std::path::PathBuf> {
    let file = dir.join(name);
    if !file.exists() && dir.join(pickle).exists() {
        return Err(PeftError::Checkpoint {
            path: dir.join(pickle),
            message: format!(
                "PyTorch pickles are not read; save with `use_safetensors=True` to get {name}"
            ),
        });
    }
    Ok(file)
}

/// `<key>.weight` (`[out, in]`, PyTorch's layout) and `<key>.bias`.
fn push_linear<B: Backend>(
    out: &mut Vec<(String, HostTensor)>,
    key: &str,
    lin: &burn::nn::Linear<B>,
) {
    out.push((
        format!("{key}.weight"),
        HostTensor::from_tensor(lin.weight.val()).transposed(),
    ));
    if let Some(b) = &lin.bias {
        out.push((format!("{key}.bias"), HostTensor::from_tensor(b.val())));
    }
}

/// Fills `lin` from `<key>.weight` (`[out, in]`) and `<key>.bias`, frozen.
fn take_linear<B: Backend>(
    tensors: &mut HashMap<String, HostTensor>,
    key: &str,
    lin: &mut burn::nn::Linear<B>,
    file: &Path,
    device: &B::Device,
) -> Result<()> {
    let dims = lin.weight.shape().dims::<2>();
    let bias = lin.bias.is_some();
    *lin = linear_from_torch(tensors, key, dims, bias, file, device)?.no_grad();
    Ok(())
}

/// Several active adapters are a `Stack` (AdapterHub's composition that
/// runs them one after another); fusions and parallel setups are set with
/// [`AdapterModel::set_active`].
impl<B: Backend, M: PeftModel<B>> AdapterHost for AdapterModel<B, M> {
    fn adapter_names(&self) -> Vec<String> {
        AdapterModel::adapter_names(self)
    }

    fn active_adapters(&self) -> Vec<String> {
        self.setup
            .as_ref()
            .map(|s| s.leaves().iter().map(|n| n.to_string()).collect())
            .unwrap_or_default()
    }

    fn activate(&mut self, names: &[&str]) -> Result<()> {
        match names {
            [] => {
                self.disable();
                Ok(())
            }
            [name] => self.set_active(Setup::single(name)),
            _ => self.set_active(Setup::stack(names)),
        }
    }

    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        AdapterModel::delete_adapter(self, name)
    }

    fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        AdapterModel::load_adapter(self, dir, Some(name)).map(|_| ())
    }

    fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        AdapterModel::save_adapter(self, name, dir)
    }

    fn param_count(&self) -> ParamCount {
        AdapterModel::param_count(self)
    }
}
