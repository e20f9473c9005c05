//! `POST /v1/frames`: the frames the model would see of a video, as small JPEG thumbnails with
//! their timestamps. The web page shows them as soon as a video is attached.
//!
//! Request: `{"video_url": {"url": ...} | "...", "num_frames": 8}`; the URL takes the same forms
//! as a `video_url` part of a chat request (`data:` base64, `http(s)`, an allowed local path) and
//! goes through the same loader and limits ([`media::load_video_with`]), so the frames are the
//! ones a chat request with the same `num_frames` feeds the model (same decoder, same
//! [`videollava::media::video::sample_indices`] choice).
//!
//! Response:
//! `{"object": "video.frames", "num_frames", "total_frames", "frame_rate", "duration", "width",
//! "height", "frames": [{"index", "timestamp", "image": "data:image/jpeg;base64,..."}]}` where
//! `index` is the frame's position among the decoded frames and `timestamp` (seconds) is
//! `index / frame_rate` (null when the container gives no frame rate).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};
use videollava::media::video::{FrameSampling, VideoOptions};
use videollava::media::RgbImage;

use crate::error::ApiError;
use crate::media::{self, MediaPolicy};
use crate::AppState;

/// Most frames a request may ask for (here and as `num_frames` of a chat request).
pub const MAX_NUM_FRAMES: usize = 32;
/// Longest side of a thumbnail, in pixels.
const THUMBNAIL_SIDE: u32 = 192;
/// Previews decoded at once per server; more get 429 (each decodes a whole video on a blocking
/// thread).
pub(crate) const CONCURRENT_PREVIEWS: usize = 2;

/// Parses `num_frames` (default 8) within `1..=MAX_NUM_FRAMES`.
pub(crate) fn num_frames_param(v: Option<&Value>) -> Result<usize, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(VideoOptions::default().num_frames),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_NUM_FRAMES as u64).contains(&n) => Ok(n as usize),
            _ => Err(ApiError::bad_param(
                "num_frames",
                format!("`num_frames` must be an integer in [1, {MAX_NUM_FRAMES}], got {v}"),
            )),
        },
    }
}

pub async fn frames(State(state): State<Arc<AppState>>, headers: axum::http::HeaderMap, body: Body) -> Response {
    match preview(&state, &headers, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::error!(status = e.status.as_u16(), "{}", e.message);
            } else {
                tracing::info!(status = e.status.as_u16(), "refused: {}", e.message);
            }
            e.into_response()
        }
    }
}

async fn preview(state: &Arc<AppState>, headers: &axum::http::HeaderMap, body: Body) -> Result<Value, ApiError> {
    let limits = &state.config.limits;
    let body = crate::api::read_body(headers, body, limits.max_body_bytes).await?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    let url = match obj.get("video_url") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => match o.get("url") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(ApiError::bad_param("video_url.url", "`video_url.url` must be a string")),
        },
        _ => return Err(ApiError::bad_param("video_url", "`video_url` must be an object with a `url`")),
    };
    let num_frames = num_frames_param(obj.get("num_frames"))?;
    // The permit goes with the decoding thread: a client that goes away does not free it early.
    let permit = state.frame_previews.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("{CONCURRENT_PREVIEWS} frame previews are being decoded; retry later"),
        )
        .with_code("busy")
    })?;
    let policy = MediaPolicy {
        allowed_media_dir: state.config.allowed_media_dir.clone(),
        allow_private_media_urls: state.config.allow_private_media_urls,
        limits: limits.clone(),
    };
    let options = VideoOptions { num_frames, sampling: FrameSampling::default() };
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let (cancel, pixels) = (videollava::media::Cancel::new(), media::RequestPixels::default());
        let video = media::load_video_with(&url, &policy, &cancel, &pixels, &options)?;
        let thumbs = video.frames.iter().map(thumbnail_jpeg).collect::<Result<Vec<_>, _>>()?;
        Ok::<_, ApiError>((video, thumbs))
    });
    let (video, thumbs) = match tokio::time::timeout(limits.request_timeout, task).await {
        Err(_) => return Err(ApiError::timeout(limits.request_timeout.as_secs_f64())),
        Ok(Err(_)) => return Err(ApiError::bad_request("the video could not be decoded (the decoder failed)")),
        Ok(Ok(r)) => r?,
    };
    let frames: Vec<Value> = video
        .frame_indices
        .iter()
        .zip(thumbs)
        .map(|(&index, jpeg)| {
            json!({
                "index": index,
                "timestamp": video.frame_rate.map(|r| index as f64 / r),
                "image": format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg)),
            })
        })
        .collect();
    let (width, height) = video.frames.first().map(|f| (f.width, f.height)).unwrap_or((0, 0));
    Ok(json!({
        "object": "video.frames",
        "num_frames": num_frames,
        "total_frames": video.total_frames,
        "frame_rate": video.frame_rate,
        "duration": video.duration,
        "width": width,
        "height": height,
        "frames": frames,
    }))
}

/// A JPEG of `frame` (HWC u8 RGB) scaled down (area average) so that its longer side is at most
/// [`THUMBNAIL_SIDE`]; smaller frames keep their size.
fn thumbnail_jpeg(frame: &RgbImage) -> Result<Vec<u8>, ApiError> {
    let (w, h) = (frame.width as u32, frame.height as u32);
    let img = image::RgbImage::from_raw(w, h, frame.data.clone())
        .ok_or_else(|| ApiError::internal("a decoded frame has the wrong number of bytes"))?;
    let scale = (THUMBNAIL_SIDE as f64 / w.max(h).max(1) as f64).min(1.0);
    let (tw, th) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
    let small = if (tw, th) == (w, h) { img } else { image::imageops::thumbnail(&img, tw, th) };
    let jpeg = turbojpeg::compress(
        turbojpeg::Image {
            pixels: small.as_raw().as_slice(),
            width: tw as usize,
            pitch: tw as usize * 3,
            height: th as usize,
            format: turbojpeg::PixelFormat::RGB,
        },
        80,
        turbojpeg::Subsamp::Sub2x2,
    )
    .map_err(|e| ApiError::internal(format!("cannot encode a thumbnail: {e}")))?;
    Ok(jpeg.to_vec())
}
