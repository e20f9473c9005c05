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
