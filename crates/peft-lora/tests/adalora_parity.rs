//! AdaLoRA parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_adalora_fixtures.py` (tiny Llama on q/v/up_proj, GPT-2's
//! fused `c_attn`, BERT on query/value/output.dense; `init_r` 4 → `target_r`
//! 2 over a 7-step schedule):
//!
//! - `adalora`: PEFT's saved adapters (their rank patterns shrink layers,
//!   some to rank 0) load, compute PEFT's logits in every state, save
//!   PEFT's tensors and config back, within 1e-5 on every backend;
//! - `adalora_run`: a whole run from PEFT's fresh adapter — Adam, the loss
//!   with the orthogonal regularisation, the rank allocator after every
//!   step — gives PEFT's loss at each step, PEFT's rank pattern after
//!   each step, and PEFT's factors at the end.

use burn::module::{AutodiffModule, ModuleDisplay};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use peft_core::compare::{self, Tolerance};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::slot::AdaLoraEntry;
use peft_core::{autodiff_backend_tests, backend_tests, PeftError, PeftModel};
use peft_lora::{
    adalora_config, orthogonal_regularization, AdaLora, AdaLoraConfig, AdaLoraModel, RankAllocator,
    RankPattern,
};
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, FixtureCase};
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
fn gpt2_lm<B: Backend>(m: &Gpt2<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.forward(ids, None))
}
fn cls<B: Backend>(m: &Bert<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.classify(ids, None).unwrap())
}

fn llama_adalora<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, AdaLora>("llama", "adalora", llama::<B>(d), lm::<B>, d);
}
fn gpt2_adalora<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, AdaLora>("gpt2", "adalora", gpt2::<B>(d), gpt2_lm::<B>, d);
}
fn bert_adalora<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, AdaLora>("bert", "adalora", bert::<B>(d), cls::<B>, d);
}

/// Errors name what is wrong: PEFT's config checks, a second trainable
/// adapter, a file whose tensors do not fit its rank pattern.
fn errors_are_typed<B: Backend>(d: &B::Device) {
    let origin = std::path::Path::new("adapter_config.json");
    for (json, needle) in [
        (
            r#"{"peft_type": "ADALORA", "total_step": 0}"#,
            "`total_step`",
        ),
        (
            r#"{"peft_type": "ADALORA", "total_step": 10, "use_dora": true}"#,
            "DoRA",
        ),
        (
            r#"{"peft_type": "ADALORA", "total_step": 10, "tinit": 5, "tfinal": 5}"#,
            "budgeting phase",
        ),
        (
            r#"{"peft_type": "ADALORA", "total_step": 10, "target_r": 16}"#,
            "`target_r` (16)",
        ),
        (
            r#"{"peft_type": "ADALORA", "total_step": 10, "beta1": 1.0}"#,
            "`beta1`",
        ),
        (
            r#"{"peft_type": "ADALORA", "total_step": 10, "deltaT": 0}"#,
            "`deltaT`",
        ),
        (
            r#"{"peft_type": "ADALORA", "total_step": 10, "orth_reg_weight": -1}"#,
            "`orth_reg_weight`",
        ),
        (r#"{"peft_type": "LORA"}"#, "not ADALORA"),
    ] {
        let err =
            <AdaLoraConfig as peft_core::method_config::MethodConfig>::from_json_str(json, origin)
                .unwrap_err();
        assert!(err.to_string().contains(needle), "{json}: {err}");
    }
    // Without `total_step` an adapter loads, but does not train.
    let untimed = AdaLoraConfig {
        total_step: None,
        ..AdaLoraConfig::new(4, 2, 10, &["q_proj"])
    };
    let model = AdaLoraModel::new(llama::<B>(d), untimed).unwrap();
    let err = RankAllocator::new(&model, "default").unwrap_err();
    assert!(err.to_string().contains("`total_step`"), "{err}");
    let config = AdaLoraConfig::new(4, 2, 10, &["q_proj"]);
    let mut model = AdaLoraModel::new(llama::<B>(d), config.clone()).unwrap();
    let err = model.add_adapter("second", config).unwrap_err();
    assert!(
        err.to_string().contains("only 1 trainable adapter"),
        "{err}"
    );
    let frozen = AdaLoraConfig {
        inference_mode: true,
        ..AdaLoraConfig::new(4, 2, 10, &["q_proj"])
    };
    model.add_adapter("frozen", frozen).unwrap();

    // A file whose rank pattern keeps more triplets than its tensors hold.
    let c = FixtureCase::open("llama", "adalora");
    let dir = peft_models::fixtures::temp_dir("adalora-bad-pattern");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        c.dir.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(c.dir.join("adapter_config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let key = "model.layers.1.self_attn.q_proj.lora_E";
    json["rank_pattern"][key] = serde_json::json!([true, true, true, true]);
    std::fs::write(dir.join("adapter_config.json"), json.to_string()).unwrap();
    let err = AdaLoraModel::from_pretrained(llama::<B>(d), &dir).unwrap_err();
    assert!(
        matches!(&err, PeftError::Shape { name, .. } if name.contains("layers.1.self_attn.q_proj")),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

backend_tests!(llama_adalora, gpt2_adalora, bert_adalora, errors_are_typed);

/// The factors of adapter `default` in PEFT's layout and names (`run.` +
/// key), at full rank.
fn factors<B: Backend, M: PeftModel<B>>(model: &M) -> Vec<(String, HostTensor)> {
    let mut out = Vec::new();
    model.visit_linears(&mut |path, slot| {
        if let Some(e) = slot.entry::<AdaLoraEntry<B>>("default") {
            let key = format!("run.base_model.model.{path}");
            out.push((format!("{key}.lora_A"), host(e.a.val()).transposed()));
            out.push((format!("{key}.lora_E"), host(e.e.val()).transposed()));
            out.push((format!("{key}.lora_B"), host(e.b.val()).transposed()));
        }
    });
    out
}

/// PEFT's whole run (see the module doc) from the fixture's fresh adapter.
fn check_run<B, M>(
    arch: &str,
    model: M,
    loss_fn: impl Fn(&M, Tensor<B, 2, Int>, Option<Tensor<B, 1, Int>>) -> Tensor<B, 1>,
    d: &B::Device,
) where
    B: AutodiffBackend,
    M: PeftModel<B> + AutodiffModule<B> + ModuleDisplay + Clone,
    M::InnerModule: PeftModel<B::InnerBackend> + ModuleDisplay,
{
    let c = FixtureCase::open(arch, "adalora_run");
    let mut adapted = AdaLoraModel::wrap(model);
    adapted.load_adapter(&c.dir, "default").unwrap();
    adapted.set_adapter(&["default"]).unwrap();
    let lr = c.meta["lr"].as_f64().unwrap();
    let weight = adalora_config(&adapted, "default").unwrap().orth_reg_weight;
    let mut allocator = RankAllocator::new(&adapted, "default").unwrap();
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init();
    let patterns = c.meta["rank_patterns"].as_array().unwrap();
    for (step, want_pattern) in patterns.iter().enumerate() {
        let ids = c.ints::<B, 2>(&format!("steps.input_ids.{step}"), d);
        let labels_key = format!("steps.labels.{step}");
        let labels = c
            .expected
            .contains_key(&labels_key)
            .then(|| c.ints::<B, 1>(&labels_key, d));
        let orth = orthogonal_regularization(&adapted.model, "default").unwrap();
        let loss = loss_fn(&adapted.model, ids, labels) + orth * weight;
        let got = loss.clone().into_scalar().elem::<f32>();
        compare::check_close_slices(
            &format!("{arch} loss at step {step}"),
            &[got],
            &c.want(&format!("steps.loss.{step}")).data,
            Tolerance::new(1e-5, 0.0),
        )
        .unwrap();
        let grads = GradientsParams::from_grads(loss.backward(), &adapted);
        allocator.observe(&adapted.model, &grads);
        adapted = optim.step(lr, adapted, grads);
        allocator.update_and_allocate(&mut adapted, step).unwrap();
        let got = adalora_config(&adapted, "default")
            .unwrap()
            .rank_pattern
            .clone();
        let want: Option<RankPattern> = serde_json::from_value(want_pattern.clone()).unwrap();
        assert_eq!(got, want, "{arch}: rank pattern after step {step}");
    }
    let masked = patterns.last().unwrap().as_object().unwrap();
    assert!(
        masked
            .values()
            .flat_map(|v| v.as_array().unwrap())
            .any(|k| k == false),
        "{arch}: the run pruned nothing"
    );
    // Adam moves each element by about lr per step: a thousandth of that.
    let tol = Tolerance::new(1e-4, 1e-3 * lr as f32);
    let got = factors(&adapted.model);
    let expected = c.expected.keys().filter(|k| k.starts_with("run.")).count();
    assert_eq!(got.len(), expected, "{arch}: every factor compared");
    for (key, tensor) in &got {
        compare::assert_close(&format!("{arch}: {key}"), tensor, c.want(key), tol);
    }
    // Saved as PEFT saves the same run (the `adalora` case's `default`):
    // each layer shrunk to the triplets its pattern keeps.
    let out = peft_models::fixtures::temp_dir(&format!("adalora-run-{arch}"));
    adapted.save_pretrained(&out).unwrap();
    let saved = FixtureCase::open(arch, "adalora").dir;
    let theirs = read_safetensors(&saved.join("adapter_model.safetensors")).unwrap();
    let ours = read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        ours.keys().collect::<std::collections::BTreeSet<_>>(),
        theirs.keys().collect(),
        "{arch}: saved keys"
    );
    for (key, want) in &theirs {
        compare::assert_close(&format!("{arch}: saved {key}"), &ours[key], want, tol);
    }
    let config = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        config(&out)["rank_pattern"],
        config(&saved)["rank_pattern"],
        "{arch}: saved rank pattern"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

fn causal<B: AutodiffBackend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    causal_lm_loss(m.forward(ids.clone(), None), ids)
}
fn gpt2_causal<B: AutodiffBackend>(m: &Gpt2<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    causal_lm_loss(m.forward(ids.clone(), None), ids)
}
fn classify<B: AutodiffBackend>(
    m: &Bert<B>,
    ids: Tensor<B, 2, Int>,
    labels: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    cross_entropy(m.classify(ids, None).unwrap(), labels)
}

fn whole_runs<B: AutodiffBackend>(d: &B::Device) {
    check_run("llama", llama::<B>(d), |m, ids, _| causal(m, ids), d);
    check_run("gpt2", gpt2::<B>(d), |m, ids, _| gpt2_causal(m, ids), d);
    check_run(
        "bert",
        bert::<B>(d),
        |m, ids, labels| classify(m, ids, labels.expect("BERT's steps record labels")),
        d,
    );
}

autodiff_backend_tests!(whole_runs);
