//! `decode`: one decode step of SmolLM2-135M (GGUF, dequantized) with a KV
//! cache of 32 positions per row, at 1, 4 and 16 rows, with r-8 LoRA
//! adapters on all linear layers: every row through the one active adapter
//! (`one_lora`), and every row through its own adapter (`mixed_lora`, a
//! mixed batch; 16 adapters at 16 rows).
//! Then the step's matrix products alone at each row count, each with its
//! count per step, so the rows show where a batched step spends its time.
//! `peft serve`'s batching goal (16 clients ≥ 4× one client's tokens/s)
//! needs a 16-row step to cost well under 4× a 1-row step.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use peft_core::generate::KvCache;
use peft_core::{ModelInput, PeftModel};
use peft_lora::LoraModel;
use peft_models::assets;
use peft_models::llama::Llama;
use serde_json::json;

use crate::ops::sync;
use crate::{all_linear, emit, interleaved, Opts};

/// Cached positions per row before the timed step.
const PAST: usize = 32;

fn ids<B: Backend>(rows: usize, len: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = (0..rows * len)
        .map(|i| (17 + 31 * i as i64) % 40_000)
        .collect();
    Tensor::from_data(TensorData::new(v, [rows, len]), device)
}

pub fn decode_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let gguf = assets::fetch("smollm2")
        .expect("smollm2 asset")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let base = Llama::<B>::from_gguf(&gguf, device).expect("SmolLM2 loads");
    let rows_set: &[usize] = if o.quick { &[1, 4] } else { &[1, 4, 16] };
    let most = *rows_set.last().unwrap();
    let mut m = LoraModel::new(base, all_linear(8)).expect("LoRA attaches");
    for i in 1..most {
        m.add_adapter(&format!("a{i}"), all_linear(8))
            .expect("LoRA attaches");
    }
    // Each row's prompt in the cache.
    let caches: Vec<KvCache<B>> = rows_set
        .iter()
        .map(|&r| {
            let mut cache = KvCache::default();
            let _ = m
                .model
                .run(ModelInput::ids(ids::<B>(r, PAST, device)).cache(&mut cache));
            cache
        })
        .collect();
    let names: Vec<String> = (0..most)
        .map(|i| {
            if i == 0 {
                "default".into()
            } else {
                format!("a{i}")
            }
        })
        .collect();
    let step = |i: usize, mixed: bool| {
        let r = rows_set[i];
        let mut cache = caches[i].clone();
        let input = ModelInput::ids(ids::<B>(r, 1, device)).cache(&mut cache);
        if mixed {
            let refs: Vec<&str> = names[..r].iter().map(String::as_str).collect();
            m.forward_mixed(&refs, r, |model| sync(model.run(input)))
                .expect("mixed step");
        } else {
            sync(m.model.run(input));
        }
    };
    let runs = if o.quick { 3 } else { 10 };
    let mut fs: Vec<Box<dyn FnMut()>> = Vec::new();
    for i in 0..rows_set.len() {
        fs.push(Box::new(move || step(i, false)));
        fs.push(Box::new(move || step(i, true)));
    }
    let mut refs: Vec<&mut dyn FnMut()> = fs.iter_mut().map(|f| f.as_mut() as _).collect();
    let mut t = interleaved(runs, &mut refs);
    let one = crate::stats(&mut t[0].clone()).0;
    for (i, &r) in rows_set.iter().enumerate() {
        for (j, kind) in ["one_lora", "mixed_lora"].iter().enumerate() {
            let median = crate::stats(&mut t[2 * i + j].clone()).0;
            emit(
                o,
                "decode",
                &format!("step_{kind}_rows_{r}"),
                &mut t[2 * i + j],
                None,
                json!({"rows": r, "past": PAST, "vs_one_lora_rows_1": median / one}),
            );
        }
    }
    products::<B>(o, device, rows_set);
}

/// The step's products alone: (name, k, n, count per step).
fn products<B: Backend>(o: &Opts, device: &B::Device, rows_set: &[usize]) {
    let shapes: [(&str, usize, usize, usize); 5] = [
        ("q_o_576x576", 576, 576, 60),
        ("k_v_576x192", 576, 192, 60),
        ("gate_up_576x1536", 576, 1536, 60),
        ("down_1536x576", 1536, 576, 30),
        ("head_576x49152", 576, 49152, 1),
    ];
    let normal = Distribution::Normal(0.0, 0.05);
    let weights: Vec<Tensor<B, 2>> = shapes
        .iter()
        .map(|&(_, k, n, _)| Tensor::random([k, n], normal, device))
        .collect();
    let runs = if o.quick { 5 } else { 20 };
    for &r in rows_set {
        let xs: Vec<Tensor<B, 2>> = shapes
            .iter()
            .map(|&(_, k, _, _)| Tensor::random([r, k], normal, device))
            .collect();
        let mut fs: Vec<Box<dyn FnMut() + '_>> = (0..shapes.len())
            .map(|i| {
                let (x, w) = (&xs[i], &weights[i]);
                Box::new(move || sync(x.clone().matmul(w.clone()))) as Box<dyn FnMut()>
            })
            .collect();
        let mut refs: Vec<&mut dyn FnMut()> = fs.iter_mut().map(|f| f.as_mut() as _).collect();
        let t = interleaved(runs, &mut refs);
        for (i, (name, _, _, count)) in shapes.iter().enumerate() {
            let median = crate::stats(&mut t[i].clone()).0;
            emit(
                o,
                "decode",
                &format!("product_{name}_rows_{r}"),
                &mut t[i].clone(),
                None,
                json!({"rows": r, "count_per_step": count, "ms_per_step": median * 1e3 * *count as f64}),
            );
        }
    }
}
