//! [`Ia3`]: (IA)³ as PEFT defines it — a learned vector per targeted
//! linear layer that scales its output (bias included) or, for feed-forward
//! targets, its input. The vectors live in the model's [`LinearSlot`]s
//! beside any LoRA entries; [`Ia3Model`] (a [`SlotModel`]) injects,
//! activates, merges and saves them.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use peft_core::io::{take_tensor, HostTensor};
use peft_core::slot_method::Init;
use peft_core::slot_model::KEY_PREFIX;
use peft_core::{
    Ia3Config, Ia3Entry, Ia3Meta, LinearSlot, PeftError, Result, SlotMethod, SlotModel,
};

pub use peft_core::io::{CONFIG_FILE, WEIGHTS_FILE};

/// (IA)³, as PEFT defines it (`peft_type: IA3`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ia3;

/// A model carrying named (IA)³ adapters (see [`SlotModel`]: on a layer
/// carrying several active vectors, they multiply, PEFT's rule).
pub type Ia3Model<B, M> = SlotModel<B, M, Ia3>;

impl SlotMethod for Ia3 {
    type Config = Ia3Config;

    /// A vector of ones, or N(0, 1) with `init_ia3_weights = false`
    /// (placeholders: ones).
    fn attach<B: Backend>(
        config: &Ia3Config,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        let random = !config.init_ia3_weights && init == Init::Fresh;
        let entry = new_entry(slot, name, config.is_feedforward(path)?, random);
        slot.add(entry, path)
    }

    /// `base_model.model.<path>.ia3_l`, `[out, 1]` or `[1, in]` (feed-forward).
    fn write_tensors<B: Backend>(
        _config: &Ia3Config,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        if let Some(e) = slot.entry::<Ia3Entry<B>>(name) {
            let mut t = HostTensor::from_tensor(e.scale.val());
            let n = t.shape[0];
            t.shape = if e.meta.feedforward {
                vec![1, n]
            } else {
                vec![n, 1]
            };
            out.push((format!("{KEY_PREFIX}{path}.ia3_l"), t));
        }
    }

    fn read_tensors<B: Backend>(
        _config: &Ia3Config,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        fill_entry(slot, name, path, tensors, file)
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<Ia3Entry<B>>();
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
    let entry = slot
        .entry_mut::<Ia3Entry<B>>(name)
        .expect("injected before filling");
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
