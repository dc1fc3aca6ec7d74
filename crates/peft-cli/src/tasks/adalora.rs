//! AdaLoRA in `peft train`: the run's step count as `total_step` where the
//! config leaves it out, PEFT's orthogonal regularisation in the loss
//! ([`regularization`]) and the rank allocator after every optimizer step
//! ([`AdaLoraSteps`], PEFT's `update_and_allocate`).

use std::marker::PhantomData;

use burn::module::{Module, ModuleDisplay};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use peft_core::method_config::MethodConfig;
use peft_core::slot_method::AdapterConfig;
use peft_core::{PeftError, PeftModel, Result};
use peft_lora::{orthogonal_regularization, AdaLoraConfig, RankAllocator};

use super::{Adapted, Classifier, Method, Slots};
use crate::train::StepHook;

/// The AdaLoRA config of `method`, if it is one.
fn adalora_of(method: &mut Method) -> Option<&mut AdaLoraConfig> {
    match method {
        Method::Slot(c) => c.inner_mut().downcast_mut::<AdaLoraConfig>(),
        _ => None,
    }
}

/// `method` made ready for a run of `steps` optimizer steps: AdaLoRA's
/// `total_step` is the run's where its config leaves it out (PEFT requires
/// it; `peft train` knows it). A resumed AdaLoRA run is refused: the
/// allocator's scores are not in the checkpoint, and `last/` holds the
/// pruned layers.
pub fn for_run(method: &Method, steps: usize, resuming: bool) -> Result<Method> {
    let mut method = method.clone();
    if let Some(config) = adalora_of(&mut method) {
        if resuming {
            return Err(PeftError::Config(
                "--resume: an AdaLoRA run cannot resume (its rank allocator's scores are not checkpointed); start it again".into(),
            ));
        }
        if config.total_step.is_none() {
            config.total_step = Some(steps);
            // The schedule is checked against the run's steps now.
            config.validate()?;
        }
    }
    Ok(method)
}

/// A training model that may hold the slot adapters: a causal model, or a
/// classifier's encoder.
pub trait HoldsSlots<B: Backend, M: Module<B>> {
    /// The slot adapters, if the method is a slot method.
    fn slots(&self) -> Option<&Slots<B, M>>;

    /// The same, mutably.
    fn slots_mut(&mut self) -> Option<&mut Slots<B, M>>;
}

impl<B: Backend, M: Module<B>> HoldsSlots<B, M> for Adapted<B, M> {
    fn slots(&self) -> Option<&Slots<B, M>> {
        match self {
            Adapted::Slots(s) => Some(s),
            _ => None,
        }
    }

    fn slots_mut(&mut self) -> Option<&mut Slots<B, M>> {
        match self {
            Adapted::Slots(s) => Some(s),
            _ => None,
        }
    }
}

impl<B: Backend, M: Module<B> + ModuleDisplay> HoldsSlots<B, M> for Classifier<B, Adapted<B, M>> {
    fn slots(&self) -> Option<&Slots<B, M>> {
        self.encoder.slots()
    }

    fn slots_mut(&mut self) -> Option<&mut Slots<B, M>> {
        self.encoder.slots_mut()
    }
}

/// The AdaLoRA adapter being trained (the active one whose config is
/// AdaLoRA's and not for inference), with its config.
fn trained<B: Backend, M: PeftModel<B>>(slots: &Slots<B, M>) -> Option<(&str, &AdaLoraConfig)> {
    slots.active_adapters().iter().find_map(|name| {
        let config = slots
            .config(name)
            .ok()?
            .inner()
            .downcast_ref::<AdaLoraConfig>()?;
        (!config.inference_mode).then_some((name.as_str(), config))
    })
}

/// PEFT's `AdaLoraModel.forward` addition to the training loss:
/// `orth_reg_weight` times the trained AdaLoRA adapter's orthogonal
/// regularisation; `None` for any other method.
pub fn regularization<B, M, T>(model: &T) -> Option<Tensor<B, 1>>
where
    B: Backend,
    M: PeftModel<B> + Module<B>,
    T: HoldsSlots<B, M>,
{
    let slots = model.slots()?;
    let (name, config) = trained(slots)?;
    let weight = config.orth_reg_weight;
    if weight == 0.0 {
        return None;
    }
    orthogonal_regularization(&slots.model, name).map(|r| r * weight)
}

/// The rank allocator of the trained AdaLoRA adapter, called around every
/// optimizer step.
pub struct AdaLoraSteps<B, M> {
    allocator: RankAllocator,
    _model: PhantomData<(B, M)>,
}

impl<B: Backend, M: PeftModel<B> + Module<B>> AdaLoraSteps<B, M> {
    /// The allocator for `model`'s trained AdaLoRA adapter; `None` when it
    /// trains no AdaLoRA adapter.
    pub fn for_model<T: HoldsSlots<B, M>>(model: &T) -> Result<Option<Self>> {
        let Some(slots) = model.slots() else {
            return Ok(None);
        };
        let Some((name, _)) = trained(slots) else {
            return Ok(None);
        };
        Ok(Some(AdaLoraSteps {
            allocator: RankAllocator::new(slots, name)?,
            _model: PhantomData,
        }))
    }
}

impl<B, M, T> StepHook<T> for AdaLoraSteps<B, M>
where
    B: AutodiffBackend,
    M: PeftModel<B> + Module<B>,
    T: HoldsSlots<B, M>,
{
    fn before_step(&mut self, model: &T, grads: &GradientsParams) {
        if let Some(slots) = model.slots() {
            self.allocator.observe(&slots.model, grads);
        }
    }

    fn after_step(&mut self, mut model: T, step: usize) -> Result<T> {
        if let Some(slots) = model.slots_mut() {
            self.allocator.update_and_allocate(slots, step)?;
        }
        Ok(model)
    }
}
