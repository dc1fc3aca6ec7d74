//! The training loop behind `peft train`: AdamW with weight decay, warm-up
//! then linear or cosine decay, gradient accumulation and clipping,
//! evaluation on a held-out split with early stopping, a NaN guard, a
//! metrics log (JSONL) and atomic checkpoints of the best model.
//!
//! The loop is generic: the caller gives the trainable module, a loss on a
//! batch of example indices, an evaluation on the inference module and a
//! checkpoint writer. Only parameters that require gradients move.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use peft_core::rng::SplitMix64;
use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear decay to zero.
    Linear,
    /// Half a cosine down to zero.
    Cosine,
    /// Constant.
    Constant,
}

/// Everything about a run that is not the model or the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Passes over the training split.
    pub epochs: usize,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Share of the optimizer steps spent warming up (linear from 0).
    pub warmup: f64,
    /// Decay after warm-up.
    pub schedule: Schedule,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Gradient clipping by global norm (`None`: no clipping).
    pub clip_norm: Option<f64>,
    /// Evaluate every this many optimizer steps (0: at the end of each epoch).
    pub eval_every: usize,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    /// Seed of the data order, the backend's RNG (dropout) and new weights.
    pub seed: u64,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            epochs: 1,
            batch: 16,
            grad_accum: 1,
            warmup: 0.1,
            schedule: Schedule::Linear,
            weight_decay: 0.01,
            clip_norm: Some(1.0),
            eval_every: 0,
            patience: None,
            seed: 42,
            max_steps: None,
        }
    }
}

impl TrainConfig {
    /// Checks values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PeftError::Config(m));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate must be positive, got {}", self.lr));
        }
        if self.batch == 0 || self.grad_accum == 0 || self.epochs == 0 {
            return bad("batch, grad-accum and epochs must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return bad(format!(
                "warmup is a share of the steps in [0, 1), got {}",
                self.warmup
            ));
        }
        if self.clip_norm.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return bad("clip norm must be positive".into());
        }
        Ok(())
    }

    /// Optimizer steps of the whole run for `n_train` examples.
    pub fn total_steps(&self, n_train: usize) -> usize {
        let per_epoch = n_train.div_ceil(self.batch).div_ceil(self.grad_accum);
        let total = per_epoch * self.epochs;
        self.max_steps.map_or(total, |m| m.min(total)).max(1)
    }

    /// The learning rate of optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warm = (self.warmup * total as f64).round() as usize;
        if step < warm {
            return self.lr * (step + 1) as f64 / warm as f64;
        }
        let progress = (step - warm) as f64 / (total - warm).max(1) as f64;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - progress),
            Schedule::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// An evaluation result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// `accuracy` or `perplexity`.
    pub name: &'static str,
    /// Its value.
    pub value: f64,
    /// Whether larger is better.
    pub higher_is_better: bool,
}

impl Metric {
    fn better_than(&self, other: &Metric) -> bool {
        if self.higher_is_better {
            self.value > other.value
        } else {
            self.value < other.value
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Mean training loss per logged interval: `(step, loss)`.
    pub losses: Vec<(usize, f64)>,
    /// Evaluations: `(step, metric)`.
    pub evals: Vec<(usize, Metric)>,
    /// The best evaluation, if any.
    pub best: Option<Metric>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
}

/// Where a run writes: `metrics.jsonl`, `best/` (the best checkpoint,
/// replaced atomically), `loss.svg`.
pub struct RunDir {
    dir: PathBuf,
    metrics: std::fs::File,
}

impl RunDir {
    /// Creates `dir` and starts its metrics log.
    pub fn create(dir: &Path) -> Result<Self> {
        let io = |source| PeftError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let metrics = std::fs::File::create(dir.join("metrics.jsonl")).map_err(io)?;
        Ok(RunDir {
            dir: dir.to_path_buf(),
            metrics,
        })
    }

    /// The run's folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn log(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.metrics, "{v}")
            .and_then(|()| self.metrics.flush())
            .map_err(|source| PeftError::Io {
                path: self.dir.join("metrics.jsonl"),
                source,
            })
    }

    /// Writes a checkpoint under `name` atomically: into a fresh temporary
    /// folder first, then swapped in by renames, so a crash leaves the
    /// previous checkpoint (possibly as `<name>.old`) or the new one.
    pub fn checkpoint(
        &self,
        name: &str,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let target = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let old = self.dir.join(format!("{name}.old"));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| PeftError::Io { path: p, source }
        };
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        write(&tmp)?;
        if target.exists() {
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&target, &old).map_err(io(&target))?;
        }
        std::fs::rename(&tmp, &target).map_err(io(&tmp))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(target)
    }
}

/// Trains `model`. `loss` gives the mean loss of a batch of training-example
/// indices and its token count; `eval` scores the inference module on the
/// held-out split; `save` writes a checkpoint folder. Returns the model at
/// its best evaluation (or at the end without evaluation) and the outcome.
#[allow(clippy::too_many_arguments)]
pub fn fit<B, M>(
    mut model: M,
    config: &TrainConfig,
    n_train: usize,
    run: &mut RunDir,
    mut loss: impl FnMut(&M, &[usize]) -> Result<(Tensor<B, 1>, usize)>,
    mut eval: impl FnMut(&M::InnerModule) -> Result<Metric>,
    mut save: impl FnMut(&M::InnerModule, &Path) -> Result<()>,
    progress: &indicatif::ProgressBar,
) -> Result<(M::InnerModule, Outcome)>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Clone,
{
    config.validate()?;
    let device = model.devices().into_iter().next().unwrap_or_default();
    let total = config.total_steps(n_train);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(
            config
                .clip_norm
                .map(|c| GradientClippingConfig::Norm(c as f32)),
        )
        .init::<B, M>();
    progress.set_length(total as u64);
    let mut out = Outcome {
        steps: 0,
        losses: Vec::new(),
        evals: Vec::new(),
        best: None,
        stopped_early: false,
    };
    let (mut window, mut tokens, mut since_best) = (Vec::new(), 0usize, 0usize);
    let mut best_model: Option<M::InnerModule> = None;
    let start = Instant::now();
    let mut evaluate =
        |model: &M, step: usize, out: &mut Outcome, run: &mut RunDir| -> Result<bool> {
            let inner = model.valid();
            let m = eval(&inner)?;
            run.log(json!({"step": step, "eval": {m.name: m.value}}))?;
            out.evals.push((step, m));
            let improved = out.best.is_none_or(|b| m.better_than(&b));
            if improved {
                out.best = Some(m);
                run.checkpoint("best", |dir| save(&inner, dir))?;
                best_model = Some(inner);
            }
            Ok(improved)
        };
    'epochs: for epoch in 0..config.epochs {
        let mut order: Vec<usize> = (0..n_train).collect();
        SplitMix64(config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9)).shuffle(&mut order);
        let batches: Vec<&[usize]> = order.chunks(config.batch).collect();
        for group in batches.chunks(config.grad_accum) {
            let step = out.steps;
            let mut accum = GradientsAccumulator::<M>::new();
            let mut step_loss = 0.0;
            for (k, batch) in group.iter().enumerate() {
                // Seeded per micro-batch: dropout masks do not depend on
                // what ran before (a resumed run draws the same ones).
                B::seed(
                    &device,
                    config
                        .seed
                        .wrapping_add((step * config.grad_accum + k) as u64),
                );
                let (l, n_tokens) = loss(&model, batch)?;
                let value: f64 = l.clone().into_scalar().elem::<f32>() as f64;
                if !value.is_finite() {
                    let kept = run.path().join("best");
                    return Err(PeftError::NonFinite(format!(
                        "training loss is {value} at step {step} (epoch {epoch}); stopped. The last good checkpoint is {}",
                        if kept.exists() { kept.display().to_string() } else { "none (no evaluation yet)".into() }
                    )));
                }
                step_loss += value / group.len() as f64;
                tokens += n_tokens;
                let grads = (l / group.len() as f64).backward();
                accum.accumulate(&model, GradientsParams::from_grads(grads, &model));
            }
            let lr = config.lr_at(step, total);
            model = optim.step(lr, model, accum.grads());
            out.steps += 1;
            window.push(step_loss);
            let secs = start.elapsed().as_secs_f64();
            progress.set_position(out.steps as u64);
            progress.set_message(format!(
                "loss {step_loss:.4}  {:.0} tok/s",
                tokens as f64 / secs
            ));
            if out.steps.is_multiple_of(10) || out.steps == total {
                let mean = window.iter().sum::<f64>() / window.len() as f64;
                window.clear();
                out.losses.push((out.steps, mean));
                run.log(
                    json!({"step": out.steps, "epoch": epoch, "loss": mean, "lr": lr,
                               "tokens_per_s": tokens as f64 / secs, "elapsed_s": secs}),
                )?;
            }
            if config.eval_every > 0 && out.steps.is_multiple_of(config.eval_every) {
                if evaluate(&model, out.steps, &mut out, run)? {
                    since_best = 0;
                } else {
                    since_best += 1;
                }
                if config.patience.is_some_and(|p| since_best >= p) {
                    out.stopped_early = true;
                    break 'epochs;
                }
            }
            if out.steps >= total {
                break 'epochs;
            }
        }
        if config.eval_every == 0 {
            if evaluate(&model, out.steps, &mut out, run)? {
                since_best = 0;
            } else {
                since_best += 1;
            }
            if config.patience.is_some_and(|p| since_best >= p) {
                out.stopped_early = true;
                break;
            }
        }
    }
    if out.evals.last().is_none_or(|(s, _)| *s != out.steps) && !out.stopped_early {
        evaluate(&model, out.steps, &mut out, run)?;
    }
    progress.finish_and_clear();
    let last = model.valid();
    run.checkpoint("last", |dir| save(&last, dir))?;
    std::fs::write(run.path().join("loss.svg"), crate::plot::svg(&out)).map_err(|source| {
        PeftError::Io {
            path: run.path().join("loss.svg"),
            source,
        }
    })?;
    Ok((best_model.unwrap_or(last), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay() {
        let c = TrainConfig {
            lr: 1.0,
            warmup: 0.1,
            ..Default::default()
        };
        assert_eq!(c.lr_at(0, 100), 0.1);
        assert_eq!(c.lr_at(9, 100), 1.0);
        assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-12);
        assert!(c.lr_at(99, 100) < 0.02);
        let cos = TrainConfig {
            schedule: Schedule::Cosine,
            ..c.clone()
        };
        assert!(
            (cos.lr_at(55, 100) - 0.5).abs() < 1e-9,
            "{}",
            cos.lr_at(55, 100)
        );
        assert_eq!(c.total_steps(100), 7);
        let acc = TrainConfig {
            grad_accum: 3,
            ..c.clone()
        };
        assert_eq!(acc.total_steps(100), 3);
        assert!(TrainConfig {
            lr: f64::NAN,
            ..c.clone()
        }
        .validate()
        .is_err());
        assert!(TrainConfig { batch: 0, ..c }.validate().is_err());
    }
}
