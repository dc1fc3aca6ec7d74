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
