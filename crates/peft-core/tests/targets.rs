//! Target matching equals PEFT's own decisions on random module trees:
//! `fixtures/targets/peft_cases.json` holds 300 seeded random trees and
//! configs (list and regex targets, exclusions, `layers_to_transform` with
//! and without `layers_pattern`, rank-pattern keys) with the answers of
//! PEFT 0.21's `check_target_module_exists` and `get_pattern_key`, written
//! by `scripts/make_target_fixtures.py`.

use std::path::Path;

use peft_core::config::{LayerIndices, LayersPattern, TargetModules};
use peft_core::target::{pattern_key, targets_match};
use serde::Deserialize;

#[derive(Deserialize)]
struct Config {
    target_modules: TargetModules,
    exclude_modules: Option<TargetModules>,
    layers_to_transform: Option<LayerIndices>,
    layers_pattern: Option<LayersPattern>,
}

#[derive(Deserialize)]
struct Case {
    config: Config,
    paths: Vec<String>,
    matched: Vec<bool>,
    pattern_keys: Vec<String>,
    pattern_key: Vec<Option<String>>,
}

#[derive(Deserialize)]
struct Cases {
    peft_version: String,
    cases: Vec<Case>,
}

fn cases() -> Cases {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/targets/peft_cases.json");
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

#[test]
fn target_matching_equals_peft_on_random_module_trees() {
    let all = cases();
    assert!(all.peft_version.starts_with("0.21"), "{}", all.peft_version);
    let (mut checked, mut matched, mut wrong) = (0, 0, Vec::new());
    for (i, case) in all.cases.iter().enumerate() {
        let c = &case.config;
        for (path, &want) in case.paths.iter().zip(&case.matched) {
            let got = targets_match(
                Some(&c.target_modules),
                c.exclude_modules.as_ref(),
                c.layers_to_transform.as_ref(),
                c.layers_pattern.as_ref(),
                path,
                &[],
            )
            .unwrap();
            checked += 1;
            matched += usize::from(want);
            if got != want {
                wrong.push(format!(
                    "case {i}: {path}: PEFT {want}, ours {got} (targets {:?}, exclude {:?}, layers {:?}, pattern {:?})",
                    c.target_modules, c.exclude_modules, c.layers_to_transform, c.layers_pattern
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {checked} decisions differ from PEFT:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(20)].join("\n")
    );
    assert!(
        checked > 5_000 && matched > 500,
        "{checked} paths, {matched} matched"
    );
}

#[test]
fn rank_pattern_keys_equal_peft_on_random_module_trees() {
    for (i, case) in cases().cases.iter().enumerate() {
        for (path, want) in case.paths.iter().zip(&case.pattern_key) {
            let got = pattern_key(&case.pattern_keys, path).unwrap();
            assert_eq!(
                got,
                want.as_ref(),
                "case {i}: {path} with keys {:?}",
                case.pattern_keys
            );
        }
    }
}
