//! Layer-by-layer training: the seam a model exposes so that a training step
//! never keeps more than one layer's autodiff graph, and so, with a
//! quantized base, never more than one layer's dequantized weights.
//!
//! An autodiff graph keeps the `f32` weight of every matmul it will
//! differentiate through. [`loss_and_grads_by_layer`] therefore runs a
//! forward pass that records no graph (every parameter frozen), keeping only
//! each layer's input; then it runs the head and each layer again from the
//! top, with a graph, differentiating `(y_i · g_{i+1}).sum()`: that gives
//! layer `i`'s parameter gradients and `g_i`, the gradient of its input. The
//! gradients equal those of one ordinary backward pass.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};

/// A model that runs as input embeddings → a stack of layers → a head, each
/// layer a function of its input and of a context shared by all layers.
pub trait LayeredModel<B: Backend> {
    /// What every layer reads besides its input (attention masks, rotary
    /// tables): constants, never parameters.
    type Context;

    /// The first layer's input `[b, t, d]` for `ids: [b, t]` (embeddings,
    /// positions added where the model adds them), and the context.
    fn layer_input(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> (Tensor<B, 3>, Self::Context);

    /// Number of layers.
    fn num_layers(&self) -> usize;

    /// Layer `i` on its input `[b, t, d]`.
    fn run_layer(&self, i: usize, x: Tensor<B, 3>, context: &Self::Context) -> Tensor<B, 3>;

    /// Final norm and head: logits `[b, t, vocab]` of the last layer's output.
    fn run_head(&self, x: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// The loss of one batch and the gradients of every trainable parameter of
/// `model`, computed one layer at a time (see the module documentation).
///
/// `loss` maps logits `[b, t, vocab]` to the scalar to differentiate. Dropout
/// draws the same masks in both passes: the RNG is reseeded from `seed`
/// before each layer. Parameters before the first layer (token embeddings)
/// receive no gradient.
pub fn loss_and_grads_by_layer<B, M>(
    model: &M,
    ids: Tensor<B, 2, Int>,
    attention_mask: Option<Tensor<B, 2>>,
    seed: u64,
    loss: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 1>,
) -> (f64, GradientsParams)
where
    B: AutodiffBackend,
    M: LayeredModel<B> + AutodiffModule<B> + Clone,
{
    let device = ids.device();
    let layer_seed = |i: usize| seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // Pass 1: nothing tracked (every parameter frozen in this clone), so no
    // graph is recorded; dropout still runs as in training.
    let frozen = model.clone().no_grad();
    let (mut x, context) = frozen.layer_input(ids, attention_mask);
    let layers = model.num_layers();
    let mut inputs = Vec::with_capacity(layers);
    for i in 0..layers {
        inputs.push(x.clone());
        B::seed(&device, layer_seed(i));
        x = frozen.run_layer(i, x, &context);
    }
    drop(frozen);
    // Pass 2: the head, then each layer from the top.
    let mut accum = GradientsAccumulator::<M>::new();
    let last = x.detach().require_grad();
    B::seed(&device, layer_seed(layers));
    let l = loss(model.run_head(last.clone()));
    let value = l.clone().into_scalar().elem::<f64>();
    let mut grads = l.backward();
    let mut upstream = last.grad(&grads);
    accum.accumulate(model, GradientsParams::from_module(&mut grads, model));
    for i in (0..layers).rev() {
        let Some(g) = upstream.take() else { break };
        let x = inputs.pop().expect("one input per layer").detach();
        let x = if i > 0 { x.require_grad() } else { x };
        B::seed(&device, layer_seed(i));
        let y = model.run_layer(i, x.clone(), &context);
        let mut grads = (y * Tensor::from_inner(g)).sum().backward();
        if i > 0 {
            upstream = x.grad(&grads);
        }
        accum.accumulate(model, GradientsParams::from_module(&mut grads, model));
    }
    (value, accum.grads())
}
