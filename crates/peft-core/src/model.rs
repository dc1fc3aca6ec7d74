//! What a model exposes to PEFT: one trait, [`PeftModel`].
//!
//! A model author replaces each adaptable `Linear` with a
//! [`LinearSlot`](crate::LinearSlot), names those slots with their Hugging
//! Face module paths (the paths PEFT uses in `target_modules` and in adapter
//! files, e.g. `model.layers.3.self_attn.q_proj`), and writes one forward
//! entry, [`PeftModel::run`], that honours a [`ModelInput`]: ids or
//! embeddings (prompt tuning), a key/value cache (prefix tuning,
//! generation) and a [`ResidualHook`] at the residual joins (bottleneck
//! adapters). `docs/NEW_MODEL.md` walks through one.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::count::ParamCount;
use crate::error::Result;
pub use crate::input::{join, residual_join, InsertionPoint, JoinNorm, ResidualHook};
use crate::input::{ModelDims, ModelInput};
use crate::slot::{EmbeddingSlot, LinearSlot, NormSlot};

/// A model whose linear layers PEFT can adapt.
///
/// Invariant: paths are unique, stable across calls, and visited in the
/// same order by both visitors.
pub trait PeftModel<B: Backend>: Module<B> {
    /// What [`run`](Self::run) returns: logits `[b, t, vocab]` for a
    /// language model, last hidden states `[b, t, d]` for an encoder.
    type Output;

    /// The one forward pass: every method reaches the model through it (see
    /// [`ModelInput`] for what each field asks of the model).
    fn run(&self, input: ModelInput<'_, B>) -> Self::Output;

    /// The sizes the methods build their tensors from.
    fn dims(&self) -> ModelDims;

    /// The word embeddings `[b, t, d_model]` of `ids: [b, t]`, before
    /// positions are added: what [`Tokens::Embeds`](crate::input::Tokens::Embeds)
    /// replaces.
    fn embed_tokens(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3>;

    /// The module path AdapterHub stores a residual join's adapters under,
    /// without the head's prefix (e.g. `encoder.layer.3.output` for BERT,
    /// `h.3.output_adapters` for GPT-2, `model.layers.3.attention_adapters`
    /// for Llama): adapter files name their tensors `<that path>.adapters.<name>....`.
    fn hook_path(&self, point: InsertionPoint, layer: usize) -> String;

    /// Calls `f` with each adaptable linear and its module path.
    fn visit_linears(&self, f: &mut dyn FnMut(&str, &LinearSlot<B>));

    /// Calls `f` with each adaptable linear, mutably, and its module path.
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut LinearSlot<B>));

    /// Calls `f` with each adaptable norm layer (LayerNorm, RMSNorm) and its
    /// module path (`model.layers.3.input_layernorm`): what LN tuning
    /// adapts. A model without norm slots keeps the default, none.
    fn visit_norms(&self, _f: &mut dyn FnMut(&str, &NormSlot<B>)) {}

    /// Calls `f` with each adaptable norm layer, mutably, and its path.
    fn visit_norms_mut(&mut self, _f: &mut dyn FnMut(&str, &mut NormSlot<B>)) {}

    /// Every adaptable norm path, in visiting order.
    fn norm_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit_norms(&mut |p, _| out.push(p.to_string()));
        out
    }

    /// Calls `f` with each adaptable token-embedding table and its module
    /// path (`model.embed_tokens`), the model's input embedding first:
    /// what `modules_to_save` copies and trainable tokens retrain. A model
    /// without embedding slots keeps the default, none.
    fn visit_embeddings(&self, _f: &mut dyn FnMut(&str, &EmbeddingSlot<B>)) {}

    /// Calls `f` with each adaptable embedding table, mutably, and its path.
    fn visit_embeddings_mut(&mut self, _f: &mut dyn FnMut(&str, &mut EmbeddingSlot<B>)) {}

    /// Every adaptable embedding path, in visiting order (the input
    /// embedding first).
    fn embedding_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit_embeddings(&mut |p, _| out.push(p.to_string()));
        out
    }

    /// The path of the output head that computes with the input
    /// embedding's table (`lm_head` of a model with tied embeddings), if
    /// the model has one: PEFT's file names it for a copy that ties it.
    fn tied_head_path(&self) -> Option<&str> {
        None
    }

    /// The pooled output `[b, d]` of the last hidden states `[b, t, d]`
    /// (BERT's pooler: `tanh` of a dense layer on the first token), for
    /// heads that read it; `None` for a model without one.
    fn pooled_output(&self, hidden: Tensor<B, 3>) -> Option<Tensor<B, 2>> {
        let _ = hidden;
        None
    }

    /// The Hugging Face `model_type` (`llama`, `gpt2`, `bert`, ...), used to
    /// pick PEFT's default targets when a config names none.
    fn model_type(&self) -> Option<&str> {
        None
    }

    /// Paths of the output heads (`lm_head`, `classifier`): PEFT's
    /// `all-linear` leaves them out.
    fn output_layers(&self) -> Vec<String> {
        Vec::new()
    }

    /// Every adaptable linear path, in visiting order.
    fn linear_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit_linears(&mut |p, _| out.push(p.to_string()));
        out
    }

    /// Keeps the base weight of every adaptable linear layer quantized to
    /// NF4, as QLoRA does (embeddings and norms stay as they are). Returns
    /// how many layers were quantized; layers already quantized are left
    /// alone. A layer with a merged adapter is an error naming it.
    fn quantize_base_nf4(&mut self) -> Result<usize> {
        let (mut done, mut failed) = (0, None);
        self.visit_linears_mut(&mut |path, slot| {
            if failed.is_some() || slot.is_quantized() {
                return;
            }
            match slot.quantize_nf4(path) {
                Ok(()) => done += 1,
                Err(e) => failed = Some(e),
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Trainable (active, unmerged adapter entries) and total parameters
    /// (base weights kept quantized included).
    fn param_count(&self) -> ParamCount {
        let (mut trainable, mut quantized) = (0, 0);
        self.visit_linears(&mut |_, s| {
            trainable += s.trainable_params();
            quantized += s.quantized_params();
        });
        self.visit_norms(&mut |_, s| trainable += s.trainable_params());
        self.visit_embeddings(&mut |_, s| trainable += s.trainable_params());
        ParamCount {
            trainable,
            // Quantized base weights are parameters no tensor holds.
            all: self.num_params() + quantized,
        }
    }
}

/// The device a module's parameters are on (the default device for a
/// module without any): where a method creates the tensors it adds.
pub fn device_of<B: Backend, M: Module<B>>(module: &M) -> B::Device {
    module.devices().into_iter().next().unwrap_or_default()
}
