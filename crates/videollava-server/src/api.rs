//! `POST /v1/chat/completions` and `/v1/models`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant as TokioInstant;
use videollava::generate::{GenerateOptions, GeneratedSequence};
use videollava::processor::chat::{apply_chat_template, ChatMessage, ContentPart};

use crate::engine_api::{GenerationRequest, RequestHandle, StreamEvent};
use crate::error::ApiError;
use crate::media::{self, MediaKind, MediaPolicy};
use crate::{AppState, RequestId};

/// Most stop strings in one request.
const MAX_STOP: usize = 16;
/// Longest stop string, in bytes (each is matched against the text after every token).
const MAX_STOP_BYTES: usize = 256;
/// Most alternatives in `top_logprobs` (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [model_object(&state)]})).into_response()
}

pub async fn get_model(State(state): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    if state.accepts_model(&model) {
        Json(model_object(&state)).into_response()
    } else {
        ApiError::model_not_found(&model, &state.model_name).into_response()
    }
}

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "videollava",
        "max_model_len": state.scheduler.info().max_position_embeddings,
    })
}

// ---------------------------------------------------------------------------------------------
// Request parsing

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Extensions (vLLM-style).
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    ignore_eos: Option<bool>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    n: Option<i64>,
    tools: Option<Value>,
    /// Extension: frames taken from each video (default 8), as in `videollava run --num-frames`.
    num_frames: Option<Value>,
}

/// A media part of the request, in order of appearance.
#[derive(Debug, Clone)]
struct MediaRef {
    kind: MediaKind,
    url: String,
}

/// A validated request, ready for media loading and submission.
struct Prepared {
    prompt: String,
    media: Vec<MediaRef>,
    options: GenerateOptions,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    num_frames: usize,
}

fn media_url(part: &serde_json::Map<String, Value>, key: &str, at: &str) -> Result<String, ApiError> {
    match part.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Object(o)) => match o.get("url") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(ApiError::bad_param(&format!("{at}.{key}.url"), format!("`{at}.{key}.url` must be a string"))),
        },
        _ => Err(ApiError::bad_param(&format!("{at}.{key}"), format!("`{at}.{key}` must be an object with a `url`"))),
    }
}

fn convert_messages(messages: &[Value]) -> Result<(Vec<ChatMessage>, Vec<MediaRef>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_param("messages", "`messages` must hold at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut media = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let obj = m.as_object().ok_or_else(|| ApiError::bad_param(&at, format!("`{at}` must be an object")))?;
        let role = obj
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_param(&format!("{at}.role"), format!("`{at}.role` must be a string")))?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad_param(
                    &format!("{at}.role"),
                    format!("unsupported role `{other}` (system, developer, user or assistant)"),
                ))
            }
        };
        let mut content = Vec::new();
        match obj.get("content") {
            None | Some(Value::Null) => content.push(ContentPart::Text(String::new())),
            Some(Value::String(s)) => content.push(ContentPart::Text(s.clone())),
            Some(Value::Array(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    let pat = format!("{at}.content[{j}]");
                    let po =
                        p.as_object().ok_or_else(|| ApiError::bad_param(&pat, format!("`{pat}` must be an object")))?;
                    match po.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let t = po.get("text").and_then(Value::as_str).ok_or_else(|| {
                                ApiError::bad_param(&format!("{pat}.text"), format!("`{pat}.text` must be a string"))
                            })?;
                            content.push(ContentPart::Text(t.to_string()));
                        }
                        Some("image_url") => {
                            media.push(MediaRef { kind: MediaKind::Image, url: media_url(po, "image_url", &pat)? });
                            content.push(ContentPart::Image);
                        }
                        Some("video_url") => {
                            media.push(MediaRef { kind: MediaKind::Video, url: media_url(po, "video_url", &pat)? });
                            content.push(ContentPart::Video);
                        }
                        Some(other) => {
                            return Err(ApiError::bad_param(
                                &format!("{pat}.type"),
                                format!("unsupported content part type `{other}` (text, image_url or video_url)"),
                            ))
                        }
                        None => {
                            return Err(ApiError::bad_param(
                                &format!("{pat}.type"),
                                format!("`{pat}.type` must be a string"),
                            ))
                        }
                    }
                }
                if content.is_empty() {
                    return Err(ApiError::bad_param(&format!("{at}.content"), format!("`{at}.content` is empty")));
                }
            }
            Some(_) => {
                return Err(ApiError::bad_param(
                    &format!("{at}.content"),
                    format!("`{at}.content` must be a string or a list of parts"),
                ))
            }
        }
        out.push(ChatMessage::new(role, content));
    }
    Ok((out, media))
}

fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut z = t ^ N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn prepare(body: &[u8], state: &AppState) -> Result<Prepared, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    let req: ChatRequest = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." { None } else { Some(path.clone()) };
        let mut err = ApiError::bad_request(format!(
            "invalid request: {}{}",
            if path == "." { String::new() } else { format!("{path}: ") },
            e.inner()
        ));
        err.param = param;
        err
    })?;

    if let Some(model) = &req.model {
        if !state.accepts_model(model) {
            return Err(ApiError::model_not_found(model, &state.model_name));
        }
    }
    if let Some(n) = req.n {
        if n != 1 {
            return Err(ApiError::bad_param("n", format!("only n = 1 is supported, got {n}")));
        }
    }
    if let Some(Value::Array(tools)) = &req.tools {
        if !tools.is_empty() {
            return Err(ApiError::bad_param("tools", "tools are not supported by this server"));
        }
    }
    for (name, v) in [("frequency_penalty", req.frequency_penalty), ("presence_penalty", req.presence_penalty)] {
        if let Some(v) = v {
            if v != 0.0 {
                return Err(ApiError::bad_param(name, format!("`{name}` is not supported (use repetition_penalty)")));
            }
        }
    }

    let info = state.scheduler.info();
    let mut options = info.default_options.clone();
    let max_ctx = info.max_position_embeddings;
    if let Some((name, m)) =
        req.max_completion_tokens.map(|m| ("max_completion_tokens", m)).or(req.max_tokens.map(|m| ("max_tokens", m)))
    {
        if m < 1 {
            return Err(ApiError::bad_param(name, format!("`{name}` must be at least 1, got {m}")));
        }
        options.max_new_tokens = (m as u64).min(max_ctx.max(1) as u64) as usize;
    }
    if let Some(t) = req.temperature {
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return Err(ApiError::bad_param("temperature", format!("`temperature` must be in [0, 2], got {t}")));
        }
        options.sampling.temperature = t;
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad_param("top_p", format!("`top_p` must be in (0, 1], got {p}")));
        }
        options.sampling.top_p = p;
    }
    if let Some(k) = req.top_k {
        if k < -1 {
            return Err(ApiError::bad_param("top_k", format!("`top_k` must be -1, 0 (off) or positive, got {k}")));
        }
        options.sampling.top_k = k.max(0) as usize;
    }
    if let Some(p) = req.min_p {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::bad_param("min_p", format!("`min_p` must be in [0, 1], got {p}")));
        }
        options.sampling.min_p = p;
    }
    if let Some(r) = req.repetition_penalty {
        if !(r.is_finite() && r > 0.0) {
            return Err(ApiError::bad_param(
                "repetition_penalty",
                format!("`repetition_penalty` must be > 0, got {r}"),
            ));
        }
        options.sampling.repetition_penalty = r;
    }
    options.sampling.seed = match req.seed {
        Some(s) => s as u64,
        None => random_seed(),
    };
    if let Some(i) = req.ignore_eos {
        options.ignore_eos = i;
    }
    if let Some(stop) = req.stop {
        let list = match stop {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if list.len() > MAX_STOP {
            return Err(ApiError::bad_param("stop", format!("at most {MAX_STOP} stop strings, got {}", list.len())));
        }
        if list.iter().any(String::is_empty) {
            return Err(ApiError::bad_param("stop", "stop strings must not be empty"));
        }
        if let Some(long) = list.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad_param(
                "stop",
                format!("a stop string has {} bytes, over the limit of {MAX_STOP_BYTES}", long.len()),
            ));
        }
        options.stop_strings = list;
    }
    let logprobs = req.logprobs.unwrap_or(false);
    match req.top_logprobs {
        Some(k) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::bad_param(
                "top_logprobs",
                format!("`top_logprobs` must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
            ))
        }
        Some(k) if k > 0 && !logprobs => {
            return Err(ApiError::bad_param("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
        }
        Some(k) => options.top_logprobs = k as usize,
        None => options.top_logprobs = 0,
    }
    options.sampling.validate().map_err(ApiError::bad_request)?;

    let (messages, media) = convert_messages(&req.messages)?;
    if media.len() > state.config.limits.max_media_items {
        return Err(ApiError::bad_param(
            "messages",
            format!("{} media items, more than the limit of {}", media.len(), state.config.limits.max_media_items),
        ));
    }
    let prompt = apply_chat_template(info.chat_template.as_deref(), &messages, true, &info.bos_token, &info.eos_token)
        .map_err(|e| ApiError::bad_param("messages", format!("cannot render the chat template: {e}")))?;
    let images = media.iter().filter(|m| m.kind == MediaKind::Image).count();
    let videos = media.len() - images;
    let image_marks = prompt.matches("<image>").count();
    let video_marks = prompt.matches("<video>").count();
    if image_marks != images || video_marks != videos {
        return Err(ApiError::bad_param(
            "messages",
            format!(
                "the prompt has {image_marks} <image> and {video_marks} <video> placeholders but the request gives \
                 {images} image(s) and {videos} video(s); do not write <image> or <video> in text"
            ),
        ));
    }
    let num_frames = crate::frames::num_frames_param(req.num_frames.as_ref())?;
    // Refuse at once, before any media is fetched or decoded, a request whose media alone cannot
    // fit the context (the placeholder tokens per item are known from the processor config).
    if let (Some(it), Some(vt)) = (info.image_tokens, info.video_tokens_per_frame) {
        let needed = media::media_tokens(images, videos, num_frames, it, vt);
        if needed >= max_ctx as u64 {
            return Err(ApiError::bad_param(
                "messages",
                format!(
                    "{images} image(s) and {videos} video(s) take {needed} tokens, more than the model's context of \
                     {max_ctx} tokens: the request cannot fit"
                ),
            ));
        }
    }
    let stream = req.stream.unwrap_or(false);
    let include_usage = stream && req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    Ok(Prepared { prompt, media, options, stream, include_usage, logprobs, num_frames })
}

// ---------------------------------------------------------------------------------------------
// Handler

/// Decrements the in-flight gauge when the request (or its stream) ends, and gives back the
/// decoded pixels it held.
struct InFlight(Arc<AppState>, media::RequestPixels);

impl InFlight {
    fn new(state: &Arc<AppState>, pixels: media::RequestPixels) -> Self {
        state.metrics.in_flight_inc();
        InFlight(state.clone(), pixels)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight_dec();
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let guard = InFlight::new(&state, media::RequestPixels::default());
    let pixels = guard.1.clone();
    let arrival = Instant::now();
    let timeout = state.config.limits.request_timeout;
    let deadline = TokioInstant::now() + timeout;
    let result: Result<(Prepared, RequestHandle), ApiError> = async {
        let body = read_body(&headers, body, state.config.limits.max_body_bytes).await?;
        let prepared = prepare(&body, &state)?;
        tracing::debug!(prompt = %prepared.prompt, media = prepared.media.len(), stream = prepared.stream, "request");
        let (images, videos) =
            match tokio::time::timeout_at(deadline, load_media(&state, &prepared.media, prepared.num_frames, &pixels))
                .await
            {
                Ok(r) => r?,
                Err(_) => return Err(ApiError::timeout(timeout.as_secs_f64())),
            };
        let handle = state
            .scheduler
            .submit(GenerationRequest {
                prompt: prepared.prompt.clone(),
                images,
                videos,
                options: prepared.options.clone(),
            })
            .map_err(crate::submit_error)?;
        Ok((prepared, handle))
    }
    .await;
    let (prepared, handle) = match result {
        Ok(x) => x,
        Err(e) => {
            log_error(&e);
            return e.into_response();
        }
    };
    let ctx = Completion {
        id: format!("chatcmpl-{}", rid.0),
        created: now_secs(),
        model: state.model_name.clone(),
        logprobs: prepared.logprobs,
        state: state.clone(),
        arrival,
    };
    if prepared.stream {
        stream_response(ctx, handle, deadline, prepared.include_usage, guard, timeout.as_secs_f64()).await
    } else {
        match collect(&ctx, handle, deadline, timeout.as_secs_f64()).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => {
                log_error(&e);
                e.into_response()
            }
        }
    }
}

/// Reads the body up to `limit` bytes. Over the limit the rest is still read and dropped (up to
/// a bound, for a few seconds) so that the client, which may still be sending, reads the 413
/// instead of a connection reset.
pub(crate) async fn read_body(headers: &axum::http::HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use tokio_stream::StreamExt as _;
    let too_large = || ApiError::too_large(format!("the request body is over the limit of {limit} bytes"));
    let drain_limit = limit.saturating_mul(2).max(limit.saturating_add(8 << 20));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > drain_limit as u64) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(declared.map(|n| n.min(limit as u64) as usize).unwrap_or(0));
    let mut total = 0usize;
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
            total = total.saturating_add(chunk.len());
            if total > drain_limit {
                break;
            }
            if total <= limit {
                buf.extend_from_slice(&chunk);
            }
        }
        Ok::<(), ApiError>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), read).await {
        Ok(r) => r?,
        Err(_) if total > limit => return Err(too_large()),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "the request body took too long to arrive",
            ))
        }
    }
    if total > limit {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

fn log_error(e: &ApiError) {
    if e.status.is_server_error() {
        tracing::error!(status = e.status.as_u16(), "{}", e.message);
    } else {
        tracing::info!(status = e.status.as_u16(), "refused: {}", e.message);
    }
}

/// Sets the request's cancellation flag when dropped: on return (one part failed), on timeout
/// and when the client goes away (the handler's future is dropped), the media work still
/// running or waiting for that request stops.
struct CancelOnDrop(videollava::media::Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn load_media(
    state: &Arc<AppState>,
    refs: &[MediaRef],
    num_frames: usize,
    pixels: &media::RequestPixels,
) -> Result<(Vec<videollava::media::RgbImage>, Vec<videollava::media::Video>), ApiError> {
    let policy = MediaPolicy {
        allowed_media_dir: state.config.allowed_media_dir.clone(),
        allow_private_media_urls: state.config.allow_private_media_urls,
        limits: state.config.limits.clone(),
    };
    let options = videollava::media::video::VideoOptions { num_frames, ..Default::default() };
    let cancel = videollava::media::Cancel::new();
    let _stop = CancelOnDrop(cancel.clone());
    // Items load in parallel on the media worker pool; results keep the order of appearance.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in refs.iter().enumerate() {
        let (r, policy, cancel, pixels, options) =
            (r.clone(), policy.clone(), cancel.clone(), pixels.clone(), options.clone());
        tasks.spawn(async move {
            let permit = media::acquire_worker(&policy.limits).await;
            let result = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                match r.kind {
                    MediaKind::Image => media::load_image(&r.url, &policy, &cancel, &pixels).map(|x| (Some(x), None)),
                    MediaKind::Video => {
                        media::load_video_with(&r.url, &policy, &cancel, &pixels, &options).map(|v| (None, Some(v)))
                    }
                }
            })
            .await;
            (i, result)
        });
    }
    let mut slots: Vec<Option<MediaItem>> = (0..refs.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = match joined {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("a media task failed: {e}");
                return Err(ApiError::internal(format!("a media task failed: {e}")));
            }
        };
        match result {
            Ok(Ok(item)) => slots[i] = Some(item),
            // The first failure ends the request; `_stop` cancels the other parts.
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                tracing::error!("decoding media item {i} panicked: {e}");
                return Err(ApiError::internal(format!("decoding media item {i} panicked: {e}")));
            }
        }
    }
    let mut images = Vec::new();
    let mut videos = Vec::new();
    for (i, v) in slots.into_iter().flatten() {
        images.extend(i);
        videos.extend(v);
    }
    Ok((images, videos))
}

type MediaItem = (Option<videollava::media::RgbImage>, Option<videollava::media::Video>);

/// What every response of one completion shares.
struct Completion {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    state: Arc<AppState>,
    arrival: Instant,
}

fn engine_error(message: String, client_error: bool) -> ApiError {
    if client_error {
        ApiError::bad_request(message)
    } else {
        ApiError::internal(message)
    }
}

/// The OpenAI `logprob` value: finite (`-9999` for minus infinity).
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        lp as f64
    } else {
        -9999.0
    }
}

impl Completion {
    /// `{"token", "logprob", "bytes"}` for a token id.
    fn token_entry(&self, id: u32, lp: f32) -> Value {
        let (token, bytes) = token_text(&self.state, id);
        json!({"token": token, "logprob": finite(lp), "bytes": bytes})
    }

    fn logprob_item(&self, id: u32, lp: f32, top: &[(u32, f32)]) -> Value {
        let mut v = self.token_entry(id, lp);
        v["top_logprobs"] = Value::Array(top.iter().map(|&(t, l)| self.token_entry(t, l)).collect());
        v
    }

    /// Extension, named as llama.cpp's server names it: where the request's time went.
    /// `predicted_per_second` is the decoding rate after the first token (which comes with the
    /// prefill): `(predicted_n - 1) / predicted_ms`.
    fn timings(seq: &GeneratedSequence, t: &crate::engine_api::RequestTimings) -> Value {
        let n = seq.token_ids.len();
        let rate = (n > 1 && t.decode_ms > 0.0).then(|| (n - 1) as f64 * 1e3 / t.decode_ms);
        json!({
            "queue_ms": t.queue_ms,
            "prompt_n": seq.prompt_tokens,
            "prompt_ms": t.preprocess_ms + t.prefill_ms,
            "time_to_first_token_ms": t.time_to_first_token_ms,
            "predicted_n": n,
            "predicted_ms": t.decode_ms,
            "predicted_per_second": rate,
        })
    }

    /// OpenAI's usage object; `cached_tokens`: prompt positions taken from the prefix cache.
    fn usage(seq: &GeneratedSequence, cached_tokens: usize) -> Value {
        let completion = seq.token_ids.len();
        json!({
            "prompt_tokens": seq.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": seq.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        })
    }

    fn record(&self, seq: &GeneratedSequence, queue_ms: f64) {
        let m = &self.state.metrics;
        m.add_tokens(seq.prompt_tokens as u64, seq.token_ids.len() as u64);
        m.observe_latency(self.arrival.elapsed().as_secs_f64());
        m.observe_queue(queue_ms / 1e3);
    }

    fn chunk(&self, delta: Value, logprobs: Value, finish: Option<&str>, include_usage: bool) -> Bytes {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The token's text (SentencePiece `▁` as a space, byte tokens `<0xNN>` as their byte) and bytes.
fn token_text(state: &AppState, id: u32) -> (String, Vec<u8>) {
    let Some(tok) = &state.tokenizer else {
        return (format!("token_id:{id}"), format!("token_id:{id}").into_bytes());
    };
    let Some(piece) = tok.inner().id_to_token(id) else {
        return (String::new(), Vec::new());
    };
    if piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&piece[3..5], 16) {
            return (String::from_utf8_lossy(&[b]).into_owned(), vec![b]);
        }
    }
    let text = piece.replace('\u{2581}', " ");
    let bytes = text.as_bytes().to_vec();
    (text, bytes)
}

async fn collect(
    ctx: &Completion,
    mut handle: RequestHandle,
    deadline: TokioInstant,
    timeout_s: f64,
) -> Result<Value, ApiError> {
    let mut first = true;
    loop {
        let ev = match tokio::time::timeout_at(deadline, handle.events.recv()).await {
            Err(_) => return Err(ApiError::timeout(timeout_s)),
            Ok(None) => return Err(ApiError::internal("the generation ended without a result")),
            Ok(Some(ev)) => ev,
        };
        match ev {
            StreamEvent::Token { .. } => {
                if first {
                    first = false;
                    ctx.state.metrics.observe_ttft(ctx.arrival.elapsed().as_secs_f64());
                }
            }
            StreamEvent::Finished { sequence, timings } => {
                ctx.record(&sequence, timings.queue_ms);
                let logprobs = if ctx.logprobs {
                    let content: Vec<Value> = sequence
                        .token_ids
                        .iter()
                        .enumerate()
                        .map(|(i, &t)| {
                            let lp = sequence.logprobs.get(i).copied().unwrap_or(f32::NAN);
                            let top = sequence.top_logprobs.get(i).map(Vec::as_slice).unwrap_or(&[]);
                            ctx.logprob_item(t, lp, top)
                        })
                        .collect();
                    json!({"content": content, "refusal": null})
                } else {
                    Value::Null
                };
                tracing::info!(
                    prompt_tokens = sequence.prompt_tokens,
                    completion_tokens = sequence.token_ids.len(),
                    finish = sequence.finish_reason.as_str(),
                    queue_ms = timings.queue_ms,
                    ttft_ms = timings.time_to_first_token_ms,
                    "completed"
                );
                return Ok(json!({
                    "id": ctx.id,
                    "object": "chat.completion",
                    "created": ctx.created,
                    "model": ctx.model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": sequence.text, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": sequence.finish_reason.as_str(),
                    }],
                    "usage": Completion::usage(&sequence, timings.cached_prompt_tokens),
                    "timings": Completion::timings(&sequence, &timings),
                }));
            }
            StreamEvent::Failed { message, client_error } => return Err(engine_error(message, client_error)),
        }
    }
}

async fn stream_response(
    ctx: Completion,
    mut handle: RequestHandle,
    deadline: TokioInstant,
    include_usage: bool,
    guard: InFlight,
    timeout_s: f64,
) -> Response {
    // Wait for the first event so that a request the engine refuses (prompt too long, ...) still
    // gets its 4xx status rather than an error inside a 200 stream.
    let first = match tokio::time::timeout_at(deadline, handle.events.recv()).await {
        Err(_) => Err(ApiError::timeout(timeout_s)),
        Ok(None) => Err(ApiError::internal("the generation ended without a result")),
        Ok(Some(StreamEvent::Failed { message, client_error })) => Err(engine_error(message, client_error)),
        Ok(Some(ev)) => Ok(ev),
    };
    let first = match first {
        Ok(ev) => ev,
        Err(e) => {
            log_error(&e);
            return e.into_response();
        }
    };
    let mut out = VecDeque::new();
    out.push_back(ctx.chunk(json!({"role": "assistant", "content": ""}), Value::Null, None, include_usage));
    let stream = SseStream {
        ctx,
        handle,
        include_usage,
        pending: Some(first),
        out,
        done: false,
        finished: false,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
        timeout_s,
        sent_text: String::new(),
        first_token: false,
        _guard: guard,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::internal("cannot build the response").into_response())
}

/// The SSE body. It owns the request's handle: when the client goes away the body is dropped,
/// which drops the handle and cancels the generation.
struct SseStream {
    ctx: Completion,
    handle: RequestHandle,
    include_usage: bool,
    pending: Option<StreamEvent>,
    out: VecDeque<Bytes>,
    done: bool,
    finished: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout_s: f64,
    sent_text: String,
    first_token: bool,
    _guard: InFlight,
}

impl SseStream {
    fn fail(&mut self, e: ApiError) {
        log_error(&e);
        self.out.push_back(sse(&e.body()));
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
        self.finished = true;
    }

    fn on_event(&mut self, ev: StreamEvent) {
        match ev {
            StreamEvent::Token { token_id, text, logprob, top_logprobs } => {
                if !self.first_token {
                    self.first_token = true;
                    self.ctx.state.metrics.observe_ttft(self.ctx.arrival.elapsed().as_secs_f64());
                }
                let with_lp = self.ctx.logprobs && !logprob.is_nan();
                if text.is_empty() && !with_lp {
                    return;
                }
                let logprobs = if with_lp {
                    json!({"content": [self.ctx.logprob_item(token_id, logprob, &top_logprobs)], "refusal": null})
                } else {
                    Value::Null
                };
                self.sent_text.push_str(&text);
                let chunk = self.ctx.chunk(json!({"content": text}), logprobs, None, self.include_usage);
                self.out.push_back(chunk);
            }
            StreamEvent::Finished { sequence, timings } => {
                // Whatever text the token events did not carry (should be none).
                if sequence.text.len() > self.sent_text.len() && sequence.text.starts_with(self.sent_text.as_str()) {
                    let rest = sequence.text[self.sent_text.len()..].to_string();
                    self.out.push_back(self.ctx.chunk(json!({"content": rest}), Value::Null, None, self.include_usage));
                }
                self.ctx.record(&sequence, timings.queue_ms);
                let reason = sequence.finish_reason.as_str();
                self.out.push_back(self.ctx.chunk(json!({}), Value::Null, Some(reason), self.include_usage));
                if self.include_usage {
                    let v = json!({
                        "id": self.ctx.id,
                        "object": "chat.completion.chunk",
                        "created": self.ctx.created,
                        "model": self.ctx.model,
                        "choices": [],
                        "usage": Completion::usage(&sequence, timings.cached_prompt_tokens),
                        "timings": Completion::timings(&sequence, &timings),
                    });
                    self.out.push_back(sse(&v));
                }
                self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                tracing::info!(
                    id = %self.ctx.id,
                    prompt_tokens = sequence.prompt_tokens,
                    completion_tokens = sequence.token_ids.len(),
                    finish = reason,
                    queue_ms = timings.queue_ms,
                    ttft_ms = timings.time_to_first_token_ms,
                    "stream completed"
                );
                self.done = true;
                self.finished = true;
            }
            StreamEvent::Failed { message, client_error } => self.fail(engine_error(message, client_error)),
        }
    }
}

impl tokio_stream::Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let ev = match this.pending.take() {
                Some(ev) => ev,
                None => {
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        let e = ApiError::timeout(this.timeout_s);
                        this.fail(e);
                        continue;
                    }
                    match this.handle.events.poll_recv(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(None) => {
                            this.fail(ApiError::internal("the generation ended without a result"));
                            continue;
                        }
                        Poll::Ready(Some(ev)) => ev,
                    }
                }
            };
            this.on_event(ev);
        }
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        if !self.finished {
            tracing::info!(id = %self.ctx.id, "client went away mid-stream: generation cancelled");
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! Request parsing under mutation: message conversion and data URIs must refuse, never panic.
    //! `FUZZ_SECONDS` (default 2) bounds the run.
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const TOKENS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "null",
        "true",
        "1e999",
        "-1",
        "\"role\"",
        "\"user\"",
        "\"content\"",
        "\"type\"",
        "\"text\"",
        "\"image_url\"",
        "\"video_url\"",
        "\"url\"",
        "\"data:image/png;base64,\"",
        "\"<image>\"",
        "\"\\u0000\"",
        "\"stop\"",
        "\"max_tokens\"",
        "\"messages\"",
        "\"system\"",
        "\"assistant\"",
        "0",
        "\"\"",
    ];

    #[test]
    fn fuzz_request_parsing() {
        let secs: f64 = std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
        let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
        let valid = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,aGVsbG8="}},{"type":"video_url","video_url":"x.mp4"},{"type":"text","text":"hi"}]},{"role":"assistant","content":"ok"}],"stop":["a","b"],"max_tokens":3}"#;
        let mut rng = Rng(seed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
        let mut execs = 0u64;
        while std::time::Instant::now() < deadline {
            let mut v = valid.to_vec();
            for _ in 0..1 + rng.below(6) {
                let at = rng.below(v.len() + 1);
                match rng.below(3) {
                    0 if !v.is_empty() => {
                        let end = (at + 1 + rng.below(16)).min(v.len());
                        v.drain(at.min(v.len() - 1)..end);
                    }
                    1 => {
                        let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                        v.splice(at..at, t.iter().copied());
                    }
                    _ if !v.is_empty() => {
                        let i = rng.below(v.len());
                        v[i] = rng.next() as u8;
                    }
                    _ => {}
                }
            }
            if let Ok(value) = serde_json::from_slice::<Value>(&v) {
                if let Ok(req) = serde_json::from_value::<ChatRequest>(value.clone()) {
                    if let Ok((_, media)) = convert_messages(&req.messages) {
                        for m in media {
                            if let Some(rest) = m.url.strip_prefix("data:") {
                                let _ = crate::media::decode_data_uri_for_tests(rest, 1 << 20);
                            }
                        }
                    }
                }
            }
            execs += 1;
        }
        eprintln!("fuzz request parsing: {execs} executions in {secs} s, no panic");
        assert!(execs > 0);
    }
}
