//! Parity with Hugging Face PEFT 0.21 prefix tuning on the fixtures of
//! `scripts/make_prompt_fixtures.py` (tiny random Llama with grouped-query
//! attention, and GPT-2; prefixes trained in PyTorch): logits, loss,
//! gradients, generation through the KV cache and files, within 1e-5 on
//! every backend.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use peft_core::generate::{ids_tensor, CausalLm, Sampler};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::loss::causal_lm_loss;
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType, CONFIG_FILE};
use peft_core::{autodiff_backend_tests, backend_tests, PeftError, PeftModel};
use peft_models::fixtures::{
    assert_close, fixtures_dir, params_with_grad, temp_dir, tiny_gpt2, tiny_llama, FixtureCase,
};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_prefix::{PrefixEncoder, PrefixTuningModel};

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

/// The training-time prefix of a case: PyTorch's full encoder (with its
/// projection when the case has one).
fn training_encoder<B: Backend>(
    c: &FixtureCase,
    device: &B::Device,
) -> (PromptLearningConfig, PrefixEncoder<B>) {
    let mut config = PromptLearningConfig::from_file(
        &c.dir.join(CONFIG_FILE),
        &[PromptLearningType::PrefixTuning],
    )
    .unwrap();
    config.inference_mode = false;
    let path = c.dir.join("encoder.safetensors");
    let tensors = read_safetensors(&path).unwrap();
    let enc = PrefixEncoder::from_torch_state(&config, tensors, &path, device).unwrap();
    (config, enc)
}

fn check_case<B: Backend, M: Lm<B>>(arch: &str, case: &str, device: &B::Device) {
    let c = FixtureCase::open(arch, case);
    let ids = c.ints::<B, 2>("input_ids", device);
    let mask = c.floats::<B, 2>("attention_mask", device);

    // PEFT's saved (folded) prefix.
    let pm = PrefixTuningModel::from_pretrained(M::load_fixture(device), &c.dir).unwrap();
    let logits = pm.forward(ids.clone(), Some(mask.clone()));
    assert_close(
        &format!("{arch}/{case} logits"),
        &HostTensor::from_tensor(logits),
        c.want("logits"),
    );

    // The training-time encoder: same logits, folds to PEFT's saved tensor,
    // PEFT's parameter counts.
    let mut trained = PrefixTuningModel::wrap(M::load_fixture(device));
    let (config, enc) = training_encoder(&c, device);
    trained.add_adapter("default", config).unwrap();
    trained.map_encoder("default", |_| enc).unwrap();
    let logits = trained.forward(ids.clone(), Some(mask.clone()));
    assert_close(
        &format!("{arch}/{case} logits (training encoder)"),
        &HostTensor::from_tensor(logits),
        c.want("logits"),
    );
    let saved = read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    assert_close(
        "folded prefix",
        &HostTensor::from_tensor(trained.encoder("default").unwrap().prefix()),
        &saved["prompt_embeddings"],
    );
    let count = trained.param_count();
    assert_eq!(count.trainable, c.meta_usize("trainable_params"));
    assert_eq!(count.all, c.meta_usize("all_params"));

    // Generation through the KV cache equals PEFT's forward re-run on the
    // whole sequence, step by step.
    let prompt: Vec<u32> = c.ids("input_ids")[..ids.dims()[1]].to_vec();
    let dims = pm.model.dims();
    let mut cache =
        pm.encoder("default")
            .unwrap()
            .cache(1, dims.layers, dims.kv_heads, dims.head_dim);
    let first = pm
        .model
        .logits_cached(ids_tensor(&prompt, device), &mut cache);
    let want_ids = c.check_generation(&format!("{arch}/{case}"), first, |id| {
        pm.model
            .logits_cached(ids_tensor(&[id], device), &mut cache)
    });
    let generated = pm.generate(&prompt, want_ids.len(), &mut Sampler::Greedy, None);
    assert_eq!(generated, want_ids, "{arch}/{case}: greedy generation");

    // Saved by us: PEFT's file, bit for bit the folded prefix; loads back.
    let out = temp_dir(&format!("prefix-{arch}-{case}"));
    trained.save_pretrained(&out).unwrap();
    let ours = read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), vec!["prompt_embeddings"]);
    assert_close(
        "saved prefix",
        &ours["prompt_embeddings"],
        &saved["prompt_embeddings"],
    );
    let reloaded = PrefixTuningModel::from_pretrained(M::load_fixture(device), &out).unwrap();
    assert_close(
        "reloaded logits",
        &HostTensor::from_tensor(reloaded.forward(ids, Some(mask))),
        c.want("logits"),
    );
    let text = std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["peft_type"], "PREFIX_TUNING");
    assert_eq!(json["inference_mode"], true);
    std::fs::remove_dir_all(&out).ok();
}

fn llama_prefix<B: Backend>(device: &B::Device) {
    check_case::<B, Llama<B>>("llama", "prefix", device);
}

fn llama_prefix_projection<B: Backend>(device: &B::Device) {
    check_case::<B, Llama<B>>("llama", "prefix_proj", device);
}

fn gpt2_prefix<B: Backend>(device: &B::Device) {
    check_case::<B, Gpt2<B>>("gpt2", "prefix", device);
}

fn gpt2_prefix_projection<B: Backend>(device: &B::Device) {
    check_case::<B, Gpt2<B>>("gpt2", "prefix_proj", device);
}

/// Rows routed to different prefixes equal each prefix run alone; a
/// disabled model is the base model.
fn mixed_batch_and_switching<B: Backend>(device: &B::Device) {
    let c = FixtureCase::open("llama", "prefix");
    let ids = c.ints::<B, 2>("input_ids", device);
    let mut pm = PrefixTuningModel::from_pretrained(Llama::load_fixture(device), &c.dir).unwrap();
    pm.load_adapter(&fixtures_dir().join("llama/prefix_proj"), "proj")
        .unwrap();
    assert_eq!(pm.active_adapter(), Some("default"));
    let alone = |pm: &mut PrefixTuningModel<B, Llama<B>>, name: &str| {
        pm.set_adapter(name).unwrap();
        HostTensor::from_tensor(pm.forward(ids.clone(), None))
    };
    let default = alone(&mut pm, "default");
    let proj = alone(&mut pm, "proj");
    let mixed = pm
        .forward_mixed(&["proj", "default", "proj"], ids.clone(), None)
        .unwrap();
    let rows: Vec<HostTensor> = (0..3)
        .map(|i| HostTensor::from_tensor(mixed.clone().narrow(0, i, 1)))
        .collect();
    let row = |t: &HostTensor, i: usize| {
        let n = t.data.len() / 3;
        HostTensor {
            shape: vec![1, t.shape[1], t.shape[2]],
            data: t.data[i * n..(i + 1) * n].to_vec(),
        }
    };
    assert_close("row 0", &rows[0], &row(&proj, 0));
    assert_close("row 1", &rows[1], &row(&default, 1));
    assert_close("row 2", &rows[2], &row(&proj, 2));
    assert!(matches!(
        pm.forward_mixed(&["default", "nope", "proj"], ids.clone(), None),
        Err(PeftError::UnknownAdapter { .. })
    ));
    assert!(pm.forward_mixed(&["default"], ids.clone(), None).is_err());

    pm.disable();
    let base = pm.model.forward(ids.clone(), None);
    assert_close(
        "disabled",
        &HostTensor::from_tensor(pm.forward(ids.clone(), None)),
        &HostTensor::from_tensor(base),
    );
    pm.enable();

    let mut longer = PromptLearningConfig::prefix_tuning(5);
    longer.task_type = Some("CAUSAL_LM".into());
    pm.add_adapter("longer", longer).unwrap();
    let err = pm
        .forward_mixed(&["default", "longer", "default"], ids, None)
        .unwrap_err();
    assert!(err.to_string().contains("one length"), "{err}");
}

/// Loss and every encoder gradient (embedding and projection) equal
/// PyTorch's, through the frozen model.
fn check_gradients<B: AutodiffBackend, M: Lm<B> + AutodiffModule<B>>(
    arch: &str,
    case: &str,
    device: &B::Device,
) {
    let c = FixtureCase::open(arch, case);
    let ids = c.ints::<B, 2>("input_ids", device);
    let mut pm = PrefixTuningModel::wrap(M::load_fixture(device));
    let (config, enc) = training_encoder(&c, device);
    pm.add_adapter("default", config).unwrap();
    pm.map_encoder("default", |_| enc).unwrap();
    let loss = causal_lm_loss(pm.forward(ids.clone(), None), ids);
    assert_close(
        "train loss",
        &HostTensor::from_tensor(loss.clone()),
        c.want("train_loss"),
    );
    let grads = loss.backward();
    let enc = pm.encoder("default").unwrap();
    let grad = |t: Tensor<B, 2>| HostTensor::from_tensor(t.grad(&grads).expect("a gradient"));
    assert_close(
        "grad embedding",
        &grad(enc.embedding.val()),
        c.want("grad.embedding.weight"),
    );
    if let Some(t) = &enc.transform {
        let gb = |b: &Option<burn::module::Param<Tensor<B, 1>>>| {
            HostTensor::from_tensor(b.as_ref().unwrap().val().grad(&grads).unwrap())
        };
        assert_close(
            "grad transform.0.weight",
            &grad(t.first.weight.val()).transposed(),
            c.want("grad.transform.0.weight"),
        );
        assert_close(
            "grad transform.0.bias",
            &gb(&t.first.bias),
            c.want("grad.transform.0.bias"),
        );
        assert_close(
            "grad transform.2.weight",
            &grad(t.second.weight.val()).transposed(),
            c.want("grad.transform.2.weight"),
        );
        assert_close(
            "grad transform.2.bias",
            &gb(&t.second.bias),
            c.want("grad.transform.2.bias"),
        );
    }
    // The frozen model gets no gradient at all.
    assert_eq!(
        params_with_grad(&pm.model, &grads),
        0,
        "base parameters received gradients"
    );
}

fn llama_gradients<B: AutodiffBackend>(device: &B::Device) {
    check_gradients::<B, Llama<B>>("llama", "prefix_proj", device);
    check_gradients::<B, Llama<B>>("llama", "prefix", device);
}

fn gpt2_gradients<B: AutodiffBackend>(device: &B::Device) {
    check_gradients::<B, Gpt2<B>>("gpt2", "prefix_proj", device);
}

/// A prefix initialised from a text is that text: the model's logits after
/// it equal the plain model's on text + input (positions, masks and the
/// cache layout all line up).
fn prefix_from_text_is_the_text<B: Backend>(device: &B::Device) {
    fn check<B: Backend, M: Lm<B>>(device: &B::Device) {
        let text = [5u32, 17, 33, 2];
        let input = [9u32, 41, 12, 60, 3];
        let mut pm = PrefixTuningModel::wrap(M::load_fixture(device));
        pm.add_adapter_from_text("text", PromptLearningConfig::prefix_tuning(4), &text)
            .unwrap();
        let got = pm.forward(ids_tensor(&input, device), None);
        let all: Vec<u32> = text.iter().chain(&input).copied().collect();
        let full = pm.model.logits(ids_tensor(&all, device));
        let [_, t, v] = full.dims();
        let want = full.slice([0..1, text.len()..t, 0..v]);
        assert_close(
            "prefix from text",
            &HostTensor::from_tensor(got),
            &HostTensor::from_tensor(want),
        );
        assert!(pm
            .add_adapter_from_text(
                "p",
                PromptLearningConfig::prefix_tuning_projected(4, 8),
                &text
            )
            .is_err());
        assert!(pm
            .add_adapter_from_text("e", PromptLearningConfig::prefix_tuning(4), &[])
            .is_err());
    }
    check::<B, Llama<B>>(device);
    check::<B, Gpt2<B>>(device);
}

backend_tests!(
    prefix_from_text_is_the_text,
    llama_prefix,
    llama_prefix_projection,
    gpt2_prefix,
    gpt2_prefix_projection,
    mixed_batch_and_switching
);
/// The inference view (`valid()`) keeps names and activation and gives the
/// training model's logits on the inner backend, with a projected prefix
/// (whose encoder is a trainable MLP).
fn inference_view<B: AutodiffBackend>(device: &B::Device) {
    let c = FixtureCase::open("llama", "prefix_proj");
    let ids = c.ints::<B, 2>("input_ids", device);
    let mut pm = PrefixTuningModel::wrap(tiny_llama::<B>(device));
    pm.add_adapter("other", PromptLearningConfig::prefix_tuning(3))
        .unwrap();
    let (config, enc) = training_encoder(&c, device);
    pm.add_adapter("default", config).unwrap();
    pm.map_encoder("default", |_| enc).unwrap();
    let view = pm.valid();
    assert_eq!(view.adapter_names(), vec!["other", "default"]);
    assert_eq!(view.active_adapter(), Some("default"));
    assert_close(
        "inference view logits",
        &HostTensor::from_tensor(view.forward(ids.clone().inner(), None)),
        &HostTensor::from_tensor(pm.forward(ids, None)),
    );
    assert_eq!(view.param_count(), pm.param_count());
}

autodiff_backend_tests!(llama_gradients, gpt2_gradients, inference_view);

#[test]
fn wrong_files_are_typed_errors() {
    type B = peft_core::backends::CpuBackend;
    let device = Default::default();
    let model = || Llama::<B>::load_fixture(&device);
    // A LoRA folder is not a prefix.
    let err = PrefixTuningModel::from_pretrained(model(), &fixtures_dir().join("llama/lora"))
        .unwrap_err();
    assert!(err.to_string().contains("is not PREFIX_TUNING"), "{err}");
    // A GPT-2 prefix does not fit Llama.
    let err = PrefixTuningModel::from_pretrained(model(), &fixtures_dir().join("gpt2/prefix"))
        .unwrap_err();
    assert!(
        matches!(err, PeftError::Shape { .. } | PeftError::Checkpoint { .. }),
        "{err}"
    );
    // A prompt-tuning folder is not a prefix either.
    let err =
        PrefixTuningModel::from_pretrained(model(), &fixtures_dir().join("llama/prompt_random"))
            .unwrap_err();
    assert!(err.to_string().contains("PROMPT_TUNING"), "{err}");
    // Missing folder.
    let err =
        PrefixTuningModel::from_pretrained(model(), Path::new("/nonexistent/prefix")).unwrap_err();
    assert!(matches!(err, PeftError::Io { .. }), "{err}");
}

/// Sequence classification: a prefix on BERT (which PEFT 0.21 cannot
/// prefix-tune under transformers 5: "Model does not support past key
/// values") trains through the frozen encoder and its head; the loss falls
/// and the model stays bit-identical.
fn bert_sequence_classification_trains<B: AutodiffBackend>(device: &B::Device) {
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};
    use burn::tensor::ElementConversion;
    use peft_core::loss::cross_entropy;
    use peft_models::bert::Bert;
    let bert = Bert::<B>::load(&fixtures_dir().join("bert"), device).unwrap();
    let before = HostTensor::from_tensor(bert.word_embeddings.weight.val());
    let mut pm = PrefixTuningModel::new(bert, PromptLearningConfig::prefix_tuning(4)).unwrap();
    let ids = ids_tensor::<B>(&[3, 14, 15, 9, 26, 5], device).expand([2, 6]);
    let ids = Tensor::cat(
        vec![ids.clone().narrow(0, 0, 1), ids.narrow(0, 1, 1).flip([1])],
        0,
    );
    let labels = Tensor::<B, 1, burn::tensor::Int>::from_ints([2, 0], device);
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let h = pm.forward(ids.clone(), None);
        let loss = cross_entropy(pm.model.classify_hidden(h).unwrap(), labels.clone());
        losses.push(loss.clone().into_scalar().elem::<f64>());
        let grads = loss.backward();
        assert_eq!(params_with_grad(&pm.model, &grads), 0);
        pm.map_encoder("default", |e| {
            let g = GradientsParams::from_grads(grads, &e);
            optim.step(0.5, e, g)
        })
        .unwrap();
    }
    // The random head's weights are N(0, 0.02): its logits span only a few
    // hundredths whatever the hidden states, so the loss can fall only a
    // little; it must fall at every step.
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]) && losses[19] < losses[0] - 5e-4,
        "{losses:?}"
    );
    assert_eq!(
        HostTensor::from_tensor(pm.model.word_embeddings.weight.val()).data,
        before.data,
        "the frozen model changed"
    );
}

autodiff_backend_tests!(bert_sequence_classification_trains);

/// `torch_state` writes back exactly the PyTorch `state_dict` that
/// `from_torch_state` read: what lets a projected run resume with its MLP.
#[test]
fn torch_state_round_trips_pytorchs_encoder() {
    type B = burn::backend::NdArray;
    let c = FixtureCase::open("llama", "prefix_proj");
    let (_, enc) = training_encoder::<B>(&c, &Default::default());
    let want = read_safetensors(&c.dir.join("encoder.safetensors")).unwrap();
    let got = enc.torch_state();
    assert_eq!(got.len(), want.len(), "tensor count");
    for (k, t) in &got {
        assert_eq!(Some(t), want.get(k), "{k}");
    }
}
