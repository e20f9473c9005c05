//! # videollava-server
//!
//! An OpenAI-compatible HTTP server over a [`Scheduler`] (continuous batching of one loaded
//! checkpoint):
//!
//! - `POST /v1/chat/completions`: messages whose content is a string or `text`, `image_url` and
//!   `video_url` parts (`{"url": ...}`: `http(s)`, `data:` base64, or a local path / `file://` URL
//!   under the allowed directory); `stream: true` answers server-sent events in OpenAI's chunk
//!   format ending with `data: [DONE]`;
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text);
//! - `POST /v1/frames`: the frames the model sees of a video, as thumbnails with timestamps;
//! - `GET /`: a web page to talk to the model about a video or an image (off with
//!   [`ServerConfig::web_ui`] false).
//!
//! Every client fault is a 4xx with an OpenAI-style body `{"error": {"message", "type", "param",
//! "code"}}`. See [`ServerConfig`] and [`Limits`] for the knobs.

mod api;
pub mod error;
pub mod frames;
pub mod media;
pub mod metrics;
mod panic;
mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument as _;

pub use error::ApiError;
/// The engine API the server drives (re-exported so the CLI and tests name one set of types).
pub mod engine_api {
    pub use videollava::engine::{
        EngineInfo, GenerationRequest, RequestHandle, RequestTimings, Scheduler, SchedulerConfig, SchedulerStats,
        StreamEvent, SubmitError,
    };
}
pub use engine_api::{Scheduler, SchedulerConfig};

/// Limits applied to every request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (413 above it).
    pub max_body_bytes: usize,
    /// Largest single media item, in bytes (decoded data URI, fetched body or local file).
    pub max_media_bytes: u64,
    /// Most pixels of an image or of a video frame.
    pub max_pixels: u64,
    /// Largest width or height of an image or video frame.
    pub max_side: usize,
    /// Largest ratio of an image's longer side to its shorter side.
    pub max_aspect_ratio: f64,
    /// Most scans of a progressive JPEG.
    pub max_jpeg_scans: u32,
    /// Longest video, in seconds (header and presentation timestamps, checked while decoding).
    pub max_video_seconds: f64,
    /// Most frames in a video stream (counted while decoding).
    pub max_video_frames: u64,
    /// Most decoded pixels the media of one request may hold (all images and kept frames).
    pub max_request_pixels: u64,
    /// Most decoded pixels all requests may hold together (refused with 503 beyond).
    pub max_decoded_pixels: u64,
    /// Most bytes of remote media being fetched or decoded, all requests together.
    pub max_remote_bytes: u64,
    /// Media decoding threads (0: one per core, at least 2). Read when the first media item of
    /// the process is decoded.
    pub media_workers: usize,
    /// Most media items (images plus videos) in one request.
    pub max_media_items: usize,
    /// Wall-clock limit of one request, from arrival to its last token.
    pub request_timeout: Duration,
    /// Limit of one remote media fetch (connect, redirects and body).
    pub fetch_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 << 20,
            max_media_bytes: 256 << 20,
            max_pixels: 8192 * 8192,
            max_side: 16384,
            max_aspect_ratio: 200.0,
            max_jpeg_scans: 500,
            max_video_seconds: 600.0,
            max_video_frames: 36_000,
            max_request_pixels: 1 << 27,
            max_decoded_pixels: 1 << 28,
            max_remote_bytes: 1 << 30,
            media_workers: 0,
            max_media_items: 16,
            request_timeout: Duration::from_secs(600),
            fetch_timeout: Duration::from_secs(30),
        }
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Local media paths are allowed only under this directory (none: local paths refused).
    pub allowed_media_dir: Option<PathBuf>,
    /// Allow remote media URLs that resolve to loopback/private/link-local addresses.
    pub allow_private_media_urls: bool,
    pub limits: Limits,
    /// The model name clients must send (`/v1/models` lists it). None: the checkpoint directory's
    /// name. The CLI should pass the hub id when `--model` is one.
    pub served_model_name: Option<String>,
    /// Other names accepted in requests (e.g. the `--model` argument as typed).
    pub model_aliases: Vec<String>,
    /// Serve the web page at `/` (the CLI's `--no-web-ui` turns it off).
    pub web_ui: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            allowed_media_dir: None,
            allow_private_media_urls: false,
            limits: Limits::default(),
            served_model_name: None,
            model_aliases: Vec::new(),
            web_ui: true,
        }
    }
}

/// Shared state of the handlers.
pub struct AppState {
    pub config: ServerConfig,
    pub scheduler: Scheduler,
    pub metrics: metrics::Metrics,
    pub model_name: String,
    accepted_names: Vec<String>,
    /// For token strings in `logprobs` (None when the tokenizer could not be loaded).
    tokenizer: Option<videollava::processor::tokenizer::TextTokenizer>,
    created: u64,
    /// Frame previews (`/v1/frames`) decoding now.
    frame_previews: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub fn new(config: ServerConfig, scheduler: Scheduler) -> Arc<AppState> {
        let info = scheduler.info();
        let dir_name = info
            .model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| info.model_dir.display().to_string());
        let model_name = config.served_model_name.clone().unwrap_or_else(|| dir_name.clone());
        let mut accepted_names = vec![model_name.clone(), dir_name, info.model_dir.display().to_string()];
        accepted_names.extend(config.model_aliases.iter().cloned());
        let tokenizer = match videollava::processor::tokenizer::TextTokenizer::from_dir(&info.model_dir) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("tokenizer not loaded for logprobs token strings: {e}");
                None
            }
        };
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Arc::new(AppState {
            config,
            scheduler,
            metrics: Default::default(),
            model_name,
            accepted_names,
            tokenizer,
            created,
            frame_previews: Arc::new(tokio::sync::Semaphore::new(frames::CONCURRENT_PREVIEWS)),
        })
    }

    fn accepts_model(&self, name: &str) -> bool {
        self.accepted_names.iter().any(|n| n == name)
    }
}

/// The application's routes over `state` (tests serve it on their own listener).
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.limits.max_body_bytes;
    let web_ui = state.config.web_ui;
    let router = Router::new()
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/frames", post(frames::frames))
        .route("/v1/models", get(api::list_models))
        .route("/v1/models/{model}", get(api::get_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text));
    let router = if web_ui { web::routes(router) } else { router };
    router
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(panic::catch_panic))
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn fallback(req: Request) -> ApiError {
    ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("method {} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let s = state.scheduler.stats();
    let alive = state.scheduler.is_alive();
    let status = if alive { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        axum::Json(serde_json::json!({
            "status": if alive { "ok" } else { "unhealthy: the engine thread has stopped" },
            "model": state.model_name,
            "queue_depth": s.queue_depth,
            "running": s.running,
            "max_batch_size": s.max_batch_size,
            "shared_positions": s.shared_positions,
            "limits": {
                "max_body_bytes": state.config.limits.max_body_bytes,
                "max_media_bytes": state.config.limits.max_media_bytes,
                "max_video_seconds": state.config.limits.max_video_seconds,
                "max_num_frames": frames::MAX_NUM_FRAMES,
            },
        })),
    )
        .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let s = state.scheduler.stats();
    let mut body = state.metrics.render(s.queue_depth, s.running, s.max_batch_size);
    body.push_str(&metrics::render_batch_sharing(&s));
    body.push_str(&metrics::render_prefix_cache(&state.scheduler.prefix_cache_stats()));
    body.push_str(&metrics::render_media_cache(&videollava::media::recent::stats()));
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// A request id: the client's `x-request-id` when sane, else a fresh one.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Request ids, a tracing span per request, access logs and the per-route status counters.
async fn track(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{:x}-{}", state.created, REQUEST_IDS.fetch_add(1, Ordering::Relaxed)));
    req.extensions_mut().insert(RequestId(id.clone()));
    let route = match req.uri().path() {
        p @ ("/v1/chat/completions" | "/v1/frames" | "/v1/models" | "/health" | "/metrics") => p.to_string(),
        p if state.config.web_ui && web::is_page_path(p) => p.to_string(),
        p if p.starts_with("/v1/models/") => "/v1/models/{model}".to_string(),
        _ => "other".to_string(),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", id = %id);
    let start = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    state.metrics.record_request(&route, status.as_u16());
    span.in_scope(|| {
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if status.is_server_error() {
            tracing::warn!(%method, %path, status = status.as_u16(), ms, "answered");
        } else if route == "/metrics" || route == "/health" {
            tracing::debug!(%method, %path, status = status.as_u16(), ms, "answered");
        } else {
            tracing::info!(%method, %path, status = status.as_u16(), ms, "answered");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Sets up `tracing` output filtered by `RUST_LOG` (default `info`); does nothing when a
/// subscriber is already installed.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// Serves on `config.host:config.port` until SIGTERM or ctrl-c: then stops accepting, lets
/// running requests finish, and shuts the scheduler down.
pub async fn serve(config: ServerConfig, scheduler: Scheduler) -> anyhow::Result<()> {
    init_logging();
    media::remove_stale_temp_files();
    let addr = format!("{}:{}", config.host, config.port);
    let listener =
        tokio::net::TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let state = AppState::new(config, scheduler.clone());
    serve_on(listener, state, shutdown_signal()).await?;
    // Joins the engine thread: off the async workers.
    let _ = tokio::task::spawn_blocking(move || scheduler.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves `state` on `listener` until `shutdown` completes, then waits for running requests
/// (streams included) to finish. Does not shut the scheduler down.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(model = %state.model_name, "listening on http://{local}");
    let app = router(state);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// Completes on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
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
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: no new connections; waiting for running requests");
}

/// 503/429 helpers used by the API module.
pub(crate) fn submit_error(e: engine_api::SubmitError) -> ApiError {
    match e {
        engine_api::SubmitError::QueueFull => ApiError::queue_full(),
        engine_api::SubmitError::ShuttingDown => ApiError::unavailable("the server is shutting down"),
    }
}
