//! The seams a model exposes to PEFT.
//!
//! A model author replaces each adaptable `Linear` with a
//! [`LinearSlot`](crate::LinearSlot) and implements [`PeftModel`] by naming
//! those slots with their Hugging Face module paths (the paths PEFT uses in
//! `target_modules` and in adapter files, e.g.
//! `model.layers.3.self_attn.q_proj`). Nothing else in the model changes.
//!
//! The traits for prefix tuning, prompt tuning and bottleneck adapters are
//! the seams the method crates `peft-prefix`, `peft-prompt` and
//! `peft-adapter` will build on; their shapes are fixed here so that models
//! written now keep working when those crates land.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::count::ParamCount;
use crate::error::Result;
use crate::kv::KvCache;
use crate::slot::LinearSlot;

/// A model whose linear layers PEFT can adapt.
///
/// Invariant: paths are unique, stable across calls, and visited in the
/// same order by both visitors.
pub trait PeftModel<B: Backend>: Module<B> {
    /// Calls `f` with each adaptable linear and its module path.
    fn visit_linears(&self, f: &mut dyn FnMut(&str, &LinearSlot<B>));

    /// Calls `f` with each adaptable linear, mutably, and its module path.
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut LinearSlot<B>));

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
        ParamCount {
            trainable,
            // Quantized base weights are parameters no tensor holds.
            all: self.num_params() + quantized,
        }
    }
}

/// Per-layer key/value input to attention, for prefix tuning.
///
/// The model's attention puts the prefix's keys/values
/// (`[batch, kv_heads, n_virtual, head_dim]` per layer, no RoPE applied to
/// them) before its own, every real token attends to all of them, and real
/// positions start at `n_virtual`, as in PEFT. In generation the prefix is
/// simply the first entry of the model's [`KvCache`].
pub trait AttentionPrefixSeam<B: Backend> {
    /// What the model returns (logits, hidden states).
    type PrefixOutput;
    /// Number of attention layers.
    fn num_attention_layers(&self) -> usize;
    /// `(kv_heads, head_dim)` of every layer.
    fn kv_shape(&self) -> (usize, usize);
    /// The forward pass of `ids: [batch, seq]` after `prefix` (one
    /// [`LayerCache`](crate::kv::LayerCache) per layer). `attention_mask:
    /// [batch, seq]` covers the real tokens only; the prefix is always visible.
    fn forward_with_prefix(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
        prefix: KvCache<B>,
    ) -> Self::PrefixOutput;
}

/// Access to the input embeddings, for prompt tuning and P-tuning: embed
/// the ids, prepend virtual-token embeddings, run the rest of the model.
pub trait EmbeddingSeam<B: Backend> {
    /// What the model returns (logits, hidden states).
    type Output;
    /// The word embeddings of `ids: [batch, seq]`: `[batch, seq, d_model]`.
    fn embed_tokens(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3>;
    /// Embedding width.
    fn d_model(&self) -> usize;
    /// Number of rows of the word-embedding table.
    fn vocab_size(&self) -> usize;
    /// The model's forward pass from word embeddings `[batch, seq, d_model]`
    /// (positions `0..seq`; `attention_mask: [batch, seq]`, 1 = attend).
    fn forward_embeds(
        &self,
        embeds: Tensor<B, 3>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Self::Output;
}

/// The two residual joins of a transformer layer, where bottleneck adapters
/// sit (AdapterHub's `mh_adapter` and `output_adapter` locations). A
/// parallel adapter (`par_bn`) also sits at [`AfterFeedForward`](Self::AfterFeedForward):
/// it reads the join's residual input, the feed-forward block's input side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InsertionPoint {
    /// Where the attention block's output (after its output projection)
    /// meets its residual.
    AfterAttention,
    /// Where the feed-forward block's output meets its residual.
    AfterFeedForward,
}

/// A layer norm handed to a [`ResidualHook`]: the norm the model applies
/// right after a residual join (post-norm models such as BERT).
pub type JoinNorm<'a, B> = Option<&'a dyn Fn(Tensor<B, 3>) -> Tensor<B, 3>>;

/// Code run at every residual join of a model (bottleneck adapters).
pub trait ResidualHook<B: Backend> {
    /// Replaces the model's `norm(hidden + residual)` (post-norm, `norm` is
    /// `Some`) or `hidden + residual` (pre-norm, `None`) at `point` of
    /// `layer`. `hidden: [b, t, d]` is the sub-block's output, `residual` its
    /// input. Without adapters the answer is [`residual_join`].
    fn join(
        &self,
        point: InsertionPoint,
        layer: usize,
        hidden: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        norm: JoinNorm<'_, B>,
    ) -> Tensor<B, 3>;
}

/// The model's own residual join: `norm(hidden + residual)` or `hidden + residual`.
pub fn residual_join<B: Backend>(
    hidden: Tensor<B, 3>,
    residual: Tensor<B, 3>,
    norm: JoinNorm<'_, B>,
) -> Tensor<B, 3> {
    match norm {
        Some(n) => n(hidden + residual),
        None => hidden + residual,
    }
}

/// The join at `point` of `layer`: through `hook` when there is one.
pub fn join<B: Backend>(
    hook: Option<&dyn ResidualHook<B>>,
    point: InsertionPoint,
    layer: usize,
    hidden: Tensor<B, 3>,
    residual: Tensor<B, 3>,
    norm: JoinNorm<'_, B>,
) -> Tensor<B, 3> {
    match hook {
        Some(h) => h.join(point, layer, hidden, residual, norm),
        None => residual_join(hidden, residual, norm),
    }
}

/// Residual joins a model exposes, for bottleneck adapters: its forward
/// pass with a [`ResidualHook`] called at every join of every layer.
pub trait BottleneckSeam<B: Backend> {
    /// What the model returns (logits, hidden states).
    type BottleneckOutput;
    /// Number of transformer layers.
    fn num_hook_layers(&self) -> usize;
    /// Width of the hidden states at the joins.
    fn hook_width(&self) -> usize;
    /// The module path AdapterHub stores a join's adapters under, without
    /// the head's prefix (e.g. `encoder.layer.3.output` for BERT,
    /// `h.3.output_adapters` for GPT-2, `layers.3.attention_adapters` for
    /// Llama): adapter files name their tensors `<that path>.adapters.<name>....`.
    fn hook_path(&self, point: InsertionPoint, layer: usize) -> String;
    /// The forward pass of `ids: [b, t]` (`attention_mask: [b, t]`, 1 =
    /// attend) with `hook` at every residual join.
    fn forward_hooked(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
        hook: &dyn ResidualHook<B>,
    ) -> Self::BottleneckOutput;

    /// For generation: the forward pass of input embeddings `[b, t, d]`
    /// after the tokens already in `cache` (extended in place; positions
    /// continue from its length), with `hook` at every join. `None` for
    /// models that do not generate (the default).
    fn forward_hooked_cached(
        &self,
        embeds: Tensor<B, 3>,
        cache: &mut KvCache<B>,
        hook: &dyn ResidualHook<B>,
    ) -> Option<Self::BottleneckOutput> {
        let _ = (embeds, cache, hook);
        None
    }
}
