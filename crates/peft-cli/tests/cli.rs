//! The `peft` command and its training library on the real models: a short
//! run writes its metrics, plot and a best checkpoint that `peft eval`
//! scores exactly as the run did; a NaN stops training with the step named;
//! every bad input is a non-zero exit with a message naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;

use peft_cli::jobs::{self, Task, TrainJob};
use peft_cli::tasks::Method;
use peft_cli::train::TrainConfig;
use peft_core::backends::CpuTrainBackend;
use peft_core::prompt_learning::{PromptEncoderType, PromptLearningConfig, PromptTuningInit};
use peft_core::{Ia3Config, LoraConfig, PeftError};
use peft_models::assets;

mod common;

use common::{held_out_file, job, sentiment_file, serial, temp};

type Inference = burn::backend::NdArray;

#[test]
fn a_short_run_writes_what_eval_reads_back() {
    let _turn = serial();
    let dir = temp("run");
    let data_file = sentiment_file(&dir, 48);
    let minilm = assets::fetch("minilm").unwrap();
    let train = TrainConfig {
        batch: 8,
        grad_accum: 2,
        max_steps: Some(2),
        eval_every: 1,
        ..Default::default()
    };
    let j = job(
        minilm.clone(),
        data_file.clone(),
        dir.join("out"),
        Method::slot(LoraConfig::new(4, 8.0, &["query", "value"])),
        train.clone(),
    );
    let report =
        jobs::train::<CpuTrainBackend>(&j, &indicatif::ProgressBar::hidden(), &Default::default())
            .unwrap();
    assert_eq!(report.steps, 2);
    assert_eq!(report.sizes, (36, 12));
    // LoRA r4 on query/value of 6 layers (4·384·2 per module) + the
    // adapter's copy of the head, 384·2 + 2.
    assert_eq!(report.params.trainable, 6 * 2 * (4 * 384 * 2) + 770);
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    assert!(metrics.lines().any(|l| l.contains("\"eval\"")), "{metrics}");
    assert!(std::fs::read_to_string(dir.join("out/loss.svg"))
        .unwrap()
        .starts_with("<svg"));
    let best = dir.join("out/best");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
    ] {
        assert!(best.join(f).is_file(), "best/{f} missing");
    }
    // PEFT's SEQ_CLS layout: the head is the adapter's copy under PEFT's
    // key (no file of our own), the encoder's keys are the task model's
    // (`bert.`), and the config names the task and the base.
    assert!(!best.join("head.safetensors").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    let base = std::fs::canonicalize(&minilm).unwrap();
    assert_eq!(
        config["base_model_name_or_path"],
        base.display().to_string()
    );
    let saved = peft_core::io::read_safetensors(&best.join("adapter_model.safetensors")).unwrap();
    assert_eq!(saved["base_model.model.classifier.weight"].shape, [2, 384]);
    assert_eq!(saved["base_model.model.classifier.bias"].shape, [2]);
    let query = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight";
    assert_eq!(saved[query].shape, [4, 384]);
    // `peft forward` gives the classifier's logits.
    let ids = dir.join("ids.json");
    std::fs::write(&ids, "[[101, 2023, 3185, 102]]").unwrap();
    let shape = jobs::forward::<Inference>(
        &minilm,
        Some(&best),
        &ids,
        &dir.join("logits.safetensors"),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(shape, vec![1, 2], "seq-cls LoRA logits");

    // The held-out split the run used, as a file: `peft eval` scores it as the run did.
    let held_file = held_out_file(&dir, &data_file, train.seed);
    let m = seq_cls_eval(&minilm, &best, &held_file);
    assert_eq!(
        m.value, report.after.value,
        "eval of best/ differs from the run's own evaluation"
    );
    assert!(jobs::inspect(&best).unwrap().contains("lora_A.weight"));

    // (IA)³, LoHa, LoKr, OFT, BOFT (two butterfly factors), VeRA, LN tuning (MiniLM's 13 LayerNorms), AdaLoRA, a bottleneck adapter, a prefix, a soft prompt and a P-tuning
    // LSTM (with encoder dropout) run through the same pipeline: the frozen
    // BERT, the method's parameters and the head (the PEFT methods' copy of
    // BERT's own, the bottleneck adapter's a mean-pooled head of its own).
    let mut lstm = PromptLearningConfig::p_tuning(3, PromptEncoderType::Lstm, 8);
    lstm.encoder_dropout = Some(0.1);
    for (name, method) in [
        ("ia3", Method::slot(Ia3Config::default())),
        ("loha", Method::slot(peft_lycoris::LohaConfig::default())),
        ("lokr", Method::slot(peft_lycoris::LokrConfig::default())),
        ("oft", Method::slot(peft_oft::OftConfig::default())),
        (
            "boft",
            Method::slot(peft_oft::BoftConfig {
                target_modules: None,
                ..peft_oft::BoftConfig::new(8, 2, &[])
            }),
        ),
        ("vera", Method::slot(peft_core::slot::VeraConfig::default())),
        (
            "ln_tuning",
            Method::slot(peft_core::slot::LnTuningConfig::new(&["LayerNorm"])),
        ),
        (
            "adalora",
            Method::slot(peft_lora::AdaLoraConfig {
                total_step: None,
                ..Default::default()
            }),
        ),
        ("adapter", Method::Adapter(peft_adapter::BnConfig::seq_bn())),
        (
            "prefix",
            Method::Prefix(PromptLearningConfig::prefix_tuning(3)),
        ),
        (
            "prompt",
            Method::Prompt(PromptLearningConfig::prompt_tuning(
                4,
                PromptTuningInit::SampleVocab,
            )),
        ),
        ("p-tuning", Method::Prompt(lstm)),
    ] {
        let out = dir.join(name);
        let train = TrainConfig {
            batch: 8,
            max_steps: Some(1),
            ..Default::default()
        };
        let r = jobs::train::<CpuTrainBackend>(
            &job(
                minilm.clone(),
                data_file.clone(),
                out.clone(),
                method,
                train,
            ),
            &indicatif::ProgressBar::hidden(),
            &Default::default(),
        )
        .unwrap();
        let m = seq_cls_eval(&minilm, &out.join("best"), &held_file);
        assert_eq!(m.value, r.after.value, "{name}");
        let virtual_params = match name {
            // 3 virtual tokens × 6 layers × (key + value) × 384.
            "prefix" => Some(3 * 6 * 2 * 384),
            "prompt" => Some(4 * 384),
            _ => None,
        };
        // Every PEFT method trains PEFT's SEQ_CLS adapter (the head's copy
        // in modules_to_save); the bottleneck adapter AdapterHub's head,
        // saved beside it. No run writes the old mean-pooled head.
        assert!(!out.join("best/head.safetensors").exists(), "{name}");
        let hub_head = out.join("best/head_config.json").is_file()
            && out.join("best/model_head.safetensors").is_file();
        assert_eq!(hub_head, name == "adapter", "{name}");
        if name == "adapter" {
            // AdapterHub's classification head (384·384 + 384 + 384·2 + 2)
            // trains with the adapter.
            let head = 384 * 384 + 384 + 384 * 2 + 2;
            assert!(r.params.trainable > head, "{name}: {:?}", r.params);
        }
        if virtual_params.is_some() || name == "adapter" {
            // `peft forward` returns the head's class logits.
            let ids = dir.join("ids.json");
            std::fs::write(&ids, "[[101, 2023, 3185, 102]]").unwrap();
            let shape = jobs::forward::<Inference>(
                &minilm,
                Some(&out.join("best")),
                &ids,
                &dir.join(format!("{name}.safetensors")),
                &Default::default(),
            )
            .unwrap();
            assert_eq!(shape, vec![1, 2], "{name}");
        }
        if let Some(n) = virtual_params {
            assert_eq!(
                r.params.trainable,
                n + 770,
                "{name}: only tokens and head train"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_nan_loss_stops_training_naming_the_step() {
    let _turn = serial();
    let dir = temp("nan");
    let data_file = sentiment_file(&dir, 24);
    let minilm = assets::fetch("minilm").unwrap();
    // An absurd learning rate without clipping blows the adapter up.
    let train = TrainConfig {
        lr: 1e30,
        clip_norm: None,
        warmup: 0.0,
        batch: 4,
        max_steps: Some(5),
        ..Default::default()
    };
    let j = job(
        minilm,
        data_file,
        dir.join("out"),
        Method::slot(LoraConfig::new(4, 8.0, &["query", "value"])),
        train,
    );
    let err =
        jobs::train::<CpuTrainBackend>(&j, &indicatif::ProgressBar::hidden(), &Default::default())
            .unwrap_err();
    assert!(matches!(err, PeftError::NonFinite(_)), "{err}");
    assert!(err.to_string().contains("at step"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn peft(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--backend` and `--device` reach the job: `peft forward` on the tiny
/// Llama gives the same logits on flex and ndarray (different kernels, so
/// not bit-identical, but within f32 rounding), a backend this build lacks
/// names its cargo feature, and a CPU device other than 0 is refused.
#[test]
fn every_backend_runs_the_same_job() {
    let dir = temp("backends");
    let model = peft_models::fixtures::fixtures_dir().join("llama");
    let ids = dir.join("ids.json");
    std::fs::write(&ids, "[[1, 5, 9, 2], [7, 3, 3, 8]]").unwrap();
    let mut outputs = Vec::new();
    for backend in ["flex", "ndarray"] {
        let out = dir.join(format!("{backend}.safetensors"));
        let (ok, err) = peft(&[
            "forward",
            "--backend",
            backend,
            "--device",
            "0",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            ids.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{backend}: {err}");
        let mut t = peft_core::io::read_safetensors(&out).unwrap();
        outputs.push(t.remove("output").unwrap());
    }
    peft_core::compare::assert_close(
        "flex vs ndarray logits",
        &outputs[0],
        &outputs[1],
        peft_core::compare::Tolerance::new(1e-5, 1e-6),
    );
    let forward = |extra: &[&str]| {
        let mut args = vec![
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            ids.to_str().unwrap(),
            "--out",
            "/dev/null",
        ];
        args.extend_from_slice(extra);
        peft(&args)
    };
    for (kind, feature) in [("cuda", "cuda"), ("wgpu", "wgpu")] {
        let compiled: peft_core::backends::BackendKind = kind.parse().unwrap();
        if !compiled.compiled() {
            let (ok, err) = forward(&["--backend", kind]);
            assert!(!ok);
            assert!(err.contains(&format!("--features {feature}")), "{err}");
        }
    }
    let (ok, err) = forward(&["--backend", "flex", "--device", "1"]);
    assert!(!ok);
    assert!(err.contains("--device 1"), "{err}");
    let (ok, err) = forward(&["--backend", "tpu"]);
    assert!(!ok);
    assert!(err.contains("ndarray, flex, wgpu, cuda"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The GPU path on WGPU (Mesa's lavapipe in CI): `peft forward --backend
/// wgpu` reproduces PEFT's logits on the fixtures (LoRA, DoRA with rsLoRA,
/// (IA)³), `peft train --backend wgpu` lowers the held-out perplexity of a
/// causal-LM LoRA run on the tiny GGUF Llama, and the adapter it saved
/// scores the same on WGPU as on Flex.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_runs_forward_train_and_eval() {
    let dir = temp("wgpu");
    let fixtures = peft_models::fixtures::fixtures_dir();
    for (arch, case) in [("llama", "lora"), ("llama", "dora_rslora"), ("gpt2", "ia3")] {
        let c = peft_models::fixtures::FixtureCase::open(arch, case);
        let ids = ids_file(&c, &dir);
        let out = dir.join(format!("{arch}-{case}.safetensors"));
        let (ok, err) = peft(&[
            "forward",
            "--backend",
            "wgpu",
            "--model",
            fixtures.join(arch).to_str().unwrap(),
            "--adapter",
            c.dir.to_str().unwrap(),
            "--ids",
            ids.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{arch}/{case}: {err}");
        let got = &peft_core::io::read_safetensors(&out).unwrap()["output"];
        peft_models::fixtures::assert_close(
            &format!("{arch}/{case} on wgpu"),
            got,
            c.want("logits_unmerged"),
        );
    }

    let model = fixtures.join("gguf/tiny_llama.gguf");
    let text = ishmael_file(&dir);
    let run = dir.join("run");
    let (ok, err) = peft(&[
        "train",
        "--backend",
        "wgpu",
        "--method",
        "lora",
        "--task",
        "causal-lm",
        "--model",
        model.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--r",
        "4",
        "--targets",
        "q_proj,v_proj,up_proj",
        "--lr",
        "0.01",
        "--batch",
        "3",
        "--epochs",
        "2",
        "--block-size",
        "8",
        "--held-out",
        "0.2",
    ]);
    assert!(ok, "peft train --backend wgpu: {err}");
    let perplexities = held_out_perplexities(&run);
    assert!(perplexities.len() >= 2, "{perplexities:?}");
    let (first, last) = (perplexities[0], perplexities[perplexities.len() - 1]);
    assert!(
        first.is_finite() && last.is_finite() && last < first,
        "held-out perplexity did not fall on wgpu: {perplexities:?}"
    );

    let best = run.join("best");
    fn perplexity<B: burn::tensor::backend::Backend>(
        model: &Path,
        adapter: &Path,
        text: &Path,
    ) -> f64 {
        jobs::eval::<B>(
            model,
            Some(adapter),
            text,
            Task::CausalLm,
            ("text", "label"),
            8,
            &Default::default(),
        )
        .unwrap()
        .value
    }
    let gpu = perplexity::<burn::backend::Wgpu>(&model, &best, &text);
    let cpu = perplexity::<burn::backend::Flex>(&model, &best, &text);
    assert!(
        gpu.is_finite() && (gpu - cpu).abs() <= 1e-4 * cpu.abs(),
        "perplexity of the wgpu-trained adapter: wgpu {gpu} vs flex {cpu}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_are_non_zero_exits_naming_the_problem() {
    let dir = temp("bad");
    let minilm = assets::fetch("minilm").unwrap();
    let m = minilm.to_str().unwrap();
    let data_file = sentiment_file(&dir, 8);
    let d = data_file.to_str().unwrap();
    let o = dir.join("out");
    let o = o.to_str().unwrap();
    let bad_row = dir.join("bad.jsonl");
    std::fs::write(
        &bad_row,
        "{\"text\":\"fine\",\"label\":\"positive\"}\n{\"text\":\"no label\"}\n",
    )
    .unwrap();
    let weightless = dir.join("weightless");
    std::fs::create_dir_all(&weightless).unwrap();
    std::fs::copy(minilm.join("config.json"), weightless.join("config.json")).unwrap();
    std::fs::copy(
        minilm.join("tokenizer.json"),
        weightless.join("tokenizer.json"),
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "train",
                "--method",
                "lora",
                "--model",
                "/nonexistent/model",
                "--data",
                d,
                "--out",
                o,
            ],
            "/nonexistent/model",
        ),
        (
            vec![
                "train", "--method", "lora", "--model", m, "--data", d, "--out", o, "--r", "0",
            ],
            "`r` must be a positive",
        ),
        (
            vec![
                "train",
                "--method",
                "lora",
                "--model",
                m,
                "--data",
                bad_row.to_str().unwrap(),
                "--out",
                o,
            ],
            "bad.jsonl: line 2",
        ),
        (
            vec![
                "train",
                "--method",
                "lora",
                "--model",
                weightless.to_str().unwrap(),
                "--data",
                d,
                "--out",
                o,
            ],
            "model.safetensors",
        ),
        (
            vec![
                "train",
                "--method",
                "prefix-magic",
                "--model",
                m,
                "--data",
                d,
                "--out",
                o,
            ],
            "prefix-magic",
        ),
        (
            vec![
                "train",
                "--method",
                "lora",
                "--model",
                m,
                "--data",
                d,
                "--out",
                o,
                "--targets",
                "nothing_here",
            ],
            "matched no module",
        ),
        (
            vec!["inspect", dir.to_str().unwrap()],
            "adapter_config.json",
        ),
        // A flag is honoured or refused, never dropped.
        (
            vec![
                "train", "--method", "ia3", "--model", m, "--data", d, "--out", o, "--r", "4",
            ],
            "--r does not apply to --method ia3",
        ),
        (
            vec![
                "train",
                "--method",
                "loha",
                "--model",
                m,
                "--data",
                d,
                "--out",
                o,
                "--feedforward",
                "down_proj",
            ],
            "--feedforward does not apply to --method loha",
        ),
        (
            vec![
                "train", "--method", "vera", "--model", m, "--data", d, "--out", o, "--alpha", "4",
            ],
            "--alpha does not apply to --method vera (it takes --r, --targets)",
        ),
        (
            vec!["train", "--resume", o, "--lr", "0.1"],
            "cannot be used with '--lr",
        ),
    ];
    for (args, needle) in cases {
        let (ok, stderr) = peft(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr does not name `{needle}`:\n{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Copies the folder `from` to `to`, recursively (symbolic links, such as
/// a run's `best` and `last`, copied as links).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        let kind = e.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A fixture case's `input_ids` as the JSON file `peft forward` reads.
/// `dir/text.txt`: the opening of *Moby-Dick*, a plain-text corpus for
/// causal-LM runs.
fn ishmael_file(dir: &Path) -> PathBuf {
    let path = dir.join("text.txt");
    std::fs::write(
        &path,
        "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money \
         in my purse, and nothing particular to interest me on shore, I thought I would sail about a \
         little and see the watery part of the world. It is a way I have of driving off the spleen, \
         and regulating the circulation. Whenever I find myself growing grim about the mouth.",
    )
    .unwrap();
    path
}

/// The adapter tensors of run `run`'s `last/` checkpoint under `dir`.
fn last_adapter(
    dir: &Path,
    run: &str,
) -> std::collections::HashMap<String, peft_core::io::HostTensor> {
    peft_core::io::read_safetensors(&dir.join(run).join("last/adapter_model.safetensors")).unwrap()
}

/// Asserts that two runs saved the same adapter tensors: each difference's
/// L2 norm within 1e-3 of the tensor's. Not entry by entry: Adam's first
/// steps move every entry by about the learning rate whatever the size of
/// its gradient, so f32 rounding in a gradient near 0 moves single entries
/// far more than the rest (measured: one entry of a dense vs kept-quantized
/// run 8e-4 of the tensor's largest value off, the norms 4e-5 apart).
fn assert_same_adapter(dir: &Path, a: &str, b: &str) {
    let (x, y) = (last_adapter(dir, a), last_adapter(dir, b));
    assert_eq!(x.len(), y.len(), "{a} vs {b}: tensors");
    let l2 = |v: &mut dyn Iterator<Item = f32>| v.map(|e| (e as f64).powi(2)).sum::<f64>().sqrt();
    for (k, want) in &x {
        let got = &y[k];
        assert_eq!(got.shape, want.shape, "{a} vs {b}: {k}");
        let all = || got.data.iter().chain(&want.data);
        assert!(all().all(|v| v.is_finite()), "{a} vs {b}: {k} not finite");
        let diff = l2(&mut want.data.iter().zip(&got.data).map(|(p, q)| p - q));
        let scale = l2(&mut want.data.iter().copied());
        assert!(
            diff <= 1e-3 * scale,
            "{a} vs {b}: {k} differs by ‖·‖₂ {diff:e} (the tensor's {scale:e})"
        );
    }
}

fn ids_file(c: &peft_models::fixtures::FixtureCase, dir: &Path) -> PathBuf {
    let t = c.want("input_ids");
    let ids: Vec<Vec<u32>> = t
        .data
        .chunks(t.shape[1])
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    let file = dir.join("ids.json");
    std::fs::write(&file, serde_json::to_string(&ids).unwrap()).unwrap();
    file
}

/// `peft forward` is the parity hook: on the tiny fixtures it reproduces
/// PEFT's logits with the adapter; `peft merge` writes a model whose plain
/// forward pass gives PEFT's merged logits (Llama: `[out, in]` weights;
/// GPT-2: `Conv1D` `[in, out]`; (IA)³ scaling the bias too; LoHa's
/// Hadamard delta with rank and alpha patterns; LoKr's Kronecker delta
/// with full and factored sides; OFT's shared-block rotation; VeRA's
/// sliced projections, on Llama and GPT-2's Conv1D; LN tuning's norms,
/// Llama's RMSNorm scales and GPT-2's LayerNorm scales and shifts).
#[test]
fn forward_and_merge_reproduce_peft() {
    let dir = temp("merge");
    let fixtures = peft_models::fixtures::fixtures_dir();
    for (arch, case) in [
        ("llama", "lora"),
        ("gpt2", "lora"),
        ("llama", "ia3"),
        ("gpt2", "ia3"),
        ("llama", "loha_custom"),
        ("llama", "lokr_custom"),
        ("llama", "oft_custom"),
        ("llama", "vera_custom"),
        ("gpt2", "vera"),
        ("llama", "ln_tuning"),
        ("gpt2", "ln_tuning"),
        // Rows of the embedding (the tied GPT-2 head follows them), and
        // copies of it (the tied Llama's head too, ensure_weight_tying).
        ("llama", "trainable_tokens"),
        ("llama", "lora_tokens"),
        ("gpt2", "lora_tokens"),
        ("llama", "lora_embed"),
        ("llama_tied", "lora_embed"),
    ] {
        let c = peft_models::fixtures::FixtureCase::open(arch, case);
        let ids_file = ids_file(&c, &dir);
        let out = dir.join(format!("{arch}-{case}.safetensors"));
        let model = fixtures.join(arch);
        jobs::forward::<Inference>(&model, Some(&c.dir), &ids_file, &out, &Default::default())
            .unwrap();
        let got = &peft_core::io::read_safetensors(&out).unwrap()["output"];
        peft_models::fixtures::assert_close(
            &format!("{arch}/{case} forward"),
            got,
            c.want("logits_unmerged"),
        );
        let shown = jobs::inspect(&c.dir).unwrap();
        let key = [
            "lora_A.weight",
            "ia3_l",
            "hada_w2_b",
            "lokr_w1",
            "oft_R",
            "vera_lambda_b",
            "ln_tuning_layers",
            "trainable_tokens_delta",
        ]
        .into_iter()
        .find(|k| shown.contains(k));
        assert!(
            key.is_some(),
            "{arch}/{case}: inspect shows no tensor: {shown}"
        );

        let merged = dir.join(format!("{arch}-{case}-merged"));
        let changed = jobs::merge::<Inference>(
            &model,
            &c.dir,
            &merged,
            jobs::MergeDtype::F32,
            &Default::default(),
        )
        .unwrap();
        assert!(!changed.is_empty());
        jobs::forward::<Inference>(&merged, None, &ids_file, &out, &Default::default()).unwrap();
        let got = &peft_core::io::read_safetensors(&out).unwrap()["output"];
        peft_models::fixtures::assert_close(
            &format!("{arch}/{case} merged"),
            got,
            c.want("logits_merged"),
        );
    }
    let (ok, stderr) = peft(&[
        "merge",
        "--model",
        fixtures.join("llama").to_str().unwrap(),
        "--adapter",
        fixtures.join("bert/bn_seq/a").to_str().unwrap(),
        "--out",
        dir.join("x").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("cannot be merged"), "{stderr}");
    // GPT-2's copy of `wte` leaves the tied head on the base table: one
    // tied checkpoint cannot hold both.
    let (ok, stderr) = peft(&[
        "merge",
        "--model",
        fixtures.join("gpt2").to_str().unwrap(),
        "--adapter",
        fixtures.join("gpt2/lora_embed").to_str().unwrap(),
        "--out",
        dir.join("y").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("transformer.wte"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A sharded checkpoint merges shard by shard (same files, index updated),
/// and `--dtype f16` / `bf16` writes half-precision weights whose forward
/// pass is PEFT's merged logits within half-precision rounding.
#[test]
fn merge_writes_shards_and_half_precision() {
    let dir = temp("merge-shards");
    let fixtures = peft_models::fixtures::fixtures_dir();
    // The tiny Llama as two shards and an index.
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(
        fixtures.join("llama/config.json"),
        sharded.join("config.json"),
    )
    .unwrap();
    let mut all: Vec<(String, peft_core::io::HostTensor)> =
        peft_core::io::read_safetensors(&fixtures.join("llama/model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut map = serde_json::Map::new();
    for (i, part) in all.chunks(all.len().div_ceil(2)).enumerate() {
        let name = format!("model-{:05}-of-00002.safetensors", i + 1);
        for (k, _) in part {
            map.insert(k.clone(), name.clone().into());
        }
        std::fs::write(
            sharded.join(&name),
            peft_core::io::serialize_safetensors(part, None),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let c = peft_models::fixtures::FixtureCase::open("llama", "lora");
    let ids_file = ids_file(&c, &dir);
    for (dtype, flag, tol) in [
        (jobs::MergeDtype::F32, "f32", 1e-5),
        (jobs::MergeDtype::F16, "f16", 2e-3),
        (jobs::MergeDtype::Bf16, "bf16", 2e-2),
    ] {
        let merged = dir.join(format!("merged-{flag}"));
        let (ok, stderr) = peft(&[
            "merge",
            "--model",
            sharded.to_str().unwrap(),
            "--adapter",
            c.dir.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
            "--dtype",
            flag,
        ]);
        assert!(ok, "{stderr}");
        let mut files: Vec<String> = std::fs::read_dir(&merged)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"
            ]
        );
        let bytes = std::fs::read(merged.join("model-00001-of-00002.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let want = match dtype {
            jobs::MergeDtype::F32 => safetensors::Dtype::F32,
            jobs::MergeDtype::F16 => safetensors::Dtype::F16,
            jobs::MergeDtype::Bf16 => safetensors::Dtype::BF16,
        };
        assert!(st.tensors().iter().all(|(_, v)| v.dtype() == want));
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(merged.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let shard_bytes: u64 = files
            .iter()
            .filter(|f| f.starts_with("model-"))
            .map(|f| {
                let b = std::fs::read(merged.join(f)).unwrap();
                let header = u64::from_le_bytes(b[..8].try_into().unwrap());
                b.len() as u64 - 8 - header
            })
            .sum();
        assert_eq!(index["metadata"]["total_size"], shard_bytes);
        let out = dir.join(format!("logits-{flag}.safetensors"));
        jobs::forward::<Inference>(&merged, None, &ids_file, &out, &Default::default()).unwrap();
        let got = &peft_core::io::read_safetensors(&out).unwrap()["output"];
        let d = peft_models::fixtures::max_diff(got, c.want("logits_merged"));
        assert!(
            d <= tol,
            "{flag}: merged logits differ by {d:e} (> {tol:e})"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A GGUF model (the tiny Llama as llama.cpp stores it, q/k permuted) runs
/// PEFT's adapter exactly, and merges into a Hugging Face folder whose plain
/// forward pass is PEFT's merged model and whose `tokenizer.json` is the
/// GGUF's tokenizer.
#[test]
fn merge_of_a_gguf_model_writes_a_hugging_face_folder() {
    let dir = temp("merge-gguf");
    let gguf = peft_models::fixtures::fixtures_dir().join("gguf/tiny_llama.gguf");
    let c = peft_models::fixtures::FixtureCase::open("llama", "lora");
    let ids_file = ids_file(&c, &dir);
    let out = dir.join("logits.safetensors");
    jobs::forward::<Inference>(&gguf, Some(&c.dir), &ids_file, &out, &Default::default()).unwrap();
    peft_models::fixtures::assert_close(
        "GGUF + adapter",
        &peft_core::io::read_safetensors(&out).unwrap()["output"],
        c.want("logits_unmerged"),
    );
    let merged = dir.join("merged");
    let changed = jobs::merge::<Inference>(
        &gguf,
        &c.dir,
        &merged,
        jobs::MergeDtype::F32,
        &Default::default(),
    )
    .unwrap();
    // The adapter's targets (down_proj, q_proj, v_proj) in both layers, and nothing else.
    let want: Vec<String> = (0..2)
        .flat_map(|i| {
            ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
                .map(|m| format!("model.layers.{i}.{m}.weight"))
        })
        .collect();
    assert_eq!(changed, want);
    jobs::forward::<Inference>(&merged, None, &ids_file, &out, &Default::default()).unwrap();
    peft_models::fixtures::assert_close(
        "GGUF merged into a Hugging Face folder",
        &peft_core::io::read_safetensors(&out).unwrap()["output"],
        c.want("logits_merged"),
    );
    // The folder carries the GGUF's tokenizer as tokenizer.json.
    let from_gguf = peft_models::tokenizer::Tokenizer::from_gguf(
        &peft_models::gguf::Gguf::open(&gguf).unwrap(),
    )
    .unwrap();
    let from_json =
        peft_models::tokenizer::Tokenizer::from_file(&merged.join("tokenizer.json")).unwrap();
    let text = "Call me Ishmael, said the whale.";
    assert_eq!(
        from_json.encode(text).unwrap(),
        from_gguf.encode(text).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Training 3 steps, stopping, and resuming to 6 gives bit for bit the
/// parameters, losses and evaluations of 6 steps at once (dropout on).
#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    check_resume(None);
}

/// The same with LoRA+'s three optimizers, whose states `last/` holds as
/// one file.
#[test]
fn a_resumed_loraplus_run_equals_an_uninterrupted_one() {
    check_resume(Some(4.0));
}

fn check_resume(loraplus_lr_ratio: Option<f64>) {
    let _turn = serial();
    let dir = temp(&format!("resume-{loraplus_lr_ratio:?}"));
    let data_file = sentiment_file(&dir, 40);
    let minilm = assets::fetch("minilm").unwrap();
    let lora = LoraConfig {
        lora_dropout: 0.1,
        ..LoraConfig::new(4, 8.0, &["query", "value"])
    };
    let train = TrainConfig {
        batch: 4,
        max_steps: Some(6),
        eval_every: 2,
        loraplus_lr_ratio,
        ..Default::default()
    };
    let whole = job(
        minilm.clone(),
        data_file.clone(),
        dir.join("whole"),
        Method::slot(lora.clone()),
        train.clone(),
    );
    let a = jobs::train::<CpuTrainBackend>(
        &whole,
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap();

    let halted = TrainConfig {
        stop_after: Some(3),
        ..train
    };
    let first = job(
        minilm,
        data_file,
        dir.join("parts"),
        Method::slot(lora),
        halted,
    );
    let part = jobs::train::<CpuTrainBackend>(
        &first,
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(part.steps, 3);
    // A copy of the halted run whose saved AdamW moments are overwritten:
    // resuming it must not give the uninterrupted run's adapter, or the
    // resume never read them.
    let corrupt = dir.join("corrupt");
    copy_tree(&dir.join("parts"), &corrupt);
    let moments = corrupt.join("last/optimizer.bin");
    let mut bytes = std::fs::read(&moments).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 256].fill(0x3f);
    std::fs::write(&moments, bytes).unwrap();

    let mut second = TrainJob::resume_from(&dir.join("parts")).unwrap();
    second.train.stop_after = None;
    let b = jobs::train::<CpuTrainBackend>(
        &second,
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(b.steps, 6);
    // The resumed process ran steps 4–6 only: its evaluations (every 2
    // steps) follow the first process's in the run's log, none repeated.
    let eval_steps = |run: &str| -> Vec<u64> {
        std::fs::read_to_string(dir.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("eval").is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(eval_steps("parts"), eval_steps("whole"));
    assert!(
        eval_steps("whole").ends_with(&[2, 4, 6]),
        "{:?}",
        eval_steps("whole")
    );
    let mut third = TrainJob::resume_from(&corrupt).unwrap();
    third.train.stop_after = None;
    third.out = corrupt.clone();
    let corrupted = jobs::train::<CpuTrainBackend>(
        &third,
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    );
    if corrupted.is_ok() {
        let x = peft_core::io::read_safetensors(&dir.join("whole/last/adapter_model.safetensors"))
            .unwrap();
        let y = peft_core::io::read_safetensors(&corrupt.join("last/adapter_model.safetensors"))
            .unwrap();
        assert!(
            x.iter().any(|(k, t)| y.get(k) != Some(t)),
            "overwritten optimizer moments changed nothing: the resume ignored them"
        );
    }
    assert_eq!(a.after.value, b.after.value);
    // The head's copy is in the adapter's file (PEFT's `modules_to_save`).
    let f = "adapter_model.safetensors";
    let x = peft_core::io::read_safetensors(&dir.join("whole/last").join(f)).unwrap();
    let y = peft_core::io::read_safetensors(&dir.join("parts/last").join(f)).unwrap();
    let same = x.len() == y.len() && x.iter().all(|(k, t)| y.get(k) == Some(t));
    assert!(
        same,
        "resumed parameters differ from the uninterrupted run's"
    );
    let state = |d: &str| {
        let t = std::fs::read_to_string(dir.join(d).join("last/trainer_state.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        (v["losses"].clone(), v["evals"].clone(), v["window"].clone())
    };
    assert_eq!(
        state("whole"),
        state("parts"),
        "losses and evaluations differ"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A projected prefix (Embedding → MLP) and a P-tuning prompt (MLP
/// encoder) on the real SmolLM2 resume bit for bit: `last/` keeps the
/// unfolded encoder beside PEFT's folded file.
#[test]
fn resumed_prefix_and_p_tuning_runs_equal_uninterrupted_ones() {
    let _turn = serial();
    let dir = temp("resume-encoders");
    let data_file = ishmael_file(&dir);
    let gguf = assets::fetch("smollm2")
        .unwrap()
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    for (name, config, encoder_key) in [
        (
            "prefix",
            PromptLearningConfig::prefix_tuning_projected(3, 16),
            "transform.0.weight",
        ),
        (
            "p-tuning",
            PromptLearningConfig::p_tuning(3, PromptEncoderType::Mlp, 16),
            "mlp_head.0.weight",
        ),
    ] {
        let method = || match name {
            "prefix" => Method::Prefix(config.clone()),
            _ => Method::Prompt(config.clone()),
        };
        let make = |out: &str, stop_after: Option<usize>| TrainJob {
            model: gguf.clone(),
            data: data_file.clone(),
            task: Task::CausalLm,
            method: method(),
            out: dir.join(name).join(out),
            train: TrainConfig {
                batch: 1,
                eval_every: 2,
                lr: 1e-3,
                stop_after,
                ..Default::default()
            },
            text_column: "text".into(),
            label_column: "label".into(),
            problem_type: None,
            held_out: 0.3,
            max_train: Some(3),
            block_size: 8,
            resume: false,
            quantize: None,
        };
        let hidden = indicatif::ProgressBar::hidden();
        let a = jobs::train::<CpuTrainBackend>(&make("whole", None), &hidden, &Default::default())
            .unwrap();
        let part =
            jobs::train::<CpuTrainBackend>(&make("parts", Some(2)), &hidden, &Default::default())
                .unwrap();
        assert_eq!(part.steps, 2, "{name}");
        let mut second = TrainJob::resume_from(&dir.join(name).join("parts")).unwrap();
        second.train.stop_after = None;
        let b = jobs::train::<CpuTrainBackend>(&second, &hidden, &Default::default()).unwrap();
        assert_eq!((a.steps, b.steps), (3, 3), "{name}: one epoch of 3 blocks");
        assert_eq!(a.after.value, b.after.value, "{name}");
        for f in [jobs::ENCODER_STATE_FILE, "adapter_model.safetensors"] {
            let read = |run: &str| {
                peft_core::io::read_safetensors(&dir.join(name).join(run).join("last").join(f))
                    .unwrap()
            };
            let (x, y) = (read("whole"), read("parts"));
            assert!(
                f != jobs::ENCODER_STATE_FILE || x.contains_key(encoder_key),
                "{name}"
            );
            let same = x.len() == y.len() && x.iter().all(|(k, t)| y.get(k) == Some(t));
            assert!(
                same,
                "{name}: {f} of the resumed run differs from the uninterrupted run's"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The child side of the crash test: writes checkpoints of increasing
/// version forever (each folder holds three files that must agree).
/// Ignored: not a test of its own, so a normal run does not count it as
/// one passed; `kill_child_after` runs it with `--ignored`.
#[test]
#[ignore = "child process of a_killed_writer_never_leaves_a_torn_checkpoint"]
fn checkpoint_writer_child() {
    let Ok(dir) = std::env::var("PEFT_CRASH_DIR") else {
        return; // only when the crash test runs this binary as its child
    };
    let run = peft_cli::train::RunDir::create(Path::new(&dir), true).unwrap();
    for version in 0u64.. {
        run.checkpoint("best", |d| {
            let body = vec![version as u8; 200_000];
            peft_core::io::write_atomic(&d.join("a.bin"), &body)?;
            peft_core::io::write_atomic(&d.join("b.bin"), &body)?;
            peft_core::io::write_atomic(&d.join("version"), version.to_string().as_bytes())
        })
        .unwrap();
    }
}

/// Runs this test binary's test `child` with `env` set to `dir`, and
/// SIGKILLs it after `ms` milliseconds.
fn kill_child_after(child: &str, env: &str, dir: &Path, ms: u64) {
    let mut process = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--ignored", "--nocapture"])
        .env(env, dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(ms));
    process.kill().unwrap(); // SIGKILL
    process.wait().unwrap();
}

/// SIGKILL at random moments while checkpoints are written: `best` always
/// resolves to one complete checkpoint.
#[test]
fn a_killed_writer_never_leaves_a_torn_checkpoint() {
    let dir = temp("crash");
    let mut rng = peft_core::rng::SplitMix64(7);
    let mut last_seen = 0u64;
    for round in 0..25 {
        kill_child_after(
            "checkpoint_writer_child",
            "PEFT_CRASH_DIR",
            &dir,
            30 + rng.next_u64() % 150,
        );
        let best = dir.join("best");
        if !best.exists() {
            assert_eq!(round, 0, "a checkpoint existed before and is gone");
            continue;
        }
        let read = |f: &str| std::fs::read(best.join(f)).unwrap();
        let version: u64 = String::from_utf8(read("version")).unwrap().parse().unwrap();
        let (a, b) = (read("a.bin"), read("b.bin"));
        assert_eq!(a.len(), 200_000, "round {round}: torn a.bin");
        assert!(
            a == b && a.iter().all(|&x| x == version as u8),
            "round {round}: files of different versions"
        );
        // Each child starts at version 0 again; what matters is completeness.
        last_seen = last_seen.max(version);
    }
    assert!(last_seen > 0, "the child never completed a checkpoint");
    // Reopening the run sweeps what the kills left half-written.
    let before = std::fs::read(dir.join("best/a.bin")).unwrap();
    peft_cli::train::RunDir::create(&dir, true).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let target = std::fs::read_link(dir.join("best")).unwrap();
    let want = vec![
        "best".to_string(),
        target.to_string_lossy().into_owned(),
        "metrics.jsonl".into(),
    ];
    assert_eq!(left, want, "after the sweep");
    assert_eq!(std::fs::read(dir.join("best/a.bin")).unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The child of the adapter-save crash test: saves a LoRA adapter into
/// `$PEFT_CRASH_ADAPTER_DIR` over and over, every factor filled with the
/// save's version number. Ignored, as `checkpoint_writer_child`.
#[test]
#[ignore = "child process of a_killed_adapter_save_never_loses_the_saved_adapter"]
fn adapter_writer_child() {
    use burn::module::Param;
    use peft_core::PeftModel;
    let Ok(dir) = std::env::var("PEFT_CRASH_ADAPTER_DIR") else {
        return; // only when the crash test runs this binary as its child
    };
    let dev = Default::default();
    let model = peft_models::fixtures::tiny_llama::<Inference>(&dev);
    let mut lora =
        peft_lora::LoraModel::new(model, LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])).unwrap();
    for version in 1u64.. {
        lora.model.visit_linears_mut(&mut |_, slot| {
            if let Some(e) = slot.entry_mut::<peft_core::LoraEntry<Inference>>("default") {
                let fill = |t: &burn::tensor::Tensor<Inference, 2>| {
                    Param::from_tensor(t.zeros_like().add_scalar(version as f32))
                };
                e.a = fill(&e.a.val());
                e.b = fill(&e.b.val());
            }
        });
        lora.save_pretrained(Path::new(&dir)).unwrap();
    }
}

/// SIGKILL at random moments while an adapter is saved over the previous
/// save: the folder always loads, and holds one complete save.
#[test]
fn a_killed_adapter_save_never_loses_the_saved_adapter() {
    use peft_core::PeftModel;
    let dir = temp("crash-adapter");
    let mut rng = peft_core::rng::SplitMix64(11);
    let mut versions = std::collections::BTreeSet::new();
    for round in 0..20 {
        kill_child_after(
            "adapter_writer_child",
            "PEFT_CRASH_ADAPTER_DIR",
            &dir,
            40 + rng.next_u64() % 200,
        );
        if !dir.join("adapter_config.json").exists() {
            assert!(
                versions.is_empty(),
                "round {round}: a saved adapter is gone"
            );
            continue;
        }
        let model = peft_models::fixtures::tiny_llama::<Inference>(&Default::default());
        let lora = peft_lora::LoraModel::from_pretrained(model, &dir)
            .unwrap_or_else(|e| panic!("round {round}: the saved adapter does not load: {e}"));
        let mut values = std::collections::BTreeSet::new();
        lora.model.visit_linears(&mut |_, slot| {
            for e in slot.entries_of::<peft_core::LoraEntry<Inference>>() {
                for t in [e.a.val(), e.b.val()] {
                    for v in t.into_data().to_vec::<f32>().unwrap() {
                        values.insert(v as u64);
                    }
                }
            }
        });
        assert_eq!(
            values.len(),
            1,
            "round {round}: a torn save: versions {values:?}"
        );
        versions.extend(values);
    }
    assert!(
        versions.len() > 1,
        "the child never completed two saves: {versions:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Causal-LM runs on the real SmolLM2-135M (GGUF) with every method: one
/// step each; `peft eval` of the best checkpoint reproduces the run's
/// held-out perplexity, and `peft generate` runs with it.
#[test]
fn causal_lm_runs_with_every_method() {
    let _turn = serial();
    let dir = temp("causal");
    let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money \
        in my purse, and nothing particular to interest me on shore, I thought I would sail about a little \
        and see the watery part of the world. It is a way I have of driving off the spleen and regulating \
        the circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly \
        November in my soul, then I account it high time to get to sea as soon as I can.";
    let data_file = dir.join("text.txt");
    std::fs::write(&data_file, text).unwrap();
    let gguf = assets::fetch("smollm2")
        .unwrap()
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let prompt = peft_core::prompt_learning::PromptLearningConfig::prompt_tuning(
        4,
        peft_core::prompt_learning::PromptTuningInit::SampleVocab,
    );
    for method in [
        Method::slot(LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])),
        Method::slot(Ia3Config::default()),
        Method::slot(peft_lycoris::LohaConfig::new(2, 4.0, &["q_proj", "v_proj"])),
        Method::slot(peft_lycoris::LokrConfig::new(2, 4.0, &["q_proj", "v_proj"])),
        Method::slot(peft_oft::OftConfig::new(32, &["q_proj", "v_proj"])),
        Method::slot(peft_core::slot::VeraConfig::new(16, &["q_proj", "v_proj"])),
        Method::Adapter(peft_adapter::BnConfig::seq_bn()),
        Method::Prefix(peft_core::prompt_learning::PromptLearningConfig::prefix_tuning(4)),
        Method::Prompt(prompt.clone()),
    ] {
        let name = method.name();
        let out = dir.join(name);
        let j = TrainJob {
            model: gguf.clone(),
            data: data_file.clone(),
            task: Task::CausalLm,
            method,
            out: out.clone(),
            train: TrainConfig {
                batch: 2,
                max_steps: Some(1),
                lr: 1e-3,
                ..Default::default()
            },
            text_column: "text".into(),
            label_column: "label".into(),
            problem_type: None,
            held_out: 0.3,
            max_train: Some(2),
            block_size: 16,
            resume: false,
            quantize: None,
        };
        let r = jobs::train::<CpuTrainBackend>(
            &j,
            &indicatif::ProgressBar::hidden(),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(r.steps, 1, "{name}");
        assert!(
            r.before.value > 1.0 && r.before.value < 1e4,
            "{name}: perplexity {}",
            r.before.value
        );
        let best = out.join("best");
        let m = jobs::eval::<Inference>(
            &gguf,
            Some(&best),
            &data_file,
            Task::CausalLm,
            ("text", "label"),
            16,
            &Default::default(),
        )
        .unwrap();
        assert!(
            m.value.is_finite() && m.value > 1.0,
            "{name}: eval perplexity {}",
            m.value
        );
        let mut sampler = peft_core::generate::Sampler::Greedy;
        let g = jobs::generate::<Inference>(
            &gguf,
            Some(&best),
            "Call me",
            3,
            &mut sampler,
            &Default::default(),
        )
        .unwrap();
        assert!(!g.is_empty(), "{name}: nothing generated");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--quantize gguf` on a GGUF Llama whose matrices are Q8_0, Q4_0, Q4_1,
/// Q4_K, Q6_K, F16 and BF16 blocks (`fixtures/gguf/quant_llama.gguf`): the
/// run keeps every matrix and the embedding in its blocks (the report counts
/// them; the f32 run of the same file keeps none), and layer-by-layer
/// training with gradient accumulation logs the losses of the f32 run and
/// saves the same adapter (the kept blocks dequantize to the f32 load's
/// weights); the choice is recorded and a resumed run keeps it.
/// `--quantize nf4` trains too, and BERT refuses `gguf`.
#[test]
fn quantized_base_runs_match_the_f32_run() {
    let _turn = serial();
    let dir = temp("qlora");
    let data_file = ishmael_file(&dir);
    let gguf = peft_models::fixtures::fixtures_dir().join("gguf/quant_llama.gguf");
    let make = |out: &str, quantize: Option<jobs::Quantize>| TrainJob {
        model: gguf.clone(),
        data: data_file.clone(),
        task: Task::CausalLm,
        method: Method::slot(LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"])),
        out: dir.join(out),
        train: TrainConfig {
            batch: 1,
            grad_accum: 2,
            lr: 1e-2,
            ..Default::default()
        },
        text_column: "text".into(),
        label_column: "label".into(),
        problem_type: None,
        held_out: 0.25,
        max_train: Some(4),
        block_size: 8,
        resume: false,
        quantize,
    };
    let hidden = indicatif::ProgressBar::hidden();
    let dense =
        jobs::train::<CpuTrainBackend>(&make("f32", None), &hidden, &Default::default()).unwrap();
    let kept = jobs::train::<CpuTrainBackend>(
        &make("gguf", Some(jobs::Quantize::Gguf)),
        &hidden,
        &Default::default(),
    )
    .unwrap();
    assert_eq!((dense.steps, kept.steps), (2, 2));
    assert_eq!(dense.params, kept.params);
    // 2 layers × (4 attention + 3 MLP matrices) and the 64 × 256 embedding
    // that the tied head shares.
    let matrices = 2 * (256 * 256 * 2 + 128 * 256 * 2 + 256 * 256 * 3) + 64 * 256;
    assert_eq!(
        (dense.quantized_params, kept.quantized_params),
        (0, matrices)
    );
    let losses = |run: &str| -> Vec<f64> {
        std::fs::read_to_string(dir.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let (a, b) = (losses("f32"), losses("gguf"));
    assert!(!a.is_empty() && a.len() == b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "losses {a:?} vs {b:?}");
    }
    assert!((dense.after.value - kept.after.value).abs() < 1e-4 * dense.after.value);
    assert_same_adapter(&dir, "f32", "gguf");
    let resumed = TrainJob::resume_from(&dir.join("gguf")).unwrap();
    assert_eq!(resumed.quantize, Some(jobs::Quantize::Gguf));

    let nf4 = jobs::train::<CpuTrainBackend>(
        &make("nf4", Some(jobs::Quantize::Nf4)),
        &hidden,
        &Default::default(),
    )
    .unwrap();
    assert!(nf4.after.value.is_finite() && nf4.after.value < nf4.before.value);

    let minilm = assets::fetch("minilm").unwrap();
    let mut bert = make("bert", Some(jobs::Quantize::Gguf));
    bert.model = minilm;
    bert.task = Task::SeqCls;
    bert.data = sentiment_file(&dir, 8);
    let err = jobs::train::<CpuTrainBackend>(&bert, &hidden, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("nf4"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// LoRA r 4 on q/v/up of the tiny GGUF Llama, causal LM on the Ishmael
/// text (7 blocks of 8 tokens in batches of 3, so one odd last batch), run
/// folder `dir/out`: the job the data-parallel tests split.
fn tiny_lora_job(
    dir: &Path,
    out: &str,
    devices: usize,
    quantize: Option<jobs::Quantize>,
) -> TrainJob {
    TrainJob {
        model: peft_models::fixtures::fixtures_dir().join("gguf/tiny_llama.gguf"),
        data: ishmael_file(dir),
        task: Task::CausalLm,
        method: Method::slot(LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "up_proj"])),
        out: dir.join(out),
        train: TrainConfig {
            batch: 3,
            lr: 1e-2,
            devices,
            ..Default::default()
        },
        text_column: "text".into(),
        label_column: "label".into(),
        problem_type: None,
        held_out: 0.2,
        max_train: Some(7),
        block_size: 8,
        resume: false,
        quantize,
    }
}

/// `--patience 2`: a run whose held-out loss stops improving ends two
/// evaluations after its best. A learning rate of 1e-30 leaves the adapter
/// (B = 0) where it started, so every evaluation after the first equals
/// it; the same run without patience takes all its steps.
#[test]
fn patience_stops_a_run_that_no_longer_improves() {
    let _turn = serial();
    let dir = temp("patience");
    let run = |out: &str, patience: Option<usize>| {
        let mut j = tiny_lora_job(&dir, out, 1, None);
        j.train = TrainConfig {
            lr: 1e-30,
            epochs: 4,
            eval_every: 1,
            max_steps: Some(8),
            patience,
            ..j.train
        };
        jobs::train::<CpuTrainBackend>(&j, &indicatif::ProgressBar::hidden(), &Default::default())
            .unwrap()
    };
    let patient = run("patient", Some(2));
    assert!(patient.stopped_early);
    // Evaluations after steps 1 (the best), 2 and 3 (no better): stop.
    assert_eq!(patient.steps, 3);
    let log = std::fs::read_to_string(dir.join("patient/metrics.jsonl")).unwrap();
    assert_eq!(log.matches("\"eval\"").count(), 3, "{log}");
    let full = run("full", None);
    assert!(!full.stopped_early);
    assert_eq!(full.steps, 8);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--devices 2`: each micro-batch split across two replicas, peers of
/// Burn's collective, whose gradients an all-reduce sums: the run logs the
/// losses and saves the adapter of the one-device run (an odd micro-batch
/// included, and with a quantized base trained layer by layer).
#[test]
fn data_parallel_run_equals_one_device() {
    let _turn = serial();
    let dir = temp("ddp");
    let make = |out: &str, devices: usize, quantize: Option<jobs::Quantize>| {
        tiny_lora_job(&dir, out, devices, quantize)
    };
    let hidden = indicatif::ProgressBar::hidden();
    for (one, two, quantize) in [
        ("one", "two", None),
        ("one-q", "two-q", Some(jobs::Quantize::Gguf)),
    ] {
        let a =
            jobs::train::<CpuTrainBackend>(&make(one, 1, quantize), &hidden, &Default::default())
                .unwrap();
        let b =
            jobs::train::<CpuTrainBackend>(&make(two, 2, quantize), &hidden, &Default::default())
                .unwrap();
        assert_eq!((a.steps, b.steps), (3, 3), "7 blocks in batches of 3");
        assert!(
            (a.after.value - b.after.value).abs() < 1e-4 * a.after.value,
            "{} vs {}",
            a.after.value,
            b.after.value
        );
        assert_same_adapter(&dir, one, two);
        // Not a one-device run under another name: the two replicas ran
        // their own shards (batches 3, 3, 1 cut into [2, 1], [2, 1], [1, 0]
        // rows) on different data (different losses), and the logged
        // training losses are the one-device run's.
        let train_lines = |run: &str| -> Vec<serde_json::Value> {
            std::fs::read_to_string(dir.join(run).join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v.get("loss").is_some())
                .collect()
        };
        let (lines_one, lines_two) = (train_lines(one), train_lines(two));
        assert!(!lines_two.is_empty());
        assert_eq!(lines_one.len(), lines_two.len());
        for (a, b) in lines_one.iter().zip(&lines_two) {
            assert!(a.get("replicas").is_none(), "{a}");
            let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            assert!((la - lb).abs() <= 1e-5 * la.abs(), "loss {la} vs {lb}");
        }
        let replicas = lines_two.last().unwrap()["replicas"].as_array().unwrap();
        let rows: Vec<u64> = replicas
            .iter()
            .map(|r| r["rows"].as_u64().unwrap())
            .collect();
        assert_eq!(rows, [5, 2], "{replicas:?}");
        let losses: Vec<f64> = replicas
            .iter()
            .map(|r| r["loss"].as_f64().unwrap())
            .collect();
        assert!(
            losses.iter().all(|l| l.is_finite()) && (losses[0] - losses[1]).abs() > 1e-4,
            "replicas on different shards report different losses: {losses:?}"
        );
    }
    let mut bad = make("bad", 4, None);
    bad.train.batch = 2;
    let e = jobs::train::<CpuTrainBackend>(&bad, &hidden, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("devices"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Kills the processes it holds when dropped (a failed test leaves none).
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Several machines, as two `peft train --nodes 2` processes on this one
/// joined by `peft orchestrator` (Burn's global collective over
/// WebSockets): each node computes its shard of every micro-batch (an odd
/// last batch included), and both save the adapter of the one-process run.
#[test]
fn two_nodes_train_as_one_process() {
    let _turn = serial();
    let dir = temp("nodes");
    let one = tiny_lora_job(&dir, "one", 1, None);
    let (gguf, data_file) = (one.model.clone(), one.data.clone());
    let a = jobs::train::<CpuTrainBackend>(
        &one,
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(a.steps, 3, "7 blocks in batches of 3");

    let port = free_port();
    let mut children = Children(vec![Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["orchestrator", "--port", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()]);
    let orchestrator = format!("ws://127.0.0.1:{port}");
    let nodes: Vec<usize> = (0..2)
        .map(|rank| {
            let out = dir.join(format!("node{rank}"));
            let args: Vec<String> = [
                "train",
                "--method",
                "lora",
                "--task",
                "causal-lm",
                "--r",
                "4",
                "--alpha",
                "8",
                "--targets",
                "q_proj,v_proj,up_proj",
                "--batch",
                "3",
                "--lr",
                "0.01",
                "--held-out",
                "0.2",
                "--max-train",
                "7",
                "--block-size",
                "8",
                "--nodes",
                "2",
                "--orchestrator",
                &orchestrator,
            ]
            .iter()
            .map(|a| a.to_string())
            .chain([
                "--model".into(),
                gguf.display().to_string(),
                "--data".into(),
                data_file.display().to_string(),
                "--out".into(),
                out.display().to_string(),
                "--node-rank".into(),
                rank.to_string(),
                "--node-address".into(),
                format!("ws://127.0.0.1:{}", free_port()),
            ])
            .collect();
            children.0.push(
                Command::new(env!("CARGO_BIN_EXE_peft"))
                    .args(&args)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
            children.0.len() - 1
        })
        .collect();
    // A node that never hears from the other would wait forever: give up
    // after five minutes (the children are killed on the way out).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    for &i in &nodes {
        loop {
            if let Some(status) = children.0[i].try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                children.0[i]
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert!(status.success(), "node {i}: {err}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the nodes did not finish in 5 minutes"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    assert_eq!(
        last_adapter(&dir, "node0"),
        last_adapter(&dir, "node1"),
        "the nodes hold different adapters"
    );
    assert_same_adapter(&dir, "one", "node0");
    // Both nodes logged the job's loss (all-reduced), the one-process run's.
    let losses = |run: &str| {
        std::fs::read_to_string(dir.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
            .collect::<Vec<f64>>()
    };
    let (l1, l0) = (losses("one"), losses("node0"));
    assert_eq!(l1.len(), l0.len());
    for (p, q) in l1.iter().zip(&l0) {
        assert!((p - q).abs() < 1e-4 * p.abs(), "loss {p} vs {q}");
    }
    // Each node ran its own shard of every batch (3, 3, 1 rows cut into
    // [2, 1], [2, 1], [1, 0]): not two copies of a one-node run.
    let local = |run: &str| {
        let text = std::fs::read_to_string(dir.join(run).join("metrics.jsonl")).unwrap();
        let last = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v.get("replicas").is_some())
            .unwrap_or_else(|| panic!("{run} logged no replicas:\n{text}"));
        let r = &last["replicas"][0];
        (r["rows"].as_u64().unwrap(), r["loss"].as_f64().unwrap())
    };
    let ((rows0, loss0), (rows1, loss1)) = (local("node0"), local("node1"));
    assert_eq!((rows0, rows1), (5, 2));
    assert!((loss0 - loss1).abs() > 1e-4, "{loss0} vs {loss1}");
    drop(children);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sequence classification on a decoder (`LlamaForSequenceClassification`
/// over the tiny GGUF Llama): a LoRA run writes PEFT's SEQ_CLS adapter (the
/// `score` head's copy in `modules_to_save`), `peft eval` scores its best
/// checkpoint as the run did; prefix and prompt tuning do the same in
/// PEFT's prompt-learning layout; a bottleneck adapter, which could not
/// keep the head, is refused naming the methods that do.
#[test]
fn a_decoder_run_writes_a_seq_cls_adapter_eval_reads_back() {
    let _turn = serial();
    let dir = temp("decoder-seq-cls");
    let data_file = sentiment_file(&dir, 24);
    let model = peft_models::fixtures::fixtures_dir().join("gguf/tiny_llama.gguf");
    let train = TrainConfig {
        batch: 4,
        max_steps: Some(3),
        eval_every: 1,
        lr: 1e-2,
        ..Default::default()
    };
    let lora = Method::slot(LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]));
    let out = dir.join("lora");
    let j = job(
        model.clone(),
        data_file.clone(),
        out.clone(),
        lora,
        train.clone(),
    );
    let report =
        jobs::train::<CpuTrainBackend>(&j, &indicatif::ProgressBar::hidden(), &Default::default())
            .unwrap();
    assert_eq!(report.steps, 3);
    let best = out.join("best");
    let held_file = held_out_file(&dir, &data_file, train.seed);
    let saved = seq_cls_best_as_run(&model, &best, &held_file, &report, "lora");
    let score = &saved["base_model.model.score.weight"];
    assert_eq!(score.shape[0], 2, "two classes");
    assert!(saved.keys().any(|k| k.ends_with("q_proj.lora_A.weight")));

    // Merged onto the GGUF base: the LlamaForSequenceClassification the
    // run trained, whose logits are the adapter's.
    let merged = dir.join("merged");
    let changed = jobs::merge::<Inference>(
        &model,
        &best,
        &merged,
        jobs::MergeDtype::F32,
        &Default::default(),
    )
    .unwrap();
    assert!(changed.iter().any(|k| k == "score.weight"), "{changed:?}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(
        config["id2label"]["1"], "positive",
        "labels.json names the classes"
    );
    let ids = dir.join("ids.json");
    std::fs::write(&ids, "[[5, 9, 3, 12, 7]]").unwrap();
    let logits = |model: &Path, adapter: Option<&Path>, name: &str| {
        let out = dir.join(name);
        jobs::forward::<Inference>(model, adapter, &ids, &out, &Default::default()).unwrap();
        peft_core::io::read_safetensors(&out)
            .unwrap()
            .remove("output")
            .unwrap()
    };
    let want = logits(&model, Some(&best), "adapted.safetensors");
    assert_eq!(want.shape, [1, 2]);
    peft_models::fixtures::assert_close(
        "merged",
        &logits(&merged, None, "merged.safetensors"),
        &want,
    );
    // The GGUF names no padding token for the model: the merged config
    // names the tokenizer's, so that more than one row classifies (a
    // config without one is refused for batches, in transformers and here).
    let pad = peft_cli::tasks::tokenizer_of(&model).unwrap().pad_id();
    assert_eq!(config["pad_token_id"], serde_json::json!(pad));
    std::fs::write(&ids, "[[5, 9, 3, 12, 7], [4, 8, 2, 11, 6]]").unwrap();
    let two = logits(&merged, None, "two.safetensors");
    assert_eq!(two.shape, [2, 2]);
    let first = peft_core::io::HostTensor {
        shape: vec![1, 2],
        data: two.data[..2].to_vec(),
    };
    peft_models::fixtures::assert_close("the first row in a batch of two", &first, &want);

    // Prompt learning trains PEFT's prompt-learning SEQ_CLS layout: the
    // virtual tokens and the copy of `score` under `base_model.score.*`.
    for (name, method) in [
        (
            "prefix",
            Method::Prefix(PromptLearningConfig::prefix_tuning(3)),
        ),
        (
            "prompt",
            Method::Prompt(PromptLearningConfig::prompt_tuning(
                4,
                PromptTuningInit::Random,
            )),
        ),
    ] {
        let out = dir.join(name);
        let j = job(
            model.clone(),
            data_file.clone(),
            out.clone(),
            method,
            train.clone(),
        );
        let report = jobs::train::<CpuTrainBackend>(
            &j,
            &indicatif::ProgressBar::hidden(),
            &Default::default(),
        )
        .unwrap();
        let best = out.join("best");
        let saved = seq_cls_best_as_run(&model, &best, &held_file, &report, name);
        assert_eq!(saved["base_model.score.weight"].shape[0], 2, "{name}");
        std::fs::write(&ids, "[[5, 9, 3, 12, 7]]").unwrap();
        let got = logits(&model, Some(&best), &format!("{name}.safetensors"));
        assert_eq!(got.shape, [1, 2], "{name}");
    }
    let bottleneck = Method::Adapter(peft_adapter::BnConfig::seq_bn());
    let j = job(model, data_file, dir.join("adapter"), bottleneck, train);
    let err =
        jobs::train::<CpuTrainBackend>(&j, &indicatif::ProgressBar::hidden(), &Default::default())
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("PEFT method") && err.contains("adapter"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `peft eval --task seq-cls` of `model` with the adapter folder `best` on
/// the JSONL `held_file` (`text` / `label` columns).
fn seq_cls_eval(model: &Path, best: &Path, held_file: &Path) -> peft_cli::train::Metric {
    jobs::eval::<Inference>(
        model,
        Some(best),
        held_file,
        Task::SeqCls,
        ("text", "label"),
        32,
        &Default::default(),
    )
    .unwrap()
}

/// Checks a seq-cls run's `best/` is PEFT's `SEQ_CLS` adapter and that
/// `peft eval` on the held-out file scores it as the run did; its tensors.
fn seq_cls_best_as_run(
    model: &Path,
    best: &Path,
    held_file: &Path,
    report: &jobs::Report,
    name: &str,
) -> std::collections::HashMap<String, peft_core::io::HostTensor> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS", "{name}");
    let m = seq_cls_eval(model, best, held_file);
    assert_eq!(
        m.value, report.after.value,
        "{name}: eval of best/ differs from the run's"
    );
    peft_core::io::read_safetensors(&best.join("adapter_model.safetensors")).unwrap()
}

/// The held-out perplexities a causal-LM run logged, in order.
fn held_out_perplexities(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["eval"]["perplexity"].as_f64()
        })
        .collect()
}

/// `peft train --method trainable_tokens --tokens ...` on a causal LM
/// retrains only the listed rows of the embedding: the best checkpoint is
/// PEFT's `TRAINABLE_TOKENS` folder holding just those rows, and the
/// held-out perplexity falls.
#[test]
fn trainable_tokens_train_from_the_command_line() {
    let dir = temp("trainable-tokens");
    let model = peft_models::fixtures::fixtures_dir().join("gguf/tiny_llama.gguf");
    let text = ishmael_file(&dir);
    let run = dir.join("run");
    let tokens: Vec<String> = (0..48).map(|t| t.to_string()).collect();
    let (ok, err) = peft(&[
        "train",
        "--method",
        "trainable_tokens",
        "--tokens",
        &tokens.join(","),
        "--task",
        "causal-lm",
        "--model",
        model.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--lr",
        "0.05",
        "--batch",
        "3",
        "--epochs",
        "3",
        "--block-size",
        "8",
        "--held-out",
        "0.2",
    ]);
    assert!(ok, "{err}");
    let best = run.join("best");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "TRAINABLE_TOKENS");
    let saved = peft_core::io::read_safetensors(&best.join("adapter_model.safetensors")).unwrap();
    let keys: Vec<&String> = saved.keys().collect();
    assert_eq!(
        keys,
        ["base_model.model.model.embed_tokens.trainable_tokens_delta"]
    );
    assert_eq!(saved[keys[0]].shape, [48, 16]);
    let perplexities = held_out_perplexities(&run);
    let (first, last) = (perplexities[0], perplexities[perplexities.len() - 1]);
    assert!(
        perplexities.len() >= 2 && last.is_finite() && last < first,
        "held-out perplexity did not fall: {perplexities:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
