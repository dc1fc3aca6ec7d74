//! Gradients of one micro-batch: the loss a task gives ([`BatchLoss`]),
//! its backward pass and weighting, and the non-finite check.

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

/// The module path of the first parameter whose gradient in `grads` holds
/// a NaN or an infinity (its absolute sum is not finite).
pub(super) fn non_finite_gradient<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> Option<String> {
    struct Check<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        bad: Option<String>,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Check<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if self.bad.is_some() {
                return;
            }
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let sum: f64 = g.abs().sum().into_scalar().elem::<f64>();
                if !sum.is_finite() {
                    let path = self.path.iter().filter(|p| !p.is_empty()).cloned();
                    self.bad = Some(path.collect::<Vec<_>>().join("."));
                }
            }
        }
    }
    let mut check = Check {
        grads,
        path: Vec::new(),
        bad: None,
    };
    model.visit(&mut check);
    check.bad
}

/// The loss of one micro-batch, as `fit`'s `loss` gives it.
pub enum BatchLoss<B: AutodiffBackend> {
    /// A loss with its graph: `fit` runs the backward pass.
    Graph(Tensor<B, 1>),
    /// A loss already differentiated (layer by layer, for a quantized base):
    /// its value and the gradients of every trainable parameter.
    Differentiated {
        /// The loss.
        value: f64,
        /// Its gradients, unscaled.
        grads: GradientsParams,
    },
}

/// Multiplies every gradient in `grads` that belongs to `model` by `factor`.
fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    factor: f64,
) -> GradientsParams {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g * self.factor);
            }
        }
    }
    let mut grads = grads;
    model.visit(&mut Scale {
        grads: &mut grads,
        factor,
    });
    grads
}

/// The value of a micro-batch's loss, its token count, and its gradients
/// scaled by `weight`.
pub(super) fn differentiate<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    (loss, n_tokens): (BatchLoss<B>, usize),
    weight: f64,
) -> (f64, usize, GradientsParams) {
    match loss {
        BatchLoss::Graph(l) => {
            let value = l.clone().into_scalar().elem::<f32>() as f64;
            let grads = GradientsParams::from_grads((l * weight).backward(), model);
            (value, n_tokens, grads)
        }
        BatchLoss::Differentiated { value, grads } if weight == 1.0 => (value, n_tokens, grads),
        BatchLoss::Differentiated { value, grads } => {
            (value, n_tokens, scale_grads(model, grads, weight))
        }
    }
}

/// Gives every trainable parameter a fresh autodiff leaf (same values, same
/// `ParamId`). Replicas built this way record separate graphs: Burn 0.21's
/// autodiff deadlocks when two threads extend graphs that share a leaf
/// (one thread in `backward` holding the graph while waiting for the graph
/// locator, the other holding the locator while waiting for that graph).
pub(super) struct FreshLeaves;

impl<B: AutodiffBackend> burn::module::ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        if param.is_require_grad() {
            param.set_require_grad(false).set_require_grad(true)
        } else {
            param
        }
    }
}
