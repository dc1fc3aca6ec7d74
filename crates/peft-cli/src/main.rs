//! `peft`: fine-tune, evaluate, inspect and run adapters from the command line.
//!
//!     peft train --method lora --model DIR --data FILE --task seq-cls --out runs/x
//!     peft eval --model DIR --adapter runs/x/best --data FILE --task seq-cls
//!     peft generate --model model.gguf [--adapter DIR] --prompt "Once upon a time"
//!     peft forward --model DIR [--adapter DIR] --ids ids.json --out logits.safetensors
//!     peft merge --model DIR --adapter DIR --out merged/
//!     peft inspect DIR
//!
//! Every failure is a message naming the file and the problem, and a
//! non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use peft_adapter::BnConfig;
use peft_cli::jobs::{self, Task, TrainJob};
use peft_cli::tasks::Method;
use peft_cli::train::{Schedule, TrainConfig};
use peft_core::backends::{BackendChoice, BackendKind};
use peft_core::config::TargetModules;
use peft_core::generate::Sampler;
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType, PromptTuningInit};
use peft_core::{Ia3Config, LoraConfig, PeftError};
use peft_lycoris::{LohaConfig, LokrConfig, MethodConfig};
use peft_oft::OftConfig;

#[derive(Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning of transformer models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a command computes: `--backend` and `--device`, on every command
/// that runs a model.
#[derive(Args, Clone, Copy)]
struct BackendArgs {
    /// Backend: flex (CPU, the default), ndarray (CPU), wgpu or cuda (GPU;
    /// each needs the cargo feature of its name, e.g. `cargo install --path
    /// crates/peft-cli --features cuda`).
    #[arg(long, default_value = "flex", value_parser = parse_backend)]
    backend: BackendKind,
    /// Device index on that backend (GPU i; a CPU backend has device 0 only).
    /// Default: the backend's default device.
    #[arg(long)]
    device: Option<usize>,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse().map_err(|e: PeftError| e.to_string())
}

impl From<BackendArgs> for BackendChoice {
    fn from(a: BackendArgs) -> Self {
        BackendChoice {
            kind: a.backend,
            device: a.device,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Lora,
    Dora,
    Ia3,
    Loha,
    Lokr,
    Oft,
    Adapter,
    Prefix,
    Prompt,
}

#[derive(Clone, Copy, ValueEnum)]
enum TaskArg {
    SeqCls,
    CausalLm,
}

impl From<TaskArg> for Task {
    fn from(t: TaskArg) -> Task {
        match t {
            TaskArg::SeqCls => Task::SeqCls,
            TaskArg::CausalLm => Task::CausalLm,
        }
    }
}

/// `--quantize`.
#[derive(Clone, Copy, ValueEnum)]
enum QuantizeArg {
    Gguf,
    Nf4,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Linear,
    Cosine,
    Constant,
}

/// Parsed once per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model with an adapter; writes metrics.jsonl, loss.svg and
    /// the best checkpoint (PEFT's / AdapterHub's format) under --out.
    Train {
        #[command(flatten)]
        on: BackendArgs,
        /// The method.
        #[arg(long, value_enum, required_unless_present = "resume")]
        method: Option<MethodArg>,
        /// Continue the run in this folder from its last checkpoint. Its
        /// settings come from the run: the job's flags are refused beside it
        /// (--stop-after, the backend and the node flags apply).
        #[arg(long, conflicts_with_all = [
            "method", "config", "model", "data", "out", "task", "r", "alpha", "targets",
            "feedforward", "lora_dropout", "adapter_preset", "reduction", "virtual_tokens",
            "prompt_init", "lr", "epochs", "batch", "grad_accum", "warmup", "schedule",
            "weight_decay", "clip", "eval_every", "patience", "seed", "max_steps", "max_train",
            "held_out", "text_column", "label_column", "block_size", "quantize", "devices",
        ])]
        resume: Option<PathBuf>,
        /// Stop after N optimizer steps in this process (the schedule is the
        /// whole run's; continue with --resume).
        #[arg(long)]
        stop_after: Option<usize>,
        /// The method's config as an adapter_config.json (PEFT's field names;
        /// AdapterHub's BnConfig for `adapter`). Flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Model folder (config.json + model.safetensors + tokenizer.json) or GGUF file.
        #[arg(long, required_unless_present = "resume")]
        model: Option<PathBuf>,
        /// Dataset: JSONL / CSV / TSV with text and label columns (seq-cls), or plain text (causal-lm).
        #[arg(long, required_unless_present = "resume")]
        data: Option<PathBuf>,
        /// The task.
        #[arg(long, value_enum, default_value = "seq-cls")]
        task: TaskArg,
        /// Run folder.
        #[arg(long, required_unless_present = "resume")]
        out: Option<PathBuf>,
        /// QLoRA: keep the frozen base quantized: `gguf` keeps a Llama GGUF
        /// file's own blocks, `nf4` quantizes every adaptable linear layer to
        /// 4-bit NormalFloat. Slot methods (LoRA, DoRA, (IA)³, LoHa) on Llama and GPT-2 then
        /// train layer by layer, one layer's weights dequantized at a time.
        #[arg(long, value_enum)]
        quantize: Option<QuantizeArg>,
        #[command(flatten)]
        flags: MethodFlags,
        #[command(flatten)]
        optim: OptimArgs,
        #[command(flatten)]
        columns: DataArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Coordinate a multi-machine data-parallel `peft train --nodes N`:
    /// Burn's global collective orchestrator, listening until stopped.
    Orchestrator {
        /// Port to listen on (the nodes' --orchestrator ws://host:PORT).
        #[arg(long)]
        port: u16,
    },
    /// Accuracy (seq-cls) or perplexity (causal-lm) on a file.
    Eval {
        #[command(flatten)]
        on: BackendArgs,
        #[arg(long)]
        model: PathBuf,
        /// Adapter folder (for seq-cls: a run's best/ folder, with its head).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "seq-cls")]
        task: TaskArg,
        #[arg(long, default_value = "text")]
        text_column: String,
        #[arg(long, default_value = "label")]
        label_column: String,
        #[arg(long, default_value_t = 128)]
        block_size: usize,
    },
    /// Generate text (causal LM), with an adapter or without.
    Generate {
        #[command(flatten)]
        on: BackendArgs,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Run a model (with an adapter or none) on token ids from a JSON file
    /// and write the output as a safetensors file.
    Forward {
        #[command(flatten)]
        on: BackendArgs,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSON: `[[id, ...], ...]`, rows of equal length.
        #[arg(long)]
        ids: PathBuf,
        /// Output safetensors file (tensor `output`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Fold a LoRA / DoRA / (IA)³ / LoHa adapter into a Hugging Face model folder
    /// (single or sharded safetensors) and write the merged model, in the
    /// same files, as f32, f16 or bf16.
    Merge {
        #[command(flatten)]
        on: BackendArgs,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Element type of the merged weights: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// An adapter folder's method, config, tensors and parameter counts.
    Inspect {
        /// The adapter folder.
        dir: PathBuf,
    },
}

impl OptimArgs {
    /// The training settings these flags give, with `devices` replicas and
    /// at most `stop_after` steps in this process.
    fn config(&self, stop_after: Option<usize>, devices: usize) -> TrainConfig {
        TrainConfig {
            lr: self.lr,
            epochs: self.epochs,
            batch: self.batch,
            grad_accum: self.grad_accum,
            warmup: self.warmup,
            schedule: match self.schedule {
                ScheduleArg::Linear => Schedule::Linear,
                ScheduleArg::Cosine => Schedule::Cosine,
                ScheduleArg::Constant => Schedule::Constant,
            },
            weight_decay: self.weight_decay,
            clip_norm: (self.clip > 0.0).then_some(self.clip),
            eval_every: self.eval_every,
            patience: self.patience,
            seed: self.seed,
            max_steps: self.max_steps,
            stop_after,
            devices,
            cluster: None,
        }
    }
}

impl ClusterArgs {
    /// The multi-machine job, when `--nodes` and its companions are given
    /// (clap makes them come together).
    fn cluster(&self) -> Option<peft_cli::train::Cluster> {
        match (
            self.nodes,
            self.node_rank,
            self.orchestrator.clone(),
            self.node_address.clone(),
        ) {
            (Some(nodes), Some(rank), Some(orchestrator), Some(address)) => {
                Some(peft_cli::train::Cluster {
                    nodes,
                    rank,
                    orchestrator,
                    address,
                })
            }
            _ => None,
        }
    }
}

fn names(list: &str) -> TargetModules {
    if list.contains(['*', '(', '|', '\\', '$', '^']) {
        TargetModules::Pattern(list.to_string())
    } else {
        TargetModules::List(list.split(',').map(|s| s.trim().to_string()).collect())
    }
}

/// The method flags of `peft train`, as given (`None`: not on the command
/// line): each is honoured by the methods it configures and refused by the
/// others ([`MethodFlags::check_apply_to`]).
#[derive(Args, Default)]
#[command(next_help_heading = "Method flags")]
struct MethodFlags {
    /// LoRA / LoHa / LoKr rank; OFT's number of blocks per layer (its
    /// block size then follows from each layer's inputs).
    #[arg(long)]
    r: Option<usize>,
    /// LoRA / LoHa / LoKr alpha.
    #[arg(long)]
    alpha: Option<f64>,
    /// Target modules (comma-separated names, or one regex).
    #[arg(long)]
    targets: Option<String>,
    /// (IA)³ feed-forward modules (comma-separated).
    #[arg(long)]
    feedforward: Option<String>,
    /// LoRA dropout.
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Bottleneck preset: seq_bn (default), double_seq_bn, par_bn.
    #[arg(long)]
    adapter_preset: Option<String>,
    /// Bottleneck reduction factor.
    #[arg(long)]
    reduction: Option<f64>,
    /// Virtual tokens of a prefix or soft prompt (default 20).
    #[arg(long)]
    virtual_tokens: Option<usize>,
    /// Soft-prompt initialisation: random (PEFT's default) or sample-vocab.
    #[arg(long)]
    prompt_init: Option<String>,
}

/// `peft train`'s optimisation and schedule.
#[derive(Args)]
#[command(next_help_heading = "Optimisation")]
struct OptimArgs {
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Warm-up share of the steps.
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    #[arg(long, value_enum, default_value = "linear")]
    schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip gradients to this global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Evaluate every N optimizer steps (0: each epoch).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Stop after N evaluations without improvement.
    #[arg(long)]
    patience: Option<usize>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    max_steps: Option<usize>,
}

/// Which examples `peft train` reads, and how.
#[derive(Args)]
#[command(next_help_heading = "Data")]
struct DataArgs {
    /// Use at most N training examples (blocks for causal-lm).
    #[arg(long)]
    max_train: Option<usize>,
    /// Held-out share of the data.
    #[arg(long, default_value_t = 0.1)]
    held_out: f64,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Tokens per block (causal-lm).
    #[arg(long, default_value_t = 128)]
    block_size: usize,
}

/// Data parallelism: replicas on this machine, and the nodes of a
/// multi-machine job.
#[derive(Args)]
#[command(next_help_heading = "Data parallelism")]
struct ClusterArgs {
    /// Data-parallel workers: each micro-batch is split across this many
    /// model replicas (threads, peers of Burn's collective; replica i on
    /// GPU i of a GPU backend) whose gradients are summed by an all-reduce.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Several machines: nodes in the data-parallel job. Every node runs
    /// this same command (same data and settings) with its own
    /// --node-rank and --node-address; `peft orchestrator` must run.
    #[arg(long, requires_all = ["node_rank", "orchestrator", "node_address"])]
    nodes: Option<usize>,
    /// This node's index, 0..nodes.
    #[arg(long, requires = "nodes")]
    node_rank: Option<usize>,
    /// The orchestrator's address, ws://host:port.
    #[arg(long, requires = "nodes")]
    orchestrator: Option<String>,
    /// This node's address as the other nodes reach it, ws://host:port
    /// (its tensor data service listens on that port).
    #[arg(long, requires = "nodes")]
    node_address: Option<String>,
}

impl MethodFlags {
    /// Refuses a flag given for a method it does not configure (naming the
    /// flag and what the method takes): a flag is honoured or refused,
    /// never dropped.
    fn check_apply_to(&self, method: MethodArg) -> peft_core::Result<()> {
        let given = [
            ("r", self.r.is_some()),
            ("alpha", self.alpha.is_some()),
            ("targets", self.targets.is_some()),
            ("feedforward", self.feedforward.is_some()),
            ("lora-dropout", self.lora_dropout.is_some()),
            ("adapter-preset", self.adapter_preset.is_some()),
            ("reduction", self.reduction.is_some()),
            ("virtual-tokens", self.virtual_tokens.is_some()),
            ("prompt-init", self.prompt_init.is_some()),
        ];
        let (name, takes): (&str, &[&str]) = match method {
            MethodArg::Lora => ("lora", &["r", "alpha", "targets", "lora-dropout"]),
            MethodArg::Dora => ("dora", &["r", "alpha", "targets", "lora-dropout"]),
            MethodArg::Ia3 => ("ia3", &["targets", "feedforward"]),
            MethodArg::Loha => ("loha", &["r", "alpha", "targets"]),
            MethodArg::Lokr => ("lokr", &["r", "alpha", "targets"]),
            MethodArg::Oft => ("oft", &["r", "targets"]),
            MethodArg::Adapter => ("adapter", &["adapter-preset", "reduction"]),
            MethodArg::Prefix => ("prefix", &["virtual-tokens"]),
            MethodArg::Prompt => ("prompt", &["virtual-tokens", "prompt-init"]),
        };
        match given.iter().find(|(f, set)| *set && !takes.contains(f)) {
            Some((flag, _)) => Err(PeftError::Config(format!(
                "--{flag} does not apply to --method {name} (it takes --{})",
                takes.join(", --")
            ))),
            None => Ok(()),
        }
    }
}

fn prompt_init_of(name: &str) -> peft_core::Result<PromptTuningInit> {
    match name {
        "random" => Ok(PromptTuningInit::Random),
        "sample-vocab" => Ok(PromptTuningInit::SampleVocab),
        other => Err(PeftError::Config(format!(
            "--prompt-init `{other}` is not one of random, sample-vocab"
        ))),
    }
}

/// A LyCORIS config from `--config`'s text (or the defaults) with `--r`,
/// `--alpha` and `--targets` over it; `fields` points at those three.
fn lycoris_from<C: MethodConfig + Default>(
    text: &Option<String>,
    origin: &Path,
    flags: &MethodFlags,
    fields: impl FnOnce(&mut C) -> (&mut usize, &mut f64, &mut Option<TargetModules>),
) -> peft_core::Result<C> {
    let mut c = match text {
        Some(t) => C::from_json_str(t, origin)?,
        None => C::default(),
    };
    let (r, alpha, targets) = fields(&mut c);
    if let Some(v) = flags.r {
        *r = v;
    }
    if let Some(v) = flags.alpha {
        *alpha = v;
    }
    if let Some(t) = flags.targets.as_deref() {
        *targets = Some(names(t));
    }
    c.validate()?;
    Ok(c)
}

/// The method of `peft train`: `--config`'s file (if any), then the flags
/// over it.
fn method_from(
    method: MethodArg,
    config: Option<&PathBuf>,
    flags: &MethodFlags,
) -> peft_core::Result<Method> {
    flags.check_apply_to(method)?;
    let text = config
        .map(|p| {
            std::fs::read_to_string(p).map_err(|source| PeftError::Io {
                path: p.clone(),
                source,
            })
        })
        .transpose()?;
    let origin = config.cloned().unwrap_or_default();
    Ok(match method {
        MethodArg::Lora | MethodArg::Dora => {
            let mut c = match &text {
                Some(t) => LoraConfig::from_json_str(t, &origin)?,
                None => LoraConfig::new(8, 16.0, &["query", "value", "q_proj", "v_proj", "c_attn"]),
            };
            if let Some(r) = flags.r {
                c.r = r;
            }
            if let Some(a) = flags.alpha {
                c.lora_alpha = a;
            }
            if let Some(t) = flags.targets.as_deref() {
                c.target_modules = Some(names(t));
            }
            if let Some(d) = flags.lora_dropout {
                c.lora_dropout = d;
            }
            c.use_dora |= matches!(method, MethodArg::Dora);
            c.validate()?;
            Method::slot(c)
        }
        MethodArg::Ia3 => {
            let mut c = match &text {
                Some(t) => Ia3Config::from_json_str(t, &origin)?,
                None => Ia3Config::default(),
            };
            if let Some(t) = flags.targets.as_deref() {
                c.target_modules = Some(names(t));
            }
            if let Some(f) = flags.feedforward.as_deref() {
                c.feedforward_modules = Some(names(f));
            }
            Method::slot(c)
        }
        MethodArg::Loha => Method::slot(lycoris_from(
            &text,
            &origin,
            flags,
            |c: &mut LohaConfig| (&mut c.r, &mut c.alpha, &mut c.target_modules),
        )?),
        MethodArg::Lokr => Method::slot(lycoris_from(
            &text,
            &origin,
            flags,
            |c: &mut LokrConfig| (&mut c.r, &mut c.alpha, &mut c.target_modules),
        )?),
        MethodArg::Oft => {
            let mut c = match &text {
                Some(t) => OftConfig::from_json_str(t, &origin)?,
                None => OftConfig::default(),
            };
            if let Some(r) = flags.r {
                (c.r, c.oft_block_size) = (r, 0);
            }
            if let Some(t) = flags.targets.as_deref() {
                c.target_modules = Some(names(t));
            }
            c.validate()?;
            Method::slot(c)
        }
        MethodArg::Prefix | MethodArg::Prompt => {
            let mut c = match (config, method) {
                (Some(p), MethodArg::Prefix) => {
                    PromptLearningConfig::from_file(p, &[PromptLearningType::PrefixTuning])?
                }
                (Some(p), _) => PromptLearningConfig::from_file(
                    p,
                    &[
                        PromptLearningType::PromptTuning,
                        PromptLearningType::PTuning,
                    ],
                )?,
                (None, MethodArg::Prefix) => PromptLearningConfig::prefix_tuning(20),
                (None, _) => PromptLearningConfig::prompt_tuning(20, PromptTuningInit::Random),
            };
            if let Some(n) = flags.virtual_tokens {
                c.num_virtual_tokens = n;
            }
            if let Some(init) = flags.prompt_init.as_deref() {
                if c.peft_type != PromptLearningType::PromptTuning {
                    return Err(PeftError::Config(format!(
                        "--prompt-init applies to prompt tuning; {} is {:?}",
                        origin.display(),
                        c.peft_type
                    )));
                }
                c.prompt_tuning_init = Some(prompt_init_of(init)?);
            }
            c.validate()?;
            match method {
                MethodArg::Prefix => Method::Prefix(c),
                _ => Method::Prompt(c),
            }
        }
        MethodArg::Adapter => {
            let mut c =
                match (&text, flags.adapter_preset.as_deref()) {
                    (Some(_), Some(_)) => return Err(PeftError::Config(
                        "--adapter-preset and --config both give the adapter's config: pass one"
                            .into(),
                    )),
                    (Some(t), None) => {
                        let v: serde_json::Value =
                            serde_json::from_str(t).map_err(|source| PeftError::Json {
                                path: origin.clone(),
                                source,
                            })?;
                        let inner = v.get("config").cloned().unwrap_or(v);
                        serde_json::from_value(inner).map_err(|source| PeftError::Json {
                            path: origin.clone(),
                            source,
                        })?
                    }
                    (None, preset) => BnConfig::by_name(preset.unwrap_or("seq_bn"))?,
                };
            if let Some(f) = flags.reduction {
                c = c.with_reduction_factor(f);
            }
            c.validate()?;
            Method::Adapter(c)
        }
    })
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
            .expect("a valid template"),
    );
    bar
}

fn run(cli: Cli) -> peft_core::Result<()> {
    match cli.command {
        Command::Train {
            on,
            method,
            resume,
            stop_after,
            config,
            model,
            data,
            task,
            out,
            flags,
            optim,
            columns,
            quantize,
            cluster,
        } => {
            let (devices, cluster) = (cluster.devices, cluster.cluster());
            let mut job = match resume {
                Some(dir) => {
                    let mut job = TrainJob::resume_from(&dir)?;
                    job.train.stop_after = stop_after;
                    job
                }
                None => {
                    let missing = |what: &str| PeftError::Config(format!("--{what} is required"));
                    let method = method_from(
                        method.ok_or_else(|| missing("method"))?,
                        config.as_ref(),
                        &flags,
                    )?;
                    TrainJob {
                        model: model.ok_or_else(|| missing("model"))?,
                        data: data.ok_or_else(|| missing("data"))?,
                        task: task.into(),
                        method,
                        out: out.ok_or_else(|| missing("out"))?,
                        train: optim.config(stop_after, devices),
                        text_column: columns.text_column,
                        label_column: columns.label_column,
                        held_out: columns.held_out,
                        max_train: columns.max_train,
                        block_size: columns.block_size,
                        resume: false,
                        quantize: quantize.map(|q| match q {
                            QuantizeArg::Gguf => jobs::Quantize::Gguf,
                            QuantizeArg::Nf4 => jobs::Quantize::Nf4,
                        }),
                    }
                }
            };
            job.train.cluster = cluster;
            let report = peft_core::with_backend!(autodiff on.into(), |B, device| {
                jobs::train::<B>(&job, &progress_bar(), &device)
            })?;
            let p = report.params;
            println!(
                "{} on {} training / {} held-out examples: {} steps{}",
                job.method.name(),
                report.sizes.0,
                report.sizes.1,
                report.steps,
                if report.stopped_early {
                    " (stopped early)"
                } else {
                    ""
                }
            );
            println!("{p}");
            if report.quantized_params > 0 {
                println!(
                    "frozen base: {} parameters kept quantized (--quantize {})",
                    report.quantized_params,
                    job.quantize.map_or("?", jobs::Quantize::name)
                );
            }
            println!(
                "held-out {}: {:.4} before, {:.4} after",
                report.before.name, report.before.value, report.after.value
            );
            println!("best checkpoint: {}", report.best.display());
            Ok(())
        }
        Command::Eval {
            on,
            model,
            adapter,
            data,
            task,
            text_column,
            label_column,
            block_size,
        } => {
            let m = peft_core::with_backend!(on.into(), |B, device| {
                jobs::eval::<B>(
                    &model,
                    adapter.as_deref(),
                    &data,
                    task.into(),
                    (&text_column, &label_column),
                    block_size,
                    &device,
                )
            })?;
            println!("{}: {:.4}", m.name, m.value);
            Ok(())
        }
        Command::Generate {
            on,
            model,
            adapter,
            prompt,
            max,
            temperature,
            seed,
        } => {
            let mut sampler = if temperature > 0.0 {
                Sampler::Random {
                    temperature: temperature as f32,
                    top_k: 0,
                    top_p: 1.0,
                    state: seed,
                }
            } else {
                Sampler::Greedy
            };
            let text = peft_core::with_backend!(on.into(), |B, device| {
                jobs::generate::<B>(
                    &model,
                    adapter.as_deref(),
                    &prompt,
                    max,
                    &mut sampler,
                    &device,
                )
            })?;
            println!("{prompt}{text}");
            Ok(())
        }
        Command::Forward {
            on,
            model,
            adapter,
            ids,
            out,
        } => {
            let shape = peft_core::with_backend!(on.into(), |B, device| {
                jobs::forward::<B>(&model, adapter.as_deref(), &ids, &out, &device)
            })?;
            println!("wrote output {shape:?} to {}", out.display());
            Ok(())
        }
        Command::Merge {
            on,
            model,
            adapter,
            out,
            dtype,
        } => {
            let dtype = jobs::MergeDtype::parse(&dtype)?;
            let changed = peft_core::with_backend!(on.into(), |B, device| {
                jobs::merge::<B>(&model, &adapter, &out, dtype, &device)
            })?;
            println!(
                "merged {} tensors into {} ({})",
                changed.len(),
                out.display(),
                dtype.name()
            );
            if model.extension().is_some_and(|e| e == "gguf") {
                println!(
                    "the GGUF base's quantized blocks were dequantized: the merged model is {}, not re-quantized",
                    dtype.name()
                );
            }
            Ok(())
        }
        Command::Orchestrator { port } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| PeftError::State(format!("no async runtime: {e}")))?;
            println!("orchestrator listening on port {port}");
            runtime.block_on(burn_collective::start_global_orchestrator(port));
            Ok(())
        }
        Command::Inspect { dir } => {
            print!("{}", jobs::inspect(&dir)?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    peft_core::memory::keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(case: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/gpt2")
            .join(case)
            .join("adapter_config.json")
    }

    fn none() -> MethodFlags {
        MethodFlags::default()
    }

    #[test]
    fn flags_override_a_prompt_learning_config() {
        let flags = MethodFlags {
            virtual_tokens: Some(7),
            ..none()
        };
        let Method::Prefix(c) =
            method_from(MethodArg::Prefix, Some(&fixture("prefix")), &flags).unwrap()
        else {
            panic!("not a prefix")
        };
        assert_eq!(c.num_virtual_tokens, 7, "the file says 3");
        let flags = MethodFlags {
            virtual_tokens: Some(5),
            prompt_init: Some("sample-vocab".into()),
            ..none()
        };
        let Method::Prompt(c) =
            method_from(MethodArg::Prompt, Some(&fixture("prompt_random")), &flags).unwrap()
        else {
            panic!("not a prompt")
        };
        assert_eq!(c.num_virtual_tokens, 5, "the file says 4");
        assert_eq!(c.prompt_tuning_init, Some(PromptTuningInit::SampleVocab));
        // Without flags the file's values stand.
        let Method::Prefix(c) =
            method_from(MethodArg::Prefix, Some(&fixture("prefix")), &none()).unwrap()
        else {
            panic!("not a prefix")
        };
        assert_eq!(c.num_virtual_tokens, 3);
    }

    #[test]
    fn flags_that_do_not_apply_are_refused_by_name() {
        let cases: [(MethodArg, MethodFlags, &str); 4] = [
            (
                MethodArg::Ia3,
                MethodFlags {
                    r: Some(4),
                    ..none()
                },
                "--r does not apply",
            ),
            (
                MethodArg::Prefix,
                MethodFlags {
                    prompt_init: Some("random".into()),
                    ..none()
                },
                "--prompt-init does not apply",
            ),
            (
                MethodArg::Lora,
                MethodFlags {
                    virtual_tokens: Some(3),
                    ..none()
                },
                "--virtual-tokens does not apply",
            ),
            (
                MethodArg::Adapter,
                MethodFlags {
                    targets: Some("query".into()),
                    ..none()
                },
                "--targets does not apply",
            ),
        ];
        for (method, flags, needle) in cases {
            let err = method_from(method, None, &flags).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let flags = MethodFlags {
            prompt_init: Some("random".into()),
            ..none()
        };
        let err = method_from(MethodArg::Prompt, Some(&fixture("ptuning_lstm")), &flags)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--prompt-init applies to prompt tuning"),
            "{err}"
        );
    }
}
