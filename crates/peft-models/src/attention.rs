//! Scaled dot-product attention shared by the models.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_flex::ops::fused_attention::Extent;

/// The additive value for masked positions: large enough to vanish in the
/// softmax, small enough that adding two never overflows to `-inf`.
const MASKED: f32 = -1.0e30;

/// Position ids `start..start + t` for each of `b` rows: `[b, t]`.
pub fn positions<B: Backend>(
    b: usize,
    t: usize,
    start: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::arange(start as i64..(start + t) as i64, device)
        .unsqueeze::<2>()
        .expand([b, t])
}

/// Position ids `[b, t]`: row `i` counts from `starts[i]`, or every row
/// from `starts[0]` when it is the only entry
/// ([`PreparedInput::starts`](peft_core::PreparedInput::starts)).
pub fn row_positions<B: Backend>(
    b: usize,
    t: usize,
    starts: &[usize],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    if let [start] = starts {
        return positions(b, t, *start, device);
    }
    let ids: Vec<i64> = starts
        .iter()
        .flat_map(|&s| (s..s + t).map(|p| p as i64))
        .collect();
    Tensor::from_data(TensorData::new(ids, [starts.len(), t]), device)
}

/// `[b, t, h·d]` → `[b, h, t, d]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, t, hd] = x.dims();
    x.reshape([b, t, heads, hd / heads]).swap_dims(1, 2)
}

/// `[b, h, t, d]` → `[b, t, h·d]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, t, h * d])
}

/// Causal mask for `t` queries over `past + t` keys: `[1, 1, t, past + t]`.
pub fn causal_mask<B: Backend>(t: usize, past: usize, device: &B::Device) -> Tensor<B, 4> {
    let s = past + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { MASKED }))
        .collect();
    Tensor::from_data(TensorData::new(data, [1, 1, t, s]), device)
}

/// Padding mask from `attention_mask: [b, s]` (1 = attend, 0 = padding):
/// `[b, 1, 1, s]`, additive.
pub fn padding_mask<B: Backend>(attention_mask: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, s] = attention_mask.dims();
    ((attention_mask.neg() + 1.0) * MASKED).reshape([b, 1, 1, s])
}

/// The additive mask of a decoder over `t` new tokens after `past` cached
/// positions (a prefix, earlier generation steps): causal over the new
/// tokens, the cached positions visible except each row's
/// `left_padding[i]` first ones
/// ([`ModelInput::left_padding`](peft_core::ModelInput::left_padding)),
/// and padding masked when an `attention_mask: [b, t]` (of the new tokens)
/// is given.
pub fn decoder_mask<B: Backend>(
    t: usize,
    past: usize,
    attention_mask: Option<Tensor<B, 2>>,
    left_padding: Option<&[usize]>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let causal = causal_mask::<B>(t, past, device);
    let cached = left_padding
        .filter(|pads| past > 0 && pads.iter().any(|&p| p > 0))
        .map(|pads| {
            let keep: Vec<f32> = pads
                .iter()
                .flat_map(|&p| (0..past).map(move |j| if j < p { 0.0 } else { 1.0 }))
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(keep, [pads.len(), past]), device)
        });
    let keys = match (cached, attention_mask) {
        (None, None) => return causal,
        (None, Some(am)) if past == 0 => am,
        (None, Some(am)) => {
            let b = am.dims()[0];
            Tensor::cat(vec![Tensor::ones([b, past], device), am], 1)
        }
        (Some(c), None) => {
            let b = c.dims()[0];
            Tensor::cat(vec![c, Tensor::ones([b, t], device)], 1)
        }
        (Some(c), Some(am)) => Tensor::cat(vec![c, am], 1),
    };
    causal + padding_mask(keys)
}

/// Attention of `q: [b, h, t, d]` over `k, v: [b, kv_h, s, d]` (grouped-query
/// attention when `kv_h < h`: query head `i` uses key/value head
/// `i / (h / kv_h)`), with an additive `mask` broadcastable to `[b, h, t, s]`.
/// Returns `[b, t, h·d]`. On Flex (with or without autodiff) one fused
/// kernel computes it ([`crate::fused::attention`]); elsewhere
/// [`attend_composite`].
pub fn attend<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4>>,
) -> Tensor<B, 3> {
    attend_fused(&q, &k, &v, mask.as_ref()).unwrap_or_else(|| attend_composite(q, k, v, mask))
}

/// [`attend`] by the fused kernel: `Some` on Flex, with or without
/// autodiff, when the operands suit it (f32, non-negative strides, a mask
/// that needs no gradient); `None` otherwise.
pub fn attend_fused<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
) -> Option<Tensor<B, 3>> {
    fused_within(q, k, v, mask, None)
}

/// [`attend`] over a right-padded batch whose row `i` has `real[i]` real
/// tokens: its first `real[i]` query positions, and as many keys after any
/// cached (prefix) ones. On Flex only those rows and keys are computed and
/// the padded query rows come out as zeros; elsewhere, or when `real` does
/// not fit the shapes, this is [`attend`]. The caller masks the padded keys
/// and drops the padded rows' outputs, as BERT's padding removal does: skipping
/// them is then exact.
pub fn attend_real<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4>>,
    real: &[usize],
) -> Tensor<B, 3> {
    let [b, _, t, _] = q.dims();
    let cached = k.dims()[2].checked_sub(t);
    let extents: Option<Vec<Extent>> = cached
        .filter(|_| real.len() == b && real.iter().all(|&n| n <= t))
        .map(|cached| {
            real.iter()
                .map(|&n| Extent {
                    queries: n,
                    keys: cached + n,
                })
                .collect()
        });
    extents
        .and_then(|e| fused_within(&q, &k, &v, mask.as_ref(), Some(&e)))
        .unwrap_or_else(|| attend(q, k, v, mask))
}

/// [`attend_fused`], limited to each batch row's extent when given.
fn fused_within<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
    extents: Option<&[Extent]>,
) -> Option<Tensor<B, 3>> {
    if !crate::fused::attention::available::<B>() {
        return None;
    }
    let (k, v) = repeat_kv(q.dims()[1], k.clone(), v.clone());
    let scale = 1.0 / (q.dims()[3] as f32).sqrt();
    crate::fused::attention::attention(q, &k, &v, mask, scale, extents).map(merge_heads)
}

/// Key/value heads repeated to the query heads' count (grouped-query
/// attention): `[b, kv_h, s, d]` → `[b, h, s, d]`.
fn repeat_kv<B: Backend>(
    h: usize,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, kv_h, s, _] = k.dims();
    if kv_h == h {
        return (k, v);
    }
    let rep = h / kv_h;
    let expand = |x: Tensor<B, 4>| {
        let d = x.dims()[3];
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv_h, rep, s, d])
            .reshape([b, h, s, d])
    };
    (expand(k), expand(v))
}

/// [`attend`] composed from tensor ops, on every backend: the path of
/// backends without a fused kernel, and the reference that kernel is
/// tested against.
pub fn attend_composite<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4>>,
) -> Tensor<B, 3> {
    let (k, v) = repeat_kv(q.dims()[1], k, v);
    let d = q.dims()[3];
    let mut scores = q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt();
    if let Some(mask) = mask {
        scores = scores + mask;
    }
    merge_heads(softmax(scores, 3).matmul(v))
}

/// Logits of a head tied to the embedding table: `h · Eᵀ` for
/// `h: [b, t, d]`, `E: [vocab, d]`, computed as `(E · hᵀ)ᵀ` so that the
/// large table is used as stored (a transposed `E` would be copied to a
/// contiguous buffer on every call by CPU backends), over all `b·t` rows
/// at once: as a batched product, `E` was read once per batch row (a
/// server's decode step of 16 sequences read the 113 MB table of
/// SmolLM2 16 times).
pub fn tied_head<B: Backend>(h: Tensor<B, 3>, embedding: Tensor<B, 2>) -> Tensor<B, 3> {
    let [b, t, d] = h.dims();
    let vocab = embedding.dims()[0];
    embedding
        .matmul(h.reshape([b * t, d]).transpose())
        .transpose()
        .reshape([b, t, vocab])
}

/// A layer's view of a [`ResidualHook`](peft_core::model::ResidualHook):
/// the hook and the layer's index, or `None` for the plain forward pass.
pub(crate) type Hook<'a, B> = Option<(&'a dyn peft_core::model::ResidualHook<B>, usize)>;
