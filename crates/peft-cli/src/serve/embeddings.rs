//! `POST /v1/embeddings` (OpenAI's shapes; an encoder's), one vector per
//! input, as floats or as OpenAI's base64 of little-endian `f32`s (the
//! `openai` package asks for base64 unless told otherwise); and `POST
//! /classify` (vLLM's shapes, also at `/v1/classify`; an encoder's
//! classifier or a decoder's `score` head), each input's class
//! probabilities and most likely label; a multi-label head's per-label
//! probabilities and labels, a regression head's values (the run's
//! `problem_type`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::api::Shared;
use super::encoder::{Classification, Embedding};
use super::engine::Job;
use super::error::ApiError;
use crate::tasks::ProblemType;

/// Most inputs one request may carry (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

/// `input`: a text, texts, token ids, or lists of token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingRequest {
    model: String,
    input: Input,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
    /// An end-user id: recorded nowhere, changes nothing.
    #[allow(dead_code)]
    user: Option<String>,
}

/// `POST /classify`'s body (vLLM's).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyRequest {
    model: String,
    input: Input,
    /// An end-user id: recorded nowhere, changes nothing.
    #[allow(dead_code)]
    user: Option<String>,
}

/// The token ids of `input`, each checked against the vocabulary and the
/// context. Embeddings need an encoder; classification takes either.
fn tokenized(s: &Shared, input: Input, embedding: bool) -> Result<Vec<Vec<u32>>, ApiError> {
    if embedding && !s.encoder {
        return Err(ApiError::invalid(
            "the served model is a decoder: /v1/embeddings needs an encoder (BERT)".into(),
        ));
    }
    let inputs = match input {
        Input::Text(t) => vec![s.encode(&t, false)?],
        Input::Texts(v) => v
            .iter()
            .map(|t| s.encode(t, false))
            .collect::<Result<_, _>>()?,
        Input::Ids(ids) => vec![ids],
        Input::IdLists(lists) => lists,
    };
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(ApiError::field(
            "input",
            format!("1 to {MAX_INPUTS} inputs, not {}", inputs.len()),
        ));
    }
    for (i, ids) in inputs.iter().enumerate() {
        if ids.is_empty() {
            return Err(ApiError::field("input", format!("input {i} is empty")));
        }
        s.check_vocabulary(ids, "input")?;
        if ids.len() > s.context {
            let mut e = ApiError::context(s.context, 0, ids.len(), 0);
            e.param = Some("input".into());
            e.message = format!(
                "input {i} has {} tokens; the model takes at most {}",
                ids.len(),
                s.context
            );
            return Err(e);
        }
    }
    Ok(inputs)
}

/// Sends the job `make(reply)` for `model` and waits for its answer,
/// holding one queue place meanwhile.
async fn ask<T>(
    s: &Shared,
    model: &str,
    make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Job,
) -> Result<T, ApiError> {
    if !s.metrics.enter_queue(1, s.max_queue) {
        return Err(ApiError::busy(s.max_queue));
    }
    s.metrics.request_for(model);
    let (reply, outcome) = oneshot::channel();
    let answer = match s.send(make(reply)) {
        Ok(()) => outcome
            .await
            .map_err(|_| ApiError::internal("the engine has stopped".into()))
            .and_then(|r| r),
        Err(e) => Err(e),
    };
    s.metrics.leave_queue();
    answer
}

pub async fn embeddings(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: EmbeddingRequest = s.json(body)?;
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::field(
                "encoding_format",
                format!("`encoding_format` is float or base64, not {other}"),
            ))
        }
    };
    let inputs = tokenized(&s, r.input, true)?;
    let adapter = s.adapter_of(&r.model)?;
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let vectors = ask(&s, &r.model, |reply| {
        Job::Embed(Embedding {
            adapter,
            inputs,
            reply,
        })
    })
    .await?;
    if let Some(d) = r.dimensions {
        if vectors.first().is_some_and(|v| v.len() != d) {
            return Err(ApiError::field(
                "dimensions",
                format!(
                    "the model's embeddings have {} dimensions, not {d}",
                    vectors[0].len()
                ),
            ));
        }
    }
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list", "data": data, "model": r.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// One input's entry in a `/classify` answer, as its problem type reads:
/// vLLM's `label` (the most likely class), `probs` and `num_classes` for a
/// single-label head; each label's probability in `probs` and those above
/// one half in `labels` for a multi-label head (`label`: the most likely);
/// the outputs' `values`, named in `outputs`, for a regression.
fn scored(index: usize, p: &[f32], names: &[String], problem: ProblemType) -> Value {
    if problem == ProblemType::Regression {
        return json!({"index": index, "values": p, "outputs": names});
    }
    let best = p
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    let mut entry =
        json!({"index": index, "label": names.get(best), "probs": p, "num_classes": p.len()});
    if problem == ProblemType::MultiLabel {
        let on: Vec<&String> = names
            .iter()
            .zip(p)
            .filter(|(_, &q)| q > 0.5)
            .map(|(n, _)| n)
            .collect();
        entry["labels"] = json!(on);
    }
    entry
}

pub async fn classify(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: ClassifyRequest = s.json(body)?;
    let inputs = tokenized(&s, r.input, false)?;
    let adapter = s.adapter_of(&r.model)?;
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let (scores, names, problem) = ask(&s, &r.model, |reply| {
        Job::Classify(Classification {
            adapter,
            inputs,
            reply,
        })
    })
    .await?;
    let data: Vec<Value> = scores
        .iter()
        .enumerate()
        .map(|(index, p)| scored(index, p, &names, problem))
        .collect();
    let number = s.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Json(json!({
        "id": format!("classify-{number}"), "object": "list", "created": super::api::now(),
        "model": r.model, "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }))
    .into_response())
}
