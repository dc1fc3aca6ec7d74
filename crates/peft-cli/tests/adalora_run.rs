//! `peft train --method adalora` on the real MiniLM: the run's step count
//! becomes `total_step`, the rank allocator prunes triplets to the target
//! budget (the saved `rank_pattern` keeps `target_r` per layer on average,
//! every layer's tensors shrunk to it, as PEFT saves), the loss carries the
//! orthogonal regularisation, `peft eval` of
//! `best/` reproduces the run's own evaluation, and a resumed run or a
//! schedule that does not fit the run is refused by name.

use std::path::Path;

use peft_cli::jobs::{self, Task};
use peft_cli::tasks::Method;
use peft_cli::train::TrainConfig;
use peft_core::backends::CpuTrainBackend;
use peft_core::io::read_safetensors;
use peft_lora::AdaLoraConfig;
use peft_models::assets;

mod common;

use common::{held_out_file, job, sentiment_file, serial, temp};

type Inference = burn::backend::NdArray;

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

/// AdaLoRA from `init_r` 6 to `target_r` 2 on query and value, its
/// `total_step` left to the run.
fn adalora(tinit: usize, tfinal: usize) -> Method {
    adalora_weighted(tinit, tfinal, 0.5)
}

fn adalora_weighted(tinit: usize, tfinal: usize, orth_reg_weight: f64) -> Method {
    let config = AdaLoraConfig {
        total_step: None,
        tinit,
        tfinal,
        orth_reg_weight,
        ..AdaLoraConfig::new(6, 2, 1, &["query", "value"])
    };
    Method::slot(config)
}

/// The last training loss `metrics.jsonl` logged in run folder `out`.
fn last_loss(out: &Path) -> f64 {
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .next_back()
        .expect("a logged loss")
}

#[test]
fn an_adalora_run_prunes_to_its_budget_and_saves_as_peft() {
    let _turn = serial();
    let dir = temp("adalora");
    // 48 training sentences in batches of 8: 6 steps an epoch, two epochs
    // capped at 8 steps.
    let data = sentiment_file(&dir, 64);
    let minilm = assets::fetch("minilm").unwrap();
    let train = TrainConfig {
        batch: 8,
        epochs: 2,
        max_steps: Some(8),
        lr: 1e-2,
        ..Default::default()
    };
    let out = dir.join("run");
    let report = jobs::train::<CpuTrainBackend>(
        &job(
            minilm.clone(),
            data.clone(),
            out.clone(),
            adalora(1, 2),
            train.clone(),
        ),
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(report.steps, 8);
    // last/ holds the end of the run; best/ may be the first epoch's.
    let (best, last) = (out.join("best"), out.join("last"));
    let c = config(&last);
    assert_eq!(c["peft_type"], "ADALORA");
    assert_eq!(c["total_step"], 8, "the run's steps");
    // The final pattern (from step index total_step − tfinal = 6 on) keeps the
    // target budget: 2 per layer over 12 layers.
    let pattern = c["rank_pattern"].as_object().expect("a rank pattern");
    assert_eq!(pattern.len(), 12, "{pattern:?}");
    let kept: Vec<usize> = pattern
        .values()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .filter(|k| k.as_bool().unwrap())
                .count()
        })
        .collect();
    assert_eq!(kept.iter().sum::<usize>(), 2 * 12, "{kept:?}");
    assert!(
        kept.iter().any(|&k| k != 2),
        "the budget moved between layers: {kept:?}"
    );
    // Each layer saved at the rank its pattern keeps, as PEFT saves it.
    let t = read_safetensors(&last.join("adapter_model.safetensors")).unwrap();
    for (key, keep) in pattern {
        let rank = keep
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k.as_bool().unwrap())
            .count();
        let layer = key.strip_suffix(".lora_E").unwrap();
        let a = &t[&format!("base_model.model.{layer}.lora_A")];
        let e = &t[&format!("base_model.model.{layer}.lora_E")];
        let b = &t[&format!("base_model.model.{layer}.lora_B")];
        assert_eq!(
            (a.shape.as_slice(), e.shape.as_slice(), b.shape.as_slice()),
            (
                [rank, 384].as_slice(),
                [rank, 1].as_slice(),
                [384, rank].as_slice()
            ),
            "{layer}"
        );
    }
    // `peft eval` of best/ is the run's own evaluation of it.
    let held = held_out_file(&dir, &data, train.seed);
    let m = jobs::eval::<Inference>(
        &minilm,
        Some(&best),
        &held,
        Task::SeqCls,
        ("text", "label"),
        32,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(m.value, report.after.value);

    // The loss carries PEFT's orthogonal regularisation: the same run with
    // orth_reg_weight 0 logs a lower loss (0.5 × the mean ‖A·Aᵀ − I‖, ≈ 1.0
    // for the initial factors, ≈ 0.44 over these 8 steps as they grow;
    // without the term the two runs are identical).
    let plain = dir.join("plain");
    jobs::train::<CpuTrainBackend>(
        &job(
            minilm.clone(),
            data.clone(),
            plain.clone(),
            adalora_weighted(1, 2, 0.0),
            train.clone(),
        ),
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap();
    let (with, without) = (last_loss(&out), last_loss(&plain));
    assert!(
        with - without > 0.25,
        "regularised {with} vs plain {without}"
    );

    // A schedule with no budgeting phase in this run, and a resumed run,
    // are refused by name.
    let short = TrainConfig {
        max_steps: Some(3),
        ..train.clone()
    };
    let err = jobs::train::<CpuTrainBackend>(
        &job(
            minilm.clone(),
            data.clone(),
            dir.join("short"),
            adalora(1, 2),
            short,
        ),
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("budgeting phase"), "{err}");
    let mut resumed = job(minilm, data, out, adalora(1, 2), train);
    resumed.resume = true;
    let err = jobs::train::<CpuTrainBackend>(
        &resumed,
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
