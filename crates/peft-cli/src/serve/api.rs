//! The HTTP side: OpenAI's endpoints (and vLLM's adapter loading) over
//! the engine. Handlers check the request, turn it into engine jobs, and
//! answer with OpenAI's shapes, streamed as server-sent events or whole.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use peft_models::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::chat::ChatTemplate;
use super::engine::{Event, Generation, Job};
use super::error::ApiError;
use super::metrics::Metrics;
use super::requests::{self, ChatRequest, CompletionRequest, Prompt, Sampling};

/// What every handler reads.
pub struct Shared {
    /// The base model's name in `model` fields.
    pub model_id: String,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Its chat template, if it has one.
    pub chat: Option<ChatTemplate>,
    /// Its context length.
    pub context: usize,
    /// Whether the model is an encoder (embeddings, no completions).
    pub encoder: bool,
    /// The engine's queue.
    pub jobs: Mutex<std_mpsc::Sender<Job>>,
    /// Adapters that can be named, with their folders.
    pub known: Mutex<BTreeMap<String, PathBuf>>,
    /// Where runtime loads may read adapters (canonical); `None`: runtime
    /// loading is off.
    pub adapter_root: Option<PathBuf>,
    /// The key requests must carry, if any.
    pub api_key: Option<String>,
    /// Most sequences waiting or running.
    pub max_queue: usize,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// When the server started (Unix seconds).
    pub created: u64,
    /// Request ids and unseeded samplers' seeds.
    pub counter: AtomicU64,
}

/// The router with every endpoint, refusing bodies over `max_body` bytes.
pub fn router(shared: Arc<Shared>) -> Router {
    let max_body = shared.max_body;
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(super::embeddings::embeddings))
        .route("/classify", post(super::embeddings::classify))
        .route("/v1/classify", post(super::embeddings::classify))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authorize));
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async {
            ApiError::no_endpoint("no such endpoint (see /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /classify, /v1/load_lora_adapter, /v1/unload_lora_adapter, /health, /metrics)")
        })
        .layer(middleware::from_fn_with_state(shared.clone(), count_response))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

async fn authorize(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn count_response(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    s.metrics.respond(response.status().as_u16());
    response
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    let mut data = vec![json!({
        "id": s.model_id, "object": "model", "created": s.created, "owned_by": "peft",
        "root": s.model_id, "parent": null,
    })];
    for (name, dir) in s.known.lock().unwrap().iter() {
        data.push(json!({
            "id": name, "object": "model", "created": s.created, "owned_by": "peft",
            "root": dir.display().to_string(), "parent": s.model_id,
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

impl Shared {
    /// The body, or 413 when it is over the limit.
    pub(super) fn body(&self, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
        body.map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(self.max_body),
            _ => ApiError::invalid(e.body_text()),
        })
    }

    /// The body as JSON of `T` (413 over the limit, 400 when it is not a
    /// `T`: unknown fields too, where `T` denies them).
    pub(super) fn json<T: serde::de::DeserializeOwned>(
        &self,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body(body)?)
            .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
    }
}

async fn completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = s.body(body)?;
    let r: CompletionRequest = requests::parse(&body, &requests::COMPLETION_FIELDS)?;
    r.check()?;
    let prompt = match r.prompt {
        Prompt::Text(t) => s.encode(&t, false)?,
        Prompt::Texts(v) if v.len() == 1 => s.encode(&v[0], false)?,
        Prompt::Texts(v) => {
            return Err(ApiError::field(
                "prompt",
                format!("one prompt per request is served, not {}", v.len()),
            ))
        }
        Prompt::Ids(ids) => {
            s.check_vocabulary(&ids, "prompt")?;
            ids
        }
    };
    let max_tokens = r.sampling.max_tokens.unwrap_or(16);
    s.generate(Kind::Text, &r.model, prompt, max_tokens, &r.sampling)
        .await
}

async fn chat_completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = s.body(body)?;
    let r: ChatRequest = requests::parse(&body, &requests::CHAT_FIELDS)?;
    r.sampling.check()?;
    if r.messages.is_empty() {
        return Err(ApiError::field("messages", "`messages` is empty".into()));
    }
    let template = s.chat.as_ref().ok_or_else(|| {
        ApiError::invalid("the model has no chat template (use /v1/completions)".into())
    })?;
    let text = template
        .render(&r.messages)
        .map_err(|e| ApiError::field("messages", e))?;
    let prompt = s.encode(&text, true)?;
    // As vLLM: without a limit, the answer may fill the context.
    let max_tokens = r
        .sampling
        .max_tokens
        .or(r.sampling.max_completion_tokens)
        .unwrap_or_else(|| s.context.saturating_sub(prompt.len()).max(1));
    s.generate(Kind::Chat, &r.model, prompt, max_tokens, &r.sampling)
        .await
}

/// Which endpoint's shapes an answer takes.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Chat,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Text => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }

    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Text, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A choice carrying `text` (whole, or a stream's piece).
    fn choice(self, index: usize, text: &str, finish: Option<&str>, stream: bool) -> Value {
        match (self, stream) {
            (Kind::Text, _) => {
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, false) => {
                json!({"index": index, "message": {"role": "assistant", "content": text},
                                          "logprobs": null, "finish_reason": finish})
            }
            (Kind::Chat, true) => {
                json!({"index": index, "delta": if text.is_empty() && finish.is_none() {
                                              json!({"role": "assistant", "content": ""})
                                          } else if finish.is_some() { json!({}) } else { json!({"content": text}) },
                                          "logprobs": null, "finish_reason": finish})
            }
        }
    }
}

/// One sequence's outcome, gathered.
#[derive(Default)]
struct Gathered {
    text: String,
    finish: Option<&'static str>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Shared {
    /// 400 naming `param` when a token id is past the vocabulary.
    pub(super) fn check_vocabulary(&self, ids: &[u32], param: &str) -> Result<(), ApiError> {
        let vocab = self.tokenizer.vocab_size();
        match ids.iter().find(|&&i| i as usize >= vocab) {
            Some(bad) => Err(ApiError::field(
                param,
                format!("token id {bad} is outside the vocabulary ({vocab})"),
            )),
            None => Ok(()),
        }
    }

    pub(super) fn encode(&self, text: &str, chat: bool) -> Result<Vec<u32>, ApiError> {
        let ids = if chat {
            self.tokenizer.encode_plain(text)
        } else {
            self.tokenizer.encode(text)
        }
        .map_err(|e| ApiError::field("prompt", e.to_string()))?;
        if ids.is_empty() {
            return Err(ApiError::field("prompt", "the prompt is empty".into()));
        }
        Ok(ids)
    }

    /// The adapter `model` names (`None`: the base), or 404.
    pub(super) fn adapter_of(&self, model: &str) -> Result<Option<(String, PathBuf)>, ApiError> {
        if model == self.model_id {
            return Ok(None);
        }
        let known = self.known.lock().unwrap();
        match known.get(model) {
            Some(dir) => Ok(Some((model.to_string(), dir.clone()))),
            None => {
                let mut names = vec![self.model_id.clone()];
                names.extend(known.keys().cloned());
                Err(ApiError::unknown_model(model, &names))
            }
        }
    }

    pub(super) fn send(&self, job: Job) -> Result<(), ApiError> {
        self.jobs
            .lock()
            .unwrap()
            .send(job)
            .map_err(|_| ApiError::internal("the engine has stopped".into()))
    }

    /// Queues `n` sequences of `prompt` and answers with them, whole or
    /// streamed.
    async fn generate(
        self: &Arc<Self>,
        kind: Kind,
        model: &str,
        prompt: Vec<u32>,
        max_tokens: usize,
        sampling: &Sampling,
    ) -> Result<Response, ApiError> {
        if self.encoder {
            return Err(ApiError::invalid(
                "the served model is an encoder (BERT): it gives /v1/embeddings, not completions"
                    .into(),
            ));
        }
        let adapter = self.adapter_of(model)?;
        if prompt.len() + max_tokens > self.context {
            return Err(ApiError::context(self.context, 0, prompt.len(), max_tokens));
        }
        let n = sampling.n();
        if !self.metrics.enter_queue(n, self.max_queue) {
            return Err(ApiError::busy(self.max_queue));
        }
        self.metrics.request_for(model);
        let number = self.counter.fetch_add(1, Ordering::Relaxed);
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ number.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut receivers = Vec::with_capacity(n);
        for index in 0..n {
            let (events, rx) = mpsc::unbounded_channel();
            let job = Job::Generate(Generation {
                adapter: adapter.clone(),
                prompt: prompt.clone(),
                max_tokens,
                sampler: sampling.sampler(index, seed),
                stop: sampling.stop_texts(),
                events,
            });
            if let Err(e) = self.send(job) {
                (index..n).for_each(|_| self.metrics.leave_queue());
                return Err(e);
            }
            receivers.push(rx);
        }
        let id = format!("{}-{number}", kind.id_prefix());
        let created = now();
        if sampling.stream {
            return Ok(stream_answer(
                kind,
                id,
                created,
                model.to_string(),
                receivers,
                sampling.include_usage(),
            )
            .into_response());
        }
        let mut gathered = Vec::with_capacity(n);
        for mut rx in receivers {
            let mut g = Gathered::default();
            while let Some(event) = rx.recv().await {
                match event {
                    Event::Text(t) => g.text.push_str(&t),
                    Event::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        g.finish = Some(finish_reason);
                        g.prompt_tokens = prompt_tokens;
                        g.completion_tokens = completion_tokens;
                    }
                    Event::Failed(e) => return Err(e),
                }
            }
            if g.finish.is_none() {
                return Err(ApiError::internal("the engine dropped the sequence".into()));
            }
            gathered.push(g);
        }
        let choices: Vec<Value> = gathered
            .iter()
            .enumerate()
            .map(|(i, g)| kind.choice(i, &g.text, g.finish, false))
            .collect();
        let prompt_tokens = gathered[0].prompt_tokens;
        let completion_tokens: usize = gathered.iter().map(|g| g.completion_tokens).sum();
        Ok(Json(json!({
            "id": id, "object": kind.object(false), "created": created, "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }))
        .into_response())
    }
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The sequences' events as server-sent events in OpenAI's chunk shape,
/// ending with `[DONE]`. Dropping the stream (the client went away)
/// drops the receivers, which the engine notices at its next step.
fn stream_answer(
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let n = receivers.len();
    let streams = receivers.into_iter().enumerate().map(|(index, rx)| {
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .map(move |e| (index, e))
            .boxed()
    });
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Vec<Value>, usage: Value| {
            let mut v = json!({"id": id, "object": kind.object(true), "created": created,
                               "model": model, "choices": choices});
            if include_usage {
                v["usage"] = usage;
            }
            SseEvent::default().data(v.to_string())
        }
    };
    let first: Vec<SseEvent> = match kind {
        Kind::Chat => (0..n)
            .map(|i| chunk(vec![kind.choice(i, "", None, true)], Value::Null))
            .collect(),
        Kind::Text => Vec::new(),
    };
    let usage = Arc::new(Mutex::new((0usize, 0usize)));
    let usage_end = usage.clone();
    let chunk_end = chunk.clone();
    let events = stream::select_all(streams).map(move |(index, event)| match event {
        Event::Text(t) => chunk(vec![kind.choice(index, &t, None, true)], Value::Null),
        Event::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
        } => {
            let mut u = usage.lock().unwrap();
            u.0 = prompt_tokens;
            u.1 += completion_tokens;
            chunk(
                vec![kind.choice(index, "", Some(finish_reason), true)],
                Value::Null,
            )
        }
        Event::Failed(e) => SseEvent::default().data(e.body().to_string()),
    });
    let tail = stream::once(async move {
        let (p, c) = *usage_end.lock().unwrap();
        include_usage.then(|| {
            chunk_end(
                Vec::new(),
                json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}),
            )
        })
    })
    .filter_map(|e| async move { e })
    .chain(stream::once(async { SseEvent::default().data("[DONE]") }));
    Sse::new(stream::iter(first).chain(events).chain(tail).map(Ok)).keep_alive(KeepAlive::default())
}

/// vLLM's `POST /v1/load_lora_adapter` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadAdapter {
    lora_name: String,
    lora_path: PathBuf,
    #[serde(default)]
    load_inplace: bool,
}

/// vLLM's `POST /v1/unload_lora_adapter` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadAdapter {
    lora_name: String,
}

async fn load_adapter(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: LoadAdapter = s.json(body)?;
    let root = s.adapter_root.as_ref().ok_or_else(|| {
        ApiError::forbidden(
            "runtime adapter loading is off: start the server with --adapter-root DIR".into(),
        )
    })?;
    let name = r.lora_name.trim();
    if name.is_empty() || name == s.model_id {
        return Err(ApiError::field(
            "lora_name",
            format!("`{name}` cannot name an adapter"),
        ));
    }
    let replacing = s.known.lock().unwrap().contains_key(name);
    if replacing && !r.load_inplace {
        return Err(ApiError::field(
            "lora_name",
            format!("The lora adapter '{name}' has already been loaded."),
        ));
    }
    let dir = super::adapters::inside_root(root, &r.lora_path)?;
    let (reply, outcome) = oneshot::channel();
    if replacing {
        s.send(Job::Unload {
            name: name.to_string(),
        })?;
    }
    s.send(Job::Load {
        name: name.to_string(),
        dir: dir.clone(),
        reply,
    })?;
    outcome
        .await
        .map_err(|_| ApiError::internal("the engine has stopped".into()))??;
    s.known.lock().unwrap().insert(name.to_string(), dir);
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

async fn unload_adapter(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: UnloadAdapter = s.json(body)?;
    if s.known.lock().unwrap().remove(&r.lora_name).is_none() {
        let mut e = ApiError::unknown_model(
            &r.lora_name,
            &s.known.lock().unwrap().keys().cloned().collect::<Vec<_>>(),
        );
        e.param = Some("lora_name".into());
        return Err(e);
    }
    s.send(Job::Unload {
        name: r.lora_name.clone(),
    })?;
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        r.lora_name
    )
    .into_response())
}
