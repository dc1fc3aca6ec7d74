//! Parity with Hugging Face PEFT 0.21 prompt tuning and P-tuning on the
//! fixtures of `scripts/make_prompt_fixtures.py` (tiny random Llama and
//! GPT-2; prompts trained in PyTorch): logits, loss, gradients of every
//! encoder parameter (embedding, MLP, bidirectional LSTM), generation
//! through the KV cache and files, within 1e-5 on every backend.

use std::path::Path;

use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use peft_core::compare;
use peft_core::generate::{ids_tensor, CausalLm, Sampler};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::kv::KvCache;
use peft_core::loss::causal_lm_loss_after_prompt;
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType, CONFIG_FILE};
use peft_core::{autodiff_backend_tests, backend_tests, PeftError, PeftModel};
use peft_models::fixtures::{
    assert_close, fixtures_dir, max_diff, params_with_grad, temp_dir, tiny_gpt2, tiny_llama,
    FixtureCase,
};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_prompt::{PromptEncoder, PromptEncoderType, PromptTuningInit, PromptTuningModel};

trait Lm<B: Backend>: PeftModel<B, Output = Tensor<B, 3>> + CausalLm<B> + Clone {
    fn load_fixture(device: &B::Device) -> Self;
}

impl<B: Backend> Lm<B> for Llama<B> {
    fn load_fixture(device: &B::Device) -> Self {
        tiny_llama(device)
    }
}

impl<B: Backend> Lm<B> for Gpt2<B> {
    fn load_fixture(device: &B::Device) -> Self {
        tiny_gpt2(device)
    }
}

const BOTH: &[PromptLearningType] = &[
    PromptLearningType::PromptTuning,
    PromptLearningType::PTuning,
];

/// The training-time prompt of a case: PyTorch's full encoder.
fn training_encoder<B: Backend>(
    c: &FixtureCase,
    device: &B::Device,
) -> (PromptLearningConfig, PromptEncoder<B>) {
    let mut config = PromptLearningConfig::from_file(&c.dir.join(CONFIG_FILE), BOTH).unwrap();
    config.inference_mode = false;
    let path = c.dir.join("encoder.safetensors");
    let enc =
        PromptEncoder::from_torch_state(&config, read_safetensors(&path).unwrap(), &path, device)
            .unwrap();
    (config, enc)
}

fn with_training_encoder<B: Backend, M: Lm<B>>(
    c: &FixtureCase,
    device: &B::Device,
) -> PromptTuningModel<B, M> {
    let mut pm = PromptTuningModel::wrap(M::load_fixture(device));
    let (config, enc) = training_encoder(c, device);
    pm.add_adapter("default", config).unwrap();
    pm.map_encoder("default", |_| enc).unwrap();
    pm
}

fn check_case<B: Backend, M: Lm<B>>(arch: &str, case: &str, device: &B::Device) {
    let c = FixtureCase::open(arch, case);
    let ids = c.ints::<B, 2>("input_ids", device);
    let mask = c.floats::<B, 2>("attention_mask", device);

    // PEFT's saved (folded) prompt.
    let pm = PromptTuningModel::from_pretrained(M::load_fixture(device), &c.dir).unwrap();
    let logits = pm.forward(ids.clone(), Some(mask.clone()));
    assert_close(
        &format!("{arch}/{case} logits"),
        &HostTensor::from_tensor(logits),
        c.want("logits"),
    );

    // The training-time encoder: same logits, folds to PEFT's saved
    // tensor, PEFT's parameter counts.
    let trained = with_training_encoder::<B, M>(&c, device);
    assert_close(
        &format!("{arch}/{case} logits (training encoder)"),
        &HostTensor::from_tensor(trained.forward(ids.clone(), Some(mask.clone()))),
        c.want("logits"),
    );
    let saved = read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    assert_close(
        "folded prompt",
        &HostTensor::from_tensor(trained.encoder("default").unwrap().prompt()),
        &saved["prompt_embeddings"],
    );
    let count = trained.param_count();
    assert_eq!(count.trainable, c.meta_usize("trainable_params"));
    assert_eq!(count.all, c.meta_usize("all_params"));

    // Generation through the KV cache equals PEFT's forward re-run on the
    // whole sequence, step by step.
    let prompt: Vec<u32> = c.ids("input_ids")[..ids.dims()[1]].to_vec();
    let soft = pm.encoder("default").unwrap().prompt().unsqueeze::<3>();
    let embeds = Tensor::cat(
        vec![soft, pm.model.embed_tokens(ids_tensor(&prompt, device))],
        1,
    );
    let mut cache = KvCache::new();
    let first = pm.model.logits_embeds_cached(embeds, &mut cache);
    let want_ids = c.check_generation(&format!("{arch}/{case}"), first, |id| {
        pm.model
            .logits_cached(ids_tensor(&[id], device), &mut cache)
    });
    let generated = pm.generate(&prompt, want_ids.len(), &mut Sampler::Greedy, None);
    assert_eq!(generated, want_ids, "{arch}/{case}: greedy generation");

    // Saved by us: PEFT's file with the folded prompt; loads back.
    let out = temp_dir(&format!("prompt-{arch}-{case}"));
    trained.save_pretrained(&out).unwrap();
    let ours = read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), vec!["prompt_embeddings"]);
    assert_close(
        "saved prompt",
        &ours["prompt_embeddings"],
        &saved["prompt_embeddings"],
    );
    let reloaded = PromptTuningModel::from_pretrained(M::load_fixture(device), &out).unwrap();
    assert_close(
        "reloaded logits",
        &HostTensor::from_tensor(reloaded.forward(ids, Some(mask))),
        c.want("logits"),
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(json["inference_mode"], true);
    std::fs::remove_dir_all(&out).ok();
}

fn llama_prompt_cases<B: Backend>(device: &B::Device) {
    for case in [
        "prompt_random",
        "prompt_vocab",
        "ptuning_mlp",
        "ptuning_lstm",
    ] {
        check_case::<B, Llama<B>>("llama", case, device);
    }
}

fn gpt2_prompt_cases<B: Backend>(device: &B::Device) {
    for case in [
        "prompt_random",
        "prompt_vocab",
        "ptuning_mlp",
        "ptuning_lstm",
    ] {
        check_case::<B, Gpt2<B>>("gpt2", case, device);
    }
}

/// Loss and every encoder gradient equal PyTorch's; the model gets none.
fn check_gradients<B: AutodiffBackend, M: Lm<B> + AutodiffModule<B>>(
    arch: &str,
    case: &str,
    device: &B::Device,
) {
    let c = FixtureCase::open(arch, case);
    let ids = c.ints::<B, 2>("input_ids", device);
    let pm = with_training_encoder::<B, M>(&c, device);
    let n = pm.num_virtual_tokens();
    let loss = causal_lm_loss_after_prompt(pm.forward(ids.clone(), None), ids, n);
    assert_close(
        &format!("{arch}/{case} train loss"),
        &HostTensor::from_tensor(loss.clone()),
        c.want("train_loss"),
    );
    let grads = loss.backward();
    assert_eq!(
        params_with_grad(&pm.model, &grads),
        0,
        "the model got gradients"
    );
    let enc = pm.encoder("default").unwrap();
    let check2 = |name: &str, p: &Param<Tensor<B, 2>>, transpose: bool| {
        let g = HostTensor::from_tensor(p.val().grad(&grads).expect("a gradient"));
        let g = if transpose { g.transposed() } else { g };
        compare::assert_close(
            &format!("{arch}/{case} grad {name}"),
            &g,
            c.want(&format!("grad.{name}")),
            compare::GRADIENTS,
        );
    };
    let check1 = |name: &str, p: &Param<Tensor<B, 1>>| {
        let g = HostTensor::from_tensor(p.val().grad(&grads).expect("a gradient"));
        compare::assert_close(
            &format!("{arch}/{case} grad {name}"),
            &g,
            c.want(&format!("grad.{name}")),
            compare::GRADIENTS,
        );
    };
    check2("embedding.weight", &enc.embedding, false);
    let mut checked = 1;
    if let Some(mlp) = &enc.mlp {
        for (i, layer) in mlp.layers.iter().enumerate() {
            check2(&format!("mlp_head.{}.weight", 2 * i), &layer.weight, true);
            check1(
                &format!("mlp_head.{}.bias", 2 * i),
                layer.bias.as_ref().unwrap(),
            );
            checked += 2;
        }
    }
    if let Some(lstm) = &enc.lstm {
        for (l, (fwd, bwd)) in lstm.layers.iter().enumerate() {
            for (dir, suffix) in [(fwd, format!("l{l}")), (bwd, format!("l{l}_reverse"))] {
                check2(&format!("lstm_head.weight_ih_{suffix}"), &dir.w_ih, true);
                check2(&format!("lstm_head.weight_hh_{suffix}"), &dir.w_hh, true);
                check1(&format!("lstm_head.bias_ih_{suffix}"), &dir.b_ih);
                check1(&format!("lstm_head.bias_hh_{suffix}"), &dir.b_hh);
                checked += 4;
            }
        }
    }
    let want = c.expected.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        checked, want,
        "{arch}/{case}: every PyTorch gradient is checked"
    );
}

fn llama_gradients<B: AutodiffBackend>(device: &B::Device) {
    for case in ["prompt_random", "ptuning_mlp", "ptuning_lstm"] {
        check_gradients::<B, Llama<B>>("llama", case, device);
    }
}

fn gpt2_gradients<B: AutodiffBackend>(device: &B::Device) {
    for case in ["prompt_vocab", "ptuning_lstm"] {
        check_gradients::<B, Gpt2<B>>("gpt2", case, device);
    }
}

/// Rows routed to different prompts equal each prompt run alone; a
/// disabled model is the base model; inits behave as PEFT's.
fn mixed_batch_switching_and_inits<B: Backend>(device: &B::Device) {
    let c = FixtureCase::open("llama", "prompt_random");
    let ids = c.ints::<B, 2>("input_ids", device);
    let mut pm = PromptTuningModel::from_pretrained(tiny_llama(device), &c.dir).unwrap();
    pm.load_adapter(&fixtures_dir().join("llama/ptuning_lstm"), "lstm")
        .unwrap();
    assert_eq!(pm.active_adapter(), Some("default"));
    let mut alone = |name: &str| {
        pm.set_adapter(name).unwrap();
        HostTensor::from_tensor(pm.forward(ids.clone(), None))
    };
    let (default, lstm) = (alone("default"), alone("lstm"));
    let mixed = pm
        .forward_mixed(&["lstm", "default", "lstm"], ids.clone(), None)
        .unwrap();
    let row = |t: &HostTensor, i: usize| {
        let n = t.data.len() / 3;
        HostTensor {
            shape: vec![1, t.shape[1], t.shape[2]],
            data: t.data[i * n..(i + 1) * n].to_vec(),
        }
    };
    let mixed = HostTensor::from_tensor(mixed);
    assert_close("row 0", &row(&mixed, 0), &row(&lstm, 0));
    assert_close("row 1", &row(&mixed, 1), &row(&default, 1));
    assert_close("row 2", &row(&mixed, 2), &row(&lstm, 2));
    assert!(matches!(
        pm.forward_mixed(&["default", "nope", "lstm"], ids.clone(), None),
        Err(PeftError::UnknownAdapter { .. })
    ));

    pm.disable();
    assert_eq!(pm.num_virtual_tokens(), 0);
    assert_close(
        "disabled",
        &HostTensor::from_tensor(pm.forward(ids.clone(), None)),
        &HostTensor::from_tensor(pm.model.forward(ids.clone(), None)),
    );
    pm.enable();

    // SAMPLE_VOCAB: every row is a row of the word embeddings.
    pm.add_adapter(
        "vocab",
        PromptLearningConfig::prompt_tuning(6, PromptTuningInit::SampleVocab),
    )
    .unwrap();
    let table = HostTensor::from_tensor(pm.model.embed_tokens(ids_tensor(
        &(0..pm.model.dims().vocab_size as u32).collect::<Vec<_>>(),
        device,
    )));
    // A fresh adapter records the model's layers and attention heads, as
    // PEFT's file of the same model does.
    let fresh = pm.config("vocab").unwrap();
    let peft = pm.config("default").unwrap();
    assert_eq!(
        (fresh.num_layers, fresh.num_attention_heads),
        (peft.num_layers, peft.num_attention_heads)
    );
    assert_eq!(fresh.num_layers, Some(2));
    let d = pm.model.dims().d_model;
    let prompt = HostTensor::from_tensor(pm.encoder("vocab").unwrap().prompt());
    for r in prompt.data.chunks(d) {
        assert!(
            table.data.chunks(d).any(|t| t == r),
            "a SAMPLE_VOCAB row is not a word embedding"
        );
    }
    // TEXT: the text's embeddings, repeated to length (PEFT's rule).
    let mut text = PromptLearningConfig::prompt_tuning(5, PromptTuningInit::Text);
    text.prompt_tuning_init_text = Some("classify".into());
    pm.add_adapter_from_text("text", text.clone(), &[7, 9])
        .unwrap();
    let want = HostTensor::from_tensor(
        pm.model
            .embed_tokens(ids_tensor(&[7, 9, 7, 9, 7], device))
            .reshape([5, d]),
    );
    let got = HostTensor::from_tensor(pm.encoder("text").unwrap().prompt());
    assert_eq!(got.data, want.data);
    assert!(
        pm.add_adapter("t2", text.clone()).is_err(),
        "TEXT needs the ids"
    );
    assert!(pm.add_adapter_from_text("t3", text.clone(), &[]).is_err());
    assert!(
        pm.add_adapter_from_text("t4", text, &[64]).is_err(),
        "id outside the vocabulary"
    );
    let mut dropout = PromptLearningConfig::p_tuning(4, PromptEncoderType::Lstm, 6);
    dropout.encoder_dropout = Some(0.1);
    pm.add_adapter("dropout", dropout).unwrap();
    assert_eq!(
        pm.encoder("dropout")
            .unwrap()
            .lstm
            .as_ref()
            .unwrap()
            .dropout,
        0.1
    );
    let err = pm
        .forward_mixed(&["default", "text", "default"], ids, None)
        .unwrap_err();
    assert!(err.to_string().contains("one length"), "{err}");
}

/// `encoder_dropout` (PyTorch's LSTM `dropout`) acts on every LSTM layer's
/// output but the last, in training only: with p = 1 the first layer's
/// weights no longer matter; with p = 0.5 two passes differ; the inference
/// module ignores it and still gives PEFT's prompt.
fn lstm_encoder_dropout<B: AutodiffBackend>(device: &B::Device) {
    let c = FixtureCase::open("llama", "ptuning_lstm");
    let (config, plain) = training_encoder::<B>(&c, device);
    assert!(config.encoder_num_layers.unwrap_or(2) >= 2);
    let saved = read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    let host = |t: Tensor<B, 2>| HostTensor::from_tensor(t);
    let with_dropout = |p: f64| {
        let mut e = plain.clone();
        e.lstm.as_mut().unwrap().dropout = p;
        e
    };
    // Training with p = 1: the second layer sees zeros, whatever the first.
    let all = with_dropout(1.0);
    let mut other_first = all.clone();
    let first = &mut other_first.lstm.as_mut().unwrap().layers[0].0;
    first.w_ih = Param::from_tensor((first.w_ih.val() * 3.0 + 0.5).detach());
    let out = host(all.prompt());
    assert_eq!(max_diff(&out, &host(other_first.prompt())), 0.0);
    assert!(
        max_diff(&out, &host(plain.prompt())) > 1e-3,
        "p = 1 must change the prompt"
    );
    // Training with p = 0.5: a fresh mask each pass; the gradient flows.
    let half = with_dropout(0.5);
    let a = half.prompt();
    assert!(max_diff(&host(a.clone()), &host(half.prompt())) > 0.0);
    let grads = a.sum().backward();
    assert!(half.embedding.grad(&grads).is_some());
    // Inference: no dropout, PEFT's folded prompt.
    for p in [0.5, 1.0] {
        assert_close(
            "inference ignores encoder_dropout",
            &HostTensor::from_tensor(with_dropout(p).valid().prompt()),
            &saved["prompt_embeddings"],
        );
    }
}

backend_tests!(
    llama_prompt_cases,
    gpt2_prompt_cases,
    mixed_batch_switching_and_inits
);
/// The inference view (`valid()`) keeps names, activation and the disabled
/// switch, and gives the training model's logits on the inner backend.
fn inference_view<B: AutodiffBackend>(device: &B::Device) {
    let c = FixtureCase::open("llama", "ptuning_mlp");
    let ids = c.ints::<B, 2>("input_ids", device);
    let mut pm = with_training_encoder::<B, Llama<B>>(&c, device);
    let view = pm.valid();
    assert_eq!(view.active_adapter(), Some("default"));
    assert_close(
        "inference view logits",
        &HostTensor::from_tensor(view.forward(ids.clone().inner(), None)),
        &HostTensor::from_tensor(pm.forward(ids.clone(), None)),
    );
    assert_eq!(view.param_count(), pm.param_count());
    pm.disable();
    assert_eq!(
        pm.valid().num_virtual_tokens(),
        0,
        "disabled stays disabled"
    );
}

autodiff_backend_tests!(
    llama_gradients,
    gpt2_gradients,
    lstm_encoder_dropout,
    inference_view
);

#[test]
fn wrong_files_are_typed_errors() {
    type B = peft_core::backends::CpuBackend;
    let device = Default::default();
    let model = || tiny_llama::<B>(&device);
    let err = PromptTuningModel::from_pretrained(model(), &fixtures_dir().join("llama/lora"))
        .unwrap_err();
    assert!(
        err.to_string().contains("is not PROMPT_TUNING or P_TUNING"),
        "{err}"
    );
    let err = PromptTuningModel::from_pretrained(model(), &fixtures_dir().join("llama/prefix"))
        .unwrap_err();
    assert!(err.to_string().contains("PREFIX_TUNING"), "{err}");
    let err =
        PromptTuningModel::from_pretrained(model(), Path::new("/nonexistent/prompt")).unwrap_err();
    assert!(matches!(err, PeftError::Io { .. }), "{err}");
}

/// `torch_state` writes back exactly the PyTorch `state_dict` that
/// `from_torch_state` read (MLP and LSTM P-tuning encoders): what lets a
/// P-tuning run resume with its encoder.
#[test]
fn torch_state_round_trips_pytorchs_encoder() {
    type B = burn::backend::NdArray;
    for case in ["ptuning_mlp", "ptuning_lstm"] {
        let c = FixtureCase::open("llama", case);
        let (_, enc) = training_encoder::<B>(&c, &Default::default());
        let want = read_safetensors(&c.dir.join("encoder.safetensors")).unwrap();
        let got = enc.torch_state();
        assert_eq!(got.len(), want.len(), "{case}: tensor count");
        for (k, t) in &got {
            assert_eq!(Some(t), want.get(k), "{case}: {k}");
        }
    }
}
