//! The parity check every slot method's fixtures go through: a case made by
//! a `scripts/make_*_fixtures.py` (PEFT's `save_pretrained` of `default` and
//! `other/`, and `expected.safetensors` with the logits of every state) is
//! held to PEFT in every state a [`SlotModel`] has, for any [`SlotMethod`].

use burn::module::{AutodiffModule, ModuleDisplay, Param};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use peft_core::compare::{self, Tolerance};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::slot::{EmbeddingCopyKind, NormCopyRole};
use peft_core::{EmbeddingSlot, LinearSlot, LoraEntry, NormSlot, PeftModel, SlotMethod, SlotModel};

use crate::fixtures::{assert_close, max_diff, temp_dir, FixtureCase};

/// Checks fixture `case` of `arch` against `base_model` adapted by method
/// `K`: the base logits, `default` and `other` alone and both active, a
/// mixed batch, disabled, merged (and that disabling or mixing is then
/// refused), unmerged again with the base weights restored, the saved
/// tensors equal to PEFT's file and loading back, the parameter counts, and
/// `merge_and_unload`; every logit within 1e-5 of PEFT's.
///
/// A case whose adapters keep copies of a layer (`modules_to_save`,
/// `scripts/make_seqcls_fixtures.py`) has no `logits_both`: PEFT refuses
/// both active, and so must we; its `logits_unload` is PEFT's `unload()`,
/// which keeps the active copy.
pub fn check_slot_method_case<B: Backend, M: PeftModel<B> + Clone, K: SlotMethod>(
    arch: &str,
    case: &str,
    base_model: M,
    forward: fn(&M, Tensor<B, 2, Int>) -> HostTensor,
    device: &B::Device,
) {
    let c = FixtureCase::open(arch, case);
    let ids = c.ints::<B, 2>("input_ids", device);
    let run = |m: &M| forward(m, ids.clone());
    assert_close("base", &run(&base_model), c.want("logits_base"));

    let mut adapted = SlotModel::<B, M, K>::from_pretrained(base_model.clone(), &c.dir).unwrap();
    assert_eq!(adapted.adapter_names(), vec!["default", "other"]);
    assert_close("default", &run(&adapted.model), c.want("logits_unmerged"));
    assert_eq!(adapted.active_adapters(), ["default"]);
    adapted.set_adapter(&["other"]).unwrap();
    assert_eq!(adapted.active_adapters(), ["other"]);
    assert_close("other", &run(&adapted.model), c.want("logits_other"));
    if c.expected.contains_key("logits_both") {
        adapted.set_adapter(&["default", "other"]).unwrap();
        assert_eq!(adapted.active_adapters(), ["default", "other"]);
        assert_close("both active", &run(&adapted.model), c.want("logits_both"));
    } else {
        let refused = adapted.set_adapter(&["default", "other"]);
        assert!(refused.is_err(), "two copies of one layer were activated");
        assert_eq!(adapted.active_adapters(), ["other"]);
        assert_close(
            "after refusal",
            &run(&adapted.model),
            c.want("logits_other"),
        );
    }
    adapted.set_adapter(&["default"]).unwrap();

    let names: Vec<&str> = c.meta["mixed_adapter_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let batch = ids.dims()[0];
    let mixed = adapted.forward_mixed(&names, batch, run).unwrap();
    assert_close("mixed batch", &mixed, c.want("logits_mixed"));

    adapted.disable_adapters().unwrap();
    assert_close("disabled", &run(&adapted.model), c.want("logits_disabled"));
    adapted.enable_adapters();

    let weights = |m: &M| {
        let mut v = Vec::new();
        m.visit_linears(&mut |_, s| {
            v.push(HostTensor::from_tensor(s.base_weight()));
            if let Some(b) = &s.base.bias {
                v.push(HostTensor::from_tensor(b.val()));
            }
        });
        m.visit_norms(&mut |_, s| {
            v.push(HostTensor::from_tensor(s.weight.val()));
            if let Some(b) = &s.bias {
                v.push(HostTensor::from_tensor(b.val()));
            }
        });
        m.visit_embeddings(&mut |_, s| v.push(HostTensor::from_tensor(s.weight.val())));
        v
    };
    let before = weights(&adapted.model);
    adapted.merge_adapter().unwrap();
    assert_close("merged", &run(&adapted.model), c.want("logits_merged"));
    assert!(adapted.disable_adapters().is_err(), "disable while merged");
    assert!(adapted.forward_mixed(&names, batch, |_| ()).is_err());
    adapted.unmerge_adapter();
    assert_close(
        "unmerged again",
        &run(&adapted.model),
        c.want("logits_unmerged_again"),
    );
    for (a, b) in weights(&adapted.model).iter().zip(&before) {
        let d = max_diff(a, b);
        assert!(d < 1e-5, "merge/unmerge round trip off by {d:e}");
    }

    // Our files hold PEFT's keys, shapes and values, and load back.
    let out = temp_dir(&format!("slot-method-{arch}-{case}"));
    adapted.save_pretrained(&out).unwrap();
    for sub in ["", "other"] {
        let theirs = read_safetensors(&c.dir.join(sub).join("adapter_model.safetensors")).unwrap();
        let ours = read_safetensors(&out.join(sub).join("adapter_model.safetensors")).unwrap();
        assert_eq!(theirs, ours, "saved `{sub}` differs from PEFT's");
        let config = |dir: &std::path::Path| -> serde_json::Value {
            let text = std::fs::read_to_string(dir.join(sub).join("adapter_config.json")).unwrap();
            serde_json::from_str(&text).unwrap()
        };
        assert_same_json(&format!("`{sub}` config"), &config(&c.dir), &config(&out));
    }
    let reloaded = SlotModel::<B, M, K>::from_pretrained(base_model.clone(), &out).unwrap();
    assert_close("reloaded", &run(&reloaded.model), c.want("logits_unmerged"));
    std::fs::remove_dir_all(&out).unwrap();

    if c.expected.contains_key("logits_unload") {
        let loaded = SlotModel::<B, M, K>::from_pretrained(base_model.clone(), &c.dir).unwrap();
        let unloaded = loaded.unload();
        assert_close("unload", &run(&unloaded), c.want("logits_unload"));
        assert_eq!(entry_count(&unloaded), 0, "unload left entries behind");
    }

    adapted.delete_adapter("other").unwrap();
    let count = adapted.param_count();
    assert_eq!(count.trainable, c.meta_usize("trainable_params"), "{count}");
    assert_eq!(count.all, c.meta_usize("all_params"), "{count}");

    // merge_and_unload: the plain model computes the adapted output.
    let plain = adapted.merge_and_unload().unwrap();
    assert_close("merge_and_unload", &run(&plain), c.want("logits_unmerged"));
}

/// `ours` has every key of `theirs` with the same value, numbers compared
/// as numbers (PEFT writes `alpha: 8`, we `8.0`).
fn assert_same_json(what: &str, theirs: &serde_json::Value, ours: &serde_json::Value) {
    use serde_json::Value;
    match (theirs, ours) {
        (Value::Number(a), Value::Number(b)) => {
            assert_eq!(a.as_f64(), b.as_f64(), "{what}: {a} written as {b}")
        }
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let Some(got) = b.get(key) else {
                    panic!("{what}: PEFT's key `{key}` is missing");
                };
                assert_same_json(&format!("{what}.{key}"), value, got);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{what}: {a:?} written as {b:?}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_same_json(&format!("{what}[{i}]"), x, y);
            }
        }
        (a, b) => assert_eq!(a, b, "{what}"),
    }
}

/// The learning rate of the fixtures' two training steps
/// (`STEP_LR` in `scripts/make_lycoris_fixtures.py`).
pub const STEP_LR: f64 = 0.01;

/// Two Adam steps (PyTorch's defaults: betas 0.9 / 0.999, eps 1e-8) from
/// the fixture's saved `default`, on the fixture's two recorded batches
/// (`steps.input_ids.i`, and `steps.labels.i` for a classifier): the saved
/// tensors afterwards equal PEFT's after the same steps (`steps.<key>`),
/// and the steps moved them well beyond the tolerance. `loss` is the
/// training loss of a batch (ids, labels if recorded).
pub fn check_training_steps<B, M, K>(
    arch: &str,
    case: &str,
    model: M,
    loss: impl Fn(&M, Tensor<B, 2, Int>, Option<Tensor<B, 1, Int>>) -> Tensor<B, 1>,
    device: &B::Device,
) where
    B: AutodiffBackend,
    M: PeftModel<B> + AutodiffModule<B> + ModuleDisplay + Clone,
    M::InnerModule: PeftModel<B::InnerBackend> + ModuleDisplay,
    K: SlotMethod,
{
    let c = FixtureCase::open(arch, case);
    let mut adapted = SlotModel::<B, M, K>::wrap(model);
    adapted.load_adapter(&c.dir, "default").unwrap();
    adapted.set_adapter(&["default"]).unwrap();
    let before = saved_tensors(&adapted, &format!("{arch}-{case}-before"));
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init();
    for i in 0..2 {
        let ids = c.ints::<B, 2>(&format!("steps.input_ids.{i}"), device);
        let labels_key = format!("steps.labels.{i}");
        let labels = c
            .expected
            .contains_key(&labels_key)
            .then(|| c.ints::<B, 1>(&labels_key, device));
        let grads = loss(&adapted.model, ids, labels).backward();
        let grads = GradientsParams::from_grads(grads, &adapted);
        adapted = optim.step(STEP_LR, adapted, grads);
    }
    let after = saved_tensors(&adapted, &format!("{arch}-{case}-after"));
    assert!(!after.is_empty(), "{arch}/{case}: nothing saved");
    let mut moved_by_a_step = 0;
    for (key, got) in &after {
        let want = c.want(&format!("steps.{key}"));
        // Adam moves an element whose gradient is well above its epsilon
        // by about the learning rate per step: the tolerance is a
        // thousandth of that.
        let tol = Tolerance::new(1e-4, 1e-3 * STEP_LR as f32);
        compare::assert_close(
            &format!("{arch}/{case} after two steps: {key}"),
            got,
            want,
            tol,
        );
        if max_diff(got, &before[key]) > 0.5 * STEP_LR as f32 {
            moved_by_a_step += 1;
        }
    }
    // Tensors whose gradient is f32 noise (BERT's saturated last-layer
    // query) barely move; most must, or the check proves nothing.
    assert!(
        2 * moved_by_a_step >= after.len(),
        "{arch}/{case}: only {moved_by_a_step} of {} tensors moved by a step",
        after.len()
    );
}

/// The tensors `adapted` saves, by key.
fn saved_tensors<B: Backend, M: PeftModel<B>, K: SlotMethod>(
    adapted: &SlotModel<B, M, K>,
    tag: &str,
) -> std::collections::HashMap<String, HostTensor> {
    let dir = temp_dir(&format!("slot-steps-{tag}"));
    adapted.save_pretrained(&dir).unwrap();
    let tensors = read_safetensors(&dir.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    tensors
}

/// A copy of fixture `arch/case`'s `default` with tensor `key`'s shape
/// reversed is refused by method `K` on `base`: the error names `key`, and
/// no adapter and no entry is left behind.
pub fn check_bad_shape_refused<B: Backend, M: PeftModel<B>, K: SlotMethod>(
    arch: &str,
    case: &str,
    key: &str,
    base: M,
) {
    let c = FixtureCase::open(arch, case);
    let dir = temp_dir(&format!("{arch}-{case}-bad-shape"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        c.dir.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors = read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    tensors
        .get_mut(key)
        .unwrap_or_else(|| panic!("{arch}/{case} has no `{key}`"))
        .shape
        .reverse();
    let list: Vec<(String, HostTensor)> = tensors.into_iter().collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        peft_core::io::serialize_safetensors(&list, None),
    )
    .unwrap();
    let mut adapted = SlotModel::<B, M, K>::wrap(base);
    let err = adapted.load_adapter(&dir, "bad").unwrap_err();
    assert!(err.to_string().contains(key), "{err}");
    assert!(adapted.adapter_names().is_empty());
    assert_eq!(
        entry_count(&adapted.model),
        0,
        "a refused file left entries behind"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Adapter entries on the linear slots and copies on the norm and
/// embedding slots of `m`.
pub fn entry_count<B: Backend, M: PeftModel<B>>(m: &M) -> usize {
    let mut entries = 0;
    m.visit_linears(&mut |_, s| entries += s.entries.len());
    m.visit_norms(&mut |_, s| entries += s.copies.len());
    m.visit_embeddings(&mut |_, s| entries += s.copies.len());
    entries
}

/// LoRA's `lora_A` / `lora_B` gradients in PEFT's `[out, in]` layout: the
/// [`LinearGradients`] of LoRA.
pub fn lora_gradients<B: AutodiffBackend>(
    slot: &LinearSlot<B>,
    name: &str,
    grads: &B::Gradients,
) -> Option<EntryGradients> {
    let e = slot.entry::<LoraEntry<B>>(name)?;
    let grad = |p: &Param<Tensor<B, 2>>| {
        p.grad(grads)
            .map(|g| HostTensor::from_tensor(g).transposed())
    };
    Some(vec![
        ("lora_A.weight", grad(&e.a)),
        ("lora_B.weight", grad(&e.b)),
    ])
}

/// The gradient of adapter `name`'s copy of an embedding table, under the
/// key PEFT names it (`weight` for a full copy,
/// `token_adapter.trainable_tokens_delta` for retrained tokens).
fn embedding_copy_gradients<B: AutodiffBackend>(
    slot: &EmbeddingSlot<B>,
    name: &str,
    grads: &B::Gradients,
) -> Option<KeyedGradients> {
    let copy = slot.copy(name)?;
    let key = match copy.kind {
        EmbeddingCopyKind::Tokens { key } => key,
        EmbeddingCopyKind::Saved { .. } => "weight",
    };
    let grad = copy.weight.grad(grads).map(HostTensor::from_tensor);
    Some(vec![(key.to_string(), grad)])
}

/// The gradients of one entry's trained tensors, by the key suffix PEFT
/// names each under (`oft_R.weight`): what [`check_gradients`] asks of a
/// kind; `None` where the slot has no entry of that name.
pub type EntryGradients = Vec<(&'static str, Option<HostTensor>)>;

/// Gradients by the key suffix PEFT names each under, owned.
type KeyedGradients = Vec<(String, Option<HostTensor>)>;

/// What [`check_gradients`] asks of an entry kind on a linear slot: the
/// gradients of adapter `name`'s entry, `None` where it has none there.
pub type LinearGradients<B> =
    fn(&LinearSlot<B>, &str, &<B as AutodiffBackend>::Gradients) -> Option<EntryGradients>;

/// The gradients of adapter `name`'s copy of a norm layer, under the keys
/// PEFT names them (LN tuning's `ln_tuning_layers.weight` / `.bias`,
/// `modules_to_save`'s `weight` / `bias`); `None` where the slot has no
/// copy of that name.
fn norm_copy_gradients<B: AutodiffBackend>(
    slot: &NormSlot<B>,
    name: &str,
    grads: &B::Gradients,
) -> Option<KeyedGradients> {
    let copy = slot.copy(name)?;
    let key = |part: &str| match copy.role {
        NormCopyRole::Tuned(key) => format!("{key}.{part}"),
        NormCopyRole::Saved => part.to_string(),
    };
    let grad = |p: &Param<Tensor<B, 1>>| p.grad(grads).map(HostTensor::from_tensor);
    let mut out = vec![(key("weight"), grad(&copy.weight))];
    if let Some(b) = &copy.bias {
        out.push((key("bias"), grad(b)));
    }
    Some(out)
}

/// The training loss of fixture `arch/case` (`default` active, `other`
/// loaded) equals PEFT's `train_loss`, and the gradient of every tensor
/// `linear` gives for `default`'s entries (none: a method without linear
/// entries, LN tuning), and of `default`'s copies of norm layers and
/// embedding tables (full, or retrained tokens), equals
/// PEFT's `grad.base_model.model.<path>.<suffix>`; the base and every
/// tensor of the inactive `other` get none, and every PEFT gradient is
/// compared.
pub fn check_gradients<B, M, K>(
    arch: &str,
    case: &str,
    model: M,
    loss_fn: impl Fn(&M, Tensor<B, 2, Int>) -> Tensor<B, 1>,
    device: &B::Device,
    linear: Option<LinearGradients<B>>,
) where
    B: AutodiffBackend,
    M: PeftModel<B> + AutodiffModule<B>,
    K: SlotMethod,
{
    let c = FixtureCase::open(arch, case);
    let mut adapted = SlotModel::<B, M, K>::wrap(model);
    adapted.load_adapter(&c.dir, "default").unwrap();
    adapted.load_adapter(&c.dir.join("other"), "other").unwrap();
    adapted.set_adapter(&["default"]).unwrap();
    let loss = loss_fn(&adapted.model, c.ints::<B, 2>("input_ids", device));
    let got = loss.clone().into_scalar().elem::<f32>();
    let tol = Tolerance::new(1e-5, 0.0);
    compare::check_close_slices("loss", &[got], &c.want("train_loss").data, tol).unwrap();
    let grads = loss.backward();
    // BERT's last-layer query gradients are f32 noise in PyTorch (its
    // softmax saturates): the case's tolerance floors them.
    let tol = c.gradient_tolerance();
    let mut checked = 0;
    let mut check = |path: &str, of: &dyn Fn(&str) -> Option<KeyedGradients>| {
        for (key, grad) in of("other").unwrap_or_default() {
            assert!(grad.is_none(), "{path}.{key}: inactive `other` trained");
        }
        for (key, grad) in of("default").unwrap_or_default() {
            let got = grad.unwrap_or_else(|| panic!("{path}.{key}: no gradient"));
            let want = c.want(&format!("grad.base_model.model.{path}.{key}"));
            compare::assert_close(&format!("{path}.{key}"), &got, want, tol);
            checked += 1;
        }
    };
    adapted.model.visit_linears(&mut |path, slot| {
        assert!(slot.base.weight.grad(&grads).is_none(), "{path}: base");
        if let Some(entry_gradients) = linear {
            check(path, &|name| {
                let named = entry_gradients(slot, name, &grads)?;
                Some(named.into_iter().map(|(k, g)| (k.to_string(), g)).collect())
            });
        }
    });
    adapted.model.visit_norms(&mut |path, slot| {
        assert!(slot.weight.grad(&grads).is_none(), "{path}: base norm");
        check(path, &|name| norm_copy_gradients(slot, name, &grads));
    });
    adapted.model.visit_embeddings(&mut |path, slot| {
        assert!(slot.weight.grad(&grads).is_none(), "{path}: base table");
        check(path, &|name| embedding_copy_gradients(slot, name, &grads));
    });
    let expected = c.expected.keys().filter(|k| k.starts_with("grad.")).count();
    assert!(expected > 0, "the fixture has gradients");
    assert_eq!(checked, expected, "every PEFT gradient was compared");
}
