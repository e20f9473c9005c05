//! The OpenAI-compatible API against the tiny checkpoint, over real loopback HTTP.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use videollava::engine::SchedulerConfig;
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, VideoOptions};
use videollava::processor::chat::{ChatMessage, ContentPart};
use videollava_server::{Limits, ServerConfig};

fn user(parts: Vec<ContentPart>) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", parts)]
}

#[test]
fn non_streaming_answer_equals_engine_generate() {
    let server = start(ServerConfig::default());
    let engine = load_engine(&model_dir());
    let image = decode_image_file(&media_path("landscape.png")).unwrap();
    let video = decode_video_file(&media_path("clip.mp4"), &VideoOptions::default()).unwrap();

    // Plain string content.
    let (status, body) = post(&server.base, &chat_body(json!("Why is the sky blue?"), 12));
    assert_eq!(status, 200, "{body}");
    let want = solo(&engine, &user(vec![ContentPart::Text("Why is the sky blue?".into())]), &[], &[], 12);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "model-llama");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"].as_str().unwrap(), want.text);
    assert_eq!(body["choices"][0]["finish_reason"], want.finish_reason.as_str());
    assert_eq!(body["usage"]["prompt_tokens"].as_u64().unwrap() as usize, want.prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"].as_u64().unwrap() as usize, want.token_ids.len());
    assert_eq!(body["usage"]["total_tokens"].as_u64().unwrap() as usize, want.prompt_tokens + want.token_ids.len());
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));

    // An image and a video as data URIs, text in between: the parts' order is kept.
    let content = json!([
        {"type": "image_url", "image_url": {"url": data_uri("landscape.png", "image/png")}},
        {"type": "text", "text": "Compare the picture"},
        {"type": "video_url", "video_url": {"url": data_uri("clip.mp4", "video/mp4")}},
        {"type": "text", "text": "with the clip."},
    ]);
    let (status, body) = post(&server.base, &chat_body(content, 10));
    assert_eq!(status, 200, "{body}");
    let want = solo(
        &engine,
        &user(vec![
            ContentPart::Image,
            ContentPart::Text("Compare the picture".into()),
            ContentPart::Video,
            ContentPart::Text("with the clip.".into()),
        ]),
        std::slice::from_ref(&image),
        std::slice::from_ref(&video),
        10,
    );
    assert_eq!(body["choices"][0]["message"]["content"].as_str().unwrap(), want.text);
    assert_eq!(body["usage"]["prompt_tokens"].as_u64().unwrap() as usize, want.prompt_tokens);

    // A conversation with a system turn and an earlier answer; no model name at all.
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What now?"},
    ]);
    let (status, body) = post(&server.base, &json!({"messages": messages, "max_completion_tokens": 7}));
    assert_eq!(status, 200, "{body}");
    let want = solo(
        &engine,
        &[
            ChatMessage::system("Be brief."),
            ChatMessage::new("user", vec![ContentPart::Text("Hi".into())]),
            ChatMessage::assistant("Hello."),
            ChatMessage::new("user", vec![ContentPart::Text("What now?".into())]),
        ],
        &[],
        &[],
        7,
    );
    assert_eq!(body["choices"][0]["message"]["content"].as_str().unwrap(), want.text);
    assert_eq!(body["usage"]["completion_tokens"].as_u64().unwrap() as usize, want.token_ids.len());
}

#[test]
fn streamed_chunks_concatenate_to_the_same_text() {
    let server = start(ServerConfig::default());
    let content = json!([
        {"type": "video_url", "video_url": {"url": data_uri("clip.mp4", "video/mp4")}},
        {"type": "text", "text": "Why is this video funny?"},
    ]);
    let mut body = chat_body(content, 16);
    let (status, whole) = post(&server.base, &body);
    assert_eq!(status, 200, "{whole}");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = stream(&server.base, &body);
    assert_eq!(s.status, 200);
    assert!(s.done, "the stream ends with data: [DONE]");
    assert!(s.chunks.len() >= 3);
    let first = &s.chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(s.text(), whole["choices"][0]["message"]["content"].as_str().unwrap());
    // One id for all chunks; the finish reason in the last chunk with choices; usage after it.
    assert!(s.chunks.iter().all(|c| c["id"] == first["id"]));
    let usage_chunk = s.chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    // The same counts (the second request may take more of its prompt from the prefix cache).
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage_chunk["usage"][field], whole["usage"][field], "{field}");
    }
    let finish = &s.chunks[s.chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    for c in &s.chunks[..s.chunks.len() - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null());
        assert!(c["usage"].is_null());
    }

    // Without include_usage: no usage chunk, finish reason in the last chunk.
    body["stream_options"] = Value::Null;
    let s = stream(&server.base, &body);
    assert!(s.done);
    assert_eq!(s.text(), whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(!s.chunks.last().unwrap()["choices"][0]["finish_reason"].is_null());
    assert!(s.chunks.iter().all(|c| c.get("usage").is_none()));
}

#[test]
fn logprobs_in_openai_format() {
    let server = start(ServerConfig::default());
    let engine = load_engine(&model_dir());
    let mut body = chat_body(json!("Tell me a story."), 6);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, resp) = post(&server.base, &body);
    assert_eq!(status, 200, "{resp}");
    let want = solo(&engine, &user(vec![ContentPart::Text("Tell me a story.".into())]), &[], &[], 6);
    let content = resp["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), want.token_ids.len());
    for (i, item) in content.iter().enumerate() {
        assert!(item["token"].is_string());
        assert!(item["bytes"].is_array());
        let lp = item["logprob"].as_f64().unwrap();
        assert!((lp - want.logprobs[i] as f64).abs() < 1e-4, "token {i}: {lp} vs {}", want.logprobs[i]);
        let top = item["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!((top[0]["logprob"].as_f64().unwrap() - want.top_logprobs[i][0].1 as f64).abs() < 1e-4);
    }
    // Streaming: one logprobs entry per token across the chunks.
    body["stream"] = json!(true);
    let s = stream(&server.base, &body);
    let n: usize = s
        .chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["logprobs"]["content"].as_array()).map(Vec::len))
        .sum();
    assert_eq!(n, want.token_ids.len());
    // Without logprobs the field is null.
    let (_, resp) = post(&server.base, &chat_body(json!("Tell me a story."), 3));
    assert!(resp["choices"][0]["logprobs"].is_null());
}

#[test]
fn eight_concurrent_clients_get_their_solo_answers() {
    let server = start(ServerConfig::default());
    let engine = load_engine(&model_dir());
    let image = decode_image_file(&media_path("landscape.png")).unwrap();
    let cases: Vec<(String, bool, usize)> =
        (0..8).map(|i| (format!("Question number {i}: what do you see?"), i % 3 == 0, 4 + 2 * i)).collect();
    let wants: Vec<String> = cases
        .iter()
        .map(|(q, img, n)| {
            let mut parts = vec![];
            if *img {
                parts.push(ContentPart::Image);
            }
            parts.push(ContentPart::Text(q.clone()));
            let images = if *img { vec![image.clone()] } else { vec![] };
            solo(&engine, &user(parts), &images, &[], *n).text
        })
        .collect();
    let base = server.base.clone();
    let handles: Vec<_> = cases
        .into_iter()
        .enumerate()
        .map(|(i, (q, img, n))| {
            let base = base.clone();
            std::thread::spawn(move || {
                let mut content = vec![];
                if img {
                    content.push(
                        json!({"type": "image_url", "image_url": {"url": data_uri("landscape.png", "image/png")}}),
                    );
                }
                content.push(json!({"type": "text", "text": q}));
                let mut body = chat_body(Value::Array(content), n);
                if i % 2 == 1 {
                    body["stream"] = json!(true);
                    let s = stream(&base, &body);
                    assert!(s.done);
                    s.text()
                } else {
                    let (status, resp) = post(&base, &body);
                    assert_eq!(status, 200, "{resp}");
                    resp["choices"][0]["message"]["content"].as_str().unwrap().to_string()
                }
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), wants[i], "client {i}");
    }
}

#[test]
fn a_disconnecting_client_frees_its_slot() {
    // One slot: a request queued behind a cancelled one runs as soon as the slot is free.
    let server = start_with(
        ServerConfig::default(),
        &model_dir(),
        SchedulerConfig { max_batch_size: 1, max_queue: 8, ..Default::default() },
    );
    let mut body = chat_body(json!("Write a very long essay."), 1500);
    body["ignore_eos"] = json!(true);
    // How long the whole generation takes when nobody goes away.
    let t = std::time::Instant::now();
    let (status, full) = post(&server.base, &body);
    assert_eq!(status, 200, "{full}");
    let full_time = t.elapsed();
    let full_tokens = full["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(full_tokens > 1000, "{full_tokens}");

    body["stream"] = json!(true);
    let resp = agent()
        .post(&format!("{}/v1/chat/completions", server.base))
        .header("content-type", "application/json")
        .send(serde_json::to_vec(&body).unwrap().as_slice())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    for _ in 0..6 {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    }
    assert_eq!(running(&server.base).0, 1, "the request runs");
    drop(reader); // the client goes away mid-stream
    let t = std::time::Instant::now();
    let (status, _) = post(&server.base, &chat_body(json!("Hi"), 2));
    assert_eq!(status, 200);
    let next_time = t.elapsed();
    eprintln!("full generation {full_time:?} ({full_tokens} tokens); next request after the disconnect {next_time:?}");
    assert!(next_time < full_time / 2, "the cancelled generation kept its slot: {next_time:?} vs {full_time:?}");
    wait_until("an idle scheduler", Duration::from_secs(20), || running(&server.base) == (0, 0));
    let (_, metrics) = get(&server.base, "/metrics");
    assert!(metrics.contains("videollava_running_requests 0"), "{metrics}");
}

#[test]
fn bad_requests_get_4xx_and_the_server_keeps_answering() {
    let allowed = temp_dir("allowed");
    std::fs::copy(media_path("landscape.png"), allowed.join("ok.png")).unwrap();
    std::fs::write(allowed.join("notes.txt"), b"just text").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("/etc/hostname", allowed.join("escape.png")).unwrap();
    let outside = temp_dir("outside");
    std::fs::copy(media_path("landscape.png"), outside.join("secret.png")).unwrap();
    let text_server = tiny_http_server(b"<html>not an image</html>".to_vec(), "text/html");

    let config = ServerConfig {
        allowed_media_dir: Some(allowed.clone()),
        limits: Limits { max_body_bytes: 1 << 20, ..Limits::default() },
        ..ServerConfig::default()
    };
    let server = start(config);
    let base = server.base.clone();
    let image = |url: &str| {
        chat_body(json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]), 3)
    };
    let video = |url: &str| {
        chat_body(json!([{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What is it?"}]), 3)
    };

    let raw_cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"messages\": [".to_vec(), 400),
        ("not an object", b"[1, 2]".to_vec(), 400),
        (
            "body over the limit",
            {
                let big = "x".repeat(2 << 20);
                serde_json::to_vec(&chat_body(json!(big), 3)).unwrap()
            },
            413,
        ),
    ];
    for (what, bytes, want) in raw_cases {
        let (status, body) = post_raw(&base, "/v1/chat/completions", bytes);
        assert_error(status, &body, want, what);
    }

    let not_image = format!("data:image/png;base64,{}", "aGVsbG8gd29ybGQ=");
    let mut cases: Vec<(&str, Value, u16)> = vec![
        ("unknown model", json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}), 404),
        ("no messages", json!({"model": "model-llama"}), 400),
        ("empty messages", json!({"messages": []}), 400),
        ("wrong type", json!({"messages": "Hi"}), 400),
        ("bad role", json!({"messages": [{"role": "tool", "content": "Hi"}]}), 400),
        ("bad part type", chat_body(json!([{"type": "audio_url", "audio_url": {"url": "x"}}]), 3), 400),
        ("n = 2", json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2}), 400),
        ("temperature -1", json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": -1}), 400),
        ("top_p 0", json!({"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}), 400),
        (
            "top_logprobs 50",
            json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 50}),
            400,
        ),
        ("max_tokens 0", json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}), 400),
        ("stop of wrong type", json!({"messages": [{"role": "user", "content": "Hi"}], "stop": 5}), 400),
        ("data URI that is not an image", image(&not_image), 400),
        ("data URI not base64", image("data:image/png,hello"), 400),
        ("bad base64", image("data:image/png;base64,!!!!"), 400),
        ("http URL that is not an image", image(&format!("{text_server}/x.png")), 400),
        ("private-network URL", image("http://127.0.0.1:9/x.png"), 400),
        ("link-local URL", image("http://169.254.169.254/latest/meta-data"), 400),
        ("IPv6 loopback URL", image("http://[::1]:9/x.png"), 400),
        ("unsupported scheme", image("ftp://example.com/x.png"), 400),
        ("path outside the allowed dir (absolute)", image(outside.join("secret.png").to_str().unwrap()), 403),
        ("path outside the allowed dir (..)", image("../../../../../../etc/passwd"), 403),
        ("file URL outside the allowed dir", image(&format!("file://{}", outside.join("secret.png").display())), 403),
        ("missing file inside the allowed dir", image("nope.png"), 400),
        ("text file as an image", image("notes.txt"), 400),
        ("text file as a video", video("notes.txt"), 400),
        ("data URI that is not a video", video(&not_image), 400),
        ("placeholder in text without media", chat_body(json!("Look: <image> what is it?"), 3), 400),
        (
            "more placeholders than media",
            chat_body(
                json!([
                    {"type": "image_url", "image_url": {"url": "ok.png"}},
                    {"type": "text", "text": "and <image> and <video>"},
                ]),
                3,
            ),
            400,
        ),
        (
            "streaming with a bad image",
            {
                let mut b = image(&not_image);
                b["stream"] = json!(true);
                b
            },
            400,
        ),
    ];
    #[cfg(unix)]
    cases.push(("symlink out of the allowed dir", image("escape.png"), 403));
    for (what, body, want) in cases {
        let (status, resp) = post(&base, &body);
        assert_error(status, &resp, want, what);
        if what == "unknown model" {
            assert_eq!(resp["error"]["code"], "model_not_found");
        }
    }
    let (status, body) = get(&base, "/v1/nope");
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(&base, "/v1/chat/completions");
    assert_error(status, &serde_json::from_str(&body).unwrap(), 405, "GET on the completions route");

    // The server still answers, also with a local file under the allowed directory.
    let (status, resp) = post(&base, &image("ok.png"));
    assert_eq!(status, 200, "{resp}");
    let (status, resp2) = post(&base, &image(allowed.join("ok.png").to_str().unwrap()));
    assert_eq!(status, 200, "{resp2}");
    assert_eq!(resp["choices"][0]["message"]["content"], resp2["choices"][0]["message"]["content"]);
    let (_, metrics) = get(&base, "/metrics");
    assert!(metrics.contains("videollava_requests_total{route=\"/v1/chat/completions\",status=\"400\"}"), "{metrics}");
    assert!(
        metrics.contains("videollava_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2"),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&allowed);
    let _ = std::fs::remove_dir_all(&outside);
}

#[test]
fn media_limits() {
    let config = ServerConfig {
        limits: Limits {
            max_media_bytes: 4000,
            max_pixels: 100,
            max_video_frames: 3,
            fetch_timeout: Duration::from_millis(500),
            ..Limits::default()
        },
        allow_private_media_urls: true,
        ..ServerConfig::default()
    };
    let server = start(config);
    let png_server = tiny_http_server(std::fs::read(media_path("landscape.png")).unwrap(), "image/png");
    // A server that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/x.png", silent.local_addr().unwrap());
    let image = |url: String| {
        chat_body(json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]), 3)
    };
    let video = |url: String| {
        chat_body(json!([{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "?"}]), 3)
    };
    // landscape.png is 7440 bytes: over 4000.
    let (status, body) = post(&server.base, &image(data_uri("landscape.png", "image/png")));
    assert_error(status, &body, 413, "media over the byte limit");
    // portrait.jpg is 2276 bytes but has more than 100 pixels.
    let (status, body) = post(&server.base, &image(data_uri("portrait.jpg", "image/jpeg")));
    assert_error(status, &body, 400, "image over the pixel limit");
    // short.webm is small but its frames are over 100 pixels / it has more than 3 frames.
    let (status, body) = post(&server.base, &video(data_uri("short.webm", "video/webm")));
    assert_error(status, &body, 400, "video over the limits");
    // A fetched body over the byte limit, and a fetch over the time limit.
    let (status, body) = post(&server.base, &image(format!("{png_server}/landscape.png")));
    assert_error(status, &body, 413, "fetched media over the byte limit");
    let t = std::time::Instant::now();
    let (status, body) = post(&server.base, &image(silent_url));
    assert_error(status, &body, 400, "fetch over the time limit");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(silent);
    let (status, _) = post(&server.base, &chat_body(json!("Hi"), 2));
    assert_eq!(status, 200);
}

#[test]
fn remote_media_over_http() {
    let png = std::fs::read(media_path("landscape.png")).unwrap();
    let mp4 = std::fs::read(media_path("clip.mp4")).unwrap();
    let img_server = tiny_http_server(png, "image/png");
    let vid_server = tiny_http_server(mp4, "video/mp4");
    let server = start(ServerConfig { allow_private_media_urls: true, ..ServerConfig::default() });
    let q = |kind: &str, url: String| {
        chat_body(json!([{"type": kind, kind: {"url": url}}, {"type": "text", "text": "Describe it."}]), 6)
    };
    let (status, remote) = post(&server.base, &q("image_url", format!("{img_server}/landscape.png")));
    assert_eq!(status, 200, "{remote}");
    let (_, inline) = post(&server.base, &q("image_url", data_uri("landscape.png", "image/png")));
    assert_eq!(remote["choices"][0]["message"], inline["choices"][0]["message"]);
    let (status, remote) = post(&server.base, &q("video_url", format!("{vid_server}/clip.mp4")));
    assert_eq!(status, 200, "{remote}");
    let (_, inline) = post(&server.base, &q("video_url", data_uri("clip.mp4", "video/mp4")));
    assert_eq!(remote["choices"][0]["message"], inline["choices"][0]["message"]);
    // Nothing listens there: a 400 naming the fetch failure.
    let (status, body) = post(&server.base, &q("image_url", "http://127.0.0.1:9/x.png".into()));
    assert_error(status, &body, 400, "connection refused");
}

#[test]
fn a_prompt_over_the_context_length_is_refused() {
    let dir = temp_dir("ctx64");
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(config.contains("\"max_position_embeddings\": 4096"));
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"max_position_embeddings\": 4096", "\"max_position_embeddings\": 64"),
    )
    .unwrap();
    let server = start_with(
        ServerConfig { served_model_name: Some("model-llama".into()), ..ServerConfig::default() },
        &dir,
        SchedulerConfig { max_batch_size: 4, max_queue: 8, ..Default::default() },
    );
    let long = "word ".repeat(200);
    let (status, body) = post(&server.base, &chat_body(json!(long), 4));
    assert_error(status, &body, 400, "prompt over the context");
    let mut b = chat_body(json!(long), 4);
    b["stream"] = json!(true);
    let s = stream(&server.base, &b);
    assert_error(s.status, &s.error, 400, "streamed prompt over the context");
    let (status, body) = post(&server.base, &chat_body(json!("Hi"), 4));
    assert_eq!(status, 200, "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_queue_answers_429() {
    let server = start_with(
        ServerConfig::default(),
        &model_dir(),
        SchedulerConfig { max_batch_size: 1, max_queue: 1, ..Default::default() },
    );
    let mut long = chat_body(json!("Go on and on."), 3000);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    // Each client holds its stream open until told to go away.
    let open = |body: &Value| {
        let base = server.base.clone();
        let body = body.clone();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            let resp = agent()
                .post(&format!("{base}/v1/chat/completions"))
                .header("content-type", "application/json")
                .send(serde_json::to_vec(&body).unwrap().as_slice())
                .unwrap();
            let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut reader, &mut line);
            let _ = rx.recv_timeout(Duration::from_secs(60));
            // the reader drops here: disconnect
        });
        (h, tx)
    };
    let (a, stop_a) = open(&long);
    wait_until("a running request", Duration::from_secs(20), || running(&server.base).0 == 1);
    let (b, stop_b) = open(&long);
    wait_until("a queued request", Duration::from_secs(20), || running(&server.base).1 == 1);
    let (status, body) = post(&server.base, &chat_body(json!("Hi"), 2));
    assert_error(status, &body, 429, "queue full");
    stop_a.send(()).unwrap();
    wait_until("the queued request to run", Duration::from_secs(20), || running(&server.base) == (1, 0));
    stop_b.send(()).unwrap();
    a.join().unwrap();
    b.join().unwrap();
    wait_until("an idle scheduler", Duration::from_secs(30), || running(&server.base) == (0, 0));
    let (status, _) = post(&server.base, &chat_body(json!("Hi"), 2));
    assert_eq!(status, 200);
}

#[test]
fn request_timeout() {
    let config = ServerConfig {
        limits: Limits { request_timeout: Duration::from_millis(300), ..Limits::default() },
        ..ServerConfig::default()
    };
    let server = start(config);
    let mut body = chat_body(json!("Go on and on."), 3000);
    body["ignore_eos"] = json!(true);
    let (status, resp) = post(&server.base, &body);
    assert_eq!(status, 504, "{resp}");
    assert_eq!(resp["error"]["code"], "timeout");
    wait_until("an idle scheduler", Duration::from_secs(30), || running(&server.base) == (0, 0));
}

#[test]
fn models_health_and_metrics() {
    let server = start(ServerConfig::default());
    let (status, body) = get(&server.base, "/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "model-llama");
    assert_eq!(v["data"][0]["object"], "model");
    let (status, _) = get(&server.base, "/v1/models/model-llama");
    assert_eq!(status, 200);
    let (status, _) = get(&server.base, "/v1/models/other");
    assert_eq!(status, 404);
    let (status, body) = get(&server.base, "/health");
    assert_eq!(status, 200);
    assert!(body.contains("\"ok\""));
    let resp = agent().get(&format!("{}/health", server.base)).header("x-request-id", "my-id-1").call().unwrap();
    assert_eq!(resp.headers().get("x-request-id").unwrap(), "my-id-1");
    let resp = agent().get(&format!("{}/health", server.base)).call().unwrap();
    assert!(resp.headers().get("x-request-id").is_some());
    let (status, _) = post(&server.base, &chat_body(json!("Hi"), 3));
    assert_eq!(status, 200);
    // The scheduler drops the finished row from its batch just after it sends the last event, so
    // the gauge can still read 1 when the response has arrived: it must settle to 0, and soon.
    wait_until("an idle scheduler", Duration::from_secs(10), || running(&server.base) == (0, 0));
    let (status, m) = get(&server.base, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "videollava_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
        "videollava_prompt_tokens_total",
        "videollava_generated_tokens_total",
        "videollava_time_to_first_token_seconds_count 1",
        "videollava_request_latency_seconds_count 1",
        "videollava_queue_depth 0",
        "videollava_running_requests 0",
        "videollava_batch_shared_positions 0",
        "videollava_batch_shared_position_reads_total 0",
    ] {
        assert!(m.contains(name), "{name} in {m}");
    }
}

#[test]
fn graceful_shutdown_lets_running_streams_finish() {
    let mut server = start(ServerConfig::default());
    let base = server.base.clone();
    let mut body = chat_body(json!("Keep talking."), 400);
    body["ignore_eos"] = json!(true);
    body["stream"] = json!(true);
    let client = std::thread::spawn(move || stream(&base, &body));
    wait_until("a running request", Duration::from_secs(20), || running(&server.base).0 == 1);
    server.stop();
    let s = client.join().unwrap();
    assert_eq!(s.status, 200);
    assert!(s.done, "the running stream finished with [DONE]");
    assert_eq!(s.chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    // No new connections once the running request is done.
    wait_until("the listener to close", Duration::from_secs(20), || {
        agent().get(&format!("{}/health", server.base)).call().is_err()
    });
}

/// A conversation's second turn resends the first (video included, as a data URI): it reuses
/// the first turn's keys/values (a prefix-cache hit in `/metrics`, cached tokens in `usage`)
/// and answers what `Engine::generate` (no prefix cache) answers.
#[test]
fn a_second_turn_about_the_same_video_reuses_the_first_turns_prefix() {
    // Prefix hits are cut to whole prefill chunks: small ones for the tiny prompts.
    const CHUNK: usize = 16;
    let mut e = load_engine(&model_dir());
    e.model_mut().set_prefill_chunk(CHUNK);
    let server = start_engine(
        ServerConfig::default(),
        e,
        SchedulerConfig { max_batch_size: 8, max_queue: 64, ..Default::default() },
    );
    let engine = load_engine(&model_dir());
    let video = decode_video_file(&media_path("clip.mp4"), &VideoOptions::default()).unwrap();
    let turn1 = json!([
        {"type": "video_url", "video_url": {"url": data_uri("clip.mp4", "video/mp4")}},
        {"type": "text", "text": "Why is this video funny?"},
    ]);
    let (status, first) = post(&server.base, &chat_body(turn1.clone(), 8));
    assert_eq!(status, 200, "{first}");
    let answer = first["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let metric = |m: &str, name: &str| -> u64 {
        m.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let (_, m1) = get(&server.base, "/metrics");
    let (hits1, reused1) =
        (metric(&m1, "videollava_prefix_cache_hits_total"), metric(&m1, "videollava_prefix_cache_reused_tokens_total"));
    assert!(metric(&m1, "videollava_prefix_cache_bytes") > 0, "the first turn is kept: {m1}");
    let media_hits1 = metric(&m1, "videollava_media_cache_hits_total");

    let messages = json!([
        {"role": "user", "content": turn1},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what happens next?"},
    ]);
    let (status, second) = post(&server.base, &json!({"model": "model-llama", "messages": messages, "max_tokens": 8}));
    assert_eq!(status, 200, "{second}");
    let want = solo(
        &engine,
        &[
            ChatMessage::new("user", vec![ContentPart::Video, ContentPart::Text("Why is this video funny?".into())]),
            ChatMessage::assistant(&answer),
            ChatMessage::new("user", vec![ContentPart::Text("And what happens next?".into())]),
        ],
        &[],
        std::slice::from_ref(&video),
        8,
    );
    assert_eq!(second["choices"][0]["message"]["content"].as_str().unwrap(), want.text);
    let (_, m2) = get(&server.base, "/metrics");
    assert_eq!(metric(&m2, "videollava_prefix_cache_hits_total"), hits1 + 1, "{m2}");
    assert!(
        metric(&m2, "videollava_media_cache_hits_total") > media_hits1,
        "the resent video is not decoded again: {m2}"
    );
    let reused = metric(&m2, "videollava_prefix_cache_reused_tokens_total") - reused1;
    // At least the whole chunks the first turn's video fills are reused.
    let video_positions = engine.processor().process(&["<video>"], &[], std::slice::from_ref(&video)).unwrap().seq_len;
    let floor = (video_positions / CHUNK) * CHUNK;
    assert!(reused as usize >= floor && reused > 0, "reused {reused} positions, the video alone is {video_positions}");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(cached, reused);
}
