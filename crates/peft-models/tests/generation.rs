//! Generation through the KV cache equals generation that recomputes the
//! whole sequence each step, for every causal LM and backend.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use peft_core::backend_tests;
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
