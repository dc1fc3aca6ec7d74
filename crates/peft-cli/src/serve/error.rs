//! Errors as OpenAI's API returns them: a status and
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// One failed request.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, ...).
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: String) -> Self {
        ApiError {
            status,
            message,
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request cannot be served as written.
    pub fn invalid(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn field(param: &str, message: String) -> Self {
        let mut e = Self::invalid(message);
        e.param = Some(param.to_string());
        e
    }

    /// 404: no model or adapter of that name.
    pub fn unknown_model(name: &str, known: &[String]) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{name}` does not exist (served: {}).",
                known.join(", ")
            ),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 404: a path the server has no endpoint at.
    pub fn no_endpoint(message: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            message.to_string(),
        )
    }

    /// 400: prompt, virtual tokens and `max_tokens` exceed the context.
    pub fn context(
        context: usize,
        virtual_tokens: usize,
        prompt: usize,
        max_tokens: usize,
    ) -> Self {
        let mut e = Self::invalid(format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({virtual_tokens} virtual tokens of the adapter, {prompt} in the prompt, {max_tokens} for the completion). Please reduce the length of the prompt or max_tokens.",
            virtual_tokens + prompt + max_tokens
        ));
        e.param = Some("max_tokens".into());
        e.code = Some("context_length_exceeded");
        e
    }

    /// 401: no or a wrong API key.
    pub fn unauthorized() -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "Incorrect or missing API key: send `Authorization: Bearer <key>`.".into(),
        );
        e.code = Some("invalid_api_key");
        e
    }

    /// 403: a path outside `--adapter-root`, or runtime loading off.
    pub fn forbidden(message: String) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    /// 413: the body is larger than the server takes.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than {limit} bytes."),
        )
    }

    /// 429: every queue place is taken.
    pub fn busy(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("The server is at its limit of {limit} sequences waiting or running; retry shortly."),
        );
        e.code = Some("queue_full");
        e.retry_after = Some(1);
        e
    }

    /// 400: an adapter folder that does not load.
    pub fn bad_adapter(name: &str, why: &str) -> Self {
        Self::invalid(format!("adapter `{name}` could not be loaded: {why}"))
    }

    /// 500: a fault of the server's own.
    pub fn internal(message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The error object (`{"error": {...}}`), as a stream's last event
    /// carries it too.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(s));
        }
        response
    }
}
