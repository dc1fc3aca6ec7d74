//! [`Ia3Model`]: (IA)³ as PEFT defines it — a learned vector per targeted
//! linear layer that scales its output (bias included) or, for feed-forward
//! targets, its input. The vectors live in the model's
//! [`LinearSlot`]s beside any LoRA entries; this type injects, activates,
//! merges and saves them.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use indexmap::IndexMap;
use peft_core::io::{
    adapter_dir, adapter_subdirs, ensure_consumed, read_safetensors, take_tensor, HostTensor,
};
use peft_core::target::targets_match;
use peft_core::{
    linear_adapters, Ia3Config, Ia3Entry, Ia3Meta, LinearSlot, ParamCount, PeftError, PeftModel,
    Result, BASE_ROW, DEFAULT_ADAPTER,
};

pub use peft_core::linear_adapters::{CONFIG_FILE, WEIGHTS_FILE};
const KEY_PREFIX: &str = "base_model.model.";

/// A model carrying named (IA)³ adapters.
///
/// The wrapped model stays a plain Burn module (`model`): train it with any
/// Burn optimizer; only the active vectors receive gradients.
#[derive(Debug, Clone)]
pub struct Ia3Model<B: Backend, M: PeftModel<B>> {
    /// The model, its slots carrying the vectors.
    pub model: M,
    configs: IndexMap<String, Ia3Config>,
    active: Vec<String>,
    disabled: bool,
    _backend: PhantomData<B>,
}

impl<B: Backend, M: PeftModel<B>> Ia3Model<B, M> {
    /// Wraps `model` and attaches `config` as the adapter `default`.
    pub fn new(model: M, config: Ia3Config) -> Result<Self> {
        let mut this = Self::wrap(model);
        this.add_adapter(DEFAULT_ADAPTER, config)?;
        Ok(this)
    }

    /// Wraps `model` with no adapter. Every parameter of the model is frozen.
    pub fn wrap(model: M) -> Self {
        Ia3Model {
            model: model.no_grad(),
            configs: IndexMap::new(),
            active: Vec::new(),
            disabled: false,
            _backend: PhantomData,
        }
    }

    /// The same adapters (configs, activation) around another model that
    /// carries them, e.g. the inference copy of a trained model, to save it.
    pub fn with_model<B2: Backend, M2: PeftModel<B2>>(&self, model: M2) -> Ia3Model<B2, M2> {
        Ia3Model {
            model,
            configs: self.configs.clone(),
            active: self.active.clone(),
            disabled: self.disabled,
            _backend: PhantomData,
        }
    }

    /// Adds adapter `name` per `config` and makes it the only active one.
    /// Unset targets take PEFT's defaults for the model's type.
    pub fn add_adapter(&mut self, name: &str, config: Ia3Config) -> Result<()> {
        self.inject(name, config, false)?;
        self.set_adapter(&[name])
    }

    /// Attaches a vector for `name` on every slot `config` targets (ones, or
    /// N(0, 1) with `init_ia3_weights = false`; `for_loading`: ones, to be
    /// overwritten). Returns the adapted paths.
    fn inject(
        &mut self,
        name: &str,
        mut config: Ia3Config,
        for_loading: bool,
    ) -> Result<Vec<String>> {
        config.fill_defaults(self.model.model_type())?;
        if self.configs.contains_key(name) {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        if name == BASE_ROW {
            return Err(PeftError::Config(format!("`{BASE_ROW}` is reserved")));
        }
        let outputs = self.model.output_layers();
        let paths = self.model.linear_paths();
        let mut plan = Vec::new();
        for path in &paths {
            let hit = targets_match(
                config.target_modules.as_ref(),
                config.exclude_modules.as_ref(),
                None,
                None,
                path,
                &outputs,
            )?;
            if hit {
                plan.push((path.clone(), config.is_feedforward(path)?));
            }
        }
        if plan.is_empty() {
            return Err(PeftError::NoTargetMatched {
                targets: serde_json::to_string(&config.target_modules)
                    .unwrap_or_else(|_| "?".into()),
                available: paths,
            });
        }
        let random = !config.init_ia3_weights && !for_loading;
        let mut result = Ok(());
        let mut next = plan.iter().peekable();
        self.model.visit_linears_mut(&mut |path, slot| {
            let Some((_, feedforward)) = next.next_if(|(p, _)| p == path) else {
                return;
            };
            if result.is_ok() {
                result = slot.add_ia3(new_entry(slot, name, *feedforward, random), path);
            }
        });
        result?;
        self.configs.insert(name.to_string(), config);
        Ok(plan.into_iter().map(|(p, _)| p).collect())
    }

    /// Names of all adapters, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.keys().cloned().collect()
    }

    /// The config of adapter `name` (targets filled in).
    pub fn config(&self, name: &str) -> Result<&Ia3Config> {
        self.configs
            .get(name)
            .ok_or_else(|| PeftError::UnknownAdapter {
                name: name.to_string(),
                available: self.adapter_names(),
            })
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Activates `names`; on a layer carrying several, their vectors
    /// multiply (PEFT's rule). Only active vectors train.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.config(n)?;
        }
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        linear_adapters::set_active(&mut self.model, &names);
        self.active = names;
        Ok(())
    }

    /// Removes adapter `name` everywhere (dividing it out first if merged).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.config(name)?;
        linear_adapters::remove(&mut self.model, name);
        self.configs.shift_remove(name);
        self.active.retain(|n| n != name);
        Ok(())
    }

    /// Bypasses every vector: the model computes its base output. Fails
    /// while vectors are merged (unmerge first).
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

    /// Folds the active vectors into the base weights (and, for output
    /// scaling, the biases): `W' = W ⊙ l`.
    pub fn merge_adapter(&mut self) -> Result<()> {
        linear_adapters::merge(&mut self.model, &self.active);
        Ok(())
    }

    /// Divides every merged vector back out, by `l + 1e-8` as PEFT does
    /// (PEFT warns that this is inexact; so is ours, identically).
    pub fn unmerge_adapter(&mut self) {
        let names: Vec<String> = self.configs.keys().rev().cloned().collect();
        linear_adapters::unmerge(&mut self.model, &names);
    }

    /// Merges the active vectors and removes all adapters: the plain model.
    pub fn merge_and_unload(mut self) -> Result<M> {
        self.merge_adapter()?;
        self.strip();
        Ok(self.model)
    }

    /// Removes all adapters without merging: the base model.
    pub fn unload(mut self) -> M {
        self.unmerge_adapter();
        self.strip();
        self.model
    }

    fn strip(&mut self) {
        self.model.visit_linears_mut(&mut |_, slot| {
            slot.ia3.clear();
            slot.state = Default::default();
        });
    }

    /// Trainable and total parameters (PEFT's `get_nb_trainable_parameters`).
    pub fn param_count(&self) -> ParamCount {
        self.model.param_count()
    }

    /// Mixed-batch inference: runs `f` (the model's forward pass on a batch
    /// of `batch_size` rows) with row `i` scaled by adapter `names[i]`'s
    /// vectors (`__base__` for none). Merged vectors are not allowed.
    pub fn forward_mixed<R>(
        &self,
        names: &[&str],
        batch_size: usize,
        f: impl FnOnce(&M) -> R,
    ) -> Result<R> {
        let known = |n: &str| self.config(n).map(|_| ());
        linear_adapters::route_rows(&self.model, names, batch_size, known, f)
    }

    /// The tensors of adapter `name` under PEFT's keys and shapes:
    /// `base_model.model.<path>.ia3_l`, `[out, 1]` or `[1, in]` (feed-forward).
    pub fn adapter_tensors(&self, name: &str) -> Result<Vec<(String, HostTensor)>> {
        self.config(name)?;
        let mut tensors = Vec::new();
        self.model.visit_linears(&mut |path, slot| {
            if let Some(e) = slot.ia3_entry(name) {
                let mut t = HostTensor::from_tensor(e.scale.val());
                let n = t.shape[0];
                t.shape = if e.meta.feedforward {
                    vec![1, n]
                } else {
                    vec![n, 1]
                };
                tensors.push((format!("{KEY_PREFIX}{path}.ia3_l"), t));
            }
        });
        Ok(tensors)
    }

    /// Writes every adapter in PEFT's layout under `dir` (`default` in the
    /// folder itself, others in sub-folders), each file atomically.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for name in self.adapter_names() {
            self.save_adapter(&name, &adapter_dir(dir, &name))?;
        }
        Ok(())
    }

    /// Writes adapter `name` (weights, then config) into `dir`.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let mut config = self.config(name)?.clone();
        config.inference_mode = true;
        let tensors = self.adapter_tensors(name)?;
        linear_adapters::write_adapter_files(dir, &tensors, &config.to_json_string())
    }

    /// Loads a PEFT (IA)³ folder as adapter `name` (inactive unless it is the
    /// first). Every tensor must fit a targeted module and every targeted
    /// module must find its tensor; on error the model is left unchanged.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let config = Ia3Config::from_file(&dir.join(CONFIG_FILE))?;
        let file = dir.join(WEIGHTS_FILE);
        let mut tensors = read_safetensors(&file)?;
        for (k, t) in &tensors {
            t.check_finite(k, &file)?;
        }
        let paths = self.inject(name, config, true)?;
        let mut filled = Ok(());
        self.model.visit_linears_mut(&mut |path, slot| {
            if filled.is_ok() && paths.iter().any(|p| p == path) {
                filled = fill_entry(slot, name, path, &mut tensors, &file);
            }
        });
        let outcome = filled.and_then(|()| ensure_consumed(tensors, &file));
        if outcome.is_err() {
            self.delete_adapter(name)?;
        }
        let active: Vec<String> = self.active.clone();
        let refs: Vec<&str> = active.iter().map(String::as_str).collect();
        self.set_adapter(&refs)?;
        outcome
    }

    /// Wraps `model` and loads `dir` as `default` plus every sub-folder
    /// holding an adapter under its name; `default` is active.
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

fn new_entry<B: Backend>(
    slot: &LinearSlot<B>,
    name: &str,
    feedforward: bool,
    random: bool,
) -> Ia3Entry<B> {
    let device = slot.device();
    let n = if feedforward {
        slot.d_input()
    } else {
        slot.d_output()
    };
    let scale = match random {
        true => Tensor::random([n], Distribution::Normal(0.0, 1.0), &device),
        false => Tensor::ones([n], &device),
    };
    Ia3Entry {
        scale: Param::from_tensor(scale),
        meta: Ia3Meta {
            name: name.to_string(),
            feedforward,
            merged: false,
        },
    }
}

/// Moves the file's `ia3_l` for `path` into entry `name` of `slot`,
/// checking PEFT's `[out, 1]` / `[1, in]` shape.
fn fill_entry<B: Backend>(
    slot: &mut LinearSlot<B>,
    name: &str,
    path: &str,
    tensors: &mut HashMap<String, HostTensor>,
    file: &Path,
) -> Result<()> {
    let device = slot.device();
    let (d_in, d_out) = (slot.d_input(), slot.d_output());
    let entry = slot.ia3_entry_mut(name).expect("injected before filling");
    let key = format!("{KEY_PREFIX}{path}.ia3_l");
    let mut t = take_tensor(tensors, &key, file)?;
    let (expected, n) = match entry.meta.feedforward {
        true => (vec![1, d_in], d_in),
        false => (vec![d_out, 1], d_out),
    };
    if t.shape != expected {
        return Err(PeftError::Shape {
            name: key,
            expected,
            found: t.shape,
        });
    }
    t.shape = vec![n];
    entry.scale = Param::from_tensor(t.to_tensor([n], &key, &device)?);
    Ok(())
}
