//! The engine: one thread that owns the frozen base model and every
//! resident adapter, and steps the running sequences.
//!
//! Continuous batching, at step boundaries: between two steps the engine
//! takes the requests that arrived and prefills each alone through its
//! adapter; then every running sequence gets one token, and the finished
//! ones (or those whose client went away) leave at once. The sequences of
//! the base model, of every slot adapter (LoRA and its variants, (IA)³,
//! LoHa, LoKr, OFT, VeRA) and of prefixes and soft prompts (whose virtual
//! tokens live in the cache after prefill) decode as one batch
//! ([`DecodeBatch`]): one forward pass, row `i` routed through its own
//! adapter, each row's cache left-padded to the longest. Every slot
//! adapter is loaded once into one shared model for that routing.
//! Bottleneck adapters change every residual join of the whole batch, so
//! their sequences decode alone, one forward pass each.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::backend::Backend;
use peft_core::generate::{ids_tensor, CausalLm, KvCache, Sampler};
use peft_core::{Result, BASE_ROW};
use tokio::sync::{mpsc, oneshot};

use super::batch::DecodeBatch;
use super::encoder::{Classes, Classification, Embedding};
use super::error::ApiError;
use super::metrics::Metrics;
use super::resident::Resident;
use super::scores::ScoreModel;
use super::sequence::{Sequence, Turn};
use crate::tasks::{self, Adapted, CausalModel, Decoding, Method, Slots};
use peft_lora::AsLoraConfig;
use peft_models::seq_cls::ScoreHead;

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

/// A resident adapter.
enum Served<B: Backend, M: burn::module::Module<B>> {
    /// A slot adapter, in the engine's shared model under this name (not
    /// the served name: an adapter reloaded while sequences still run on
    /// its old version gets a new one).
    Shared(String),
    /// A prefix, a soft prompt or a bottleneck adapter, as its own wrapper
    /// around the base (shared with the sequences that decode through it).
    Own(Rc<Adapted<B, M>>),
}

/// A sequence's row in the batch.
struct Row<B: Backend, M: burn::module::Module<B>> {
    /// The adapter of the shared model it goes through (`BASE_ROW`: none).
    route: String,
    /// Its adapter, kept resident for it.
    _adapter: Option<Rc<Served<B, M>>>,
}

/// A sequence decoding alone (a bottleneck adapter's).
struct Solo<B: Backend, M: burn::module::Module<B>> {
    /// Its adapter's wrapper, kept for it.
    model: Rc<Adapted<B, M>>,
    /// Its cache and last logits.
    state: Decoding<B>,
}

/// The engine's state: the shared model, resident adapters, running
/// sequences.
struct Engine<B: Backend, M: burn::module::Module<B>> {
    base: M,
    /// The base carrying every resident slot adapter, routed per row.
    shared: Slots<B, M>,
    /// Names in `shared` and who still uses them: removed once nothing does.
    shared_users: Vec<(String, std::rc::Weak<Served<B, M>>)>,
    /// Names given to slot adapters so far (for fresh ones).
    loaded: u64,
    resident: Resident<Served<B, M>>,
    /// The sequences decoding together, in the batch's row order.
    batched: Vec<(Sequence, Row<B, M>)>,
    batch: DecodeBatch<B>,
    /// The sequences decoding alone.
    alone: Vec<(Sequence, Solo<B, M>)>,
    /// `/classify`'s models, each a SEQ_CLS adapter's `score` head with its
    /// adapter over the base (or the base's own head, under `BASE_ROW`).
    classifiers: Resident<ScoreModel<B, M>>,
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
    M: CausalModel<B> + CausalLm<B> + ScoreHead<B>,
{
    let base = match M::load_from(&config.model, &device) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut engine = Engine {
        shared: Slots::wrap(base.clone()),
        base,
        shared_users: Vec::new(),
        loaded: 0,
        resident: Resident::new(config.max_loaded),
        batched: Vec::new(),
        batch: DecodeBatch::default(),
        alone: Vec::new(),
        classifiers: Resident::ungauged(config.max_loaded),
        config,
        tokenizer,
        metrics,
    };
    let _ = ready.send(Ok(()));
    loop {
        // Idle: wait for work. Busy: take what arrived, then step.
        let idle = engine.batched.is_empty() && engine.alone.is_empty();
        let first = match idle {
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
        engine.release_unused();
    }
}

impl<B: Backend, M> Engine<B, M>
where
    M: CausalModel<B> + CausalLm<B> + ScoreHead<B>,
{
    fn take(&mut self, job: Job) {
        match job {
            Job::Load { name, dir, reply } => {
                let outcome = self.resident_model(&name, &dir).map(|_| ());
                let _ = reply.send(outcome);
            }
            Job::Unload { name } => {
                self.resident.remove(&name, &self.metrics);
                self.classifiers.remove(&name, &self.metrics);
            }
            Job::Embed(e) => {
                let _ = e.reply.send(Err(ApiError::invalid(
                    "the served model is a decoder: /v1/embeddings needs an encoder (BERT)".into(),
                )));
            }
            Job::Classify(c) => {
                let outcome = self.classify(&c);
                let _ = c.reply.send(outcome);
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

    /// Adapter `name`, loaded from `dir` if it is not resident: a slot
    /// adapter into the shared model, any other method as its own wrapper.
    /// So is a LoRA adapter whose init splits the base weights (PiSSA,
    /// OLoRA, loaded as PEFT loads them: the base split again): in the
    /// shared model the split would change every other adapter's base.
    fn resident_model(
        &mut self,
        name: &str,
        dir: &Path,
    ) -> std::result::Result<Rc<Served<B, M>>, ApiError> {
        let (base, shared, loaded) = (&self.base, &mut self.shared, &mut self.loaded);
        let mut fresh = None;
        let served = self.resident.get_or_load(name, &self.metrics, || {
            if matches!(Method::detect(dir)?, Method::Slot(c) if !c.splits_base()) {
                *loaded += 1;
                let id = format!("served{loaded}");
                shared.load_adapter(dir, &id)?;
                fresh = Some(id.clone());
                return Ok(Served::Shared(id));
            }
            tasks::load_adapted(base.clone(), Some(dir)).map(|m| Served::Own(Rc::new(m)))
        })?;
        if let Some(id) = fresh {
            self.shared_users.push((id, Rc::downgrade(&served)));
        }
        Ok(served)
    }

    /// `/classify`: the inputs' class probabilities through the `score`
    /// head of `c`'s adapter (or the base's own), and the classes' names.
    fn classify(&mut self, c: &Classification) -> std::result::Result<Classes, ApiError> {
        let (name, dir) = match &c.adapter {
            Some((name, dir)) => (name.as_str(), Some(dir.as_path())),
            None if self.base.score().is_none() => {
                return Err(ApiError::invalid(
                    "the base model has no `score` head (*ForSequenceClassification): \
                     name a SEQ_CLS adapter"
                        .into(),
                ))
            }
            None => (BASE_ROW, None),
        };
        let base = &self.base;
        let model = self
            .classifiers
            .get_or_load(name, &self.metrics, || ScoreModel::load(base, dir))?;
        let device = self.base.device();
        catch_unwind(AssertUnwindSafe(|| model.classify(&c.inputs, &device)))
            .map_err(|_| ApiError::internal("the classification pass panicked".into()))?
    }

    /// Removes from the shared model the slot adapters that are neither
    /// resident nor used by a running sequence.
    fn release_unused(&mut self) {
        let shared = &mut self.shared;
        self.shared_users.retain(|(id, users)| {
            let used = users.strong_count() > 0;
            if !used {
                let _ = shared.delete_adapter(id);
            }
            used
        });
    }

    /// Prefills `g` alone and adds it to the batch (or, for a bottleneck
    /// adapter, to the sequences decoding alone).
    fn admit(&mut self, g: Generation) -> std::result::Result<(), ApiError> {
        let served = match &g.adapter {
            Some((name, dir)) => Some(self.resident_model(name, dir)?),
            None => None,
        };
        let prompt = g.prompt.clone();
        let prefill = catch_unwind(AssertUnwindSafe(|| {
            self.prefill(served.as_deref(), &prompt)
        }))
        .map_err(|_| ApiError::internal("the prompt's forward pass panicked".into()))?
        .map_err(|e| ApiError::invalid(e.to_string()))?;
        let (state, route) = prefill;
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
        let seq = Sequence::new(g, state.next_logits(), self.tokenizer.clone());
        match route {
            Some(route) => {
                self.batch.join(state.into_cache());
                let row = Row {
                    route,
                    _adapter: served,
                };
                self.batched.push((seq, row));
            }
            None => {
                let Some(Served::Own(model)) = served.as_deref() else {
                    return Err(ApiError::internal(
                        "only an adapter with a wrapper of its own decodes alone".into(),
                    ));
                };
                let model = model.clone();
                self.alone.push((seq, Solo { model, state }));
            }
        }
        Ok(())
    }

    /// The prompt's first step: its cache and logits, and the route of a
    /// sequence that decodes in the batch (`None`: alone).
    fn prefill(
        &self,
        served: Option<&Served<B, M>>,
        prompt: &[u32],
    ) -> Result<(Decoding<B>, Option<String>)> {
        let through_shared = |route: &str| -> Result<(Decoding<B>, Option<String>)> {
            let mut cache = KvCache::new();
            let ids = ids_tensor(prompt, &self.shared.model.device());
            let logits = self
                .shared
                .forward_mixed(&[route], 1, |m| m.logits_cached(ids, &mut cache))?;
            Ok((Decoding::from((logits, cache)), Some(route.to_string())))
        };
        match served {
            None => through_shared(BASE_ROW),
            Some(Served::Shared(id)) => through_shared(id),
            Some(Served::Own(model)) => {
                let state = model.start(prompt)?;
                // After prefill a prefix or a soft prompt is cache content:
                // the base decodes on from there. Bottleneck adapters and a
                // slot adapter with a base of its own (PiSSA, OLoRA) change
                // every step: they decode alone.
                let route = match &**model {
                    Adapted::Adapters(_) | Adapted::Slots(_) => None,
                    _ => Some(BASE_ROW.to_string()),
                };
                Ok((state, route))
            }
        }
    }

    /// One token for every running sequence; the finished ones leave.
    fn step(&mut self) {
        let stepped = self.batched.len() + self.alone.len();
        if stepped == 0 {
            return;
        }
        let started = Instant::now();
        let eos = self.config.eos_ids.clone();
        let mut tokens = 0;
        // Each sequence's next token; the ones that go on keep theirs.
        let mut fed = Vec::new();
        let mut keep = Vec::new();
        let mut going_on = Vec::new();
        for (i, (seq, _)) in self.batched.iter_mut().enumerate() {
            let turn = seq.turn(&eos);
            going_on.push(matches!(turn, Turn::Feed(_)));
            match turn {
                Turn::Feed(token) => {
                    keep.push(i);
                    fed.push(token);
                }
                Turn::Over => self.metrics.leave_queue(),
            }
            tokens += seq.take_new_tokens();
        }
        self.batch.keep(&keep);
        let mut going_on = going_on.into_iter();
        self.batched.retain(|_| going_on.next().unwrap_or(false));
        if !fed.is_empty() {
            self.decode_batch(&fed);
        }
        let metrics = self.metrics.clone();
        self.alone.retain_mut(|(seq, solo)| {
            let going_on = match seq.turn(&eos) {
                Turn::Feed(token) => seq.advance_alone(|| {
                    solo.model.advance(&mut solo.state, token);
                    solo.state.next_logits()
                }),
                Turn::Over => false,
            };
            tokens += seq.take_new_tokens();
            if !going_on {
                metrics.leave_queue();
            }
            going_on
        });
        self.metrics.record_step(stepped, tokens, started.elapsed());
    }

    /// Feeds `tokens` (one per batch row) through the shared model. A
    /// panic fails every sequence of the batch (their caches are then
    /// unusable), not the server.
    fn decode_batch(&mut self, tokens: &[u32]) {
        let routes: Vec<&str> = self.batched.iter().map(|(_, r)| r.route.as_str()).collect();
        self.metrics.record_pass(tokens.len());
        let (batch, shared) = (&mut self.batch, &self.shared);
        let outcome = catch_unwind(AssertUnwindSafe(|| batch.step(shared, &routes, tokens)));
        match outcome {
            Ok(Ok(rows)) => {
                for ((seq, _), logits) in self.batched.iter_mut().zip(rows) {
                    seq.set_next(logits);
                }
            }
            Ok(Err(e)) => self.fail_batch(ApiError::internal(e.to_string())),
            Err(_) => self.fail_batch(ApiError::internal(
                "the batched decoding step panicked".into(),
            )),
        }
    }

    /// Ends every batched sequence with `error`.
    fn fail_batch(&mut self, error: ApiError) {
        for (seq, _) in self.batched.drain(..) {
            seq.fail(error.clone());
            self.metrics.failed.fetch_add(1, Ordering::Relaxed);
            self.metrics.leave_queue();
        }
        self.batch.clear();
    }
}
