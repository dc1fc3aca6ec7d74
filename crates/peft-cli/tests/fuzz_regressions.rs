//! Replays the fuzz corpora in the ordinary test suite: every seed under
//! `fuzz/corpus/<target>/seed-*` must be accepted (so the fuzzer starts from
//! valid inputs), and every other corpus entry and every minimised crash
//! input under `fuzz/regressions/<target>/` must be answered without a panic.
//! The target bodies are `fuzz/src/lib.rs`, compiled here as a module.

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::Path;

fn replay(target: &str, body: targets::Body) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut seen = 0;
    for folder in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(folder).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            let outcome = std::panic::catch_unwind(|| body(&bytes));
            match outcome {
                Err(_) => panic!("{target}: {} panicked", file.display()),
                Ok(false) if name.starts_with("seed-") => {
                    panic!("{target}: seed {} was refused", file.display())
                }
                Ok(_) => seen += 1,
            }
        }
    }
    seen
}

#[test]
fn every_fuzz_input_is_answered_without_a_panic() {
    for &(target, body) in targets::TARGETS {
        let n = replay(target, body);
        assert!(n > 0, "{target}: no corpus");
    }
}

/// The halted run of the `run_state` target, copied to a fresh folder with
/// `last/trainer_state.json` edited by `edit`.
fn halted_copy(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let base = targets::halted_run();
    let dir =
        std::env::temp_dir().join(format!("peft-fuzz-regression-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    targets::copy_run(base, &dir);
    let state = dir.join("last/trainer_state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    edit(&mut v);
    // Through the link: `last` points at the copy's own version folder.
    std::fs::write(&state, v.to_string()).unwrap();
    dir
}

/// Resumes the run in `dir` to its end, in a thread: `None` if it has not
/// finished after two minutes (the epoch loop of a state that skips every
/// batch never ends).
fn resume(dir: std::path::PathBuf) -> Option<peft_core::Result<peft_cli::jobs::Report>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcome = peft_cli::jobs::TrainJob::resume_from(&dir).and_then(|mut job| {
            job.train.stop_after = None;
            peft_cli::jobs::train::<peft_core::backends::CpuTrainBackend>(
                &job,
                &indicatif::ProgressBar::hidden(),
                &Default::default(),
            )
        });
        let _ = tx.send(outcome);
    });
    rx.recv_timeout(std::time::Duration::from_secs(120)).ok()
}

/// A saved run state past the run's end or further into an epoch than the
/// epoch has steps is refused on resume, naming the file; the unedited
/// state resumes (so the refusals are the edits').
#[test]
fn a_run_state_the_run_cannot_continue_from_is_refused() {
    let untouched = halted_copy("untouched", |_| {});
    let report = resume(untouched).expect("the halted run resumes in time");
    assert_eq!(report.unwrap().steps, 3);
    for (tag, field, value, says) in [
        ("past-end", "step", 99, "past the run's 3 steps"),
        (
            "past-epoch",
            "steps_in_epoch",
            99,
            "99 steps into an epoch of 4",
        ),
        (
            "past-epochs",
            "epoch",
            7,
            "epoch 7 is past the run's 1 epochs",
        ),
    ] {
        let dir = halted_copy(tag, |v| v[field] = value.into());
        let Some(outcome) = resume(dir) else {
            panic!("{tag}: resuming did not end within two minutes");
        };
        let err = outcome.err().unwrap_or_else(|| panic!("{tag}: resumed"));
        let text = err.to_string();
        assert!(
            text.contains(says) && text.contains("trainer_state.json"),
            "{tag}: {text}"
        );
    }
}

/// A head whose rows are not the run's labels, and label files that name
/// no label or one twice, are refused; the matching pair loads.
#[test]
fn a_head_that_does_not_fit_its_labels_is_refused() {
    type B = burn::backend::NdArray;
    let d = Default::default();
    let dir =
        std::env::temp_dir().join(format!("peft-fuzz-regression-head-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let head3 = peft_cli::tasks::new_head::<B>(16, 3, &d);
    peft_cli::tasks::save_head(&head3, &dir).unwrap();
    std::fs::write(dir.join("labels.json"), r#"["negative", "positive"]"#).unwrap();
    let labels = peft_cli::tasks::read_labels(&dir).unwrap();
    assert_eq!(labels, ["negative", "positive"]);
    let err = peft_cli::tasks::load_head::<B>(&dir, 16, labels.len(), &d).unwrap_err();
    assert!(err.to_string().contains("classifier.weight"), "{err}");
    assert!(peft_cli::tasks::load_head::<B>(&dir, 16, 3, &d).is_ok());
    assert!(peft_cli::tasks::load_head::<B>(&dir, 8, 3, &d).is_err());
    for (labels, says) in [
        ("[]", "no labels"),
        (r#"["a", "b", "a"]"#, "`a` is listed twice"),
    ] {
        std::fs::write(dir.join("labels.json"), labels).unwrap();
        let err = peft_cli::tasks::read_labels(&dir).unwrap_err().to_string();
        assert!(
            err.contains(says) && err.contains("labels.json"),
            "{labels}: {err}"
        );
    }
}

/// Writes `fuzz/corpus/run_state/seed-*` from the `run_state` target's
/// halted run, one per file it replaces (rerun after a change of the run's
/// files: `cargo test -p peft-cli --test fuzz_regressions -- --ignored
/// write_run_state_seeds`).
#[test]
#[ignore]
fn write_run_state_seeds() {
    let base = targets::halted_run();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/run_state");
    std::fs::create_dir_all(&out).unwrap();
    for (i, (file, seed)) in [
        ("train_config.json", "seed-train-config"),
        ("last/trainer_state.json", "seed-trainer-state"),
        ("last/optimizer.bin", "seed-optimizer"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut bytes = vec![i as u8];
        bytes.extend(std::fs::read(base.join(file)).unwrap());
        std::fs::write(out.join(seed), bytes).unwrap();
    }
}
