//! The parity check every slot method's fixtures go through: a case made by
//! a `scripts/make_*_fixtures.py` (PEFT's `save_pretrained` of `default` and
//! `other/`, and `expected.safetensors` with the logits of every state) is
//! held to PEFT in every state a [`SlotModel`] has, for any [`SlotMethod`].

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{PeftModel, SlotMethod, SlotModel};

use crate::fixtures::{assert_close, max_diff, temp_dir, FixtureCase};

/// Checks fixture `case` of `arch` against `base_model` adapted by method
/// `K`: the base logits, `default` and `other` alone and both active, a
/// mixed batch, disabled, merged (and that disabling or mixing is then
/// refused), unmerged again with the base weights restored, the saved
/// tensors equal to PEFT's file and loading back, the parameter counts, and
/// `merge_and_unload`; every logit within 1e-5 of PEFT's.
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
    adapted.set_adapter(&["default", "other"]).unwrap();
    assert_eq!(adapted.active_adapters(), ["default", "other"]);
    assert_close("both active", &run(&adapted.model), c.want("logits_both"));
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
