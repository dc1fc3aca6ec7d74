//! `peft`: fine-tune, evaluate, inspect and run adapters from the command line.
//!
//!     peft train --method lora --model DIR --data FILE --task seq-cls --out runs/x
//!     peft eval --model DIR --adapter runs/x/best --data FILE --task seq-cls
//!     peft generate --model model.gguf [--adapter DIR] --prompt "Once upon a time"
//!     peft forward --model DIR [--adapter DIR] --ids ids.json --out logits.safetensors
//!     peft merge --model DIR --adapter DIR --out merged/
//!     peft inspect DIR
//!     peft serve --model model.gguf --adapter NAME=DIR [--adapter-root DIR] [--port 8000]
//!
//! Every failure is a message naming the file and the problem, and a
//! non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use peft_cli::jobs::{self, Task, TrainJob};
use peft_cli::train::{Schedule, TrainConfig};
use peft_core::backends::{BackendChoice, BackendKind};
use peft_core::generate::Sampler;
use peft_core::PeftError;

use method_flags::{method_from, MethodArg, MethodFlags};

mod method_flags;

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

/// `peft serve`'s flags.
#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    on: BackendArgs,
    /// Base model folder or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// An adapter served from the start, as NAME=DIR (repeatable).
    #[arg(long = "adapter", value_parser = parse_named_adapter)]
    adapters: Vec<(String, PathBuf)>,
    /// The folder `/v1/load_lora_adapter` may load from (nothing outside
    /// it, symlinks resolved); without it, runtime loading is refused.
    #[arg(long)]
    adapter_root: Option<PathBuf>,
    /// Most adapters in memory at once (least recently used leave first,
    /// and reload from their folder when asked for).
    #[arg(long, default_value_t = 16)]
    max_loaded: usize,
    /// The base model's name in requests (default: the model's file or
    /// folder name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Requests to /v1/* must carry `Authorization: Bearer KEY` (default:
    /// the PEFT_API_KEY environment variable, if set).
    #[arg(long, env = "PEFT_API_KEY")]
    api_key: Option<String>,
    /// Most sequences waiting or running; more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Seconds shutdown waits for requests in flight.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
}

fn parse_named_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("`{s}` is not NAME=DIR")),
    }
}

impl From<&ServeArgs> for peft_cli::serve::ServeConfig {
    fn from(a: &ServeArgs) -> Self {
        peft_cli::serve::ServeConfig {
            served_model_name: a.served_model_name.clone(),
            adapters: a.adapters.clone(),
            adapter_root: a.adapter_root.clone(),
            max_loaded: a.max_loaded,
            listen: std::net::SocketAddr::new(a.host, a.port),
            api_key: a.api_key.clone(),
            max_queue: a.max_queue,
            max_body: a.max_body,
            shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
            ..peft_cli::serve::ServeConfig::new(a.model.clone())
        }
    }
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
        #[arg(long, value_parser = MethodArg::parser(), required_unless_present = "resume")]
        method: Option<MethodArg>,
        /// Continue the run in this folder from its last checkpoint. Its
        /// settings come from the run: the job's flags are refused beside it
        /// (--stop-after, the backend and the node flags apply).
        #[arg(long, conflicts_with_all = [
            "method", "config", "model", "data", "out", "task", "r", "alpha", "targets",
            "feedforward", "lora_dropout", "adapter_preset", "reduction", "virtual_tokens",
            "prompt_init", "lr", "epochs", "batch", "grad_accum", "warmup", "schedule",
            "weight_decay", "adam_epsilon", "clip", "eval_every", "patience", "seed", "max_steps", "max_train",
            "held_out", "text_column", "label_column", "problem_type", "block_size", "quantize",
            "devices", "loraplus_lr_ratio",
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
    /// Serve a decoder and its adapters behind OpenAI's API
    /// (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) with
    /// vLLM's `/v1/load_lora_adapter` / `/v1/unload_lora_adapter`, until
    /// SIGTERM or ctrl-c.
    Serve(ServeArgs),
    /// Coordinate a multi-machine data-parallel `peft train --nodes N`:
    /// Burn's global collective orchestrator, listening until stopped.
    Orchestrator {
        /// Port to listen on (the nodes' --orchestrator ws://host:PORT).
        #[arg(long)]
        port: u16,
    },
    /// Accuracy, micro-F1 or mean squared error (seq-cls, by problem type)
    /// or perplexity (causal-lm) on a file.
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
        /// What the labels mean (seq-cls): as `peft train --problem-type`.
        /// Default: the run's (its `task.json`), else a one-output head is
        /// a regression (transformers' rule), else multi-label when labels
        /// are lists.
        #[arg(long)]
        problem_type: Option<String>,
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
            adam_epsilon: self.adam_epsilon,
            clip_norm: (self.clip > 0.0).then_some(self.clip),
            eval_every: self.eval_every,
            patience: self.patience,
            seed: self.seed,
            max_steps: self.max_steps,
            stop_after,
            devices,
            cluster: None,
            loraplus_lr_ratio: self.loraplus_lr_ratio,
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
    /// AdamW's epsilon (Burn's 1e-5; `--adam-epsilon 1e-8 --weight-decay 0`
    /// is the optimizer of PEFT's Trainer with its defaults).
    #[arg(long, default_value_t = 1e-5)]
    adam_epsilon: f64,
    /// Clip gradients to this global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// LoRA+: train LoRA's B matrices and every vector (magnitudes, biases,
    /// (IA)³ / VeRA vectors) at this multiple of the learning rate, as
    /// PEFT's `create_loraplus_optimizer` groups them (16 in the paper).
    #[arg(long)]
    loraplus_lr_ratio: Option<f64>,
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
    /// What the labels mean (seq-cls), as transformers' `problem_type`:
    /// single_label_classification (one class per text),
    /// multi_label_classification (a list of labels per text) or
    /// regression (a number, or a list of numbers, per text). Default: the
    /// model's config.json, else multi-label when labels are lists.
    #[arg(long)]
    problem_type: Option<String>,
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
                        problem_type: columns.problem_type,
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
            problem_type,
            block_size,
        } => {
            let m = peft_core::with_backend!(on.into(), |B, device| {
                jobs::eval::<B>(
                    &model,
                    adapter.as_deref(),
                    &data,
                    task.into(),
                    jobs::SeqClsColumns {
                        text: &text_column,
                        label: &label_column,
                        problem_type: problem_type.as_deref(),
                    },
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
        Command::Serve(args) => {
            let config = peft_cli::serve::ServeConfig::from(&args);
            peft_core::with_backend!(args.on.into(), |B, device| {
                let server = peft_cli::serve::Server::start::<B>(config, device)?;
                println!("peft serve: listening on http://{}", server.addr());
                server.wait()
            })
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
