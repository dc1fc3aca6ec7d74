//! Training losses, as Hugging Face computes them.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Mean cross-entropy of `logits: [n, classes]` against `targets: [n]`.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .neg()
        .mean()
}

/// Causal-LM loss: token `t` predicts token `t + 1`, mean over all
/// predicted positions (`ForCausalLMLoss` without ignored labels).
/// `logits: [b, t, vocab]`, `ids: [b, t]`.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, t, v] = logits.dims();
    let inputs = logits
        .slice([0..b, 0..t - 1, 0..v])
        .reshape([b * (t - 1), v]);
    let targets = ids.slice([0..b, 1..t]).reshape([b * (t - 1)]);
    cross_entropy(inputs, targets)
}

/// Causal-LM loss of a model run on `n_virtual` virtual tokens followed by
/// `ids` (prompt tuning, P-tuning), as PEFT computes it with the virtual
/// positions labelled `-100`: position `n_virtual - 1 + i` predicts `ids[i]`,
/// mean over every real token. `logits: [b, n_virtual + t, vocab]`.
pub fn causal_lm_loss_after_prompt<B: Backend>(
    logits: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    n_virtual: usize,
) -> Tensor<B, 1> {
    if n_virtual == 0 {
        return causal_lm_loss(logits, ids);
    }
    let [b, _, v] = logits.dims();
    let t = ids.dims()[1];
    let inputs = logits
        .slice([0..b, n_virtual - 1..n_virtual - 1 + t, 0..v])
        .reshape([b * t, v]);
    cross_entropy(inputs, ids.reshape([b * t]))
}
