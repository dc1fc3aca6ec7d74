//! PEFT's `modules_to_save` for every method: which layers an adapter
//! keeps a trainable full copy of ([`ModuleCopyEntry`] on their linear
//! slots; a [`NormCopyRole::Saved`](crate::slot::NormCopyRole) copy on
//! their norm slots, whose file code is the norm slot's), and
//! the copies in PEFT's file, under the layer's own keys
//! (`base_model.model.classifier.weight`, `[out, in]`), as PEFT's
//! `get_peft_model_state_dict` writes them.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;

use crate::error::{PeftError, Result};
use crate::io::{take_tensor, weight_from_torch, HostTensor};
use crate::model::PeftModel;
use crate::slot::{LinearSlot, ModuleCopyEntry, SlotAdapter};

/// The layers that `modules_to_save` names, linear (of `linears`) and
/// norm (of `norms`): PEFT's rule, a module whose name ends with an entry.
/// None may also be a target of the adapter's method (`targets`). An entry
/// list that names no such layer is an error listing them (a SEQ_CLS
/// adapter on a model without a head, or a copy of an embedding, which is
/// not supported yet).
pub fn copy_plan(
    modules_to_save: &[String],
    linears: &[String],
    norms: &[String],
    targets: &[String],
) -> Result<(Vec<String>, Vec<String>)> {
    if modules_to_save.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let named = |paths: &[String]| -> Vec<String> {
        paths
            .iter()
            .filter(|p| modules_to_save.iter().any(|m| p.ends_with(m.as_str())))
            .cloned()
            .collect()
    };
    let (linear_copies, norm_copies) = (named(linears), named(norms));
    if linear_copies.is_empty() && norm_copies.is_empty() {
        return Err(PeftError::Config(format!(
            "modules_to_save {modules_to_save:?} names no linear or norm layer of this model \
             (only those can be copied; a sequence-classification adapter needs a model with \
             its head); its linear layers: {linears:?}; its norm layers: {norms:?}"
        )));
    }
    let both = linear_copies
        .iter()
        .chain(&norm_copies)
        .find(|p| targets.contains(p));
    if let Some(both) = both {
        return Err(PeftError::Config(format!(
            "`{both}` is both a target of the adapter and in modules_to_save {modules_to_save:?}"
        )));
    }
    Ok((linear_copies, norm_copies))
}

/// Attaches adapter `name`'s copy of `slot`'s layer (module `path`).
pub fn attach_copy<B: Backend>(slot: &mut LinearSlot<B>, path: &str, name: &str) -> Result<()> {
    let copy = ModuleCopyEntry::of_base(slot, name);
    slot.add(copy, path)
}

/// The prefix of a copy's keys in a prompt-learning adapter's file:
/// PEFT's prompt-learning models save `base_model.classifier.weight`
/// where the others save `base_model.model.classifier.weight`
/// ([`KEY_PREFIX`](crate::io::KEY_PREFIX)).
pub const PROMPT_KEY_PREFIX: &str = "base_model.";

/// Appends adapter `name`'s copy of `slot`'s layer, if it has one, under
/// PEFT's keys (`prefix`: [`KEY_PREFIX`](crate::io::KEY_PREFIX) or
/// [`PROMPT_KEY_PREFIX`]) and in
/// PyTorch's layout.
pub fn write_copy<B: Backend>(
    slot: &LinearSlot<B>,
    prefix: &str,
    path: &str,
    name: &str,
    out: &mut Vec<(String, HostTensor)>,
) {
    let Some(copy) = slot.entry::<ModuleCopyEntry<B>>(name) else {
        return;
    };
    let key = format!("{prefix}{path}");
    out.push((
        format!("{key}.weight"),
        HostTensor::from_tensor(copy.weight.val()).transposed(),
    ));
    if let Some(b) = &copy.bias {
        out.push((format!("{key}.bias"), HostTensor::from_tensor(b.val())));
    }
}

/// Moves adapter `name`'s copy of `slot`'s layer (module `path`), if it has
/// one, out of `tensors` (read from `file`, keys under `prefix`), checking
/// shapes.
pub fn read_copy<B: Backend>(
    slot: &mut LinearSlot<B>,
    prefix: &str,
    path: &str,
    name: &str,
    tensors: &mut HashMap<String, HostTensor>,
    file: &Path,
) -> Result<()> {
    let (d_in, d_out) = (slot.d_input(), slot.d_output());
    let device = slot.device();
    let Some(copy) = slot.entry_mut::<ModuleCopyEntry<B>>(name) else {
        return Ok(());
    };
    let key = format!("{prefix}{path}");
    let w_key = format!("{key}.weight");
    let weight = weight_from_torch(tensors, &w_key, [d_in, d_out], file, &device)?;
    copy.weight = copy.weight.clone().map(|_| weight);
    if let Some(bias) = &mut copy.bias {
        let b_key = format!("{key}.bias");
        let value = take_tensor(tensors, &b_key, file)?.to_tensor([d_out], &b_key, &device)?;
        *bias = bias.clone().map(|_| value);
    }
    Ok(())
}

/// PEFT lets one adapter's copy of a layer be active at a time: an error
/// naming the layer if `names` activates two copies of one.
pub fn check_one_copy_active<B: Backend>(
    slot: &LinearSlot<B>,
    path: &str,
    names: &[String],
) -> Result<()> {
    let copies: Vec<&str> = slot
        .entries_of::<ModuleCopyEntry<B>>()
        .map(|e| e.name())
        .filter(|n| names.iter().any(|a| a == n))
        .collect();
    if copies.len() > 1 {
        return Err(PeftError::Config(format!(
            "{path}: adapters {copies:?} each keep a copy of this layer (modules_to_save); \
             only one of them can be active at a time, as in PEFT"
        )));
    }
    Ok(())
}

/// Attaches adapter `name`'s copies of the layers `modules_to_save` names
/// on `model` (a prompt-learning adapter's head, which lives in the model's
/// slots beside no other entry of its own); only linear layers, a norm
/// layer is refused by name. On error no copy of `name` is left.
pub fn attach_model_copies<B: Backend, M: PeftModel<B>>(
    model: &mut M,
    name: &str,
    modules_to_save: &[String],
) -> Result<()> {
    if modules_to_save.is_empty() {
        return Ok(());
    }
    let (linears, norms) = copy_plan(
        modules_to_save,
        &model.linear_paths(),
        &model.norm_paths(),
        &[],
    )?;
    if let Some(norm) = norms.first() {
        return Err(PeftError::Config(format!(
            "modules_to_save names the norm layer `{norm}`: a prompt-learning adapter keeps \
             copies of linear layers only (its head)"
        )));
    }
    let mut result = Ok(());
    model.visit_linears_mut(&mut |path, slot| {
        if result.is_ok() && linears.iter().any(|p| p == path) {
            result = attach_copy(slot, path, name);
        }
    });
    if result.is_err() {
        remove_model_copies(model, name);
    }
    result
}

/// Removes adapter `name`'s copies of linear layers from `model`.
pub fn remove_model_copies<B: Backend, M: PeftModel<B>>(model: &mut M, name: &str) {
    model.visit_linears_mut(&mut |_, slot| {
        if slot.entry::<ModuleCopyEntry<B>>(name).is_some() {
            slot.remove(name);
        }
    });
}
