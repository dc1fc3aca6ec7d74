//! What every method whose adapters live in [`LinearSlot`](crate::LinearSlot)s
//! does the same way (LoRA, (IA)³): activation, disabling, merging,
//! mixed-batch routing and writing PEFT's two files. The method crates keep
//! what differs: injection, initialisation and their tensors.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;

use crate::error::{PeftError, Result};
use crate::io::{serialize_safetensors, write_atomic, HostTensor};
use crate::model::PeftModel;
use crate::{routing, BASE_ROW};

/// PEFT's config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Makes `names` the active adapters of every slot (those a slot carries),
/// in that order; only active entries train.
pub fn set_active<B: Backend, M: PeftModel<B>>(model: &mut M, names: &[String]) {
    model.visit_linears_mut(&mut |_, slot| slot.set_active(names));
}

/// Whether any entry of any kind is merged into its base weight.
pub fn any_merged<B: Backend, M: PeftModel<B>>(model: &M) -> bool {
    let mut merged = false;
    model.visit_linears(&mut |_, s| merged |= s.any_merged());
    merged
}

/// Bypasses (or restores) every unmerged adapter. Disabling fails while
/// adapters are merged: their effect is in the base weights.
pub fn set_disabled<B: Backend, M: PeftModel<B>>(model: &mut M, disabled: bool) -> Result<()> {
    if disabled && any_merged(model) {
        return Err(PeftError::State(
            "cannot disable adapters while some are merged; unmerge first".into(),
        ));
    }
    model.visit_linears_mut(&mut |_, slot| slot.state.disabled = disabled);
    Ok(())
}

/// Folds the named adapters into the base weights, in order.
pub fn merge<B: Backend, M: PeftModel<B>>(model: &mut M, names: &[String]) {
    model.visit_linears_mut(&mut |_, slot| {
        for n in names {
            slot.merge(n);
        }
    });
}

/// Takes the named adapters back out of the base weights, in the order
/// given (pass the merge order reversed to restore exactly).
pub fn unmerge<B: Backend, M: PeftModel<B>>(model: &mut M, names: &[String]) {
    model.visit_linears_mut(&mut |_, slot| {
        for n in names {
            slot.unmerge(n);
        }
    });
}

/// Removes adapter `name` (of any kind) from every slot, unmerging first.
pub fn remove<B: Backend, M: PeftModel<B>>(model: &mut M, name: &str) {
    model.visit_linears_mut(&mut |_, slot| {
        slot.remove_lora(name);
        slot.remove_ia3(name);
    });
}

/// Mixed-batch inference: runs `f` on `model` with row `i` routed through
/// adapter `names[i]` (`__base__` for none). `known` checks a name; merged
/// adapters are refused, as in PEFT.
pub fn route_rows<B: Backend, M: PeftModel<B>, R>(
    model: &M,
    names: &[&str],
    batch_size: usize,
    known: impl Fn(&str) -> Result<()>,
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
        known(n)?;
    }
    if any_merged(model) {
        return Err(PeftError::State(
            "cannot route rows to adapters while adapters are merged; unmerge first".into(),
        ));
    }
    let owned: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    Ok(routing::with_row_adapters(&owned, || f(model)))
}

/// Writes PEFT's adapter folder: the weights first, then the config, each
/// atomically, so a config on disk always has its weights beside it.
pub fn write_adapter_files(
    dir: &Path,
    tensors: &[(String, HostTensor)],
    config_json: &str,
) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(
        &dir.join(WEIGHTS_FILE),
        &serialize_safetensors(tensors, Some(metadata)),
    )?;
    write_atomic(&dir.join(CONFIG_FILE), config_json.as_bytes())
}
