//! The web page at `/`: one HTML page, its script and its style sheet, built into the binary
//! (no CDN, no external fonts, works offline). The page talks to the public API only
//! (`/v1/chat/completions`, `/v1/models`, `/health`) plus `/v1/frames` for the frame preview.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use std::sync::Arc;

use crate::AppState;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");
const FAVICON_SVG: &str = include_str!("web/favicon.svg");

/// Only our own files; media previews are `blob:`/`data:` URLs (or the pasted URL for a
/// video's own player).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   media-src 'self' data: blob: http: https:; connect-src 'self'; object-src 'none'; \
                   base-uri 'none'; frame-ancestors 'none'; form-action 'none'";

const PATHS: [&str; 5] = ["/", "/index.html", "/app.js", "/style.css", "/favicon.svg"];

/// Whether `path` is one of the page's files (for the request metrics' route label).
pub fn is_page_path(path: &str) -> bool {
    PATHS.contains(&path)
}

/// Adds the page's routes to `router`.
pub fn routes(router: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    router
        .route("/", get(|| async { file("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/index.html", get(|| async { file("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { file("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { file("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/favicon.svg", get(|| async { file("image/svg+xml", FAVICON_SVG) }))
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}
