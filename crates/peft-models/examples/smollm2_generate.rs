//! Loads SmolLM2-135M-Instruct from its GGUF file (fetched by
//! `scripts/fetch_assets.py`) and continues a prompt with the KV cache.
//!
//!     cargo run -p peft-models --example smollm2_generate -- "The capital of France is" [--temperature 0.7 --top-k 40 --top-p 0.9 --seed 1 --max 40 --backend ndarray|flex]
//!
//! Prints the load time and the process's peak memory after loading (the
//! dequantised f32 weights, never two copies of them).

use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use peft_models::assets;
use peft_models::generate::{CausalLm, Sampler};
use peft_models::gguf::Gguf;
use peft_models::llama::Llama;
use peft_models::tokenizer::Tokenizer;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    peft_core::memory::keep_freed_memory();
    let mut prompt = "The capital of France is".to_string();
    let (mut temperature, mut top_k, mut top_p, mut seed, mut max) =
        (0.0f32, 0usize, 1.0f32, 0u64, 24usize);
    // Flex by default here: one-token steps are matrix–vector products, which
    // burn-flex runs ≈6× faster than burn-ndarray (measured on SmolLM2).
    let mut backend = "flex".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--temperature" => temperature = value()?.parse()?,
            "--top-k" => top_k = value()?.parse()?,
            "--top-p" => top_p = value()?.parse()?,
            "--seed" => seed = value()?.parse()?,
            "--max" => max = value()?.parse()?,
            "--backend" => backend = value()?,
            _ => prompt = a,
        }
    }
    let sampler = if temperature > 0.0 {
        Sampler::Random {
            temperature,
            top_k,
            top_p,
            state: seed,
        }
    } else {
        Sampler::Greedy
    };
    match backend.as_str() {
        "ndarray" => run::<NdArray>(&prompt, max, sampler),
        _ => run::<burn::backend::Flex>(&prompt, max, sampler),
    }
}

fn run<B: Backend>(
    prompt: &str,
    max: usize,
    mut sampler: Sampler,
) -> Result<(), Box<dyn std::error::Error>> {
    let path = assets::fetch("smollm2")?.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let start = Instant::now();
    let gguf = Gguf::open(&path)?;
    let tok = Tokenizer::from_gguf(&gguf)?;
    drop(gguf);
    let model = Llama::<B>::from_gguf(&path, &Default::default())?;
    println!(
        "loaded {} parameters in {:.1}s; peak RSS {:.0} MiB",
        burn::module::Module::num_params(&model),
        start.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    let ids = tok.encode(prompt)?;
    let start = Instant::now();
    let out = model.generate(&ids, max, &mut sampler, Some(2), true);
    println!("{prompt}{}", tok.decode(&out)?);
    println!(
        "{} tokens in {:.2}s",
        out.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
