//! `peft train`: a model and a method from flags, fitted by the
//! [`Trainer`](crate::train::Trainer) on labelled text (sequence
//! classification) or plain text (causal LM).

use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleDisplay};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use peft_adapter::HeadConfig;
use peft_core::{ParamCount, PeftError, Result};
use peft_models::bert::Bert;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::seq_cls::ScoreHead;
use peft_models::tokenizer::Tokenizer;
use serde_json::json;

use super::{quantized_params, write_json, Report, Task, TrainJob};
use crate::data;
use crate::tasks::adalora::AdaLoraSteps;
pub use crate::tasks::Quantize;
use crate::tasks::{
    self, Adapted, Arch, CausalModel, Classifier, Encoded, Encoder, Method, ProblemType,
};
use crate::train::{BatchLoss, RunDir, Saving, StepHook, Trainer};

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

/// The outputs' names (the head's rows: classes, labels or values) and the
/// training and held-out examples, read as the job's problem type says.
fn seq_cls_data(job: &TrainJob) -> Result<(Vec<String>, Encoded, Encoded)> {
    let examples = data::read_labelled(&job.data, &job.text_column, &job.label_column)?;
    let problem = ProblemType::of_run(job.problem_type.as_deref(), &job.model, &examples)?;
    // Outputs and targets come from every example (held-out ones too, so
    // that a label seen only there has a row of the head), and a bad label
    // is named by its place in the file.
    let (labels, targets) = problem.targets(&examples, &job.label_column, &job.data)?;
    let enough = match problem {
        ProblemType::SingleLabel => labels.len() >= 2,
        ProblemType::MultiLabel | ProblemType::Regression => !labels.is_empty(),
    };
    if !enough {
        return Err(PeftError::Checkpoint {
            path: job.data.clone(),
            message: format!(
                "labels {labels:?}: {} needs {}",
                problem.name(),
                match problem {
                    ProblemType::SingleLabel => "two classes or more",
                    _ => "one label or more",
                }
            ),
        });
    }
    let order: Vec<usize> = (0..examples.len()).collect();
    let (mut train, held) = data::split(&order, job.held_out, job.train.seed);
    if let Some(n) = job.max_train {
        train.truncate(n);
    }
    let enc = |idx: Vec<usize>| Encoded {
        texts: idx.iter().map(|&i| examples[i].text.clone()).collect(),
        problem,
        targets: targets.select(&idx),
    };
    let (train, held) = (enc(train), enc(held));
    Ok((labels, train, held))
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
    // A PEFT method (slot or prompt learning) trains PEFT's SEQ_CLS
    // adapter: the model's own head (pooler and `classifier`; after a soft
    // prompt the pooler reads its first virtual token, as in PEFT), its
    // copy in the adapter's `modules_to_save`. Bottleneck adapters train
    // AdapterHub's classification head, saved beside the adapter
    // (`head_config.json` + `model_head.safetensors`).
    let (bert, method) = match job.method.for_seq_cls(&job.model) {
        Some(method) => (bert.with_classifier(labels.len())?, method),
        None => {
            if let Some(last) = job.last().filter(|l| l.join("head.safetensors").is_file()) {
                return Err(PeftError::Checkpoint {
                    path: last.join("head.safetensors"),
                    message: "this run trained the mean-pooled head of earlier versions; \
                              bottleneck adapters now train AdapterHub's head: start a new run"
                        .into(),
                });
            }
            (bert, job.method.clone())
        }
    };
    let data = (labels, train, held);
    train_classifier(
        job,
        progress,
        bert,
        None,
        &method,
        data,
        &tok,
        quantized_params,
    )
}

/// Sequence classification on a decoder (`*ForSequenceClassification`):
/// its `score` head, the adapter's copy of it in `modules_to_save`, each
/// row read at its last real token (after a soft prompt's positions). PEFT
/// methods only (slot methods, prefix, prompt, P-tuning): a bottleneck
/// adapter has no head for a decoder here and would leave it untrained.
fn train_seq_cls_decoder<B, M>(
    job: &TrainJob,
    progress: &indicatif::ProgressBar,
    device: &B::Device,
) -> Result<Report>
where
    B: AutodiffBackend,
    M: CausalModel<B> + ScoreHead<B> + AutodiffModule<B> + ModuleDisplay + Clone + 'static,
    M::InnerModule: CausalModel<B::InnerBackend> + ModuleDisplay + Clone + 'static,
    Adapted<B, M>: Encoder<B>,
    tasks::InnerAdapted<B, M>: Encoder<B::InnerBackend>,
{
    let device = device.clone();
    B::seed(&device, job.train.seed);
    let method = job.method.for_seq_cls(&job.model).ok_or_else(|| {
        PeftError::Config(format!(
            "seq-cls on a decoder trains a PEFT method (a slot method such as lora or ia3, \
             prefix, prompt, p-tuning), whose adapter keeps a copy of the `score` head; {} \
             does not",
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
/// and method are set: the run folder with `labels.json`, `task.json` and
/// `train_config.json`, the adapter attached, training, and every
/// checkpoint with the adapter, its head, `labels.json` and `task.json`.
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
    M: peft_core::PeftModel<B> + AutodiffModule<B> + ModuleDisplay + Clone + 'static,
    M::InnerModule: peft_core::PeftModel<B::InnerBackend> + ModuleDisplay + Clone + 'static,
    Adapted<B, M>: Encoder<B>,
    tasks::InnerAdapted<B, M>: Encoder<B::InnerBackend>,
{
    let mut run = RunDir::create(&job.out, job.resume)?;
    let problem = train.problem;
    write_json(&job.out.join("labels.json"), &json!(labels))?;
    tasks::write_problem_type(&job.out, problem)?;
    write_json(
        &job.out.join("train_config.json"),
        &job.config_json(json!({"labels": labels, "problem_type": problem.name()})),
    )?;
    let labels_json = json!(labels);
    let steps = job.train.total_steps(train.texts.len());
    let method = tasks::adalora::for_run(method, steps, job.last().is_some())?;
    let mut encoder = tasks::attach_to_train::<B, M>(model, &method, job.last().as_deref())?;
    if let (Adapted::Adapters(a), None) = (&mut encoder, job.last()) {
        // AdapterHub's `add_classification_head` (multilabel for a
        // multi-label problem; one output, a regression, as AdapterHub's
        // head treats it), named as the adapter, with the data's labels.
        let head = match problem {
            ProblemType::MultiLabel => HeadConfig::multi_label(labels.len()),
            _ => HeadConfig::classification(labels.len()),
        };
        a.add_head(peft_core::DEFAULT_ADAPTER, head.with_labels(&labels)?)?;
    }
    let count = encoder.param_count();
    let model = Classifier { encoder, head };
    let hook = AdaLoraSteps::<B, M>::for_model(&model)?;
    let report = fit_classifier(
        model,
        hook.map(|h| Box::new(h) as Box<dyn StepHook<_>>),
        |m: &Classifier<B, Adapted<B, M>>| tasks::adalora::regularization(m),
        count,
        tok,
        &train,
        &held,
        job,
        &mut run,
        progress,
        move |m, dir, saving| {
            m.encoder.save_trained(dir, saving)?;
            write_json(&dir.join("labels.json"), &labels_json)?;
            tasks::write_problem_type(dir, problem)
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
    hook: Option<Box<dyn StepHook<Classifier<B, E>>>>,
    regularize: impl Fn(&Classifier<B, E>) -> Option<Tensor<B, 1>> + Sync,
    count: ParamCount,
    tok: &Tokenizer,
    train: &Encoded,
    held: &Encoded,
    job: &TrainJob,
    run: &mut RunDir,
    progress: &indicatif::ProgressBar,
    save_encoder: impl Fn(&Classifier<B::InnerBackend, E::InnerModule>, &Path, Saving) -> Result<()>,
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
    let before = tasks::classifier_metric(&model.valid(), tok, held)?;
    let mut trainer = Trainer::new(
        &model,
        &job.train,
        train.texts.len(),
        run,
        progress,
        job.last().as_deref(),
    )?;
    if let Some(hook) = hook {
        trainer = trainer.with_hook(hook);
    }
    let (_, out) = trainer.fit(
        model,
        |m, idx| {
            tasks::classifier_loss(m, tok, train, idx)
                .map(|(l, n)| (BatchLoss::Graph(with_term(l, regularize(m))), n))
        },
        |m| tasks::classifier_metric(m, tok, held),
        |m, dir, saving| {
            save_encoder(m, dir, saving)?;
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

fn train_causal<B, M>(
    job: &TrainJob,
    progress: &indicatif::ProgressBar,
    device: &B::Device,
) -> Result<Report>
where
    B: AutodiffBackend,
    M: CausalModel<B> + AutodiffModule<B> + ModuleDisplay + Clone + 'static,
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
    let steps = job.train.total_steps(train.len());
    let method = tasks::adalora::for_run(&job.method, steps, job.last().is_some())?;
    let model = tasks::attach_to_train::<B, M>(base, &method, job.last().as_deref())?;
    let hook = AdaLoraSteps::<B, M>::for_model(&model)?;
    if hook.is_some() && job.quantize.is_some() {
        // The quantized run differentiates layer by layer, without a graph
        // the regularisation could join.
        return Err(PeftError::Config(
            "--quantize: AdaLoRA's orthogonal regularisation needs the whole graph; train AdaLoRA on an unquantized base".into(),
        ));
    }
    let count = model.param_count();
    let before = tasks::perplexity(&model.valid(), &held, &inner_device)?;
    let mut trainer = Trainer::new(
        &model,
        &job.train,
        train.len(),
        &mut run,
        progress,
        job.last().as_deref(),
    )?;
    if let Some(hook) = hook {
        trainer = trainer.with_hook(Box::new(hook));
    }
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
            _ => tasks::lm_loss(m, &train, idx, &tasks::device_of(m)).map(|(l, n)| {
                let term = tasks::adalora::regularization(m);
                (BatchLoss::Graph(with_term(l, term)), n)
            }),
        },
        |m| tasks::perplexity(m, &held, &inner_device),
        |m, dir, saving| m.save_trained(dir, saving),
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

/// The loss plus a method's own term (AdaLoRA's regularisation), if any.
fn with_term<B: Backend>(loss: Tensor<B, 1>, term: Option<Tensor<B, 1>>) -> Tensor<B, 1> {
    match term {
        Some(t) => loss + t,
        None => loss,
    }
}
