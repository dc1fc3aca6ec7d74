//! Suites on the real pretrained models (fetched and sha256-checked by
//! `peft_models::assets`): all-MiniLM-L6-v2 LoRA training throughput and
//! forward passes (the figures `--vs-peft` compares with PEFT + PyTorch),
//! and SmolLM2-135M merge / unmerge / save / load of an all-linear LoRA.

use burn::backend::Autodiff;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::PeftModel;
use peft_lora::LoraModel;
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::llama::Llama;
use serde_json::json;

use std::time::Instant;

use crate::{all_linear, emit, interleaved, lora, stats, sync, Opts};

/// MiniLM's batch: 16 sentences of 128 tokens (`--quick`: 4 × 32).
fn minilm_batch(o: &Opts) -> (usize, usize) {
    if o.quick {
        (4, 32)
    } else {
        (16, 128)
    }
}

fn minilm_inputs<B: Backend>(
    rows: usize,
    len: usize,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>, Tensor<B, 1, Int>) {
    // Ids past the special tokens (MiniLM's vocabulary is 30,522).
    let v: Vec<i64> = (0..rows * len)
        .map(|i| 1000 + ((i * 7919) % 28_000) as i64)
        .collect();
    let ids = Tensor::from_data(TensorData::new(v, [rows, len]), device);
    let mask = Tensor::ones([rows, len], device);
    let labels: Vec<i64> = (0..rows as i64).map(|i| i % 2).collect();
    let labels = Tensor::from_data(TensorData::new(labels, [rows]), device);
    (ids, mask, labels)
}

/// MiniLM with mean pooling and a two-class head: the `peft train` seq-cls
/// model (and the one `benches/peft_reference.py` builds in PyTorch).
#[derive(Module, Debug)]
struct Classifier<B: Backend> {
    bert: Bert<B>,
    head: Linear<B>,
}

impl<B: Backend> Classifier<B> {
    fn loss(
        &self,
        ids: Tensor<B, 2, Int>,
        mask: Tensor<B, 2>,
        labels: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        let h = self.bert.encode(ids, Some(mask.clone()));
        let logits = self.head.forward(Bert::pool_mean(h, mask, false));
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, labels)
    }
}

fn minilm_lora() -> peft_core::LoraConfig {
    lora(8, &["query", "value"], false)
}

/// Forward passes (base, LoRA r8 q/v unmerged and merged) and the LoRA
/// training step on all-MiniLM-L6-v2, batch 16 × 128.
pub fn minilm_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let dir = assets::fetch("minilm").expect("the MiniLM asset");
    let (rows, len) = minilm_batch(o);
    let (ids, mask, _) = minilm_inputs::<B>(rows, len, device);
    B::seed(device, 4);
    let base = Bert::<B>::load(&dir, device).expect("MiniLM loads");
    let unmerged = LoraModel::new(base.clone(), minilm_lora()).unwrap();
    let mut merged = unmerged.clone();
    merged.merge_adapter().unwrap();
    let run = |m: &Bert<B>| sync(m.encode(ids.clone(), Some(mask.clone())));
    let runs = if o.quick { 5 } else { 15 };
    let mut t = interleaved(
        runs,
        &mut [
            &mut || run(&base),
            &mut || run(&unmerged.model),
            &mut || run(&merged.model),
        ],
    );
    let info = json!({"tokens": rows * len, "rank": 8, "targets": "query,value"});
    let b = emit(o, "minilm", "forward_base", &mut t[0], None, info.clone());
    emit(
        o,
        "minilm",
        "forward_lora_r8_q_v_unmerged",
        &mut t[1],
        Some(b),
        info.clone(),
    );
    emit(
        o,
        "minilm",
        "forward_lora_r8_q_v_merged",
        &mut t[2],
        Some(b),
        info,
    );
    minilm_train::<Autodiff<B>>(o, device, b);
}

fn minilm_train<B: AutodiffBackend>(o: &Opts, device: &B::Device, forward_s: f64) {
    let dir = assets::fetch("minilm").expect("the MiniLM asset");
    let (rows, len) = minilm_batch(o);
    let (ids, mask, labels) = minilm_inputs::<B>(rows, len, device);
    B::seed(device, 5);
    let bert = LoraModel::new(Bert::<B>::load(&dir, device).unwrap(), minilm_lora())
        .unwrap()
        .model;
    let count = bert.param_count();
    let mut model = Classifier {
        bert,
        head: LinearConfig::new(384, 2).init(device),
    };
    let mut opt = AdamWConfig::new().init::<B, Classifier<B>>();
    let runs = if o.quick { 3 } else { 8 };
    // Each phase's time, so a report shows where a step's time goes (Flex
    // and ndarray run eagerly; a lazy backend's forward would show in
    // `backward_ms` instead).
    let mut phases: [Vec<f64>; 3] = Default::default();
    let mut t = interleaved(
        runs,
        &mut [&mut || {
            let t0 = Instant::now();
            let loss = model.loss(ids.clone(), mask.clone(), labels.clone());
            let t1 = Instant::now();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let t2 = Instant::now();
            model = opt.step(1e-3, model.clone(), grads);
            for (p, (a, b)) in phases
                .iter_mut()
                .zip([(t0, t1), (t1, t2), (t2, Instant::now())])
            {
                p.push((b - a).as_secs_f64());
            }
        }],
    );
    let [forward_ms, backward_ms, optimizer_ms] = phases.map(|mut p| stats(&mut p).0 * 1e3);
    let median = {
        let mut s = t[0].clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    emit(
        o,
        "minilm",
        "train_step_lora_r8_q_v",
        &mut t[0],
        None,
        json!({
            "tokens": rows * len,
            "tokens_per_s": (rows * len) as f64 / median,
            "trainable_params": count.trainable,
            "ratio_vs_base_forward": median / forward_s,
            "forward_ms": forward_ms,
            "backward_ms": backward_ms,
            "optimizer_ms": optimizer_ms,
        }),
    );
}

/// Merge and unmerge of a rank-8 LoRA on every linear of SmolLM2-135M
/// (210 modules), and saving / loading it: time, and file size against
/// 4 bytes × trainable parameters.
pub fn smollm2_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let dir = assets::fetch("smollm2").expect("the SmolLM2 asset");
    let model = Llama::<B>::from_gguf(&dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"), device)
        .expect("SmolLM2 loads");
    B::seed(device, 6);
    let mut lora = LoraModel::new(model, all_linear(8)).unwrap();
    let mut modules = 0;
    lora.model.visit_linears(&mut |_, s| {
        modules += usize::from(s.entries_of::<peft_core::LoraEntry<_>>().next().is_some())
    });
    let count = lora.param_count();
    let ids = crate::batch_ids::<B>(1, 128, device);
    let sync_weights = |l: &LoraModel<B, Llama<B>>| {
        let mut first = None;
        l.model.visit_linears(&mut |_, s| {
            if first.is_none() {
                first = Some(s.base_weight().slice([0..1, 0..1]));
            }
        });
        let _ = first.map(|w| w.into_data());
    };
    let runs = if o.quick { 3 } else { 7 };
    let lora_cell = std::cell::RefCell::new(&mut lora);
    let mut t = interleaved(
        runs,
        &mut [
            &mut || sync(lora_cell.borrow().model.forward(ids.clone(), None)),
            &mut || {
                let mut l = lora_cell.borrow_mut();
                l.merge_adapter().unwrap();
                sync_weights(&l);
            },
            &mut || {
                let mut l = lora_cell.borrow_mut();
                l.unmerge_adapter();
                sync_weights(&l);
            },
        ],
    );
    let info = json!({"modules": modules, "rank": 8, "trainable_params": count.trainable});
    let b = emit(
        o,
        "smollm2",
        "forward_128_tokens",
        &mut t[0],
        None,
        info.clone(),
    );
    emit(
        o,
        "smollm2",
        "merge_all_linear_r8",
        &mut t[1],
        Some(b),
        info.clone(),
    );
    emit(
        o,
        "smollm2",
        "unmerge_all_linear_r8",
        &mut t[2],
        Some(b),
        info,
    );

    let out = std::env::temp_dir().join(format!("peft-bench-save-{}", std::process::id()));
    let (mut save, mut load) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(&out);
        let s = std::time::Instant::now();
        lora.save_pretrained(&out).unwrap();
        save.push(s.elapsed().as_secs_f64());
        let s = std::time::Instant::now();
        lora.load_adapter(&out, "loaded").unwrap();
        load.push(s.elapsed().as_secs_f64());
        lora.delete_adapter("loaded").unwrap();
    }
    let bytes = std::fs::metadata(out.join("adapter_model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    let _ = std::fs::remove_dir_all(&out);
    let size = json!({
        "file_bytes": bytes,
        "ideal_bytes": 4 * count.trainable,
        "size_ratio_vs_4_bytes_per_param": bytes as f64 / (4 * count.trainable) as f64,
    });
    emit(o, "smollm2", "save_adapter", &mut save, None, size.clone());
    emit(o, "smollm2", "load_adapter", &mut load, None, size);
}
