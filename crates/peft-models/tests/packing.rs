//! BERT runs its layers on a padded batch's real tokens only
//! (`peft_models::packing`): on the real all-MiniLM-L6-v2, every real
//! token's hidden state and every gradient is the one of its sentence run
//! alone, with and without an attention prefix, and padded positions come
//! out zero (which the padded computation never gives).

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use peft_core::compare::{check_close, Tolerance};
use peft_core::io::HostTensor;
use peft_core::kv::{KvCache, LayerCache};
use peft_core::{autodiff_backend_tests, backend_tests};
use peft_core::{ModelInput, PeftModel};
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::tokenizer::Tokenizer;

/// Sentences of 4 to 13 tokens: a batch of them is 40 % padding.
const SENTENCES: [&str; 3] = [
    "A gripping, beautifully shot film that never lets go of you.",
    "Dull.",
    "The plot wanders, but the cast keeps it afloat.",
];

/// Batched and one-by-one passes sum in different orders.
const SAME: Tolerance = Tolerance::new(1e-4, 0.0);

fn minilm<B: Backend>(device: &B::Device) -> (Bert<B>, Tokenizer) {
    let dir = assets::fetch("minilm").unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    (Bert::load(&dir, device).unwrap(), tok)
}

/// Row `i` of `[b, t, d]`, its first `len` positions: `[len, d]` on the host.
fn real_rows<B: Backend>(h: &Tensor<B, 3>, i: usize, len: usize) -> HostTensor {
    let d = h.dims()[2];
    HostTensor::from_tensor(h.clone().slice([i..i + 1, 0..len, 0..d]).reshape([len, d]))
}

/// Runs `forward(ids, mask)` on the padded batch and on each sentence alone
/// and checks that they agree on real tokens and that padding is zero.
fn check_batch_against_singles<B: Backend>(
    tok: &Tokenizer,
    device: &B::Device,
    forward: impl Fn(&[usize], Tensor<B, 2, burn::tensor::Int>, Tensor<B, 2>) -> Tensor<B, 3>,
) {
    let batch = tok.batch::<B>(&SENTENCES, device).unwrap();
    let lens: Vec<usize> = SENTENCES
        .iter()
        .map(|s| tok.encode(s).unwrap().len())
        .collect();
    let t = *lens.iter().max().unwrap();
    assert!(lens.iter().any(|&l| l < t), "the batch must hold padding");
    let rows: Vec<usize> = (0..SENTENCES.len()).collect();
    let h = forward(&rows, batch.ids, batch.attention_mask);
    assert_eq!(h.dims()[..2], [SENTENCES.len(), t]);
    for (i, (s, &len)) in SENTENCES.iter().zip(&lens).enumerate() {
        let one = tok.batch::<B>(&[s], device).unwrap();
        let alone = forward(&[i], one.ids, one.attention_mask);
        check_close(s, &real_rows(&h, i, len), &real_rows(&alone, 0, len), SAME).unwrap();
        let d = h.dims()[2];
        let padding = HostTensor::from_tensor(h.clone().slice([i..i + 1, len..t, 0..d]));
        assert!(
            padding.data.iter().all(|&x| x == 0.0),
            "{s}: padded positions are not zero"
        );
    }
}

fn hidden_states_of_real_tokens_ignore_padding<B: Backend>(device: &B::Device) {
    let (model, tok) = minilm::<B>(device);
    check_batch_against_singles::<B>(&tok, device, |_, ids, mask| model.encode(ids, Some(mask)));
}

fn an_attention_prefix_sees_the_same_real_tokens<B: Backend>(device: &B::Device) {
    let (model, tok) = minilm::<B>(device);
    let dims = model.dims();
    let (heads, head_dim) = (dims.kv_heads, dims.head_dim);
    let p = 3;
    let per_layer: Vec<(Tensor<B, 4>, Tensor<B, 4>)> = (0..dims.layers)
        .map(|_| {
            let draw = || {
                Tensor::<B, 4>::random(
                    [SENTENCES.len(), heads, p, head_dim],
                    Distribution::Normal(0.0, 1.0),
                    device,
                )
            };
            (draw(), draw())
        })
        .collect();
    // The prefix rows of the batch rows `rows`.
    let prefix = |rows: &[usize]| KvCache {
        layers: per_layer
            .iter()
            .map(|(k, v)| {
                let pick = |x: &Tensor<B, 4>| {
                    Tensor::cat(
                        rows.iter()
                            .map(|&r| x.clone().slice([r..r + 1, 0..heads, 0..p, 0..head_dim]))
                            .collect(),
                        0,
                    )
                };
                LayerCache {
                    k: Some(pick(k)),
                    v: Some(pick(v)),
                }
            })
            .collect(),
    };
    check_batch_against_singles::<B>(&tok, device, |rows, ids, mask| {
        model.run(
            ModelInput::ids(ids)
                .mask(Some(mask))
                .cache(&mut prefix(rows)),
        )
    });
}

/// The gradient of `Σ real hidden states · w` with respect to the input
/// embeddings: the padded batch's, row by row, is each sentence's alone.
fn gradients_ignore_padding<B: AutodiffBackend>(device: &B::Device) {
    let (model, tok) = minilm::<B>(device);
    let d = model.dims().d_model;
    let w = Tensor::<B, 1>::random([d], Distribution::Normal(0.0, 1.0), device);
    let grad_of = |texts: &[&str]| {
        let batch = tok.batch::<B>(texts, device).unwrap();
        let embeds = model.embed_tokens(batch.ids).detach().require_grad();
        let [b, t, _] = embeds.dims();
        let h =
            model.run(ModelInput::embeds(embeds.clone()).mask(Some(batch.attention_mask.clone())));
        let mask = batch.attention_mask.reshape([b, t, 1]);
        let loss = (h * mask * w.clone().reshape([1, 1, d])).sum();
        let grads = loss.backward();
        embeds.grad(&grads).expect("a gradient for the embeddings")
    };
    let batched = grad_of(&SENTENCES);
    for (i, s) in SENTENCES.iter().enumerate() {
        let len = tok.encode(s).unwrap().len();
        let alone = grad_of(&[s]);
        let want = real_rows(&alone, 0, len);
        assert!(
            want.data.iter().any(|&g| g != 0.0),
            "{s}: a zero gradient proves nothing"
        );
        check_close(s, &real_rows(&batched, i, len), &want, SAME).unwrap();
    }
}

backend_tests!(
    hidden_states_of_real_tokens_ignore_padding,
    an_attention_prefix_sees_the_same_real_tokens
);
autodiff_backend_tests!(gradients_ignore_padding);

/// Attention skips padding only where each row's real tokens come first.
fn real_lengths_only_for_right_padding<B: Backend>(device: &B::Device) {
    let packing = |rows: [[f32; 4]; 2]| {
        let mask = Tensor::<B, 2>::from_data(rows, device);
        peft_models::packing::Packing::of(&mask).expect("padding to remove")
    };
    let right = packing([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]);
    assert_eq!(right.lengths(), Some(&[3, 1][..]));
    assert_eq!(right.tokens(), 4);
    let empty_row = packing([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]);
    assert_eq!(empty_row.lengths(), Some(&[4, 0][..]));
    let left = packing([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]);
    assert_eq!(left.lengths(), None, "left padding");
    let hole = packing([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]);
    assert_eq!(hole.lengths(), None, "a hole");
}

backend_tests!(real_lengths_only_for_right_padding);
