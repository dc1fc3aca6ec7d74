//! The one input of a model's forward pass ([`PeftModel::run`]), in the
//! style of Burn's `MhaInput`: the tokens (ids or embeddings) plus what the
//! methods add around them. Every method reaches a model through it:
//!
//! | method | what it sets |
//! |---|---|
//! | plain forward, LoRA and the other slot methods | `tokens`, `attention_mask` |
//! | prompt tuning, P-tuning | [`Tokens::Embeds`]: virtual-token embeddings before the real ones |
//! | prefix tuning | `cache`: one key/value entry per layer before the tokens |
//! | bottleneck adapters | `hook`, called at every residual join |
//! | generation | `cache`, extended step by step |
//! | batched generation (a server) | `cache` shared by rows of different lengths, `left_padding` |
//!
//! [`PeftModel::run`]: crate::PeftModel::run

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::kv::KvCache;

/// The tokens a forward pass reads.
#[derive(Debug, Clone)]
pub enum Tokens<B: Backend> {
    /// Token ids `[b, t]`, embedded by the model's own table.
    Ids(Tensor<B, 2, Int>),
    /// Word embeddings `[b, t, d_model]`, before positions are added.
    Embeds(Tensor<B, 3>),
}

impl<B: Backend> Tokens<B> {
    /// The word embeddings `[b, t, d_model]`: `embed` applied to ids, or the
    /// embeddings as given.
    pub fn embedded(self, embed: impl FnOnce(Tensor<B, 2, Int>) -> Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Tokens::Ids(ids) => embed(ids),
            Tokens::Embeds(e) => e,
        }
    }
}

/// Everything one forward pass of a model takes. Build it with
/// [`ids`](Self::ids) or [`embeds`](Self::embeds) and add the rest:
/// `ModelInput::ids(ids).mask(Some(m)).cache(&mut cache)`.
pub struct ModelInput<'a, B: Backend> {
    /// The new tokens, `t` of them per row.
    pub tokens: Tokens<B>,
    /// `[b, t]`, 1 = attend, 0 = padding; it covers the new tokens only:
    /// positions already in `cache` are always visible.
    pub attention_mask: Option<Tensor<B, 2>>,
    /// Keys and values before the tokens (a prefix, or the earlier steps of
    /// generation), extended in place; positions continue from its length.
    /// An empty cache is given one entry per layer; a non-empty one must
    /// have exactly that many.
    pub cache: Option<&'a mut KvCache<B>>,
    /// Code run at each residual join of each layer instead of the model's
    /// own join (bottleneck adapters).
    pub hook: Option<&'a dyn ResidualHook<B>>,
    /// One entry per row: how many of the cached positions at the start of
    /// that row are padding, not tokens. Sequences of different lengths
    /// share one cache this way (each row's cache left-padded to the
    /// longest); a row's padding is masked and its new tokens' positions
    /// continue from its own length, `cache.len() - left_padding[i]`.
    /// `None`: no padding, every row's positions continue from the cache
    /// length. A decoder that serves batches (Llama, GPT-2) reads it
    /// through [`PreparedInput::starts`] and its mask.
    pub left_padding: Option<Vec<usize>>,
}

impl<'a, B: Backend> ModelInput<'a, B> {
    /// A pass over token ids `[b, t]`, nothing else.
    pub fn ids(ids: Tensor<B, 2, Int>) -> Self {
        Self::of(Tokens::Ids(ids))
    }

    /// A pass over word embeddings `[b, t, d_model]`, nothing else.
    pub fn embeds(embeds: Tensor<B, 3>) -> Self {
        Self::of(Tokens::Embeds(embeds))
    }

    /// A pass over `tokens`, nothing else.
    pub fn of(tokens: Tokens<B>) -> Self {
        ModelInput {
            tokens,
            attention_mask: None,
            cache: None,
            hook: None,
            left_padding: None,
        }
    }

    /// With `attention_mask: [b, t]` (or none).
    pub fn mask(mut self, attention_mask: Option<Tensor<B, 2>>) -> Self {
        self.attention_mask = attention_mask;
        self
    }

    /// After (and extending) `cache`.
    pub fn cache(mut self, cache: &'a mut KvCache<B>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// With `hook` at every residual join.
    pub fn hook(mut self, hook: &'a dyn ResidualHook<B>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// With row `i`'s cache starting with `left_padding[i]` padding
    /// positions (see the field).
    pub fn left_padding(mut self, left_padding: Vec<usize>) -> Self {
        self.left_padding = Some(left_padding);
        self
    }
}

/// A [`ModelInput`] taken apart for a model's forward pass: what every
/// model's `run` starts from.
pub struct PreparedInput<'a, B: Backend> {
    /// The word embeddings `[b, t, d_model]` of the new tokens.
    pub embeds: Tensor<B, 3>,
    /// Positions already in the cache (0 without one): the new tokens'
    /// positions start there.
    pub past: usize,
    /// `[b, t]` of the new tokens, 1 = attend.
    pub attention_mask: Option<Tensor<B, 2>>,
    /// The cache, readied for the model's layers.
    pub cache: Option<&'a mut KvCache<B>>,
    /// The residual hook.
    pub hook: Option<&'a dyn ResidualHook<B>>,
    /// Per row, the padding positions at the start of the cache
    /// ([`ModelInput::left_padding`]).
    pub left_padding: Option<Vec<usize>>,
}

impl<B: Backend> PreparedInput<'_, B> {
    /// The position of each row's first new token: `[past]` (one entry for
    /// every row) without left padding, else `past - left_padding[i]` per
    /// row.
    pub fn starts(&self) -> Vec<usize> {
        match &self.left_padding {
            None => vec![self.past],
            Some(pads) => pads.iter().map(|&p| self.past - p).collect(),
        }
    }
}

impl<'a, B: Backend> ModelInput<'a, B> {
    /// The input taken apart for a model of `layers` layers: ids embedded
    /// by `embed`, the cache readied ([`cached_positions`]).
    pub fn prepare(
        self,
        layers: usize,
        embed: impl FnOnce(Tensor<B, 2, Int>) -> Tensor<B, 3>,
    ) -> PreparedInput<'a, B> {
        let ModelInput {
            tokens,
            attention_mask,
            mut cache,
            hook,
            left_padding,
        } = self;
        let embeds = tokens.embedded(embed);
        let past = cached_positions(cache.as_deref_mut(), layers);
        if let Some(pads) = &left_padding {
            let b = embeds.dims()[0];
            assert!(
                pads.len() == b && pads.iter().all(|&p| p <= past),
                "left padding {pads:?}: one entry per row ({b}), each at most the cache length ({past})"
            );
        }
        PreparedInput {
            embeds,
            past,
            attention_mask,
            cache,
            hook,
            left_padding,
        }
    }
}

/// The sizes of a model that the methods build their tensors from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    /// Number of transformer layers (attention layers, residual-join pairs).
    pub layers: usize,
    /// Width of the embeddings and of the hidden states at the joins.
    pub d_model: usize,
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// Key/value heads of every attention layer.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Readies `cache` for a pass through `layers` layers and returns how many
/// positions it already holds (0 without a cache): an empty cache is given
/// one entry per layer. A non-empty cache with another layer count is a
/// caller's bug (a prefix built for another model).
pub fn cached_positions<B: Backend>(cache: Option<&mut KvCache<B>>, layers: usize) -> usize {
    let Some(cache) = cache else {
        return 0;
    };
    if cache.is_empty() {
        cache.ensure_layers(layers);
    }
    assert_eq!(cache.layers.len(), layers, "one cache entry per layer");
    cache.len()
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
