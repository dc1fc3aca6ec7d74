//! The engine of an encoder (BERT): `/v1/embeddings`, sentence
//! embeddings as sentence-transformers computes them (the mean of the last
//! hidden states over real tokens, L2-normalised), through the base model
//! or an adapter of any method. Each request's inputs run as one padded
//! batch.

use std::path::PathBuf;
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
use crate::tasks::{self, Adapted, Encoder};

/// Embeddings of some inputs.
pub struct Embedding {
    /// The adapter and its folder; `None`: the base model.
    pub adapter: Option<(String, PathBuf)>,
    /// Token ids of each input.
    pub inputs: Vec<Vec<u32>>,
    /// One vector per input.
    pub reply: oneshot::Sender<std::result::Result<Vec<Vec<f32>>, ApiError>>,
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
    let plain = Rc::new(tasks::load_adapted(base.clone(), None).expect("no adapter to load"));
    let mut resident = Resident::new(config.max_loaded);
    let _ = ready.send(Ok(()));
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Load { name, dir, reply } => {
                let outcome = resident
                    .get_or_load(&name, &metrics, || {
                        tasks::load_adapted(base.clone(), Some(&dir))
                    })
                    .map(|_| ());
                let _ = reply.send(outcome);
            }
            Job::Unload { name } => resident.remove(&name, &metrics),
            Job::Generate(g) => {
                metrics.leave_queue();
                let _ = g.events.send(Event::Failed(ApiError::invalid(
                    "the served model is an encoder (BERT): it gives /v1/embeddings, not completions".into(),
                )));
            }
            Job::Embed(e) => {
                let model = match &e.adapter {
                    None => Ok(plain.clone()),
                    Some((name, dir)) => resident.get_or_load(name, &metrics, || {
                        tasks::load_adapted(base.clone(), Some(dir))
                    }),
                };
                let outcome = model.and_then(|m| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        embed(&m, &e.inputs, &device)
                    }))
                    .map_err(|_| ApiError::internal("the embedding pass panicked".into()))?
                });
                let _ = e.reply.send(outcome);
            }
        }
    }
}

/// The normalised mean-pooled embeddings of `inputs` (right-padded into
/// one batch).
fn embed<B: Backend>(
    model: &Adapted<B, Bert<B>>,
    inputs: &[Vec<u32>],
    device: &B::Device,
) -> std::result::Result<Vec<Vec<f32>>, ApiError> {
    let (rows, len) = (inputs.len(), inputs.iter().map(Vec::len).max().unwrap_or(1));
    let mut ids = Vec::with_capacity(rows * len);
    let mut mask = Vec::with_capacity(rows * len);
    for input in inputs {
        for j in 0..len {
            ids.push(input.get(j).map_or(0, |&i| i as i64));
            mask.push(if j < input.len() { 1.0f32 } else { 0.0 });
        }
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, len]), device);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [rows, len]), device);
    let hidden = model
        .hidden(ids, mask.clone())
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let pooled = Bert::pool_mean(hidden, mask, true);
    let d = pooled.dims()[1];
    let flat: Vec<f32> = pooled
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| ApiError::internal(format!("{e:?}")))?;
    Ok(flat.chunks(d).map(<[f32]>::to_vec).collect())
}
