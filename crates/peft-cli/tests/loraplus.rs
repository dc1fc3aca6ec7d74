//! LoRA+ (`peft train --loraplus-lr-ratio`) as PEFT's
//! `create_loraplus_optimizer` trains: on the tiny BERT's DoRA
//! sequence-classification adapter (LoRA's A and B, DoRA's magnitudes, the
//! adapter's copy of the classifier), two AdamW steps with LoRA+'s three
//! parameter groups give PEFT's tensors (`scripts/make_loraplus_fixture.py`),
//! and the same steps at one learning rate do not.

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_cli::train::{loraplus_groups, LoraPlusGroup, Optimizers};
use peft_core::compare::{self, Tolerance};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{autodiff_backend_tests, PeftModel, SlotModel};
use peft_lora::Lora;
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, max_diff, FixtureCase};
use peft_models::loss::cross_entropy;

const LR: f64 = 0.01;

/// The adapter after two AdamW steps (PyTorch's defaults, `eps` 1e-8,
/// weight decay 0.1) with LoRA+ at `ratio` (`None`: one learning rate),
/// its tensors under PEFT's keys.
fn two_steps<B: AutodiffBackend>(ratio: Option<f64>, d: &B::Device) -> Vec<(String, HostTensor)> {
    let c = FixtureCase::open("bert", "seqcls_dora");
    let recorded = read_safetensors(&c.dir.join("loraplus.safetensors")).unwrap();
    let bert = Bert::<B>::load(&fixtures_dir().join("bert"), d).unwrap();
    let mut adapted = SlotModel::<B, Bert<B>, Lora>::wrap(bert);
    adapted.load_adapter(&c.dir, "default").unwrap();
    adapted.set_adapter(&["default"]).unwrap();
    let adamw = AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.1);
    let mut optim = Optimizers::new(&adamw, ratio);
    let ints = |key: &str| -> Vec<i64> { recorded[key].data.iter().map(|&v| v as i64).collect() };
    for i in 0..2 {
        let ids = ints(&format!("input_ids.{i}"));
        let labels = ints(&format!("labels.{i}"));
        let rows = labels.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, 7]), d);
        let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [rows]), d);
        let loss = cross_entropy(adapted.model.classify(ids, None).unwrap(), labels);
        let grads = GradientsParams::from_grads(loss.backward(), &adapted);
        adapted = optim.step(LR, adapted, grads);
    }
    adapted.adapter_tensors("default").unwrap()
}

fn loraplus_steps_are_pefts<B: AutodiffBackend>(d: &B::Device) {
    let c = FixtureCase::open("bert", "seqcls_dora");
    let recorded = read_safetensors(&c.dir.join("loraplus.safetensors")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("loraplus.json")).unwrap())
            .unwrap();
    let ratio = meta["loraplus_lr_ratio"].as_f64().unwrap();
    let got = two_steps::<B>(Some(ratio), d);
    let want = |key: &str| &recorded[&format!("after.{key}")];
    // Adam moves an element by about its learning rate per step: the
    // tolerance is a thousandth of the base one.
    let tol = Tolerance::new(1e-4, 1e-3 * LR as f32);
    for (key, t) in &got {
        compare::assert_close(&format!("LoRA+ after two steps: {key}"), t, want(key), tol);
    }
    assert_eq!(
        got.len(),
        meta["groups"].as_object().unwrap().len(),
        "every trained tensor compared"
    );

    // At one learning rate the B group lands elsewhere: the check above
    // tells the groups apart.
    let plain = two_steps::<B>(None, d);
    let off: Vec<&String> = plain
        .iter()
        .filter(|(key, t)| max_diff(t, want(key)) > 10.0 * 1e-3 * LR as f32)
        .map(|(key, _)| key)
        .collect();
    assert!(
        off.iter().any(|k| k.ends_with("lora_B.weight"))
            && off.iter().any(|k| k.ends_with("lora_magnitude_vector"))
            && off.iter().any(|k| k.ends_with("classifier.bias")),
        "plain AdamW matches LoRA+ on {:?}",
        plain
            .iter()
            .map(|p| &p.0)
            .filter(|k| !off.contains(k))
            .collect::<Vec<_>>()
    );
}

/// Each trainable parameter's group is PEFT's (`loraplus.json` records
/// them), counted by kind: A, B (with decay) and B without decay.
fn groups_are_pefts<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("bert", "seqcls_dora");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("loraplus.json")).unwrap())
            .unwrap();
    let ratio = meta["loraplus_lr_ratio"].as_f64().unwrap();
    let mut want = [0usize; 3];
    for g in meta["groups"].as_object().unwrap().values() {
        let at = match (
            g["lr"].as_f64().unwrap() > LR * 1.5,
            g["weight_decay"].as_f64().unwrap() > 0.0,
        ) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        };
        want[at] += 1;
    }
    let bert = Bert::<B>::load(&fixtures_dir().join("bert"), d).unwrap();
    let mut adapted = SlotModel::<B, Bert<B>, Lora>::wrap(bert);
    adapted.load_adapter(&c.dir, "default").unwrap();
    let trainable: std::collections::HashSet<_> = {
        let mut ids = std::collections::HashSet::new();
        adapted.model.visit_linears(&mut |_, slot| {
            for e in &slot.entries {
                let mut v = IdsOf(Vec::new());
                burn::module::Module::visit(e, &mut v);
                ids.extend(v.0);
            }
        });
        ids
    };
    let mut got = [0usize; 3];
    for (id, group) in loraplus_groups(&adapted) {
        if trainable.contains(&id) {
            got[match group {
                LoraPlusGroup::A => 0,
                LoraPlusGroup::B => 1,
                LoraPlusGroup::BNoDecay => 2,
            }] += 1;
        }
    }
    assert_eq!(got, want, "(A, B, B without decay) counts; ratio {ratio}");
}

struct IdsOf(Vec<burn::module::ParamId>);
impl<B: Backend> burn::module::ModuleVisitor<B> for IdsOf {
    fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
        self.0.push(p.id);
    }
}

autodiff_backend_tests!(loraplus_steps_are_pefts, groups_are_pefts);
