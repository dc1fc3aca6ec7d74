//! The bodies of OpenAI's completion and chat-completion requests, and
//! what they ask of generation. Every field is honoured or refused by
//! name: fields the server does not implement are accepted only at the
//! value that means "off" (`echo: false`, `presence_penalty: 0`, ...).

use serde::Deserialize;
use serde_json::Value;

use super::chat::Message;
use super::error::ApiError;
use peft_core::generate::Sampler;

/// `prompt`: one text, or one list of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// A text.
    Text(String),
    /// Texts (one is served per request).
    Texts(Vec<String>),
    /// Token ids.
    Ids(Vec<u32>),
}

/// `stop`: one text or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop text.
    One(String),
    /// Up to four.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// The generation fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    /// Most new tokens.
    pub max_tokens: Option<usize>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// Softmax temperature (0: greedy). OpenAI's default is 1.
    pub temperature: Option<f32>,
    /// Nucleus threshold.
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0 or -1: all).
    pub top_k: Option<i64>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Stop texts.
    pub stop: Option<Stop>,
    /// Completions per prompt.
    pub n: Option<usize>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Accepted at 0 only.
    pub presence_penalty: Option<f32>,
    /// Accepted at 0 only.
    pub frequency_penalty: Option<f32>,
    /// Accepted empty only.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Accepted false / null only.
    pub logprobs: Option<Value>,
    /// Accepted null only.
    pub top_logprobs: Option<Value>,
    /// An end-user id: recorded nowhere, changes nothing.
    pub user: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The base model's or an adapter's name.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Accepted false only.
    pub echo: Option<bool>,
    /// Accepted 1 only.
    pub best_of: Option<usize>,
    /// Accepted null only.
    pub suffix: Option<String>,
    /// Generation.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The base model's or an adapter's name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Generation.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// The fields of [`Sampling`] (serde's `deny_unknown_fields` does not
/// work through `flatten`, so [`parse`] checks the names).
const SAMPLING_FIELDS: [&str; 16] = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
];

/// The fields [`CompletionRequest`] takes besides [`Sampling`]'s.
pub const COMPLETION_FIELDS: [&str; 5] = ["model", "prompt", "echo", "best_of", "suffix"];

/// The fields [`ChatRequest`] takes besides [`Sampling`]'s.
pub const CHAT_FIELDS: [&str; 2] = ["model", "messages"];

/// Most completions one request may ask for (`n`).
pub const MAX_N: usize = 16;

impl Sampling {
    /// Refuses what is set to anything but "off" among the fields the
    /// server does not implement, and impossible values.
    pub fn check(&self) -> Result<(), ApiError> {
        let off = |name: &str, is_off: bool| {
            if is_off {
                Ok(())
            } else {
                Err(ApiError::field(
                    name,
                    format!("`{name}` is not supported by this server (only its default)"),
                ))
            }
        };
        off(
            "presence_penalty",
            self.presence_penalty.unwrap_or(0.0) == 0.0,
        )?;
        off(
            "frequency_penalty",
            self.frequency_penalty.unwrap_or(0.0) == 0.0,
        )?;
        off(
            "logit_bias",
            self.logit_bias.as_ref().is_none_or(|m| m.is_empty()),
        )?;
        off(
            "logprobs",
            matches!(
                self.logprobs,
                None | Some(Value::Null) | Some(Value::Bool(false))
            ),
        )?;
        off(
            "top_logprobs",
            matches!(self.top_logprobs, None | Some(Value::Null)),
        )?;
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::field(
                    "temperature",
                    format!("`temperature` must be in [0, 2], not {t}"),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::field(
                    "top_p",
                    format!("`top_p` must be in (0, 1], not {p}"),
                ));
            }
        }
        if let Some(k) = self.top_k {
            if k < -1 {
                return Err(ApiError::field(
                    "top_k",
                    format!("`top_k` must be -1, 0 or positive, not {k}"),
                ));
            }
        }
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_N {
            return Err(ApiError::field(
                "n",
                format!("`n` must be 1 to {MAX_N}, not {n}"),
            ));
        }
        if matches!(self.max_tokens.or(self.max_completion_tokens), Some(0)) {
            return Err(ApiError::field(
                "max_tokens",
                "`max_tokens` must be at least 1".into(),
            ));
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::field(
                "stream_options",
                "`stream_options` needs `stream: true`".into(),
            ));
        }
        if self.stop_texts().len() > 4 {
            return Err(ApiError::field("stop", "at most 4 `stop` texts".into()));
        }
        Ok(())
    }

    /// The stop texts.
    pub fn stop_texts(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// Completions asked for.
    pub fn n(&self) -> usize {
        self.n.unwrap_or(1)
    }

    /// The sampler of completion `index` of `n`: greedy at temperature 0;
    /// otherwise seeded by `seed` (plus the index) or by `fallback_seed`.
    pub fn sampler(&self, index: usize, fallback_seed: u64) -> Sampler {
        let temperature = self.temperature.unwrap_or(1.0);
        if temperature == 0.0 {
            return Sampler::Greedy;
        }
        Sampler::Random {
            temperature,
            top_k: self.top_k.unwrap_or(0).max(0) as usize,
            top_p: self.top_p.unwrap_or(1.0),
            state: self
                .seed
                .unwrap_or(fallback_seed)
                .wrapping_add(index as u64),
        }
    }

    /// Whether the stream ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl CompletionRequest {
    /// Refuses what the server does not do.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.echo.unwrap_or(false) {
            return Err(ApiError::field(
                "echo",
                "`echo` is not supported by this server".into(),
            ));
        }
        if self.best_of.unwrap_or(1) != 1 {
            return Err(ApiError::field(
                "best_of",
                "`best_of` other than 1 is not supported by this server".into(),
            ));
        }
        if self.suffix.is_some() {
            return Err(ApiError::field(
                "suffix",
                "`suffix` is not supported by this server".into(),
            ));
        }
        self.sampling.check()
    }
}

/// The request body as JSON of `T`, whose fields are [`Sampling`]'s
/// and `own`, or a 400 that says what is wrong (invalid UTF-8 and
/// unknown fields included).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8], own: &[&str]) -> Result<T, ApiError> {
    let invalid = |e: serde_json::Error| ApiError::invalid(format!("invalid request body: {e}"));
    let v: Value = serde_json::from_slice(body).map_err(invalid)?;
    let Value::Object(fields) = &v else {
        return Err(ApiError::invalid(
            "the request body must be a JSON object".into(),
        ));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !own.contains(&k.as_str()) && !SAMPLING_FIELDS.contains(&k.as_str()))
    {
        return Err(ApiError::field(
            unknown,
            format!("unknown field `{unknown}`"),
        ));
    }
    serde_json::from_value(v).map_err(invalid)
}
