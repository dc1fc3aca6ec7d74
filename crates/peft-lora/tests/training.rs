//! Training: gradients match PEFT + PyTorch, only adapter parameters
//! receive gradients, and a few optimizer steps lower the loss while the
//! base weights stay bit-for-bit unchanged.

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::io::HostTensor;
use peft_core::{autodiff_backend_tests, PeftModel};
use peft_lora::LoraModel;
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, max_diff, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::{causal_lm_loss, cross_entropy};

/// Loss and gradients of the `default` adapter vs PEFT's; no gradient
/// reaches the base or the inactive adapter.
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
    let want_loss = expected["train_loss"].data[0];
    let got_loss = loss.clone().into_scalar().elem::<f32>();
    assert!(
        (got_loss - want_loss).abs() < 1e-5,
        "loss {got_loss} vs PEFT {want_loss}"
    );
    let grads = loss.backward();
    let mut checked = 0;
    lora.model.visit_linears(&mut |path, slot| {
        assert!(
            slot.base.weight.grad(&grads).is_none(),
            "{path}: base weight got a gradient"
        );
        if let Some(b) = &slot.base.bias {
            assert!(b.grad(&grads).is_none(), "{path}: base bias got a gradient");
        }
        if let Some(other) = slot.lora_entry("other") {
            assert!(
                other.a.grad(&grads).is_none(),
                "{path}: inactive adapter got a gradient"
            );
        }
        let Some(e) = slot.lora_entry("default") else {
            return;
        };
        let key = format!("grad.base_model.model.{path}");
        let pairs = [
            (
                "lora_A.weight",
                HostTensor::from_tensor(e.a.grad(&grads).unwrap()).transposed(),
            ),
            (
                "lora_B.weight",
                HostTensor::from_tensor(e.b.grad(&grads).unwrap()).transposed(),
            ),
        ];
        for (suffix, got) in pairs {
            let want = &expected[&format!("{key}.{suffix}")];
            let d = max_diff(&got, want);
            assert!(d < 1e-5, "{path}.{suffix}: gradient off by {d:e}");
            checked += 1;
        }
        if let Some(m) = &e.magnitude {
            let got = HostTensor::from_tensor(m.grad(&grads).unwrap());
            let d = max_diff(
                &got,
                &expected[&format!("{key}.lora_magnitude_vector.weight")],
            );
            assert!(d < 1e-5, "{path}.magnitude: gradient off by {d:e}");
            checked += 1;
        }
    });
    assert!(checked > 0);
}

fn llama_dora_gradients<B: AutodiffBackend>(device: &B::Device) {
    let model = Llama::<B>::load(&fixtures_dir().join("llama"), device).unwrap();
    check_gradients(
        "llama",
        "dora_rslora",
        model,
        |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
        device,
    );
}

fn gpt2_lora_gradients<B: AutodiffBackend>(device: &B::Device) {
    let model = Gpt2::<B>::load(&fixtures_dir().join("gpt2"), device).unwrap();
    check_gradients(
        "gpt2",
        "lora",
        model,
        |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
        device,
    );
}

fn bert_dora_gradients<B: AutodiffBackend>(device: &B::Device) {
    let model = Bert::<B>::load(&fixtures_dir().join("bert"), device).unwrap();
    check_gradients(
        "bert",
        "dora",
        model,
        |m, ids| {
            let labels = Tensor::<B, 1, Int>::from_data(
                TensorData::new(vec![2i64, 0, 1], [3]),
                &ids.device(),
            );
            cross_entropy(m.classify(ids, None).unwrap(), labels)
        },
        device,
    );
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
    bert_dora_gradients,
    lora_training_lowers_loss
);
