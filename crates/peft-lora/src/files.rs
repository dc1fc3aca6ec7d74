//! PEFT's adapter files: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.<module path>.lora_A.weight` (`[r, in]`),
//! `.lora_B.weight` (`[out, r]`) and, for DoRA, `.lora_magnitude_vector`
//! (`[out]`), with the adapter name stripped. The adapter `default` lives in
//! the folder itself, any other adapter in `<folder>/<name>/`. The
//! transposes to Burn's `[in, r]` / `[r, out]` happen here and only here.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use peft_core::io::{adapter_dir, adapter_subdirs, ensure_consumed, read_safetensors, HostTensor};
use peft_core::{
    linear_adapters, LinearSlot, LoraConfig, PeftError, PeftModel, Result, DEFAULT_ADAPTER,
};

use crate::LoraModel;

pub use peft_core::linear_adapters::{CONFIG_FILE, WEIGHTS_FILE};
const PREFIX: &str = "base_model.model.";

impl<B: Backend, M: PeftModel<B>> LoraModel<B, M> {
    /// Writes every adapter in PEFT's layout under `dir`. Each file is written
    /// atomically (temporary file, fsync, rename): a crash leaves the previous
    /// file or the new one, never a torn one.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for name in self.adapter_names() {
            self.save_adapter(&name, &adapter_dir(dir, &name))?;
        }
        Ok(())
    }

    /// The tensors of adapter `name` under PEFT's keys, in PEFT's layout.
    pub fn adapter_tensors(&self, name: &str) -> Result<Vec<(String, HostTensor)>> {
        self.config(name)?;
        let mut tensors = Vec::new();
        self.model.visit_linears(&mut |path, slot| {
            if let Some(e) = slot.lora_entry(name) {
                let key = format!("{PREFIX}{path}");
                tensors.push((
                    format!("{key}.lora_A.weight"),
                    HostTensor::from_tensor(e.a.val()).transposed(),
                ));
                tensors.push((
                    format!("{key}.lora_B.weight"),
                    HostTensor::from_tensor(e.b.val()).transposed(),
                ));
                if let Some(m) = &e.magnitude {
                    tensors.push((
                        format!("{key}.lora_magnitude_vector"),
                        HostTensor::from_tensor(m.val()),
                    ));
                }
            }
        });
        Ok(tensors)
    }

    /// Writes adapter `name` (config + weights) into `dir`.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let mut config = self.config(name)?.clone();
        config.inference_mode = true;
        let tensors = self.adapter_tensors(name)?;
        linear_adapters::write_adapter_files(dir, &tensors, &config.to_json_string())
    }

    /// Loads a PEFT adapter folder as adapter `name` (inactive; call
    /// [`set_adapter`](Self::set_adapter)). Every tensor must fit a targeted
    /// module and every targeted module must find its tensors.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let config = LoraConfig::from_file(&dir.join(CONFIG_FILE))?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let mut tensors = read_safetensors(&weights_path)?;
        for (k, t) in &tensors {
            t.check_finite(k, &weights_path)?;
        }
        let paths = self.inject(name, config, Some(()))?;
        let mut filled = Ok(());
        self.model.visit_linears_mut(&mut |path, slot| {
            if filled.is_ok() && paths.iter().any(|p| p == path) {
                filled = fill_entry(slot, name, path, &mut tensors, &weights_path);
            }
        });
        let outcome = filled.and_then(|()| ensure_consumed(tensors, &weights_path));
        if outcome.is_err() {
            // Leave the model as it was.
            self.delete_adapter(name)?;
        }
        // Loaded adapters keep the activation state of the others.
        let active: Vec<String> = self.active_adapters().to_vec();
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

/// Moves the file's tensors for `path` into the (zero-initialised) entry
/// `name` of `slot`, transposing `[r, in]` / `[out, r]` to Burn's layout.
fn fill_entry<B: Backend>(
    slot: &mut LinearSlot<B>,
    name: &str,
    path: &str,
    tensors: &mut HashMap<String, HostTensor>,
    file: &Path,
) -> Result<()> {
    let device = slot.device();
    let (d_in, d_out) = (slot.d_input(), slot.d_output());
    let entry = slot.lora_entry_mut(name).expect("injected before filling");
    let r = entry.meta.rank;
    let key = format!("{PREFIX}{path}");
    let mut take = |suffix: &str| {
        let key = format!("{key}.{suffix}");
        tensors
            .remove(&key)
            .map(|t| (key.clone(), t))
            .ok_or(PeftError::MissingTensor {
                path: file.to_path_buf(),
                key,
            })
    };
    let (ka, a) = take("lora_A.weight")?;
    let (kb, b) = take("lora_B.weight")?;
    let a = a.transposed_checked(&ka, [r, d_in])?;
    let b = b.transposed_checked(&kb, [d_out, r])?;
    entry.a = Param::from_tensor(a.to_tensor([d_in, r], &ka, &device)?);
    entry.b = Param::from_tensor(b.to_tensor([r, d_out], &kb, &device)?);
    if entry.magnitude.is_some() {
        let (km, m) = take("lora_magnitude_vector")?;
        entry.magnitude = Some(Param::from_tensor(m.to_tensor([d_out], &km, &device)?));
    }
    Ok(())
}

/// Shape-checked transpose at the file boundary.
trait TransposedChecked: Sized {
    fn transposed_checked(&self, key: &str, file_shape: [usize; 2]) -> Result<Self>;
}

impl TransposedChecked for HostTensor {
    fn transposed_checked(&self, key: &str, file_shape: [usize; 2]) -> Result<Self> {
        if self.shape != file_shape {
            return Err(PeftError::Shape {
                name: key.to_string(),
                expected: file_shape.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(self.transposed())
    }
}
