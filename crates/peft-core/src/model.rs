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

    /// Trainable (active, unmerged adapter entries) and total parameters.
    fn param_count(&self) -> ParamCount {
        let mut trainable = 0;
        self.visit_linears(&mut |_, s| trainable += s.trainable_params());
        ParamCount {
            trainable,
            all: self.num_params(),
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

/// Where a bottleneck adapter can be inserted in each transformer layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertionPoint {
    /// After the attention output projection, before its residual/norm.
    AfterAttention,
    /// After the feed-forward block's output projection, before its residual/norm.
    AfterFeedForward,
    /// In parallel to the feed-forward block (its input, added to its output).
    ParallelFeedForward,
}
