//! The engine: one thread that owns the frozen base model and every
//! resident adapter, and steps the running sequences.
//!
//! Scheduling is at step boundaries: between two steps the engine takes
//! the requests that arrived (prefilling each through its adapter), then
//! advances every running sequence by one token, whatever adapter it
//! names, and drops the sequences that finished or whose client went away.
//! Each sequence has its own KV cache. The steps of different sequences
//! run one after another, not as one batched tensor: the models take one
//! cache length per batch, so rows of different lengths cannot share a
//! step yet.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::backend::Backend;
use peft_core::generate::{CausalLm, Sampler};
use peft_core::Result;
use tokio::sync::{mpsc, oneshot};

use super::encoder::{Classification, Embedding};
use super::error::ApiError;
use super::metrics::Metrics;
use super::resident::Resident;
use super::text::TextStream;
use crate::tasks::{self, Adapted, CausalModel, Decoding};

/// What the HTTP side asks of the engine.
pub enum Job {
    /// Generate one sequence.
    Generate(Generation),
    /// Make adapter `name` resident from `dir` (checking that it loads).
    Load {
        /// The adapter's name.
        name: String,
        /// Its folder.
        dir: PathBuf,
        /// The outcome.
        reply: oneshot::Sender<std::result::Result<(), ApiError>>,
    },
    /// Drop adapter `name` from memory.
    Unload {
        /// The adapter's name.
        name: String,
    },
    /// Embeddings (an encoder's job).
    Embed(Embedding),
    /// Class probabilities (an encoder's job).
    Classify(Classification),
}

/// One sequence to generate.
pub struct Generation {
    /// The adapter and its folder; `None`: the base model.
    pub adapter: Option<(String, PathBuf)>,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// At most this many new tokens.
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampler: Sampler,
    /// Texts that end the sequence (not included in it).
    pub stop: Vec<String>,
    /// Where the sequence's text goes, piece by piece.
    pub events: mpsc::UnboundedSender<Event>,
}

/// What a sequence reports.
#[derive(Debug)]
pub enum Event {
    /// More text.
    Text(String),
    /// The end: why, and how many tokens the prompt and the answer had.
    Done {
        /// `stop` (end-of-sequence or a stop text) or `length`.
        finish_reason: &'static str,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The sequence failed; nothing more follows.
    Failed(ApiError),
}

/// What the engine is started with.
pub struct EngineConfig {
    /// The model (folder or GGUF file).
    pub model: PathBuf,
    /// At most this many adapters resident at once (least recently used
    /// ones leave first; they reload from their folder when asked for).
    pub max_loaded: usize,
    /// End-of-sequence token ids.
    pub eos_ids: Vec<u32>,
    /// The model's context length.
    pub context: usize,
}

/// A running sequence.
struct Running<B: Backend, M: burn::module::Module<B>> {
    model: Rc<Adapted<B, M>>,
    adapter: Option<String>,
    state: Decoding<B>,
    sampler: Sampler,
    max_tokens: usize,
    prompt_tokens: usize,
    generated: usize,
    text: TextStream,
    events: mpsc::UnboundedSender<Event>,
}

/// The engine's state: the base model, resident adapters, running
/// sequences.
struct Engine<B: Backend, M: burn::module::Module<B>> {
    base: M,
    plain: Rc<Adapted<B, M>>,
    resident: Resident<Adapted<B, M>>,
    running: Vec<Running<B, M>>,
    config: EngineConfig,
    tokenizer: Arc<peft_models::tokenizer::Tokenizer>,
    metrics: Arc<Metrics>,
}

/// Loads the model and runs the engine until `jobs` closes and the last
/// sequence ends. `ready` gets the load's outcome first.
pub fn run<B: Backend, M>(
    config: EngineConfig,
    tokenizer: Arc<peft_models::tokenizer::Tokenizer>,
    metrics: Arc<Metrics>,
    device: B::Device,
    jobs: Receiver<Job>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) where
    M: CausalModel<B> + CausalLm<B>,
{
    let base = match M::load_from(&config.model, &device) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let plain = Rc::new(tasks::load_adapted(base.clone(), None).expect("no adapter to load"));
    let mut engine = Engine {
        base,
        plain,
        resident: Resident::new(config.max_loaded),
        running: Vec::new(),
        config,
        tokenizer,
        metrics,
    };
    let _ = ready.send(Ok(()));
    loop {
        // Idle: wait for work. Busy: take what arrived, then step.
        let first = match engine.running.is_empty() {
            true => match jobs.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            },
            false => None,
        };
        for job in first
            .into_iter()
            .chain(std::iter::from_fn(|| jobs.try_recv().ok()))
        {
            engine.take(job);
        }
        engine.step();
    }
}

impl<B: Backend, M> Engine<B, M>
where
    M: CausalModel<B> + CausalLm<B>,
{
    fn take(&mut self, job: Job) {
        match job {
            Job::Load { name, dir, reply } => {
                let outcome = self.resident_model(&name, &dir).map(|_| ());
                let _ = reply.send(outcome);
            }
            Job::Unload { name } => self.resident.remove(&name, &self.metrics),
            Job::Embed(e) => {
                let _ = e.reply.send(Err(ApiError::invalid(
                    "the served model is a decoder: /v1/embeddings needs an encoder (BERT)".into(),
                )));
            }
            Job::Classify(c) => {
                let _ = c.reply.send(Err(ApiError::invalid(
                    "the served model is a decoder: /classify serves an encoder (BERT)".into(),
                )));
            }
            Job::Generate(g) => {
                let events = g.events.clone();
                if let Err(e) = self.admit(g) {
                    self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                    self.metrics.leave_queue();
                    let _ = events.send(Event::Failed(e));
                }
            }
        }
    }

    /// Adapter `name`'s model, loaded from `dir` if it is not resident.
    fn resident_model(
        &mut self,
        name: &str,
        dir: &Path,
    ) -> std::result::Result<Rc<Adapted<B, M>>, ApiError> {
        let base = &self.base;
        self.resident.get_or_load(name, &self.metrics, || {
            tasks::load_adapted(base.clone(), Some(dir))
        })
    }

    /// Prefills `g` and adds it to the running sequences.
    fn admit(&mut self, g: Generation) -> std::result::Result<(), ApiError> {
        let model = match &g.adapter {
            Some((name, dir)) => self.resident_model(name, dir)?,
            None => self.plain.clone(),
        };
        let state = catch_unwind(AssertUnwindSafe(|| model.start(&g.prompt)))
            .map_err(|_| ApiError::internal("the prompt's forward pass panicked".into()))?
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        // A prefix's or soft prompt's virtual tokens take positions too:
        // the cache after the prompt tells how many.
        let used = state.positions();
        if used + g.max_tokens > self.config.context {
            return Err(ApiError::context(
                self.config.context,
                used.saturating_sub(g.prompt.len()),
                g.prompt.len(),
                g.max_tokens,
            ));
        }
        self.metrics
            .prompt_tokens
            .fetch_add(g.prompt.len() as u64, Ordering::Relaxed);
        self.running.push(Running {
            model,
            adapter: g.adapter.map(|(n, _)| n),
            state,
            sampler: g.sampler,
            max_tokens: g.max_tokens,
            prompt_tokens: g.prompt.len(),
            generated: 0,
            text: TextStream::new(self.tokenizer.clone(), g.stop),
            events: g.events,
        });
        Ok(())
    }

    /// One token for every running sequence; the finished ones leave.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let started = Instant::now();
        let stepped = self.running.len();
        let eos = self.config.eos_ids.clone();
        let metrics = self.metrics.clone();
        let mut tokens = 0;
        self.running.retain_mut(|seq| {
            let before = seq.generated;
            let keep = seq.step(&eos);
            // End-of-sequence ends a sequence without adding a token.
            tokens += seq.generated - before;
            if !keep {
                metrics.leave_queue();
            }
            keep
        });
        self.metrics.record_step(stepped, tokens, started.elapsed());
    }
}

impl<B: Backend, M> Running<B, M>
where
    M: CausalModel<B> + CausalLm<B>,
{
    /// Samples this sequence's next token, reports its text, and feeds it
    /// on; `false` when the sequence is over (finished, failed, or its
    /// client is gone).
    fn step(&mut self, eos: &[u32]) -> bool {
        if self.events.is_closed() {
            return false;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| self.next_token(eos)));
        match outcome {
            Ok(Ok(Some(reason))) => {
                let _ = self.events.send(Event::Done {
                    finish_reason: reason,
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.generated,
                });
                false
            }
            Ok(Ok(None)) => true,
            Ok(Err(e)) => {
                let _ = self.events.send(Event::Failed(e));
                false
            }
            Err(_) => {
                let _ = self.events.send(Event::Failed(ApiError::internal(format!(
                    "generation with {} panicked",
                    self.adapter.as_deref().unwrap_or("the base model")
                ))));
                false
            }
        }
    }

    /// One token: `Some(finish_reason)` when the sequence ends with it.
    fn next_token(&mut self, eos: &[u32]) -> std::result::Result<Option<&'static str>, ApiError> {
        let token = self.state.sample(&mut self.sampler);
        if eos.contains(&token) {
            self.flush();
            return Ok(Some("stop"));
        }
        self.generated += 1;
        let (delta, stopped) = self
            .text
            .push(token)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if !delta.is_empty() {
            let _ = self.events.send(Event::Text(delta));
        }
        if stopped {
            return Ok(Some("stop"));
        }
        if self.generated >= self.max_tokens {
            self.flush();
            return Ok(Some("length"));
        }
        self.model.advance(&mut self.state, token);
        Ok(None)
    }

    /// Sends the text held back (an incomplete character or a possible
    /// start of a stop text) when the sequence ends.
    fn flush(&mut self) {
        let rest = self.text.finish();
        if !rest.is_empty() {
            let _ = self.events.send(Event::Text(rest));
        }
    }
}
