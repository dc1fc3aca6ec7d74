//! Bottleneck adapters in training and in the hands of users: only the
//! trained adapters (or fusion) get gradients, a few optimizer steps lower
//! the loss with the base untouched, and every user mistake is a typed error
//! naming what is wrong.

use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_adapter::{AdapterModel, BnConfig, FusionConfig, Setup};
use peft_core::compare::{check_close_slices, Tolerance};
use peft_core::io::{read_safetensors, serialize_safetensors, HostTensor};
use peft_core::{autodiff_backend_tests, backend_tests, PeftError};
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, params_with_grad, temp_dir, FixtureCase};
use peft_models::llama::Llama;
use peft_models::loss::cross_entropy;

type Tensors = Vec<(String, HostTensor)>;

fn bert<B: Backend>(d: &B::Device) -> Bert<B> {
    Bert::load(&fixtures_dir().join("bert"), d).unwrap()
}

/// The CPU backends' RNG is process-wide: every test here that draws from it
/// takes turns, or a test that seeds it gets other weights from one run to
/// the next (the training test's loss then stopped falling at every step
/// once in a full `cargo test --workspace`).
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_turn() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn labels<B: Backend>(d: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(vec![2i64, 0, 1], [3]), d)
}

/// Pfeiffer on the tiny BERT: 12 AdamW steps lower the loss; the inactive
/// adapter and the base get no gradient and stay bit for bit.
fn training_touches_only_the_trained_adapter<B: AutodiffBackend>(d: &B::Device) {
    let _turn = rng_turn();
    B::seed(d, 3);
    let config = BnConfig::seq_bn().with_reduction_factor(4.0);
    let mut model = AdapterModel::new(bert::<B>(d), "task", config.clone()).unwrap();
    model.add_adapter("other", config).unwrap();
    model.train_adapter(Setup::single("task")).unwrap();
    // Per layer: down 16·4 + 4, up 4·16 + 16.
    assert_eq!(model.param_count().trainable, 2 * (68 + 80));
    let base_before = model.model.clone();
    let other_before = model.set.adapters.module(1).clone();
    let ids = FixtureCase::open("bert", "bn_seq").ints::<B, 2>("input_ids", d);
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for step in 0..12 {
        let h = model.forward(ids.clone(), None).unwrap();
        let loss = cross_entropy(model.model.classify_hidden(h).unwrap(), labels(d));
        losses.push(loss.clone().into_scalar().elem::<f32>());
        let grads = loss.backward();
        if step == 0 {
            assert_eq!(
                params_with_grad(&model.model, &grads),
                0,
                "base got gradients"
            );
            assert_eq!(
                params_with_grad(model.set.adapters.module(1), &grads),
                0,
                "inactive adapter"
            );
            assert_eq!(
                params_with_grad(model.set.adapters.module(0), &grads),
                8,
                "2 layers × 4"
            );
        }
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(5e-2, model, grads);
    }
    // The tiny BERT's tanh pooler keeps the loss near ln 3; it must still
    // fall at every step.
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "loss did not go down: {losses:?}"
    );
    assert!(
        losses[11] < losses[0] - 0.01,
        "loss did not go down: {losses:?}"
    );
    assert_eq!(
        HostTensor::from_tensor(model.model.layers[0].query.base_weight()),
        HostTensor::from_tensor(base_before.layers[0].query.base_weight())
    );
    assert_eq!(
        HostTensor::from_tensor(model.model.layers[1].output_norm.slot.weight.val()),
        HostTensor::from_tensor(base_before.layers[1].output_norm.slot.weight.val())
    );
    let down = |a: &peft_adapter::BottleneckAdapter<B>| {
        HostTensor::from_tensor(a.output[0].as_ref().unwrap().down.weight.val())
    };
    assert_eq!(down(model.set.adapters.module(1)), down(&other_before));
}

/// Fusion training: gradients reach the fusion layers only.
fn fusion_training_touches_only_the_fusion<B: AutodiffBackend>(d: &B::Device) {
    let _turn = rng_turn();
    let c = FixtureCase::open("bert", "bn_compose");
    let mut model = AdapterModel::wrap(bert::<B>(d));
    model.load_adapter(&c.dir.join("a"), None).unwrap();
    model.load_adapter(&c.dir.join("b"), None).unwrap();
    let name = model
        .add_fusion(&["a", "b"], FusionConfig::dynamic())
        .unwrap();
    assert_eq!(name, "a,b");
    model.train_fusion(Setup::fuse(&["a", "b"])).unwrap();
    let ids = c.ints::<B, 2>("input_ids", d);
    let h = model.forward(ids, None).unwrap();
    let grads = cross_entropy(model.model.classify_hidden(h).unwrap(), labels(d)).backward();
    assert_eq!(params_with_grad(model.set.adapters.module(0), &grads), 0);
    assert_eq!(params_with_grad(model.set.adapters.module(1), &grads), 0);
    // 2 layers × (query w+b, key w+b, value w) at the output join.
    assert_eq!(params_with_grad(model.set.fusions.module(0), &grads), 10);
}

autodiff_backend_tests!(
    training_touches_only_the_trained_adapter,
    fusion_training_touches_only_the_fusion
);

/// Every mistake a user can make is a typed error that names it.
fn mistakes_are_typed_errors<B: Backend>(d: &B::Device) {
    let _turn = rng_turn();
    let c = FixtureCase::open("bert", "bn_compose");
    let mut model = AdapterModel::wrap(bert::<B>(d));
    model.load_adapter(&c.dir.join("a"), None).unwrap();
    model.load_adapter(&c.dir.join("b"), None).unwrap();
    let ids = c.ints::<B, 2>("input_ids", d);

    let err = model.set_active(Setup::single("nope")).unwrap_err();
    assert!(
        matches!(err, PeftError::UnknownAdapter { .. }) && err.to_string().contains("\"a\""),
        "{err}"
    );
    let err = model.set_active(Setup::fuse(&["a", "b"])).unwrap_err();
    assert!(err.to_string().contains("a,b"), "no fusion loaded: {err}");
    model
        .set_active(Setup::batch_split(&["a", "b"], &[1, 1]))
        .unwrap();
    let err = model.forward(ids.clone(), None).unwrap_err();
    assert!(err.to_string().contains("BatchSplit"), "{err}");
    let err = model.add_adapter("a", BnConfig::seq_bn()).unwrap_err();
    assert!(matches!(err, PeftError::DuplicateAdapter(_)), "{err}");
    let mut gated = BnConfig::seq_bn();
    gated.use_gating = true;
    assert!(model
        .add_adapter("g", gated)
        .unwrap_err()
        .to_string()
        .contains("use_gating"));
    let mut bad = BnConfig::seq_bn();
    bad.non_linearity = "softplus2".into();
    assert!(model
        .add_adapter("g", bad)
        .unwrap_err()
        .to_string()
        .contains("softplus2"));
    let err = model
        .add_fusion(&["a"], FusionConfig::dynamic())
        .unwrap_err();
    assert!(err.to_string().contains("two"), "{err}");
    let err = model
        .add_fusion(&["a", "par"], FusionConfig::dynamic())
        .unwrap_err();
    assert!(matches!(err, PeftError::UnknownAdapter { .. }), "{err}");

    // Files: malformed config, wrong width, pickle only, missing / extra /
    // misshapen tensors. The model is unchanged after each.
    let src = c.dir.join("a");
    let dir = temp_dir("bn-bad");
    let reset = |files: &[(&str, Vec<u8>)]| {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    };
    let config = std::fs::read(src.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(src.join("adapter.safetensors")).unwrap();
    let names_before = model.adapter_names().to_vec();

    reset(&[
        ("adapter_config.json", b"{\"config\": [1]".to_vec()),
        ("adapter.safetensors", weights.clone()),
    ]);
    let err = model.load_adapter(&dir, Some("x")).unwrap_err();
    assert!(
        matches!(err, PeftError::Json { .. }) && err.to_string().contains("adapter_config.json"),
        "{err}"
    );

    let wide = String::from_utf8(config.clone())
        .unwrap()
        .replace("\"hidden_size\": 16", "\"hidden_size\": 32");
    reset(&[
        ("adapter_config.json", wide.into_bytes()),
        ("adapter.safetensors", weights.clone()),
    ]);
    let err = model.load_adapter(&dir, Some("x")).unwrap_err();
    assert!(err.to_string().contains("hidden_size 32"), "{err}");

    reset(&[
        ("adapter_config.json", config.clone()),
        ("pytorch_adapter.bin", vec![0; 8]),
    ]);
    let err = model.load_adapter(&dir, Some("x")).unwrap_err();
    assert!(err.to_string().contains("use_safetensors"), "{err}");

    let tensors = read_safetensors(&src.join("adapter.safetensors")).unwrap();
    let rewrite = |edit: &dyn Fn(&mut Tensors)| {
        let mut list: Vec<(String, HostTensor)> = tensors.clone().into_iter().collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        edit(&mut list);
        serialize_safetensors(&list, None)
    };
    let key = "bert.encoder.layer.1.output.adapters.a.adapter_up.weight";
    let missing = rewrite(&|l| l.retain(|(k, _)| k != key));
    reset(&[
        ("adapter_config.json", config.clone()),
        ("adapter.safetensors", missing),
    ]);
    let err = model.load_adapter(&dir, Some("x")).unwrap_err();
    assert!(
        matches!(err, PeftError::MissingTensor { .. }) && err.to_string().contains(key),
        "{err}"
    );

    let extra = rewrite(&|l| l.push(("bert.pooler.adapters.a.x".into(), l[0].1.clone())));
    reset(&[
        ("adapter_config.json", config.clone()),
        ("adapter.safetensors", extra),
    ]);
    let err = model.load_adapter(&dir, Some("x")).unwrap_err();
    assert!(matches!(err, PeftError::UnexpectedTensors { .. }), "{err}");

    let misshapen = rewrite(&|l| {
        let t = &mut l.iter_mut().find(|(k, _)| k == key).unwrap().1;
        t.shape = vec![t.shape[1], t.shape[0]];
    });
    reset(&[
        ("adapter_config.json", config.clone()),
        ("adapter.safetensors", misshapen),
    ]);
    let err = model.load_adapter(&dir, Some("x")).unwrap_err();
    assert!(
        matches!(err, PeftError::Shape { .. }) && err.to_string().contains(key),
        "{err}"
    );

    let nan = rewrite(&|l| l[0].1.data[0] = f32::NAN);
    reset(&[
        ("adapter_config.json", config.clone()),
        ("adapter.safetensors", nan),
    ]);
    assert!(
        model.load_adapter(&dir, Some("x")).is_err(),
        "NaN weights are refused"
    );

    assert_eq!(
        model.adapter_names(),
        names_before.as_slice(),
        "failed loads leave no trace"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fresh `par_bn` (identity init) and `leave_out` of every layer leave the
/// model's output exactly as it was; `disable` restores the base.
fn identity_inits_and_disable<B: Backend>(d: &B::Device) {
    let _turn = rng_turn();
    let base = Llama::<B>::load(&fixtures_dir().join("llama"), d).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![3i64, 1, 4, 1, 5], [1, 5]), d);
    let want = HostTensor::from_tensor(base.forward(ids.clone(), None));
    let model = AdapterModel::new(base.clone(), "p", BnConfig::par_bn()).unwrap();
    let got = HostTensor::from_tensor(model.forward(ids.clone(), None).unwrap());
    assert_eq!(got.data, want.data);
    let all_out = BnConfig::double_seq_bn().with_leave_out(vec![0, 1]);
    let mut model = AdapterModel::new(base, "gone", all_out).unwrap();
    assert_eq!(model.param_count().trainable, 0);
    assert_eq!(
        HostTensor::from_tensor(model.forward(ids.clone(), None).unwrap()).data,
        want.data
    );
    model.disable();
    assert_eq!(
        HostTensor::from_tensor(model.forward(ids, None).unwrap()).data,
        want.data
    );
}

/// `init_weights_seed`, fusion `regularization` and `dropout_prob` are
/// honoured or refused: the seed fixes the draws whatever the name; the
/// regularisation term is AdapterHub's `0.01 · Σ ‖I − V‖²` over the trained
/// fusions that ask for it; training a fusion with dropout is refused.
fn config_fields_are_honoured_or_refused<B: Backend>(d: &B::Device) {
    let _turn = rng_turn();
    let mut model = AdapterModel::wrap(bert::<B>(d));
    let seeded = |seed: Option<u64>| BnConfig {
        init_weights_seed: seed,
        ..BnConfig::seq_bn()
    };
    for (name, seed) in [
        ("x", Some(7)),
        ("y", Some(7)),
        ("z", Some(8)),
        ("p", None),
        ("q", None),
    ] {
        model.add_adapter(name, seeded(seed)).unwrap();
    }
    let down = |i: usize| {
        HostTensor::from_tensor(
            model.set.adapters.module(i).output[0]
                .as_ref()
                .unwrap()
                .down
                .weight
                .val(),
        )
    };
    assert_eq!(down(0), down(1), "same seed, other name: same weights");
    assert_ne!(down(0), down(2), "another seed");
    assert_ne!(down(3), down(4), "no seed: drawn from the name");

    // A fusion whose value starts random (not identity), regularised.
    let config = FusionConfig {
        value_initialized: serde_json::Value::Bool(false),
        ..FusionConfig::dynamic()
    };
    model.add_fusion(&["x", "z"], config).unwrap();
    model
        .add_fusion(&["x", "p"], FusionConfig::static_())
        .unwrap();
    assert!(
        model.fusion_regularization_loss().is_none(),
        "nothing trains yet"
    );
    model.train_fusion(Setup::fuse(&["x", "z"])).unwrap();
    let got: f32 = model
        .fusion_regularization_loss()
        .unwrap()
        .into_scalar()
        .elem();
    let fusion = model.set.fusions.module(0);
    let want: f64 = fusion
        .attention
        .iter()
        .chain(&fusion.output)
        .flatten()
        .map(|l| {
            let w = HostTensor::from_tensor(l.value.as_ref().unwrap().weight.val());
            let n = w.shape[0];
            let sq: f64 = w
                .data
                .iter()
                .enumerate()
                .map(|(k, &v)| {
                    let eye = if k / n == k % n { 1.0 } else { 0.0 };
                    (eye - v as f64).powi(2)
                })
                .sum();
            0.01 * sq
        })
        .sum();
    assert!(
        want > 0.01,
        "a random value matrix is far from identity: {want}"
    );
    check_close_slices(
        "regularization",
        &[got],
        &[want as f32],
        Tolerance::new(1e-5, 0.0),
    )
    .unwrap();
    // A static fusion has no value matrix and no regularisation.
    model.train_fusion(Setup::fuse(&["x", "p"])).unwrap();
    assert!(model.fusion_regularization_loss().is_none());

    let dropout = FusionConfig {
        dropout_prob: Some(0.1),
        ..FusionConfig::dynamic()
    };
    model.add_fusion(&["y", "q"], dropout).unwrap();
    let err = model.train_fusion(Setup::fuse(&["y", "q"])).unwrap_err();
    assert!(matches!(err, PeftError::Config(_)), "{err}");
    assert!(err.to_string().contains("dropout_prob"), "{err}");
}

backend_tests!(
    mistakes_are_typed_errors,
    identity_inits_and_disable,
    config_fields_are_honoured_or_refused
);

/// Generation with bottleneck adapters through the model's KV cache gives
/// the tokens of recomputing the whole sequence at every step (Llama and
/// GPT-2, a single adapter, a stack and a parallel setup).
fn generation_through_the_cache<B: Backend>(d: &B::Device) {
    let _turn = rng_turn();
    use peft_core::generate::{CausalLm, Sampler};
    let llama = Llama::<B>::load(&fixtures_dir().join("llama"), d).unwrap();
    let mut m = AdapterModel::wrap(llama);
    m.load_adapter(
        &FixtureCase::open("llama", "bn_double_llama").dir.join("a"),
        None,
    )
    .unwrap();
    m.load_adapter(
        &FixtureCase::open("llama", "bn_par_llama").dir.join("a"),
        Some("p"),
    )
    .unwrap();
    let prompt = [3u32, 14, 15, 9, 26];
    for setup in [
        Setup::single("a"),
        Setup::stack(&["a", "p"]),
        Setup::parallel(&["p", "a"]),
    ] {
        m.set_active(setup.clone()).unwrap();
        let cached = m
            .generate_checked(&prompt, 6, &mut Sampler::Greedy, None)
            .unwrap();
        let full = m.generate(&prompt, 6, &mut Sampler::Greedy, None, false);
        assert_eq!(cached, full, "{setup:?}");
    }
    m.set_active(Setup::batch_split(&["a", "p"], &[1, 1]))
        .unwrap();
    assert!(m
        .generate_checked(&prompt, 2, &mut Sampler::Greedy, None)
        .is_err());

    let gpt2 = peft_models::gpt2::Gpt2::<B>::load(&fixtures_dir().join("gpt2"), d).unwrap();
    let mut g = AdapterModel::wrap(gpt2);
    let dir = FixtureCase::open("gpt2", "bn_double_gpt2").dir;
    g.load_adapter(&dir.join("a"), None).unwrap();
    g.load_adapter(&dir.join("b"), None).unwrap();
    g.set_active(Setup::stack(&["a", "b"])).unwrap();
    let cached = g
        .generate_checked(&prompt, 6, &mut Sampler::Greedy, None)
        .unwrap();
    assert_eq!(
        cached,
        g.generate(&prompt, 6, &mut Sampler::Greedy, None, false)
    );
}

backend_tests!(generation_through_the_cache);
