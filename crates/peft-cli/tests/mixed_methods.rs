//! LoRA and (IA)³ adapters in one model (`SlotModel<B, M, (Lora, Ia3)>`), on
//! the tiny GPT-2 of the fixtures with PEFT's own LoRA and (IA)³ adapters
//! (`fixtures/gpt2/lora`, `fixtures/gpt2/ia3`; both adapt layer 1's `c_attn`
//! and `mlp.c_proj`, (IA)³ on the input side there).
//!
//! Each adapter alone must give what its own single-method wrapper gives
//! (those are checked against PEFT in the method crates). Both active must
//! give the (IA)³-scaled base plus the LoRA delta: the reference is the
//! (IA)³ adapter merged into the base weights (`merge_and_unload`) with the
//! LoRA adapter on top.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_adapter::{Ia3, Ia3Model};
use peft_core::compare::{assert_close, Tolerance};
use peft_core::io::HostTensor;
use peft_core::slot_method::OneOf;
use peft_core::{backend_tests, Ia3Config, LoraConfig, PeftError, PeftModel, SlotModel};
use peft_lora::{Lora, LoraModel};
use peft_models::fixtures::{max_diff, temp_dir, tiny_gpt2, FixtureCase};
use peft_models::gpt2::Gpt2;

type Mixed<B> = SlotModel<B, Gpt2<B>, (Lora, Ia3)>;

/// Two computations of the same function through different code paths.
const SAME: Tolerance = Tolerance::new(1e-5, 1e-6);

fn logits<B: Backend>(m: &Gpt2<B>, ids: &Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.forward(ids.clone(), None))
}

/// The rows `rows` of logits `[b, t, v]`.
fn rows(t: &HostTensor, rows: std::ops::Range<usize>) -> HostTensor {
    let per_row: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = rows.len();
    HostTensor {
        shape,
        data: t.data[rows.start * per_row..rows.end * per_row].to_vec(),
    }
}

fn lora_and_ia3_adapters_mix_in_one_model<B: Backend>(d: &B::Device) {
    let lora_dir = FixtureCase::open("gpt2", "lora").dir;
    let ia3_case = FixtureCase::open("gpt2", "ia3");
    let ia3_dir = ia3_case.dir.clone();
    let ids = ia3_case.ints::<B, 2>("input_ids", d);
    let base = tiny_gpt2::<B>(d);
    let run = |m: &Gpt2<B>| logits(m, &ids);
    let base_logits = run(&base);

    let lora_alone = run(&LoraModel::from_pretrained(base.clone(), &lora_dir)
        .unwrap()
        .model);
    let ia3_alone = run(&Ia3Model::from_pretrained(base.clone(), &ia3_dir)
        .unwrap()
        .model);
    let ia3_merged = Ia3Model::from_pretrained(base.clone(), &ia3_dir)
        .unwrap()
        .merge_and_unload()
        .unwrap();
    let both_reference = run(&LoraModel::from_pretrained(ia3_merged, &lora_dir)
        .unwrap()
        .model);
    // The reference is not a no-op: each adapter moves the logits by far
    // more than the tolerance the checks below allow (the (IA)³ adapter by
    // 2.6e-4, about 90 times it).
    let bound = SAME.bound(&both_reference.data);
    for (what, other) in [("LoRA", &lora_alone), ("(IA)³", &ia3_alone)] {
        let moved = max_diff(&both_reference, other);
        assert!(
            moved > 20.0 * bound,
            "both active vs {what} alone: {moved:e}"
        );
    }

    let mut mixed = Mixed::<B>::wrap(base.clone());
    mixed.load_adapter(&lora_dir, "default").unwrap();
    mixed.load_adapter(&ia3_dir, "ia3").unwrap();
    assert_eq!(mixed.adapter_names(), ["default", "ia3"]);
    assert!(matches!(mixed.config("default"), Ok(OneOf::First(_))));
    assert!(matches!(mixed.config("ia3"), Ok(OneOf::Second(_))));

    mixed.set_adapter(&["default"]).unwrap();
    assert_close("LoRA alone", &run(&mixed.model), &lora_alone, SAME);
    let lora_params = mixed.param_count().trainable;
    mixed.set_adapter(&["ia3"]).unwrap();
    assert_close("(IA)³ alone", &run(&mixed.model), &ia3_alone, SAME);
    let ia3_params = mixed.param_count().trainable;

    for order in [["default", "ia3"], ["ia3", "default"]] {
        mixed.set_adapter(&order).unwrap();
        assert_close(
            &format!("both active {order:?}"),
            &run(&mixed.model),
            &both_reference,
            SAME,
        );
    }
    // Both kinds train when both are active.
    assert!(lora_params > 0 && ia3_params > 0);
    assert_eq!(mixed.param_count().trainable, lora_params + ia3_params);

    // Merged, the base computation on the merged weights gives the same.
    mixed.merge_adapter().unwrap();
    assert_close("both merged", &run(&mixed.model), &both_reference, SAME);
    mixed.unmerge_adapter();
    assert_close("unmerged", &run(&mixed.model), &both_reference, SAME);

    // One adapter of either kind per row.
    let names = ["default", "ia3", "__base__"];
    assert_eq!(ids.dims()[0], names.len(), "the fixture's batch");
    let routed = mixed.forward_mixed(&names, names.len(), run).unwrap();
    for (i, want) in [&lora_alone, &ia3_alone, &base_logits].iter().enumerate() {
        assert_close(
            &format!("mixed batch row {i} ({})", names[i]),
            &rows(&routed, i..i + 1),
            &rows(want, i..i + 1),
            SAME,
        );
    }

    // Saved: each adapter in its own method's layout, byte for byte what
    // its single-method wrapper writes, and loaded back as it was.
    let out = temp_dir("mixed-methods");
    mixed.save_pretrained(&out).unwrap();
    let single = temp_dir("mixed-methods-single");
    LoraModel::from_pretrained(base.clone(), &lora_dir)
        .unwrap()
        .save_adapter("default", &single.join("lora"))
        .unwrap();
    Ia3Model::from_pretrained(base.clone(), &ia3_dir)
        .unwrap()
        .save_adapter("default", &single.join("ia3"))
        .unwrap();
    for (saved, alone) in [
        (out.clone(), single.join("lora")),
        (out.join("ia3"), single.join("ia3")),
    ] {
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let read = |dir: &Path| std::fs::read(dir.join(file)).unwrap();
            assert!(read(&saved) == read(&alone), "{}: {file}", saved.display());
        }
    }
    let mut reloaded = Mixed::<B>::from_pretrained(base.clone(), &out).unwrap();
    assert_eq!(reloaded.active_adapters(), ["default"]);
    reloaded.set_adapter(&["default", "ia3"]).unwrap();
    assert_close("reloaded", &run(&reloaded.model), &both_reference, SAME);

    // Deleting one kind leaves the other; unloading leaves the base.
    reloaded.delete_adapter("ia3").unwrap();
    assert_close("(IA)³ deleted", &run(&reloaded.model), &lora_alone, SAME);
    assert_close("unloaded", &run(&reloaded.unload()), &base_logits, SAME);
    for dir in [out, single] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

fn configs_of_either_method_attach_fresh<B: Backend>(d: &B::Device) {
    let base = tiny_gpt2::<B>(d);
    let mut mixed = Mixed::<B>::wrap(base);
    let lora: LoraConfig = serde_json::from_str(
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
            "init_lora_weights": false}"#,
    )
    .unwrap();
    let ia3: Ia3Config = serde_json::from_str(
        r#"{"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj"],
            "feedforward_modules": ["mlp.c_proj"], "init_ia3_weights": false}"#,
    )
    .unwrap();
    mixed.add_adapter("l", OneOf::First(lora)).unwrap();
    mixed.add_adapter("v", OneOf::Second(ia3.clone())).unwrap();
    assert_eq!(mixed.active_adapters(), ["v"]);
    let mut lora_entries = 0;
    let mut ia3_entries = 0;
    mixed.model.visit_linears(&mut |_, slot| {
        lora_entries += slot.entries_of::<peft_core::LoraEntry<_>>().count();
        ia3_entries += slot.entries_of::<peft_core::Ia3Entry<_>>().count();
        assert!(slot
            .entries_of::<peft_core::LoraEntry<_>>()
            .all(|e| e.meta.name == "l"));
        assert!(slot
            .entries_of::<peft_core::Ia3Entry<_>>()
            .all(|e| e.meta.name == "v"));
    });
    assert_eq!((lora_entries, ia3_entries), (2, 4));
    // A name is one adapter, whatever its kind.
    let again = mixed.add_adapter("l", OneOf::Second(ia3));
    assert!(
        matches!(again, Err(PeftError::DuplicateAdapter(_))),
        "{again:?}"
    );
    // A folder of a third method is refused, naming its type.
    let prefix = FixtureCase::open("gpt2", "prefix").dir;
    let err = mixed.load_adapter(&prefix, "p").unwrap_err().to_string();
    assert!(err.contains("PREFIX_TUNING"), "{err}");
    assert_eq!(mixed.adapter_names(), ["l", "v"]);
}

backend_tests!(
    lora_and_ia3_adapters_mix_in_one_model,
    configs_of_either_method_attach_fresh
);
