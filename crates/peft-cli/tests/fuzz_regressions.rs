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
