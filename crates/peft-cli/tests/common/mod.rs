//! What the CLI's training tests share: taking turns on the process-wide
//! generator, scratch folders, the Rotten Tomatoes file, a seq-cls job and
//! the held-out split it scores.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use peft_cli::data;
use peft_cli::jobs::{Task, TrainJob};
use peft_cli::tasks::Method;
use peft_cli::train::TrainConfig;
use peft_models::assets;
use peft_models::datasets::rotten_tomatoes;

/// The CPU backends' random generator is process-wide: tests that train
/// (dropout, new weights) take turns, or their draws would interleave.
pub static TRAINING: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    TRAINING.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `n` Rotten Tomatoes sentences (both labels) as JSONL.
pub fn sentiment_file(dir: &Path, n: usize) -> PathBuf {
    let all = rotten_tomatoes(&assets::fetch("rotten-tomatoes").unwrap()).unwrap();
    let (pos, neg): (Vec<_>, Vec<_>) = all.into_iter().partition(|s| s.label == 1);
    let rows: Vec<String> = pos
        .iter()
        .zip(&neg)
        .flat_map(|(p, q)| [p, q])
        .take(n)
        .map(|s| serde_json::json!({"text": s.text, "label": if s.label == 1 { "positive" } else { "negative" }}).to_string())
        .collect();
    let path = dir.join("sentiment.jsonl");
    std::fs::write(&path, rows.join("\n")).unwrap();
    path
}

/// A sequence-classification job of `method` on `data` (a quarter held out).
pub fn job(
    model: PathBuf,
    data: PathBuf,
    out: PathBuf,
    method: Method,
    train: TrainConfig,
) -> TrainJob {
    TrainJob {
        model,
        data,
        task: Task::SeqCls,
        method,
        out,
        train,
        text_column: "text".into(),
        label_column: "label".into(),
        problem_type: None,
        held_out: 0.25,
        max_train: None,
        block_size: 32,
        resume: false,
        quantize: None,
    }
}

/// The held-out split (a quarter) a run with `seed` takes of `data_file`,
/// written as `dir/held.jsonl`: `peft eval` scores it as the run did.
pub fn held_out_file(dir: &Path, data_file: &Path, seed: u64) -> PathBuf {
    let examples = data::read_labelled(data_file, "text", "label").unwrap();
    let (_, held) = data::split(&examples, 0.25, seed);
    let rows: Vec<String> = held
        .iter()
        .map(|e| serde_json::json!({"text": e.text, "label": e.label}).to_string())
        .collect();
    let held_file = dir.join("held.jsonl");
    std::fs::write(&held_file, rows.join("\n")).unwrap();
    held_file
}
