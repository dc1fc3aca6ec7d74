//! Typed errors for everything a user can get wrong.

use std::path::PathBuf;

/// Result alias used throughout the workspace.
pub type Result<T> = std::result::Result<T, PeftError>;

/// Every failure a user can cause: malformed configs and checkpoints, shapes
/// that do not fit, targets that match nothing, unknown adapter names.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A configuration value is invalid (rank 0, unknown method, ...).
    #[error("invalid config: {0}")]
    Config(String),
    /// A JSON file could not be parsed.
    #[error("{path}: malformed JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed or holds an unsupported dtype.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is absent from a checkpoint.
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The key that was looked for.
        key: String,
    },
    /// A checkpoint holds tensors that fit nowhere in the model.
    #[error("{path}: unexpected tensors that match no module: {keys:?}")]
    UnexpectedTensors {
        /// The file.
        path: PathBuf,
        /// The unused keys.
        keys: Vec<String>,
    },
    /// A tensor's shape does not fit where it goes.
    #[error("shape mismatch for `{name}`: expected {expected:?}, found {found:?}")]
    Shape {
        /// The tensor or module.
        name: String,
        /// The shape that fits.
        expected: Vec<usize>,
        /// The shape that was given.
        found: Vec<usize>,
    },
    /// No module of the model matched the configured targets.
    #[error("target modules {targets} matched no module; the model's adaptable modules are: {available:?}")]
    NoTargetMatched {
        /// The configured targets, as written.
        targets: String,
        /// Every adaptable module path the model exposes.
        available: Vec<String>,
    },
    /// An adapter name that does not exist.
    #[error("no adapter named `{name}`; adapters present: {available:?}")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names that exist.
        available: Vec<String>,
    },
    /// An adapter name that is already in use.
    #[error("an adapter named `{0}` already exists")]
    DuplicateAdapter(String),
    /// An operation that is not allowed in the current state (e.g. merging
    /// twice, mixed batch on merged adapters).
    #[error("{0}")]
    State(String),
    /// A regular expression in a config did not compile.
    #[error("invalid regular expression `{pattern}`: {message}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The compiler's message.
        message: String,
    },
    /// A non-finite value (NaN/Inf) where a finite one is required.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// A backend or device that this build cannot run on.
    #[error("backend `{backend}`: {message}")]
    Backend {
        /// The backend asked for (`ndarray`, `flex`, `wgpu`, `cuda`).
        backend: String,
        /// What is wrong: the cargo feature that compiles it in, or the
        /// device index that does not exist.
        message: String,
    },
}

/// Runs `f`, turning a panic into its message (`otherwise` when the panic
/// carried none): for calls into crates that panic on malformed input where
/// the toolkit must answer with an error (the `tokenizers` crate, Burn's
/// record decoding, a GPU runtime that fails to start).
pub fn catch_panic<T>(f: impl FnOnce() -> T, otherwise: &str) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| otherwise.to_string())
    })
}
