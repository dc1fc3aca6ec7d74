//! `peft serve`: one frozen model serving its adapters behind OpenAI's
//! API: a decoder's completions, an encoder's embeddings. One file per concern: [`api`] (the endpoints),
//! [`requests`] (request bodies), [`error`] (OpenAI's error objects),
//! [`engine`] (the thread that owns a decoder and steps the sequences),
//! [`batch`] (the sequences decoded as one batch), [`sequence`] (one
//! sequence's sampling, text and end),
//! [`encoder`] and [`embeddings`] (an encoder's engine and endpoint),
//! [`resident`] (the LRU of adapters),
//! [`text`] (streamed detokenization and stop texts), [`chat`] (chat
//! templates), [`adapters`] (the adapter root), [`metrics`], and
//! [`model_info`] (tokenizer, template, end tokens, context length).
//!
//! Threads: the HTTP side runs on a tokio runtime of its own; the engine
//! on one plain thread that owns every tensor. They meet in the engine's
//! job queue (requests in) and one channel per sequence (text out).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use burn::tensor::backend::Backend;
use peft_core::{PeftError, Result};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use tokio::sync::{oneshot, watch};

use crate::tasks::{self, Arch};

pub mod adapters;
pub mod api;
pub mod batch;
pub mod chat;
pub mod embeddings;
pub mod encoder;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod model_info;
pub mod requests;
pub mod resident;
pub mod scores;
pub mod sequence;
pub mod text;

/// Everything `peft serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The base model (folder or GGUF file).
    pub model: PathBuf,
    /// The base model's name in requests; default: the model file's or
    /// folder's name.
    pub served_model_name: Option<String>,
    /// Adapters served from the start, by name.
    pub adapters: Vec<(String, PathBuf)>,
    /// The folder runtime loads may read from; `None`: runtime loading off.
    pub adapter_root: Option<PathBuf>,
    /// Most adapters resident at once.
    pub max_loaded: usize,
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// The key requests to `/v1/*` must carry.
    pub api_key: Option<String>,
    /// Most sequences waiting or running; more are refused with 429.
    pub max_queue: usize,
    /// Largest request body, in bytes; larger ones get 413.
    pub max_body: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl ServeConfig {
    /// Defaults for serving `model` on 127.0.0.1:8000.
    pub fn new(model: PathBuf) -> Self {
        ServeConfig {
            model,
            served_model_name: None,
            adapters: Vec::new(),
            adapter_root: None,
            max_loaded: 16,
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            api_key: None,
            max_queue: 64,
            max_body: 1 << 20,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    http: JoinHandle<Result<()>>,
    engine: JoinHandle<()>,
}

impl Server {
    /// Loads the model and the adapters, binds, and serves in background
    /// threads. Fails (serving nothing) when the model, an adapter or the
    /// address does not work.
    pub fn start<B: Backend>(config: ServeConfig, device: B::Device) -> Result<Server> {
        match tasks::arch_of(&config.model)? {
            Arch::Llama => Self::start_decoder::<B, Llama<B>>(config, device),
            Arch::Gpt2 => Self::start_decoder::<B, Gpt2<B>>(config, device),
            Arch::Bert => Self::start_engine(config, true, move |c, _, m, jobs, ready| {
                encoder::run::<B>(c, m, device, jobs, ready)
            }),
        }
    }

    fn start_decoder<B: Backend, M>(config: ServeConfig, device: B::Device) -> Result<Server>
    where
        M: tasks::CausalModel<B>
            + peft_core::generate::CausalLm<B>
            + peft_models::seq_cls::ScoreHead<B>
            + 'static,
    {
        Self::start_engine(config, false, move |c, t, m, jobs, ready| {
            engine::run::<B, M>(c, t, m, device, jobs, ready)
        })
    }

    /// Starts the engine `run` (on its own thread) and, once it has loaded
    /// the model, the HTTP side.
    fn start_engine<F>(config: ServeConfig, encoder: bool, run: F) -> Result<Server>
    where
        F: FnOnce(
                engine::EngineConfig,
                Arc<peft_models::tokenizer::Tokenizer>,
                Arc<metrics::Metrics>,
                std_mpsc::Receiver<engine::Job>,
                std_mpsc::Sender<Result<()>>,
            ) + Send
            + 'static,
    {
        let info = model_info::ModelInfo::read(&config.model)?;
        let chat = match &info.chat_template {
            Some(source) => Some(
                chat::ChatTemplate::new(
                    source,
                    info.bos_token.as_deref(),
                    info.eos_token.as_deref(),
                )
                .map_err(PeftError::Config)?,
            ),
            None => None,
        };
        let tokenizer = Arc::new(info.tokenizer);
        let metrics = Arc::new(metrics::Metrics::default());
        let adapter_root = match &config.adapter_root {
            Some(root) => Some(std::fs::canonicalize(root).map_err(|source| PeftError::Io {
                path: root.clone(),
                source,
            })?),
            None => None,
        };
        let (jobs, queue) = std_mpsc::channel();
        let (ready, loaded) = std_mpsc::channel();
        let engine_config = engine::EngineConfig {
            model: config.model.clone(),
            max_loaded: config.max_loaded,
            eos_ids: info.eos_ids.clone(),
            context: info.context,
        };
        let (t, m) = (tokenizer.clone(), metrics.clone());
        let engine = std::thread::Builder::new()
            .name("peft-serve-engine".into())
            .spawn(move || run(engine_config, t, m, queue, ready))
            .map_err(|e| PeftError::State(format!("cannot start the engine thread: {e}")))?;
        loaded
            .recv()
            .map_err(|_| PeftError::State("the engine stopped while loading the model".into()))??;
        // The adapters named at the start load now, so a bad folder stops
        // the start instead of failing its first request.
        for (name, dir) in &config.adapters {
            let (reply, outcome) = oneshot::channel();
            let _ = jobs.send(engine::Job::Load {
                name: name.clone(),
                dir: dir.clone(),
                reply,
            });
            outcome
                .blocking_recv()
                .map_err(|_| PeftError::State("the engine stopped".into()))?
                .map_err(|e| PeftError::Config(e.message))?;
        }
        let model_id = config.served_model_name.clone().unwrap_or_else(|| {
            config
                .model
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        });
        let shared = Arc::new(api::Shared {
            model_id,
            tokenizer,
            chat,
            context: info.context,
            encoder,
            jobs: Mutex::new(jobs),
            known: Mutex::new(config.adapters.iter().cloned().collect()),
            adapter_root,
            api_key: config.api_key.clone(),
            max_queue: config.max_queue,
            max_body: config.max_body,
            metrics,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            counter: AtomicU64::new(0),
        });
        let listener =
            std::net::TcpListener::bind(config.listen).map_err(|source| PeftError::Io {
                path: PathBuf::from(config.listen.to_string()),
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| PeftError::State(format!("cannot listen: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| PeftError::State(format!("cannot listen: {e}")))?;
        let (stop, stopped) = watch::channel(false);
        let grace = config.shutdown_grace;
        let http = std::thread::Builder::new()
            .name("peft-serve-http".into())
            .spawn(move || serve_http(listener, api::router(shared), stopped, grace))
            .map_err(|e| PeftError::State(format!("cannot start the HTTP thread: {e}")))?;
        Ok(Server {
            addr,
            stop,
            http,
            engine,
        })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops taking connections, lets requests in flight finish (up to
    /// the grace period), and waits for both threads.
    pub fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.wait()
    }

    /// Waits until the server stops: after [`shutdown`](Self::shutdown),
    /// or on SIGTERM / ctrl-c.
    pub fn wait(self) -> Result<()> {
        let outcome = self
            .http
            .join()
            .map_err(|_| PeftError::State("the HTTP thread panicked".into()))?;
        // The router (and with it the engine's queue) is gone: the engine
        // ends after its last sequence.
        let _ = self.engine.join();
        outcome
    }
}

/// Serves `app` on `listener` until `stop` turns true or the process gets
/// SIGTERM / ctrl-c, then waits up to `grace` for requests in flight.
fn serve_http(
    listener: std::net::TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PeftError::State(format!("no async runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| PeftError::State(format!("cannot listen: {e}")))?;
        let (signalled, mut signal) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = termination() => {}
            }
            let _ = signalled.send(true);
        });
        let mut on_signal = signal.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = on_signal.wait_for(|s| *s).await;
        });
        tokio::select! {
            r = server => r.map_err(|e| PeftError::State(format!("the server failed: {e}"))),
            _ = async { let _ = signal.wait_for(|s| *s).await; tokio::time::sleep(grace).await } => {
                eprintln!("peft serve: requests still in flight after {grace:?}; stopping");
                Ok(())
            }
        }
    })
}

/// SIGTERM or ctrl-c.
async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
