//! What a user can get wrong is a typed error that says what is wrong, and
//! the behaviours PEFT users rely on hold: fresh adapters are the identity,
//! mixed batches equal per-row runs at any ranks, merge-and-unload is the
//! merged model.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::config::{InitLoraWeights, TargetModules};
use peft_core::io::{read_safetensors, serialize_safetensors, HostTensor};
use peft_core::{LoraConfig, PeftError, PeftModel, BASE_ROW};
use peft_lora::{AddWeightedAdapter, Combination, LoraModel, WeightedOptions};
use peft_models::llama::Llama;

type B = NdArray;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model() -> Llama<B> {
    Llama::load(&fixtures().join("llama"), &Default::default()).unwrap()
}

fn ids() -> Tensor<B, 2, Int> {
    let v: Vec<i64> = (0..21).map(|i| (i * 7 + 3) % 64).collect();
    Tensor::from_data(TensorData::new(v, [3, 7]), &Default::default())
}

fn logits(m: &Llama<B>) -> HostTensor {
    HostTensor::from_tensor(m.forward(ids(), None))
}

fn max_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    peft_core::compare::max_abs_diff(&a.data, &b.data)
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-behaviour-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_target_that_matches_nothing_names_the_modules_that_exist() {
    let err = LoraModel::new(model(), LoraConfig::new(4, 8.0, &["qproj"])).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PeftError::NoTargetMatched { .. }), "{msg}");
    assert!(msg.contains("model.layers.0.self_attn.q_proj"), "{msg}");
    assert!(
        msg.contains("\"qproj\""),
        "names the rule as written: {msg}"
    );
}

#[test]
fn adapter_names_are_checked() {
    let mut lora = LoraModel::new(model(), LoraConfig::new(4, 8.0, &["q_proj"])).unwrap();
    assert!(matches!(
        lora.add_adapter("default", LoraConfig::new(2, 2.0, &["v_proj"])),
        Err(PeftError::DuplicateAdapter(_))
    ));
    assert!(matches!(
        lora.set_adapter(&["nope"]),
        Err(PeftError::UnknownAdapter { .. })
    ));
    assert!(lora.delete_adapter("nope").is_err());
    assert!(lora
        .add_adapter(BASE_ROW, LoraConfig::new(2, 2.0, &["v_proj"]))
        .is_err());
    let zero_rank = LoraConfig {
        r: 0,
        ..LoraConfig::new(4, 8.0, &["q_proj"])
    };
    assert!(matches!(
        lora.add_adapter("z", zero_rank),
        Err(PeftError::Config(_))
    ));
}

/// The standard deviation of `values`, each divided by its own `scale`.
fn normalised_std(values: &[(f32, f64)]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().map(|(v, s)| *v as f64 / s).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|(v, s)| (*v as f64 / s - mean).powi(2))
        .sum::<f64>()
        / n;
    var.sqrt()
}

/// DoRA's magnitude starts at the column norms of `W + s·A·B` (`W` the base
/// weight as the slot computes with it: dequantized for a quantized base).
fn check_dora_magnitude(what: &str, s: &peft_core::LinearSlot<B>, e: &peft_core::LoraEntry<B>) {
    let w = HostTensor::from_tensor(s.base_weight());
    let a = HostTensor::from_tensor(e.a.val());
    let b = HostTensor::from_tensor(e.b.val());
    let (d_in, d_out, r) = (s.d_input(), s.d_output(), e.meta.rank);
    let want: Vec<f32> = (0..d_out)
        .map(|j| {
            (0..d_in)
                .map(|i| {
                    let delta: f64 = (0..r)
                        .map(|k| a.data[i * r + k] as f64 * b.data[k * d_out + j] as f64)
                        .sum();
                    (w.data[i * d_out + j] as f64 + e.meta.scaling * delta).powi(2)
                })
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect();
    let m = HostTensor::from_tensor(e.magnitude.as_ref().expect("DoRA").val());
    let tol = peft_core::compare::Tolerance::new(1e-5, 0.0);
    if let Err(msg) = peft_core::compare::check_close_slices(what, &m.data, &want, tol) {
        panic!("DoRA magnitude: {msg}");
    }
}

#[test]
fn a_loftq_dora_adapter_starts_its_magnitude_on_the_quantized_base() {
    let config = LoraConfig {
        init_lora_weights: InitLoraWeights::Named("loftq".into()),
        use_dora: true,
        ..LoraConfig::new(4, 8.0, &["q_proj", "down_proj"])
    };
    let lora = LoraModel::new(model(), config).unwrap();
    let mut checked = 0;
    lora.model.visit_linears(&mut |p, s| {
        if let Some(e) = s.entry::<peft_core::LoraEntry<_>>("default") {
            assert!(s.is_quantized(), "{p}: LoftQ quantizes the base");
            assert!(
                HostTensor::from_tensor(e.b.val())
                    .data
                    .iter()
                    .any(|v| *v != 0.0),
                "{p}: LoftQ's B is not zero"
            );
            check_dora_magnitude(p, s, e);
            checked += 1;
        }
    });
    assert_eq!(checked, 4);
}

#[test]
fn fresh_adapters_start_as_peft_initialises_them() {
    let base = logits(&model());
    let r = 4;
    // PEFT: `true` is kaiming_uniform(a=√5) on A, U(±1/√in) (std 1/√(3·in)),
    // and B = 0; `gaussian` is A ~ N(0, 1/r), B = 0; `false` keeps
    // nn.Linear's init on both, B ~ U(±1/√r). q_proj reads 16 features,
    // down_proj 40: each value is compared with its own module's scale.
    for init in [
        InitLoraWeights::Bool(true),
        InitLoraWeights::Named("gaussian".into()),
        InitLoraWeights::Bool(false),
    ] {
        let config = LoraConfig {
            init_lora_weights: init.clone(),
            use_dora: true,
            ..LoraConfig::new(r, 8.0, &["q_proj", "down_proj"])
        };
        let lora = LoraModel::new(model(), config).unwrap();
        let random_b = init == InitLoraWeights::Bool(false);
        let moved = max_diff(&logits(&lora.model), &base);
        match random_b {
            false => assert!(
                moved < 1e-6,
                "{init:?}: B = 0 makes a fresh adapter the identity"
            ),
            true => assert!(moved > 1e-4, "{init:?}: B ≠ 0"),
        }
        let (mut a_values, mut b_values) = (Vec::new(), Vec::new());
        lora.model.visit_linears(&mut |p, s| {
            let Some(e) = s.entry::<peft_core::LoraEntry<_>>("default") else {
                return;
            };
            let uniform_a = 1.0 / (s.d_input() as f64).sqrt();
            let a_std = match &init {
                InitLoraWeights::Named(_) => 1.0 / r as f64,
                _ => uniform_a / 3f64.sqrt(),
            };
            let a = HostTensor::from_tensor(e.a.val());
            let b = HostTensor::from_tensor(e.b.val());
            if !matches!(init, InitLoraWeights::Named(_)) {
                assert!(
                    a.data.iter().all(|v| v.abs() as f64 <= uniform_a),
                    "{p}: A ~ U(±1/√in)"
                );
            }
            a_values.extend(a.data.iter().map(|v| (*v, a_std)));
            let uniform_b = 1.0 / (r as f64).sqrt();
            match random_b {
                false => assert!(b.data.iter().all(|v| *v == 0.0), "{p}: B = 0"),
                true => assert!(
                    b.data.iter().all(|v| v.abs() as f64 <= uniform_b),
                    "{p}: B ~ U(±1/√r)"
                ),
            }
            b_values.extend(b.data.iter().map(|v| (*v, uniform_b / 3f64.sqrt())));
            check_dora_magnitude(&format!("{init:?} {p}"), s, e);
        });
        // 448 values of A: the sample's std is within 5 % of the true one
        // with near certainty (its own spread is about 3.4 %).
        let a_ratio = normalised_std(&a_values);
        assert!(
            (0.85..1.15).contains(&a_ratio),
            "{init:?}: std(A) / PEFT's = {a_ratio}"
        );
        if random_b {
            let b_ratio = normalised_std(&b_values);
            assert!(
                (0.8..1.2).contains(&b_ratio),
                "{init:?}: std(B) / PEFT's = {b_ratio}"
            );
        }
    }
}

/// Saves the llama `lora` fixture with one tensor changed by `edit`.
fn corrupted(name: &str, edit: impl FnOnce(&mut Vec<(String, HostTensor)>)) -> PathBuf {
    let src = fixtures().join("llama/lora");
    let dir = temp(name);
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors: Vec<(String, HostTensor)> =
        read_safetensors(&src.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        serialize_safetensors(&tensors, None),
    )
    .unwrap();
    dir
}

#[test]
fn bad_adapter_files_are_typed_errors_and_leave_the_model_unchanged() {
    let cases: Vec<(&str, PathBuf)> = vec![
        (
            "missing",
            corrupted("missing", |t| {
                t.remove(0);
            }),
        ),
        (
            "shape",
            corrupted("shape", |t| {
                t[0].1 = HostTensor {
                    shape: vec![3, 3],
                    data: vec![0.0; 9],
                };
            }),
        ),
        (
            "nan",
            corrupted("nan", |t| {
                t[1].1.data[0] = f32::NAN;
            }),
        ),
        (
            "extra",
            corrupted("extra", |t| {
                t.push((
                    "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(),
                    t[0].1.clone(),
                ));
            }),
        ),
    ];
    for (what, dir) in cases {
        let mut lora = LoraModel::wrap(model());
        let err = lora.load_adapter(&dir, "x").unwrap_err();
        let ok = match what {
            "missing" => matches!(err, PeftError::MissingTensor { .. }),
            "shape" => matches!(err, PeftError::Shape { .. }),
            "nan" => matches!(err, PeftError::NonFinite(_)),
            _ => matches!(err, PeftError::UnexpectedTensors { .. }),
        };
        assert!(ok, "{what}: {err}");
        assert!(
            err.to_string().contains("adapter_model.safetensors") || what == "shape",
            "{what}: {err}"
        );
        assert!(
            lora.adapter_names().is_empty(),
            "{what}: a failed load leaves no adapter behind"
        );
        let mut entries = 0;
        lora.model.visit_linears(&mut |_, s| {
            entries += s.entries_of::<peft_core::LoraEntry<_>>().count()
        });
        assert_eq!(entries, 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
    let dir = temp("badjson");
    std::fs::write(dir.join("adapter_config.json"), "{\"r\": 4, ").unwrap();
    let err = LoraModel::from_pretrained(model(), &dir).unwrap_err();
    assert!(
        matches!(err, PeftError::Json { .. }) && err.to_string().contains("adapter_config.json"),
        "{err}"
    );
    std::fs::write(
        dir.join("adapter_config.json"),
        "{\"peft_type\": \"PREFIX_TUNING\"}",
    )
    .unwrap();
    assert!(matches!(
        LoraModel::from_pretrained(model(), &dir),
        Err(PeftError::Config(_))
    ));
    std::fs::write(
        dir.join("adapter_config.json"),
        "{\"r\": 4, \"target_modules\": [\"q_proj\"]}",
    )
    .unwrap();
    assert!(
        matches!(
            LoraModel::from_pretrained(model(), &dir),
            Err(PeftError::Io { .. })
        ),
        "no weights file"
    );
    std::fs::write(dir.join("adapter_model.safetensors"), b"garbage").unwrap();
    assert!(matches!(
        LoraModel::from_pretrained(model(), &dir),
        Err(PeftError::Checkpoint { .. })
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn mixed_batch_equals_per_row_runs_across_ranks_and_dora() {
    let dir = fixtures().join("llama/regex_layers");
    let mut lora = LoraModel::from_pretrained(model(), &dir).unwrap();
    // A rank-4 (cat of two rank-2) adapter beside the rank-2 ones, and a DoRA one.
    lora.add_weighted_adapter(
        &["default", "other"],
        &[1.0, -0.5],
        "cat",
        Combination::Cat,
        &WeightedOptions::default(),
    )
    .unwrap();
    let dora = LoraConfig {
        use_dora: true,
        init_lora_weights: InitLoraWeights::Bool(false),
        ..LoraConfig::new(3, 5.0, &["q_proj", "k_proj"])
    };
    lora.add_adapter("dora", dora).unwrap();
    let names = ["cat", BASE_ROW, "dora"];
    let mixed = lora.forward_mixed(&names, 3, logits).unwrap();
    for (row, name) in names.iter().enumerate() {
        let single = if *name == BASE_ROW {
            lora.disable_adapters().unwrap();
            let l = logits(&lora.model);
            lora.enable_adapters();
            l
        } else {
            lora.set_adapter(&[name]).unwrap();
            logits(&lora.model)
        };
        let n = single.data.len() / 3;
        let d = peft_core::compare::max_abs_diff(
            &mixed.data[row * n..(row + 1) * n],
            &single.data[row * n..(row + 1) * n],
        );
        assert!(d < 1e-5, "row {row} ({name}) differs by {d:e}");
    }
}

#[test]
fn several_active_adapters_add_up_and_merge_and_unload_is_the_merged_model() {
    let dir = fixtures().join("llama/lora");
    let mut lora = LoraModel::from_pretrained(model(), &dir).unwrap();
    lora.set_adapter(&["default", "other"]).unwrap();
    let both = logits(&lora.model);
    // Same thing as a `cat` combination with weights 1, 1 (exact by construction).
    lora.add_weighted_adapter(
        &["default", "other"],
        &[1.0, 1.0],
        "sum",
        Combination::Cat,
        &WeightedOptions::default(),
    )
    .unwrap();
    lora.set_adapter(&["sum"]).unwrap();
    assert!(max_diff(&logits(&lora.model), &both) < 1e-5);
    lora.set_adapter(&["default", "other"]).unwrap();
    let merged = lora.merge_and_unload().unwrap();
    let mut entries = 0;
    merged.visit_linears(&mut |_, s| entries += s.entries_of::<peft_core::LoraEntry<_>>().count());
    assert_eq!(entries, 0, "unloaded");
    assert!(max_diff(&logits(&merged), &both) < 1e-5);
}

/// Two adapters with fresh random `B` (so that each changes the logits) on
/// different modules: `a` rank 2 on `q_proj`, `b` rank 3 on `q_proj` and
/// `v_proj`.
fn two_random_adapters() -> LoraModel<B, Llama<B>> {
    let random = |r: usize, targets: &[&str]| LoraConfig {
        init_lora_weights: InitLoraWeights::Bool(false),
        ..LoraConfig::new(r, 2.0 * r as f64, targets)
    };
    let mut lora = LoraModel::new(model(), random(2, &["q_proj"])).unwrap();
    lora.add_adapter("b", random(3, &["q_proj", "v_proj"]))
        .unwrap();
    lora
}

#[test]
fn weighted_combinations_refuse_what_they_cannot_combine() {
    let mut lora = two_random_adapters();
    let both = ["default", "b"];
    let opts = |density: Option<f64>| WeightedOptions {
        density,
        ..Default::default()
    };
    let refused =
        |lora: &mut LoraModel<B, Llama<B>>, kind, weights: &[f64], o: WeightedOptions| match lora
            .add_weighted_adapter(&both, weights, "w", kind, &o)
        {
            Err(PeftError::Config(m)) => m,
            other => panic!("{kind:?} {weights:?} {o:?}: {other:?}"),
        };
    // Pruning combinations need a density in [0, 1].
    for kind in [
        Combination::Ties,
        Combination::DareLinear,
        Combination::MagnitudePrune,
    ] {
        for density in [None, Some(-0.1), Some(1.5), Some(f64::NAN)] {
            let m = refused(&mut lora, kind, &[1.0, 1.0], opts(density));
            assert!(m.contains("density"), "{kind:?} {density:?}: {m}");
        }
    }
    // Factor-wise sums need one rank (2 and 3 here); a weight per adapter;
    // an SVD rank of at least 1.
    let m = refused(&mut lora, Combination::Linear, &[1.0, 1.0], opts(None));
    assert!(m.contains("one rank"), "{m}");
    let m = refused(&mut lora, Combination::Ties, &[1.0, 1.0], opts(Some(0.5)));
    assert!(m.contains("one rank"), "{m}");
    let m = refused(&mut lora, Combination::Cat, &[1.0], opts(None));
    assert!(m.contains("one weight per adapter"), "{m}");
    let zero_rank = WeightedOptions {
        svd_rank: Some(0),
        ..Default::default()
    };
    let m = refused(&mut lora, Combination::Svd, &[1.0, 1.0], zero_rank);
    assert!(m.contains("svd_rank"), "{m}");
    // Targets given as a list and as a pattern; ranks equal per adapter
    // (2 and max(1, 2)) but not in `q_proj` (2 and 1).
    let pattern = LoraConfig {
        target_modules: Some(TargetModules::Pattern(r".*\.q_proj".into())),
        ..LoraConfig::new(2, 4.0, &[])
    };
    lora.add_adapter("pattern", pattern).unwrap();
    let mut uneven = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
    uneven.rank_pattern.insert("q_proj".into(), 1);
    lora.add_adapter("uneven", uneven).unwrap();
    let all_linear = LoraConfig {
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        ..LoraConfig::new(2, 4.0, &[])
    };
    lora.add_adapter("all-linear", all_linear).unwrap();
    let refusals = [
        (["default", "pattern"], "one type"),
        (["pattern", "default"], "one type"),
        (["pattern", "all-linear"], "not all-linear"),
        (["default", "uneven"], "equal ranks in every module"),
    ];
    for (pair, want) in refusals {
        let o = WeightedOptions::default();
        match lora.add_weighted_adapter(&pair, &[1.0, 1.0], "w", Combination::Linear, &o) {
            Err(PeftError::Config(m)) => assert!(m.contains(want), "{pair:?}: {m}"),
            res => panic!("{pair:?}: {res:?}"),
        }
    }
    // Nothing refused was added; the densities at the ends of [0, 1] are
    // accepted (an SVD combination takes any ranks).
    assert!(
        lora.config("w").is_err(),
        "a refused combination left an adapter"
    );
    // Two patterns combine into their alternation.
    let o = WeightedOptions::default();
    lora.add_weighted_adapter(
        &["pattern", "pattern"],
        &[1.0, 0.5],
        "patterns",
        Combination::Linear,
        &o,
    )
    .unwrap();
    for density in [0.0, 1.0] {
        let name = format!("ties_svd_{density}");
        lora.add_weighted_adapter(
            &both,
            &[1.0, 1.0],
            &name,
            Combination::TiesSvd,
            &opts(Some(density)),
        )
        .unwrap_or_else(|e| panic!("density {density}: {e}"));
    }
}

#[test]
fn a_concatenation_pads_modules_that_only_some_adapters_target() {
    // `v_proj` has only `b`'s rank 3 of the combination's rank 5: PEFT pads
    // it with zeros, and `cat` with weights 1, 1 is both adapters active.
    let mut lora = two_random_adapters();
    lora.set_adapter(&["default", "b"]).unwrap();
    let both = logits(&lora.model);
    let opts = WeightedOptions::default();
    lora.add_weighted_adapter(
        &["default", "b"],
        &[1.0, 1.0],
        "cat",
        Combination::Cat,
        &opts,
    )
    .unwrap();
    lora.set_adapter(&["cat"]).unwrap();
    let d = max_diff(&logits(&lora.model), &both);
    assert!(d < 1e-5, "cat differs from both adapters active by {d:e}");
    lora.set_adapter(&["b"]).unwrap();
    let b_alone = logits(&lora.model);
    assert!(
        max_diff(&both, &b_alone) > 1e-3,
        "adapter `default` changes nothing"
    );
    // Every module has the combination's rank in the file, as PEFT (which
    // reads the rank from the config) needs to load it.
    let dir = temp("cat-pad");
    lora.save_adapter("cat", &dir).unwrap();
    let saved = read_safetensors(&dir.join("adapter_model.safetensors")).unwrap();
    let mut factors = 0;
    for (key, t) in &saved {
        if key.contains("lora_A") {
            assert_eq!(t.shape[0], 5, "{key}: {:?}", t.shape);
            factors += 1;
        } else if key.contains("lora_B") {
            assert_eq!(t.shape[1], 5, "{key}: {:?}", t.shape);
        }
    }
    assert!(factors > 2, "{factors} lora_A tensors saved");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_combination_leaves_modules_no_adapter_adapts_at_zero() {
    // The combination targets the union of the targets in the first
    // adapter's layers: `v_proj` of layer 0, which only layer 1 of `b`
    // adapts. PEFT zeroes every factor of the new adapter before adding the
    // sources in, so that module's factors stay zero.
    let layer = |r: usize, targets: &[&str], layer: usize| LoraConfig {
        init_lora_weights: InitLoraWeights::Bool(false),
        layers_to_transform: Some(peft_core::config::LayerIndices::One(layer)),
        ..LoraConfig::new(r, 2.0 * r as f64, targets)
    };
    let mut lora = LoraModel::new(model(), layer(2, &["q_proj"], 0)).unwrap();
    lora.add_adapter("b", layer(2, &["v_proj"], 1)).unwrap();
    lora.add_weighted_adapter(
        &["default", "b"],
        &[1.0, 1.0],
        "w",
        Combination::Linear,
        &WeightedOptions::default(),
    )
    .unwrap();
    let mut seen = Vec::new();
    lora.model.visit_linears(&mut |p, s| {
        let Some(e) = s.entry::<peft_core::LoraEntry<_>>("w") else {
            return;
        };
        seen.push(p.to_string());
        let a = HostTensor::from_tensor(e.a.val());
        let b = HostTensor::from_tensor(e.b.val());
        let zero = a.data.iter().chain(&b.data).all(|v| *v == 0.0);
        assert_eq!(zero, p.contains("v_proj"), "{p}: zero factors");
    });
    assert_eq!(
        seen,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj"
        ]
    );
}

#[test]
fn a_negative_weight_subtracts_the_adapter() {
    // One adapter is always PEFT's `linear`, whose factors carry
    // sign(w)·√|w·s| and √|w·s|: the update is w·s·B·A. `cat` (two adapters,
    // the second at weight 0) puts w·s in A alone: the same update by
    // another route.
    let mut lora = two_random_adapters();
    let opts = WeightedOptions::default();
    lora.add_weighted_adapter(&["b"], &[-0.6], "linear", Combination::Linear, &opts)
        .unwrap();
    lora.add_weighted_adapter(
        &["b", "default"],
        &[-0.6, 0.0],
        "cat",
        Combination::Cat,
        &opts,
    )
    .unwrap();
    lora.set_adapter(&["linear"]).unwrap();
    let linear = logits(&lora.model);
    lora.set_adapter(&["cat"]).unwrap();
    let cat = logits(&lora.model);
    let d = max_diff(&linear, &cat);
    assert!(d < 1e-5, "linear and cat of weight -0.6 differ by {d:e}");
    // Weights w and -w of one adapter cancel: the base model's logits.
    lora.add_weighted_adapter(
        &["b", "b"],
        &[0.8, -0.8],
        "zero",
        Combination::Linear,
        &opts,
    )
    .unwrap();
    lora.set_adapter(&["zero"]).unwrap();
    let zero = logits(&lora.model);
    lora.disable_adapters().unwrap();
    let base = logits(&lora.model);
    assert!(max_diff(&zero, &base) < 1e-6, "w and -w do not cancel");
    assert!(
        max_diff(&linear, &base) > 1e-3,
        "weight -0.6 changes nothing"
    );
}
