//! [`Lora`]: LoRA (with rsLoRA, DoRA, LoftQ and PEFT's initialisations) as
//! a [`SlotMethod`]: which layers a config targets and how an entry starts.
//! Everything that spans the model's adapters is [`SlotModel`]'s.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use peft_core::config::{BaseSplittingInit, InitLoraWeights};
use peft_core::io::HostTensor;
use peft_core::slot::column_norm;
use peft_core::slot_method::Init;
use peft_core::target::rank_and_alpha;
use peft_core::{
    BaseSplit, LinearSlot, LoraConfig, LoraEntry, LoraMeta, PeftError, Result, SlotMethod,
    SlotModel,
};

/// LoRA and its variants, as PEFT defines them (`peft_type: LORA`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Lora;

/// A model carrying named LoRA adapters (see [`SlotModel`] for what it does:
/// activation, merging, mixed batches, PEFT's files).
pub type LoraModel<B, M> = SlotModel<B, M, Lora>;

fn uniform<B: Backend>(shape: [usize; 2], bound: f64, device: &B::Device) -> Tensor<B, 2> {
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

/// A new entry for `slot`, initialised as PEFT initialises it.
fn new_entry<B: Backend>(
    slot: &LinearSlot<B>,
    meta: LoraMeta,
    use_dora: bool,
    init: &InitLoraWeights,
    start: Init,
) -> LoraEntry<B> {
    let device = slot.device();
    let (d_in, d_out, r) = (slot.d_input(), slot.d_output(), meta.rank);
    // PyTorch's kaiming_uniform_(a=√5) on `[r, d_in]` is U(±1/√d_in).
    let (a, b) = match (start, init) {
        (Init::Placeholder, _) => (
            Tensor::zeros([d_in, r], &device),
            Tensor::zeros([r, d_out], &device),
        ),
        (_, InitLoraWeights::Named(n)) if n == "gaussian" => (
            Tensor::random(
                [d_in, r],
                Distribution::Normal(0.0, 1.0 / r as f64),
                &device,
            ),
            Tensor::zeros([r, d_out], &device),
        ),
        // `false`: both factors keep nn.Linear's default init (B ≠ 0).
        (_, InitLoraWeights::Bool(false)) => (
            uniform([d_in, r], 1.0 / (d_in as f64).sqrt(), &device),
            uniform([r, d_out], 1.0 / (r as f64).sqrt(), &device),
        ),
        _ => (
            uniform([d_in, r], 1.0 / (d_in as f64).sqrt(), &device),
            Tensor::zeros([r, d_out], &device),
        ),
    };
    lora_entry(slot, meta, use_dora, a, b)
}

/// The entry of factors `a` `[d_in, r]`, `b` `[r, d_out]` over the slot's
/// current base, DoRA's magnitude `‖W + s·A·B‖` taken from them.
fn lora_entry<B: Backend>(
    slot: &LinearSlot<B>,
    meta: LoraMeta,
    use_dora: bool,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
) -> LoraEntry<B> {
    let magnitude = use_dora.then(|| {
        let delta = a.clone().matmul(b.clone()) * meta.scaling;
        Param::from_tensor(column_norm(slot.base_weight() + delta).detach())
    });
    LoraEntry {
        a: Param::from_tensor(a),
        b: Param::from_tensor(b),
        magnitude,
        meta,
    }
}

/// `m` `[rows, cols]` (`f64`) transposed into a row-major `f32` `[cols,
/// rows]`, divided by `div`: PyTorch's `[r, in]` / `[out, r]` factors in
/// Burn's `[in, r]` / `[r, out]` layout.
fn burn_layout(m: &nalgebra::DMatrix<f64>, div: f64) -> Vec<f32> {
    let (rows, cols) = m.shape();
    (0..rows * cols)
        .map(|k| (m[(k % rows, k / rows)] / div) as f32)
        .collect()
}

/// [`lora_entry`] of host factors `a` `[d_in, r]`, `b` `[r, d_out]`
/// (row-major, Burn's layout).
fn entry_from_factors<B: Backend>(
    slot: &LinearSlot<B>,
    meta: LoraMeta,
    use_dora: bool,
    a: Vec<f32>,
    b: Vec<f32>,
) -> LoraEntry<B> {
    let device = slot.device();
    let (d_in, d_out, r) = (slot.d_input(), slot.d_output(), meta.rank);
    let a = Tensor::<B, 2>::from_data(TensorData::new(a, [d_in, r]), &device);
    let b = Tensor::<B, 2>::from_data(TensorData::new(b, [r, d_out]), &device);
    lora_entry(slot, meta, use_dora, a, b)
}

/// A LoftQ entry for `slot` (rank `meta.rank`, `iterations` rounds): the
/// slot's dense base weight becomes NF4 and the factors start at the
/// low-rank part of what quantization lost (see [`crate::loftq`]).
fn loftq_entry<B: Backend>(
    slot: &mut LinearSlot<B>,
    meta: LoraMeta,
    use_dora: bool,
    iterations: usize,
    path: &str,
) -> Result<LoraEntry<B>> {
    if slot.is_quantized() {
        return Err(PeftError::Config(format!(
            "{path}: LoftQ quantizes the f32 base weight itself; this one is already quantized"
        )));
    }
    if slot.any_merged() {
        return Err(PeftError::State(format!(
            "{path}: unmerge its adapters before a LoftQ init"
        )));
    }
    let (d_in, d_out, r) = (slot.d_input(), slot.d_output(), meta.rank);
    let w = HostTensor::from_tensor(slot.base_weight()).transposed(); // [out, in]
    let q = crate::loftq::loftq(&w.data, d_out, d_in, r, iterations)
        .map_err(|e| PeftError::Config(format!("{path}: {e}")))?;
    let root = meta.scaling.sqrt();
    let (a, b) = (burn_layout(&q.r, root), burn_layout(&q.l, root));
    slot.set_quantized_base(std::sync::Arc::new(q.base))?;
    Ok(entry_from_factors(slot, meta, use_dora, a, b))
}

/// A PiSSA or OLoRA entry for `slot` (see [`crate::base_split`]): the
/// slot's base weight becomes the residual and the factors start at the
/// part taken out, so the layer's output is unchanged. Run for a fresh
/// adapter and, as PEFT does, for one loaded from a file whose config names
/// the init (the file's factors then replace the ones computed here).
fn base_split_entry<B: Backend>(
    slot: &mut LinearSlot<B>,
    mut meta: LoraMeta,
    use_dora: bool,
    init: BaseSplittingInit,
    path: &str,
) -> Result<LoraEntry<B>> {
    if slot.is_quantized() {
        return Err(PeftError::Config(format!(
            "{path}: PiSSA / OLoRA split the f32 base weight; this one is quantized (split first, then quantize the residual)"
        )));
    }
    let (d_in, d_out, r) = (slot.d_input(), slot.d_output(), meta.rank);
    let w = HostTensor::from_tensor(slot.base_weight()).transposed(); // [out, in]
    let split = crate::base_split::split(&w.data, d_out, d_in, r, meta.scaling, init, path)?;
    // Burn's layouts: A [d_in, r], B [r, d_out], W [d_in, d_out].
    let (a, b) = (burn_layout(&split.a, 1.0), burn_layout(&split.b, 1.0));
    let residual = burn_layout(&split.residual, 1.0);
    slot.replace_dense_base(
        Tensor::from_data(TensorData::new(residual, [d_in, d_out]), &slot.device()),
        path,
    )?;
    meta.base_split = Some(BaseSplit {
        a0: a.clone(),
        b0: b.clone(),
    });
    Ok(entry_from_factors(slot, meta, use_dora, a, b))
}

impl SlotMethod for Lora {
    type Config = LoraConfig;

    fn attach<B: Backend>(
        config: &LoraConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        init: Init,
    ) -> Result<()> {
        let (r, alpha) = rank_and_alpha(config, path)?;
        let meta = LoraMeta {
            name: name.to_string(),
            rank: r,
            alpha,
            scaling: config.scaling_for(r, alpha),
            dropout: config.lora_dropout,
            merged: false,
            dora_merge_norm: None,
            base_split: None,
        };
        // LoftQ replaces base weights: only for a fresh adapter, not for
        // one whose factors a file or arithmetic will fill.
        let loftq = match init {
            Init::Fresh => config.loftq()?.map(|(_, iterations)| iterations),
            Init::Placeholder => None,
        };
        let split = config.base_splitting_init()?;
        let entry = match (loftq, split) {
            (Some(iterations), _) => loftq_entry(slot, meta, config.use_dora, iterations, path)?,
            (None, Some(split)) => base_split_entry(slot, meta, config.use_dora, split, path)?,
            (None, None) => new_entry(slot, meta, config.use_dora, &config.init_lora_weights, init),
        };
        slot.add(entry, path)
    }

    fn write_tensors<B: Backend>(
        _config: &LoraConfig,
        slot: &LinearSlot<B>,
        path: &str,
        name: &str,
        out: &mut Vec<(String, HostTensor)>,
    ) {
        crate::files::write_entry(slot, path, name, out)
    }

    fn read_tensors<B: Backend>(
        _config: &LoraConfig,
        slot: &mut LinearSlot<B>,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        crate::files::fill_entry(slot, name, path, tensors, file)
    }

    fn clear<B: Backend>(slot: &mut LinearSlot<B>) {
        slot.remove_all::<LoraEntry<B>>();
    }
}
