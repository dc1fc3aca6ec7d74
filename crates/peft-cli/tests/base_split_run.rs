//! `peft train --method pissa` / `olora` on the real MiniLM: `best/` is the
//! plain LoRA of the original weights (rank doubled, PEFT's
//! `path_initial_model_for_weight_conversion` layout) and gives the logits
//! of the adapter as it trained, which `last/` keeps in PEFT's own layout
//! (loading it splits the base again); a run resumed from `last/` ends
//! where an uninterrupted one does.

use std::path::{Path, PathBuf};

use peft_cli::jobs::{self, TrainJob};
use peft_cli::tasks::Method;
use peft_cli::train::TrainConfig;
use peft_core::backends::CpuTrainBackend;
use peft_core::compare::{check_close_slices, max_abs_diff, Tolerance};
use peft_core::config::InitLoraWeights;
use peft_core::io::read_safetensors;
use peft_core::LoraConfig;
use peft_models::assets;

mod common;

use common::{job, sentiment_file, serial, temp};

type Inference = burn::backend::NdArray;

/// A PiSSA / OLoRA job (LoRA r 4, alpha 8, on query and value).
fn split_job(data: PathBuf, out: PathBuf, init: &str, train: TrainConfig) -> TrainJob {
    let mut lora = LoraConfig::new(4, 8.0, &["query", "value"]);
    lora.init_lora_weights = InitLoraWeights::Named(init.into());
    job(
        assets::fetch("minilm").unwrap(),
        data,
        out,
        Method::slot(lora),
        train,
    )
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

/// `peft forward`'s logits for a few sentences' ids with adapter `dir`.
fn logits(dir: &Path, scratch: &Path) -> Vec<f32> {
    let ids = scratch.join("ids.json");
    std::fs::write(
        &ids,
        "[[101, 2023, 3185, 2003, 6429, 102], [101, 1037, 11771, 3185, 1012, 102]]",
    )
    .unwrap();
    let out = scratch.join("logits.safetensors");
    jobs::forward::<Inference>(
        &assets::fetch("minilm").unwrap(),
        Some(dir),
        &ids,
        &out,
        &Default::default(),
    )
    .unwrap();
    read_safetensors(&out)
        .unwrap()
        .into_values()
        .next()
        .unwrap()
        .data
}

#[test]
fn a_split_run_saves_a_plain_lora_that_gives_the_trained_logits() {
    let _turn = serial();
    let dir = temp("run");
    let data = sentiment_file(&dir, 40);
    for init in ["pissa", "olora"] {
        // One evaluation, at the end: best/ and last/ hold the same state.
        let train = TrainConfig {
            batch: 8,
            max_steps: Some(3),
            lr: 5e-3,
            ..Default::default()
        };
        let out = dir.join(init);
        jobs::train::<CpuTrainBackend>(
            &split_job(data.clone(), out.clone(), init, train),
            &indicatif::ProgressBar::hidden(),
            &Default::default(),
        )
        .unwrap();
        let (best, last) = (out.join("best"), out.join("last"));
        let (b, l) = (config(&best), config(&last));
        assert_eq!(
            (&b["r"], &b["lora_alpha"], &b["init_lora_weights"]),
            (&8.into(), &16.0.into(), &true.into()),
            "{init}: best/"
        );
        assert_eq!(
            (&l["r"], &l["init_lora_weights"]),
            (&4.into(), &init.into()),
            "{init}: last/"
        );
        // The plain LoRA on the untouched base gives the logits of the
        // split adapter (last/, the base split again on load).
        let (plain, split) = (logits(&best, &dir), logits(&last, &dir));
        let d = check_close_slices(
            &format!("{init}: best/ vs last/"),
            &plain,
            &split,
            Tolerance::new(1e-4, 0.0),
        )
        .unwrap();
        eprintln!("{init}: best/ (plain LoRA) within {d:e} of last/ (split)");
        // And training moved the factors away from the split: the plain
        // LoRA's update B'·A' = B·A − B₀·A₀ is not zero.
        let t = read_safetensors(&best.join("adapter_model.safetensors")).unwrap();
        let key = "base_model.model.bert.encoder.layer.0.attention.self.query";
        let (a, bb) = (
            &t[&format!("{key}.lora_A.weight")],
            &t[&format!("{key}.lora_B.weight")],
        );
        assert_eq!(
            (a.shape.as_slice(), bb.shape.as_slice()),
            ([8, 384].as_slice(), [384, 8].as_slice())
        );
        // The first 4 rows of A' are the trained A, the last 4 the split's A₀.
        let (trained, start) = a.data.split_at(4 * 384);
        assert!(max_abs_diff(trained, start) > 0.0, "{init}: A is still A₀");
        let lt = read_safetensors(&last.join("adapter_model.safetensors")).unwrap();
        assert_eq!(
            trained,
            lt[&format!("{key}.lora_A.weight")].data.as_slice(),
            "{init}: A' starts with last/'s A"
        );
    }
    // PiSSA with DoRA has no plain-LoRA form: best/ keeps PEFT's layout.
    let train = TrainConfig {
        batch: 8,
        max_steps: Some(1),
        ..Default::default()
    };
    let mut lora = LoraConfig::new(4, 8.0, &["query", "value"]);
    lora.init_lora_weights = InitLoraWeights::Named("pissa".into());
    lora.use_dora = true;
    let minilm = assets::fetch("minilm").unwrap();
    let dora = job(
        minilm,
        data.clone(),
        dir.join("dora"),
        Method::slot(lora),
        train,
    );
    jobs::train::<CpuTrainBackend>(
        &dora,
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap();
    let b = config(&dir.join("dora/best"));
    assert_eq!(
        (&b["r"], &b["use_dora"], &b["init_lora_weights"]),
        (&4.into(), &true.into(), &"pissa".into())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resumed_pissa_run_equals_an_uninterrupted_one() {
    let _turn = serial();
    let dir = temp("resume");
    let data = sentiment_file(&dir, 40);
    let train = TrainConfig {
        batch: 4,
        max_steps: Some(4),
        eval_every: 2,
        ..Default::default()
    };
    let progress = indicatif::ProgressBar::hidden();
    let whole = jobs::train::<CpuTrainBackend>(
        &split_job(data.clone(), dir.join("whole"), "pissa", train.clone()),
        &progress,
        &Default::default(),
    )
    .unwrap();
    let halted = TrainConfig {
        stop_after: Some(2),
        ..train
    };
    jobs::train::<CpuTrainBackend>(
        &split_job(data, dir.join("parts"), "pissa", halted),
        &progress,
        &Default::default(),
    )
    .unwrap();
    let mut second = TrainJob::resume_from(&dir.join("parts")).unwrap();
    second.train.stop_after = None;
    let resumed = jobs::train::<CpuTrainBackend>(&second, &progress, &Default::default()).unwrap();
    assert_eq!((whole.steps, resumed.steps), (4, 4));
    assert_eq!(whole.after.value, resumed.after.value);
    for sub in ["last", "best"] {
        let f = |run: &str| {
            read_safetensors(&dir.join(run).join(sub).join("adapter_model.safetensors")).unwrap()
        };
        let (x, y) = (f("whole"), f("parts"));
        assert!(
            x.len() == y.len() && x.iter().all(|(k, t)| y.get(k) == Some(t)),
            "{sub}/ differs after the resume"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
