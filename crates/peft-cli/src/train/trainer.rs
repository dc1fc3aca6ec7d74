//! [`Trainer`]: one run's optimizer, state and checkpoints, driven step by
//! step ([`Trainer::step`], [`Trainer::evaluate`], [`Trainer::checkpoint`])
//! or through the whole epoch loop ([`Trainer::fit`]).

use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::GradientsAccumulator;
use burn::tensor::backend::AutodiffBackend;
use peft_core::io::write_atomic;
use peft_core::model::device_of;
use peft_core::rng::SplitMix64;
use peft_core::Result;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::config::TrainConfig;
use super::grads::{differentiate, non_finite_gradient, BatchLoss};
use super::hook::StepHook;
use super::loraplus::Optimizers;
use super::optimizer::OPTIMIZER_FILE;
use super::peers::{Peers, ReplicaTally};
use super::run::{non_finite, RunDir, RunState, STATE_FILE};

/// Which checkpoint a `save` callback writes: `best/`, what a user takes
/// away, or `last/`, what `--resume` continues from. The two differ where
/// the adapter as it trains is not what a user should take away (PiSSA /
/// OLoRA: `best/` is the plain LoRA of the original weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saving {
    /// `best/`.
    Best,
    /// `last/`.
    Last,
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

fn static_name(name: &str) -> &'static str {
    match name {
        "accuracy" => "accuracy",
        "perplexity" => "perplexity",
        _ => "metric",
    }
}

/// One training run of `M` on `B`: AdamW (LoRA+'s groups with
/// `loraplus_lr_ratio`), the run's state, its data-parallel
/// peers, and the best inference module so far. Build it with
/// [`new`](Self::new) (fresh, or resumed from a `last/` checkpoint); then
/// either call [`fit`](Self::fit), or drive [`step`](Self::step),
/// [`evaluate`](Self::evaluate) and [`checkpoint`](Self::checkpoint)
/// yourself and end with [`finish`](Self::finish).
pub struct Trainer<'r, B: AutodiffBackend, M: AutodiffModule<B>> {
    config: TrainConfig,
    run: &'r mut RunDir,
    progress: &'r indicatif::ProgressBar,
    optim: Optimizers<M, B>,
    peers: Option<Peers<B>>,
    device: B::Device,
    n_train: usize,
    total: usize,
    state: RunState,
    best: Option<M::InnerModule>,
    replicas: ReplicaTally,
    started: Instant,
    start_tokens: usize,
    hook: Option<Box<dyn StepHook<M> + 'r>>,
}

impl<'r, B, M> Trainer<'r, B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Clone,
{
    /// A run over `n_train` training examples writing into `run`; with
    /// `resume` (a `last/` checkpoint), its optimizer state and run state
    /// continue exactly where they stopped.
    pub fn new(
        model: &M,
        config: &TrainConfig,
        n_train: usize,
        run: &'r mut RunDir,
        progress: &'r indicatif::ProgressBar,
        resume: Option<&Path>,
    ) -> Result<Self> {
        config.validate()?;
        let device = device_of(model);
        let peers = Peers::<B>::register(config.devices, config.cluster.as_ref(), &device)?;
        let mut optim = Optimizers::for_run(config);
        let mut state = RunState::default();
        if let Some(dir) = resume {
            state = RunState::read(dir, config, n_train)?;
            optim = optim.load_state(model, dir, &device)?;
        }
        let total = config.total_steps(n_train);
        progress.set_length(total as u64);
        progress.set_position(state.step as u64);
        let start_tokens = state.tokens;
        Ok(Trainer {
            config: config.clone(),
            run,
            progress,
            optim,
            peers,
            device,
            n_train,
            total,
            state,
            best: None,
            replicas: ReplicaTally::default(),
            started: Instant::now(),
            start_tokens,
            hook: None,
        })
    }

    /// The run with `hook` called around every optimizer step.
    pub fn with_hook(mut self, hook: Box<dyn StepHook<M> + 'r>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Where the run stands.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// One optimizer step over the micro-batches `group` (training-example
    /// indices; their gradients are averaged): returns the stepped model.
    /// A non-finite loss or gradient stops the run before the step, naming
    /// it and the last good checkpoint. Logs every tenth step.
    pub fn step<L>(&mut self, model: M, group: &[&[usize]], loss: &L) -> Result<M>
    where
        L: Fn(&M, &[usize]) -> Result<(BatchLoss<B>, usize)> + Sync,
    {
        let (step, epoch) = (self.state.step, self.state.epoch);
        let mut accum = GradientsAccumulator::<M>::new();
        let mut step_loss = 0.0;
        for (k, batch) in group.iter().enumerate() {
            // Seeded per micro-batch: dropout masks do not depend on
            // what ran before (a resumed run draws the same ones).
            let micro = (step * self.config.grad_accum + k) as u64;
            B::seed(&self.device, self.config.seed.wrapping_add(micro));
            let weight = 1.0 / group.len() as f64;
            let (value, n_tokens, grads) = match &self.peers {
                Some(p) => {
                    let (value, n, grads, shards) = p.step(&model, batch, weight, loss)?;
                    self.replicas.add(&shards);
                    (value, n, grads)
                }
                None => differentiate(&model, loss(&model, batch)?, weight),
            };
            if !value.is_finite() {
                return Err(non_finite(
                    self.run,
                    format!("training loss is {value} at step {step} (epoch {epoch})"),
                ));
            }
            step_loss += value * weight;
            self.state.tokens = self.state.tokens.saturating_add(n_tokens);
            accum.accumulate(&model, grads);
        }
        let grads = accum.grads();
        // A finite loss can still have an infinite or NaN gradient; one
        // optimizer step with it would ruin every weight it touches.
        if let Some(path) = non_finite_gradient(&model, &grads) {
            return Err(non_finite(
                self.run,
                format!("the gradient of {path} is not finite at step {step} (epoch {epoch})"),
            ));
        }
        let lr = self.config.lr_at(step, self.total);
        if let Some(hook) = &mut self.hook {
            hook.before_step(&model, &grads);
        }
        let model = self.optim.step(lr, model, grads);
        let model = match &mut self.hook {
            Some(hook) => hook.after_step(model, step)?,
            None => model,
        };
        let state = &mut self.state;
        state.step += 1;
        state.steps_in_epoch += 1;
        state.window.push(step_loss);
        let secs = self.started.elapsed().as_secs_f64();
        let rate = state.tokens.saturating_sub(self.start_tokens) as f64 / secs;
        self.progress.set_position(state.step as u64);
        self.progress
            .set_message(format!("loss {step_loss:.4}  {rate:.0} tok/s"));
        if state.step.is_multiple_of(10) || state.step == self.total {
            let mean = state.window.iter().sum::<f64>() / state.window.len() as f64;
            state.window.clear();
            state.losses.push((state.step, mean));
            let mut line = json!({"step": state.step, "epoch": epoch, "loss": mean, "lr": lr,
                           "tokens_per_s": rate, "elapsed_s": secs});
            if self.peers.is_some() {
                line["replicas"] = self.replicas.take();
            }
            self.run.log(line)?;
        }
        Ok(model)
    }

    /// `metric` with the run's metric name and direction.
    fn metric_of(&self, value: f64) -> Metric {
        let (name, higher) = self.state.metric.clone().unwrap_or(("metric".into(), true));
        Metric {
            name: static_name(&name),
            value,
            higher_is_better: higher,
        }
    }

    /// The best evaluation so far.
    fn best_metric(&self) -> Option<Metric> {
        self.state
            .evals
            .iter()
            .map(|e| self.metric_of(e.1))
            .reduce(|a, b| if b.better_than(&a) { b } else { a })
    }

    /// Evaluates the inference module (`eval`), logs and records the
    /// result, and writes `best/` through `save` when it improved on every
    /// earlier evaluation. Returns whether it did.
    pub fn evaluate(
        &mut self,
        model: &M,
        eval: &mut impl FnMut(&M::InnerModule) -> Result<Metric>,
        save: &mut impl FnMut(&M::InnerModule, &Path, Saving) -> Result<()>,
    ) -> Result<bool> {
        let inner = model.valid();
        let m = eval(&inner)?;
        self.run
            .log(json!({"step": self.state.step, "eval": {m.name: m.value}}))?;
        let best = self.best_metric();
        self.state.metric = Some((m.name.to_string(), m.higher_is_better));
        self.state.evals.push((self.state.step, m.value));
        let improved = best.is_none_or(|b| m.better_than(&b));
        if improved {
            self.run
                .checkpoint("best", |dir| save(&inner, dir, Saving::Best))?;
            self.best = Some(inner);
            self.state.since_best = 0;
        } else {
            self.state.since_best += 1;
        }
        Ok(improved)
    }

    /// Writes `last/`: what `save` writes, the optimizer state and the run
    /// state, everything `--resume` needs.
    pub fn checkpoint(
        &mut self,
        model: &M,
        save: &mut impl FnMut(&M::InnerModule, &Path, Saving) -> Result<()>,
    ) -> Result<()> {
        let bytes = self.optim.state_bytes(model)?;
        let inner = model.valid();
        let state = &self.state;
        self.run.checkpoint("last", |dir| {
            save(&inner, dir, Saving::Last)?;
            write_atomic(&dir.join(OPTIMIZER_FILE), &bytes)?;
            let text = serde_json::to_string(state).expect("the state serialises");
            write_atomic(&dir.join(STATE_FILE), text.as_bytes())
        })?;
        Ok(())
    }

    /// Ends the run: the loss plot, the outcome, and the inference module
    /// at its best evaluation (the last one when never evaluated).
    pub fn finish(self, model: &M, stopped_early: bool) -> Result<(M::InnerModule, Outcome)> {
        self.progress.finish_and_clear();
        let evals: Vec<(usize, Metric)> = self
            .state
            .evals
            .iter()
            .map(|e| (e.0, self.metric_of(e.1)))
            .collect();
        let out = Outcome {
            steps: self.state.step,
            losses: self.state.losses.clone(),
            best: self.best_metric(),
            evals,
            stopped_early,
        };
        let evals: Vec<(usize, f64)> = out.evals.iter().map(|(s, m)| (*s, m.value)).collect();
        let curve = crate::plot::Curve {
            steps: out.steps,
            losses: &out.losses,
            evals: &evals,
            metric: out.evals.first().map_or("", |e| e.1.name),
        };
        write_atomic(
            &self.run.path().join("loss.svg"),
            crate::plot::svg(&curve).as_bytes(),
        )?;
        Ok((self.best.unwrap_or_else(|| model.valid()), out))
    }

    /// The whole run: epochs of seeded shuffles cut into batches of
    /// `grad_accum` micro-batches, one [`step`](Self::step) each, an
    /// evaluation and a `last/` checkpoint every `eval_every` steps (or per
    /// epoch), early stopping, and a final evaluation. `loss` gives the mean
    /// loss of a batch of training-example indices and its token count
    /// (called from every replica's thread); `eval` scores the inference
    /// module on the held-out split; `save` writes a checkpoint folder.
    pub fn fit<L, E, S>(
        mut self,
        mut model: M,
        loss: L,
        mut eval: E,
        mut save: S,
    ) -> Result<(M::InnerModule, Outcome)>
    where
        L: Fn(&M, &[usize]) -> Result<(BatchLoss<B>, usize)> + Sync,
        E: FnMut(&M::InnerModule) -> Result<Metric>,
        S: FnMut(&M::InnerModule, &Path, Saving) -> Result<()>,
    {
        let config = self.config.clone();
        let mut stopped_early = false;
        let mut halted = false;
        let first_step = self.state.step;
        'epochs: while self.state.epoch < config.epochs && self.state.step < self.total {
            let epoch = self.state.epoch;
            let mut order: Vec<usize> = (0..self.n_train).collect();
            SplitMix64(config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9)).shuffle(&mut order);
            let batches: Vec<&[usize]> = order.chunks(config.batch).collect();
            let skip = self.state.steps_in_epoch;
            for group in batches.chunks(config.grad_accum).skip(skip) {
                model = self.step(model, group, &loss)?;
                let step = self.state.step;
                let epoch_done = self.state.steps_in_epoch * config.grad_accum >= batches.len();
                if epoch_done {
                    self.state.epoch += 1;
                    self.state.steps_in_epoch = 0;
                }
                let eval_now = (config.eval_every > 0 && step.is_multiple_of(config.eval_every))
                    || (config.eval_every == 0 && epoch_done);
                if eval_now {
                    self.evaluate(&model, &mut eval, &mut save)?;
                    self.checkpoint(&model, &mut save)?;
                    if config.patience.is_some_and(|p| self.state.since_best >= p) {
                        stopped_early = true;
                        break 'epochs;
                    }
                }
                if step >= self.total {
                    break 'epochs;
                }
                if config.stop_after.is_some_and(|n| step - first_step >= n) {
                    halted = true;
                    break 'epochs;
                }
                if epoch_done {
                    continue 'epochs;
                }
            }
        }
        let unevaluated = self
            .state
            .evals
            .last()
            .is_none_or(|(s, _)| *s != self.state.step);
        if !halted && !stopped_early && unevaluated {
            self.evaluate(&model, &mut eval, &mut save)?;
        }
        self.checkpoint(&model, &mut save)?;
        self.finish(&model, stopped_early)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{ElementConversion, Tensor};

    #[derive(burn::module::Module, Debug)]
    struct Weights<B: burn::tensor::backend::Backend> {
        w: burn::module::Param<Tensor<B, 1>>,
    }

    /// A finite loss whose gradient is not (√|w| at w = 0) stops training
    /// before the optimizer step, naming the parameter and the step.
    #[test]
    fn a_non_finite_gradient_stops_training() {
        type B = burn::backend::Autodiff<burn::backend::NdArray>;
        let device = Default::default();
        let model = Weights::<B> {
            w: burn::module::Param::from_tensor(Tensor::from_floats([0.0, 1.0], &device)),
        };
        let dir = std::env::temp_dir().join(format!("peft-grad-guard-{}", std::process::id()));
        let mut run = RunDir::create(&dir, false).unwrap();
        let config = TrainConfig {
            batch: 1,
            ..Default::default()
        };
        let progress = indicatif::ProgressBar::hidden();
        let trainer = Trainer::new(&model, &config, 1, &mut run, &progress, None).unwrap();
        let Err(err) = trainer.fit(
            model,
            |m: &Weights<B>, _| {
                let l = m.w.val().abs().sqrt().sum();
                assert!(l.clone().into_scalar().elem::<f32>().is_finite());
                Ok((BatchLoss::Graph(l), 1))
            },
            |_| {
                Ok(Metric {
                    name: "accuracy",
                    value: 0.0,
                    higher_is_better: true,
                })
            },
            |_, _, _| Ok(()),
        ) else {
            panic!("training did not stop");
        };
        let msg = err.to_string();
        assert!(
            msg.contains("gradient of w") && msg.contains("step 0"),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
