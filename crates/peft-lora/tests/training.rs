//! Training: gradients match PEFT + PyTorch, only adapter parameters
//! receive gradients, and a few optimizer steps lower the loss while the
//! base weights stay bit-for-bit unchanged.

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use std::collections::BTreeSet;

use peft_core::compare::{assert_close, check_close_slices, Tolerance, GRADIENTS};
use peft_core::io::HostTensor;
use peft_core::{autodiff_backend_tests, PeftModel};
use peft_lora::LoraModel;
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::{causal_lm_loss, cross_entropy};

/// Loss and gradients of the `default` adapter vs PEFT's; every gradient
/// the fixture stores is checked; no gradient reaches the base or the
/// inactive adapter.
fn check_gradients<B: AutodiffBackend, M: PeftModel<B> + AutodiffModule<B>>(
    arch: &str,
    case: &str,
    model: M,
    loss_fn: impl Fn(&M, Tensor<B, 2, Int>) -> Tensor<B, 1>,
    device: &B::Device,
) {
    let c = FixtureCase::open(arch, case);
    let expected = &c.expected;
    let lora = LoraModel::from_pretrained(model, &c.dir).unwrap();
    let loss = loss_fn(&lora.model, c.ints::<B, 2>("input_ids", device));
    let got_loss = loss.clone().into_scalar().elem::<f32>();
    check_close_slices(
        &format!("{arch}/{case} loss"),
        &[got_loss],
        &expected["train_loss"].data,
        Tolerance::new(1e-5, 0.0),
    )
    .unwrap();
    let grads = loss.backward();
    let mut checked = BTreeSet::new();
    lora.model.visit_linears(&mut |path, slot| {
        assert!(
            slot.base.weight.grad(&grads).is_none(),
            "{path}: base weight got a gradient"
        );
        if let Some(b) = &slot.base.bias {
            assert!(b.grad(&grads).is_none(), "{path}: base bias got a gradient");
        }
        if let Some(other) = slot.entry::<peft_core::LoraEntry<_>>("other") {
            assert!(
                other.a.grad(&grads).is_none(),
                "{path}: inactive adapter got a gradient"
            );
        }
        let Some(e) = slot.entry::<peft_core::LoraEntry<_>>("default") else {
            return;
        };
        let key = format!("grad.base_model.model.{path}");
        let mut pairs = vec![
            (
                format!("{key}.lora_A.weight"),
                HostTensor::from_tensor(e.a.grad(&grads).unwrap()).transposed(),
            ),
            (
                format!("{key}.lora_B.weight"),
                HostTensor::from_tensor(e.b.grad(&grads).unwrap()).transposed(),
            ),
        ];
        if let Some(m) = &e.magnitude {
            pairs.push((
                format!("{key}.lora_magnitude_vector.weight"),
                HostTensor::from_tensor(m.grad(&grads).unwrap()),
            ));
        }
        for (name, got) in pairs {
            let want = expected
                .get(&name)
                .unwrap_or_else(|| panic!("{arch}/{case}: no reference for {name}"));
            assert_close(&name, &got, want, GRADIENTS);
            checked.insert(name);
        }
    });
    let stored: BTreeSet<String> = expected
        .keys()
        .filter(|k| k.starts_with("grad."))
        .cloned()
        .collect();
    assert!(!stored.is_empty(), "{arch}/{case} stores no gradients");
    assert_eq!(
        checked, stored,
        "{arch}/{case}: gradients checked vs stored"
    );
}

fn llama_gradients<B: AutodiffBackend>(case: &str, device: &B::Device) {
    let model = Llama::<B>::load(&fixtures_dir().join("llama"), device).unwrap();
    check_gradients(
        "llama",
        case,
        model,
        |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
        device,
    );
}

fn gpt2_gradients<B: AutodiffBackend>(case: &str, device: &B::Device) {
    let model = Gpt2::<B>::load(&fixtures_dir().join("gpt2"), device).unwrap();
    check_gradients(
        "gpt2",
        case,
        model,
        |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
        device,
    );
}

/// BERT's sequence classification with the fixture script's labels.
fn bert_gradients<B: AutodiffBackend>(case: &str, device: &B::Device) {
    let model = Bert::<B>::load(&fixtures_dir().join("bert"), device).unwrap();
    let loss = |m: &Bert<B>, ids: Tensor<B, 2, Int>| {
        let labels =
            Tensor::<B, 1, Int>::from_data(TensorData::new(vec![2i64, 0, 1], [3]), &ids.device());
        cross_entropy(m.classify(ids, None).unwrap(), labels)
    };
    check_gradients("bert", case, model, loss, device);
}

fn llama_dora_gradients<B: AutodiffBackend>(device: &B::Device) {
    llama_gradients::<B>("dora_rslora", device);
}

fn llama_regex_layers_gradients<B: AutodiffBackend>(device: &B::Device) {
    llama_gradients::<B>("regex_layers", device);
}

fn gpt2_lora_gradients<B: AutodiffBackend>(device: &B::Device) {
    gpt2_gradients::<B>("lora", device);
}

fn gpt2_dora_gradients<B: AutodiffBackend>(device: &B::Device) {
    gpt2_gradients::<B>("dora", device);
}

fn bert_dora_gradients<B: AutodiffBackend>(device: &B::Device) {
    bert_gradients::<B>("dora", device);
}

fn bert_lora_gradients<B: AutodiffBackend>(device: &B::Device) {
    bert_gradients::<B>("lora", device);
}

/// Fresh LoRA (B = 0) on the tiny Llama: AdamW steps lower the loss; the
/// optimizer leaves every base parameter untouched.
fn lora_training_lowers_loss<B: AutodiffBackend>(device: &B::Device) {
    B::seed(device, 7);
    let model = Llama::<B>::load(&fixtures_dir().join("llama"), device).unwrap();
    let base_params: Vec<HostTensor> = {
        let mut v = Vec::new();
        model.visit_linears(&mut |_, s| v.push(HostTensor::from_tensor(s.base_weight())));
        v
    };
    let embed_before = HostTensor::from_tensor(model.embed_tokens.weight.val());
    let config = peft_core::LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "o_proj"]);
    let mut lora = LoraModel::new(model, config).unwrap();
    let count = lora.param_count();
    // Per layer: q and o are 16→16 (A 16·4 + B 4·16), v is 16→8 (16·4 + 4·8).
    assert_eq!(count.trainable, 2 * (128 + 128 + 96), "{count}");
    let batch = FixtureCase::open("llama", "lora").ints::<B, 2>("input_ids", device);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut losses = Vec::new();
    for _ in 0..15 {
        let loss = causal_lm_loss(lora.model.forward(batch.clone(), None), batch.clone());
        losses.push(loss.clone().into_scalar().elem::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &lora.model);
        lora.model = optim.step(2e-2, lora.model, grads);
    }
    assert!(
        losses[14] < losses[0] - 0.1,
        "loss did not go down: {losses:?}"
    );
    let mut i = 0;
    lora.model.visit_linears(&mut |p, s| {
        assert_eq!(
            HostTensor::from_tensor(s.base_weight()),
            base_params[i],
            "{p} base changed"
        );
        i += 1;
    });
    assert_eq!(
        HostTensor::from_tensor(lora.model.embed_tokens.weight.val()),
        embed_before
    );
}

use burn::tensor::ElementConversion;

autodiff_backend_tests!(
    llama_dora_gradients,
    gpt2_lora_gradients,
    gpt2_dora_gradients,
    llama_regex_layers_gradients,
    bert_dora_gradients,
    bert_lora_gradients,
    lora_training_lowers_loss
);
