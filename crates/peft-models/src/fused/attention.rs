//! Attention by one fused kernel on Flex, with or without autodiff
//! (`burn_flex::ops::fused_attention`).

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_flex::ops::fused_attention::{self, Extent};
use burn_flex::FlexTensor;

use super::{primitive, wrap, FlexAutodiff, FlexAutodiffTensor};

/// Whether `B` has the fused kernel (Flex, with or without autodiff).
pub(crate) fn available<B: Backend>() -> bool {
    let backend = TypeId::of::<B>();
    backend == TypeId::of::<Flex>() || backend == TypeId::of::<FlexAutodiff>()
}

/// `softmax(q kᵀ · scale + bias) · v` as `[b, h, t, dv]`, for
/// `q: [b, h, t, dh]`, `k: [b, h, s, dh]`, `v: [b, h, s, dv]` and an
/// additive `bias` broadcastable to `[b, h, t, s]`, by the fused kernel;
/// `None` when `B` is not Flex or `Autodiff<Flex>`, when the operands do
/// not suit the kernel (not f32, negative strides, extents that do not
/// fit), or when the bias itself needs a gradient. With `extents`, only each
/// batch row's real part is computed ([`Extent`]: padded query rows give
/// zeros and take no gradient).
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
    scale: f32,
    extents: Option<&[Extent]>,
) -> Option<Tensor<B, 4>> {
    let backend = TypeId::of::<B>();
    if backend == TypeId::of::<Flex>() {
        let raw = primitive::<Flex, B, 4>;
        let bias = bias.map(raw);
        let (out, _) =
            fused_attention::forward(&raw(q), &raw(k), &raw(v), bias.as_ref(), scale, extents)?;
        return Some(wrap::<Flex, B, 4>(out));
    }
    if backend == TypeId::of::<FlexAutodiff>() {
        let raw = primitive::<FlexAutodiff, B, 4>;
        let out = tracked_attention(raw(q), raw(k), raw(v), bias.map(raw), scale, extents)?;
        return Some(wrap::<FlexAutodiff, B, 4>(out));
    }
    None
}

/// What the backward pass needs: the operands, the output, the
/// log-sum-exp of each query row (the probabilities are recomputed) and the
/// batch rows' real extents.
#[derive(Debug, Clone)]
struct Saved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    bias: Option<FlexTensor>,
    out: FlexTensor,
    stats: FlexTensor,
    scale: f32,
    extents: Option<Vec<Extent>>,
}

#[derive(Debug)]
struct FusedAttentionBackward;

impl Backward<Flex, 3> for FusedAttentionBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let run = |grad: &FlexTensor| {
            fused_attention::backward(
                &s.q,
                &s.k,
                &s.v,
                s.bias.as_ref(),
                s.scale,
                s.extents.as_deref(),
                &s.out,
                &s.stats,
                grad,
            )
        };
        // The kernel reads any non-negative strides; anything else (a
        // flipped gradient) is made contiguous first.
        let (dq, dk, dv) = run(&grad)
            .or_else(|| run(&grad.to_contiguous()))
            .expect("the forward pass accepted these operands");
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

fn tracked_attention(
    q: FlexAutodiffTensor,
    k: FlexAutodiffTensor,
    v: FlexAutodiffTensor,
    bias: Option<FlexAutodiffTensor>,
    scale: f32,
    extents: Option<&[Extent]>,
) -> Option<FlexAutodiffTensor> {
    if bias.as_ref().is_some_and(|m| !m.node.requirement.is_none()) {
        return None;
    }
    let bias = bias.map(|m| m.primitive);
    let (out, stats) = fused_attention::forward(
        &q.primitive,
        &k.primitive,
        &v.primitive,
        bias.as_ref(),
        scale,
        extents,
    )?;
    let prep = FusedAttentionBackward
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful();
    Some(match prep {
        OpsKind::Tracked(prep) => {
            let saved = Saved {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                bias,
                out: out.clone(),
                stats,
                scale,
                extents: extents.map(<[Extent]>::to_vec),
            };
            prep.finish(saved, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    })
}
