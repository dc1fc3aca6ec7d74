//! [`NormSlot`]: the adaptable norm layer (LayerNorm, RMSNorm), as
//! [`LinearSlot`](super::LinearSlot) is the adaptable linear layer.
//!
//! PEFT's LN tuning (`LNTuningLayer`) and its `modules_to_save` on a norm
//! (`ModulesToSaveWrapper`) both keep, per adapter, a trainable deep copy
//! of the norm layer and run the active adapter's copy in place of the
//! frozen one; at most one adapter may be active on a layer, and merging
//! swaps the copy into the base. They differ in their file keys and in
//! what `unload` leaves ([`NormCopyRole`]). A norm's parameters are a scale
//! and, for LayerNorm, a shift: the slot holds those, the copies, and which
//! copy the forward pass uses ([`NormSlot::params`]). The normalisation
//! itself stays the model's (its epsilon, its fused kernels).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use std::collections::HashMap;
use std::path::Path;

use super::copies::{activate, AdapterCopy};
use crate::error::{PeftError, Result};
use crate::io::{take_tensor, HostTensor, KEY_PREFIX};
use crate::routing;

/// Why an adapter copies a norm layer, which says the copy's keys in
/// PEFT's file and what `unload` leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormCopyRole {
    /// The method's own parameters (LN tuning): saved under
    /// `<path>.<key>.weight`; `unload` gives the base norm back.
    Tuned(&'static str),
    /// PEFT's `modules_to_save`: saved under `<path>.weight`; `unload`
    /// leaves the active adapter's copy in place of the base.
    Saved,
}

/// One adapter's trainable copy of a norm layer's parameters.
#[derive(Module, Debug)]
pub struct NormCopy<B: Backend> {
    /// The copy's scale `[d]`.
    pub weight: Param<Tensor<B, 1>>,
    /// The copy's shift `[d]`, present when the layer has one.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The adapter's name.
    #[module(skip)]
    pub name: String,
    /// What the copy is for.
    #[module(skip)]
    pub role: NormCopyRole,
}

impl<B: Backend> AdapterCopy for NormCopy<B> {
    fn adapter(&self) -> &str {
        &self.name
    }

    fn with_training(self, train: bool) -> Self {
        NormCopy {
            weight: self.weight.set_require_grad(train),
            bias: self.bias.map(|b| b.set_require_grad(train)),
            ..self
        }
    }
}

/// Slot-level state of a [`NormSlot`] that is not a parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NormSlotState {
    /// The active adapters that have a copy here (at most one outside a
    /// mixed batch).
    pub active: Vec<String>,
    /// With `true`, the forward pass uses the base parameters.
    pub disabled: bool,
    /// The adapter whose copy is swapped into the base, if any.
    pub merged: Option<String>,
}

/// What a norm layer computes with: one scale and shift for the whole
/// batch, or one per row of a mixed batch.
#[derive(Debug, Clone)]
pub enum NormParams<B: Backend> {
    /// Scale `[d]` and shift `[d]` for every row.
    Shared {
        /// Scale `[d]`.
        weight: Tensor<B, 1>,
        /// Shift `[d]`, if the layer has one.
        bias: Option<Tensor<B, 1>>,
    },
    /// Scale `[rows, d]` and shift `[rows, d]`, row `i` from the adapter
    /// that row `i` of the batch is routed through.
    PerRow {
        /// Scale `[rows, d]`.
        weight: Tensor<B, 2>,
        /// Shift `[rows, d]`, if the layer has one.
        bias: Option<Tensor<B, 2>>,
    },
}

/// An adaptable norm layer: frozen base parameters plus named copies.
#[derive(Module, Debug)]
pub struct NormSlot<B: Backend> {
    /// The base scale `[d]`. Frozen.
    pub weight: Param<Tensor<B, 1>>,
    /// The base shift `[d]` (LayerNorm); `None` for RMSNorm. Frozen.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The adapters' copies, in the order added; names unique.
    pub copies: Vec<NormCopy<B>>,
    /// Activation, disabling and merge state.
    #[module(skip)]
    pub state: NormSlotState,
}

impl<B: Backend> NormSlot<B> {
    /// A slot over a norm's `weight` `[d]` and optional `bias` `[d]`,
    /// frozen, with no copy.
    pub fn new(weight: Tensor<B, 1>, bias: Option<Tensor<B, 1>>) -> Self {
        NormSlot {
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            copies: Vec::new(),
            state: NormSlotState::default(),
        }
    }

    /// A norm of width `d`: scale 1, shift 0 if `bias`.
    pub fn identity(d: usize, bias: bool, device: &B::Device) -> Self {
        Self::new(
            Tensor::ones([d], device),
            bias.then(|| Tensor::zeros([d], device)),
        )
    }

    /// The layer's width.
    pub fn width(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Adapter `name`'s copy, if it has one here.
    pub fn copy(&self, name: &str) -> Option<&NormCopy<B>> {
        self.copies.iter().find(|c| c.name == name)
    }

    /// Adapter `name`'s copy, mutably.
    pub fn copy_mut(&mut self, name: &str) -> Option<&mut NormCopy<B>> {
        self.copies.iter_mut().find(|c| c.name == name)
    }

    /// Adds adapter `name`'s copy of the base parameters (PEFT's
    /// `deepcopy(layer)`) for `role`, frozen until activated.
    pub fn add_copy(&mut self, name: &str, role: NormCopyRole) -> Result<()> {
        if self.copy(name).is_some() {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        let copy = |p: &Param<Tensor<B, 1>>| Param::from_tensor(p.val().detach());
        self.copies.push(
            NormCopy {
                weight: copy(&self.weight),
                bias: self.bias.as_ref().map(copy),
                name: name.to_string(),
                role,
            }
            .with_training(false),
        );
        Ok(())
    }

    /// Removes adapter `name`'s copy (unmerging it first). Returns whether
    /// there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        if self.state.merged.as_deref() == Some(name) {
            self.unmerge();
        }
        let before = self.copies.len();
        self.copies.retain(|c| c.name != name);
        self.state.active.retain(|n| n != name);
        before != self.copies.len()
    }

    /// Removes every copy and resets the state (the base parameters stay
    /// as they are: a merged copy stays in the base).
    pub fn clear(&mut self) {
        self.copies.clear();
        self.state = NormSlotState::default();
    }

    /// Refuses activating `names` where more than one has a copy of this
    /// layer (`path`), as PEFT's LN tuning refuses to run with more than
    /// one active adapter.
    pub fn check_one_active(&self, names: &[String], path: &str) -> Result<()> {
        let here: Vec<&str> = names
            .iter()
            .filter(|n| self.copy(n).is_some())
            .map(String::as_str)
            .collect();
        if here.len() > 1 {
            return Err(PeftError::Config(format!(
                "{path}: adapters {here:?} each keep a copy of this norm layer (LN tuning or \
                 modules_to_save); only one of them can be active at a time, as in PEFT"
            )));
        }
        Ok(())
    }

    /// Makes `names` (those with a copy here) the active adapters: their
    /// copies train, the others are frozen.
    pub fn set_active(&mut self, names: &[String]) {
        self.state.active = activate(&mut self.copies, names);
    }

    /// Whether a copy is swapped into the base.
    pub fn any_merged(&self) -> bool {
        self.state.merged.is_some()
    }

    /// Swaps adapter `name`'s copy into the base (PEFT's merge), taking a
    /// copy merged before back out first, as PEFT does. Returns `false`
    /// when `name` has no copy here or is merged already.
    pub fn merge(&mut self, name: &str) -> bool {
        if self.copy(name).is_none() || self.state.merged.as_deref() == Some(name) {
            return false;
        }
        self.unmerge();
        self.swap(name);
        self.state.merged = Some(name.to_string());
        true
    }

    /// Swaps the merged copy back out (PEFT's unmerge). Returns whether one
    /// was merged.
    pub fn unmerge(&mut self) -> bool {
        match self.state.merged.take() {
            Some(name) => {
                self.swap(&name);
                true
            }
            None => false,
        }
    }

    /// Exchanges the base parameters with `name`'s copy, keeping each
    /// side's trainability.
    fn swap(&mut self, name: &str) {
        let base_weight = self.weight.val().detach();
        let base_bias = self.bias.as_ref().map(|b| b.val().detach());
        let Some(copy) = self.copies.iter_mut().find(|c| c.name == name) else {
            return;
        };
        let copy_weight = copy.weight.val().detach();
        copy.weight = copy.weight.clone().map(|_| base_weight);
        self.weight = self.weight.clone().map(|_| copy_weight);
        if let (Some(mine), Some(theirs), Some(base_bias)) =
            (&mut self.bias, &mut copy.bias, base_bias)
        {
            let copy_bias = theirs.val().detach();
            *theirs = theirs.clone().map(|_| base_bias);
            *mine = mine.clone().map(|_| copy_bias);
        }
    }

    /// Parameters of copies that train: active and not merged.
    pub fn trainable_params(&self) -> usize {
        self.copies
            .iter()
            .filter(|c| self.state.active.contains(&c.name))
            .filter(|c| self.state.merged.as_deref() != Some(c.name.as_str()))
            .map(Module::num_params)
            .sum()
    }

    /// What the forward pass computes with: the base parameters when
    /// disabled, merged or no active adapter has a copy here; else the
    /// active copy's; in a mixed batch
    /// ([`routing::with_row_adapters`]) each row's adapter's copy, the base
    /// for rows whose adapter has none.
    pub fn params(&self) -> NormParams<B> {
        let base = || NormParams::Shared {
            weight: self.weight.val(),
            bias: self.bias.as_ref().map(|b| b.val()),
        };
        if self.state.disabled || self.state.merged.is_some() || self.copies.is_empty() {
            return base();
        }
        if let Some(rows) = routing::row_adapters() {
            return self.per_row(&rows).unwrap_or_else(base);
        }
        match self.state.active.first().and_then(|n| self.copy(n)) {
            Some(c) => NormParams::Shared {
                weight: c.weight.val(),
                bias: c.bias.as_ref().map(|b| b.val()),
            },
            None => base(),
        }
    }

    /// Each row's parameters, stacked; `None` when no row's adapter has a
    /// copy here.
    fn per_row(&self, rows: &[String]) -> Option<NormParams<B>> {
        // Index 0 is the base; copy i is index i + 1.
        let pick: Vec<i64> = rows
            .iter()
            .map(|r| {
                self.copies
                    .iter()
                    .position(|c| &c.name == r)
                    .map_or(0, |i| i as i64 + 1)
            })
            .collect();
        if pick.iter().all(|&i| i == 0) {
            return None;
        }
        let device = self.weight.device();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(pick, [rows.len()]), &device);
        let table = |base: Tensor<B, 1>, copies: Vec<Tensor<B, 1>>| {
            let all: Vec<Tensor<B, 2>> = std::iter::once(base)
                .chain(copies)
                .map(|t| t.unsqueeze_dim(0))
                .collect();
            Tensor::cat(all, 0).select(0, index.clone())
        };
        let weight = table(
            self.weight.val(),
            self.copies.iter().map(|c| c.weight.val()).collect(),
        );
        let bias = self.bias.as_ref().map(|b| {
            table(
                b.val(),
                self.copies
                    .iter()
                    .map(|c| c.bias.as_ref().map_or_else(|| b.val(), |cb| cb.val()))
                    .collect(),
            )
        });
        Some(NormParams::PerRow { weight, bias })
    }
}

/// PEFT's file layout for a copy: `<path>.<key>.weight` and `.bias` for
/// LN tuning (`key`: `ln_tuning_layers`), `<path>.weight` and `.bias` for
/// `modules_to_save`; the adapter's name is not in the key.
impl<B: Backend> NormSlot<B> {
    /// Appends adapter `name`'s copy of this layer (module `path`), if it
    /// has one, under PEFT's keys.
    pub fn write_copy(&self, path: &str, name: &str, out: &mut Vec<(String, HostTensor)>) {
        let Some(copy) = self.copy(name) else {
            return;
        };
        let prefix = copy_prefix(path, copy.role);
        out.push((
            format!("{prefix}.weight"),
            HostTensor::from_tensor(copy.weight.val()),
        ));
        if let Some(b) = &copy.bias {
            out.push((format!("{prefix}.bias"), HostTensor::from_tensor(b.val())));
        }
    }

    /// Moves adapter `name`'s copy of this layer (module `path`), if it
    /// has one, out of `tensors` (read from `file`): its scale, and its
    /// shift exactly when the layer has one, each of the layer's width.
    pub fn read_copy(
        &mut self,
        path: &str,
        name: &str,
        tensors: &mut HashMap<String, HostTensor>,
        file: &Path,
    ) -> Result<()> {
        let Some(copy) = self.copy(name) else {
            return Ok(());
        };
        let (d, device) = (self.width(), self.weight.device());
        let prefix = copy_prefix(path, copy.role);
        let mut take = |part: &str| -> Result<Tensor<B, 1>> {
            let key = format!("{prefix}.{part}");
            take_tensor(tensors, &key, file)?.to_tensor([d], &key, &device)
        };
        let weight = take("weight")?;
        let bias = match self.bias {
            Some(_) => Some(take("bias")?),
            None => None,
        };
        let train = self.state.active.iter().any(|n| n == name);
        let param = |t: Tensor<B, 1>| Param::from_tensor(t).set_require_grad(train);
        let copy = self.copy_mut(name).expect("checked above");
        copy.weight = param(weight);
        copy.bias = bias.map(param);
        Ok(())
    }
}

/// The key prefix of a copy of the norm at `path` in PEFT's file.
fn copy_prefix(path: &str, role: NormCopyRole) -> String {
    match role {
        NormCopyRole::Tuned(key) => format!("{KEY_PREFIX}{path}.{key}"),
        NormCopyRole::Saved => format!("{KEY_PREFIX}{path}"),
    }
}
