//! QLoRA on the real SmolLM2-135M: LoRA r8 on q/v trained on a base kept in
//! its GGUF blocks (Q4_1 linear layers, Q8_0 embeddings, layer-by-layer
//! recomputation) against the same LoRA on the dequantized `f32` base (one
//! ordinary backward pass). Both start from the same adapter init and see
//! the same batches of *Moby-Dick* chapter 1; held-out perplexity is
//! measured on chapter 2. The `f32` base is the file's own weights
//! dequantized, so the Q4 run computes the same numbers by another route;
//! a third run re-quantizes that `f32` base to NF4, which does lose
//! precision, and shows what 4-bit storage costs in perplexity; a fourth
//! starts the adapters with LoftQ on that NF4 base. Peak memory is measured per variant in a fresh
//! process (`--memory-probe qlora_*`), also for the `f32` base trained layer
//! by layer, which separates what recomputation saves from what
//! quantization saves.

use std::cell::RefCell;
use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_core::LoraConfig;
use peft_lora::LoraModel;
use peft_models::assets;
use peft_models::gguf::Gguf;
use peft_models::llama::Llama;
use peft_models::loss::causal_lm_loss;
use peft_models::tokenizer::Tokenizer;
use serde_json::json;

use crate::{emit, interleaved, memory_probe, peak_rss_mib, Opts};

const LR: f64 = 1e-3;

fn gguf_path() -> PathBuf {
    assets::fetch("smollm2")
        .expect("the SmolLM2 asset")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Blocks of `len` tokens from a *Moby-Dick* chapter.
fn blocks<B: Backend>(
    chapter: &str,
    len: usize,
    count: usize,
    device: &B::Device,
) -> Vec<Tensor<B, 2, Int>> {
    let text = std::fs::read_to_string(
        assets::fetch("moby-dick")
            .expect("the Moby-Dick asset")
            .join(format!("{chapter}.txt")),
    )
    .expect("chapter text");
    let tok = Tokenizer::from_gguf(&Gguf::open(&gguf_path()).expect("GGUF")).expect("tokenizer");
    let ids: Vec<i64> = tok
        .encode(&text)
        .expect("encodes")
        .into_iter()
        .map(i64::from)
        .collect();
    ids.chunks_exact(len)
        .take(count)
        .map(|c| Tensor::from_data(TensorData::new(c.to_vec(), [1, len]), device))
        .collect()
}

fn with_lora<B: Backend>(base: Llama<B>, device: &B::Device) -> Llama<B> {
    B::seed(device, 42);
    LoraModel::new(base, LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]))
        .expect("LoRA")
        .model
}

fn load_nf4<B: Backend>(device: &B::Device) -> Llama<B> {
    let mut base = Llama::<B>::from_gguf(&gguf_path(), device).expect("SmolLM2 loads");
    peft_core::PeftModel::quantize_base_nf4(&mut base).expect("NF4");
    with_lora(base, device)
}

/// NF4 everywhere, the q/v adapters initialised by LoftQ (one iteration).
fn load_loftq<B: Backend>(device: &B::Device) -> Llama<B> {
    let base = Llama::<B>::from_gguf(&gguf_path(), device).expect("SmolLM2 loads");
    let mut config = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
    config.init_lora_weights = peft_core::config::InitLoraWeights::Named("loftq".into());
    let mut model = LoraModel::new(base, config).expect("LoftQ").model;
    // LoftQ quantized the targeted layers; the rest are quantized plainly.
    peft_core::PeftModel::quantize_base_nf4(&mut model).expect("NF4");
    model
}

fn load<B: Backend>(quantized: bool, device: &B::Device) -> Llama<B> {
    let base = if quantized {
        Llama::<B>::from_gguf_quantized(&gguf_path(), device)
    } else {
        Llama::<B>::from_gguf(&gguf_path(), device)
    };
    with_lora(base.expect("SmolLM2 loads"), device)
}

/// One optimizer step, by one ordinary backward pass or layer by layer.
fn step<B: AutodiffBackend, O: Optimizer<Llama<B>, B>>(
    m: Llama<B>,
    opt: &mut O,
    ids: &Tensor<B, 2, Int>,
    by_layer: bool,
    seed: u64,
) -> Llama<B> {
    let grads = if by_layer {
        m.loss_and_grads_by_layer(ids.clone(), None, seed, |l| causal_lm_loss(l, ids.clone()))
            .1
    } else {
        let loss = causal_lm_loss(m.forward(ids.clone(), None), ids.clone());
        GradientsParams::from_grads(loss.backward(), &m)
    };
    opt.step(LR, m, grads)
}

fn perplexity<B: Backend>(m: &Llama<B>, blocks: &[Tensor<B, 2, Int>]) -> f64 {
    let mean: f64 = blocks
        .iter()
        .map(|b| {
            causal_lm_loss(m.forward(b.clone(), None), b.clone())
                .into_scalar()
                .elem::<f64>()
        })
        .sum::<f64>()
        / blocks.len() as f64;
    mean.exp()
}

fn shape(o: &Opts) -> (usize, usize) {
    // (tokens per block, training steps)
    if o.quick {
        (64, 3)
    } else {
        (128, 16)
    }
}

/// Loads one variant and trains it for two steps; prints the peak RSS (MiB).
pub fn probe<B: Backend>(o: &Opts, variant: &str, device: &B::Device) {
    type A<B> = Autodiff<B>;
    let device = device.clone();
    let (len, _) = shape(o);
    let data = blocks::<A<B>>("chapter_1", len, 2, &device);
    let (quantized, by_layer) = match variant {
        "qlora_f32" => (false, false),
        "qlora_f32_by_layer" => (false, true),
        "qlora_q4" => (true, true),
        other => panic!("unknown probe `{other}`"),
    };
    let mut m = load::<A<B>>(quantized, &device);
    let mut opt = AdamWConfig::new().init::<A<B>, Llama<A<B>>>();
    for (i, ids) in data.iter().enumerate() {
        m = step(m, &mut opt, ids, by_layer, i as u64);
    }
    println!("{}", peak_rss_mib().unwrap_or(f64::NAN));
}

pub fn qlora_suite<B: Backend>(o: &Opts, device: &B::Device) {
    type A<B> = Autodiff<B>;
    let (len, steps) = shape(o);
    let train = blocks::<A<B>>("chapter_1", len, steps + 1, device);
    let held_out = blocks::<B>("chapter_2", len, 4, device);
    let f32_model = RefCell::new(Some(load::<A<B>>(false, device)));
    let q4_model = RefCell::new(Some(load::<A<B>>(true, device)));
    let nf4_model = RefCell::new(Some(load_nf4::<A<B>>(device)));
    let loftq_model = RefCell::new(Some(load_loftq::<A<B>>(device)));
    let ppl_loftq_before = perplexity(&loftq_model.borrow().as_ref().unwrap().valid(), &held_out);
    let ppl_nf4_before = perplexity(&nf4_model.borrow().as_ref().unwrap().valid(), &held_out);
    let ppl_before = perplexity(&f32_model.borrow().as_ref().unwrap().valid(), &held_out);
    let mut f32_opt = AdamWConfig::new().init::<A<B>, Llama<A<B>>>();
    let mut q4_opt = AdamWConfig::new().init::<A<B>, Llama<A<B>>>();
    let mut nf4_opt = AdamWConfig::new().init::<A<B>, Llama<A<B>>>();
    let mut loftq_opt = AdamWConfig::new().init::<A<B>, Llama<A<B>>>();
    let (f32_i, q4_i, nf4_i, loftq_i) = (
        RefCell::new(0usize),
        RefCell::new(0usize),
        RefCell::new(0usize),
        RefCell::new(0usize),
    );
    let mut t = interleaved(
        steps,
        &mut [
            &mut || {
                let i = f32_i.replace_with(|i| *i + 1);
                let m = f32_model.borrow_mut().take().unwrap();
                let m = step(m, &mut f32_opt, &train[i], false, i as u64);
                *f32_model.borrow_mut() = Some(m);
            },
            &mut || {
                let i = q4_i.replace_with(|i| *i + 1);
                let m = q4_model.borrow_mut().take().unwrap();
                let m = step(m, &mut q4_opt, &train[i], true, i as u64);
                *q4_model.borrow_mut() = Some(m);
            },
            &mut || {
                let i = nf4_i.replace_with(|i| *i + 1);
                let m = nf4_model.borrow_mut().take().unwrap();
                let m = step(m, &mut nf4_opt, &train[i], true, i as u64);
                *nf4_model.borrow_mut() = Some(m);
            },
            &mut || {
                let i = loftq_i.replace_with(|i| *i + 1);
                let m = loftq_model.borrow_mut().take().unwrap();
                let m = step(m, &mut loftq_opt, &train[i], true, i as u64);
                *loftq_model.borrow_mut() = Some(m);
            },
        ],
    );
    let ppl_f32 = perplexity(&f32_model.borrow().as_ref().unwrap().valid(), &held_out);
    let ppl_q4 = perplexity(&q4_model.borrow().as_ref().unwrap().valid(), &held_out);
    let ppl_nf4 = perplexity(&nf4_model.borrow().as_ref().unwrap().valid(), &held_out);
    let ppl_loftq = perplexity(&loftq_model.borrow().as_ref().unwrap().valid(), &held_out);
    drop((f32_model, q4_model, nf4_model, loftq_model));
    let peak_f32 = memory_probe(o, "qlora_f32");
    let peak_f32_by_layer = memory_probe(o, "qlora_f32_by_layer");
    let peak_q4 = memory_probe(o, "qlora_q4");
    let common = json!({
        "tokens": len, "steps": steps + 1, "lr": LR,
        "held_out_ppl_before": ppl_before,
    });
    let mut f32_extra = common.clone();
    f32_extra["peak_rss_mib"] = json!(peak_f32);
    f32_extra["held_out_ppl"] = json!(ppl_f32);
    let b = emit(o, "qlora", "f32_base_step", &mut t[0], None, f32_extra);
    let mut q4_extra = common;
    q4_extra["peak_rss_mib"] = json!(peak_q4);
    q4_extra["peak_rss_mib_f32_base_by_layer"] = json!(peak_f32_by_layer);
    q4_extra["peak_rss_ratio_vs_f32"] = json!(peak_q4.zip(peak_f32).map(|(q, f)| q / f));
    q4_extra["held_out_ppl"] = json!(ppl_q4);
    q4_extra["held_out_ppl_ratio_vs_f32"] = json!(ppl_q4 / ppl_f32);
    emit(
        o,
        "qlora",
        "q4_base_by_layer_step",
        &mut t[1],
        Some(b),
        q4_extra,
    );
    let nf4_extra = json!({
        "tokens": len, "steps": steps + 1, "lr": LR,
        "held_out_ppl_before": ppl_nf4_before,
        "held_out_ppl": ppl_nf4,
        "held_out_ppl_ratio_vs_f32": ppl_nf4 / ppl_f32,
    });
    emit(
        o,
        "qlora",
        "nf4_base_by_layer_step",
        &mut t[2],
        Some(b),
        nf4_extra,
    );
    let loftq_extra = json!({
        "tokens": len, "steps": steps + 1, "lr": LR,
        "held_out_ppl_before": ppl_loftq_before,
        "held_out_ppl": ppl_loftq,
        "held_out_ppl_ratio_vs_f32": ppl_loftq / ppl_f32,
    });
    emit(
        o,
        "qlora",
        "nf4_loftq_by_layer_step",
        &mut t[3],
        Some(b),
        loftq_extra,
    );
}
