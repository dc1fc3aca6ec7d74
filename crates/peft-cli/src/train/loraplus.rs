//! The run's optimizers ([`Optimizers`]): one AdamW over every trainable
//! parameter, or LoRA+ (Hayou et al., 2024) as PEFT's
//! `create_loraplus_optimizer` groups the parameters:
//!
//! | group | parameters | learning rate | weight decay |
//! |---|---|---|---|
//! | A | everything else (LoRA's `A`, a copied head's weight) | `lr` | the run's |
//! | B | LoRA's `B` matrices and every other vector (DoRA's magnitudes, (IA)³ / VeRA vectors) | `ratio × lr` | the run's |
//! | B, no decay | vectors named `bias` | `ratio × lr` | none |
//!
//! Each group is its own AdamW, stepped with its share of the gradients;
//! a checkpoint holds the three states as one (each parameter is in one
//! group).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use peft_core::Result;

use super::config::TrainConfig;
use super::optimizer::{self, Optim, OptimRecord};

/// A trainable parameter's LoRA+ group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// At the base learning rate.
    A,
    /// At `ratio ×` the learning rate.
    B,
    /// At `ratio ×` the learning rate, without weight decay (biases).
    BNoDecay,
}

/// PEFT's rule, on a parameter's module path (field names, enum variants)
/// and rank: `"lora_B" in name or param.ndim == 1`, biases undecayed.
fn group_of(path: &[String], rank: usize) -> Group {
    let n = path.len();
    let lora_b = n >= 2 && path[n - 2] == "Lora" && path[n - 1] == "b";
    let bias = path.last().is_some_and(|f| f.contains("bias"));
    match (rank, lora_b, bias) {
        (1, _, true) => Group::BNoDecay,
        (1, _, false) | (_, true, _) => Group::B,
        _ => Group::A,
    }
}

/// Walks a module keeping the path of the field being visited.
struct Walk<F> {
    path: Vec<String>,
    on_param: F,
}

impl<B: Backend, F: FnMut(&[String], usize, ParamId)> ModuleVisitor<B> for Walk<F> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        (self.on_param)(&self.path, D, param.id);
    }
}

/// The LoRA+ group of every float parameter of `module`, by id.
pub fn groups<B: Backend, M: Module<B>>(module: &M) -> HashMap<ParamId, Group> {
    let mut out = HashMap::new();
    let mut walk = Walk {
        path: Vec::new(),
        on_param: |path: &[String], rank, id| {
            out.insert(id, group_of(path, rank));
        },
    };
    module.visit(&mut walk);
    out
}

/// Moves the gradients of groups B and B-no-decay out of `grads`.
struct Split<'a, B> {
    groups: &'a HashMap<ParamId, Group>,
    grads: &'a mut GradientsParams,
    b: GradientsParams,
    b_no_decay: GradientsParams,
    _backend: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Split<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let to = match self.groups.get(&param.id) {
            Some(Group::B) => &mut self.b,
            Some(Group::BNoDecay) => &mut self.b_no_decay,
            Some(Group::A) | None => return,
        };
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            to.register::<B::InnerBackend, D>(param.id, g);
        }
    }
}

/// LoRA+'s second and third optimizers and its ratio.
struct Plus<M: AutodiffModule<B>, B: AutodiffBackend> {
    ratio: f64,
    /// Each parameter's group, found on the first step (a module keeps its
    /// parameter ids from step to step).
    groups: HashMap<ParamId, Group>,
    b: Optim<M, B>,
    b_no_decay: Optim<M, B>,
}

/// The optimizers of a run (see the module docs).
pub struct Optimizers<M: AutodiffModule<B>, B: AutodiffBackend> {
    a: Optim<M, B>,
    plus: Option<Plus<M, B>>,
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Optimizers<M, B> {
    /// AdamW as `adamw` configures it, for every group; with
    /// `loraplus_ratio`, LoRA+'s three groups (the no-decay group's weight
    /// decay zero).
    pub fn new(adamw: &AdamWConfig, loraplus_ratio: Option<f64>) -> Self {
        Optimizers {
            a: adamw.init(),
            plus: loraplus_ratio.map(|ratio| Plus {
                ratio,
                groups: HashMap::new(),
                b: adamw.init(),
                b_no_decay: adamw.clone().with_weight_decay(0.0).init(),
            }),
        }
    }

    /// The run's optimizers: AdamW with its weight decay and clipping (and
    /// its `loraplus_lr_ratio`).
    pub fn for_run(config: &TrainConfig) -> Self {
        let adamw = AdamWConfig::new()
            .with_weight_decay(config.weight_decay as f32)
            .with_epsilon(config.adam_epsilon as f32)
            .with_grad_clipping(
                config
                    .clip_norm
                    .map(|c| GradientClippingConfig::Norm(c as f32)),
            );
        Self::new(&adamw, config.loraplus_lr_ratio)
    }

    /// One step at learning rate `lr` (LoRA+'s B groups at `ratio × lr`).
    pub fn step(&mut self, lr: f64, model: M, mut grads: GradientsParams) -> M {
        let Some(plus) = &mut self.plus else {
            return self.a.step(lr, model, grads);
        };
        if plus.groups.is_empty() {
            plus.groups = groups(&model);
        }
        let mut split = Split::<B> {
            groups: &plus.groups,
            grads: &mut grads,
            b: GradientsParams::new(),
            b_no_decay: GradientsParams::new(),
            _backend: PhantomData,
        };
        model.visit(&mut split);
        let (b, b_no_decay) = (split.b, split.b_no_decay);
        let model = self.a.step(lr, model, grads);
        let model = plus.b.step(lr * plus.ratio, model, b);
        plus.b_no_decay.step(lr * plus.ratio, model, b_no_decay)
    }

    /// The state saved in `dir` (a `last/` checkpoint) for `model`'s
    /// parameters (see [`optimizer::load_state`]).
    pub(super) fn load_state(self, model: &M, dir: &Path, device: &B::Device) -> Result<Self> {
        let a = optimizer::load_state(self.a, model, dir, device)?;
        let plus = match self.plus {
            None => None,
            Some(p) => Some(Plus {
                ratio: p.ratio,
                groups: p.groups,
                b: optimizer::load_state(p.b, model, dir, device)?,
                b_no_decay: optimizer::load_state(p.b_no_decay, model, dir, device)?,
            }),
        };
        Ok(Optimizers { a, plus })
    }

    /// The state as one file's bytes: each group's optimizer contributes
    /// its own parameters' moments.
    pub(super) fn state_bytes(&self, model: &M) -> Result<Vec<u8>> {
        let Some(plus) = &self.plus else {
            return optimizer::record_bytes(self.a.to_record(), model);
        };
        let groups = groups(model);
        let mut record = OptimRecord::<M, B>::default();
        for (optim, group) in [
            (&self.a, Group::A),
            (&plus.b, Group::B),
            (&plus.b_no_decay, Group::BNoDecay),
        ] {
            record.extend(
                optim
                    .to_record()
                    .into_iter()
                    .filter(|(id, _)| groups.get(id) == Some(&group)),
            );
        }
        optimizer::record_bytes(record, model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(burn::module::Module, Debug)]
    struct Weight<B: burn::tensor::backend::Backend> {
        w: burn::module::Param<burn::tensor::Tensor<B, 1>>,
    }

    /// `--adam-epsilon` reaches AdamW: a first step on a gradient of 1e-6
    /// moves the weight by `lr·g / (|g| + eps)` (bias-corrected), 0.099
    /// with PyTorch's 1e-8 and 0.0091 with Burn's 1e-5.
    #[test]
    fn adam_epsilon_is_the_configs() {
        use burn::tensor::{ElementConversion, Tensor};
        type B = burn::backend::Autodiff<burn::backend::NdArray>;
        let moved = |eps: f64| -> f64 {
            let device = Default::default();
            let m = Weight::<B> {
                w: burn::module::Param::from_tensor(Tensor::from_floats([1.0], &device)),
            };
            let loss = m.w.val().sum() * 1e-6;
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let config = TrainConfig {
                adam_epsilon: eps,
                weight_decay: 0.0,
                clip_norm: None,
                ..Default::default()
            };
            let m = Optimizers::for_run(&config).step(0.1, m, grads);
            1.0 - m.w.val().into_scalar().elem::<f64>()
        };
        for eps in [1e-8, 1e-5] {
            let want = 0.1 * 1e-6 / (1e-6 + eps);
            let got = moved(eps);
            assert!(
                (got - want).abs() < 1e-5,
                "eps {eps}: moved {got}, want {want}"
            );
        }
    }

    #[test]
    fn peft_groups_by_name_and_rank() {
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let lora = ["layer", "0", "query", "entries", "0", "Lora"];
        assert_eq!(group_of(&path(&[&lora[..], &["a"]].concat()), 2), Group::A);
        assert_eq!(group_of(&path(&[&lora[..], &["b"]].concat()), 2), Group::B);
        assert_eq!(
            group_of(&path(&[&lora[..], &["magnitude"]].concat()), 1),
            Group::B
        );
        assert_eq!(
            group_of(&path(&["classifier", "ModuleCopy", "weight"]), 2),
            Group::A
        );
        assert_eq!(
            group_of(&path(&["classifier", "ModuleCopy", "bias"]), 1),
            Group::BNoDecay
        );
        assert_eq!(group_of(&path(&["x", "Vera", "lambda_b"]), 1), Group::B);
        // A LoHa factor named `b`-something is not LoRA's B.
        assert_eq!(
            group_of(&path(&["x", "Loha", "factors", "w1_b"]), 2),
            Group::A
        );
    }
}
