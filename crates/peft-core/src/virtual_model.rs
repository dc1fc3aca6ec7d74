//! [`VirtualTokenModel`]: the one wrapper of the prompt-learning methods
//! (prefix tuning, prompt tuning, P-tuning). A frozen model sits beside
//! named encoders, at most one active; a method is its encoder type, which
//! says through [`VirtualTokens`] how its virtual tokens enter the model's
//! [`ModelInput`]: a prefix as the key/value cache before the tokens, a soft
//! prompt as embeddings before theirs. Everything else (names, activation,
//! mixed batches, generation, PEFT's files, the inference view) is here,
//! once.
//!
//! An adapter's `modules_to_save` (PEFT's SEQ_CLS adapters keep a copy of
//! the classifier head) lives in the model's own linear slots, switched
//! with its adapter and saved under PEFT's prompt-learning keys
//! (`base_model.classifier.weight`, `modules_to_save::PROMPT_KEY_PREFIX`).

use std::fmt::Debug;
use std::marker::PhantomData;
use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::count::ParamCount;
use crate::error::{PeftError, Result};
use crate::generate::{ids_tensor, CausalLm, Sampler};
use crate::host::AdapterHost;
use crate::input::{ModelDims, ModelInput, Tokens};
use crate::io::{adapter_dir, adapter_subdirs, ensure_consumed, HostTensor, WEIGHTS_FILE};
use crate::kv::KvCache;
use crate::model::{device_of, PeftModel};
use crate::modules_to_save::{
    attach_model_copies, read_copy, remove_model_copies, write_copy, PROMPT_KEY_PREFIX,
};
use crate::named::NamedModules;
use crate::prompt_learning::{
    load_prompt_adapter_parts, save_prompt_adapter, PromptLearningConfig, VirtualTokenEncoder,
};
use crate::{routing, DEFAULT_ADAPTER};

/// Whose virtual tokens each row of a batch gets.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a, E> {
    /// One encoder for all `batch` rows.
    All(&'a E, usize),
    /// Row `i` gets encoder `i` (all of one number of virtual tokens).
    Each(&'a [&'a E]),
}

/// A prompt-learning method's encoder: how its virtual tokens enter a model.
pub trait VirtualTokens<B: Backend>: VirtualTokenEncoder<B> + Clone + Debug {
    /// What a method's adapters are called in messages, plural (`prefixes`,
    /// `prompts`).
    const WHAT: &'static str;

    /// Positions the virtual tokens add at the front of the model's output
    /// (a soft prompt's; a prefix adds none).
    fn output_positions(&self) -> usize;

    /// Checks that `config` is this method's and fills (or checks) its
    /// model fields from the model's sizes.
    fn fit_config(config: PromptLearningConfig, dims: &ModelDims) -> Result<PromptLearningConfig>;

    /// A fresh encoder per `config` (model fields filled), initialised as
    /// PEFT does.
    fn fresh<M: PeftModel<B>>(config: &PromptLearningConfig, model: &M) -> Result<Self>;

    /// An encoder that starts out as `text_ids` (cut to the number of
    /// virtual tokens or repeated up to it) placed before every input.
    fn from_text<M: PeftModel<B>>(
        config: &PromptLearningConfig,
        model: &M,
        text_ids: &[u32],
    ) -> Result<Self>;

    /// `tokens` and their `attention_mask: [b, t]` after the virtual tokens
    /// of `rows`: what the model's input becomes. A prefix fills `cache`
    /// (empty on entry) and leaves the tokens; a soft prompt puts its
    /// embeddings before the tokens' (`embed` gives word embeddings).
    fn enter(
        rows: Rows<'_, Self>,
        tokens: Tokens<B>,
        attention_mask: Option<Tensor<B, 2>>,
        dims: &ModelDims,
        embed: &dyn Fn(Tensor<B, 2, Int>) -> Tensor<B, 3>,
        cache: &mut KvCache<B>,
    ) -> (Tokens<B>, Option<Tensor<B, 2>>);

    /// `model`'s forward pass on `ids: [b, t]` after this encoder's virtual
    /// tokens; `attention_mask: [b, t]` covers the real tokens.
    fn forward_before<M: PeftModel<B>>(
        &self,
        model: &M,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> M::Output {
        let batch = ids.dims()[0];
        run_after(Rows::All(self, batch), model, ids, attention_mask)
    }
}

/// `model`'s forward pass on `ids` after the virtual tokens of `rows`.
pub fn run_after<B: Backend, M: PeftModel<B>, E: VirtualTokens<B>>(
    rows: Rows<'_, E>,
    model: &M,
    ids: Tensor<B, 2, Int>,
    attention_mask: Option<Tensor<B, 2>>,
) -> M::Output {
    let dims = model.dims();
    let embed = |ids| model.embed_tokens(ids);
    let mut cache = KvCache::new();
    let (tokens, mask) = E::enter(
        rows,
        Tokens::Ids(ids),
        attention_mask,
        &dims,
        &embed,
        &mut cache,
    );
    let input = ModelInput::of(tokens).mask(mask);
    if cache.is_empty() {
        model.run(input)
    } else {
        model.run(input.cache(&mut cache))
    }
}

/// A frozen model carrying named prompt-learning adapters of one method
/// (encoder type `E`), at most one active.
///
/// A Burn module: train it with any Burn optimizer (only the active
/// adapter's encoder takes part in a forward pass, so only it receives
/// gradients; the model is frozen), or one encoder alone through
/// [`map_encoder`](Self::map_encoder). Its inference copy
/// (`AutodiffModule::valid`) keeps names, configs and activation.
#[derive(Module, Debug)]
pub struct VirtualTokenModel<B: Backend, M, E> {
    /// The frozen model.
    pub model: M,
    /// Each adapter's encoder with its config (model fields filled).
    adapters: NamedModules<B, E, PromptLearningConfig>,
    /// The active adapter.
    #[module(skip)]
    active: Option<String>,
    /// Whether the plain model runs, the active adapter kept.
    #[module(skip)]
    disabled: bool,
    _backend: PhantomData<B>,
}

impl<B: Backend, M: PeftModel<B>, E: VirtualTokens<B>> VirtualTokenModel<B, M, E> {
    /// Wraps `model` (frozen) and adds `config` as the active adapter `default`.
    pub fn new(model: M, config: PromptLearningConfig) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.add_adapter(DEFAULT_ADAPTER, config)?;
        Ok(this)
    }

    /// Wraps `model` with no adapter. Every parameter of the model is frozen.
    pub fn wrap(model: M) -> Self {
        VirtualTokenModel {
            model: model.no_grad(),
            adapters: NamedModules::new(),
            active: None,
            disabled: false,
            _backend: PhantomData,
        }
    }

    fn device(&self) -> B::Device {
        device_of(&self.model)
    }

    /// Adds a fresh adapter `name` per `config` (PEFT's initialisation)
    /// and makes it active.
    pub fn add_adapter(&mut self, name: &str, config: PromptLearningConfig) -> Result<()> {
        let config = E::fit_config(config, &self.model.dims())?;
        let encoder = E::fresh(&config, &self.model)?;
        self.insert(name, encoder, config)?;
        self.set_adapter(name)
    }

    /// Inserts adapter `name` with fresh copies of the layers its
    /// `modules_to_save` names (PEFT's copies of the base's); on error
    /// nothing of it stays.
    fn insert(&mut self, name: &str, encoder: E, config: PromptLearningConfig) -> Result<()> {
        let copies = config.modules_to_save.clone().unwrap_or_default();
        self.adapters.insert(name, encoder, config)?;
        if let Err(e) = attach_model_copies(&mut self.model, name, &copies) {
            self.adapters.remove(name)?;
            return Err(e);
        }
        Ok(())
    }

    /// Fills adapter `name`'s copies from `dir`'s file (`tensors`: what is
    /// left of it after `prompt_embeddings`), every tensor consumed; on
    /// error the adapter is removed.
    fn fill_copies(
        &mut self,
        name: &str,
        dir: &Path,
        mut tensors: std::collections::HashMap<String, HostTensor>,
    ) -> Result<()> {
        let file = dir.join(WEIGHTS_FILE);
        let mut filled = Ok(());
        self.model.visit_linears_mut(&mut |path, slot| {
            if filled.is_ok() {
                filled = read_copy(slot, PROMPT_KEY_PREFIX, path, name, &mut tensors, &file);
            }
        });
        let outcome = filled.and_then(|()| ensure_consumed(tensors, &file));
        if outcome.is_err() {
            self.delete_adapter(name)?;
        }
        outcome
    }

    /// The copies adapter `name` keeps, under PEFT's keys.
    fn copies(&self, name: &str) -> Vec<(String, HostTensor)> {
        let mut out = Vec::new();
        self.model.visit_linears(&mut |path, slot| {
            write_copy(slot, PROMPT_KEY_PREFIX, path, name, &mut out)
        });
        out
    }

    /// Adds adapter `name` started from `text_ids` (prefix: the text's own
    /// keys and values; prompt: PEFT's `TEXT` init, the text's word
    /// embeddings), cut to the virtual tokens or repeated up to them, and
    /// makes it active.
    pub fn add_adapter_from_text(
        &mut self,
        name: &str,
        config: PromptLearningConfig,
        text_ids: &[u32],
    ) -> Result<()> {
        let config = E::fit_config(config, &self.model.dims())?;
        if text_ids.is_empty() {
            return Err(PeftError::Config(
                "the init text tokenised to no tokens".into(),
            ));
        }
        let encoder = E::from_text(&config, &self.model, text_ids)?;
        self.insert(name, encoder, config)?;
        self.set_adapter(name)
    }

    /// Makes `name` the active adapter (its copies of layers too: they
    /// train, the others are frozen).
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.adapters.find(name)?;
        let names = [name.to_string()];
        self.model
            .visit_linears_mut(&mut |_, slot| slot.set_active(&names));
        self.active = Some(name.to_string());
        Ok(())
    }

    /// Removes adapter `name`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.adapters.remove(name)?;
        remove_model_copies(&mut self.model, name);
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        Ok(())
    }

    /// The active adapter's name.
    pub fn active_adapter(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// Every adapter's name, in insertion order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.names()
    }

    /// The config of adapter `name` (model fields filled).
    pub fn config(&self, name: &str) -> Result<&PromptLearningConfig> {
        Ok(self.adapters.get(name)?.1)
    }

    /// The encoder of adapter `name`.
    pub fn encoder(&self, name: &str) -> Result<&E> {
        Ok(self.adapters.get(name)?.0)
    }

    /// Replaces the encoder of `name` by `f(encoder)`: an optimizer step,
    /// `map_encoder(name, |e| optim.step(lr, e, grads))`.
    pub fn map_encoder(&mut self, name: &str, f: impl FnOnce(E) -> E) -> Result<()> {
        let i = self.adapters.find(name)?;
        self.adapters.map_module(i, f);
        Ok(())
    }

    /// Runs the plain model (its own layers, not the adapter's copies)
    /// until [`enable`](Self::enable).
    pub fn disable(&mut self) {
        self.set_disabled(true);
    }

    /// Undoes [`disable`](Self::disable).
    pub fn enable(&mut self) {
        self.set_disabled(false);
    }

    fn set_disabled(&mut self, disabled: bool) {
        self.model
            .visit_linears_mut(&mut |_, slot| slot.state.disabled = disabled);
        self.disabled = disabled;
    }

    /// The active encoder unless disabled.
    fn running(&self) -> Option<&E> {
        if self.disabled {
            return None;
        }
        self.encoder(self.active.as_deref()?).ok()
    }

    /// Positions the next [`forward`](Self::forward) adds at the front of
    /// the output (a soft prompt's virtual tokens; 0 for a prefix, when
    /// disabled or without an adapter).
    pub fn num_virtual_tokens(&self) -> usize {
        self.running().map_or(0, E::output_positions)
    }

    /// The model's forward pass after the active adapter's virtual tokens
    /// (the plain model when there is none or when disabled).
    /// `attention_mask: [b, t]` covers the real tokens.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> M::Output {
        match self.running() {
            Some(e) => e.forward_before(&self.model, ids, attention_mask),
            None => self.model.run(ModelInput::ids(ids).mask(attention_mask)),
        }
    }

    /// A batch whose row `i` runs after adapter `names[i]`. The adapters
    /// must have the same number of virtual tokens. Each row also runs
    /// through its adapter's copies of layers inside the model; a head
    /// applied to the output afterwards (`classify_hidden`) routes per row
    /// when the call sits inside [`routing::with_row_adapters`] of the same
    /// names.
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
        let rows: Vec<&E> = names
            .iter()
            .map(|name| self.encoder(name))
            .collect::<Result<_>>()?;
        let first = rows[0].num_virtual_tokens();
        if let Some(i) = rows.iter().position(|e| e.num_virtual_tokens() != first) {
            return Err(PeftError::State(format!(
                "a mixed batch needs {what} of one length: `{}` has {first} virtual tokens, `{}` {}",
                names[0],
                names[i],
                rows[i].num_virtual_tokens(),
                what = E::WHAT,
            )));
        }
        // Each row's copies of layers (a head) too.
        let owned: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        Ok(routing::with_row_adapters(&owned, || {
            run_after(Rows::Each(&rows), &self.model, ids, attention_mask)
        }))
    }

    /// Trainable (the active adapter's encoder) and total parameters, as
    /// PEFT's `get_nb_trainable_parameters` counts them.
    pub fn param_count(&self) -> ParamCount {
        let encoder = self
            .active_adapter()
            .and_then(|name| self.encoder(name).ok())
            .map_or(0, |e| e.num_params());
        let model = self.model.param_count();
        ParamCount {
            // The active adapter's copies of layers train with it.
            trainable: encoder + model.trainable,
            all: model.all + encoder,
        }
    }

    /// Continues `prompt` (token ids) after the active adapter through the
    /// model's KV cache: the first step runs the virtual tokens and the
    /// prompt ([`start_generation`](Self::start_generation)), later steps
    /// feed one token each.
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
        let (logits, mut cache) = self.start_generation(prompt);
        self.model.decode(logits, &mut cache, max_new, sampler, eos)
    }

    /// The first step of generation after the active adapter: the logits
    /// `[1, t, vocab]` of `prompt` and the KV cache that later steps extend
    /// through the frozen model's [`CausalLm::logits_cached`] (a prefix is
    /// the cache's first entry; a soft prompt's embeddings run before the
    /// prompt's).
    pub fn start_generation(&self, prompt: &[u32]) -> (Tensor<B, 3>, KvCache<B>)
    where
        M: CausalLm<B>,
    {
        let ids = ids_tensor(prompt, &self.device());
        let mut cache = KvCache::new();
        let tokens = match self.running() {
            Some(e) => {
                let dims = self.model.dims();
                let embed = |ids| self.model.embed_tokens(ids);
                E::enter(
                    Rows::All(e, 1),
                    Tokens::Ids(ids),
                    None,
                    &dims,
                    &embed,
                    &mut cache,
                )
                .0
            }
            None => Tokens::Ids(ids),
        };
        let logits = self
            .model
            .forward_logits(ModelInput::of(tokens).cache(&mut cache));
        (logits, cache)
    }

    /// Writes every adapter in PEFT's layout under `dir` (`default` in
    /// `dir`, others in sub-folders), each folded to `prompt_embeddings`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for name in self.adapter_names() {
            self.save_adapter(&name, &adapter_dir(dir, &name))?;
        }
        Ok(())
    }

    /// Writes adapter `name` into `dir`, atomically per file.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let (config, encoder) = (self.config(name)?, self.encoder(name)?);
        save_prompt_adapter(
            dir,
            config,
            HostTensor::from_tensor(encoder.prompt_embeddings()),
            &self.copies(name),
        )
    }

    /// Loads a PEFT folder of this method as adapter `name` (folded),
    /// leaving the active adapter as it was (or making it active if none
    /// was).
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let (config, embeddings, rest) = load_prompt_adapter_parts(dir, E::PEFT_TYPES)?;
        let mut config = E::fit_config(config, &self.model.dims())?;
        config.inference_mode = true;
        let encoder = E::from_embeddings(&config, &embeddings, &self.device())?;
        self.insert(name, encoder, config)?;
        self.fill_copies(name, dir, rest)?;
        match self.active.clone() {
            None => self.set_adapter(name),
            Some(active) => self.set_adapter(&active),
        }
    }

    /// Writes adapter `name` into `dir` as a training checkpoint: PEFT's
    /// files, and beside them, when the encoder has a reparameterisation
    /// that PEFT's file folds away, its full state, from which
    /// [`resume`](Self::resume) continues.
    pub fn save_checkpoint(&self, name: &str, dir: &Path) -> Result<()> {
        let (config, encoder) = (self.config(name)?, self.encoder(name)?);
        encoder.save(dir, config)?;
        let copies = self.copies(name);
        if copies.is_empty() {
            return Ok(());
        }
        // PEFT's files again, now with the copies.
        let embeddings = HostTensor::from_tensor(encoder.prompt_embeddings());
        save_prompt_adapter(dir, config, embeddings, &copies)
    }

    /// Wraps `model` with the adapter folder `dir` as the active `default`,
    /// to continue training it: the full encoder when the folder keeps one
    /// ([`save_checkpoint`](Self::save_checkpoint)), else PEFT's folded
    /// `prompt_embeddings`, which then train directly.
    pub fn resume(model: M, dir: &Path) -> Result<Self> {
        let mut this = Self::wrap(model);
        let (config, _, rest) = load_prompt_adapter_parts(dir, E::PEFT_TYPES)?;
        let mut config = E::fit_config(config, &this.model.dims())?;
        config.inference_mode = true;
        let encoder = E::load_to_train(dir, &config, &this.device())?;
        this.insert(DEFAULT_ADAPTER, encoder, config)?;
        this.fill_copies(DEFAULT_ADAPTER, dir, rest)?;
        this.set_adapter(DEFAULT_ADAPTER)?;
        Ok(this)
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

/// One adapter at a time, as PEFT's prompt learning runs.
impl<B: Backend, M: PeftModel<B>, E: VirtualTokens<B>> AdapterHost for VirtualTokenModel<B, M, E> {
    fn adapter_names(&self) -> Vec<String> {
        VirtualTokenModel::adapter_names(self)
    }

    fn active_adapters(&self) -> Vec<String> {
        self.active_adapter()
            .map(str::to_string)
            .into_iter()
            .collect()
    }

    fn activate(&mut self, names: &[&str]) -> Result<()> {
        match names {
            [] => {
                self.active = None;
                Ok(())
            }
            [name] => self.set_adapter(name),
            _ => Err(PeftError::Config(format!(
                "{} run one at a time; asked for {}",
                E::WHAT,
                names.join(", ")
            ))),
        }
    }

    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        VirtualTokenModel::delete_adapter(self, name)
    }

    fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let active = self.active.clone();
        VirtualTokenModel::load_adapter(self, dir, name)?;
        self.active = active;
        Ok(())
    }

    fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        VirtualTokenModel::save_adapter(self, name, dir)
    }

    fn param_count(&self) -> ParamCount {
        VirtualTokenModel::param_count(self)
    }
}
