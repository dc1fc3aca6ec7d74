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

use burn::module::{AutodiffModule, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::AdamW;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use peft_core::io::write_atomic;
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
            stop_after: None,
            devices: 1,
            cluster: None,
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

/// Where a run stands, saved beside the `last/` checkpoint with the
/// optimizer state so that `--resume` continues exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps done.
    pub step: usize,
    /// The current epoch.
    pub epoch: usize,
    /// Optimizer steps done in the current epoch.
    pub steps_in_epoch: usize,
    /// Training tokens seen.
    pub tokens: usize,
    /// Losses of the steps since the last logged mean.
    pub window: Vec<f64>,
    /// Logged mean losses.
    pub losses: Vec<(usize, f64)>,
    /// Evaluations: `(step, value)`.
    pub evals: Vec<(usize, f64)>,
    /// The metric's name and direction, once evaluated.
    pub metric: Option<(String, bool)>,
    /// Evaluations since the best one.
    pub since_best: usize,
}

impl RunState {
    /// Refuses a saved state this run cannot continue from: past the run's
    /// last step or epoch, or further into an epoch than it has steps (the
    /// epoch loop would then skip every batch and never end).
    fn check_resumable(&self, config: &TrainConfig, n_train: usize, path: &Path) -> Result<()> {
        let steps_per_epoch = config.steps_per_epoch(n_train);
        let total = config.total_steps(n_train);
        let problem = if self.step > total {
            Some(format!(
                "step {} is past the run's {total} steps",
                self.step
            ))
        } else if self.epoch > config.epochs {
            Some(format!(
                "epoch {} is past the run's {} epochs",
                self.epoch, config.epochs
            ))
        } else if self.steps_in_epoch >= steps_per_epoch.max(1) {
            Some(format!(
                "{} steps into an epoch of {steps_per_epoch}",
                self.steps_in_epoch
            ))
        } else {
            None
        };
        match problem {
            Some(message) => Err(PeftError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("cannot resume: {message}"),
            }),
            None => Ok(()),
        }
    }
}

/// The optimizer's state: per parameter id.
type OptimRecord<M, B> = <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record;

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.bin";

fn static_name(name: &str) -> &'static str {
    match name {
        "accuracy" => "accuracy",
        "perplexity" => "perplexity",
        _ => "metric",
    }
}

/// Float parameters of `module` in visiting order: the key that maps
/// optimizer state across processes (parameter ids are per process).
fn param_ids<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    module: &M,
) -> Vec<burn::module::ParamId> {
    struct Ids(Vec<burn::module::ParamId>);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

/// The shapes of float parameters of `module`, in [`param_ids`]' order.
fn param_shapes<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    module: &M,
) -> Vec<Vec<usize>> {
    struct Shapes(Vec<Vec<usize>>);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Shapes {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            self.0.push(param.val().dims().to_vec());
        }
    }
    let mut shapes = Shapes(Vec::new());
    module.visit(&mut shapes);
    shapes.0
}

/// The shapes of a saved AdamW state's two moments; `None` for a rank no
/// parameter of ours has (above 4).
fn moment_shapes<B: AutodiffBackend>(
    record: &burn::optim::record::AdaptorRecord<AdamW, B>,
) -> Option<[Vec<usize>; 2]> {
    use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
    let AdaptorRecord::V1(v1) = record;
    macro_rules! moments {
        ($s:expr) => {
            Some([
                $s.momentum.moment_1.dims().to_vec(),
                $s.momentum.moment_2.dims().to_vec(),
            ])
        };
    }
    match v1 {
        AdaptorRecordV1::Rank1(s) => moments!(s),
        AdaptorRecordV1::Rank2(s) => moments!(s),
        AdaptorRecordV1::Rank3(s) => moments!(s),
        AdaptorRecordV1::Rank4(s) => moments!(s),
        _ => None,
    }
}

/// Where a run writes: `metrics.jsonl`, `best/` (the best checkpoint,
/// replaced atomically), `loss.svg`.
pub struct RunDir {
    dir: PathBuf,
    metrics: std::fs::File,
}

impl RunDir {
    /// Creates `dir` and starts its metrics log (`append`: continue the log
    /// of a resumed run). What an interrupted checkpoint write left in `dir`
    /// is removed.
    pub fn create(dir: &Path, append: bool) -> Result<Self> {
        let io = |source| PeftError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        sweep(dir).map_err(io)?;
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(dir.join("metrics.jsonl"))
            .map_err(io)?;
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

    /// Writes a checkpoint under `name` atomically. The folder is written
    /// whole as `<name>.<n>` (`n` a fresh version), then `<name>` — a
    /// symbolic link — is replaced by one to it with a rename, which is
    /// atomic: whenever the process dies, `<name>` is the previous complete
    /// checkpoint or the new one. The previous version is deleted afterwards.
    pub fn checkpoint(
        &self,
        name: &str,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| PeftError::Io { path: p, source }
        };
        let link = self.dir.join(name);
        let previous = std::fs::read_link(&link).ok();
        let version = (0u64..)
            .map(|n| format!("{name}.{}-{n}", std::process::id()))
            .find(|v| !self.dir.join(v).exists())
            .expect("some version name is free");
        let building = self.dir.join(format!(".{version}.partial"));
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building).map_err(io(&building))?;
        write(&building)?;
        std::fs::rename(&building, self.dir.join(&version)).map_err(io(&building))?;
        if link.is_dir() && previous.is_none() {
            // A plain folder from an older version of this program.
            std::fs::remove_dir_all(&link).map_err(io(&link))?;
        }
        let tmp_link = self
            .dir
            .join(format!(".{name}.link-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp_link);
        symlink_dir(Path::new(&version), &tmp_link).map_err(io(&tmp_link))?;
        std::fs::rename(&tmp_link, &link).map_err(io(&link))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        if let Some(old) = previous.filter(|p| *p != Path::new(&version)) {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
        Ok(link)
    }
}

/// Removes what a writer killed inside [`RunDir::checkpoint`] leaves
/// behind: `.<version>.partial` folders, `.<name>.link-<pid>` temporary
/// links, and checkpoint versions (`<name>.<pid>-<n>`) that no link points
/// to. What a link points to is never touched.
fn sweep(dir: &Path) -> std::io::Result<()> {
    let entries: Vec<std::fs::DirEntry> =
        std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    let linked: std::collections::HashSet<std::ffi::OsString> = entries
        .iter()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| t.file_name().map(|n| n.to_os_string()))
        .collect();
    for e in &entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_symlink = e.file_type()?.is_symlink();
        let scratch =
            name.starts_with('.') && (name.ends_with(".partial") || name.contains(".link-"));
        let orphan = !is_symlink && is_version_name(&name) && !linked.contains(&e.file_name());
        if scratch && is_symlink {
            std::fs::remove_file(e.path())?;
        } else if scratch || orphan {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

/// Whether `name` is a checkpoint version folder's name: `<name>.<pid>-<n>`.
fn is_version_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.rsplit_once('.')
        .and_then(|(base, tail)| Some((base, tail.split_once('-')?)))
        .is_some_and(|(base, (pid, n))| !base.is_empty() && digits(pid) && digits(n))
}

#[cfg(unix)]
fn symlink_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn symlink_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_dir(target, link)
}

/// The error that stops a run: `what` went non-finite, and where the last
/// good checkpoint is.
fn non_finite(run: &RunDir, what: String) -> PeftError {
    let kept = run.path().join("best");
    let last = if kept.exists() {
        kept.display().to_string()
    } else {
        "none (no evaluation yet)".into()
    };
    PeftError::NonFinite(format!(
        "{what}; stopped. The last good checkpoint is {last}"
    ))
}

/// The module path of the first parameter whose gradient in `grads` holds
/// a NaN or an infinity (its absolute sum is not finite).
fn non_finite_gradient<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> Option<String> {
    struct Check<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        bad: Option<String>,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Check<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if self.bad.is_some() {
                return;
            }
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let sum: f64 = g.abs().sum().into_scalar().elem::<f64>();
                if !sum.is_finite() {
                    let path = self.path.iter().filter(|p| !p.is_empty()).cloned();
                    self.bad = Some(path.collect::<Vec<_>>().join("."));
                }
            }
        }
    }
    let mut check = Check {
        grads,
        path: Vec::new(),
        bad: None,
    };
    model.visit(&mut check);
    check.bad
}

/// The loss of one micro-batch, as `fit`'s `loss` gives it.
pub enum BatchLoss<B: AutodiffBackend> {
    /// A loss with its graph: `fit` runs the backward pass.
    Graph(Tensor<B, 1>),
    /// A loss already differentiated (layer by layer, for a quantized base):
    /// its value and the gradients of every trainable parameter.
    Differentiated {
        /// The loss.
        value: f64,
        /// Its gradients, unscaled.
        grads: GradientsParams,
    },
}

/// Multiplies every gradient in `grads` that belongs to `model` by `factor`.
fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    factor: f64,
) -> GradientsParams {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g * self.factor);
            }
        }
    }
    let mut grads = grads;
    model.visit(&mut Scale {
        grads: &mut grads,
        factor,
    });
    grads
}

/// The value of a micro-batch's loss, its token count, and its gradients
/// scaled by `weight`.
fn differentiate<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    (loss, n_tokens): (BatchLoss<B>, usize),
    weight: f64,
) -> (f64, usize, GradientsParams) {
    match loss {
        BatchLoss::Graph(l) => {
            let value = l.clone().into_scalar().elem::<f32>() as f64;
            let grads = GradientsParams::from_grads((l * weight).backward(), model);
            (value, n_tokens, grads)
        }
        BatchLoss::Differentiated { value, grads } if weight == 1.0 => (value, n_tokens, grads),
        BatchLoss::Differentiated { value, grads } => {
            (value, n_tokens, scale_grads(model, grads, weight))
        }
    }
}

/// Gives every trainable parameter a fresh autodiff leaf (same values, same
/// `ParamId`). Replicas built this way record separate graphs: Burn 0.21's
/// autodiff deadlocks when two threads extend graphs that share a leaf
/// (one thread in `backward` holding the graph while waiting for the graph
/// locator, the other holding the locator while waiting for that graph).
struct FreshLeaves;

impl<B: AutodiffBackend> burn::module::ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        if param.is_require_grad() {
            param.set_require_grad(false).set_require_grad(true)
        } else {
            param
        }
    }
}

/// The data-parallel workers of a run: this process's peers of Burn's
/// collective (one per device), registered for the run's lifetime and, in a
/// multi-machine job, joined to the other nodes' through the orchestrator.
struct Peers<B: AutodiffBackend> {
    /// Replica `i`'s device (one per replica in this process).
    devices: Vec<B::Device>,
    /// Index of this process's first shard among all the job's shards.
    first: usize,
    /// Shards of each micro-batch over the whole job.
    total: usize,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> Peers<B> {
    /// `None` for one device on one machine; otherwise `devices` registered
    /// peers, peer `i` on [`replica_device`]`(device, i)`.
    fn register(
        devices: usize,
        cluster: Option<&Cluster>,
        device: &B::Device,
    ) -> Result<Option<Self>> {
        use burn::collective::{register, reset_collective, AllReduceStrategy, CollectiveConfig};
        if devices <= 1 && cluster.is_none() {
            return Ok(None);
        }
        // A run that failed earlier in this process may have left peers.
        reset_collective::<B::InnerBackend>();
        let mut config = CollectiveConfig::default().with_num_devices(devices);
        let (first, total) = match cluster {
            None => (0, devices),
            Some(c) => {
                let address = |a: &str| {
                    a.parse::<burn_communication::Address>()
                        .map_err(|e| PeftError::Config(format!("address {a}: {e}")))
                };
                // A tree, not Burn's default ring, across nodes: a ring
                // cuts every tensor into one slice per node and refuses
                // tensors smaller than that (a bias of a small head).
                config = config
                    .with_num_nodes(c.nodes as u32)
                    .with_global_address(address(&c.orchestrator)?)
                    .with_node_address(address(&c.address)?)
                    .with_data_service_port(c.data_port()?)
                    .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2));
                (c.rank * devices, c.nodes * devices)
            }
        };
        let placed: Vec<B::Device> = (0..devices).map(|i| replica_device(device, i)).collect();
        // Registration is a barrier: every peer registers at once (and, in
        // a multi-machine job, every node).
        std::thread::scope(|s| {
            let joins: Vec<_> = placed
                .iter()
                .enumerate()
                .map(|(i, device)| {
                    let (device, config) = (device.clone(), config.clone());
                    s.spawn(move || register::<B::InnerBackend>(i.into(), device, config))
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("a registering thread panicked"))
                .collect::<std::result::Result<Vec<()>, _>>()
        })
        .map_err(|e| PeftError::State(format!("data-parallel peers do not register: {e:?}")))?;
        Ok(Some(Peers {
            devices: placed,
            first,
            total,
            _b: std::marker::PhantomData,
        }))
    }

    /// One micro-batch cut into the job's `total` contiguous shards, this
    /// process's run each on its own replica of `model` in its own thread;
    /// every shard's gradient is weighted by its share of the micro-batch
    /// (times `weight`), and an all-reduce sums the gradients, the loss and
    /// the token count over every shard of the job. A shard past the end of
    /// a short last batch contributes zeros (the all-reduce needs every
    /// peer). Returns the weighted mean loss, the tokens, the summed
    /// gradients, and each local shard's rows and mean loss.
    fn step<M, L>(
        &self,
        model: &M,
        batch: &[usize],
        weight: f64,
        loss: &L,
    ) -> Result<(f64, usize, GradientsParams, Vec<Shard>)>
    where
        M: AutodiffModule<B> + Clone,
        L: Fn(&M, &[usize]) -> Result<(BatchLoss<B>, usize)> + Sync,
    {
        use burn::collective::{PeerId, ReduceOperation};
        let size = batch.len().div_ceil(self.total);
        let shard = |k: usize| {
            let from = (k * size).min(batch.len());
            &batch[from..(from + size).min(batch.len())]
        };
        // Phase 1: every local shard's loss and gradients (an error here
        // leaves no local peer waiting in an all-reduce).
        let parts: Vec<Result<(f64, usize, GradientsParams, Shard)>> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..self.devices.len())
                .map(|i| {
                    let rows = shard(self.first + i);
                    let mut replica = model.clone().map(&mut FreshLeaves);
                    if self.devices[i] != self.devices[0] {
                        replica = replica.fork(&self.devices[i]);
                    }
                    let share = rows.len() as f64 / batch.len() as f64;
                    s.spawn(move || {
                        // An empty shard still differentiates (one row,
                        // weight 0) so that its peer has every gradient.
                        let run = if rows.is_empty() { &batch[..1] } else { rows };
                        let (value, n, grads) =
                            differentiate(&replica, loss(&replica, run)?, weight * share);
                        let n = if rows.is_empty() { 0 } else { n };
                        let seen = Shard {
                            rows: rows.len(),
                            loss: value,
                        };
                        Ok((value * share, n, grads, seen))
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("a data-parallel worker panicked"))
                .collect()
        });
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        let shards: Vec<Shard> = parts.iter().map(|p| p.3).collect();
        let device = model.devices().into_iter().next().unwrap_or_default();
        // Phase 2: the all-reduce, every peer at once: gradients, then the
        // loss and token count (so every node logs, and stops on, the
        // job's loss).
        let reduced: Vec<_> = std::thread::scope(|s| {
            let joins: Vec<_> = parts
                .into_iter()
                .enumerate()
                .map(|(i, (value, n, grads, _))| {
                    let (device, model) = (device.clone(), model.clone());
                    s.spawn(move || {
                        let grads = all_reduce_grads(&model, grads, PeerId::from(i))?;
                        let stats = Tensor::<B::InnerBackend, 1>::from_floats(
                            [value as f32, n as f32],
                            &device,
                        );
                        let stats = burn::collective::all_reduce::<B::InnerBackend>(
                            PeerId::from(i),
                            stats.into_primitive().tensor(),
                            ReduceOperation::Sum,
                        )?;
                        let stats: Vec<f32> = Tensor::<B::InnerBackend, 1>::from_primitive(
                            burn::tensor::TensorPrimitive::Float(stats),
                        )
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .unwrap_or_default();
                        Ok::<_, burn::collective::CollectiveError>((stats, grads))
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("an all-reduce thread panicked"))
                .collect()
        });
        let mut reduced = reduced
            .into_iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| PeftError::State(format!("the gradient all-reduce failed: {e:?}")))?;
        // Every peer now holds the same sums.
        let (stats, grads) = reduced.swap_remove(0);
        Ok((stats[0] as f64, stats[1].round() as usize, grads, shards))
    }
}

/// What one data-parallel replica computed for one micro-batch.
#[derive(Debug, Clone, Copy)]
struct Shard {
    /// Rows of the micro-batch it ran (0: past the end of a short batch).
    rows: usize,
    /// Its mean loss over those rows (meaningless when `rows` is 0).
    loss: f64,
}

/// Each local replica's rows and loss since the last log line: what
/// `metrics.jsonl` shows of data parallelism (so a run can be seen to have
/// split its batches).
#[derive(Default)]
struct ReplicaTally {
    rows: Vec<usize>,
    loss_sum: Vec<f64>,
}

impl ReplicaTally {
    fn add(&mut self, shards: &[Shard]) {
        self.rows.resize(shards.len(), 0);
        self.loss_sum.resize(shards.len(), 0.0);
        for (i, s) in shards.iter().enumerate() {
            self.rows[i] += s.rows;
            self.loss_sum[i] += s.loss * s.rows as f64;
        }
    }

    /// `[{rows, loss}]` per replica (the row-weighted mean loss), and a
    /// fresh tally.
    fn take(&mut self) -> serde_json::Value {
        let out = self
            .rows
            .iter()
            .zip(&self.loss_sum)
            .map(|(&rows, &sum)| json!({"rows": rows, "loss": sum / rows.max(1) as f64}))
            .collect();
        *self = Self::default();
        serde_json::Value::Array(out)
    }
}

/// The device of data-parallel replica `i`: device `i` of the main device's
/// kind (GPU `i` on CUDA or WGPU when the main device is GPU 0); on a CPU
/// backend, whose devices are all one, the main device itself.
pub fn replica_device<D: burn::tensor::backend::DeviceOps>(main: &D, i: usize) -> D {
    let id = main.to_id();
    D::from_id(burn::tensor::backend::DeviceId {
        type_id: id.type_id,
        index_id: id.index_id + i as u16,
    })
}

/// Sums every gradient over all peers of the collective, parameter by
/// parameter in the model's visiting order, which is the same in every
/// process. (Burn's `GradientsParams::all_reduce` goes in `ParamId` order,
/// and ids are drawn anew in each process: two nodes would pair different
/// parameters.)
fn all_reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    peer: burn::collective::PeerId,
) -> std::result::Result<GradientsParams, burn::collective::CollectiveError> {
    struct Reduce {
        grads: GradientsParams,
        peer: burn::collective::PeerId,
        done: std::collections::HashSet<ParamId>,
        error: Option<burn::collective::CollectiveError>,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Reduce {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            // A shared parameter is visited once per use, reduced once.
            if self.error.is_some() || !self.done.insert(param.id) {
                return;
            }
            let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
                return;
            };
            match burn::collective::all_reduce::<B::InnerBackend>(
                self.peer,
                g.into_primitive().tensor(),
                burn::collective::ReduceOperation::Sum,
            ) {
                Ok(sum) => self.grads.register(
                    param.id,
                    Tensor::<B::InnerBackend, D>::from_primitive(
                        burn::tensor::TensorPrimitive::Float(sum),
                    ),
                ),
                Err(e) => self.error = Some(e),
            }
        }
    }
    let mut reduce = Reduce {
        grads,
        peer,
        done: Default::default(),
        error: None,
    };
    model.visit(&mut reduce);
    match reduce.error {
        Some(e) => Err(e),
        None => Ok(reduce.grads),
    }
}

impl<B: AutodiffBackend> Drop for Peers<B> {
    fn drop(&mut self) {
        for i in 0..self.devices.len() {
            // Closes the node's link to the orchestrator after the last peer.
            let _ = burn::collective::finish_collective::<B::InnerBackend>(i.into());
        }
        burn::collective::reset_collective::<B::InnerBackend>();
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
    loss: impl Fn(&M, &[usize]) -> Result<(BatchLoss<B>, usize)> + Sync,
    mut eval: impl FnMut(&M::InnerModule) -> Result<Metric>,
    mut save: impl FnMut(&M::InnerModule, &Path) -> Result<()>,
    progress: &indicatif::ProgressBar,
    resume: Option<&Path>,
) -> Result<(M::InnerModule, Outcome)>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Clone,
{
    config.validate()?;
    let device = model.devices().into_iter().next().unwrap_or_default();
    let peers = Peers::<B>::register(config.devices, config.cluster.as_ref(), &device)?;
    let total = config.total_steps(n_train);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(
            config
                .clip_norm
                .map(|c| GradientClippingConfig::Norm(c as f32)),
        )
        .init::<B, M>();
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let mut state = RunState::default();
    if let Some(dir) = resume {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
            path: path.clone(),
            source,
        })?;
        state = serde_json::from_str(&text).map_err(|source| PeftError::Json {
            path: path.clone(),
            source,
        })?;
        state.check_resumable(config, n_train, &path)?;
        let path = dir.join(OPTIMIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|source| PeftError::Io {
            path: path.clone(),
            source,
        })?;
        // Burn's record conversion panics (rather than erring) on a tensor
        // whose rank or size disagrees with its shape (found by `cargo fuzz
        // run run_state`): a damaged file must be an error, not a crash.
        let loaded = peft_core::error::catch_panic(
            || recorder.load::<OptimRecord<M, B>>(bytes, &device),
            "",
        );
        let saved: OptimRecord<M, B> = match loaded {
            Ok(Ok(saved)) => saved,
            Ok(Err(e)) => {
                return Err(PeftError::Checkpoint {
                    path: path.clone(),
                    message: format!("optimizer state does not load: {e}"),
                })
            }
            Err(why) => {
                return Err(PeftError::Checkpoint {
                    path: path.clone(),
                    message: format!("optimizer state is damaged: {}", why.trim()),
                });
            }
        };
        // Saved under visiting positions; this process's ids differ.
        let ids = param_ids(&model);
        let shapes = param_shapes(&model);
        let mut record = Vec::new();
        for (position, value) in saved {
            let at = position.val() as usize;
            let id = ids.get(at).ok_or_else(|| PeftError::Checkpoint {
                path: path.clone(),
                message: "optimizer state for a parameter this model does not have".into(),
            })?;
            // A moment of another shape would fail (panic) in the first
            // optimizer step; refuse it here, naming the parameter.
            if moment_shapes(&value).is_none_or(|m| m.iter().any(|d| *d != shapes[at])) {
                return Err(PeftError::Checkpoint {
                    path: path.clone(),
                    message: format!(
                        "optimizer state of parameter {at} does not have its shape {:?}",
                        shapes[at]
                    ),
                });
            }
            record.push((*id, value));
        }
        optim = optim.load_record(record.into_iter().collect());
    }
    progress.set_length(total as u64);
    progress.set_position(state.step as u64);
    let metric_of = |st: &RunState, v: f64| {
        let (name, higher) = st.metric.clone().unwrap_or(("metric".into(), true));
        Metric {
            name: static_name(&name),
            value: v,
            higher_is_better: higher,
        }
    };
    let mut best_model: Option<M::InnerModule> = None;
    let start = Instant::now();
    let start_tokens = state.tokens;
    let evaluate = |model: &M,
                    state: &mut RunState,
                    run: &mut RunDir,
                    eval: &mut dyn FnMut(&M::InnerModule) -> Result<Metric>,
                    save: &mut dyn FnMut(&M::InnerModule, &Path) -> Result<()>,
                    best_model: &mut Option<M::InnerModule>|
     -> Result<bool> {
        let inner = model.valid();
        let m = eval(&inner)?;
        run.log(json!({"step": state.step, "eval": {m.name: m.value}}))?;
        let best = state
            .evals
            .iter()
            .map(|e| metric_of(state, e.1))
            .reduce(|a, b| if b.better_than(&a) { b } else { a });
        state.metric = Some((m.name.to_string(), m.higher_is_better));
        state.evals.push((state.step, m.value));
        let improved = best.is_none_or(|b| m.better_than(&b));
        if improved {
            run.checkpoint("best", |dir| save(&inner, dir))?;
            *best_model = Some(inner);
            state.since_best = 0;
        } else {
            state.since_best += 1;
        }
        Ok(improved)
    };
    let write_last = |model: &M,
                      optim: &OptimizerAdaptor<AdamW, M, B>,
                      state: &RunState,
                      run: &RunDir,
                      save: &mut dyn FnMut(&M::InnerModule, &Path) -> Result<()>|
     -> Result<()> {
        let positions: std::collections::HashMap<ParamId, usize> = param_ids(model)
            .into_iter()
            .enumerate()
            .map(|(p, id)| (id, p))
            .collect();
        let record: OptimRecord<M, B> = optim
            .to_record()
            .into_iter()
            .filter_map(|(id, v)| positions.get(&id).map(|&p| (ParamId::from(p as u64), v)))
            .collect();
        let bytes = recorder
            .record(record, ())
            .map_err(|e| PeftError::State(format!("optimizer state: {e}")))?;
        let inner = model.valid();
        run.checkpoint("last", |dir| {
            save(&inner, dir)?;
            write_atomic(&dir.join(OPTIMIZER_FILE), &bytes)?;
            let text = serde_json::to_string(state).expect("the state serialises");
            write_atomic(&dir.join(STATE_FILE), text.as_bytes())
        })?;
        Ok(())
    };
    let mut stopped_early = false;
    let mut replicas = ReplicaTally::default();
    let mut halted = false;
    let first_step = state.step;
    'epochs: while state.epoch < config.epochs && state.step < total {
        let epoch = state.epoch;
        let mut order: Vec<usize> = (0..n_train).collect();
        SplitMix64(config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9)).shuffle(&mut order);
        let batches: Vec<&[usize]> = order.chunks(config.batch).collect();
        for group in batches.chunks(config.grad_accum).skip(state.steps_in_epoch) {
            let step = state.step;
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
                let weight = 1.0 / group.len() as f64;
                let (value, n_tokens, grads) = match &peers {
                    Some(p) => {
                        let (value, n, grads, shards) = p.step(&model, batch, weight, &loss)?;
                        replicas.add(&shards);
                        (value, n, grads)
                    }
                    None => differentiate(&model, loss(&model, batch)?, weight),
                };
                if !value.is_finite() {
                    return Err(non_finite(
                        run,
                        format!("training loss is {value} at step {step} (epoch {epoch})"),
                    ));
                }
                step_loss += value * weight;
                state.tokens = state.tokens.saturating_add(n_tokens);
                accum.accumulate(&model, grads);
            }
            let grads = accum.grads();
            // A finite loss can still have an infinite or NaN gradient; one
            // optimizer step with it would ruin every weight it touches.
            if let Some(path) = non_finite_gradient(&model, &grads) {
                return Err(non_finite(
                    run,
                    format!("the gradient of {path} is not finite at step {step} (epoch {epoch})"),
                ));
            }
            let lr = config.lr_at(step, total);
            model = optim.step(lr, model, grads);
            state.step += 1;
            state.steps_in_epoch += 1;
            state.window.push(step_loss);
            let secs = start.elapsed().as_secs_f64();
            let rate = state.tokens.saturating_sub(start_tokens) as f64 / secs;
            progress.set_position(state.step as u64);
            progress.set_message(format!("loss {step_loss:.4}  {rate:.0} tok/s"));
            if state.step.is_multiple_of(10) || state.step == total {
                let mean = state.window.iter().sum::<f64>() / state.window.len() as f64;
                state.window.clear();
                state.losses.push((state.step, mean));
                let mut line = json!({"step": state.step, "epoch": epoch, "loss": mean, "lr": lr,
                               "tokens_per_s": rate, "elapsed_s": secs});
                if peers.is_some() {
                    line["replicas"] = replicas.take();
                }
                run.log(line)?;
            }
            let epoch_done = state.steps_in_epoch * config.grad_accum >= batches.len();
            if epoch_done {
                state.epoch += 1;
                state.steps_in_epoch = 0;
            }
            let eval_now = (config.eval_every > 0 && state.step.is_multiple_of(config.eval_every))
                || (config.eval_every == 0 && epoch_done);
            if eval_now {
                evaluate(
                    &model,
                    &mut state,
                    run,
                    &mut eval,
                    &mut save,
                    &mut best_model,
                )?;
                write_last(&model, &optim, &state, run, &mut save)?;
                if config.patience.is_some_and(|p| state.since_best >= p) {
                    stopped_early = true;
                    break 'epochs;
                }
            }
            if state.step >= total {
                break 'epochs;
            }
            if config
                .stop_after
                .is_some_and(|n| state.step - first_step >= n)
            {
                halted = true;
                break 'epochs;
            }
            if epoch_done {
                continue 'epochs;
            }
        }
    }
    if !halted && !stopped_early && state.evals.last().is_none_or(|(s, _)| *s != state.step) {
        evaluate(
            &model,
            &mut state,
            run,
            &mut eval,
            &mut save,
            &mut best_model,
        )?;
    }
    write_last(&model, &optim, &state, run, &mut save)?;
    progress.finish_and_clear();
    let evals: Vec<(usize, Metric)> = state
        .evals
        .iter()
        .map(|e| (e.0, metric_of(&state, e.1)))
        .collect();
    let best = evals
        .iter()
        .map(|e| e.1)
        .reduce(|a, b| if b.better_than(&a) { b } else { a });
    let out = Outcome {
        steps: state.step,
        losses: state.losses.clone(),
        evals,
        best,
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
        &run.path().join("loss.svg"),
        crate::plot::svg(&curve).as_bytes(),
    )?;
    let last = model.valid();
    Ok((best_model.unwrap_or(last), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_of_a_cpu_backend_share_its_device() {
        let cpu = burn::backend::ndarray::NdArrayDevice::Cpu;
        assert_eq!(replica_device(&cpu, 0), cpu);
        assert_eq!(replica_device(&cpu, 3), cpu);
    }

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
        let Err(err) = fit(
            model,
            &config,
            1,
            &mut run,
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
            |_, _| Ok(()),
            &indicatif::ProgressBar::hidden(),
            None,
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
