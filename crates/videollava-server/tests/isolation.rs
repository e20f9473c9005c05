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

/// Bytes of remote media held by all requests together are bounded: over the bound the fetch
/// stops and the request gets a 503 (retry later), under it the same fetch works.
#[test]
fn remote_bytes_held_are_bounded() {
    use videollava_server::Limits;
    let png_server = tiny_http_server(std::fs::read(media_path("landscape.png")).unwrap(), "image/png");
    let body = chat_body(
        serde_json::json!([{"type": "image_url", "image_url": {"url": format!("{png_server}/x.png")}}, {"type": "text", "text": "?"}]),
        2,
    );
    for (max_remote_bytes, expected) in [(4000, 503), (1 << 20, 200)] {
        let config = ServerConfig {
            limits: Limits { max_remote_bytes, ..Limits::default() },
            allow_private_media_urls: true,
            ..ServerConfig::default()
        };
        let server = start(config);
        let (status, v) = post(&server.base, &body);
        assert_eq!(status, expected, "max_remote_bytes {max_remote_bytes}: {v}");
        if expected == 503 {
            assert!(v.to_string().contains("remote media bytes"), "{v}");
        }
    }
    assert_eq!(videollava_server::media::REMOTE_BYTES.held(), 0, "every fetch gave its bytes back");
}
