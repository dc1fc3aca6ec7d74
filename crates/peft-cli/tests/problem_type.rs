//! transformers' `problem_type` for sequence classification: the
//! regression and multi-label losses of `peft train --task seq-cls` equal
//! what `BertForSequenceClassification` computes through PEFT's SEQ_CLS
//! LoRA (`scripts/make_problem_type_fixtures.py`: the loss and the
//! gradient of every trainable tensor, the LoRA factors and the head's
//! copy), and a real run of each problem writes what `peft eval` reads
//! back, with the problem's metric.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use peft_cli::data;
use peft_cli::jobs::{self, Task, TrainJob};
use peft_cli::tasks::problem::BatchTargets;
use peft_cli::tasks::{Method, ProblemType};
use peft_cli::train::TrainConfig;
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{autodiff_backend_tests, compare, LoraConfig, PeftError, SlotModel};
use peft_lora::Lora;
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, temp_dir};

type Inference = burn::backend::Flex;
type Training = burn::backend::Autodiff<burn::backend::Flex>;

/// The SGD step that reads the gradients out: `θ − lr·g`, so that
/// `g = (θ − θ') / lr` comes in PEFT's key names and layout through the
/// adapter's saved tensors. A large rate keeps the f32 difference exact
/// to far below the tolerance.
const READ_OUT_LR: f64 = 64.0;

fn adapter_tensors<B: AutodiffBackend>(
    m: &SlotModel<B, Bert<B>, Lora>,
) -> HashMap<String, HostTensor> {
    m.adapter_tensors("default").unwrap().into_iter().collect()
}

fn losses_and_gradients<B: AutodiffBackend>(d: &B::Device) {
    let dir = fixtures_dir().join("bert/seqcls_lora");
    let want = read_safetensors(&dir.join("problem_types.safetensors")).unwrap();
    let ids: Vec<i64> = want["input_ids"].data.iter().map(|&v| v as i64).collect();
    let ids = Tensor::from_data(TensorData::new(ids, want["input_ids"].shape.clone()), d);
    for problem in [ProblemType::Regression, ProblemType::MultiLabel] {
        let p = problem.name();
        let mut adapted = SlotModel::<B, Bert<B>, Lora>::wrap(
            Bert::load(&fixtures_dir().join("bert"), d).unwrap(),
        );
        adapted.load_adapter(&dir, "default").unwrap();
        adapted.set_adapter(&["default"]).unwrap();
        let logits = adapted.model.classify(ids.clone(), None).unwrap();
        compare::assert_close(
            &format!("{p}: logits"),
            &HostTensor::from_tensor(logits.clone()),
            &want[&format!("{p}.logits")],
            compare::Tolerance::new(1e-5, 0.0),
        );
        let y = &want[&format!("{p}.targets")];
        let y = Tensor::from_data(TensorData::new(y.data.clone(), y.shape.clone()), d);
        let loss = problem.loss(logits, BatchTargets::Values(y));
        compare::check_close_slices(
            &format!("{p}: loss"),
            &[loss.clone().into_scalar().elem::<f32>()],
            &want[&format!("{p}.loss")].data,
            compare::Tolerance::new(1e-5, 0.0),
        )
        .unwrap();
        let before = adapter_tensors(&adapted);
        let grads = GradientsParams::from_grads(loss.backward(), &adapted);
        let adapted = SgdConfig::new().init().step(READ_OUT_LR, adapted, grads);
        let after = adapter_tensors(&adapted);
        let prefix = format!("{p}.grad.");
        let keys: Vec<&String> = want.keys().filter(|k| k.starts_with(&prefix)).collect();
        // LoRA's A and B on two layers' query and value, and the head's
        // weight and bias.
        assert_eq!(keys.len(), 10, "{p}: gradients in the fixture: {keys:?}");
        let largest = keys
            .iter()
            .fold(0f32, |m, k| m.max(compare::max_abs(&want[*k].data)));
        for key in keys {
            let name = &key[prefix.len()..];
            let (b, a) = (&before[name], &after[name]);
            let grad = HostTensor {
                data: b
                    .data
                    .iter()
                    .zip(&a.data)
                    .map(|(b, a)| ((b - a) as f64 / READ_OUT_LR) as f32)
                    .collect(),
                shape: b.shape.clone(),
            };
            compare::assert_close(
                &format!("{p}: gradient of {name}"),
                &grad,
                &want[key],
                compare::Tolerance::new(compare::GRADIENTS.rel, 1e-5 * largest),
            );
        }
    }
}

autodiff_backend_tests!(losses_and_gradients);

/// The first `n` VADER tweets (real texts, each rated by about ten people
/// from −4 to 4) with, per `problem`: the mean rating (regression), or the
/// labels at least 30% of raters agreed on, `negative` (< 0), `neutral`
/// (0) and `positive` (> 0), as a list (multi-label: a tweet can be several).
fn tweets(dir: &Path, n: usize, problem: ProblemType) -> PathBuf {
    let root = assets::fetch("rotten-tomatoes").unwrap();
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
    let truth = read("tweets_GroundTruth.txt");
    let ratings = read("tweets_anonDataRatings.txt");
    let rows: Vec<String> = truth
        .lines()
        .zip(ratings.lines())
        .take(n)
        .map(|(t, r)| {
            let t: Vec<&str> = t.splitn(3, '\t').collect();
            let r: Vec<&str> = r.splitn(4, '\t').collect();
            assert_eq!(t[0], r[0], "the two files' rows align");
            let label = match problem {
                ProblemType::Regression => serde_json::json!(t[1].parse::<f64>().unwrap()),
                _ => {
                    let votes: Vec<i64> = serde_json::from_str(r[3]).unwrap();
                    let share = |f: fn(i64) -> bool| {
                        votes.iter().filter(|&&v| f(v)).count() as f64 / votes.len() as f64
                    };
                    let labels: Vec<&str> = [
                        ("negative", share(|v| v < 0)),
                        ("neutral", share(|v| v == 0)),
                        ("positive", share(|v| v > 0)),
                    ]
                    .into_iter()
                    .filter(|(_, s)| *s >= 0.3)
                    .map(|(l, _)| l)
                    .collect();
                    serde_json::json!(labels)
                }
            };
            serde_json::json!({"text": t[2], "label": label}).to_string()
        })
        .collect();
    let path = dir.join(format!("{}.jsonl", problem.name()));
    std::fs::write(&path, rows.join("\n")).unwrap();
    path
}

/// The held-out split a run with `seed` takes, labels as written.
fn held_out(dir: &Path, data_file: &Path, seed: u64) -> PathBuf {
    let examples = data::read_labelled(data_file, "text", "label").unwrap();
    let (_, held) = data::split(&examples, 0.25, seed);
    let rows: Vec<String> = held
        .iter()
        .map(|e| {
            let label: serde_json::Value = match &e.labels {
                Some(l) => serde_json::json!(l),
                None => serde_json::from_str(&e.label).unwrap(),
            };
            serde_json::json!({"text": e.text, "label": label}).to_string()
        })
        .collect();
    let file = dir.join("held.jsonl");
    std::fs::write(&file, rows.join("\n")).unwrap();
    file
}

fn job(data: PathBuf, out: PathBuf, problem_type: Option<&str>) -> TrainJob {
    TrainJob {
        model: assets::fetch("minilm").unwrap(),
        data,
        task: Task::SeqCls,
        method: Method::slot(LoraConfig::new(4, 8.0, &["query", "value"])),
        out,
        train: TrainConfig {
            batch: 8,
            lr: 1e-2,
            max_steps: Some(24),
            eval_every: 6,
            ..Default::default()
        },
        text_column: "text".into(),
        label_column: "label".into(),
        problem_type: problem_type.map(str::to_string),
        held_out: 0.25,
        max_train: None,
        block_size: 32,
        resume: false,
        quantize: None,
    }
}

/// A regression run (asked for) and a multi-label run (inferred from list
/// labels) on real tweets: the problem's metric improves, the head has one
/// row per output, the run names its problem, and `peft eval` of `best/`
/// gives the run's own figure, from the run's `task.json` or, without it,
/// by transformers' inference (one output: a regression).
#[test]
fn regression_and_multi_label_runs_write_what_eval_reads_back() {
    let dir = temp_dir("problem-type-runs");
    std::fs::create_dir_all(&dir).unwrap();
    let minilm = assets::fetch("minilm").unwrap();
    for (problem, asked, metric, outputs) in [
        (ProblemType::Regression, Some("regression"), "mse", 1),
        (ProblemType::MultiLabel, None, "micro_f1", 3),
    ] {
        let p = problem.name();
        let data_file = tweets(&dir, 96, problem);
        let j = job(data_file.clone(), dir.join(p), asked);
        let report =
            jobs::train::<Training>(&j, &indicatif::ProgressBar::hidden(), &Default::default())
                .unwrap();
        assert_eq!(report.before.name, metric, "{p}");
        let better = match problem {
            ProblemType::Regression => report.after.value < report.before.value,
            _ => report.after.value > report.before.value,
        };
        assert!(
            better,
            "{p}: {metric} {} before, {} after",
            report.before.value, report.after.value
        );
        let best = dir.join(p).join("best");
        let saved = read_safetensors(&best.join("adapter_model.safetensors")).unwrap();
        assert_eq!(
            saved["base_model.model.classifier.weight"].shape,
            [outputs, 384]
        );
        assert_eq!(
            peft_cli::tasks::read_problem_type(&best).unwrap(),
            Some(problem)
        );
        let held = held_out(&dir, &data_file, j.train.seed);
        let eval = || {
            jobs::eval::<Inference>(
                &minilm,
                Some(&best),
                &held,
                Task::SeqCls,
                ("text", "label"),
                32,
                &Default::default(),
            )
        };
        let m = eval().unwrap();
        assert_eq!(
            (m.name, m.value),
            (metric, report.after.value),
            "{p}: eval of best/"
        );
        if problem == ProblemType::Regression {
            // `peft eval --problem-type` overrides the run's: the values
            // read as labels are unknown ones.
            let columns = jobs::SeqClsColumns {
                text: "text",
                label: "label",
                problem_type: Some("multi_label_classification"),
            };
            let err = jobs::eval::<Inference>(
                &minilm,
                Some(&best),
                &held,
                Task::SeqCls,
                columns,
                32,
                &Default::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("unknown label"), "{err}");
            // The run's task.json is what eval goes by: naming another
            // problem there reads the values as labels.
            peft_cli::tasks::write_problem_type(&best, ProblemType::MultiLabel).unwrap();
            let err = eval().unwrap_err().to_string();
            assert!(err.contains("unknown label"), "{err}");
            // A PEFT-trained adapter has no task.json: one output is a
            // regression, as transformers infers it.
            std::fs::remove_file(best.join("task.json")).unwrap();
            let m = eval().unwrap();
            assert_eq!((m.name, m.value), (metric, report.after.value), "inferred");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Labels that do not fit the problem, and an unknown problem, are typed
/// errors naming what is wrong.
#[test]
fn labels_that_do_not_fit_the_problem_are_refused() {
    let dir = temp_dir("problem-type-refusals");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, rows: &[&str]| {
        let p = dir.join(name);
        std::fs::write(&p, rows.join("\n")).unwrap();
        p
    };
    let lists = write(
        "lists.jsonl",
        &[
            r#"{"text":"a","label":["x"]}"#,
            r#"{"text":"b","label":["y"]}"#,
        ],
    );
    let words = write(
        "words.jsonl",
        &[
            r#"{"text":"a","label":"good"}"#,
            r#"{"text":"b","label":"bad"}"#,
        ],
    );
    let ragged = write(
        "ragged.jsonl",
        &[
            r#"{"text":"a","label":[1,2]}"#,
            r#"{"text":"b","label":[3]}"#,
        ],
    );
    let ratings = write(
        "ratings.jsonl",
        &[r#"{"text":"a","label":2.5}"#, r#"{"text":"b","label":-1}"#],
    );
    let cases: [(&Path, Option<&str>, &str); 5] = [
        (&ratings, None, "pass --problem-type regression"),
        (
            &lists,
            Some("single_label_classification"),
            "a list of labels",
        ),
        (&words, Some("regression"), "`good` is not a finite number"),
        (&ragged, Some("regression"), "1 values, the outputs are 2"),
        (
            &words,
            Some("multi-label"),
            "unknown problem_type `multi-label`",
        ),
    ];
    for (file, asked, message) in cases {
        let j = job(file.to_path_buf(), dir.join("out"), asked);
        let err =
            jobs::train::<Training>(&j, &indicatif::ProgressBar::hidden(), &Default::default())
                .unwrap_err();
        assert!(
            matches!(err, PeftError::Checkpoint { .. } | PeftError::Config(_)),
            "{err:?}"
        );
        assert!(err.to_string().contains(message), "{asked:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
