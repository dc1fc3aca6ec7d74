//! [`LinearSlot`]: the adaptable linear layer.
//!
//! A model holds a `LinearSlot` wherever it would hold a `burn::nn::Linear`
//! that PEFT may adapt. The slot owns the frozen base layer and the named
//! adapter entries attached to it ([`SlotEntry`]: LoRA/DoRA, (IA)³, LoHa,
//! LoKr, OFT, BOFT, VeRA, AdaLoRA, and full copies of the layer for `modules_to_save`), and
//! computes the base layer with the active, unmerged entries' effects
//! composed (`forward.rs`). Merged entries are skipped: with every active
//! adapter merged, or none attached, the slot runs exactly the base
//! computation.
//!
//! The slot never branches on an entry's kind: each kind says what it does
//! through [`SlotAdapter`] (`adapter.rs`), in its own file (`lora.rs`,
//! `ia3.rs`, `oft.rs`, `boft.rs`), listed once in `entry.rs`'s registry. The kinds whose effect
//! is one weight delta built from factors (LoHa, LoKr) share [`DeltaEntry`]
//! (`delta.rs`) and only say what their factors are (`loha.rs`, `lokr.rs`).
//!
//! Layout: Burn's `[d_in, d_out]` everywhere; `A: [d_in, r]`, `B: [r, d_out]`.
//! PEFT's `[out, in]` exists only in `io` and the method crates' file code.

mod adalora;
mod adapter;
mod boft;
mod copies;
mod delta;
mod embedding;
mod entry;
mod forward;
mod ia3;
pub mod ln_tuning;
mod loha;
mod lokr;
mod lora;
pub mod method;
mod module_copy;
mod norm;
mod oft;
pub mod trainable_tokens;
pub mod vera;

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::{PeftError, Result};
use crate::quant::QuantizedMatrix;

pub use adalora::{AdaLoraEntry, AdaLoraMeta};
pub use adapter::{BaseParts, BasePass, LowRankRows, SlotAdapter};
pub use boft::{butterfly_permutation, cayley_exact, BoftEntry, BoftMeta};
pub use delta::{DeltaEntry, DeltaFactors, DeltaMeta};
pub use embedding::{
    EmbeddingCopy, EmbeddingCopyKind, EmbeddingSlot, EmbeddingSlotState, TiedHead,
    TOKENS_BESIDE_KEY, TOKENS_KEY,
};
pub use entry::{EntryKind, SlotEntry};
pub use ia3::{Ia3Entry, Ia3Meta};
pub use ln_tuning::{LnTuning, LnTuningConfig};
pub use loha::{LohaEntry, LohaFactors};
pub use lokr::{factorization, kron, FactorPair, KronFactor, LokrEntry, LokrFactors, LokrLayout};
pub use lora::{column_norm, BaseSplit, LoraEntry, LoraMeta};
pub use module_copy::{ModuleCopyEntry, ModuleCopyMeta};
pub use norm::{NormCopy, NormCopyRole, NormParams, NormSlot, NormSlotState};
pub use oft::{cayley_neumann, skew_symmetric, OftEntry, OftMeta};
pub use trainable_tokens::{TrainableTokens, TrainableTokensConfig};
pub use vera::{Vera, VeraConfig, VeraEntry};

/// Slot-level state that is not a parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotState {
    /// Names of the active adapters, in the order their deltas are added.
    pub active: Vec<String>,
    /// With `true`, the forward pass is the base layer alone (unmerged
    /// adapters are bypassed).
    pub disabled: bool,
    /// Names of the merged adapters, in the order they were merged: DoRA's
    /// and (IA)³'s merges scale the weight, so they do not commute with the
    /// others, and unmerging must go back in reverse order (PEFT keeps the
    /// same list per layer, `merged_adapters`).
    pub merged: Vec<String>,
}

/// Configuration of a [`LinearSlot`].
#[derive(Debug, Clone)]
pub struct LinearSlotConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the base layer has a bias.
    pub bias: bool,
}

impl LinearSlotConfig {
    /// A config for a `d_input → d_output` layer with bias.
    pub fn new(d_input: usize, d_output: usize) -> Self {
        LinearSlotConfig {
            d_input,
            d_output,
            bias: true,
        }
    }

    /// Sets whether the base layer has a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// A slot with a randomly initialised, frozen base layer and no adapter.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LinearSlot<B> {
        LinearSlot::from_linear(
            LinearConfig::new(self.d_input, self.d_output)
                .with_bias(self.bias)
                .init(device),
        )
    }
}

/// An adaptable linear layer: a frozen base `Linear` plus named adapter entries.
#[derive(Module, Debug)]
pub struct LinearSlot<B: Backend> {
    /// The base layer: weight `[d_in, d_out]`, bias `[d_out]`. Frozen.
    /// With a [`quantized`](Self::quantized) base, `weight` is an empty
    /// `[0, 0]` tensor that only carries the device; read the weight with
    /// [`base_weight`](Self::base_weight).
    pub base: Linear<B>,
    /// The frozen base weight kept quantized (QLoRA), `[out, in]` as PyTorch
    /// stores it; dequantized in every forward pass, never held in `f32`
    /// between passes. Shared, not copied, by clones of the model.
    #[module(skip)]
    pub quantized: Option<Arc<QuantizedMatrix>>,
    /// Attached adapters of every kind, in the order they were added; names
    /// are unique across kinds.
    pub entries: Vec<SlotEntry<B>>,
    /// Active adapters and the disable switch.
    #[module(skip)]
    pub state: SlotState,
}

fn frozen<B: Backend, const D: usize>(p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
    p.set_require_grad(false)
}

impl<B: Backend> LinearSlot<B> {
    /// Wraps a base layer, freezing it.
    pub fn from_linear(linear: Linear<B>) -> Self {
        LinearSlot {
            base: Linear {
                weight: frozen(linear.weight),
                bias: linear.bias.map(frozen),
            },
            quantized: None,
            entries: Vec::new(),
            state: SlotState::default(),
        }
    }

    /// A slot whose frozen base weight stays quantized: `weight` is
    /// `[out = d_output, in = d_input]`, `bias` is `[d_output]`.
    pub fn from_quantized(
        weight: Arc<QuantizedMatrix>,
        bias: Option<Tensor<B, 1>>,
        device: &B::Device,
    ) -> Result<Self> {
        if let Some(b) = &bias {
            let found = b.dims()[0];
            if found != weight.rows {
                return Err(PeftError::Shape {
                    name: "bias".into(),
                    expected: vec![weight.rows],
                    found: vec![found],
                });
            }
        }
        let empty = Tensor::<B, 2>::from_data(TensorData::new(Vec::<f32>::new(), [0, 0]), device);
        let mut slot = Self::from_weights(empty, bias);
        slot.quantized = Some(weight);
        Ok(slot)
    }

    /// The device of the base layer.
    pub fn device(&self) -> B::Device {
        self.base.weight.device()
    }

    /// Whether the base weight is kept quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    /// The base weight `[d_in, d_out]`, dequantized to `f32` when kept
    /// quantized (a fresh tensor each call, not tracked by autodiff).
    pub fn base_weight(&self) -> Tensor<B, 2> {
        match &self.quantized {
            None => self.base.weight.val(),
            Some(q) => Tensor::<B, 2>::from_data(
                TensorData::new(q.dequantize(), [q.rows, q.cols]),
                &self.device(),
            )
            .transpose(),
        }
    }

    /// Replaces a quantized base weight by its `f32` dequantization (a
    /// no-op for a dense base). Merging does this first: a merged weight is
    /// `f32`, never re-quantized.
    pub fn dequantize_base(&mut self) {
        if self.quantized.is_some() {
            let w = self.base_weight();
            self.quantized = None;
            self.set_base_weight(w);
        }
    }

    /// Replaces the dense base weight by its NF4 quantization (QLoRA's
    /// 4-bit NormalFloat with double-quantized scales). A no-op if already
    /// quantized; refused while an adapter is merged into the weight, since
    /// unmerging would then subtract from a rounded weight.
    pub fn quantize_nf4(&mut self, path: &str) -> Result<()> {
        if self.is_quantized() {
            return Ok(());
        }
        if self.any_merged() {
            return Err(PeftError::State(format!(
                "{path}: unmerge its adapters before quantizing the base weight"
            )));
        }
        let (d_in, d_out) = (self.d_input(), self.d_output());
        let values = self
            .base
            .weight
            .val()
            .transpose()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| PeftError::State(format!("{path}: weight not readable: {e:?}")))?;
        let q = QuantizedMatrix::nf4(&values, d_out, d_in)
            .map_err(|e| PeftError::Config(format!("{path}: {e}")))?;
        self.set_quantized_base(Arc::new(q))
    }

    /// Replaces the base weight by `weight`, kept quantized (`[out, in]`,
    /// the shape of the current base). Adapters stay as they are.
    pub fn set_quantized_base(&mut self, weight: Arc<QuantizedMatrix>) -> Result<()> {
        let (d_in, d_out) = (self.d_input(), self.d_output());
        if (weight.rows, weight.cols) != (d_out, d_in) {
            return Err(PeftError::Shape {
                name: "quantized base weight".into(),
                expected: vec![d_out, d_in],
                found: vec![weight.rows, weight.cols],
            });
        }
        let device = self.device();
        let empty = Tensor::<B, 2>::from_data(TensorData::new(Vec::<f32>::new(), [0, 0]), &device);
        self.set_base_weight(empty);
        self.quantized = Some(weight);
        Ok(())
    }

    /// Replaces the dense base weight by `weight` `[d_in, d_out]` (an
    /// initialisation that moves part of the weight into an adapter: PiSSA,
    /// OLoRA). Refused for a quantized base (the new weight would have to
    /// be re-quantized, and the split would no longer add up), while an
    /// adapter is merged into the weight, or for another shape.
    pub fn replace_dense_base(&mut self, weight: Tensor<B, 2>, path: &str) -> Result<()> {
        if self.is_quantized() {
            return Err(PeftError::Config(format!(
                "{path}: this initialisation rewrites the f32 base weight; this one is quantized"
            )));
        }
        if self.any_merged() {
            return Err(PeftError::State(format!(
                "{path}: unmerge its adapters before an initialisation that rewrites the base weight"
            )));
        }
        let expected = [self.d_input(), self.d_output()];
        if weight.dims() != expected {
            return Err(PeftError::Shape {
                name: format!("{path}: base weight"),
                expected: expected.to_vec(),
                found: weight.dims().to_vec(),
            });
        }
        self.set_base_weight(weight);
        Ok(())
    }

    /// Values of the base weight held quantized (0 for a dense base): they
    /// count as parameters although no tensor holds them.
    pub fn quantized_params(&self) -> usize {
        self.quantized.as_ref().map_or(0, |q| q.len())
    }

    /// Builds a slot from a base weight `[d_in, d_out]` and bias `[d_out]`.
    pub fn from_weights(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::from_linear(Linear {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
        })
    }

    /// Input features.
    pub fn d_input(&self) -> usize {
        match &self.quantized {
            Some(q) => q.cols,
            None => self.base.weight.shape().dims::<2>()[0],
        }
    }

    /// Output features.
    pub fn d_output(&self) -> usize {
        match &self.quantized {
            Some(q) => q.rows,
            None => self.base.weight.shape().dims::<2>()[1],
        }
    }

    /// The entry named `name`, of any kind.
    pub fn entry_named(&self, name: &str) -> Option<&SlotEntry<B>> {
        self.entries.iter().find(|e| e.adapter().name() == name)
    }

    /// The entry named `name` if it is of kind `E` (e.g. `LoraEntry<B>`).
    pub fn entry<E: EntryKind<B>>(&self, name: &str) -> Option<&E> {
        self.entry_named(name).and_then(E::of)
    }

    /// Mutable access to the entry named `name` if it is of kind `E`.
    pub fn entry_mut<E: EntryKind<B>>(&mut self, name: &str) -> Option<&mut E> {
        self.entries
            .iter_mut()
            .find(|e| e.adapter().name() == name)
            .and_then(E::of_mut)
    }

    /// The entries of kind `E`, in the order they were added.
    pub fn entries_of<'a, E: EntryKind<B> + 'a>(&'a self) -> impl Iterator<Item = &'a E> {
        self.entries.iter().filter_map(E::of)
    }

    /// Whether an adapter entry of any kind named `name` is attached here.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.entry_named(name).is_some()
    }

    /// Whether any entry is merged into the base weight.
    pub fn any_merged(&self) -> bool {
        self.entries.iter().any(|e| e.adapter().merged())
    }

    /// Attaches an entry of any kind. Its name must be new here and its
    /// shapes must fit the base layer.
    pub fn add(&mut self, entry: impl Into<SlotEntry<B>>, path: &str) -> Result<()> {
        let entry = entry.into();
        let name = entry.adapter().name();
        if self.has_adapter(name) {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        entry
            .adapter()
            .check_fits(self.d_input(), self.d_output(), path)?;
        self.entries.push(entry);
        Ok(())
    }

    /// Removes the entry `name` (unmerging it first if merged).
    pub fn remove(&mut self, name: &str) -> Option<SlotEntry<B>> {
        if self.entry_named(name)?.adapter().merged() {
            self.unmerge(name);
        }
        let pos = self
            .entries
            .iter()
            .position(|e| e.adapter().name() == name)?;
        self.state.active.retain(|n| n != name);
        let entry = self.entries.remove(pos);
        // An init that split the base weight (PiSSA, OLoRA) gives its part
        // back: removing an adapter leaves the layer as it was before it
        // came. (PEFT's `delete_adapter` leaves the residual.) A base
        // quantized since keeps its values: re-quantizing would change them.
        if let (Some(part), false) = (entry.adapter().split_off_base(), self.is_quantized()) {
            let w = self.base_weight() + part;
            self.set_base_weight(w);
        }
        Some(entry)
    }

    /// Removes every entry of kind `E` (a method's `clear`); activation is
    /// left to the caller.
    pub fn remove_all<E: EntryKind<B>>(&mut self) {
        self.entries.retain(|e| E::of(e).is_none());
    }

    /// Whether adapter `name` can be merged here (`path`: this layer's, for
    /// the message): an error names an entry whose merge could not be
    /// undone. An absent or already merged entry has nothing to check.
    pub fn check_merge(&self, name: &str, path: &str) -> Result<()> {
        match self.entry_named(name) {
            Some(e) if !e.adapter().merged() => match e.adapter().merge_refusal() {
                Some(why) => Err(PeftError::State(format!("{path}: {why}"))),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Folds adapter `name` (of any kind) into the base weight. Returns
    /// `false` if it is not attached here or already merged, and an error,
    /// changing nothing, for an entry whose merge could not be undone
    /// ([`check_merge`](Self::check_merge)).
    pub fn merge(&mut self, name: &str) -> Result<bool> {
        self.check_merge(name, "this layer")?;
        Ok(self.merge_checked(name))
    }

    /// [`merge`](Self::merge) of an entry already checked.
    fn merge_checked(&mut self, name: &str) -> bool {
        let merged = self.merge_entry(name);
        if merged {
            self.state.merged.push(name.to_string());
        }
        merged
    }

    /// Removes adapter `name` (of any kind) from the base weight, taking out
    /// first, newest first, whatever was merged after it, and merging that
    /// back afterwards. Returns `false` if it is not attached here or not
    /// merged.
    pub fn unmerge(&mut self, name: &str) -> bool {
        let Some(pos) = self.state.merged.iter().position(|n| n == name) else {
            // Merged outside this slot's bookkeeping (or not at all).
            return self.unmerge_entry(name);
        };
        let later = self.state.merged.split_off(pos + 1);
        for n in later.iter().rev() {
            self.unmerge_entry(n);
        }
        self.state.merged.pop();
        let unmerged = self.unmerge_entry(name);
        // Merged before, so checked before; their parameters are unchanged.
        for n in later {
            self.merge_checked(&n);
        }
        unmerged
    }

    /// Unmerges the merged adapters among `names`, newest merge first.
    pub fn unmerge_newest_first(&mut self, names: &[String]) {
        let order: Vec<String> = self.state.merged.iter().rev().cloned().collect();
        for n in order.iter().chain(names).filter(|n| names.contains(n)) {
            self.unmerge(n);
        }
    }

    fn merge_entry(&mut self, name: &str) -> bool {
        if self.entry_named(name).is_none_or(|e| e.adapter().merged()) {
            return false;
        }
        self.dequantize_base();
        self.fold(name, true)
    }

    fn unmerge_entry(&mut self, name: &str) -> bool {
        if !self.entry_named(name).is_some_and(|e| e.adapter().merged()) {
            return false;
        }
        self.fold(name, false)
    }

    /// Folds entry `name` into (`merge`) or out of the dense base.
    fn fold(&mut self, name: &str, merge: bool) -> bool {
        let mut parts = BaseParts {
            weight: self.base_weight(),
            bias: self.base.bias.as_ref().map(|b| b.val()),
        };
        let Some(entry) = self.entries.iter_mut().find(|e| e.adapter().name() == name) else {
            return false;
        };
        let adapter = entry.adapter_mut();
        match merge {
            true => adapter.merge_into(&mut parts),
            false => adapter.unmerge_from(&mut parts),
        }
        adapter.set_merged(merge);
        self.set_base_weight(parts.weight);
        if let (Some(b), Some(new)) = (self.base.bias.take(), parts.bias) {
            let new = new.detach();
            self.base.bias = Some(b.map(|_| new).set_require_grad(false));
        }
        true
    }

    fn set_base_weight(&mut self, w: Tensor<B, 2>) {
        let w = w.detach();
        self.base.weight = self.base.weight.clone().map(|_| w).set_require_grad(false);
    }

    /// Makes `names` (those attached here) the active adapters, in that
    /// order. Active entries train; the others are frozen, as in PEFT.
    pub fn set_active(&mut self, names: &[String]) {
        let active: Vec<String> = names
            .iter()
            .filter(|n| self.has_adapter(n))
            .cloned()
            .collect();
        self.entries = std::mem::take(&mut self.entries)
            .into_iter()
            .map(|e| {
                let train = active.iter().any(|n| n == e.adapter().name());
                e.with_training(train)
            })
            .collect();
        self.state.active = active;
    }

    /// Parameters of entries that train: active and not merged.
    pub fn trainable_params(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| !e.adapter().merged())
            .filter(|e| self.state.active.iter().any(|n| n == e.adapter().name()))
            .map(SlotEntry::num_params)
            .sum()
    }
}
