//! Generation through the KV cache equals generation that recomputes the
//! whole sequence each step, for every causal LM and backend.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::backend_tests;
use peft_core::io::HostTensor;
use peft_core::kv::{KvCache, LayerCache};
use peft_core::{ModelInput, PeftModel};
use peft_models::bert::Bert;
use peft_models::generate::{CausalLm, Sampler};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn check<B: Backend, M: CausalLm<B>>(model: &M) {
    let prompt = [3u32, 17, 42, 5];
    let cached = model.generate(&prompt, 10, &mut Sampler::Greedy, None, true);
    let full = model.generate(&prompt, 10, &mut Sampler::Greedy, None, false);
    assert_eq!(cached, full);
    let sample = |cache| {
        let mut s = Sampler::Random {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
            state: 11,
        };
        model.generate(&prompt, 10, &mut s, None, cache)
    };
    assert_eq!(
        sample(true),
        sample(false),
        "seeded sampling is reproducible and cache-independent"
    );
    let stopped = model.generate(&prompt, 10, &mut Sampler::Greedy, Some(cached[2]), true);
    assert_eq!(stopped.last(), Some(&cached[2]), "generation stops at eos");
    assert!(stopped.len() <= 3);
}

fn llama_cache<B: Backend>(device: &B::Device) {
    check::<B, _>(&Llama::<B>::load(&fixtures().join("llama"), device).unwrap());
}

fn gpt2_cache<B: Backend>(device: &B::Device) {
    check::<B, _>(&Gpt2::<B>::load(&fixtures().join("gpt2"), device).unwrap());
}

backend_tests!(llama_cache, gpt2_cache);

/// A prefix is exactly earlier context for a decoder: the logits of `ids2`
/// after the cache of `ids1` equal the tail of the logits of `ids1 ++ ids2`.
fn check_prefix<B: Backend, M>(model: &M, cached: impl Fn(&M, &mut KvCache<B>, Tensor<B, 2, Int>))
where
    M: CausalLm<B> + PeftModel<B, Output = Tensor<B, 3>>,
{
    let device = model.device();
    let ids = |v: &[i64]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &device)
    };
    let (first, second) = ([4i64, 8, 15], [16i64, 23, 42, 7]);
    let mut prefix = KvCache::new();
    cached(model, &mut prefix, ids(&first));
    assert_eq!(prefix.len(), 3);
    let with_prefix = HostTensor::from_tensor(
        model.run(ModelInput::ids(ids(&second)).cache(&mut prefix.clone())),
    );
    let masked = HostTensor::from_tensor(
        model.run(
            ModelInput::ids(ids(&second))
                .mask(Some(Tensor::ones([1, 4], &device)))
                .cache(&mut prefix),
        ),
    );
    let full = model.logits(ids(&[4, 8, 15, 16, 23, 42, 7]));
    let [_, _, v] = full.dims();
    let tail = HostTensor::from_tensor(full.slice([0..1, 3..7, 0..v]));
    let d = peft_core::compare::max_abs_diff(&with_prefix.data, &tail.data);
    assert!(d < 1e-5, "prefix ≠ context: {d:e}");
    assert_eq!(with_prefix, masked);
}

fn llama_prefix<B: Backend>(device: &B::Device) {
    let m = Llama::<B>::load(&fixtures().join("llama"), device).unwrap();
    check_prefix(&m, |m, c, ids| {
        m.forward_cached(ids, c);
    });
}

fn gpt2_prefix<B: Backend>(device: &B::Device) {
    let m = Gpt2::<B>::load(&fixtures().join("gpt2"), device).unwrap();
    check_prefix(&m, |m, c, ids| {
        m.forward_cached(ids, c);
    });
}

/// BERT with a prefix: padding of the real tokens stays masked (what padded
/// positions hold changes nothing for the others), and the prefix is used.
fn bert_prefix<B: Backend>(device: &B::Device) {
    let m = Bert::<B>::load(&fixtures().join("bert"), device).unwrap();
    let dims = m.dims();
    let (heads, hd) = (dims.kv_heads, dims.head_dim);
    let prefix = || KvCache {
        layers: (0..dims.layers)
            .map(|i| LayerCache {
                k: Some(Tensor::<B, 4>::ones([1, heads, 2, hd], device) * (0.1 * i as f64)),
                v: Some(Tensor::<B, 4>::ones([1, heads, 2, hd], device)),
            })
            .collect(),
    };
    let ids = |last: i64| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(vec![5i64, 9, 13, last], [1, 4]), device)
    };
    let mask =
        Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 1.0, 1.0, 0.0], [1, 4]), device);
    let a = HostTensor::from_tensor(
        m.run(
            ModelInput::ids(ids(3))
                .mask(Some(mask.clone()))
                .cache(&mut prefix()),
        )
        .slice([0..1, 0..3, 0..16]),
    );
    let b = HostTensor::from_tensor(
        m.run(
            ModelInput::ids(ids(60))
                .mask(Some(mask))
                .cache(&mut prefix()),
        )
        .slice([0..1, 0..3, 0..16]),
    );
    let d = peft_core::compare::max_abs_diff(&a.data, &b.data);
    assert!(d < 1e-6, "a padded token leaked through the mask: {d:e}");
    let plain = HostTensor::from_tensor(m.encode(ids(3), None).slice([0..1, 0..3, 0..16]));
    assert!(
        a.data
            .iter()
            .zip(&plain.data)
            .any(|(x, y)| (x - y).abs() > 1e-3),
        "the prefix changes the output"
    );
}

backend_tests!(llama_prefix, gpt2_prefix, bert_prefix);

/// Sequences of different lengths decoded as one batch (a server's
/// continuous batching): each row's cache left-padded to the longest, the
/// padding named in `left_padding`. Every row's logits, step after step,
/// equal that sequence's own; and the padding is really masked and the
/// positions really per row (without `left_padding` they differ).
fn check_left_padded<B: Backend, M>(model: &M)
where
    M: CausalLm<B> + PeftModel<B, Output = Tensor<B, 3>>,
{
    let device = model.device();
    let ids = |v: &[u32]| peft_core::generate::ids_tensor::<B>(v, &device);
    let prompts: [&[u32]; 3] = [&[4, 8, 15], &[16, 23, 42, 7, 9, 30], &[11]];
    let steps: [[u32; 3]; 3] = [[5, 6, 7], [12, 13, 14], [20, 21, 22]];
    // Each sequence alone: its cache, and its logits after every step.
    let mut alone = Vec::new();
    let mut caches = Vec::new();
    for (r, prompt) in prompts.iter().enumerate() {
        let mut cache = KvCache::new();
        model.logits_cached(ids(prompt), &mut cache);
        caches.push(cache.clone());
        let logits: Vec<HostTensor> = steps
            .iter()
            .map(|s| HostTensor::from_tensor(model.logits_cached(ids(&[s[r]]), &mut cache)))
            .collect();
        alone.push(logits);
    }
    let longest = prompts.iter().map(|p| p.len()).max().unwrap();
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    // Padding that is not zeros, so that a leak shows.
    let garbage = |c: &KvCache<B>, n: usize| {
        let padded = c.pad_left(n);
        KvCache {
            layers: padded
                .layers
                .iter()
                .map(|l| {
                    let noisy = |x: &Tensor<B, 4>| {
                        let [b, h, s, d] = x.dims();
                        let mark = Tensor::<B, 4>::ones([b, h, n, d], &device) * 3.0;
                        let rest = Tensor::zeros([b, h, s - n, d], &device);
                        x.clone() + Tensor::cat(vec![mark, rest], 2)
                    };
                    LayerCache {
                        k: l.k.as_ref().map(noisy),
                        v: l.v.as_ref().map(noisy),
                    }
                })
                .collect(),
        }
    };
    let batch_cache = KvCache::cat_rows(
        caches
            .iter()
            .zip(&pads)
            .map(|(c, &n)| garbage(c, n))
            .collect(),
    );
    let mut batched = batch_cache.clone();
    let mut unpadded = batch_cache;
    let b = prompts.len();
    for (k, step) in steps.iter().enumerate() {
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(step.iter().map(|&t| t as i64).collect::<Vec<_>>(), [b, 1]),
            &device,
        );
        let logits = HostTensor::from_tensor(
            model.run(
                ModelInput::ids(tokens.clone())
                    .cache(&mut batched)
                    .left_padding(pads.clone()),
            ),
        );
        let ignored =
            HostTensor::from_tensor(model.run(ModelInput::ids(tokens).cache(&mut unpadded)));
        let width = logits.data.len() / b;
        for (r, own) in alone.iter().enumerate() {
            let row = &logits.data[r * width..(r + 1) * width];
            assert_eq!(own[k].data.len(), width, "row {r}: one position of logits");
            let d = peft_core::compare::max_abs_diff(row, &own[k].data);
            let scale = peft_core::compare::max_abs(&own[k].data);
            assert!(
                d <= 1e-4 * scale,
                "step {k}, row {r}: batched ≠ alone by {d:e} (scale {scale:e})"
            );
            if pads[r] > 0 {
                let wrong = &ignored.data[r * width..(r + 1) * width];
                let e = peft_core::compare::max_abs_diff(wrong, &own[k].data);
                assert!(
                    e > 1e-3 * scale,
                    "step {k}, row {r}: left padding made no difference"
                );
            }
        }
    }
    // What a server does when sequences leave: rows dropped, and the
    // padding every remaining row has trimmed away.
    let kept = batched
        .select_rows(&[1, 2])
        .drop_front(pads[1].min(pads[2]));
    assert_eq!(kept.rows(), 2);
    assert_eq!(kept.len(), longest + steps.len() - pads[1].min(pads[2]));
}

fn llama_left_padded<B: Backend>(device: &B::Device) {
    check_left_padded(&Llama::<B>::load(&fixtures().join("llama"), device).unwrap());
}

fn gpt2_left_padded<B: Backend>(device: &B::Device) {
    check_left_padded(&Gpt2::<B>::load(&fixtures().join("gpt2"), device).unwrap());
}

backend_tests!(llama_left_padded, gpt2_left_padded);
