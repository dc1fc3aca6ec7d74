//! The jobs behind the `peft` subcommands, as library functions.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleDisplay};
use burn::tensor::backend::{AutodiffBackend, Backend};
use peft_core::generate::{CausalLm, Sampler};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{ParamCount, PeftError, Result};
use peft_models::bert::Bert;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::seq_cls::ScoreHead;
use peft_models::tokenizer::Tokenizer;
use serde_json::json;

use crate::data;
pub use crate::tasks::Quantize;
use crate::tasks::{
    self, Adapted, Arch, CausalModel, Classifier, Encoded, Encoder, Method,
};
use crate::train::{BatchLoss, Metric, RunDir, TrainConfig, Trainer};

/// What to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sequence classification (BERT): labelled text.
    SeqCls,
    /// Causal language modelling (Llama, GPT-2): plain text.
    CausalLm,
}

/// Everything `peft train` needs.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Model folder or GGUF file.
    pub model: PathBuf,
    /// Dataset file.
    pub data: PathBuf,
    /// The task.
    pub task: Task,
    /// The method and its config.
    pub method: Method,
    /// Run folder (metrics, checkpoints).
    pub out: PathBuf,
    /// Optimiser, schedule, evaluation.
    pub train: TrainConfig,
    /// Text column (seq-cls).
    pub text_column: String,
    /// Label column (seq-cls).
    pub label_column: String,
    /// Held-out share.
    pub held_out: f64,
    /// Use at most this many training examples (blocks for causal LM).
    pub max_train: Option<usize>,
    /// Tokens per block (causal LM).
    pub block_size: usize,
    /// Continue the run in `out` from its `last/` checkpoint.
    pub resume: bool,
    /// Keep the frozen base quantized (QLoRA); `None`: `f32`.
    pub quantize: Option<Quantize>,
}

impl TrainJob {
    /// The job of the run in `dir`, from its `train_config.json` and the
    /// method of its `last/` checkpoint, to continue it.
    pub fn resume_from(dir: &Path) -> Result<TrainJob> {
        let path = dir.join("train_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
            path: path.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| PeftError::Json {
                path: path.clone(),
                source,
            })?;
        fn get<T: serde::de::DeserializeOwned>(
            v: &serde_json::Value,
            k: &str,
            path: &Path,
        ) -> Result<T> {
            let x = v.get(k).cloned().ok_or_else(|| PeftError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("no `{k}`: not a run folder of this version"),
            })?;
            serde_json::from_value(x).map_err(|source| PeftError::Json {
                path: path.to_path_buf(),
                source,
            })
        }
        let task: String = get(&v, "task", &path)?;
        let quantize = match v.get("quantize").and_then(|q| q.as_str()) {
            Some(q) => Some(Quantize::parse(q)?),
            None => None,
        };
        Ok(TrainJob {
            model: get(&v, "model", &path)?,
            data: get(&v, "data", &path)?,
            task: if task == "seq-cls" {
                Task::SeqCls
            } else {
                Task::CausalLm
            },
            method: Method::detect(&dir.join("last"))?,
            out: dir.to_path_buf(),
            train: get(&v, "train", &path)?,
            text_column: get(&v, "text_column", &path)?,
            label_column: get(&v, "label_column", &path)?,
            held_out: get(&v, "held_out", &path)?,
            max_train: get(&v, "max_train", &path)?,
            block_size: get(&v, "block_size", &path)?,
            resume: true,
            quantize,
        })
    }

    fn config_json(&self, extra: serde_json::Value) -> serde_json::Value {
        let task = match self.task {
            Task::SeqCls => "seq-cls",
            Task::CausalLm => "causal-lm",
        };
        let mut v = json!({
            "method": self.method.name(), "task": task, "model": self.model, "data": self.data,
            "train": self.train, "held_out": self.held_out, "text_column": self.text_column,
            "label_column": self.label_column, "max_train": self.max_train,
            "block_size": self.block_size,
            "quantize": self.quantize.map(Quantize::name),
        });
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    }

    fn last(&self) -> Option<PathBuf> {
        self.resume.then(|| self.out.join("last"))
    }
}

/// What a run reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// Held-out metric before training.
    pub before: Metric,
    /// Held-out metric of the kept (best) model.
    pub after: Metric,
    /// Trainable and all parameters (the head included for seq-cls).
    pub params: ParamCount,
    /// Of `params.all`, the frozen base's parameters held quantized (GGUF
    /// blocks or NF4 codes, per `--quantize`) rather than in `f32`; 0 for an
    /// `f32` base.
    pub quantized_params: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Where the best checkpoint is.
    pub best: PathBuf,
    /// Training and held-out sizes.
    pub sizes: (usize, usize),
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    peft_core::io::write_atomic(path, text.as_bytes())
}

/// Parameters of `model` held quantized: its count of all parameters less
/// those that tensors hold (a quantized weight is a parameter no tensor
/// holds).
fn quantized_params<B: Backend, M: peft_core::PeftModel<B>>(model: &M) -> usize {
    model.param_count().all - model.num_params()
}

/// Trains per `job` on backend `B`.
pub fn train<B: AutodiffBackend>(
    job: &TrainJob,
    progress: &indicatif::ProgressBar,
    device: &B::Device,
) -> Result<Report> {
    job.train.validate()?;
    let arch = tasks::arch_of(&job.model)?;
    match (job.task, arch) {
        (Task::SeqCls, Arch::Bert) => train_seq_cls::<B>(job, progress, device),
        (Task::SeqCls, Arch::Llama) => train_seq_cls_decoder::<B, Llama<B>>(job, progress, device),
        (Task::SeqCls, Arch::Gpt2) => train_seq_cls_decoder::<B, Gpt2<B>>(job, progress, device),
        (Task::CausalLm, Arch::Llama) => train_causal::<B, Llama<B>>(job, progress, device),
        (Task::CausalLm, Arch::Gpt2) => train_causal::<B, Gpt2<B>>(job, progress, device),
        (Task::CausalLm, Arch::Bert) => Err(PeftError::Config(format!(
            "causal-lm needs a decoder (Llama, GPT-2); {} is BERT",
            job.model.display()
        ))),
    }
}

fn seq_cls_data(job: &TrainJob) -> Result<(Vec<String>, Encoded, Encoded)> {
    let examples = data::read_labelled(&job.data, &job.text_column, &job.label_column)?;
    let labels = data::label_set(&examples);
    if labels.len() < 2 {
        return Err(PeftError::Checkpoint {
            path: job.data.clone(),
            message: format!("one label only ({labels:?}): classification needs two or more"),
        });
    }
    let ids = data::label_ids(&examples, &labels, &job.data)?;
    let pairs: Vec<(String, usize)> = examples.into_iter().map(|e| e.text).zip(ids).collect();
    let (mut train, held) = data::split(&pairs, job.held_out, job.train.seed);
    if let Some(n) = job.max_train {
        train.truncate(n);
    }
    let enc = |v: Vec<(String, usize)>| {
        let (texts, labels) = v.into_iter().unzip();
        Encoded { texts, labels }
    };
    Ok((labels, enc(train), enc(held)))
}

fn train_seq_cls<B: AutodiffBackend>(
    job: &TrainJob,
    progress: &indicatif::ProgressBar,
    device: &B::Device,
) -> Result<Report> {
    let device = device.clone();
    B::seed(&device, job.train.seed);
    let (labels, train, held) = seq_cls_data(job)?;
    let tok = tasks::tokenizer_of(&job.model)?;
    let mut bert = Bert::<B>::load(&job.model, &device)?;
    match job.quantize {
        None => {}
        Some(Quantize::Nf4) => {
            peft_core::PeftModel::quantize_base_nf4(&mut bert)?;
        }
        Some(Quantize::Gguf) => {
            return Err(PeftError::Config(
                "--quantize gguf keeps a GGUF file's blocks; BERT loads from safetensors (use nf4)"
                    .into(),
            ))
        }
    }
    let quantized_params = quantized_params(&bert);
    let d = bert.config.hidden_size;
    // A slot method trains PEFT's SEQ_CLS adapter: the model's own head
    // (pooler and `classifier`), its copy in the adapter's
    // `modules_to_save`. The others train a mean-pooled head of their own,
    // kept in `head.safetensors`.
    let (bert, head, method) = match job.method.for_seq_cls(&job.model) {
        Some(method) => (bert.with_classifier(labels.len())?, None, method),
        None => {
            let head = match job.last() {
                Some(last) => tasks::load_head::<B>(&last, d, labels.len(), &device)?,
                None => tasks::new_head::<B>(d, labels.len(), &device),
            };
            (bert, Some(head), job.method.clone())
        }
    };
    let data = (labels, train, held);
    train_classifier(
        job,
        progress,
        bert,
        head,
        &method,
        data,
        &tok,
        quantized_params,
    )
}

/// Sequence classification on a decoder (`*ForSequenceClassification`):
/// its `score` head, the adapter's copy of it in `modules_to_save`, each
/// row read at its last real token. Slot methods only: the others would
/// leave the head untrained and unsaved.
fn train_seq_cls_decoder<B, M>(
    job: &TrainJob,
    progress: &indicatif::ProgressBar,
    device: &B::Device,
) -> Result<Report>
where
    B: AutodiffBackend,
    M: CausalModel<B> + ScoreHead<B> + AutodiffModule<B> + ModuleDisplay + Clone,
    M::InnerModule: CausalModel<B::InnerBackend> + ModuleDisplay + Clone + 'static,
    Adapted<B, M>: Encoder<B>,
    tasks::InnerAdapted<B, M>: Encoder<B::InnerBackend>,
{
    let device = device.clone();
    B::seed(&device, job.train.seed);
    let method = job.method.for_seq_cls(&job.model).ok_or_else(|| {
        PeftError::Config(format!(
            "seq-cls on a decoder trains a slot method (lora, dora, ia3, loha, lokr, oft), whose \
             adapter keeps a copy of the `score` head; {} does not",
            job.method.name()
        ))
    })?;
    let (labels, train, held) = seq_cls_data(job)?;
    let tok = tasks::tokenizer_of(&job.model)?;
    let base = M::load_quantized(&job.model, &device, job.quantize)?;
    let quantized_params = quantized_params(&base);
    let base = base.with_score(labels.len())?;
    let data = (labels, train, held);
    train_classifier(
        job,
        progress,
        base,
        None,
        &method,
        data,
        &tok,
        quantized_params,
    )
}

/// The run of a seq-cls job once its model, head (`None`: the model's own)
/// and method are set: the run folder with `labels.json` and
/// `train_config.json`, the adapter attached, training, and every
/// checkpoint with the adapter, its head and `labels.json`.
#[allow(clippy::too_many_arguments)]
fn train_classifier<B, M>(
    job: &TrainJob,
    progress: &indicatif::ProgressBar,
    model: M,
    head: Option<burn::nn::Linear<B>>,
    method: &Method,
    (labels, train, held): (Vec<String>, Encoded, Encoded),
    tok: &Tokenizer,
    quantized_params: usize,
) -> Result<Report>
where
    B: AutodiffBackend,
    M: peft_core::PeftModel<B> + AutodiffModule<B> + ModuleDisplay + Clone,
    M::InnerModule: peft_core::PeftModel<B::InnerBackend> + ModuleDisplay + Clone + 'static,
    Adapted<B, M>: Encoder<B>,
    tasks::InnerAdapted<B, M>: Encoder<B::InnerBackend>,
{
    let mut run = RunDir::create(&job.out, job.resume)?;
    write_json(&job.out.join("labels.json"), &json!(labels))?;
    write_json(
        &job.out.join("train_config.json"),
        &job.config_json(json!({"labels": labels})),
    )?;
    let labels_json = json!(labels);
    let (encoder, count, save) =
        tasks::attach_to_train::<B, M>(model, method, job.last().as_deref())?;
    let report = fit_classifier(
        Classifier { encoder, head },
        count,
        tok,
        &train,
        &held,
        job,
        &mut run,
        progress,
        move |m, dir| {
            save(&m.encoder, dir)?;
            write_json(&dir.join("labels.json"), &labels_json)
        },
    )?;
    Ok(Report {
        quantized_params,
        ..report
    })
}

#[allow(clippy::too_many_arguments)]
fn fit_classifier<B, E>(
    model: Classifier<B, E>,
    count: ParamCount,
    tok: &Tokenizer,
    train: &Encoded,
    held: &Encoded,
    job: &TrainJob,
    run: &mut RunDir,
    progress: &indicatif::ProgressBar,
    save_encoder: impl Fn(&Classifier<B::InnerBackend, E::InnerModule>, &Path) -> Result<()>,
) -> Result<Report>
where
    B: AutodiffBackend,
    E: Encoder<B> + AutodiffModule<B> + ModuleDisplay + Clone,
    E::InnerModule: Encoder<B::InnerBackend> + ModuleDisplay,
{
    let head_params = model.head.as_ref().map_or(0, |h| h.num_params());
    let params = ParamCount {
        trainable: count.trainable + head_params,
        all: count.all + head_params,
    };
    let before = tasks::accuracy(&model.valid(), tok, held)?;
    let trainer = Trainer::new(
        &model,
        &job.train,
        train.texts.len(),
        run,
        progress,
        job.last().as_deref(),
    )?;
    let (_, out) = trainer.fit(
        model,
        |m, idx| tasks::classifier_loss(m, tok, train, idx).map(|(l, n)| (BatchLoss::Graph(l), n)),
        |m| tasks::accuracy(m, tok, held),
        |m, dir| {
            save_encoder(m, dir)?;
            match &m.head {
                Some(head) => tasks::save_head(head, dir),
                None => Ok(()),
            }
        },
    )?;
    Ok(Report {
        before,
        after: out.best.unwrap_or(before),
        params,
        // The encoder's, filled in by the caller that loaded it.
        quantized_params: 0,
        steps: out.steps,
        stopped_early: out.stopped_early,
        best: tasks::best_dir(&job.out),
        sizes: (train.texts.len(), held.texts.len()),
    })
}

/// Token blocks of a text.
type Blocks = Vec<Vec<u32>>;

fn lm_blocks(job: &TrainJob, tok: &Tokenizer) -> Result<(Blocks, Blocks)> {
    let text = data::read_text(&job.data)?;
    let ids = tok.encode(&text)?;
    let blocks = data::blocks(&ids, job.block_size);
    if blocks.len() < 2 {
        return Err(PeftError::Checkpoint {
            path: job.data.clone(),
            message: format!(
                "{} tokens make fewer than two blocks of {}",
                ids.len(),
                job.block_size
            ),
        });
    }
    let (mut train, held) = data::split(&blocks, job.held_out, job.train.seed);
    if let Some(n) = job.max_train {
        train.truncate(n);
    }
    Ok((train, held))
}

/// Beside a reparameterised prefix's or prompt's adapter in a checkpoint:
/// the full encoder, from which `--resume` continues.
pub use peft_core::prompt_learning::ENCODER_STATE_FILE;

fn train_causal<B, M>(
    job: &TrainJob,
    progress: &indicatif::ProgressBar,
    device: &B::Device,
) -> Result<Report>
where
    B: AutodiffBackend,
    M: CausalModel<B> + AutodiffModule<B> + ModuleDisplay + Clone,
    M::InnerModule: CausalModel<B::InnerBackend> + ModuleDisplay + Clone + 'static,
{
    let device = device.clone();
    B::seed(&device, job.train.seed);
    let tok = tasks::tokenizer_of(&job.model)?;
    let (train, held) = lm_blocks(job, &tok)?;
    let base = M::load_quantized(&job.model, &device, job.quantize)?;
    let quantized_params = quantized_params(&base);
    let mut run = RunDir::create(&job.out, job.resume)?;
    write_json(
        &job.out.join("train_config.json"),
        &job.config_json(json!({})),
    )?;
    let inner_device = device.clone();
    let (model, count, save) =
        tasks::attach_to_train::<B, M>(base, &job.method, job.last().as_deref())?;
    let before = tasks::perplexity(&model.valid(), &held, &inner_device)?;
    let trainer = Trainer::new(
        &model,
        &job.train,
        train.len(),
        &mut run,
        progress,
        job.last().as_deref(),
    )?;
    let (_, out) = trainer.fit(
        model,
        |m, idx| match (m, job.quantize) {
            // QLoRA: one layer's weights dequantized at a time.
            (Adapted::Slots(slots), Some(_)) => {
                let model = &slots.model;
                // The replica's own device (data-parallel replicas may sit
                // on other GPUs than the model).
                let device = tasks::device_of(model);
                let ids = tasks::ids_batch::<B>(&train, idx, &device);
                let seed = idx.iter().fold(job.train.seed, |h, &i| {
                    peft_core::rng::SplitMix64(h ^ i as u64).next_u64()
                });
                let (value, grads) = model.causal_loss_by_layer(ids, seed);
                Ok((
                    BatchLoss::Differentiated { value, grads },
                    idx.len() * train[0].len(),
                ))
            }
            _ => tasks::lm_loss(m, &train, idx, &tasks::device_of(m))
                .map(|(l, n)| (BatchLoss::Graph(l), n)),
        },
        |m| tasks::perplexity(m, &held, &inner_device),
        |m, dir| save(m, dir),
    )?;
    Ok(Report {
        before,
        after: out.best.unwrap_or(before),
        params: count,
        quantized_params,
        steps: out.steps,
        stopped_early: out.stopped_early,
        best: tasks::best_dir(&job.out),
        sizes: (train.len(), held.len()),
    })
}

/// `peft eval`: the metric of `model` with the adapter folder `adapter`
/// (a run's `best/` for seq-cls, holding the head) on all of `data`.
pub fn eval<B: Backend>(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    task: Task,
    columns: (&str, &str),
    block_size: usize,
    device: &B::Device,
) -> Result<Metric> {
    let tok = tasks::tokenizer_of(model)?;
    match (task, tasks::arch_of(model)?) {
        (Task::SeqCls, Arch::Bert) => {
            let (dir, labels, enc) = seq_cls_eval_data(adapter, data_file, columns)?;
            let bert = Bert::<B>::load(model, device)?;
            let (bert, head) = if dir.join("head.safetensors").is_file() {
                let d = bert.config.hidden_size;
                let head = tasks::load_head::<B>(dir, d, labels.len(), device)?;
                (bert, Some(head))
            } else {
                let classes = head_classes(dir, "classifier", &labels)?;
                (bert.with_classifier(classes)?, None)
            };
            let encoder = tasks::load_adapted(bert, Some(dir))?;
            tasks::accuracy(&Classifier { encoder, head }, &tok, &enc)
        }
        (Task::SeqCls, Arch::Llama) => {
            eval_seq_cls_decoder::<B, Llama<B>>(model, adapter, data_file, columns, &tok, device)
        }
        (Task::SeqCls, Arch::Gpt2) => {
            eval_seq_cls_decoder::<B, Gpt2<B>>(model, adapter, data_file, columns, &tok, device)
        }
        (Task::CausalLm, Arch::Llama) => {
            eval_lm::<B, Llama<B>>(model, adapter, data_file, &tok, block_size, device)
        }
        (Task::CausalLm, Arch::Gpt2) => {
            eval_lm::<B, Gpt2<B>>(model, adapter, data_file, &tok, block_size, device)
        }
        (t, a) => Err(PeftError::Config(format!(
            "task {t:?} does not fit a {a:?} model"
        ))),
    }
}

/// The adapter folder of a seq-cls evaluation, its classes and the data.
/// Our runs name their classes in `labels.json`; an adapter trained by
/// PEFT does not, and its head's rows are then the data's labels in
/// sorted order (PEFT users' `0`, `1`, ...).
fn seq_cls_eval_data<'a>(
    adapter: Option<&'a Path>,
    data_file: &Path,
    columns: (&str, &str),
) -> Result<(&'a Path, Vec<String>, Encoded)> {
    let dir = adapter.ok_or_else(|| {
        PeftError::Config(
            "seq-cls evaluation needs --adapter (a run's best/ folder with its head)".into(),
        )
    })?;
    let examples = data::read_labelled(data_file, columns.0, columns.1)?;
    let labels = match dir.join("labels.json").is_file() {
        true => tasks::read_labels(dir)?,
        false => data::label_set(&examples),
    };
    let ids = data::label_ids(&examples, &labels, data_file)?;
    let enc = Encoded {
        texts: examples.into_iter().map(|e| e.text).collect(),
        labels: ids,
    };
    Ok((dir, labels, enc))
}

/// The classes of the copy of head `head` in adapter folder `dir` (the
/// number of `labels` when it has none), at least as many as `labels`.
fn head_classes(dir: &Path, head: &str, labels: &[String]) -> Result<usize> {
    let classes = tasks::head_labels(dir, head)?.unwrap_or(labels.len());
    if labels.len() > classes {
        return Err(PeftError::Config(format!(
            "{}: the adapter's head has {classes} classes, the data {} labels ({labels:?})",
            dir.display(),
            labels.len()
        )));
    }
    Ok(classes)
}

/// Accuracy of a decoder's `score` head with a SEQ_CLS adapter.
fn eval_seq_cls_decoder<B, M>(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    columns: (&str, &str),
    tok: &Tokenizer,
    device: &B::Device,
) -> Result<Metric>
where
    B: Backend,
    M: CausalModel<B> + ScoreHead<B> + Module<B> + ModuleDisplay,
    Adapted<B, M>: Encoder<B>,
{
    let (dir, labels, enc) = seq_cls_eval_data(adapter, data_file, columns)?;
    let classes = head_classes(dir, "score", &labels)?;
    let decoder = M::load_from(model, device)?.with_score(classes)?;
    let encoder = tasks::load_adapted(decoder, Some(dir))?;
    tasks::accuracy(
        &Classifier {
            encoder,
            head: None,
        },
        tok,
        &enc,
    )
}

fn eval_lm<B: Backend, M: CausalModel<B> + Module<B>>(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    tok: &Tokenizer,
    block_size: usize,
    device: &B::Device,
) -> Result<Metric> {
    let ids = tok.encode(&data::read_text(data_file)?)?;
    let blocks = data::blocks(&ids, block_size);
    if blocks.is_empty() {
        return Err(PeftError::Checkpoint {
            path: data_file.to_path_buf(),
            message: format!("{} tokens: not one block of {block_size}", ids.len()),
        });
    }
    let base = M::load_from(model, device)?;
    let lm = tasks::load_adapted(base, adapter)?;
    tasks::perplexity(&lm, &blocks, device)
}

/// `peft generate`: greedy (or sampled) text from a Llama / GPT-2 model,
/// with a LoRA / (IA)³ adapter folder or none.
pub fn generate<B: Backend>(
    model: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    max_new: usize,
    sampler: &mut Sampler,
    device: &B::Device,
) -> Result<String> {
    let tok = tasks::tokenizer_of(model)?;
    let ids = tok.encode(prompt)?;
    let out = match tasks::arch_of(model)? {
        Arch::Llama => {
            generate_with::<B, Llama<B>>(model, adapter, &ids, max_new, sampler, device)?
        }
        Arch::Gpt2 => generate_with::<B, Gpt2<B>>(model, adapter, &ids, max_new, sampler, device)?,
        Arch::Bert => return Err(PeftError::Config("BERT does not generate text".into())),
    };
    tok.decode(&out)
}

fn generate_with<B: Backend, M: CausalModel<B> + CausalLm<B>>(
    model: &Path,
    adapter: Option<&Path>,
    ids: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    device: &B::Device,
) -> Result<Vec<u32>> {
    let base = M::load_from(model, device)?;
    tasks::load_adapted(base, adapter)?.generate(ids, max_new, sampler, None)
}

/// `peft inspect`: an adapter folder's method, config and tensors.
pub fn inspect(dir: &Path) -> Result<String> {
    let method = Method::detect(dir)?;
    let mut s = format!("{}: {}\n", dir.display(), method.name());
    let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap_or_default();
    s += &format!(
        "config: {}\n",
        config.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let weights = ["adapter_model.safetensors", "adapter.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| PeftError::Checkpoint {
            path: dir.to_path_buf(),
            message: "no adapter_model.safetensors or adapter.safetensors".into(),
        })?;
    let tensors = read_safetensors(&weights)?;
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let total: usize = tensors.values().map(|t| t.data.len()).sum();
    s += &format!("tensors ({}): {} parameters\n", weights.display(), total);
    for k in keys {
        s += &format!("  {k} {:?}\n", tensors[k].shape);
    }
    if let Ok(head) = read_safetensors(&dir.join("head.safetensors")) {
        let n: usize = head.values().map(|t| t.data.len()).sum();
        s += &format!("head: {n} parameters\n");
    }
    Ok(s)
}

/// `peft forward`: runs the model (with an adapter folder or none) on the
/// token ids of a JSON file (`[[id, ...], ...]`, rows of equal length) and
/// writes the output — logits `[b, t, vocab]` for Llama / GPT-2, last hidden
/// states `[b, t, d]` for BERT — as `output` in a safetensors file: the hook
/// for checking parity with any reference.
pub fn forward<B: Backend>(
    model: &Path,
    adapter: Option<&Path>,
    ids_file: &Path,
    out: &Path,
    device: &B::Device,
) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(ids_file).map_err(|source| PeftError::Io {
        path: ids_file.to_path_buf(),
        source,
    })?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).map_err(|source| PeftError::Json {
        path: ids_file.to_path_buf(),
        source,
    })?;
    let t = rows.first().map_or(0, Vec::len);
    if t == 0 || rows.iter().any(|r| r.len() != t) {
        return Err(PeftError::Checkpoint {
            path: ids_file.to_path_buf(),
            message: "token ids must be a non-empty list of non-empty rows of equal length".into(),
        });
    }
    let flat: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
    let ids = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(flat, [rows.len(), t]),
        device,
    );
    let output = match tasks::arch_of(model)? {
        Arch::Llama => forward_decoder::<B, Llama<B>>(model, adapter, ids)?,
        Arch::Gpt2 => forward_decoder::<B, Gpt2<B>>(model, adapter, ids)?,
        Arch::Bert => {
            let mut bert = Bert::<B>::load(model, device)?;
            // A sequence-classification adapter carries its head's copy:
            // the model gets a head of that many classes to carry it.
            if let Some(labels) = adapter
                .map(|dir| tasks::head_labels(dir, "classifier"))
                .transpose()?
                .flatten()
            {
                bert = bert.with_classifier(labels)?;
            }
            let has_head = bert.pooler.is_some() && bert.classifier.is_some();
            let mask = burn::tensor::Tensor::ones([rows.len(), t], device);
            let adapted = tasks::load_adapted(bert, adapter)?;
            match has_head {
                true => peft_core::io::HostTensor::from_tensor(adapted.classify(ids, mask)?),
                false => peft_core::io::HostTensor::from_tensor(adapted.hidden(ids, mask)?),
            }
        }
    };
    let shape = output.shape.clone();
    peft_core::io::write_atomic(
        out,
        &peft_core::io::serialize_safetensors(&[("output".to_string(), output)], None),
    )?;
    Ok(shape)
}

/// A decoder's logits, or its class logits when it has a `score` head
/// (`*ForSequenceClassification`, or an adapter carrying a copy of one).
fn forward_decoder<B: Backend, M: CausalModel<B> + ScoreHead<B> + Module<B>>(
    model: &Path,
    adapter: Option<&Path>,
    ids: burn::tensor::Tensor<B, 2, burn::tensor::Int>,
) -> Result<peft_core::io::HostTensor> {
    let mut decoder = M::load_from(model, &ids.device())?;
    if let Some(labels) = adapter
        .map(|dir| tasks::head_labels(dir, "score"))
        .transpose()?
        .flatten()
    {
        decoder = decoder.with_score(labels)?;
    }
    if decoder.score().is_none() {
        return forward_lm::<B, M>(model, adapter, ids);
    }
    let pad = decoder.pad_token_id();
    let adapted = tasks::load_adapted(decoder, adapter)?;
    Ok(peft_core::io::HostTensor::from_tensor(
        adapted.classify(ids, pad)?,
    ))
}

fn forward_lm<B: Backend, M: CausalModel<B> + Module<B>>(
    model: &Path,
    adapter: Option<&Path>,
    ids: burn::tensor::Tensor<B, 2, burn::tensor::Int>,
) -> Result<peft_core::io::HostTensor> {
    let base = M::load_from(model, &ids.device())?;
    let lm = tasks::load_adapted(base, adapter)?;
    Ok(peft_core::io::HostTensor::from_tensor(lm.logits(ids)?))
}

/// The element type `peft merge` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl MergeDtype {
    /// `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(MergeDtype::F32),
            "f16" | "float16" => Ok(MergeDtype::F16),
            "bf16" | "bfloat16" => Ok(MergeDtype::Bf16),
            other => Err(PeftError::Config(format!(
                "unknown dtype `{other}` (f32, f16, bf16)"
            ))),
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            MergeDtype::F32 => "f32",
            MergeDtype::F16 => "f16",
            MergeDtype::Bf16 => "bf16",
        }
    }

    /// `t` as a safetensors dtype and little-endian bytes.
    fn encode(self, t: &HostTensor) -> (safetensors::Dtype, Vec<u8>) {
        match self {
            MergeDtype::F32 => (
                safetensors::Dtype::F32,
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            MergeDtype::F16 => (
                safetensors::Dtype::F16,
                t.data
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            MergeDtype::Bf16 => (
                safetensors::Dtype::BF16,
                t.data
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
        }
    }
}

/// The weight files of a Hugging Face model folder: `model.safetensors`, or
/// the shards named by `model.safetensors.index.json` (with the index).
fn weight_files(model: &Path) -> Result<(Vec<String>, Option<serde_json::Value>)> {
    if model.join("model.safetensors").is_file() {
        return Ok((vec!["model.safetensors".into()], None));
    }
    let index_path = model.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).map_err(|_| PeftError::Checkpoint {
        path: model.to_path_buf(),
        message: "merge needs a GGUF file or a Hugging Face folder with model.safetensors or model.safetensors.index.json".into(),
    })?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| PeftError::Json {
            path: index_path.clone(),
            source,
        })?;
    let mut files: Vec<String> = index["weight_map"]
        .as_object()
        .ok_or_else(|| PeftError::Checkpoint {
            path: index_path.clone(),
            message: "no `weight_map` object".into(),
        })?
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    if let Some(f) = files.iter().find(|f| f.contains('/') || f.contains("..")) {
        return Err(PeftError::Checkpoint {
            path: index_path,
            message: format!("shard name `{f}` leaves the model directory"),
        });
    }
    Ok((files, Some(index)))
}

/// `peft merge`: folds a LoRA / DoRA / (IA)³ adapter into a Hugging Face
/// model folder (one `model.safetensors` or shards with their index) and
/// writes the merged model to `out`: the same files, every tensor that did
/// not change as it was (converted to `dtype`), `config.json` and the
/// tokenizer copied. A GGUF model (Llama) is written as a Hugging Face
/// folder. Returns the names of the tensors that changed.
pub fn merge<B: Backend>(
    model: &Path,
    adapter: &Path,
    out: &Path,
    dtype: MergeDtype,
    device: &B::Device,
) -> Result<Vec<String>> {
    if model.extension().is_some_and(|e| e == "gguf") {
        return merge_gguf::<B>(model, adapter, out, dtype, device);
    }
    let (files, index) = weight_files(model)?;
    let target = MergeTarget {
        model,
        adapter,
        out,
        files: &files,
        index: index.as_ref(),
        dtype,
    };
    match tasks::arch_of(model)? {
        Arch::Llama => merge_into::<B, Llama<B>>(Llama::load(model, device)?, &target, |_| true),
        Arch::Bert => merge_into::<B, Bert<B>>(Bert::load(model, device)?, &target, |_| true),
        // GPT-2's Conv1D stores [in, out], as Burn does; its `score` head
        // (GPT2ForSequenceClassification) is an nn.Linear, [out, in].
        Arch::Gpt2 => {
            let gpt2 = Gpt2::load(model, device)?;
            merge_into::<B, Gpt2<B>>(gpt2, &target, |path| path == "score")
        }
    }
}

/// What [`merge`] reads and writes.
struct MergeTarget<'a> {
    model: &'a Path,
    adapter: &'a Path,
    out: &'a Path,
    files: &'a [String],
    index: Option<&'a serde_json::Value>,
    dtype: MergeDtype,
}

/// `base` with the LoRA / DoRA / (IA)³ adapter in `adapter` folded in.
fn merged_model<B: Backend, M: peft_core::PeftModel<B> + Clone>(
    base: M,
    adapter: &Path,
) -> Result<M> {
    match Method::detect(adapter)? {
        Method::Lora(_) | Method::Ia3(_) | Method::Loha(_) | Method::Lokr(_) | Method::Oft(_) => {
            tasks::Slots::from_pretrained(base, adapter)?.merge_and_unload()
        }
        other => Err(PeftError::Config(format!(
            "{} adds modules or inputs; it cannot be merged into the base weights",
            other.name()
        ))),
    }
}

/// Writes `tensors` to `path` as a safetensors file of `dtype`; returns the
/// size of the tensor data in bytes (an index's `total_size`).
fn write_weights(
    path: &Path,
    tensors: &[(String, HostTensor)],
    dtype: MergeDtype,
) -> Result<usize> {
    let encoded: Vec<(safetensors::Dtype, Vec<u8>)> =
        tensors.iter().map(|(_, x)| dtype.encode(x)).collect();
    let views = tensors
        .iter()
        .zip(&encoded)
        .map(|((k, x), (dt, bytes))| {
            safetensors::tensor::TensorView::new(*dt, x.shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| PeftError::State(format!("{k}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| PeftError::State(format!("serialising {}: {e}", path.display())))?;
    peft_core::io::write_atomic(path, &bytes)?;
    Ok(encoded.iter().map(|(_, b)| b.len()).sum())
}

/// A Llama's tensors under Hugging Face's names and layout (`[out, in]`).
fn llama_hf_tensors<B: Backend>(m: &Llama<B>) -> Vec<(String, HostTensor)> {
    use peft_core::PeftModel;
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            HostTensor::from_tensor(m.embed_tokens.weight.val()),
        ),
        (
            "model.norm.weight".to_string(),
            HostTensor::from_tensor(m.norm.gamma.val()),
        ),
    ];
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            HostTensor::from_tensor(l.input_layernorm.gamma.val()),
        ));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            HostTensor::from_tensor(l.post_attention_layernorm.gamma.val()),
        ));
    }
    m.visit_linears(&mut |path, slot| {
        out.push((
            format!("{path}.weight"),
            HostTensor::from_tensor(slot.base_weight()).transposed(),
        ));
        if let Some(b) = &slot.base.bias {
            out.push((format!("{path}.bias"), HostTensor::from_tensor(b.val())));
        }
    });
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `peft merge` of a GGUF model: the adapter folded into the dequantised
/// weights, written as a Hugging Face folder (`model.safetensors` of
/// `dtype` and a `config.json` from the GGUF metadata). The tokenizer stays
/// in the GGUF file.
fn merge_gguf<B: Backend>(
    gguf: &Path,
    adapter: &Path,
    out: &Path,
    dtype: MergeDtype,
    device: &B::Device,
) -> Result<Vec<String>> {
    let base = Llama::<B>::from_gguf(gguf, device)?;
    let before = llama_hf_tensors(&base);
    let merged = merged_model(base, adapter)?;
    let after = llama_hf_tensors(&merged);
    let changed: Vec<String> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.1 != a.1)
        .map(|(_, a)| a.0.clone())
        .collect();
    if changed.is_empty() {
        return Err(PeftError::State(format!(
            "merging {} changed no weight of {}",
            adapter.display(),
            gguf.display()
        )));
    }
    let c = &merged.config;
    let theta = c
        .rope_theta
        .or(c.rope_parameters.as_ref().map(|r| r.rope_theta))
        .unwrap_or(10_000.0);
    let context = peft_models::gguf::Gguf::open(gguf)?
        .meta_u64("llama.context_length")
        .unwrap_or(2048);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": c.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "torch_dtype": match dtype {
            MergeDtype::F32 => "float32",
            MergeDtype::F16 => "float16",
            MergeDtype::Bf16 => "bfloat16",
        },
    });
    std::fs::create_dir_all(out).map_err(|source| PeftError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    write_weights(&out.join("model.safetensors"), &after, dtype)?;
    // The tokenizer lives in the GGUF metadata; the folder gets its own.
    let tokenizer = Tokenizer::from_gguf(&peft_models::gguf::Gguf::open(gguf)?)?;
    peft_core::io::write_atomic(&out.join("tokenizer.json"), tokenizer.to_json()?.as_bytes())?;
    peft_core::io::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("a config serialises")
            .as_bytes(),
    )?;
    Ok(changed)
}

/// [`merge`] into a Hugging Face folder: the merged linears replace their
/// keys in the checkpoint's files; `transpose(path)` says which layers the
/// file stores `[out, in]` (not GPT-2's Conv1D).
fn merge_into<B: Backend, M: peft_core::PeftModel<B> + Clone>(
    base: M,
    t: &MergeTarget<'_>,
    transpose: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let merged = merged_model(base, t.adapter)?;
    // The merged linears, under their checkpoint keys.
    let mut updates = std::collections::HashMap::new();
    merged.visit_linears(&mut |path, slot| {
        let mut w = HostTensor::from_tensor(slot.base_weight());
        if transpose(path) {
            w = w.transposed();
        }
        updates.insert(format!("{path}.weight"), w);
        if let Some(b) = &slot.base.bias {
            updates.insert(format!("{path}.bias"), HostTensor::from_tensor(b.val()));
        }
    });
    std::fs::create_dir_all(t.out).map_err(|source| PeftError::Io {
        path: t.out.to_path_buf(),
        source,
    })?;
    let mut changed = Vec::new();
    let mut total_size = 0usize;
    for name in t.files {
        let file = t.model.join(name);
        let mut tensors: Vec<(String, HostTensor)> = read_safetensors(&file)?.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, tensor) in &mut tensors {
            // Keys absent from the model (e.g. a head tied to the embeddings) stay.
            let Some(new) = updates.get(key) else {
                continue;
            };
            if new.shape != tensor.shape {
                return Err(PeftError::Shape {
                    name: key.clone(),
                    expected: tensor.shape.clone(),
                    found: new.shape.clone(),
                });
            }
            if new != tensor {
                changed.push(key.clone());
                *tensor = new.clone();
            }
        }
        total_size += write_weights(&t.out.join(name), &tensors, t.dtype)?;
    }
    if changed.is_empty() {
        return Err(PeftError::State(format!(
            "merging {} changed no tensor of {}: the adapter's module names do not match the checkpoint's keys",
            t.adapter.display(),
            t.model.display()
        )));
    }
    if let Some(index) = t.index {
        let mut index = index.clone();
        index["metadata"]["total_size"] = json!(total_size);
        peft_core::io::write_atomic(
            &t.out.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)
                .expect("an index serialises")
                .as_bytes(),
        )?;
    }
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        if t.model.join(f).is_file() {
            let bytes = std::fs::read(t.model.join(f)).map_err(|source| PeftError::Io {
                path: t.model.join(f),
                source,
            })?;
            peft_core::io::write_atomic(&t.out.join(f), &bytes)?;
        }
    }
    changed.sort();
    Ok(changed)
}
