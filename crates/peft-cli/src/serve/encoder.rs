//! The engine of an encoder (BERT): `/v1/embeddings`, sentence
//! embeddings as sentence-transformers computes them (the mean of the last
//! hidden states over real tokens, L2-normalised), and `/classify`, the
//! class probabilities of a sequence-classification head (the base's, or
//! an adapter's copy in `modules_to_save`), through the base model or an
//! adapter of any method. Each request's inputs run as one padded batch.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::Result;
use peft_models::bert::Bert;
use tokio::sync::oneshot;

use super::engine::{EngineConfig, Event, Job};
use super::error::ApiError;
use super::metrics::Metrics;
use super::resident::Resident;
use crate::tasks::{self, Adapted, Encoder, ProblemType};

/// Embeddings of some inputs.
pub struct Embedding {
    /// The adapter and its folder; `None`: the base model.
    pub adapter: Option<(String, PathBuf)>,
    /// Token ids of each input.
    pub inputs: Vec<Vec<u32>>,
    /// One vector per input.
    pub reply: oneshot::Sender<std::result::Result<Vec<Vec<f32>>, ApiError>>,
}

/// Class probabilities of some inputs.
pub struct Classification {
    /// The adapter and its folder; `None`: the base model.
    pub adapter: Option<(String, PathBuf)>,
    /// Token ids of each input.
    pub inputs: Vec<Vec<u32>>,
    /// One row of probabilities per input, and the class names.
    pub reply: oneshot::Sender<std::result::Result<Classes, ApiError>>,
}

/// Each input's scores (class probabilities, label probabilities or
/// values, as the problem type says), the outputs' names, and the problem.
pub type Classes = (Vec<Vec<f32>>, Vec<String>, ProblemType);

/// A servable encoder: the model with its method, and its classes when it
/// has a classification head.
struct Served<B: Backend> {
    model: Adapted<B, Bert<B>>,
    labels: Option<Vec<String>>,
    /// What the head's outputs mean ([`ProblemType::of_adapter`]).
    problem: ProblemType,
}

impl<B: Backend> Served<B> {
    /// `base` with the adapter in `dir`; with a classification head of the
    /// adapter's copy's size when the folder carries one (a SEQ_CLS
    /// adapter's `classifier` in `modules_to_save`). Classes are named by
    /// the folder's `labels.json` (our runs), else `LABEL_i` as
    /// transformers names them.
    ///
    /// A bottleneck adapter's AdapterHub head (a sequence head; a tagging
    /// head classifies no sequence) names its classes itself when the
    /// folder has no `labels.json`.
    fn load(base: &Bert<B>, dir: &Path) -> Result<Self> {
        let hub = peft_adapter::head::read_head_config(dir)?
            .filter(|h| h.head_type != peft_adapter::HeadType::Tagging);
        let (bert, classes) = match (&hub, tasks::head_labels(dir, "classifier")?) {
            (Some(h), _) => (base.clone(), Some(h.num_labels)),
            (None, Some(n)) => (base.clone().with_classifier(n)?, Some(n)),
            (None, None) => (base.clone(), None),
        };
        let labels = match &hub {
            Some(h) if !dir.join("labels.json").is_file() => Some(h.labels()),
            _ => classes
                .map(|n| tasks::class_names(Some(dir), n))
                .transpose()?,
        };
        let guess = match &hub {
            Some(h) if h.head_type == peft_adapter::HeadType::MultiLabelClassification => {
                ProblemType::MultiLabel
            }
            _ => ProblemType::SingleLabel,
        };
        Ok(Served {
            model: tasks::load_adapted(bert, Some(dir))?,
            problem: ProblemType::of_adapter(Some(dir), classes.unwrap_or(0), guess)?,
            labels,
        })
    }

    /// The base itself; its own head's classes (`LABEL_i`), if it has one.
    fn plain(base: &Bert<B>) -> Result<Self> {
        let labels = base
            .classifier
            .as_ref()
            .map(|c| (0..c.d_output()).map(|i| format!("LABEL_{i}")).collect());
        let outputs = base.classifier.as_ref().map_or(0, |c| c.d_output());
        Ok(Served {
            model: tasks::load_adapted(base.clone(), None)?,
            labels,
            problem: ProblemType::of_adapter(None, outputs, ProblemType::SingleLabel)?,
        })
    }
}

/// Loads the encoder and answers jobs until `jobs` closes. `ready` gets
/// the load's outcome first.
pub fn run<B: Backend>(
    config: EngineConfig,
    metrics: Arc<Metrics>,
    device: B::Device,
    jobs: Receiver<Job>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let base = match Bert::<B>::load(&config.model, &device) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let plain = match Served::plain(&base) {
        Ok(p) => Rc::new(p),
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut models = Models {
        base,
        plain,
        resident: Resident::new(config.max_loaded),
        metrics,
    };
    let _ = ready.send(Ok(()));
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Load { name, dir, reply } => {
                let _ = reply.send(models.served(&Some((name, dir))).map(|_| ()));
            }
            Job::Unload { name } => models.resident.remove(&name, &models.metrics),
            Job::Generate(g) => {
                models.metrics.leave_queue();
                let _ = g.events.send(Event::Failed(ApiError::invalid(
                    "the served model is an encoder (BERT): it gives /v1/embeddings, not completions".into(),
                )));
            }
            Job::Embed(e) => {
                let outcome = models.served(&e.adapter).and_then(|m| {
                    guarded(|| embed(&m.model, &e.inputs, &device), "the embedding pass")
                });
                let _ = e.reply.send(outcome);
            }
            Job::Classify(c) => {
                let outcome = models.served(&c.adapter).and_then(|m| {
                    let labels = m.labels.clone().ok_or_else(|| {
                        ApiError::invalid(format!(
                            "{} has no classification head (a SEQ_CLS adapter carries one)",
                            c.adapter
                                .as_ref()
                                .map_or("the base model", |a| a.0.as_str())
                        ))
                    })?;
                    let scores = guarded(
                        || classify(&m.model, m.problem, &c.inputs, &device),
                        "the classification pass",
                    )?;
                    Ok((scores, labels, m.problem))
                });
                let _ = c.reply.send(outcome);
            }
        }
    }
}

/// The encoder engine's models: the base, and the resident adapters.
struct Models<B: Backend> {
    base: Bert<B>,
    plain: Rc<Served<B>>,
    resident: Resident<Served<B>>,
    metrics: Arc<Metrics>,
}

impl<B: Backend> Models<B> {
    /// The model of `adapter` (loaded if it is not resident), or the base.
    fn served(
        &mut self,
        adapter: &Option<(String, PathBuf)>,
    ) -> std::result::Result<Rc<Served<B>>, ApiError> {
        match adapter {
            None => Ok(self.plain.clone()),
            Some((name, dir)) => {
                let base = &self.base;
                self.resident
                    .get_or_load(name, &self.metrics, || Served::load(base, dir))
            }
        }
    }
}

/// `f`, its panic a 500 naming `what`.
fn guarded<T>(
    f: impl FnOnce() -> std::result::Result<T, ApiError>,
    what: &str,
) -> std::result::Result<T, ApiError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| ApiError::internal(format!("{what} panicked")))?
}

/// `inputs` as one right-padded batch: ids and mask `[rows, longest]`.
pub(super) fn padded<B: Backend>(
    inputs: &[Vec<u32>],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let (rows, len) = (inputs.len(), inputs.iter().map(Vec::len).max().unwrap_or(1));
    let mut ids = Vec::with_capacity(rows * len);
    let mut mask = Vec::with_capacity(rows * len);
    for input in inputs {
        for j in 0..len {
            ids.push(input.get(j).map_or(0, |&i| i as i64));
            mask.push(if j < input.len() { 1.0f32 } else { 0.0 });
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [rows, len]), device),
        Tensor::from_data(TensorData::new(mask, [rows, len]), device),
    )
}

/// The rows of a `[rows, n]` tensor.
pub(super) fn rows_of<B: Backend>(t: Tensor<B, 2>) -> std::result::Result<Vec<Vec<f32>>, ApiError> {
    let n = t.dims()[1];
    let flat: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| ApiError::internal(format!("{e:?}")))?;
    Ok(flat.chunks(n).map(<[f32]>::to_vec).collect())
}

/// The scores of `inputs`: the head's logits through the problem's
/// [`ProblemType::activate`].
fn classify<B: Backend>(
    model: &Adapted<B, Bert<B>>,
    problem: ProblemType,
    inputs: &[Vec<u32>],
    device: &B::Device,
) -> std::result::Result<Vec<Vec<f32>>, ApiError> {
    let (ids, mask) = padded(inputs, device);
    let logits = model
        .classify(ids, mask)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    rows_of(problem.activate(logits))
}

/// The normalised mean-pooled embeddings of `inputs` (right-padded into
/// one batch).
fn embed<B: Backend>(
    model: &Adapted<B, Bert<B>>,
    inputs: &[Vec<u32>],
    device: &B::Device,
) -> std::result::Result<Vec<Vec<f32>>, ApiError> {
    let (ids, mask) = padded(inputs, device);
    let hidden = model
        .hidden(ids, mask.clone())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    rows_of(Bert::pool_mean(hidden, mask, true))
}
