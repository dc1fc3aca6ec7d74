//! Benchmark programs. Run through `cargo xtask bench`, which builds this
//! binary with the right backend feature and writes the report.
//!
//! Usage: `peft-bench --backend ndarray|flex|wgpu|cuda [--suite forward|rank|train|mixed|prompt|adapter|minilm|smollm2|qlora|serve|serve_soak|decode|epoch|ops|cpu_backends]... [--quick]`
//! Prints one JSON object per measured figure on stdout.
//!
//! Every comparison is measured in one run with the variants interleaved
//! (A B C A B C …), so machine noise hits them alike; ratios are of medians.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{Module, ModuleMapper, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_adapter::{AdapterModel, BnConfig, Ia3Model};
use peft_core::config::{InitLoraWeights, TargetModules};
use peft_core::generate::{CausalLm, Sampler};
use peft_core::loss::causal_lm_loss_after_prompt;
use peft_core::prompt_learning::{PromptLearningConfig, PromptTuningInit};
use peft_core::{Ia3Config, LoraConfig};
use peft_lora::LoraModel;
use peft_models::llama::{Llama, LlamaConfig};
use peft_models::loss::causal_lm_loss;
use peft_prefix::{PrefixEncoder, PrefixTuningModel};
use peft_prompt::{PromptEncoder, PromptTuningModel};
use serde_json::json;

use peft_core::backends::BackendChoice;

mod decode;
mod epoch;
mod ops;
mod qlora;
mod real;
mod serve;

struct Opts {
    quick: bool,
    suites: Vec<String>,
    backend: String,
    /// `--device N`: the device index on the backend (default: its default device).
    device: Option<usize>,
    memory_probe: Option<String>,
}

/// A SmolLM2-135M-shaped layer stack (hidden 576, 9/3 heads, SwiGLU 1536),
/// with fewer layers and a small vocabulary so the layers dominate.
fn stack_config(quick: bool) -> LlamaConfig {
    LlamaConfig::new(256, 576, 1536, if quick { 2 } else { 4 }, 9, 3)
}

fn batch_ids<B: Backend>(rows: usize, len: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = (0..rows * len).map(|i| ((i * 7919) % 251) as i64).collect();
    Tensor::from_data(TensorData::new(v, [rows, len]), device)
}

fn lora(r: usize, targets: &[&str], dora: bool) -> LoraConfig {
    LoraConfig {
        use_dora: dora,
        // Non-zero B so unmerged adapters do real work (as after training).
        init_lora_weights: InitLoraWeights::Bool(false),
        ..LoraConfig::new(r, 2.0 * r as f64, targets)
    }
}

fn all_linear(r: usize) -> LoraConfig {
    LoraConfig {
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        ..lora(r, &[], false)
    }
}

fn sync<B: Backend>(t: Tensor<B, 3>) {
    // Reading one value forces every lazy backend to finish the graph.
    let _ = t.slice([0..1, 0..1, 0..1]).into_data();
}

fn stats(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1],
    )
}

fn emit(
    o: &Opts,
    suite: &str,
    name: &str,
    samples: &mut [f64],
    base: Option<f64>,
    extra: serde_json::Value,
) -> f64 {
    let (median, min, max) = stats(samples);
    let mut v = json!({
        "suite": suite, "name": name, "backend": o.backend, "runs": samples.len(),
        "median_ms": median * 1e3, "min_ms": min * 1e3, "max_ms": max * 1e3,
    });
    if let Some(b) = base {
        v["ratio_vs_baseline"] = json!(median / b);
    }
    if let serde_json::Value::Object(m) = extra {
        for (k, x) in m {
            v[k] = x;
        }
    }
    println!("{v}");
    median
}

/// Runs each closure `runs` times, interleaved; returns seconds per closure.
fn interleaved(runs: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    for f in fs.iter_mut() {
        f(); // warm-up
    }
    let mut out = vec![Vec::with_capacity(runs); fs.len()];
    for _ in 0..runs {
        for (i, f) in fs.iter_mut().enumerate() {
            let t = Instant::now();
            f();
            out[i].push(t.elapsed().as_secs_f64());
        }
    }
    out
}

fn forward_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let ids = batch_ids::<B>(rows, len, device);
    B::seed(device, 1);
    let base = cfg.init::<B>(device).unwrap();
    let qv = LoraModel::new(base.clone(), lora(8, &["q_proj", "v_proj"], false)).unwrap();
    let all = LoraModel::new(base.clone(), all_linear(8)).unwrap();
    let mut merged = all.clone();
    merged.merge_adapter().unwrap();
    let dora = LoraModel::new(base.clone(), lora(8, &["q_proj", "v_proj"], true)).unwrap();
    let run = |m: &Llama<B>| sync(m.forward(ids.clone(), None));
    let runs = if o.quick { 5 } else { 15 };
    let mut t = interleaved(
        runs,
        &mut [
            &mut || run(&base),
            &mut || run(&qv.model),
            &mut || run(&all.model),
            &mut || run(&merged.model),
            &mut || run(&dora.model),
        ],
    );
    let info = json!({"tokens": rows * len, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "rank": 8});
    let b = emit(o, "forward", "base", &mut t[0], None, info.clone());
    emit(
        o,
        "forward",
        "lora_r8_q_v_unmerged",
        &mut t[1],
        Some(b),
        info.clone(),
    );
    emit(
        o,
        "forward",
        "lora_r8_all_linear_unmerged",
        &mut t[2],
        Some(b),
        info.clone(),
    );
    emit(
        o,
        "forward",
        "lora_r8_all_linear_merged",
        &mut t[3],
        Some(b),
        info.clone(),
    );
    emit(
        o,
        "forward",
        "dora_r8_q_v_unmerged",
        &mut t[4],
        Some(b),
        info,
    );
}

/// Unmerged LoRA forward cost against the base as the rank grows (every
/// linear adapted, ranks 1 to 64).
fn rank_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let ids = batch_ids::<B>(rows, len, device);
    B::seed(device, 7);
    let base = cfg.init::<B>(device).unwrap();
    let ranks = [1, 4, 16, 64];
    let models: Vec<Llama<B>> = ranks
        .iter()
        .map(|&r| LoraModel::new(base.clone(), all_linear(r)).unwrap().model)
        .collect();
    let run = |m: &Llama<B>| sync(m.forward(ids.clone(), None));
    let runs = if o.quick { 5 } else { 15 };
    let mut fs: Vec<Box<dyn FnMut()>> = vec![Box::new(|| run(&base))];
    for m in &models {
        fs.push(Box::new(move || run(m)));
    }
    let mut refs: Vec<&mut dyn FnMut()> = fs
        .iter_mut()
        .map(|f| f.as_mut() as &mut dyn FnMut())
        .collect();
    let mut t = interleaved(runs, &mut refs);
    let info = json!({"tokens": rows * len, "targets": "all-linear"});
    let b = emit(o, "rank", "base", &mut t[0], None, info.clone());
    for (i, r) in ranks.iter().enumerate() {
        emit(
            o,
            "rank",
            &format!("lora_r{r}_all_linear_unmerged"),
            &mut t[i + 1],
            Some(b),
            info.clone(),
        );
    }
}

/// Makes every parameter trainable (full fine-tuning).
struct Unfreeze;
impl<B: Backend> ModuleMapper<B> for Unfreeze {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(true)
    }
}

/// Peak resident memory since the last reset, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn train_step<B: AutodiffBackend, O: Optimizer<Llama<B>, B>>(
    m: Llama<B>,
    opt: &mut O,
    ids: &Tensor<B, 2, Int>,
) -> Llama<B> {
    let loss = causal_lm_loss(m.forward(ids.clone(), None), ids.clone());
    let grads = GradientsParams::from_grads(loss.backward(), &m);
    opt.step(1e-4, m, grads)
}

fn train_suite<B: AutodiffBackend>(o: &Opts, device: &B::Device) {
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let ids = batch_ids::<B>(rows, len, device);
    B::seed(device, 2);
    let base = cfg.init::<B>(device).unwrap();
    let lora = LoraModel::new(base.clone(), lora(8, &["q_proj", "v_proj"], false)).unwrap();
    let count = lora.param_count();
    let mut lora_model = lora.model;
    let mut full_model = base.map(&mut Unfreeze);
    let mut lora_opt = AdamWConfig::new().init::<B, Llama<B>>();
    let mut full_opt = AdamWConfig::new().init::<B, Llama<B>>();
    let runs = if o.quick { 3 } else { 8 };
    let mut t = interleaved(
        runs,
        &mut [
            &mut || lora_model = train_step(lora_model.clone(), &mut lora_opt, &ids),
            &mut || full_model = train_step(full_model.clone(), &mut full_opt, &ids),
        ],
    );
    // Peak memory is a per-process high-water mark: each variant runs in a
    // fresh process of its own.
    let (peak_lora, peak_full) = (memory_probe(o, "lora"), memory_probe(o, "full"));
    let b = emit(
        o,
        "train",
        "full_finetune_step",
        &mut t[1],
        None,
        json!({"peak_rss_mib": peak_full}),
    );
    let extra = json!({
        "tokens": rows * len, "layers": cfg.num_hidden_layers,
        "trainable_params": count.trainable, "all_params": count.all,
        "peak_rss_mib": peak_lora,
        "peak_rss_ratio_vs_full": peak_lora.zip(peak_full).map(|(l, f)| l / f),
    });
    emit(o, "train", "lora_r8_q_v_step", &mut t[0], Some(b), extra);
}

/// Runs `--memory-probe VARIANT` in a child process: its peak RSS in MiB.
fn memory_probe(o: &Opts, variant: &str) -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--backend", &o.backend, "--memory-probe", variant]);
    if let Some(i) = o.device {
        cmd.args(["--device", &i.to_string()]);
    }
    if o.quick {
        cmd.arg("--quick");
    }
    let out = cmd.output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Two training steps of one variant; prints the process's peak RSS (MiB).
fn probe<B: AutodiffBackend>(o: &Opts, variant: &str, device: &B::Device) {
    let device = device.clone();
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let ids = batch_ids::<B>(rows, len, &device);
    let base = cfg.init::<B>(&device).unwrap();
    let mut model = match variant {
        "full" => base.map(&mut Unfreeze),
        _ => {
            LoraModel::new(base, lora(8, &["q_proj", "v_proj"], false))
                .unwrap()
                .model
        }
    };
    let mut opt = AdamWConfig::new().init::<B, Llama<B>>();
    for _ in 0..2 {
        model = train_step(model, &mut opt, &ids);
    }
    println!("{}", peak_rss_mib().unwrap_or(f64::NAN));
}

fn mixed_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let cfg = stack_config(true);
    // 64 rows so that 64 adapters each get one.
    let (rows, len) = (64, if o.quick { 8 } else { 32 });
    let ids = batch_ids::<B>(rows, len, device);
    B::seed(device, 3);
    let mut m = LoraModel::new(
        cfg.init::<B>(device).unwrap(),
        lora(8, &["q_proj", "v_proj"], false),
    )
    .unwrap();
    for i in 1..64 {
        m.add_adapter(&format!("a{i}"), lora(8, &["q_proj", "v_proj"], false))
            .unwrap();
    }
    m.set_adapter(&["default"]).unwrap();
    let names = |n: usize| -> Vec<String> {
        (0..rows)
            .map(|r| {
                if r % n == 0 {
                    "default".to_string()
                } else {
                    format!("a{}", r % n)
                }
            })
            .collect()
    };
    let sets = [names(1), names(4), names(16), names(64)];
    let run_mixed = |set: &Vec<String>| {
        let refs: Vec<&str> = set.iter().map(String::as_str).collect();
        m.forward_mixed(&refs, rows, |model| sync(model.forward(ids.clone(), None)))
            .unwrap()
    };
    let runs = if o.quick { 5 } else { 15 };
    let mut t = interleaved(
        runs,
        &mut [
            &mut || sync(m.model.forward(ids.clone(), None)),
            &mut || run_mixed(&sets[0]),
            &mut || run_mixed(&sets[1]),
            &mut || run_mixed(&sets[2]),
            &mut || run_mixed(&sets[3]),
        ],
    );
    let b = emit(
        o,
        "mixed",
        "one_adapter_plain",
        &mut t[0],
        None,
        json!({"rows": rows}),
    );
    for (i, n) in [1, 4, 16, 64].iter().enumerate() {
        emit(
            o,
            "mixed",
            &format!("mixed_batch_{n}_adapters"),
            &mut t[i + 1],
            Some(b),
            json!({"rows": rows}),
        );
    }
}

/// The same LoRA training step on burn-ndarray and burn-flex, interleaved
/// in one process: how the default CPU backend was chosen.
fn cpu_backends_suite(o: &Opts) {
    type Nd = Autodiff<burn::backend::NdArray>;
    type Fx = Autodiff<burn::backend::Flex>;
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let (dn, df) = (Default::default(), Default::default());
    let (ids_n, ids_f) = (
        batch_ids::<Nd>(rows, len, &dn),
        batch_ids::<Fx>(rows, len, &df),
    );
    let mut mn = LoraModel::new(
        cfg.init::<Nd>(&dn).unwrap(),
        lora(8, &["q_proj", "v_proj"], false),
    )
    .unwrap()
    .model;
    let mut mf = LoraModel::new(
        cfg.init::<Fx>(&df).unwrap(),
        lora(8, &["q_proj", "v_proj"], false),
    )
    .unwrap()
    .model;
    let mut on = AdamWConfig::new().init::<Nd, Llama<Nd>>();
    let mut of = AdamWConfig::new().init::<Fx, Llama<Fx>>();
    let runs = if o.quick { 3 } else { 8 };
    let mut t = interleaved(
        runs,
        &mut [
            &mut || mn = train_step(mn.clone(), &mut on, &ids_n),
            &mut || mf = train_step(mf.clone(), &mut of, &ids_f),
        ],
    );
    let info = json!({"tokens": rows * len, "layers": cfg.num_hidden_layers});
    let b = emit(
        o,
        "cpu_backends",
        "lora_step_ndarray",
        &mut t[0],
        None,
        info.clone(),
    );
    emit(
        o,
        "cpu_backends",
        "lora_step_flex",
        &mut t[1],
        Some(b),
        info,
    );
}

/// Prefix and prompt tuning: forward and greedy generation with 20 virtual
/// tokens vs the plain model, and a training step at the trainable-parameter
/// budget of LoRA r 8 on q/v (prefix: 40 virtual tokens on this stack,
/// prompt: 107) vs that LoRA step.
fn prompt_suite<B: Backend>(o: &Opts, device: &B::Device) {
    // Inference runs on the plain backend: on an autodiff backend, forward
    // passes through trainable prompts leave graph entries that only a
    // backward pass reclaims (slowly), which is not what serving costs.
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let ids = batch_ids::<B>(rows, len, device);
    B::seed(device, 4);
    let base = cfg.init::<B>(device).unwrap();
    let n_virtual = 20;
    let prefix =
        PrefixTuningModel::new(base.clone(), PromptLearningConfig::prefix_tuning(n_virtual))
            .unwrap();
    let prompt = PromptTuningModel::new(
        base.clone(),
        PromptLearningConfig::prompt_tuning(n_virtual, PromptTuningInit::Random),
    )
    .unwrap();
    let runs = if o.quick { 3 } else { 10 };
    let mut t = interleaved(
        runs,
        &mut [
            &mut || sync(base.forward(ids.clone(), None)),
            &mut || sync(prefix.forward(ids.clone(), None)),
            &mut || sync(prompt.forward(ids.clone(), None)),
        ],
    );
    let info =
        json!({"tokens": rows * len, "layers": cfg.num_hidden_layers, "virtual_tokens": n_virtual});
    let b = emit(o, "prompt", "forward_base", &mut t[0], None, info.clone());
    emit(
        o,
        "prompt",
        "forward_prefix",
        &mut t[1],
        Some(b),
        info.clone(),
    );
    emit(o, "prompt", "forward_prompt", &mut t[2], Some(b), info);

    // Greedy generation through the KV cache: tokens/s with and without.
    let context: Vec<u32> = (0..16u32).map(|i| (i * 37) % 251).collect();
    let new_tokens = if o.quick { 8 } else { 32 };
    let mut t = interleaved(
        runs,
        &mut [
            &mut || {
                base.generate(&context, new_tokens, &mut Sampler::Greedy, None, true);
            },
            &mut || {
                prefix.generate(&context, new_tokens, &mut Sampler::Greedy, None);
            },
            &mut || {
                prompt.generate(&context, new_tokens, &mut Sampler::Greedy, None);
            },
        ],
    );
    for (i, name) in ["generate_base", "generate_prefix", "generate_prompt"]
        .iter()
        .enumerate()
    {
        let median = stats(&mut t[i].clone()).0;
        let extra = json!({"new_tokens": new_tokens, "tokens_per_s": new_tokens as f64 / median});
        let baseline = (i > 0).then(|| stats(&mut t[0].clone()).0);
        emit(o, "prompt", name, &mut t[i], baseline, extra);
    }

    prompt_train_suite::<Autodiff<B>>(o, device);
}

/// Training steps of prefix and prompt tuning at LoRA r8 q/v's
/// trainable-parameter budget, interleaved with that LoRA step.
fn prompt_train_suite<B: AutodiffBackend>(o: &Opts, device: &B::Device) {
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let ids = batch_ids::<B>(rows, len, device);
    B::seed(device, 5);
    let base = cfg.init::<B>(device).unwrap();
    let lora = LoraModel::new(base.clone(), lora(8, &["q_proj", "v_proj"], false)).unwrap();
    let budget = lora.param_count().trainable;
    let (kv_heads, head_dim) = (cfg.kv_heads(), cfg.head_dim());
    let per_prefix_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim;
    let n_prefix = budget.div_ceil(per_prefix_token);
    let n_prompt = budget.div_ceil(cfg.hidden_size);
    let mut prefix =
        PrefixTuningModel::new(base.clone(), PromptLearningConfig::prefix_tuning(n_prefix))
            .unwrap();
    let mut prompt = PromptTuningModel::new(
        base.clone(),
        PromptLearningConfig::prompt_tuning(n_prompt, PromptTuningInit::Random),
    )
    .unwrap();
    let mut lora_model = lora.model;
    let mut lora_opt = AdamWConfig::new().init::<B, Llama<B>>();
    let mut prefix_opt = AdamWConfig::new().init::<B, PrefixEncoder<B>>();
    let mut prompt_opt = AdamWConfig::new().init::<B, PromptEncoder<B>>();
    let mut t = interleaved(
        if o.quick { 3 } else { 8 },
        &mut [
            &mut || lora_model = train_step(lora_model.clone(), &mut lora_opt, &ids),
            &mut || {
                let loss = causal_lm_loss(prefix.forward(ids.clone(), None), ids.clone());
                let grads = loss.backward();
                prefix
                    .map_encoder("default", |e| {
                        let g = GradientsParams::from_grads(grads, &e);
                        prefix_opt.step(1e-3, e, g)
                    })
                    .unwrap();
            },
            &mut || {
                let n = prompt.num_virtual_tokens();
                let loss =
                    causal_lm_loss_after_prompt(prompt.forward(ids.clone(), None), ids.clone(), n);
                let grads = loss.backward();
                prompt
                    .map_encoder("default", |e| {
                        let g = GradientsParams::from_grads(grads, &e);
                        prompt_opt.step(1e-3, e, g)
                    })
                    .unwrap();
            },
        ],
    );
    let b = emit(
        o,
        "prompt",
        "train_lora_r8_q_v_step",
        &mut t[0],
        None,
        json!({"trainable_params": budget, "tokens": rows * len}),
    );
    emit(
        o,
        "prompt",
        "train_prefix_step_same_budget",
        &mut t[1],
        Some(b),
        json!({"trainable_params": prefix.param_count().trainable, "virtual_tokens": n_prefix}),
    );
    emit(
        o,
        "prompt",
        "train_prompt_step_same_budget",
        &mut t[2],
        Some(b),
        json!({"trainable_params": prompt.param_count().trainable, "virtual_tokens": n_prompt}),
    );
}

/// Bottleneck placements and (IA)³ against the base model: forward passes
/// (plain backend) and training steps (autodiff).
fn adapter_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let ids = batch_ids::<B>(rows, len, device);
    B::seed(device, 6);
    let base = cfg.init::<B>(device).unwrap();
    let placements = adapter_variants(&base);
    let ia3 = Ia3Model::new(base.clone(), Ia3Config::default()).unwrap();
    let runs = if o.quick { 3 } else { 10 };
    let mut fs: Vec<Box<dyn FnMut()>> = vec![Box::new(|| sync(base.forward(ids.clone(), None)))];
    for (_, m) in &placements {
        fs.push(Box::new(|| sync(m.forward(ids.clone(), None).unwrap())));
    }
    fs.push(Box::new(|| sync(ia3.model.forward(ids.clone(), None))));
    let mut refs: Vec<&mut dyn FnMut()> = fs
        .iter_mut()
        .map(|f| &mut **f as &mut dyn FnMut())
        .collect();
    let mut t = interleaved(runs, &mut refs);
    let info = json!({"tokens": rows * len, "layers": cfg.num_hidden_layers});
    let b = emit(o, "adapter", "forward_base", &mut t[0], None, info.clone());
    let mut names: Vec<String> = placements
        .iter()
        .map(|(n, _)| format!("forward_{n}"))
        .collect();
    names.push("forward_ia3".into());
    let counts: Vec<usize> = placements
        .iter()
        .map(|(_, m)| m.param_count().trainable)
        .chain([ia3.param_count().trainable])
        .collect();
    for (i, name) in names.iter().enumerate() {
        let extra = json!({"trainable_params": counts[i], "tokens": rows * len});
        emit(o, "adapter", name, &mut t[i + 1], Some(b), extra);
    }
    adapter_train_suite::<Autodiff<B>>(o, device);
}

/// `seq_bn`, `double_seq_bn`, `par_bn` (reduction 16) on `base`, with
/// non-zero up-projections as after training.
fn adapter_variants<B: Backend>(base: &Llama<B>) -> Vec<(&'static str, AdapterModel<B, Llama<B>>)> {
    let bert_init = |mut c: BnConfig| {
        c.init_weights = "bert".into();
        c.with_reduction_factor(16.0)
    };
    [
        ("seq_bn", BnConfig::seq_bn()),
        ("double_seq_bn", BnConfig::double_seq_bn()),
        ("par_bn", BnConfig::par_bn()),
    ]
    .into_iter()
    .map(|(n, c)| (n, AdapterModel::new(base.clone(), n, bert_init(c)).unwrap()))
    .collect()
}

/// One training step of each placement and of (IA)³, against a step of
/// LoRA r8 on q/v (the usual budget) and a plain forward of the base.
fn adapter_train_suite<B: AutodiffBackend>(o: &Opts, device: &B::Device) {
    let cfg = stack_config(o.quick);
    let (rows, len) = if o.quick { (2, 64) } else { (4, 128) };
    let ids = batch_ids::<B>(rows, len, device);
    B::seed(device, 7);
    let base = cfg.init::<B>(device).unwrap();
    let lora = LoraModel::new(base.clone(), lora(8, &["q_proj", "v_proj"], false)).unwrap();
    let mut lora_model = lora.model;
    let mut lora_opt = AdamWConfig::new().init::<B, Llama<B>>();
    let mut placements = adapter_variants(&base);
    let mut opts: Vec<_> = placements
        .iter()
        .map(|_| AdamWConfig::new().init::<B, AdapterModel<B, Llama<B>>>())
        .collect();
    let mut ia3 = Ia3Model::new(base.clone(), Ia3Config::default())
        .unwrap()
        .model;
    let mut ia3_opt = AdamWConfig::new().init::<B, Llama<B>>();
    let frozen = base.clone().no_grad();
    // Full fine-tuning: every parameter of the base trains.
    let mut full = base.clone().map(&mut Unfreeze);
    let mut full_opt = AdamWConfig::new().init::<B, Llama<B>>();
    let counts: Vec<usize> = placements
        .iter()
        .map(|(_, m)| m.param_count().trainable)
        .collect();
    let mut fs: Vec<Box<dyn FnMut() + '_>> = vec![
        Box::new(|| sync(frozen.forward(ids.clone(), None))),
        Box::new(|| lora_model = train_step(lora_model.clone(), &mut lora_opt, &ids)),
    ];
    for ((_, m), opt) in placements.iter_mut().zip(opts.iter_mut()) {
        let ids = &ids;
        fs.push(Box::new(move || {
            let loss = causal_lm_loss(m.forward(ids.clone(), None).unwrap(), ids.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &*m);
            *m = opt.step(1e-3, m.clone(), grads);
        }));
    }
    fs.push(Box::new(|| {
        ia3 = train_step(ia3.clone(), &mut ia3_opt, &ids)
    }));
    fs.push(Box::new(|| {
        full = train_step(full.clone(), &mut full_opt, &ids)
    }));
    let mut refs: Vec<&mut dyn FnMut()> = fs
        .iter_mut()
        .map(|f| &mut **f as &mut dyn FnMut())
        .collect();
    let mut t = interleaved(if o.quick { 3 } else { 8 }, &mut refs);
    drop(refs);
    drop(fs);
    let fwd = emit(
        o,
        "adapter",
        "base_forward_autodiff",
        &mut t[0],
        None,
        json!({}),
    );
    let b = emit(
        o,
        "adapter",
        "train_lora_r8_q_v_step",
        &mut t[1],
        None,
        json!({}),
    );
    let names = [
        "train_seq_bn_step",
        "train_double_seq_bn_step",
        "train_par_bn_step",
    ];
    let full_ms = stats(&mut t[6].clone()).0;
    for (i, name) in names.iter().enumerate() {
        let median = stats(&mut t[i + 2].clone()).0;
        let extra = json!({"trainable_params": counts[i], "ratio_vs_base_forward": median / fwd,
                           "ratio_vs_full_finetune": median / full_ms});
        emit(o, "adapter", name, &mut t[i + 2], Some(b), extra);
    }
    let median = stats(&mut t[5].clone()).0;
    emit(
        o,
        "adapter",
        "train_ia3_step",
        &mut t[5],
        Some(b),
        json!({"ratio_vs_base_forward": median / fwd, "ratio_vs_full_finetune": median / full_ms}),
    );
    emit(
        o,
        "adapter",
        "train_full_finetune_step",
        &mut t[6],
        Some(b),
        json!({"ratio_vs_base_forward": full_ms / fwd}),
    );
}

fn run<B: Backend>(o: &Opts, device: &B::Device) {
    if let Some(v) = &o.memory_probe {
        if v.starts_with("qlora") {
            return qlora::probe::<B>(o, v, device);
        }
        return probe::<Autodiff<B>>(o, v, device);
    }
    let device = device.clone();
    for s in &o.suites {
        match s.as_str() {
            "forward" => forward_suite::<B>(o, &device),
            "train" => train_suite::<Autodiff<B>>(o, &device),
            "mixed" => mixed_suite::<B>(o, &device),
            "cpu_backends" => cpu_backends_suite(o),
            "prompt" => prompt_suite::<B>(o, &device),
            "adapter" => adapter_suite::<B>(o, &device),
            "rank" => rank_suite::<B>(o, &device),
            "minilm" => real::minilm_suite::<B>(o, &device),
            "ops" => ops::ops_suite::<B>(o, &device),
            "epoch" => epoch::epoch_suite::<B>(o, &device),
            "smollm2" => real::smollm2_suite::<B>(o, &device),
            "qlora" => qlora::qlora_suite::<B>(o, &device),
            "serve" => serve::serve_suite::<B>(o, &device),
            "serve_soak" => serve::soak_suite::<B>(o, &device),
            "decode" => decode::decode_suite::<B>(o, &device),
            other => {
                eprintln!(
                    "unknown suite `{other}` (forward, rank, train, mixed, prompt, adapter, minilm, smollm2, qlora, serve, serve_soak, decode, cpu_backends, ops, epoch)"
                )
            }
        }
    }
}

fn main() {
    peft_core::memory::keep_freed_memory();
    let mut o = Opts {
        quick: false,
        suites: Vec::new(),
        backend: "ndarray".into(),
        device: None,
        memory_probe: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--suite" => o.suites.extend(args.next()),
            "--backend" => o.backend = args.next().unwrap_or_default(),
            "--device" => match args.next().map(|d| d.parse::<usize>()) {
                Some(Ok(i)) => o.device = Some(i),
                _ => {
                    eprintln!("--device needs a device index (0, 1, ...)");
                    std::process::exit(2);
                }
            },
            "--memory-probe" => o.memory_probe = args.next(),
            other => {
                eprintln!("unknown argument `{other}`");
                std::process::exit(2);
            }
        }
    }
    if o.suites.is_empty() {
        o.suites = vec![
            "forward".into(),
            "rank".into(),
            "train".into(),
            "mixed".into(),
            "prompt".into(),
            "adapter".into(),
            "minilm".into(),
            "smollm2".into(),
            "qlora".into(),
        ];
    }
    let ran = o.backend.parse().and_then(|kind| {
        let choice = BackendChoice {
            kind,
            device: o.device,
        };
        peft_core::with_backend!(choice, |B, device| {
            run::<B>(&o, &device);
            Ok(())
        })
    });
    if let Err(e) = ran {
        eprintln!("{e}");
        std::process::exit(2);
    }
}
