//! Parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_fixtures.py`: tiny random Llama, GPT-2 and BERT models with
//! adapters trained a few steps in PyTorch. Every logit must match within
//! 1e-5, on every backend.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{backend_tests, PeftModel};
use peft_lora::{AddWeightedAdapter, Combination, LoraModel, WeightedOptions};
use peft_models::bert::Bert;
use peft_models::fixtures::{assert_close, fixtures_dir, max_diff, FixtureCase, TOL};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;

type Forward<B, M> = fn(&M, Tensor<B, 2, Int>) -> HostTensor;

fn check_case<B: Backend, M: PeftModel<B> + Clone>(
    arch: &str,
    case: &str,
    load: fn(&Path, &B::Device) -> M,
    forward: Forward<B, M>,
    device: &B::Device,
) {
    let c = FixtureCase::open(arch, case);
    let ids = c.ints::<B, 2>("input_ids", device);
    let base_model = load(&fixtures_dir().join(arch), device);
    let base = forward(&base_model, ids.clone());
    assert_close("base", &base, c.want("logits_base"));

    let mut lora = LoraModel::from_pretrained(base_model.clone(), &c.dir).unwrap();
    assert_eq!(lora.adapter_names(), vec!["default", "other"]);
    assert_close(
        "unmerged",
        &forward(&lora.model, ids.clone()),
        c.want("logits_unmerged"),
    );

    lora.set_adapter(&["other"]).unwrap();
    assert_close(
        "other",
        &forward(&lora.model, ids.clone()),
        c.want("logits_other"),
    );
    lora.set_adapter(&["default"]).unwrap();

    let names: Vec<String> = c.meta["mixed_adapter_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let batch = ids.dims()[0];
    let mixed = lora
        .forward_mixed(&refs, batch, |m| forward(m, ids.clone()))
        .unwrap();
    assert_close("mixed batch", &mixed, c.want("logits_mixed"));
    assert!(
        lora.forward_mixed(&refs[..1], batch, |_| ()).is_err(),
        "row count is checked"
    );
    assert!(lora
        .forward_mixed(&["nope", "default", "other"], batch, |_| ())
        .is_err());

    lora.disable_adapters().unwrap();
    assert_close(
        "disabled",
        &forward(&lora.model, ids.clone()),
        c.want("logits_disabled"),
    );
    lora.enable_adapters();

    // The script writes weighted combinations for every case but DoRA and
    // rank patterns (PEFT refuses those); tensors and metadata must agree.
    let weighted = c.expected.keys().any(|k| k.starts_with("logits_weighted_"));
    assert_eq!(
        weighted,
        c.meta.get("weighted").is_some(),
        "weighted logits vs the `weighted` entry of expected.json"
    );
    if weighted {
        let opts = WeightedOptions {
            density: Some(c.meta["weighted"]["ties_density"].as_f64().unwrap()),
            ..Default::default()
        };
        for (name, kind) in [
            ("linear", Combination::Linear),
            ("cat", Combination::Cat),
            ("svd", Combination::Svd),
            ("ties", Combination::Ties),
        ] {
            let new = format!("w_{name}");
            lora.add_weighted_adapter(&["default", "other"], &[0.7, 0.4], &new, kind, &opts)
                .unwrap();
            lora.set_adapter(&[&new]).unwrap();
            let got = forward(&lora.model, ids.clone());
            assert_close(
                &format!("weighted {name}"),
                &got,
                c.want(&format!("logits_weighted_{name}")),
            );
            lora.delete_adapter(&new).unwrap();
        }
        check_pruning_combinations(&mut lora, &c, ids.clone(), forward);
        lora.set_adapter(&["default"]).unwrap();
    }

    let weights_before: Vec<HostTensor> = {
        let mut v = Vec::new();
        lora.model
            .visit_linears(&mut |_, s| v.push(HostTensor::from_tensor(s.base_weight())));
        v
    };
    lora.merge_adapter().unwrap();
    assert_close(
        "merged",
        &forward(&lora.model, ids.clone()),
        c.want("logits_merged"),
    );
    assert!(
        lora.disable_adapters().is_err(),
        "disable while merged is refused"
    );
    assert!(
        lora.forward_mixed(&refs, batch, |_| ()).is_err(),
        "mixed batch while merged is refused"
    );
    lora.unmerge_adapter();
    assert_close(
        "unmerged again",
        &forward(&lora.model, ids.clone()),
        c.want("logits_unmerged_again"),
    );
    let mut i = 0;
    lora.model.visit_linears(&mut |p, s| {
        let d = max_diff(
            &HostTensor::from_tensor(s.base_weight()),
            &weights_before[i],
        );
        // Unmerge is arithmetic, as in PEFT: W' − ΔW (DoRA: W'/g − ΔW) equals W
        // up to f32 rounding, not bit for bit.
        assert!(d <= 5e-6, "{p}: merge/unmerge round trip off by {d:e}");
        i += 1;
    });

    // Rust-saved adapters load back to identical outputs and identical tensors.
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = std::env::temp_dir().join(format!(
        "peft-parity-{arch}-{case}-{}-{run}",
        std::process::id()
    ));
    lora.save_pretrained(&out).unwrap();
    for (sub, name) in [("", "default"), ("other", "other")] {
        let theirs = read_safetensors(&c.dir.join(sub).join("adapter_model.safetensors")).unwrap();
        let ours = read_safetensors(&out.join(sub).join("adapter_model.safetensors")).unwrap();
        let mut a: Vec<_> = theirs.keys().collect();
        let mut b: Vec<_> = ours.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: saved keys differ from PEFT's");
        for k in a {
            assert_eq!(
                theirs[k], ours[k],
                "{name}: tensor {k} changed in a save/load round trip"
            );
        }
    }
    let original = LoraModel::from_pretrained(base_model.clone(), &c.dir).unwrap();
    let reloaded = LoraModel::from_pretrained(base_model, &out).unwrap();
    assert_eq!(
        forward(&reloaded.model, ids.clone()).data,
        forward(&original.model, ids).data,
        "reloaded adapter differs"
    );
    std::fs::remove_dir_all(&out).unwrap();

    lora.delete_adapter("other").unwrap();
    let count = lora.param_count();
    assert_eq!(
        count.trainable as u64,
        c.meta["trainable_params"].as_u64().unwrap(),
        "{count}"
    );
    assert_eq!(
        count.all as u64,
        c.meta["all_params"].as_u64().unwrap(),
        "{count}"
    );
}

/// PEFT's pruning combinations (`scripts/make_weighted_fixtures.py`,
/// `weighted.safetensors` beside the case): magnitude pruning and TIES with
/// SVD as they are, DARE with the masks PyTorch drew replayed through
/// `dare_masks`. Without the masks DARE must differ (different draws), and a
/// wrong count of masks is refused.
fn check_pruning_combinations<B: Backend, M: PeftModel<B> + Clone>(
    lora: &mut LoraModel<B, M>,
    c: &FixtureCase,
    ids: Tensor<B, 2, Int>,
    forward: Forward<B, M>,
) {
    let path = c.dir.join("weighted.safetensors");
    let want = read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("weighted.json")).unwrap())
            .unwrap();
    let weights: Vec<f64> = serde_json::from_value(meta["weights"].clone()).unwrap();
    let combinations: Vec<String> = serde_json::from_value(meta["combinations"].clone()).unwrap();
    assert_eq!(combinations.len(), 7, "{}", c.dir.display());
    for name in &combinations {
        let kind = Combination::parse(name).unwrap();
        let mut masks: Vec<(&String, &HostTensor)> = want
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("mask.{name}.")))
            .collect();
        masks.sort_by_key(|(k, _)| *k);
        let masks: Vec<HostTensor> = masks.into_iter().map(|(_, m)| m.clone()).collect();
        assert_eq!(
            masks.len() as u64,
            meta["masks"][name].as_u64().unwrap_or(0),
            "{name}: masks in weighted.safetensors vs weighted.json"
        );
        assert_eq!(name.starts_with("dare"), !masks.is_empty(), "{name}");
        let opts = WeightedOptions {
            density: meta["density"].as_f64(),
            dare_masks: (!masks.is_empty()).then(|| masks.clone()),
            ..Default::default()
        };
        let expected = &want[&format!("logits_{name}")];
        let run = |lora: &mut LoraModel<B, M>, opts: &WeightedOptions| {
            lora.add_weighted_adapter(&["default", "other"], &weights, "w", kind, opts)?;
            lora.set_adapter(&["w"]).unwrap();
            let got = forward(&lora.model, ids.clone());
            lora.set_adapter(&["default"]).unwrap();
            lora.delete_adapter("w").unwrap();
            Ok::<_, peft_core::PeftError>(got)
        };
        assert_close(
            &format!("weighted {name}"),
            &run(lora, &opts).unwrap(),
            expected,
        );
        if masks.is_empty() {
            continue;
        }
        let drawn = run(
            lora,
            &WeightedOptions {
                dare_masks: None,
                ..opts.clone()
            },
        )
        .unwrap();
        // Ten tolerances away: an implementation that ignored the given
        // masks would fail the comparison above.
        let d = max_diff(&drawn, expected);
        assert!(
            d > 10.0 * TOL,
            "{name}: masks drawn here came within {d:e} of PEFT's logits, so the check above cannot tell a replay"
        );
        for wrong in [
            &masks[1..],
            &[masks.clone(), masks[..1].to_vec()].concat()[..],
        ] {
            let wrong = WeightedOptions {
                dare_masks: Some(wrong.to_vec()),
                ..opts.clone()
            };
            let err = run(lora, &wrong).unwrap_err().to_string();
            assert!(err.contains("dare_masks"), "{name}: {err}");
            assert!(!lora.adapter_names().contains(&"w".to_string()));
        }
    }
}

fn llama<B: Backend>(dir: &Path, device: &B::Device) -> Llama<B> {
    Llama::load(dir, device).unwrap()
}
fn llama_fwd<B: Backend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.forward(ids, None))
}
fn gpt2<B: Backend>(dir: &Path, device: &B::Device) -> Gpt2<B> {
    Gpt2::load(dir, device).unwrap()
}
fn gpt2_fwd<B: Backend>(m: &Gpt2<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.forward(ids, None))
}
fn bert<B: Backend>(dir: &Path, device: &B::Device) -> Bert<B> {
    Bert::load(dir, device).unwrap()
}
fn bert_fwd<B: Backend>(m: &Bert<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.classify(ids, None).unwrap())
}

fn llama_lora<B: Backend>(d: &B::Device) {
    check_case("llama", "lora", llama::<B>, llama_fwd::<B>, d);
}
fn llama_dora_rslora<B: Backend>(d: &B::Device) {
    check_case("llama", "dora_rslora", llama::<B>, llama_fwd::<B>, d);
}
fn llama_regex_layers<B: Backend>(d: &B::Device) {
    check_case("llama", "regex_layers", llama::<B>, llama_fwd::<B>, d);
}
fn gpt2_lora<B: Backend>(d: &B::Device) {
    check_case("gpt2", "lora", gpt2::<B>, gpt2_fwd::<B>, d);
}
fn gpt2_dora<B: Backend>(d: &B::Device) {
    check_case("gpt2", "dora", gpt2::<B>, gpt2_fwd::<B>, d);
}
fn bert_lora<B: Backend>(d: &B::Device) {
    check_case("bert", "lora", bert::<B>, bert_fwd::<B>, d);
}
fn bert_dora<B: Backend>(d: &B::Device) {
    check_case("bert", "dora", bert::<B>, bert_fwd::<B>, d);
}

backend_tests!(
    llama_lora,
    llama_dora_rslora,
    llama_regex_layers,
    gpt2_lora,
    gpt2_dora,
    bert_lora,
    bert_dora
);
