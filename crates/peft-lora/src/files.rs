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
use peft_core::io::HostTensor;
use peft_core::slot_model::KEY_PREFIX;
use peft_core::{LinearSlot, LoraEntry, PeftError, Result};

/// Appends entry `name` of `slot` (module `path`), if it has one, to `out`:
/// `lora_A` `[r, in]`, `lora_B` `[out, r]`, then DoRA's magnitude `[out]`.
pub(crate) fn write_entry<B: Backend>(
    slot: &LinearSlot<B>,
    path: &str,
    name: &str,
    out: &mut Vec<(String, HostTensor)>,
) {
    let Some(e) = slot.entry::<LoraEntry<B>>(name) else {
        return;
    };
    let key = format!("{KEY_PREFIX}{path}");
    out.push((
        format!("{key}.lora_A.weight"),
        HostTensor::from_tensor(e.a.val()).transposed(),
    ));
    out.push((
        format!("{key}.lora_B.weight"),
        HostTensor::from_tensor(e.b.val()).transposed(),
    ));
    if let Some(m) = &e.magnitude {
        out.push((
            format!("{key}.lora_magnitude_vector"),
            HostTensor::from_tensor(m.val()),
        ));
    }
}

/// Moves the file's tensors for `path` into the (zero-initialised) entry
/// `name` of `slot`, transposing `[r, in]` / `[out, r]` to Burn's layout.
pub(crate) fn fill_entry<B: Backend>(
    slot: &mut LinearSlot<B>,
    name: &str,
    path: &str,
    tensors: &mut HashMap<String, HostTensor>,
    file: &Path,
) -> Result<()> {
    let device = slot.device();
    let (d_in, d_out) = (slot.d_input(), slot.d_output());
    let entry = slot
        .entry_mut::<LoraEntry<B>>(name)
        .expect("injected before filling");
    let r = entry.meta.rank;
    let key = format!("{KEY_PREFIX}{path}");
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
