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

use crate::config::TokenIndices;
use crate::error::{PeftError, Result};
use crate::io::{take_tensor, weight_from_torch, HostTensor};
use crate::model::PeftModel;
use crate::slot::{LinearSlot, ModuleCopyEntry, SlotAdapter, TiedHead};

/// The layers an adapter keeps full copies of (`modules_to_save`), by
/// kind of layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CopyPlan {
    /// Linear layers (a head): [`ModuleCopyEntry`]s.
    pub linears: Vec<String>,
    /// Norm layers: [`NormCopyRole::Saved`](crate::slot::NormCopyRole) copies.
    pub norms: Vec<String>,
    /// Embedding tables: [`EmbeddingCopyKind::Saved`](crate::slot::EmbeddingCopyKind) copies.
    pub embeddings: Vec<String>,
}

/// The layers that `modules_to_save` names among the model's `linears`,
/// `norms` and `embeddings`: PEFT's rule, a module whose name ends with an
/// entry. None may also be a target of the adapter's method (`targets`).
/// An entry list that names no such layer is an error listing them (a
/// SEQ_CLS adapter on a model without a head).
pub fn copy_plan(
    modules_to_save: &[String],
    linears: &[String],
    norms: &[String],
    embeddings: &[String],
    targets: &[String],
) -> Result<CopyPlan> {
    if modules_to_save.is_empty() {
        return Ok(CopyPlan::default());
    }
    let named = |paths: &[String]| -> Vec<String> {
        paths
            .iter()
            .filter(|p| modules_to_save.iter().any(|m| p.ends_with(m.as_str())))
            .cloned()
            .collect()
    };
    // An embedding table is named by its whole last components
    // (`embed_tokens`, `word_embeddings`): `embeddings` names BERT's
    // composite embeddings block, which holds the table and cannot be
    // copied as one layer.
    let whole = |p: &String| {
        modules_to_save
            .iter()
            .any(|m| p == m || p.ends_with(&format!(".{m}")))
    };
    let plan = CopyPlan {
        linears: named(linears),
        norms: named(norms),
        embeddings: embeddings.iter().filter(|p| whole(p)).cloned().collect(),
    };
    if plan == CopyPlan::default() {
        return Err(PeftError::Config(format!(
            "modules_to_save {modules_to_save:?} names no linear, norm or embedding layer of this \
             model (only those can be copied; a sequence-classification adapter needs a model \
             with its head); its linear layers: {linears:?}; its norm layers: {norms:?}; its \
             embeddings: {embeddings:?}"
        )));
    }
    let both = plan
        .linears
        .iter()
        .chain(&plan.norms)
        .chain(&plan.embeddings)
        .find(|p| targets.contains(p));
    if let Some(both) = both {
        return Err(PeftError::Config(format!(
            "`{both}` is both a target of the adapter and in modules_to_save {modules_to_save:?}"
        )));
    }
    Ok(plan)
}

/// Which rows of which embedding tables an adapter retrains (PEFT's
/// `trainable_token_indices`): a plain list is rows of the input
/// embedding (the first of `embeddings`); a map names layers by suffix.
/// The tied output head (`tied_head`) may be named with the input
/// embedding's rows (PEFT ties it anyway); other rows for it, a name that
/// matches no embedding, or a layer also in `modules_to_save` (`saved`) are
/// errors naming them.
pub fn token_plan(
    tokens: Option<&TokenIndices>,
    embeddings: &[String],
    tied_head: Option<&str>,
    saved: &[String],
) -> Result<Vec<(String, Vec<usize>)>> {
    let Some(tokens) = tokens else {
        return Ok(Vec::new());
    };
    let input = || {
        embeddings.first().cloned().ok_or_else(|| {
            PeftError::Config(
                "trainable_token_indices: this model has no embedding table that can be \
                 retrained"
                    .into(),
            )
        })
    };
    let mut plan: Vec<(String, Vec<usize>)> = Vec::new();
    match tokens {
        TokenIndices::List(ids) => plan.push((input()?, ids.clone())),
        TokenIndices::PerLayer(layers) => {
            for (name, ids) in layers {
                let ends = |p: &str| p == name || p.ends_with(&format!(".{name}"));
                if let Some(path) = embeddings.iter().find(|p| ends(p)) {
                    plan.push((path.clone(), ids.clone()));
                } else if tied_head.is_some_and(ends) {
                    let input = input()?;
                    let same = layers.iter().any(|(n, i)| {
                        (input == *n || input.ends_with(&format!(".{n}"))) && i == ids
                    });
                    if !same {
                        return Err(PeftError::Config(format!(
                            "trainable_token_indices: `{name}` is the output head tied to \
                             `{input}`; it can only retrain the same tokens as `{input}`"
                        )));
                    }
                } else {
                    return Err(PeftError::Config(format!(
                        "trainable_token_indices names `{name}`, which is no embedding table \
                         of this model; its embeddings: {embeddings:?}"
                    )));
                }
            }
        }
    }
    if let Some((path, _)) = plan.iter().find(|(p, _)| saved.contains(p)) {
        return Err(PeftError::Config(format!(
            "The embedding layer `{path}` is already marked to be trained fully \
             (modules_to_save); retrain it fully or retrain some of its tokens \
             (trainable_token_indices), not both"
        )));
    }
    Ok(plan)
}

/// What the output head (`tied_head`: its path when it is the token
/// table) computes with beside an adapter's full copy of the embedding at
/// `path`: the copy under PEFT's `ensure_weight_tying`, which ties only
/// layers PEFT calls embeddings (`embed_tokens`; a copy of GPT-2's `wte`
/// leaves the head on the base table, ensure_weight_tying or not).
pub fn tied_head_of_copy(
    ensure_weight_tying: bool,
    tied_head: Option<&str>,
    path: &str,
) -> TiedHead {
    match tied_head {
        None => TiedHead::Untied,
        Some(_) if ensure_weight_tying && path.rsplit('.').next() == Some("embed_tokens") => {
            TiedHead::Follows
        }
        Some(_) => TiedHead::KeepsBase,
    }
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
    let plan = copy_plan(
        modules_to_save,
        &model.linear_paths(),
        &model.norm_paths(),
        &model.embedding_paths(),
        &[],
    )?;
    if let Some(other) = plan.norms.first().or(plan.embeddings.first()) {
        return Err(PeftError::Config(format!(
            "modules_to_save names `{other}`, not a linear layer: a prompt-learning adapter \
             keeps copies of linear layers only (its head)"
        )));
    }
    let linears = plan.linears;
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
