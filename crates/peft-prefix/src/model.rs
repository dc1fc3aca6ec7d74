//! [`PrefixTuningModel`]: a model with named prefixes.

use std::marker::PhantomData;
use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use peft_core::generate::{ids_tensor, CausalLm, Sampler};
use peft_core::io::{adapter_dir, adapter_subdirs, HostTensor};
use peft_core::kv::{KvCache, LayerCache};
use peft_core::named::NamedAdapters;
use peft_core::prompt_learning::{
    load_prompt_adapter, save_prompt_adapter, PromptLearningConfig, PromptLearningType,
};
use peft_core::{ModelDims, ModelInput, ParamCount, PeftError, PeftModel, Result, DEFAULT_ADAPTER};

use crate::encoder::{split_layers, LayerPrefix, PrefixEncoder};

/// A model carrying named prefixes, at most one active.
///
/// The wrapped model is frozen; each prefix is its own Burn module
/// ([`PrefixEncoder`]): train it with any Burn optimizer through
/// [`map_encoder`](Self::map_encoder).
#[derive(Debug, Clone)]
pub struct PrefixTuningModel<B: Backend, M> {
    /// The frozen model.
    pub model: M,
    prefixes: NamedAdapters<(PromptLearningConfig, PrefixEncoder<B>)>,
    _backend: PhantomData<B>,
}

impl<B: Backend, M: PeftModel<B>> PrefixTuningModel<B, M> {
    /// Wraps `model` (frozen) and adds `config` as the active adapter `default`.
    pub fn new(model: M, config: PromptLearningConfig) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.add_adapter(DEFAULT_ADAPTER, config)?;
        Ok(this)
    }

    /// Wraps `model` with no prefix. Every parameter of the model is frozen.
    pub fn wrap(model: M) -> Self {
        PrefixTuningModel {
            model: model.no_grad(),
            prefixes: NamedAdapters::default(),
            _backend: PhantomData,
        }
    }

    fn device(&self) -> B::Device {
        self.model.devices().into_iter().next().unwrap_or_default()
    }

    /// The config with the model's fields filled (or checked against it).
    fn fitted(&self, mut config: PromptLearningConfig) -> Result<PromptLearningConfig> {
        if config.peft_type != PromptLearningType::PrefixTuning {
            return Err(PeftError::Config(format!(
                "peft_type {} is not PREFIX_TUNING",
                config.peft_type.as_str()
            )));
        }
        let dims = self.model.dims();
        config.fill_from_model(dims.layers, dims.kv_heads * dims.head_dim, dims.kv_heads)?;
        Ok(config)
    }

    /// Adds a freshly initialised prefix `name` per `config` and makes it active.
    pub fn add_adapter(&mut self, name: &str, config: PromptLearningConfig) -> Result<()> {
        let config = self.fitted(config)?;
        let encoder = PrefixEncoder::new(&config, &self.device());
        self.prefixes.insert(name, (config, encoder))?;
        self.prefixes.set_active(name)
    }

    /// Adds prefix `name` initialised to the keys/values the model computes
    /// for `text_ids` (cut to `num_virtual_tokens` or repeated up to it) and
    /// makes it active: before training, the model behaves exactly as if the
    /// text preceded every input. Not for a projected config (its
    /// parameters are not a prefix).
    pub fn add_adapter_from_text(
        &mut self,
        name: &str,
        config: PromptLearningConfig,
        text_ids: &[u32],
    ) -> Result<()>
    where
        M: CausalLm<B>,
    {
        let config = self.fitted(config)?;
        if config.projected() {
            return Err(PeftError::Config(
                "a projected prefix cannot start from text; use prefix_projection: false".into(),
            ));
        }
        if text_ids.is_empty() {
            return Err(PeftError::Config(
                "the init text tokenised to no tokens".into(),
            ));
        }
        let ids: Vec<u32> = text_ids
            .iter()
            .copied()
            .cycle()
            .take(config.num_virtual_tokens)
            .collect();
        let mut cache = KvCache::new();
        self.model
            .logits_cached(ids_tensor(&ids, &self.device()), &mut cache);
        let encoder = PrefixEncoder::from_cache(&cache)?;
        self.prefixes.insert(name, (config, encoder))?;
        self.prefixes.set_active(name)
    }

    /// Makes `name` the active prefix.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.prefixes.set_active(name)
    }

    /// Removes prefix `name`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.prefixes.remove(name).map(|_| ())
    }

    /// The active prefix's name.
    pub fn active_adapter(&self) -> Option<&str> {
        self.prefixes.active().map(|(n, _)| n)
    }

    /// Every prefix's name, in insertion order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.prefixes.names()
    }

    /// The config of prefix `name` (model fields filled).
    pub fn config(&self, name: &str) -> Result<&PromptLearningConfig> {
        Ok(&self.prefixes.get(name)?.0)
    }

    /// The encoder of prefix `name`.
    pub fn encoder(&self, name: &str) -> Result<&PrefixEncoder<B>> {
        Ok(&self.prefixes.get(name)?.1)
    }

    /// Replaces the encoder of `name` by `f(encoder)`: an optimizer step,
    /// `map_encoder(name, |e| optim.step(lr, e, grads))`.
    pub fn map_encoder(
        &mut self,
        name: &str,
        f: impl FnOnce(PrefixEncoder<B>) -> PrefixEncoder<B>,
    ) -> Result<()> {
        self.prefixes
            .map(name, |(config, encoder)| (config, f(encoder)))
    }

    /// Runs the plain model until [`enable`](Self::enable).
    pub fn disable(&mut self) {
        self.prefixes.disable();
    }

    /// Undoes [`disable`](Self::disable).
    pub fn enable(&mut self) {
        self.prefixes.enable();
    }

    /// The active prefix unless disabled.
    fn running(&self) -> Option<&str> {
        self.prefixes.running().map(|(n, _)| n)
    }

    /// Prefix `name` as a KV cache for `batch` rows.
    pub fn prefix_cache(&self, name: &str, batch: usize) -> Result<KvCache<B>> {
        let d = self.model.dims();
        Ok(self
            .prefixes
            .get(name)?
            .1
            .cache(batch, d.layers, d.kv_heads, d.head_dim))
    }

    /// The model's forward pass after the active prefix (the plain model
    /// when there is none or when disabled). `attention_mask: [b, t]`
    /// covers the real tokens.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> M::Output {
        match self.running() {
            Some(name) => self
                .encoder(name)
                .expect("the active prefix exists")
                .forward_before(&self.model, ids, attention_mask),
            None => self.model.run(ModelInput::ids(ids).mask(attention_mask)),
        }
    }

    /// A batch whose row `i` runs after prefix `names[i]`. The prefixes
    /// must have the same number of virtual tokens.
    pub fn forward_mixed(
        &self,
        names: &[&str],
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<M::Output> {
        let b = ids.dims()[0];
        if names.len() != b {
            return Err(PeftError::Shape {
                name: "per-row adapter names".into(),
                expected: vec![b],
                found: vec![names.len()],
            });
        }
        let ModelDims {
            layers,
            kv_heads,
            head_dim,
            ..
        } = self.model.dims();
        let mut distinct: Vec<(&str, Vec<LayerPrefix<B>>)> = Vec::new();
        for &name in names {
            if distinct.iter().all(|(n, _)| *n != name) {
                let enc = &self.prefixes.get(name)?.1;
                distinct.push((name, split_layers(enc.prefix(), layers, kv_heads, head_dim)));
            }
        }
        let n_virtual = |kv: &[LayerPrefix<B>]| kv[0].0.dims()[2];
        let first = n_virtual(&distinct[0].1);
        if let Some((name, kv)) = distinct.iter().find(|(_, kv)| n_virtual(kv) != first) {
            return Err(PeftError::State(format!(
                "a mixed batch needs prefixes of one length: `{}` has {first} virtual tokens, `{name}` {}",
                distinct[0].0,
                n_virtual(kv)
            )));
        }
        let row = |name: &str| {
            &distinct
                .iter()
                .find(|(n, _)| *n == name)
                .expect("collected")
                .1
        };
        let mut cache = KvCache {
            layers: (0..layers)
                .map(|l| LayerCache {
                    k: Some(Tensor::cat(
                        names.iter().map(|n| row(n)[l].0.clone()).collect(),
                        0,
                    )),
                    v: Some(Tensor::cat(
                        names.iter().map(|n| row(n)[l].1.clone()).collect(),
                        0,
                    )),
                })
                .collect(),
        };
        Ok(self
            .model
            .run(ModelInput::ids(ids).mask(attention_mask).cache(&mut cache)))
    }

    /// Trainable (the active prefix's encoder) and total parameters, as
    /// PEFT's `get_nb_trainable_parameters` counts them.
    pub fn param_count(&self) -> ParamCount {
        let trainable = self
            .prefixes
            .active()
            .map(|(_, (_, e))| e.num_params())
            .unwrap_or(0);
        ParamCount {
            trainable,
            all: self.model.num_params() + trainable,
        }
    }

    /// Continues `prompt` after the active prefix through the model's KV
    /// cache: the prefix is the cache's first entry, real positions start
    /// after it.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        eos: Option<u32>,
    ) -> Vec<u32>
    where
        M: CausalLm<B>,
    {
        let mut cache = match self.running() {
            Some(name) => self
                .prefix_cache(name, 1)
                .expect("the active prefix exists"),
            None => KvCache::new(),
        };
        let logits = self
            .model
            .logits_cached(ids_tensor(prompt, &self.device()), &mut cache);
        self.model.decode(logits, &mut cache, max_new, sampler, eos)
    }

    /// Writes every prefix in PEFT's layout under `dir` (`default` in `dir`,
    /// others in sub-folders), each folded to `prompt_embeddings`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for name in self.adapter_names() {
            self.save_adapter(&name, &adapter_dir(dir, &name))?;
        }
        Ok(())
    }

    /// Writes prefix `name` into `dir`, atomically per file.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let (config, encoder) = self.prefixes.get(name)?;
        save_prompt_adapter(dir, config, HostTensor::from_tensor(encoder.prefix()))
    }

    /// Loads a PEFT prefix-tuning folder as prefix `name` (folded), leaving
    /// the active prefix as it was (or making it active if none was).
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let (config, embeddings) = load_prompt_adapter(dir, &[PromptLearningType::PrefixTuning])?;
        let mut config = self.fitted(config)?;
        config.inference_mode = true;
        let encoder = PrefixEncoder::from_embeddings(&config, &embeddings, &self.device())?;
        self.prefixes.insert(name, (config, encoder))?;
        if self.active_adapter().is_none() {
            self.prefixes.set_active(name)?;
        }
        Ok(())
    }

    /// Wraps `model` and loads `dir` as `default` plus every sub-folder
    /// holding an adapter under its folder name; `default` is active.
    pub fn from_pretrained(model: M, dir: &Path) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.load_adapter(dir, DEFAULT_ADAPTER)?;
        for (name, sub) in adapter_subdirs(dir)? {
            this.load_adapter(&sub, &name)?;
        }
        this.set_adapter(DEFAULT_ADAPTER)?;
        Ok(this)
    }
}

impl<B: AutodiffBackend, M: PeftModel<B> + AutodiffModule<B>> PrefixTuningModel<B, M>
where
    M::InnerModule: PeftModel<B::InnerBackend>,
{
    /// The inference view: the model and every encoder on the inner
    /// (non-autodiff) backend, names and activation kept. Evaluate and
    /// generate through it during training: passes through a trainable
    /// encoder on an autodiff backend record a graph that only a backward
    /// pass frees.
    pub fn valid(&self) -> PrefixTuningModel<B::InnerBackend, M::InnerModule> {
        PrefixTuningModel {
            model: self.model.valid(),
            prefixes: self
                .prefixes
                .map_all(|(config, encoder)| (config.clone(), encoder.valid())),
            _backend: PhantomData,
        }
    }
}
