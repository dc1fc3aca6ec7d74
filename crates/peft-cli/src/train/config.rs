//! A run's settings: [`TrainConfig`] (what `peft train`'s flags set) and
//! [`Cluster`] (this process's place in a multi-machine job).

use serde::{Deserialize, Serialize};

use peft_core::{PeftError, Result};

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
    /// AdamW's epsilon, added to the root of the second moment: Burn's
    /// default 1e-5; PyTorch's AdamW (PEFT's Trainer) uses 1e-8. (Files of
    /// runs from before the field read as 1e-5, what they trained with.)
    #[serde(default = "burn_adam_epsilon")]
    pub adam_epsilon: f64,
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
    /// Stop this process after this many optimizer steps, as an interruption
    /// would: the schedule and data order stay those of the whole run, and
    /// `--resume` continues it.
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// Data-parallel workers: each micro-batch is split into this many
    /// shards, each run by its own model replica on its own thread, and the
    /// gradients are summed by an all-reduce of Burn's collective (each
    /// worker a peer). The update equals that of one worker on the whole
    /// micro-batch; dropout masks then depend on thread timing.
    #[serde(default = "one")]
    pub devices: usize,
    /// Several machines: this process is one node of a data-parallel job
    /// whose nodes meet through Burn's global collective. Not saved with the
    /// run (addresses change): a resumed node is given it again.
    #[serde(skip)]
    pub cluster: Option<Cluster>,
    /// LoRA+: LoRA's `B` matrices and every trained vector at this multiple
    /// of the learning rate, as PEFT's `create_loraplus_optimizer` groups
    /// them (`None`: one learning rate).
    #[serde(default)]
    pub loraplus_lr_ratio: Option<f64>,
}

/// This process's place in a multi-machine data-parallel job.
///
/// Every node runs the same `peft train` (same data, seed and settings)
/// with `devices` replicas; each micro-batch is cut into `nodes · devices`
/// shards, node `rank` computing shards `rank·devices ..`, and the
/// gradients are summed over all of them (Burn's collective: within the
/// node, then a tree across nodes through the orchestrator). Every node then
/// takes the same optimizer step, so all hold the same adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Nodes in the job.
    pub nodes: usize,
    /// This node's index in `0..nodes`.
    pub rank: usize,
    /// The orchestrator (`peft orchestrator --port P`): `ws://host:P`.
    pub orchestrator: String,
    /// This node as the others reach it, `ws://host:port`; its tensor data
    /// service listens on that port.
    pub address: String,
}

impl Cluster {
    /// The port of [`address`](Self::address).
    pub fn data_port(&self) -> Result<u16> {
        self.address
            .trim_end_matches('/')
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| {
                PeftError::Config(format!(
                    "node address {} has no port (ws://host:port)",
                    self.address
                ))
            })
    }

    fn check(&self) -> Result<()> {
        if self.nodes == 0 || self.rank >= self.nodes {
            return Err(PeftError::Config(format!(
                "node rank {} is not in 0..{} nodes",
                self.rank, self.nodes
            )));
        }
        for a in [&self.orchestrator, &self.address] {
            if !a.starts_with("ws://") {
                return Err(PeftError::Config(format!(
                    "{a} is not a ws://host:port address"
                )));
            }
        }
        self.data_port().map(|_| ())
    }
}

fn one() -> usize {
    1
}

fn burn_adam_epsilon() -> f64 {
    1e-5
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
            adam_epsilon: burn_adam_epsilon(),
            clip_norm: Some(1.0),
            eval_every: 0,
            patience: None,
            seed: 42,
            max_steps: None,
            stop_after: None,
            devices: 1,
            cluster: None,
            loraplus_lr_ratio: None,
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
        if self.batch == 0 || self.grad_accum == 0 || self.epochs == 0 || self.devices == 0 {
            return bad("batch, grad-accum, epochs and devices must be at least 1".into());
        }
        let nodes = match &self.cluster {
            Some(c) => {
                c.check()?;
                c.nodes
            }
            None => 1,
        };
        if self.devices * nodes > self.batch {
            return bad(format!(
                "{} data-parallel workers ({nodes} node(s) × {} devices) need micro-batches of at least as many examples (batch {})",
                self.devices * nodes,
                self.devices,
                self.batch
            ));
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return bad(format!(
                "warmup is a share of the steps in [0, 1), got {}",
                self.warmup
            ));
        }
        if let Some(r) = self
            .loraplus_lr_ratio
            .filter(|r| !(r.is_finite() && *r > 0.0))
        {
            return bad(format!("--loraplus-lr-ratio must be positive, got {r}"));
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            return bad(format!(
                "--adam-epsilon must be positive, got {}",
                self.adam_epsilon
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be zero or positive, got {}",
                self.weight_decay
            ));
        }
        if self.clip_norm.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return bad("clip norm must be positive".into());
        }
        Ok(())
    }

    /// Optimizer steps of the whole run for `n_train` examples.
    pub fn total_steps(&self, n_train: usize) -> usize {
        let total = self.steps_per_epoch(n_train) * self.epochs;
        self.max_steps.map_or(total, |m| m.min(total)).max(1)
    }

    /// Optimizer steps in one epoch of `n_train` examples.
    pub fn steps_per_epoch(&self, n_train: usize) -> usize {
        n_train.div_ceil(self.batch).div_ceil(self.grad_accum)
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
        assert!(TrainConfig {
            batch: 0,
            ..c.clone()
        }
        .validate()
        .is_err());
        for (bad, flag) in [
            (
                TrainConfig {
                    adam_epsilon: 0.0,
                    ..c.clone()
                },
                "--adam-epsilon",
            ),
            (
                TrainConfig {
                    weight_decay: -0.1,
                    ..c.clone()
                },
                "--weight-decay",
            ),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err}");
        }
        // A run's file from before the epsilon was a setting reads as the
        // 1e-5 it trained with.
        let mut old = serde_json::to_value(&c).unwrap();
        old.as_object_mut().unwrap().remove("adam_epsilon");
        let read: TrainConfig = serde_json::from_value(old).unwrap();
        assert_eq!(read.adam_epsilon, 1e-5);
    }
}
