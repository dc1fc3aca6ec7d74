//! The real SmolLM2-135M-Instruct from its GGUF file (Q4_1/Q8_0, fetched by
//! `scripts/fetch_assets.py`): the tokenizer rebuilt from GGUF metadata, the
//! dequantised weights with llama.cpp's q/k permutation undone, perplexity
//! on a fixed passage, the first position's logits and greedy generation
//! all match transformers'
//! reference (`scripts/smollm2_reference.py`); generation with the KV cache
//! equals generation without it.

use std::path::Path;

use burn::backend::NdArray;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_core::compare::{check_close_slices, Tolerance};
use peft_models::assets;
use peft_models::generate::{CausalLm, Sampler};
use peft_models::gguf::Gguf;
use peft_models::llama::Llama;
use peft_models::loss::causal_lm_loss;
use peft_models::tokenizer::Tokenizer;

type B = NdArray;

#[test]
fn smollm2_from_gguf_matches_the_reference() {
    let path = assets::fetch("smollm2")
        .unwrap()
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/smollm2_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let ids = |key: &str| -> Vec<u32> {
        reference[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };

    let gguf = Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(
        tok.encode(reference["passage"].as_str().unwrap()).unwrap(),
        ids("passage_ids")
    );
    assert_eq!(
        tok.encode(reference["prompt"].as_str().unwrap()).unwrap(),
        ids("prompt_ids")
    );
    assert_eq!(
        tok.encode("<|im_start|>user").unwrap()[0],
        1,
        "control tokens are matched whole"
    );

    let device = Default::default();
    let model = Llama::<B>::from_gguf(&path, &device).unwrap();
    assert_eq!(
        burn::module::Module::num_params(&model) as u64,
        reference["num_params"].as_u64().unwrap()
    );

    let passage = ids("passage_ids");
    let t = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            passage.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [1, passage.len()],
        ),
        &device,
    );
    let logits = model.forward(t.clone(), None);
    // The first position's first 8 logits, as transformers computes them
    // from the same dequantised weights (measured: 4.4e-5 apart on logits
    // of magnitude 16, NdArray).
    let first = logits
        .clone()
        .slice([0..1, 0..1, 0..8])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let want_first: Vec<f32> = reference["first_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    check_close_slices(
        "first logits",
        &first,
        &want_first,
        Tolerance::new(2e-5, 0.0),
    )
    .unwrap();
    let loss: f32 = causal_lm_loss(logits, t).into_scalar().elem();
    let ppl = loss.exp() as f64;
    let want = reference["perplexity"].as_f64().unwrap();
    assert!(
        (ppl - want).abs() / want < 0.01,
        "perplexity {ppl:.3} vs reference {want:.3}"
    );

    let prompt = ids("prompt_ids");
    let cached = model.generate(&prompt, 12, &mut Sampler::Greedy, None, true);
    assert_eq!(
        cached,
        ids("greedy_ids"),
        "greedy continuation: {:?}",
        tok.decode(&cached)
    );
    let uncached = model.generate(&prompt, 12, &mut Sampler::Greedy, None, false);
    assert_eq!(cached, uncached, "the KV cache changes nothing");
}
