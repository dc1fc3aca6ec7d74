//! (IA)³ parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_ia3_fixtures.py` (tiny Llama, GPT-2 and BERT, PEFT's default
//! targets and a regex/custom case, vectors trained a few steps in PyTorch):
//! logits in every state, gradients, files and parameter counts, within 1e-5
//! on every backend.

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_adapter::{Ia3, Ia3Model};
use peft_core::compare;
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{autodiff_backend_tests, backend_tests, Ia3Config, PeftError, PeftModel};
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, temp_dir, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::{causal_lm_loss, cross_entropy};
use peft_models::slot_parity::check_slot_method_case;

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    HostTensor::from_tensor(t)
}

fn llama<B: Backend>(d: &B::Device) -> Llama<B> {
    Llama::load(&fixtures_dir().join("llama"), d).unwrap()
}
fn gpt2<B: Backend>(d: &B::Device) -> Gpt2<B> {
    Gpt2::load(&fixtures_dir().join("gpt2"), d).unwrap()
}
fn bert<B: Backend>(d: &B::Device) -> Bert<B> {
    Bert::load(&fixtures_dir().join("bert"), d).unwrap()
}
fn lm<B: Backend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.forward(ids, None))
}
fn gpt<B: Backend>(m: &Gpt2<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.forward(ids, None))
}
fn cls<B: Backend>(m: &Bert<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.classify(ids, None).unwrap())
}

fn llama_ia3<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Ia3>("llama", "ia3", llama::<B>(d), lm::<B>, d);
}
fn llama_ia3_custom<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Ia3>("llama", "ia3_custom", llama::<B>(d), lm::<B>, d);
}
fn gpt2_ia3<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Ia3>("gpt2", "ia3", gpt2::<B>(d), gpt::<B>, d);
}
fn bert_ia3<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Ia3>("bert", "ia3", bert::<B>(d), cls::<B>, d);
}

/// Fresh vectors are ones: the adapted model is the base model. Errors
/// name what is wrong.
fn fresh_is_identity_and_errors_are_typed<B: Backend>(d: &B::Device) {
    let base = llama::<B>(d);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), d);
    let want = host(base.forward(ids.clone(), None));
    let ia3 = Ia3Model::new(base.clone(), Ia3Config::default()).unwrap();
    assert_eq!(host(ia3.model.forward(ids, None)).data, want.data);
    // Default targets: k_proj, v_proj ([out]) and down_proj ([in]) per layer.
    let (kv, inter) = (8, 40);
    assert_eq!(ia3.param_count().trainable, 2 * (2 * kv + inter));

    let err = Ia3Model::new(base.clone(), Ia3Config::new(&["nothing"], &[])).unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatched { .. }), "{err}");
    assert!(
        err.to_string().contains("q_proj") && err.to_string().contains("\"nothing\""),
        "names the rule and lists the modules: {err}"
    );
    let err = Ia3Model::new(base.clone(), Ia3Config::new(&["q_proj"], &["down_proj"])).unwrap_err();
    assert!(err.to_string().contains("subset"), "{err}");

    // A file whose vector does not fit is refused and the model unchanged.
    let c = FixtureCase::open("llama", "ia3");
    let dir = temp_dir("ia3-bad-shape");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        c.dir.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors = read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    let key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l";
    tensors.get_mut(key).unwrap().shape = vec![40, 1];
    let list: Vec<(String, HostTensor)> = tensors.into_iter().collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        peft_core::io::serialize_safetensors(&list, None),
    )
    .unwrap();
    let mut ia3 = Ia3Model::wrap(base);
    let err = ia3.load_adapter(&dir, "bad").unwrap_err();
    assert!(err.to_string().contains(key), "{err}");
    assert!(ia3.adapter_names().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

backend_tests!(
    llama_ia3,
    llama_ia3_custom,
    gpt2_ia3,
    bert_ia3,
    fresh_is_identity_and_errors_are_typed
);

/// Loss and the gradient of every `default` vector equal PEFT's; nothing
/// else gets a gradient.
fn check_gradients<B: AutodiffBackend, M: PeftModel<B> + AutodiffModule<B>>(
    arch: &str,
    model: M,
    loss_fn: impl Fn(&M, Tensor<B, 2, Int>) -> Tensor<B, 1>,
    device: &B::Device,
) {
    let c = FixtureCase::open(arch, "ia3");
    let mut ia3 = Ia3Model::wrap(model);
    ia3.load_adapter(&c.dir, "default").unwrap();
    ia3.load_adapter(&c.dir.join("other"), "other").unwrap();
    ia3.set_adapter(&["default"]).unwrap();
    let loss = loss_fn(&ia3.model, c.ints::<B, 2>("input_ids", device));
    let got = loss.clone().into_scalar().elem::<f32>();
    compare::check_close_slices(
        "loss",
        &[got],
        &c.want("train_loss").data,
        compare::Tolerance::new(1e-5, 0.0),
    )
    .unwrap();
    let grads = loss.backward();
    let mut checked = 0;
    ia3.model.visit_linears(&mut |path, slot| {
        assert!(
            slot.base.weight.grad(&grads).is_none(),
            "{path}: base got a gradient"
        );
        if let Some(o) = slot.entry::<peft_core::Ia3Entry<_>>("other") {
            assert!(
                o.scale.grad(&grads).is_none(),
                "{path}: inactive vector got a gradient"
            );
        }
        let Some(e) = slot.entry::<peft_core::Ia3Entry<_>>("default") else {
            return;
        };
        let mut got = HostTensor::from_tensor(e.scale.grad(&grads).unwrap());
        let want = c.want(&format!("grad.base_model.model.{path}.ia3_l"));
        got.shape = want.shape.clone();
        compare::assert_close(path, &got, want, compare::GRADIENTS);
        checked += 1;
    });
    let expected = c.expected.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, expected, "every PEFT gradient was compared");
}

fn llama_gradients<B: AutodiffBackend>(d: &B::Device) {
    check_gradients(
        "llama",
        llama::<B>(d),
        |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
        d,
    );
}
fn gpt2_gradients<B: AutodiffBackend>(d: &B::Device) {
    check_gradients(
        "gpt2",
        gpt2::<B>(d),
        |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
        d,
    );
}
fn bert_gradients<B: AutodiffBackend>(d: &B::Device) {
    check_gradients(
        "bert",
        bert::<B>(d),
        |m, ids| {
            let labels = Tensor::<B, 1, Int>::from_data(
                TensorData::new(vec![2i64, 0, 1], [3]),
                &ids.device(),
            );
            cross_entropy(m.classify(ids, None).unwrap(), labels)
        },
        d,
    );
}

autodiff_backend_tests!(llama_gradients, gpt2_gradients, bert_gradients);

/// `init_ia3_weights: false` draws the vectors at random, so a fresh
/// adapter is not all ones; with the default it is exactly ones. The
/// disable switch reports its state, and `unload` removes every vector.
fn ia3_init_weights_is_honoured<B: Backend>(device: &B::Device) {
    let scales = |init: bool| -> Vec<f32> {
        let config = Ia3Config {
            init_ia3_weights: init,
            ..Ia3Config::new(&["q_proj", "down_proj"], &["down_proj"])
        };
        let model = Ia3Model::new(peft_models::fixtures::tiny_llama::<B>(device), config).unwrap();
        let mut values = Vec::new();
        model.model.visit_linears(&mut |_, slot| {
            if let Some(e) = slot.entry::<peft_core::Ia3Entry<_>>("default") {
                values.extend(HostTensor::from_tensor(e.scale.val()).data);
            }
        });
        assert!(!values.is_empty(), "no (IA)³ vector was injected");
        values
    };
    assert!(scales(true).iter().all(|&v| v == 1.0));
    let drawn = scales(false);
    assert!(
        drawn.iter().all(|v| v.is_finite()) && drawn.iter().any(|&v| v != 1.0),
        "init_ia3_weights: false left the vectors at ones"
    );
    // The switch reports itself, and unloading takes every vector out.
    let config = Ia3Config::new(&["q_proj"], &[]);
    let mut model = Ia3Model::new(peft_models::fixtures::tiny_llama::<B>(device), config).unwrap();
    assert!(!model.is_disabled());
    model.disable_adapters().unwrap();
    assert!(model.is_disabled());
    model.enable_adapters();
    assert!(!model.is_disabled());
    let plain = model.unload();
    let mut left = 0;
    plain.visit_linears(&mut |_, slot| {
        left += slot.entry::<peft_core::Ia3Entry<_>>("default").is_some() as usize
    });
    assert_eq!(left, 0, "unload left (IA)³ vectors in the model");
}

backend_tests!(ia3_init_weights_is_honoured);
