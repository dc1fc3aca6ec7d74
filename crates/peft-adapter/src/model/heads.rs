//! [`AdapterModel`]'s prediction heads (AdapterHub's flex heads): added,
//! loaded and saved beside the adapter of the same name, one of them
//! active, trained with the adapter being trained.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::io::{ensure_consumed, read_safetensors, serialize_safetensors, write_atomic};
use peft_core::model::device_of;
use peft_core::{PeftError, PeftModel, Result};

use super::{check_hidden_size, weights_file, AdapterModel, RequireGrad};
use crate::bottleneck::Setup;
use crate::config::read_json;
use crate::head::{
    head_meta, HeadConfig, HeadLogits, PredictionHead, SavedHead, HEAD_CONFIG_FILE,
    HEAD_PICKLE_FILE, HEAD_WEIGHTS_FILE,
};

impl<B: Backend, M: PeftModel<B>> AdapterModel<B, M> {
    /// Adds a fresh prediction head `name` (AdapterHub's
    /// `add_classification_head` / `add_tagging_head` with `config`) and
    /// makes it the active head. It trains when an adapter trains while it
    /// is active.
    pub fn add_head(&mut self, name: &str, config: HeadConfig) -> Result<()> {
        config.validate()?;
        if self.set.heads.index_of(name).is_some() {
            return Err(PeftError::DuplicateAdapter(format!("head {name}")));
        }
        let d = self.model.dims().d_model;
        let head = PredictionHead::new(&config, d, &device_of(&self.model))?;
        let train = self.is_training();
        self.set
            .heads
            .insert(name, head.map(&mut RequireGrad(false)), config)?;
        self.active_head = Some(name.to_string());
        if train {
            self.retrain();
        }
        Ok(())
    }

    fn is_training(&self) -> bool {
        !(self.trainable_adapters.is_empty() && self.trainable_fusions.is_empty())
    }

    /// Re-applies which parameters train (after the active head changed).
    fn retrain(&mut self) {
        let (a, f) = (
            self.trainable_adapters.clone(),
            self.trainable_fusions.clone(),
        );
        self.set_trainable(&a, &f);
    }

    /// Names of the heads, in the order added.
    pub fn head_names(&self) -> Vec<String> {
        self.set.heads.names()
    }

    /// The config of head `name`.
    pub fn head_config(&self, name: &str) -> Result<&HeadConfig> {
        Ok(self.set.heads.get(name)?.1)
    }

    /// The active head, if any.
    pub fn active_head(&self) -> Option<&str> {
        self.active_head.as_deref()
    }

    /// Sets the active head (`None`: [`forward_head`](Self::forward_head)
    /// refuses); a training head follows it.
    pub fn set_active_head(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            self.set.heads.find(n)?;
        }
        self.active_head = name.map(str::to_string);
        if self.is_training() {
            self.retrain();
        }
        Ok(())
    }

    /// Removes head `name`.
    pub fn delete_head(&mut self, name: &str) -> Result<()> {
        self.set.heads.remove(name)?;
        if self.active_head.as_deref() == Some(name) {
            self.active_head = None;
        }
        if self.trainable_head.as_deref() == Some(name) {
            self.trainable_head = None;
        }
        Ok(())
    }

    /// AdapterHub's `set_active_adapters`: the head named as the setup's
    /// adapter (the last one of a `Stack`) becomes active when it exists.
    pub(super) fn follow_head(&mut self, setup: &Setup) {
        let last = match setup {
            Setup::Stack(children) => children.last(),
            other => Some(other),
        };
        if let Some(Setup::Single(name)) = last {
            if self.set.heads.index_of(name).is_some() {
                self.active_head = Some(name.clone());
            }
        }
    }

    /// Writes head `name` as AdapterHub's `save_adapter(..., with_head=True,
    /// use_safetensors=True)` does: `model_head.safetensors`, then
    /// `head_config.json`, each atomically.
    pub fn save_head(&self, name: &str, dir: &Path) -> Result<()> {
        let (head, config) = self.set.heads.get(name)?;
        write_atomic(
            &dir.join(HEAD_WEIGHTS_FILE),
            &serialize_safetensors(&head.tensors(name), None),
        )?;
        let meta = head_meta(
            config,
            name,
            self.model.dims().d_model,
            self.model.model_type(),
        );
        let text = serde_json::to_string_pretty(&meta).expect("JSON values serialise");
        write_atomic(&dir.join(HEAD_CONFIG_FILE), text.as_bytes())
    }

    /// Loads the head saved in `dir` (`head_config.json` +
    /// `model_head.safetensors`) as `name`, replacing a head of that name
    /// (AdapterHub's `load_adapter(..., with_head=True)`). As there, loading
    /// activates nothing: [`set_active`](Self::set_active) of its adapter
    /// (or [`set_active_head`](Self::set_active_head)) does. On error
    /// nothing changes.
    pub fn load_head(&mut self, dir: &Path, name: &str) -> Result<()> {
        let config_path = dir.join(HEAD_CONFIG_FILE);
        let meta = read_json(&config_path)?;
        check_hidden_size(&meta, self.model.dims().d_model, &config_path)?;
        let saved = SavedHead::from_meta(&meta, &config_path)?;
        let file = weights_file(dir, HEAD_WEIGHTS_FILE, HEAD_PICKLE_FILE)?;
        let mut tensors = saved.rename(read_safetensors(&file)?);
        for (k, t) in &tensors {
            t.check_finite(k, &file)?;
        }
        let d = self.model.dims().d_model;
        let device = device_of(&self.model);
        let head = PredictionHead::from_tensors(
            &saved.config,
            d,
            &saved.name,
            &mut tensors,
            &file,
            &device,
        )?;
        ensure_consumed(tensors, &file)?;
        let was_active = self.active_head.as_deref() == Some(name);
        if self.set.heads.index_of(name).is_some() {
            self.delete_head(name)?;
        }
        self.set
            .heads
            .insert(name, head.map(&mut RequireGrad(false)), saved.config)?;
        if was_active {
            self.active_head = Some(name.to_string());
        }
        if self.is_training() {
            self.retrain();
        }
        Ok(())
    }
}

impl<B, M> AdapterModel<B, M>
where
    B: Backend,
    M: PeftModel<B, Output = Tensor<B, 3>>,
{
    /// The active head's logits for `ids: [b, t]` through the active setup
    /// (AdapterHub's forward of a flex-head model). A head reading the
    /// pooled output asks the model for it
    /// ([`PeftModel::pooled_output`]). A `Parallel` setup (one head per
    /// channel in AdapterHub) is refused.
    pub fn forward_head(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<HeadLogits<B>> {
        let name = self.active_head.as_deref().ok_or_else(|| {
            PeftError::State(format!(
                "no active prediction head (heads: {:?})",
                self.head_names()
            ))
        })?;
        if let Some(setup) = &self.setup {
            if setup.parallel_channels()?.is_some() {
                return Err(PeftError::Config(
                    "a Parallel setup needs one head per channel; run one setup at a time".into(),
                ));
            }
        }
        let (head, _) = self.set.heads.get(name)?;
        let hidden = self.forward(ids, attention_mask)?;
        let pooled = match head.reads_pooler() {
            true => Some(self.model.pooled_output(hidden.clone()).ok_or_else(|| {
                PeftError::Config(format!(
                    "head `{name}` reads the pooled output (`use_pooler`) and this model has no pooler"
                ))
            })?),
            false => None,
        };
        head.forward(hidden, pooled)
    }
}
