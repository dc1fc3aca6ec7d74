//! The main job's recipe, timed as a user runs it: `peft train` on
//! all-MiniLM-L6-v2, LoRA r 8 on query/value, 3,000 Rotten Tomatoes
//! sentences, one epoch of batches of 32 (padded to each batch's longest),
//! AdamW at lr 2e-3 with the CLI's defaults; then `peft eval` of the saved
//! adapter on the file's last 1,000 sentences (a timing: some may be
//! training sentences). `benches/peft_reference.py --suite epoch`
//! runs the same recipe in PEFT + PyTorch. (`--quick`: 320 and 100.)

use std::path::Path;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use peft_cli::jobs::{self, Task, TrainJob};
use peft_cli::tasks::Method;
use peft_cli::train::TrainConfig;
use peft_core::LoraConfig;
use peft_models::assets;
use serde_json::json;

use crate::{emit, Opts};

/// The last `elapsed_s` the run logged: the training loop's time, without
/// the evaluations before and after it.
fn epoch_seconds(run: &Path) -> f64 {
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).expect("the run's metrics");
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["elapsed_s"].as_f64())
        .expect("a logged step")
}

/// One epoch of the main job's recipe and one evaluation, on backend `B`.
pub fn epoch_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let (train_n, eval_n) = if o.quick { (320, 100) } else { (3000, 1000) };
    let model = assets::fetch("minilm").expect("the MiniLM asset");
    let data = assets::fetch("rotten-tomatoes")
        .expect("the Rotten Tomatoes asset")
        .join("rotten_tomatoes.jsonl");
    let dir = std::env::temp_dir().join(format!("peft-bench-epoch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let job = TrainJob {
        model: model.clone(),
        data: data.clone(),
        task: Task::SeqCls,
        method: Method::slot(LoraConfig::new(8, 16.0, &["query", "value"])),
        out: dir.join("run"),
        train: TrainConfig {
            lr: 2e-3,
            batch: 32,
            ..Default::default()
        },
        text_column: "text".into(),
        label_column: "label".into(),
        problem_type: None,
        held_out: 0.1,
        max_train: Some(train_n),
        block_size: 128,
        resume: false,
        quantize: None,
    };
    let report = jobs::train::<Autodiff<B>>(&job, &indicatif::ProgressBar::hidden(), device)
        .expect("the main job's recipe trains");
    let mut epoch = vec![epoch_seconds(&job.out)];
    emit(
        o,
        "epoch",
        "train_epoch_lora_r8_q_v",
        &mut epoch,
        None,
        json!({"sentences": train_n, "batch": 32, "held_out_accuracy": report.after.value}),
    );
    let text = std::fs::read_to_string(&data).expect("the dataset");
    let held: Vec<&str> = text.lines().rev().take(eval_n).collect();
    let eval_file = dir.join("eval.jsonl");
    std::fs::write(&eval_file, held.join("\n")).expect("the evaluation file");
    let start = std::time::Instant::now();
    let metric = jobs::eval::<B>(
        &model,
        Some(&report.best),
        &eval_file,
        Task::SeqCls,
        ("text", "label"),
        128,
        device,
    )
    .expect("the adapter evaluates");
    let mut eval = vec![start.elapsed().as_secs_f64()];
    let per_s = eval_n as f64 / eval[0];
    emit(
        o,
        "epoch",
        "eval_sentences",
        &mut eval,
        None,
        json!({"sentences": eval_n, "sentences_per_s": per_s, "accuracy": metric.value}),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
