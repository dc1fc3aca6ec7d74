//! Prefix and prompt tuning on the real SmolLM2-135M-Instruct (GGUF, fetched
//! by `scripts/fetch_assets.py`): a prefix built from a text's keys/values,
//! and a soft prompt initialised from the text's embeddings, make the model
//! behave exactly as if the text came first — RoPE positions, grouped-query
//! attention (9 query / 3 key-value heads) and the cache layout all line up
//! on the real model; generation with them continues the text.

use burn::tensor::Tensor;
use peft_core::backends::CpuBackend;
use peft_core::generate::{ids_tensor, CausalLm, Sampler};
use peft_core::io::HostTensor;
use peft_core::prompt_learning::{PromptLearningConfig, PromptTuningInit};
use peft_models::assets;
use peft_models::fixtures::max_diff;
use peft_models::gguf::Gguf;
use peft_models::llama::Llama;
use peft_models::tokenizer::Tokenizer;
use peft_prefix::PrefixTuningModel;
use peft_prompt::PromptTuningModel;

type B = CpuBackend;

#[test]
fn smollm2_prefix_and_prompt_from_text_are_the_text() {
    let path = assets::fetch("smollm2")
        .unwrap()
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = Tokenizer::from_gguf(&Gguf::open(&path).unwrap()).unwrap();
    let device = Default::default();
    let model = Llama::<B>::from_gguf(&path, &device).unwrap();
    let text = tok.encode("Answer in French.").unwrap();
    let input = tok.encode(" The cat sat on the mat.").unwrap();
    let all: Vec<u32> = text.iter().chain(&input).copied().collect();
    let full = model.logits(ids_tensor(&all, &device));
    let [_, t, v] = full.dims();
    let n = text.len();
    let want = HostTensor::from_tensor(full.slice([0..1, n..t, 0..v]));
    // Real logits reach ±30; 1e-4 is f32 rounding of a 30-layer stack.
    let tol = 1e-4;

    let mut prefix = PrefixTuningModel::wrap(model.clone());
    prefix
        .add_adapter_from_text("fr", PromptLearningConfig::prefix_tuning(n), &text)
        .unwrap();
    let got = HostTensor::from_tensor(prefix.forward(ids_tensor(&input, &device), None));
    let d = max_diff(&got, &want);
    assert!(d < tol, "prefix from text vs text context: {d:e}");

    let mut prompt = PromptTuningModel::wrap(model.clone());
    let mut config = PromptLearningConfig::prompt_tuning(n, PromptTuningInit::Text);
    config.prompt_tuning_init_text = Some("Answer in French.".into());
    prompt.add_adapter_from_text("fr", config, &text).unwrap();
    let out: Tensor<B, 3> = prompt.forward(ids_tensor(&input, &device), None);
    let got = HostTensor::from_tensor(out.slice([0..1, n..t, 0..v]));
    let d = max_diff(&got, &want);
    assert!(d < tol, "prompt from text vs text context: {d:e}");

    // Generation after the prefix / prompt continues as after the text.
    let plain = model.generate(&all, 6, &mut Sampler::Greedy, None, true);
    assert_eq!(
        prefix.generate(&input, 6, &mut Sampler::Greedy, None),
        plain
    );
    assert_eq!(
        prompt.generate(&input, 6, &mut Sampler::Greedy, None),
        plain
    );
}
