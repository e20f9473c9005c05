//! `/health` tells when the engine thread is gone.

mod common;

use common::*;
use videollava_server::ServerConfig;

#[test]
fn health_reports_a_stopped_engine() {
    let server = start(ServerConfig::default());
    let (status, body) = get(&server.base, "/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ok\""), "{body}");
    server.scheduler.shutdown();
    let (status, body) = get(&server.base, "/health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unhealthy"), "{body}");
    // Requests are refused at once rather than queued forever.
    let (status, body) = post(&server.base, &chat_body(serde_json::json!("Hi"), 2));
    assert_eq!(status, 503, "{body}");
}

/// Decoded pixels are bounded per request, from the headers, before decoding.
#[test]
fn decoded_pixels_per_request_are_bounded() {
    use videollava_server::Limits;
    // landscape.png is 61x45 = 2745 pixels: one fits in 5000, two do not.
    let config =
        ServerConfig { limits: Limits { max_request_pixels: 5000, ..Limits::default() }, ..ServerConfig::default() };
    let server = start(config);
    let img = || serde_json::json!({"type": "image_url", "image_url": {"url": data_uri("landscape.png", "image/png")}});
    let (status, body) = post(&server.base, &chat_body(serde_json::json!([img(), {"type": "text", "text": "?"}]), 2));
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        post(&server.base, &chat_body(serde_json::json!([img(), img(), {"type": "text", "text": "?"}]), 2));
    assert_error(status, &body, 400, "two images over the per-request pixel limit");
    assert!(body.to_string().contains("per request"), "{body}");
}
