//! What the LyCORIS parity tests share: the fixture models and the
//! gradient check, which reads any delta kind's factors under their PEFT
//! keys.

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use peft_core::compare;
use peft_core::io::HostTensor;
use peft_core::slot::{DeltaEntry, DeltaFactors, EntryKind};
use peft_core::{PeftModel, SlotMethod, SlotModel};
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, FixtureCase};
use peft_models::llama::Llama;

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    HostTensor::from_tensor(t)
}

pub fn llama<B: Backend>(d: &B::Device) -> Llama<B> {
    Llama::load(&fixtures_dir().join("llama"), d).unwrap()
}
pub fn bert<B: Backend>(d: &B::Device) -> Bert<B> {
    Bert::load(&fixtures_dir().join("bert"), d).unwrap()
}
pub fn lm<B: Backend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.forward(ids, None))
}
pub fn cls<B: Backend>(m: &Bert<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.classify(ids, None).unwrap())
}

/// Loss and the gradient of every `default` factor of method `K` (entries
/// `DeltaEntry<B, F>`) equal PEFT's; nothing else gets a gradient.
pub fn check_gradients<B, M, K, F>(
    arch: &str,
    case: &str,
    model: M,
    loss_fn: impl Fn(&M, Tensor<B, 2, Int>) -> Tensor<B, 1>,
    device: &B::Device,
) where
    B: AutodiffBackend,
    M: PeftModel<B> + AutodiffModule<B>,
    K: SlotMethod,
    F: DeltaFactors<B>,
    DeltaEntry<B, F>: EntryKind<B>,
{
    let c = FixtureCase::open(arch, case);
    let mut adapted = SlotModel::<B, M, K>::wrap(model);
    adapted.load_adapter(&c.dir, "default").unwrap();
    adapted.load_adapter(&c.dir.join("other"), "other").unwrap();
    adapted.set_adapter(&["default"]).unwrap();
    let loss = loss_fn(&adapted.model, c.ints::<B, 2>("input_ids", device));
    let got = loss.clone().into_scalar().elem::<f32>();
    compare::check_close_slices(
        "loss",
        &[got],
        &c.want("train_loss").data,
        compare::Tolerance::new(1e-5, 0.0),
    )
    .unwrap();
    let grads = loss.backward();
    // A gradient that is f32 noise in PyTorch (BERT's last-layer query)
    // is held to the case's floor.
    let tol = c.gradient_tolerance();
    let mut checked = 0;
    adapted.model.visit_linears(&mut |path, slot| {
        assert!(
            slot.base.weight.grad(&grads).is_none(),
            "{path}: base got a gradient"
        );
        if let Some(o) = slot.entry::<DeltaEntry<B, F>>("other") {
            for (key, p) in o.factors.factors() {
                assert!(
                    p.grad(&grads).is_none(),
                    "{path}: inactive factor {key} got a gradient"
                );
            }
        }
        let Some(e) = slot.entry::<DeltaEntry<B, F>>("default") else {
            return;
        };
        for (key, p) in e.factors.factors() {
            let got = HostTensor::from_tensor(p.grad(&grads).unwrap()).transposed();
            let want = c.want(&format!("grad.base_model.model.{path}.{key}"));
            compare::assert_close(&format!("{path}.{key}"), &got, want, tol);
            checked += 1;
        }
    });
    let expected = c.expected.keys().filter(|k| k.starts_with("grad.")).count();
    assert!(expected > 0, "the fixture has gradients");
    assert_eq!(checked, expected, "every PEFT gradient was compared");
}
