//! [`SlotModel`]: the one wrapper for every method whose adapters live in
//! the model's linear slots (LoRA and its variants, (IA)³). It owns the
//! named adapters' configs, activation, disabling, merging, deletion,
//! mixed-batch routing and PEFT's two files; a method says only what is its
//! own through [`SlotMethod`].
//!
//! Every method's adapters may keep trainable full copies of layers beside
//! their entries (PEFT's `modules_to_save`: a classifier head), switched,
//! merged and saved with them (`crate::modules_to_save`).
//!
//! Two methods in one model: `SlotModel<B, M, (Lora, Ia3)>` holds adapters
//! of both kinds (`OneOf` configs). Any of them
//! can be active at once: an (IA)³ vector scales the base path, LoRA deltas
//! add on top.

use std::marker::PhantomData;
use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use indexmap::IndexMap;

use crate::error::{PeftError, Result};
use crate::host::AdapterHost;
use crate::io::{
    adapter_dir, adapter_subdirs, ensure_consumed, read_safetensors, write_adapter_files,
    HostTensor,
};
use crate::model::PeftModel;
use crate::modules_to_save::{
    attach_copy, check_one_copy_active, copy_plan, read_copy, tied_head_of_copy, token_plan,
    write_copy,
};
use crate::slot::method::{AdapterConfig, Init, SlotMethod};
use crate::slot::{ModuleCopyEntry, NormCopyRole, TOKENS_BESIDE_KEY, TOKENS_KEY};
use crate::{routing, ParamCount, BASE_ROW, DEFAULT_ADAPTER};

pub use crate::io::{CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE};

/// A model carrying named adapters of method `K` in its linear slots.
///
/// A Burn module: train it (or the wrapped `model`) with any Burn optimizer;
/// only the active adapters' parameters receive gradients, and its
/// inference copy (`AutodiffModule::valid`) keeps the adapters' configs, so
/// it saves as it is.
#[derive(Module, Debug)]
pub struct SlotModel<B: Backend, M, K: SlotMethod> {
    /// The model, its slots carrying the adapters.
    pub model: M,
    /// Each adapter's config (targets filled in), in the order added.
    #[module(skip)]
    configs: IndexMap<String, K::Config>,
    /// The active adapters, in activation order.
    active: Vec<String>,
    /// Whether every unmerged adapter is bypassed.
    disabled: bool,
    /// The method (a marker).
    #[module(skip)]
    method: K,
    _backend: PhantomData<B>,
}

impl<B: Backend, M: PeftModel<B>, K: SlotMethod> SlotModel<B, M, K> {
    /// Wraps `model` and attaches `config` as the adapter `default`.
    pub fn new(model: M, config: K::Config) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.add_adapter(DEFAULT_ADAPTER, config)?;
        Ok(this)
    }

    /// Wraps `model` with no adapter. Every parameter of the model is frozen.
    pub fn wrap(model: M) -> Self {
        SlotModel {
            model: model.no_grad(),
            configs: IndexMap::new(),
            active: Vec::new(),
            disabled: false,
            method: K::default(),
            _backend: PhantomData,
        }
    }

    /// The same adapters (configs, activation) around another model that
    /// carries them, e.g. the inference copy of a trained model
    /// (`AutodiffModule::valid`), to save it.
    pub fn with_model<B2: Backend, M2: PeftModel<B2>>(&self, model: M2) -> SlotModel<B2, M2, K> {
        SlotModel {
            model,
            configs: self.configs.clone(),
            active: self.active.clone(),
            disabled: self.disabled,
            method: K::default(),
            _backend: PhantomData,
        }
    }

    /// Adds adapter `name` per `config` (freshly initialised) and makes it the
    /// only active adapter, as PEFT's `add_adapter` + `set_adapter` would.
    pub fn add_adapter(&mut self, name: &str, config: K::Config) -> Result<()> {
        self.attach(name, config, Init::Fresh)?;
        self.set_adapter(&[name])
    }

    /// Attaches entries for `name` on every slot `config` targets, started
    /// per `init`, without activating them. Returns the adapted paths. On
    /// error no entry of `name` is left behind.
    pub fn attach(&mut self, name: &str, mut config: K::Config, init: Init) -> Result<Vec<String>> {
        config.prepare(self.model.model_type())?;
        if self.configs.contains_key(name) {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        if name == BASE_ROW {
            return Err(PeftError::Config(format!("`{BASE_ROW}` is reserved")));
        }
        for existing in self.configs.values() {
            config.check_beside(existing)?;
        }
        let outputs = self.model.output_layers();
        let paths = self.model.linear_paths();
        let norms = self.model.norm_paths();
        let embeddings = self.model.embedding_paths();
        // A method adapts linear layers, or norm layers (LN tuning), or
        // rows of embedding tables (trainable tokens).
        let adapts_norms = config.norm_copy_key().is_some();
        let rows = config.token_rows();
        let candidates = match (adapts_norms, rows.is_some()) {
            (true, _) => &norms,
            (false, true) => &embeddings,
            (false, false) => &paths,
        };
        let mut targets = Vec::new();
        for path in candidates {
            if config.targets(path, &outputs)? {
                targets.push(path.clone());
            }
        }
        if targets.is_empty() {
            return Err(PeftError::NoTargetMatched {
                targets: config.target_rule(),
                available: candidates.clone(),
            });
        }
        let (mut plan, mut norm_plan, mut table_plan) = (Vec::new(), Vec::new(), Vec::new());
        match (adapts_norms, rows.is_some()) {
            (true, _) => norm_plan = targets,
            (false, true) => table_plan = targets,
            (false, false) => plan = targets,
        }
        let targeted: Vec<String> = plan
            .iter()
            .chain(&norm_plan)
            .chain(&table_plan)
            .cloned()
            .collect();
        let saved = copy_plan(
            config.modules_to_save(),
            &paths,
            &norms,
            &embeddings,
            &targeted,
        )?;
        let head = self.model.tied_head_path().map(str::to_string);
        // Rows of the method's own (trainable tokens) or beside it (LoRA's
        // trainable_token_indices), saved under different keys.
        let (tokens, key, random) = match rows {
            Some(r) => {
                let own = table_plan.iter().map(|p| (p.clone(), r.ids.to_vec()));
                (own.collect(), TOKENS_KEY, r.random)
            }
            None => {
                let beside = token_plan(
                    config.trainable_tokens(),
                    &embeddings,
                    head.as_deref(),
                    &saved.embeddings,
                )?;
                (beside, TOKENS_BESIDE_KEY, false)
            }
        };
        let mut dims = Vec::with_capacity(plan.len());
        let mut next = plan.iter().peekable();
        self.model.visit_linears(&mut |path, slot| {
            if next.next_if(|p| *p == path).is_some() {
                dims.push((slot.d_input(), slot.d_output()));
            }
        });
        K::prepare_shared(&mut config, &dims)?;
        let mut result = Ok(());
        let mut next = plan.iter().peekable();
        self.model.visit_linears_mut(&mut |path, slot| {
            if next.next_if(|p| *p == path).is_some() && result.is_ok() {
                result = K::attach(&config, slot, path, name, init);
            }
            if saved.linears.iter().any(|c| c == path) && result.is_ok() {
                result = attach_copy(slot, path, name);
            }
        });
        let tuned = config.norm_copy_key().map(NormCopyRole::Tuned);
        self.model.visit_norms_mut(&mut |path, slot| {
            let role = match (norm_plan.iter().any(|p| p == path), tuned) {
                (true, Some(role)) => Some(role),
                _ if saved.norms.iter().any(|p| p == path) => Some(NormCopyRole::Saved),
                _ => None,
            };
            if let (Some(role), true) = (role, result.is_ok()) {
                result = slot.add_copy(name, role);
            }
        });
        let ties = config.ensure_weight_tying();
        self.model.visit_embeddings_mut(&mut |path, slot| {
            if result.is_ok() && saved.embeddings.iter().any(|p| p == path) {
                result = slot.add_saved(name, tied_head_of_copy(ties, head.as_deref(), path));
            }
            if let (Some((_, ids)), true) = (tokens.iter().find(|(p, _)| p == path), result.is_ok())
            {
                result = slot.add_tokens(name, path, ids, key, random);
            }
        });
        if let Err(e) = result {
            remove_everywhere(&mut self.model, name);
            return Err(e);
        }
        self.configs.insert(name.to_string(), config);
        Ok(plan
            .into_iter()
            .chain(norm_plan)
            .chain(table_plan)
            .collect())
    }

    /// Names of all adapters, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.keys().cloned().collect()
    }

    /// The config of adapter `name` (targets filled in).
    pub fn config(&self, name: &str) -> Result<&K::Config> {
        self.configs
            .get(name)
            .ok_or_else(|| PeftError::UnknownAdapter {
                name: name.to_string(),
                available: self.adapter_names(),
            })
    }

    /// The config of adapter `name`, mutably: for what training learns
    /// about the adapter (AdaLoRA's `rank_pattern`, saved with it).
    /// Changing its targets re-attaches nothing.
    pub fn config_mut(&mut self, name: &str) -> Result<&mut K::Config> {
        let available = self.adapter_names();
        self.configs
            .get_mut(name)
            .ok_or_else(|| PeftError::UnknownAdapter {
                name: name.to_string(),
                available,
            })
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Activates `names` (one or several: LoRA deltas add up, (IA)³ vectors
    /// multiply; at most one of them may keep a copy of a given layer, as in
    /// PEFT). Only active adapters train.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.config(n)?;
        }
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut refused = Ok(());
        self.model.visit_linears(&mut |path, slot| {
            if refused.is_ok() {
                refused = check_one_copy_active(slot, path, &names);
            }
        });
        self.model.visit_norms(&mut |path, slot| {
            if refused.is_ok() {
                refused = slot.check_one_active(&names, path);
            }
        });
        self.model.visit_embeddings(&mut |path, slot| {
            if refused.is_ok() {
                refused = slot.check_together(&names, path);
            }
        });
        refused?;
        self.model
            .visit_linears_mut(&mut |_, slot| slot.set_active(&names));
        self.model
            .visit_norms_mut(&mut |_, slot| slot.set_active(&names));
        self.model
            .visit_embeddings_mut(&mut |_, slot| slot.set_active(&names));
        self.active = names;
        Ok(())
    }

    /// Removes adapter `name` everywhere (unmerging it first if merged).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.config(name)?;
        remove_everywhere(&mut self.model, name);
        self.configs.shift_remove(name);
        self.active.retain(|n| n != name);
        Ok(())
    }

    /// Bypasses every unmerged adapter: the model computes its base output.
    /// Fails while adapters are merged (their effect is in the base weights).
    pub fn disable_adapters(&mut self) -> Result<()> {
        if self.any_merged() {
            return Err(PeftError::State(
                "cannot disable adapters while some are merged; unmerge first".into(),
            ));
        }
        self.set_disabled(true);
        Ok(())
    }

    /// Undoes [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) {
        self.set_disabled(false);
    }

    fn set_disabled(&mut self, disabled: bool) {
        self.model
            .visit_linears_mut(&mut |_, slot| slot.state.disabled = disabled);
        self.model
            .visit_norms_mut(&mut |_, slot| slot.state.disabled = disabled);
        self.model
            .visit_embeddings_mut(&mut |_, slot| slot.state.disabled = disabled);
        self.disabled = disabled;
    }

    /// Whether adapters are disabled.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Whether any adapter is merged into its base weights.
    pub fn any_merged(&self) -> bool {
        let mut merged = false;
        self.model
            .visit_linears(&mut |_, s| merged |= s.any_merged());
        self.model.visit_norms(&mut |_, s| merged |= s.any_merged());
        self.model
            .visit_embeddings(&mut |_, s| merged |= s.any_merged());
        merged
    }

    /// Folds the active adapters into the base weights. Afterwards the
    /// forward pass is exactly the base computation on the merged weights.
    pub fn merge_adapter(&mut self) -> Result<()> {
        let names = self.active.clone();
        self.merge(&names)
    }

    /// Folds the named adapters into the base weights, in order. An
    /// adapter whose merge could not be undone (an OFT adapter with a
    /// singular rotation) is an error naming its layer, and nothing merges.
    pub fn merge(&mut self, names: &[String]) -> Result<()> {
        for n in names {
            self.config(n)?;
        }
        let mut refused = None;
        self.model.visit_linears(&mut |path, slot| {
            for n in names {
                if refused.is_none() {
                    refused = slot.check_merge(n, path).err();
                }
            }
        });
        self.model.visit_norms(&mut |path, slot| {
            let here: Vec<&String> = names.iter().filter(|n| slot.copy(n).is_some()).collect();
            if refused.is_none() && here.len() > 1 {
                refused = Some(PeftError::State(format!(
                    "{path}: trying to merge {} adapters ({here:?}), but LN tuning does not allow \
                     merging more than one adapter at a time",
                    here.len()
                )));
            }
        });
        self.model.visit_embeddings(&mut |path, slot| {
            if refused.is_none() {
                refused = slot.check_together(names, path).err();
            }
        });
        if let Some(e) = refused {
            return Err(e);
        }
        let mut failed = None;
        self.model.visit_linears_mut(&mut |_, slot| {
            for n in names {
                if let Err(e) = slot.merge(n) {
                    failed.get_or_insert(e);
                }
            }
        });
        self.model.visit_norms_mut(&mut |_, slot| {
            for n in names {
                slot.merge(n);
            }
        });
        self.model.visit_embeddings_mut(&mut |_, slot| {
            for n in names {
                slot.merge(n);
            }
        });
        failed.map_or(Ok(()), Err)
    }

    /// Takes every merged adapter back out of the base weights, newest merge
    /// first, so that several merged adapters restore exactly (an (IA)³
    /// vector is divided out by `l + 1e-8`, as PEFT does).
    pub fn unmerge_adapter(&mut self) {
        let names = self.adapter_names();
        self.model
            .visit_linears_mut(&mut |_, slot| slot.unmerge_newest_first(&names));
        self.model.visit_norms_mut(&mut |_, slot| {
            slot.unmerge();
        });
        self.model.visit_embeddings_mut(&mut |_, slot| {
            slot.unmerge();
        });
    }

    /// Merges the active adapters and removes all adapters: the plain model,
    /// with `W' = W + ΔW` (LoRA) or `W ⊙ l` ((IA)³), and the active
    /// adapter's copies (`modules_to_save`, LN tuning's norms) in place of
    /// their layers.
    pub fn merge_and_unload(mut self) -> Result<M> {
        self.merge_adapter()?;
        self.strip();
        Ok(self.model)
    }

    /// Removes all adapters without merging: the base model, except that
    /// the active adapter's copies (`modules_to_save`: a trained head) take
    /// the place of their layers, as PEFT's `unload` leaves them (LN
    /// tuning's copies of norm layers do not: PEFT's `unload` gives the
    /// base norm back).
    pub fn unload(mut self) -> M {
        self.unmerge_adapter();
        let active = self.active.clone();
        self.model.visit_linears_mut(&mut |_, slot| {
            for n in &active {
                if slot.entry::<ModuleCopyEntry<B>>(n).is_some() {
                    // A copy's merge is a swap: never refused.
                    let _ = slot.merge(n);
                }
            }
        });
        self.model.visit_norms_mut(&mut |_, slot| {
            for n in &active {
                if slot.copy(n).is_some_and(|c| c.role == NormCopyRole::Saved) {
                    slot.merge(n);
                }
            }
        });
        self.model.visit_embeddings_mut(&mut |_, slot| {
            for n in &active {
                if slot.copy(n).is_some_and(|c| c.kind.is_full()) {
                    slot.merge(n);
                }
            }
        });
        self.strip();
        self.model
    }

    /// Removes every entry of this method, every copy of a layer, and the
    /// routing state.
    fn strip(&mut self) {
        self.model.visit_linears_mut(&mut |_, slot| {
            K::clear(slot);
            slot.remove_all::<ModuleCopyEntry<B>>();
            slot.state = Default::default();
        });
        self.model.visit_norms_mut(&mut |_, slot| slot.clear());
        self.model.visit_embeddings_mut(&mut |_, slot| slot.clear());
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
        if names.len() != batch_size {
            return Err(PeftError::Shape {
                name: "adapter_names".into(),
                expected: vec![batch_size],
                found: vec![names.len()],
            });
        }
        for n in names.iter().filter(|n| **n != BASE_ROW) {
            self.config(n)?;
        }
        if self.any_merged() {
            return Err(PeftError::State(
                "cannot route rows to adapters while adapters are merged; unmerge first".into(),
            ));
        }
        let owned: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        Ok(routing::with_row_adapters(&owned, || f(&self.model)))
    }

    /// The tensors of adapter `name` under PEFT's keys, in PEFT's layout.
    pub fn adapter_tensors(&self, name: &str) -> Result<Vec<(String, HostTensor)>> {
        let config = self.config(name)?;
        let mut tensors = Vec::new();
        self.model.visit_linears(&mut |path, slot| {
            K::write_tensors(config, slot, path, name, &mut tensors);
            write_copy(slot, KEY_PREFIX, path, name, &mut tensors);
        });
        self.model
            .visit_norms(&mut |path, slot| slot.write_copy(path, name, &mut tensors));
        let head = self.model.tied_head_path();
        self.model.visit_embeddings(&mut |path, slot| {
            slot.write_copy(path, head, name, &mut tensors);
        });
        K::write_shared(config, &mut tensors);
        Ok(tensors)
    }

    /// Writes every adapter in PEFT's layout under `dir` (`default` in the
    /// folder itself, others in sub-folders). Each file is written atomically
    /// (temporary file, fsync, rename): a crash leaves the previous file or
    /// the new one, never a torn one.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for name in self.adapter_names() {
            self.save_adapter(&name, &adapter_dir(dir, &name))?;
        }
        Ok(())
    }

    /// Writes adapter `name` into `dir`: the weights first, then the config,
    /// so a config on disk always has its weights beside it.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let config = self.config(name)?.saved_json();
        write_adapter_files(dir, &self.adapter_tensors(name)?, &config)
    }

    /// Loads a PEFT adapter folder as adapter `name`, inactive unless
    /// activated later (the other adapters keep their activation). Every
    /// tensor must fit a targeted module and every targeted module must find
    /// its tensors; on error the model is left as it was.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let config = K::Config::read(&dir.join(CONFIG_FILE))?;
        let file = dir.join(WEIGHTS_FILE);
        let mut tensors = read_safetensors(&file)?;
        for (k, t) in &tensors {
            t.check_finite(k, &file)?;
        }
        let paths = self.attach(name, config, Init::Placeholder)?;
        let shared = K::read_shared(&mut self.configs[name], &mut tensors, &file);
        let config = &self.configs[name];
        let mut filled = shared;
        let mut next = paths.iter().peekable();
        self.model.visit_linears_mut(&mut |path, slot| {
            if next.next_if(|p| *p == path).is_some() && filled.is_ok() {
                filled = K::read_tensors(config, slot, path, name, &mut tensors, &file);
            }
            if filled.is_ok() {
                filled = read_copy(slot, KEY_PREFIX, path, name, &mut tensors, &file);
            }
        });
        self.model.visit_norms_mut(&mut |path, slot| {
            if filled.is_ok() {
                filled = slot.read_copy(path, name, &mut tensors, &file);
            }
        });
        let head = self.model.tied_head_path().map(str::to_string);
        self.model.visit_embeddings_mut(&mut |path, slot| {
            if filled.is_ok() {
                filled = slot.read_copy(path, head.as_deref(), name, &mut tensors, &file);
            }
        });
        let outcome = filled.and_then(|()| ensure_consumed(tensors, &file));
        if outcome.is_err() {
            self.delete_adapter(name)?;
        }
        let active = self.active.clone();
        let refs: Vec<&str> = active.iter().map(String::as_str).collect();
        self.set_adapter(&refs)?;
        outcome
    }

    /// Wraps `model` and loads the PEFT adapter folder `dir` as `default`,
    /// plus every sub-folder holding an adapter, under the sub-folder's name.
    /// `default` is active.
    pub fn from_pretrained(model: M, dir: &Path) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.load_adapter(dir, DEFAULT_ADAPTER)?;
        for (name, sub) in adapter_subdirs(dir)? {
            this.load_adapter(&sub, &name)?;
        }
        this.set_adapter(&[DEFAULT_ADAPTER])?;
        Ok(this)
    }
}

/// Removes entry `name` (of any kind) from every slot, unmerging it first.
fn remove_everywhere<B: Backend, M: PeftModel<B>>(model: &mut M, name: &str) {
    model.visit_linears_mut(&mut |_, slot| {
        slot.remove(name);
    });
    model.visit_norms_mut(&mut |_, slot| {
        slot.remove(name);
    });
    model.visit_embeddings_mut(&mut |_, slot| {
        slot.remove(name);
    });
}

/// Several adapters may be active at once (their effects compose in
/// activation order).
impl<B: Backend, M: PeftModel<B>, K: SlotMethod> AdapterHost for SlotModel<B, M, K> {
    fn adapter_names(&self) -> Vec<String> {
        SlotModel::adapter_names(self)
    }

    fn active_adapters(&self) -> Vec<String> {
        SlotModel::active_adapters(self).to_vec()
    }

    fn activate(&mut self, names: &[&str]) -> Result<()> {
        self.set_adapter(names)
    }

    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        SlotModel::delete_adapter(self, name)
    }

    fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        SlotModel::load_adapter(self, dir, name)
    }

    fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        SlotModel::save_adapter(self, name, dir)
    }

    fn param_count(&self) -> ParamCount {
        SlotModel::param_count(self)
    }
}
