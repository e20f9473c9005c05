//! The web page's files and the frame preview endpoint (`POST /v1/frames`), over loopback HTTP.
//! The page itself is driven in a browser by `tests/browser.rs`.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use videollava::media::video::{decode_video_file, VideoOptions};
use videollava_server::{Limits, ServerConfig};

fn frames(base: &str, body: &Value) -> (u16, Value) {
    post_raw(base, "/v1/frames", serde_json::to_vec(body).unwrap())
}

fn get_with_type(base: &str, path: &str) -> (u16, String, String) {
    let mut resp = agent().get(&format!("{base}{path}")).call().expect("request sent");
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (resp.status().as_u16(), ct, resp.body_mut().read_to_string().unwrap_or_default())
}

#[test]
fn the_page_is_served_and_no_web_ui_turns_it_off() {
    let server = start(ServerConfig::default());
    let (status, ct, html) = get_with_type(&server.base, "/");
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(html.contains("<title>Video-LLaVA</title>") && html.contains("src=\"/app.js\""), "{html}");
    // Everything the page loads is ours: no external scripts, styles or fonts.
    for marker in ["http://", "https://", "//fonts.", "cdn"] {
        let external = html.lines().any(|l| (l.contains("src=") || l.contains("href=")) && l.contains(marker));
        assert!(!external, "the page refers to {marker}");
    }
    for (path, kind) in [("/app.js", "text/javascript"), ("/style.css", "text/css"), ("/favicon.svg", "image/svg+xml")]
    {
        let (status, ct, body) = get_with_type(&server.base, path);
        assert_eq!(status, 200, "{path}");
        assert!(ct.starts_with(kind), "{path}: {ct}");
        assert!(!body.is_empty(), "{path}");
        assert!(!body.contains("@import") && !body.contains("url(http"), "{path} loads something external");
    }
    let resp = agent().get(&format!("{}/", server.base)).call().unwrap();
    let csp = resp.headers().get("content-security-policy").unwrap().to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    let (_, metrics) = get(&server.base, "/metrics");
    assert!(metrics.contains("videollava_requests_total{route=\"/\",status=\"200\"}"), "{metrics}");

    let off = start(ServerConfig { web_ui: false, ..ServerConfig::default() });
    for path in ["/", "/index.html", "/app.js", "/style.css"] {
        let (status, body) = get(&off.base, path);
        assert_eq!(status, 404, "{path} with the web page off: {body}");
    }
    // The API stays, the frame preview included.
    let (status, _) = get(&off.base, "/health");
    assert_eq!(status, 200);
    let (status, v) = frames(&off.base, &json!({"video_url": {"url": data_uri("clip.mp4", "video/mp4")}}));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn frames_are_the_models_frames_with_timestamps() {
    let server = start(ServerConfig::default());
    let clip = media_path("clip.mp4");
    for n in [8usize, 3, 1] {
        let expected = decode_video_file(&clip, &VideoOptions { num_frames: n, ..Default::default() }).unwrap();
        let (status, v) =
            frames(&server.base, &json!({"video_url": {"url": data_uri("clip.mp4", "video/mp4")}, "num_frames": n}));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "video.frames");
        assert_eq!(v["num_frames"], n);
        assert_eq!(v["total_frames"], expected.total_frames);
        assert_eq!(v["width"], expected.frames[0].width);
        assert_eq!(v["height"], expected.frames[0].height);
        let rate = v["frame_rate"].as_f64().expect("clip.mp4 has a frame rate");
        assert!(rate > 0.0);
        let list = v["frames"].as_array().unwrap();
        assert_eq!(list.len(), n);
        for (i, (f, &index)) in list.iter().zip(&expected.frame_indices).enumerate() {
            assert_eq!(f["index"], index, "frame {i}");
            let t = f["timestamp"].as_f64().unwrap();
            assert!((t - index as f64 / rate).abs() < 1e-9, "frame {i}: {t}");
            let uri = f["image"].as_str().unwrap();
            let b64 = uri.strip_prefix("data:image/jpeg;base64,").expect("a JPEG data URI");
            let jpeg = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
            let img = videollava::media::image::decode_image_bytes(&jpeg, "thumbnail").unwrap();
            let (w, h) = (expected.frames[i].width, expected.frames[i].height);
            let side = w.max(h).min(192);
            assert_eq!(img.width.max(img.height), side, "thumbnail {i} is {}x{}", img.width, img.height);
            // The thumbnail shows the frame: mean colour within 12 levels of the frame's.
            let mean = |d: &[u8]| d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
            let (a, b) = (mean(&img.data), mean(&expected.frames[i].data));
            assert!((a - b).abs() < 12.0, "thumbnail {i}: mean {a} vs frame {b}");
        }
    }
    // The default is the model's 8 frames; the string form of video_url works too.
    let (status, v) = frames(&server.base, &json!({"video_url": data_uri("short.webm", "video/webm")}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["frames"].as_array().unwrap().len(), 8);
    let (_, metrics) = get(&server.base, "/metrics");
    assert!(metrics.contains("videollava_requests_total{route=\"/v1/frames\",status=\"200\"}"), "{metrics}");
}

#[test]
fn frames_refuses_bad_input() {
    let dir = temp_dir("frames-local");
    std::fs::copy(media_path("clip.mp4"), dir.join("clip.mp4")).unwrap();
    let config = ServerConfig {
        allowed_media_dir: Some(dir.clone()),
        limits: Limits { max_media_bytes: 5000, max_body_bytes: 1 << 20, ..Limits::default() },
        ..ServerConfig::default()
    };
    let server = start(config);
    let small = "data:video/mp4;base64,".to_string() + &"A".repeat(100);
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({}), 400, "no video_url"),
        (json!({"video_url": {"url": 3}}), 400, "url not a string"),
        (json!({"video_url": {"url": small.clone()}, "num_frames": 0}), 400, "0 frames"),
        (json!({"video_url": {"url": small.clone()}, "num_frames": 33}), 400, "33 frames"),
        (json!({"video_url": {"url": small.clone()}, "num_frames": "8"}), 400, "frames as a string"),
        (json!({"video_url": {"url": small}}), 400, "not a video"),
        (json!({"video_url": {"url": data_uri("clip.mp4", "video/mp4")}}), 413, "over the media limit"),
        (json!({"video_url": {"url": "clip.mp4"}}), 413, "local file over the media limit"),
        (json!({"video_url": {"url": "/etc/passwd"}}), 403, "outside the allowed directory"),
        (json!({"video_url": {"url": "http://127.0.0.1:1/x.mp4"}}), 400, "a private address"),
        (json!({"video_url": {"url": "ftp://example.com/x.mp4"}}), 400, "another scheme"),
    ];
    for (body, expected, what) in cases {
        let (status, v) = frames(&server.base, &body);
        assert_error(status, &v, expected, what);
    }
    let (status, v) = post_raw(&server.base, "/v1/frames", b"{not json".to_vec());
    assert_error(status, &v, 400, "invalid JSON");
    let (status, v) = post_raw(&server.base, "/v1/frames", vec![b' '; 2 << 20]);
    assert_error(status, &v, 413, "a body over the limit");
    // The chat endpoint takes the same `num_frames` and the same bounds.
    let (status, v) = post(&server.base, &json!({"messages": [{"role": "user", "content": "Hi"}], "num_frames": 0}));
    assert_error(status, &v, 400, "chat with 0 frames");
    assert_eq!(v["error"]["param"], "num_frames");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_num_frames_changes_what_the_model_sees() {
    let server = start(ServerConfig::default());
    let body = |n: usize| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_uri("clip.mp4", "video/mp4")}},
            {"type": "text", "text": "What happens?"}]}],
            "max_tokens": 1, "num_frames": n})
    };
    let (status, v8) = post(&server.base, &body(8));
    assert_eq!(status, 200, "{v8}");
    let (status, v4) = post(&server.base, &body(4));
    assert_eq!(status, 200, "{v4}");
    let (p8, p4) = (v8["usage"]["prompt_tokens"].as_u64().unwrap(), v4["usage"]["prompt_tokens"].as_u64().unwrap());
    // Each frame adds the same number of placeholder tokens.
    assert!(p8 > p4 && (p8 - p4) % 4 == 0, "prompt tokens with 8 frames {p8}, with 4 {p4}");
}

#[test]
fn more_frames_only_within_the_requests_pixel_budget() {
    // clip.mp4 is 48x36 = 1728 pixels a frame; the request may hold 16,000 decoded pixels.
    let limits = Limits { max_request_pixels: 16_000, ..Limits::default() };
    let server = start(ServerConfig { limits, ..ServerConfig::default() });
    let video = || json!({"url": data_uri("clip.mp4", "video/mp4")});
    let (status, v) = frames(&server.base, &json!({"video_url": video(), "num_frames": 9}));
    assert_eq!(status, 200, "9 x 1728 <= 16000: {v}");
    let (status, v) = frames(&server.base, &json!({"video_url": video(), "num_frames": 10}));
    assert_error(status, &v, 400, "10 x 1728 > 16000");
    assert_eq!(v["error"]["param"], "video_url");
    let chat = json!({"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": video()}, {"type": "text", "text": "Hi"}]}],
        "max_tokens": 1, "num_frames": 10});
    let (status, v) = post(&server.base, &chat);
    assert_error(status, &v, 400, "a chat request with 10 frames");
    assert_eq!(v["error"]["param"], "video_url");
}

#[test]
fn timings_extension_for_the_pages_tokens_per_second() {
    let server = start(ServerConfig::default());
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "ignore_eos": true});
    let (status, v) = post(&server.base, &body);
    assert_eq!(status, 200, "{v}");
    let t = &v["timings"];
    assert_eq!(t["predicted_n"], v["usage"]["completion_tokens"], "{v}");
    assert_eq!(t["prompt_n"], v["usage"]["prompt_tokens"], "{v}");
    assert_eq!(t["predicted_n"], 12);
    let (ms, rate) = (t["predicted_ms"].as_f64().unwrap(), t["predicted_per_second"].as_f64().unwrap());
    assert!(ms > 0.0 && (rate - 11.0 * 1e3 / ms).abs() < 1e-6 * rate, "{t}");
    for k in ["queue_ms", "prompt_ms", "time_to_first_token_ms"] {
        assert!(t[k].as_f64().is_some_and(|x| x >= 0.0), "{k} in {t}");
    }
    let mut body = body;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = stream(&server.base, &body);
    assert!(s.done);
    let last = s.chunks.last().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 12, "{last}");
    assert_eq!(last["timings"]["predicted_n"], 12, "{last}");
    assert!(last["timings"]["predicted_per_second"].as_f64().is_some_and(|r| r > 0.0), "{last}");
}
