//! [`PromptTuningModel`]: a model with named soft prompts.

use std::marker::PhantomData;
use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor};
use peft_core::generate::{ids_tensor, CausalLm, Sampler};
use peft_core::io::{adapter_dir, adapter_subdirs, HostTensor};
use peft_core::kv::KvCache;
use peft_core::named::NamedAdapters;
use peft_core::prompt_learning::{
    load_prompt_adapter, save_prompt_adapter, PromptLearningConfig, PromptLearningType,
    PromptTuningInit,
};
use peft_core::{ParamCount, PeftError, PeftModel, Result, DEFAULT_ADAPTER};

use crate::encoder::{prepend, PromptEncoder};

/// A model carrying named soft prompts (prompt tuning or P-tuning), at most
/// one active.
///
/// The wrapped model is frozen; each prompt is its own Burn module
/// ([`PromptEncoder`]): train it with any Burn optimizer through
/// [`map_encoder`](Self::map_encoder).
#[derive(Debug, Clone)]
pub struct PromptTuningModel<B: Backend, M> {
    /// The frozen model.
    pub model: M,
    prompts: NamedAdapters<(PromptLearningConfig, PromptEncoder<B>)>,
    _backend: PhantomData<B>,
}

impl<B: Backend, M: PeftModel<B>> PromptTuningModel<B, M> {
    /// Wraps `model` (frozen) and adds `config` as the active adapter `default`.
    pub fn new(model: M, config: PromptLearningConfig) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.add_adapter(DEFAULT_ADAPTER, config)?;
        Ok(this)
    }

    /// Wraps `model` with no prompt. Every parameter of the model is frozen.
    pub fn wrap(model: M) -> Self {
        PromptTuningModel {
            model: model.no_grad(),
            prompts: NamedAdapters::default(),
            _backend: PhantomData,
        }
    }

    fn device(&self) -> B::Device {
        self.model.devices().into_iter().next().unwrap_or_default()
    }

    /// The config with the model's fields filled (or checked against it).
    fn fitted(&self, mut config: PromptLearningConfig) -> Result<PromptLearningConfig> {
        if config.peft_type == PromptLearningType::PrefixTuning {
            return Err(PeftError::Config(
                "peft_type PREFIX_TUNING belongs to peft-prefix, not to prompt tuning".into(),
            ));
        }
        // PEFT records the model's attention heads and layers; the prompt
        // itself only needs the embedding width.
        let heads = config.num_attention_heads.unwrap_or(1);
        let layers = config.num_layers.unwrap_or(1);
        config.fill_from_model(layers, self.model.dims().d_model, heads)?;
        Ok(config)
    }

    /// The word embeddings of `ids` as `[len, d_model]` (detached).
    fn embed_ids(&self, ids: &[u32]) -> Result<Tensor<B, 2>> {
        let vocab = self.model.dims().vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(PeftError::Config(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let e = self.model.embed_tokens(ids_tensor(ids, &self.device()));
        Ok(e.reshape([ids.len(), self.model.dims().d_model]).detach())
    }

    /// Adds a fresh prompt `name` per `config` and makes it active: prompt
    /// tuning `RANDOM` (N(0, 1)) or `SAMPLE_VOCAB` (word embeddings of
    /// uniformly drawn ids), or a P-tuning encoder. `TEXT` needs the text's
    /// token ids: use [`add_adapter_from_text`](Self::add_adapter_from_text).
    pub fn add_adapter(&mut self, name: &str, config: PromptLearningConfig) -> Result<()> {
        let config = self.fitted(config)?;
        let device = self.device();
        let [n, d] = config.embedding_shape();
        let encoder = match (config.peft_type, config.prompt_tuning_init) {
            (PromptLearningType::PTuning, _) => PromptEncoder::p_tuning(&config, &device),
            (_, Some(PromptTuningInit::Text)) => {
                return Err(PeftError::Config(
                    "prompt_tuning_init TEXT: use add_adapter_from_text with the text's token ids"
                        .into(),
                ))
            }
            (_, Some(PromptTuningInit::SampleVocab)) => {
                let vocab = self.model.dims().vocab_size;
                let draws: Vec<f32> =
                    Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, vocab as f64), &device)
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .expect("f32");
                let ids: Vec<u32> = draws
                    .iter()
                    .map(|&u| (u as u32).min(vocab as u32 - 1))
                    .collect();
                PromptEncoder::from_tensor(self.embed_ids(&ids)?)
            }
            _ => PromptEncoder::from_tensor(Tensor::random(
                [n, d],
                Distribution::Normal(0.0, 1.0),
                &device,
            )),
        };
        self.insert(name, config, encoder)
    }

    /// Adds prompt `name` initialised from the word embeddings of
    /// `text_ids` (the tokenised `prompt_tuning_init_text`), cut to
    /// `num_virtual_tokens` or repeated up to it, as PEFT's `TEXT` init.
    pub fn add_adapter_from_text(
        &mut self,
        name: &str,
        config: PromptLearningConfig,
        text_ids: &[u32],
    ) -> Result<()> {
        let config = self.fitted(config)?;
        if text_ids.is_empty() {
            return Err(PeftError::Config(
                "the init text tokenised to no tokens".into(),
            ));
        }
        let n = config.embedding_shape()[0];
        let ids: Vec<u32> = text_ids.iter().copied().cycle().take(n).collect();
        let encoder = PromptEncoder::from_tensor(self.embed_ids(&ids)?);
        self.insert(name, config, encoder)
    }

    fn insert(
        &mut self,
        name: &str,
        config: PromptLearningConfig,
        encoder: PromptEncoder<B>,
    ) -> Result<()> {
        self.prompts.insert(name, (config, encoder))?;
        self.prompts.set_active(name)
    }

    /// Makes `name` the active prompt.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.prompts.set_active(name)
    }

    /// Removes prompt `name`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.prompts.remove(name).map(|_| ())
    }

    /// The active prompt's name.
    pub fn active_adapter(&self) -> Option<&str> {
        self.prompts.active().map(|(n, _)| n)
    }

    /// Every prompt's name, in insertion order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.prompts.names()
    }

    /// The config of prompt `name` (model fields filled).
    pub fn config(&self, name: &str) -> Result<&PromptLearningConfig> {
        Ok(&self.prompts.get(name)?.0)
    }

    /// The encoder of prompt `name`.
    pub fn encoder(&self, name: &str) -> Result<&PromptEncoder<B>> {
        Ok(&self.prompts.get(name)?.1)
    }

    /// Replaces the encoder of `name` by `f(encoder)`: an optimizer step,
    /// `map_encoder(name, |e| optim.step(lr, e, grads))`.
    pub fn map_encoder(
        &mut self,
        name: &str,
        f: impl FnOnce(PromptEncoder<B>) -> PromptEncoder<B>,
    ) -> Result<()> {
        self.prompts
            .map(name, |(config, encoder)| (config, f(encoder)))
    }

    /// Runs the plain model until [`enable`](Self::enable).
    pub fn disable(&mut self) {
        self.prompts.disable();
    }

    /// Undoes [`disable`](Self::disable).
    pub fn enable(&mut self) {
        self.prompts.enable();
    }

    /// Virtual tokens the next [`forward`](Self::forward) puts first (0 when
    /// disabled or without a prompt).
    pub fn num_virtual_tokens(&self) -> usize {
        self.running()
            .map(|(_, e)| e.num_virtual_tokens())
            .unwrap_or(0)
    }

    fn running(&self) -> Option<(&str, &PromptEncoder<B>)> {
        self.prompts.running().map(|(n, (_, e))| (n, e))
    }

    /// The model's forward pass on the active prompt followed by `ids`
    /// (the plain model when there is none or when disabled). The output
    /// covers the `n_virtual` prompt positions first, as PEFT's does;
    /// `attention_mask: [b, t]` covers the real tokens.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> M::Output {
        match self.running() {
            Some((_, e)) => e.forward_before(&self.model, ids, attention_mask),
            None => prepend(&self.model, None, ids, attention_mask),
        }
    }

    /// A batch whose row `i` runs after prompt `names[i]`. The prompts must
    /// have the same number of virtual tokens.
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
        let mut distinct: Vec<(&str, Tensor<B, 3>)> = Vec::new();
        for &name in names {
            if distinct.iter().all(|(n, _)| *n != name) {
                let p = self.prompts.get(name)?.1.prompt().unsqueeze::<3>();
                distinct.push((name, p));
            }
        }
        let first = distinct[0].1.dims()[1];
        if let Some((name, p)) = distinct.iter().find(|(_, p)| p.dims()[1] != first) {
            return Err(PeftError::State(format!(
                "a mixed batch needs prompts of one length: `{}` has {first} virtual tokens, `{name}` {}",
                distinct[0].0,
                p.dims()[1]
            )));
        }
        let rows = names
            .iter()
            .map(|name| {
                distinct
                    .iter()
                    .find(|(n, _)| n == name)
                    .expect("collected")
                    .1
                    .clone()
            })
            .collect();
        Ok(prepend(
            &self.model,
            Some(Tensor::cat(rows, 0)),
            ids,
            attention_mask,
        ))
    }

    /// Trainable (the active prompt's encoder) and total parameters, as
    /// PEFT's `get_nb_trainable_parameters` counts them.
    pub fn param_count(&self) -> ParamCount {
        let trainable = self
            .prompts
            .active()
            .map(|(_, (_, e))| e.num_params())
            .unwrap_or(0);
        ParamCount {
            trainable,
            all: self.model.num_params() + trainable,
        }
    }

    /// Continues `prompt` (token ids) after the active soft prompt: the
    /// first step runs the soft prompt and the ids' embeddings into the
    /// model's KV cache, later steps feed one token each.
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
        let mut cache = KvCache::new();
        let mut embeds = self.model.embed_tokens(ids_tensor(prompt, &self.device()));
        if let Some((_, e)) = self.running() {
            embeds = Tensor::cat(vec![e.prompt().unsqueeze::<3>(), embeds], 1);
        }
        let logits = self.model.logits_embeds_cached(embeds, &mut cache);
        self.model.decode(logits, &mut cache, max_new, sampler, eos)
    }

    /// Writes every prompt in PEFT's layout under `dir` (`default` in `dir`,
    /// others in sub-folders), each folded to `prompt_embeddings`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for name in self.adapter_names() {
            self.save_adapter(&name, &adapter_dir(dir, &name))?;
        }
        Ok(())
    }

    /// Writes prompt `name` into `dir`, atomically per file.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let (config, encoder) = self.prompts.get(name)?;
        save_prompt_adapter(dir, config, HostTensor::from_tensor(encoder.prompt()))
    }

    /// Loads a PEFT prompt-tuning or P-tuning folder as prompt `name`
    /// (folded), leaving the active prompt as it was (or making it active if
    /// none was).
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let (config, embeddings) = load_prompt_adapter(
            dir,
            &[
                PromptLearningType::PromptTuning,
                PromptLearningType::PTuning,
            ],
        )?;
        let mut config = self.fitted(config)?;
        config.inference_mode = true;
        let encoder = PromptEncoder::from_embeddings(&config, &embeddings, &self.device())?;
        self.prompts.insert(name, (config, encoder))?;
        if self.active_adapter().is_none() {
            self.prompts.set_active(name)?;
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

impl<B: AutodiffBackend, M: PeftModel<B> + AutodiffModule<B>> PromptTuningModel<B, M>
where
    M::InnerModule: PeftModel<B::InnerBackend>,
{
    /// The inference view: the model and every encoder on the inner
    /// (non-autodiff) backend, names and activation kept. Evaluate and
    /// generate through it during training: passes through a trainable
    /// encoder on an autodiff backend record a graph that only a backward
    /// pass frees.
    pub fn valid(&self) -> PromptTuningModel<B::InnerBackend, M::InnerModule> {
        PromptTuningModel {
            model: self.model.valid(),
            prompts: self
                .prompts
                .map_all(|(config, encoder)| (config.clone(), encoder.valid())),
            _backend: PhantomData,
        }
    }
}
