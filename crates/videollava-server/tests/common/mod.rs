//! A server on a loopback port with the tiny checkpoint, and a blocking HTTP client (ureq).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use videollava::engine::{DTypeChoice, Engine, Scheduler, SchedulerConfig};
use videollava::generate::{GenerateOptions, GeneratedSequence};
use videollava::media::{RgbImage, Video};
use videollava::processor::chat::{apply_chat_template, ChatMessage};
use videollava_server::{AppState, ServerConfig};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../videollava/tests/fixtures")
}

pub fn model_dir() -> PathBuf {
    fixtures().join("checkpoints/model-llama")
}

pub fn media_path(name: &str) -> PathBuf {
    fixtures().join("media").join(name)
}

pub fn data_uri(name: &str, mime: &str) -> String {
    let bytes = std::fs::read(media_path(name)).unwrap();
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

pub fn load_engine(dir: &Path) -> Engine {
    Engine::load(dir, DTypeChoice::F32, &candle_core::Device::Cpu).expect("load the tiny checkpoint")
}

/// A running server; stops (without waiting) when dropped.
pub struct TestServer {
    pub base: String,
    pub scheduler: Scheduler,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    /// Starts the graceful shutdown: no new connections, running requests finish.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn start(config: ServerConfig) -> TestServer {
    start_with(config, &model_dir(), SchedulerConfig { max_batch_size: 8, max_queue: 64, ..Default::default() })
}

pub fn start_with(config: ServerConfig, dir: &Path, sched: SchedulerConfig) -> TestServer {
    start_engine(config, load_engine(dir), sched)
}

/// A server over an engine set up by the caller.
pub fn start_engine(config: ServerConfig, engine: Engine, sched: SchedulerConfig) -> TestServer {
    let scheduler = Scheduler::start(engine, sched);
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s2 = scheduler.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let state = AppState::new(config, s2);
            videollava_server::serve_on(listener, state, async move {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("server started");
    TestServer { base: format!("http://{addr}"), scheduler, stop: Some(stop_tx) }
}

pub fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .proxy(None)
        .build();
    ureq::Agent::new_with_config(config)
}

/// POSTs raw bytes; returns the status and the body parsed as JSON (Null when it is not JSON).
pub fn post_raw(base: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let mut resp = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(&body[..])
        .expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub fn post(base: &str, body: &Value) -> (u16, Value) {
    post_raw(base, "/v1/chat/completions", serde_json::to_vec(body).unwrap())
}

pub fn get(base: &str, path: &str) -> (u16, String) {
    let mut resp = agent().get(&format!("{base}{path}")).call().expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// A streamed completion: its status, the JSON chunks (or the error body) and whether the
/// stream ended with `data: [DONE]`.
pub struct Streamed {
    pub status: u16,
    pub chunks: Vec<Value>,
    pub done: bool,
    pub error: Value,
}

impl Streamed {
    pub fn text(&self) -> String {
        self.chunks
            .iter()
            .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["delta"]["content"].as_str()).map(str::to_string))
            .collect()
    }
}

pub fn stream(base: &str, body: &Value) -> Streamed {
    let resp = agent()
        .post(&format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(serde_json::to_vec(body).unwrap().as_slice())
        .expect("request sent");
    let status = resp.status().as_u16();
    let is_sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut reader = BufReader::new(resp.into_body().into_reader());
    if !is_sse {
        let mut s = String::new();
        let _ = reader.read_to_string(&mut s);
        return Streamed {
            status,
            chunks: vec![],
            done: false,
            error: serde_json::from_str(&s).unwrap_or(Value::Null),
        };
    }
    let mut chunks = Vec::new();
    let mut done = false;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let l = line.trim_end();
        if let Some(data) = l.strip_prefix("data: ") {
            assert!(!done, "data after [DONE]");
            if data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(data).expect("chunk is JSON"));
            }
        }
    }
    Streamed { status, chunks, done, error: Value::Null }
}

/// The scheduler's running count as `/health` reports it.
pub fn running(base: &str) -> (u64, u64) {
    let (_, body) = get(base, "/health");
    let v: Value = serde_json::from_str(&body).unwrap();
    (v["running"].as_u64().unwrap(), v["queue_depth"].as_u64().unwrap())
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts an OpenAI-style error body.
pub fn assert_error(status: u16, body: &Value, expected: u16, what: &str) {
    assert_eq!(status, expected, "{what}: status (body {body})");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: error.message in {body}");
    assert!(e["type"].is_string(), "{what}: error.type in {body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: error.param/code in {body}");
}

/// What `Engine::generate` gives alone for `messages` (greedy).
pub fn solo(
    engine: &Engine,
    messages: &[ChatMessage],
    images: &[RgbImage],
    videos: &[Video],
    max_tokens: usize,
) -> GeneratedSequence {
    let tok = engine.tokenizer();
    let name = |id: Option<u32>| tok.token_name(id);
    let prompt = apply_chat_template(
        tok.chat_template.as_deref(),
        messages,
        true,
        &name(tok.bos_token_id),
        &name(tok.eos_token_id),
    )
    .unwrap();
    let options = GenerateOptions { max_new_tokens: max_tokens, top_logprobs: 3, ..engine.default_options() };
    engine.generate(&[prompt.as_str()], images, videos, &options, &mut |_| {}).unwrap().0.remove(0)
}

pub fn chat_body(content: Value, max_tokens: usize) -> Value {
    json!({"model": "model-llama", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

/// A one-shot HTTP/1.1 server on 127.0.0.1 answering every request with `body`.
pub fn tiny_http_server(body: Vec<u8>, content_type: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            });
        }
    });
    format!("http://{addr}")
}

/// A fresh temporary directory (removed by the caller if it wants).
pub fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let d = std::env::temp_dir().join(format!("videollava-server-test-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
