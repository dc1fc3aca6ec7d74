//! The pieces of one MiniLM encoder layer at the `minilm` suite's shape
//! (16 × 128 tokens, width 384, 12 heads, feed-forward 1536), each timed
//! alone on the backend: where a forward pass spends its time, per op.
//! Each figure's `ms_per_model` is its time × its count in the 6-layer
//! model, so the rows add up to (most of) `minilm/forward_base`.

use burn::nn::LayerNormConfig;
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use peft_models::attention::{attend, merge_heads, padding_mask, split_heads};
use serde_json::json;

use crate::{emit, interleaved, Opts};

/// Reads one value of `t`, so that a lazy backend finishes computing it.
pub(crate) fn sync<B: Backend, const D: usize>(t: Tensor<B, D>) {
    let _ = t.flatten::<1>(0, D - 1).narrow(0, 0, 1).into_data();
}

/// Per-op timings of one MiniLM layer's forward pass.
pub fn ops_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let (b, t, d, h, ff) = if o.quick {
        (4, 32, 384, 12, 1536)
    } else {
        (16, 128, 384, 12, 1536)
    };
    let n = b * t;
    let normal = Distribution::Normal(0.0, 0.05);
    let x2 = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
    let x3 = x2.clone().reshape([b, t, d]);
    let w = Tensor::<B, 2>::random([d, d], normal, device);
    let w_up = Tensor::<B, 2>::random([d, ff], normal, device);
    let w_down = Tensor::<B, 2>::random([ff, d], normal, device);
    let bias = Tensor::<B, 1>::random([d], normal, device);
    let up = Tensor::<B, 2>::random([n, ff], Distribution::Normal(0.0, 1.0), device);
    let q = split_heads(x3.clone(), h);
    let scores = Tensor::<B, 4>::random([b, h, t, t], Distribution::Normal(0.0, 1.0), device);
    let mask = padding_mask(Tensor::<B, 2>::ones([b, t], device));
    let norm = LayerNormConfig::new(d).init::<B>(device);
    let runs = if o.quick { 5 } else { 10 };
    // (name, count per model of 6 layers)
    let names: [(&str, usize); 13] = [
        ("linear_384x384", 24),
        ("linear_384x1536", 6),
        ("linear_1536x384", 6),
        ("bias_add", 36),
        ("split_heads_contiguous", 18),
        ("scores_qk", 6),
        ("mask_add", 6),
        ("softmax", 6),
        ("attend_whole", 6),
        ("merge_heads", 6),
        ("gelu_1536", 6),
        ("layer_norm", 12),
        ("attention_op", 6),
    ];
    let mut t_all = interleaved(
        runs,
        &mut [
            &mut || sync(x2.clone().matmul(w.clone())),
            &mut || sync(x2.clone().matmul(w_up.clone())),
            &mut || sync(up.clone().matmul(w_down.clone())),
            &mut || sync(x2.clone() + bias.clone().unsqueeze_dim(0)),
            &mut || sync(split_heads(x3.clone(), h).reshape([b * h, t, d / h])),
            &mut || sync(q.clone().matmul(q.clone().swap_dims(2, 3))),
            &mut || sync(scores.clone() + mask.clone()),
            &mut || sync(softmax(scores.clone(), 3)),
            &mut || sync(attend(q.clone(), q.clone(), q.clone(), Some(mask.clone()))),
            &mut || sync(merge_heads(q.clone())),
            &mut || sync(gelu(up.clone())),
            &mut || sync(norm.forward(x3.clone())),
            &mut || {
                sync(burn::tensor::module::attention(
                    q.clone(),
                    q.clone(),
                    q.clone(),
                    None,
                    Some(mask.clone()),
                    Default::default(),
                ))
            },
        ],
    );
    for (i, (name, count)) in names.iter().enumerate() {
        let median = crate::stats(&mut t_all[i].clone()).0;
        let extra = json!({"count_per_model": count, "ms_per_model": median * 1e3 * *count as f64});
        emit(o, "ops", name, &mut t_all[i], None, extra);
    }
}
