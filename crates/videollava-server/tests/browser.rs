//! The web page at `/` in a real browser: headless Chromium (Debian's `chromium`) driven over
//! WebDriver (`chromedriver`, Debian's `chromium-driver`; `scripts/install-system-deps.sh`
//! installs both) against a server on the tiny checkpoint on loopback.
//!
//! Without Chromium the test skips with a message, or fails when `CI` is set. With
//! `VIDEOLLAVA_SCREENSHOTS=<dir>` it also saves the page's screenshots (desktop and phone width)
//! there (`docs/web-ui-*.png` are made this way).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use videollava::media::video::{decode_video_file, VideoOptions};
use videollava_server::ServerConfig;

/// The WebDriver key code of Enter.
const ENTER: &str = "\u{E007}";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `chromedriver` (child process) and one headless Chromium session; both end on drop.
struct Browser {
    driver: Child,
    session: String,
    agent: ureq::Agent,
    profile: PathBuf,
}

/// The program named by `env`, else the first candidate that exists; None when that is no file.
fn find_program(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    match std::env::var_os(env) {
        Some(p) => Some(PathBuf::from(p)),
        None => candidates.iter().map(PathBuf::from).find(|p| p.is_file()),
    }
    .filter(|p| p.is_file())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; None (after a message) when they are not
    /// installed and `CI` is unset.
    fn start() -> Option<Browser> {
        let chromium = find_program("VIDEOLLAVA_CHROMIUM", &["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
        let driver = find_program("VIDEOLLAVA_CHROMEDRIVER", &["/usr/bin/chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let msg = "chromium and chromedriver are not installed (scripts/install-system-deps.sh installs them)";
            if std::env::var_os("CI").is_some() {
                panic!("{msg}; CI is set, so the browser test fails");
            }
            eprintln!("SKIPPED browser test: {msg}");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .proxy(None)
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let base = format!("http://127.0.0.1:{port}");
        let mut browser =
            Browser { driver: child, session: String::new(), agent, profile: temp_dir("chromium-profile") };
        wait_until("chromedriver to listen", Duration::from_secs(30), || {
            browser.agent.get(&format!("{base}/status")).call().is_ok_and(|r| r.status().as_u16() == 200)
        });
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                    "--no-proxy-server", "--window-size=1280,800", "--hide-scrollbars",
                    format!("--user-data-dir={}", browser.profile.display()),
                ],
            },
        }}});
        let v = browser.call("POST", &format!("{base}/session"), Some(caps));
        browser.session = format!(
            "{base}/session/{}",
            v["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {v}"))
        );
        Some(browser)
    }

    /// One WebDriver command; returns its `value`, panics on a WebDriver error.
    fn call(&self, method: &str, url: &str, body: Option<Value>) -> Value {
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(url).call(),
            ("DELETE", _) => self.agent.delete(url).call(),
            (_, body) => self
                .agent
                .post(url)
                .header("content-type", "application/json")
                .send(serde_json::to_vec(&body.unwrap_or(json!({}))).unwrap().as_slice()),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("WebDriver {method} {url}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("WebDriver answered {text}"));
        assert_eq!(status, 200, "WebDriver {method} {url}: {v}");
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": args})))
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_string()
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/click"), None);
    }

    /// Types `text` into the element (for a file input: attaches the file at that path).
    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/value"), Some(json!({"text": text})));
    }

    fn clear_and_type(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/clear"), None);
        self.cmd("POST", &format!("/element/{id}/value"), Some(json!({"text": text})));
    }

    fn text(&self, css: &str) -> String {
        self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", json!([css]))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until `script` returns true (polled, bounded).
    fn wait_js(&self, what: &str, timeout: Duration, script: &str, args: Value) {
        let t = Instant::now();
        loop {
            if self.js(script, args.clone()) == json!(true) {
                return;
            }
            assert!(t.elapsed() < timeout, "timed out waiting for {what}; page log: {}", self.text("#log"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// No `alert()` is open (errors are messages in the page).
    fn assert_no_alert(&self) {
        let resp = self.agent.get(&format!("{}/alert/text", self.session)).call().unwrap();
        assert_eq!(resp.status().as_u16(), 404, "an alert is open");
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        eprintln!("wrote {}", path.display());
    }

    /// Makes the viewport `width` x `height` CSS pixels (a phone when `mobile`), through the
    /// DevTools protocol (headless windows cannot be made that narrow).
    fn emulate(&self, width: u32, height: u32, mobile: bool) {
        self.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(json!({"cmd": "Emulation.setDeviceMetricsOverride", "params": {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}})),
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.agent.delete(&self.session).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The state and text of the `n`-th (0-based) answer of the page.
fn answer(b: &Browser, n: usize) -> (String, String, String) {
    let v = b.js(
        "const a = document.querySelectorAll('.msg.assistant')[arguments[0]];
         return a ? [a.dataset.state, a.querySelector('.text').textContent, a.querySelector('.stats').textContent] : null;",
        json!([n]),
    );
    (
        v[0].as_str().unwrap_or_default().to_string(),
        v[1].as_str().unwrap_or_default().to_string(),
        v[2].as_str().unwrap_or_default().to_string(),
    )
}

fn wait_answer_done(b: &Browser, n: usize) -> (String, String) {
    b.wait_js(
        &format!("answer {n} to finish"),
        Duration::from_secs(120),
        "const a = document.querySelectorAll('.msg.assistant')[arguments[0]];
         return !!a && a.dataset.state !== 'streaming';",
        json!([n]),
    );
    let (state, text, stats) = answer(b, n);
    assert_eq!(state, "done", "answer {n}: {text} / {stats}; log: {}", b.text("#log"));
    (text, stats)
}

/// The API's own (non-streamed) answer to `messages` with the page's settings.
fn api_answer(base: &str, messages: Value, max_tokens: u64) -> String {
    let body = json!({"model": "model-llama", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                      "num_frames": 8});
    let (status, v) = post(base, &body);
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

fn metric(base: &str, name: &str) -> f64 {
    let (_, text) = get(base, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

#[test]
fn the_web_page_in_headless_chromium() {
    let Some(b) = Browser::start() else { return };
    // Private media URLs allowed: the URL-paste check fetches from a server on loopback.
    let server = start(ServerConfig { allow_private_media_urls: true, ..ServerConfig::default() });
    let base = server.base.clone();
    b.goto(&format!("{base}/"));
    b.wait_js(
        "the model name",
        Duration::from_secs(20),
        "return document.getElementById('model').textContent === 'model-llama';",
        json!([]),
    );

    // Settings: greedy and short, so that the API's answer to the same request is the same.
    b.click("#settings summary");
    b.clear_and_type("#max-tokens", "24");
    b.clear_and_type("#temperature", "0");

    // A video from the fixtures through the file picker: its 8 frames appear, the model's choice.
    // VIDEOLLAVA_TEST_VIDEO: another .mp4 (the README's screenshots show a real video).
    let clip = std::env::var_os("VIDEOLLAVA_TEST_VIDEO")
        .map(PathBuf::from)
        .unwrap_or_else(|| media_path("clip.mp4"))
        .canonicalize()
        .unwrap();
    let clip_name = clip.file_name().unwrap().to_string_lossy().into_owned();
    let clip_uri = format!(
        "data:video/mp4;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&clip).unwrap())
    );
    b.type_into("#file", &clip.display().to_string());
    b.wait_js(
        "8 loaded thumbnails",
        Duration::from_secs(30),
        "const imgs = document.querySelectorAll('#frames img');
         return imgs.length === 8 && [...imgs].every(i => i.complete && i.naturalWidth > 0);",
        json!([]),
    );
    let shown = b.js(
        "return [...document.querySelectorAll('#frames li')].map(li =>
            [li.querySelector('img').title, li.querySelector('figcaption').textContent]);",
        json!([]),
    );
    let expected = decode_video_file(&clip, &VideoOptions::default()).unwrap();
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), 8);
    for (i, (item, &index)) in shown.iter().zip(&expected.frame_indices).enumerate() {
        let title = item[0].as_str().unwrap();
        assert_eq!(title, format!("frame {index} of {}", expected.total_frames), "thumbnail {i}");
        assert!(item[1].as_str().unwrap().ends_with(" s"), "thumbnail {i} timestamp: {item}");
    }
    assert!(b.text("#frames-caption").contains("these 8 frames"), "{}", b.text("#frames-caption"));

    // First question, sent with Enter; the streamed answer equals the API's for the same request.
    let video = json!({"type": "video_url", "video_url": {"url": clip_uri}});
    let q1 = "What happens in this video?";
    b.type_into("#question", &format!("{q1}{ENTER}"));
    let (a1, stats1) = wait_answer_done(&b, 0);
    assert!(!a1.is_empty());
    assert!(stats1.contains("first token") && stats1.contains("tokens/s"), "{stats1}");
    let m1 = json!([{"role": "user", "content": [video, {"type": "text", "text": q1}]}]);
    assert_eq!(a1, api_answer(&base, m1.clone(), 24), "the page's first answer");

    // Second question in the same conversation: the history (with the video) is sent again.
    let q2 = "And what is the colour of the background?";
    b.type_into("#question", q2);
    b.click("#send");
    let (a2, _) = wait_answer_done(&b, 1);
    let mut m2 = m1.as_array().unwrap().clone();
    m2.push(json!({"role": "assistant", "content": a1}));
    m2.push(json!({"role": "user", "content": q2}));
    assert_eq!(a2, api_answer(&base, Value::Array(m2), 24), "the page's second answer");
    b.assert_no_alert();

    if let Some(dir) = std::env::var_os("VIDEOLLAVA_SCREENSHOTS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        b.emulate(1280, 800, false);
        b.screenshot(&dir.join("web-ui-desktop.png"));
        // A phone's width; the whole page, which scrolls as one column there.
        b.emulate(390, 844, true);
        let height = b.js("return document.documentElement.scrollHeight;", json!([])).as_u64().unwrap();
        b.emulate(390, height.clamp(844, 2400) as u32, true);
        b.screenshot(&dir.join("web-ui-phone.png"));
        b.cmd("POST", "/goog/cdp/execute", Some(json!({"cmd": "Emulation.clearDeviceMetricsOverride", "params": {}})));
    }

    // Stop during a long answer: the server cancels the generation (its running count drops)
    // and the answer never completes (no tokens are counted for it).
    // New chat first: the conversation is forgotten, the video stays attached (and is sent with
    // the next question), so the long answer has nearly the whole context to itself.
    b.click("#new-chat");
    assert_eq!(b.js("return document.querySelectorAll('#log .msg').length;", json!([])), json!(0));
    assert_eq!(b.js("return document.querySelectorAll('#frames img').length;", json!([])), json!(8));
    let generated_before = metric(&base, "videollava_generated_tokens_total");
    b.clear_and_type("#max-tokens", "3900");
    b.type_into("#question", &format!("Describe every frame in detail.{ENTER}"));
    b.wait_js(
        "the long answer to stream",
        Duration::from_secs(60),
        "const a = document.querySelectorAll('.msg.assistant')[0];
         return !!a && a.dataset.state === 'streaming' && a.querySelector('.text').textContent.length > 0;",
        json!([]),
    );
    assert_eq!(metric(&base, "videollava_running_requests"), 1.0, "the long answer runs");
    b.click("#stop");
    wait_until("the running count to drop after Stop", Duration::from_secs(10), || {
        metric(&base, "videollava_running_requests") == 0.0
    });
    let (state, partial, stats) = answer(&b, 0);
    eprintln!("stopped after {} characters of the long answer", partial.chars().count());
    assert_eq!(state, "stopped", "{partial} / {stats}");
    assert!(stats.contains("stopped"), "{stats}");
    assert_eq!(
        metric(&base, "videollava_generated_tokens_total"),
        generated_before,
        "the stopped generation completed instead of being cancelled"
    );
    // The button is ready for the next question.
    assert_eq!(b.js("return document.getElementById('send').disabled;", json!([])), json!(false));

    // New chat during an answer cancels it too, and the conversation stays empty.
    b.type_into("#question", &format!("Go on.{ENTER}"));
    b.wait_js(
        "the next long answer to stream",
        Duration::from_secs(60),
        "const a = document.querySelectorAll('.msg.assistant')[1];
         return !!a && a.dataset.state === 'streaming' && a.querySelector('.text').textContent.length > 0;",
        json!([]),
    );
    b.click("#new-chat");
    wait_until("the running count to drop after New chat", Duration::from_secs(10), || {
        metric(&base, "videollava_running_requests") == 0.0
    });
    b.wait_js(
        "an empty conversation, ready",
        Duration::from_secs(10),
        "return document.querySelectorAll('#log .msg').length === 0 && !document.getElementById('send').disabled;",
        json!([]),
    );
    assert_eq!(metric(&base, "videollava_generated_tokens_total"), generated_before, "a cancelled answer completed");

    // A pasted URL: the server fetches the video and shows its 8 frames.
    let remote = tiny_http_server(std::fs::read(&clip).unwrap(), "video/mp4");
    b.js("document.querySelectorAll('#frames img').forEach(i => i.remove());", json!([]));
    b.type_into("#url", &format!("{remote}/clip.mp4{ENTER}"));
    b.wait_js(
        "8 thumbnails of the pasted URL",
        Duration::from_secs(30),
        "const imgs = document.querySelectorAll('#frames img');
         return imgs.length === 8 && [...imgs].every(i => i.complete && i.naturalWidth > 0)
           && document.getElementById('attached-name').textContent.endsWith('/clip.mp4');",
        json!([]),
    );
    assert_eq!(b.js("return document.querySelectorAll('#log .msg.assistant').length;", json!([])), json!(0));
    // The frames setting: the preview follows it.
    b.clear_and_type("#num-frames", "4\u{E004}"); // Tab: the field commits its value
    b.wait_js(
        "4 thumbnails",
        Duration::from_secs(30),
        "const imgs = document.querySelectorAll('#frames img');
         return imgs.length === 4 && [...imgs].every(i => i.complete && i.naturalWidth > 0);",
        json!([]),
    );
    let expected4 = decode_video_file(&clip, &VideoOptions { num_frames: 4, ..Default::default() }).unwrap();
    let titles = b.js("return [...document.querySelectorAll('#frames img')].map(i => i.title);", json!([]));
    let want: Vec<String> =
        expected4.frame_indices.iter().map(|i| format!("frame {i} of {}", expected4.total_frames)).collect();
    assert_eq!(titles, json!(want));
    b.clear_and_type("#num-frames", "8\u{E004}");

    // An image: shown as itself; the answer is the API's for the same request.
    b.clear_and_type("#max-tokens", "16");
    let picture = media_path("landscape.png").canonicalize().unwrap();
    b.type_into("#file", &picture.display().to_string());
    b.wait_js(
        "the image",
        Duration::from_secs(10),
        "const i = document.getElementById('image');
         return !i.hidden && i.complete && i.naturalWidth > 0 && document.querySelectorAll('#frames img').length === 0;",
        json!([]),
    );
    let q = "What is in the picture?";
    b.type_into("#question", &format!("{q}{ENTER}"));
    let (a, _) = wait_answer_done(&b, 0);
    let image = json!({"type": "image_url", "image_url": {"url": data_uri("landscape.png", "image/png")}});
    let m = json!([{"role": "user", "content": [image, {"type": "text", "text": q}]}]);
    assert_eq!(a, api_answer(&base, m, 16), "the page's answer about the image");

    // An unsupported file: a message in the page, no upload, no alert.
    let dir = temp_dir("web-ui-files");
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "not a video").unwrap();
    let frames_requests = metric(&base, "videollava_requests_total{route=\"/v1/frames\",status=\"200\"}");
    b.type_into("#file", &notes.display().to_string());
    b.wait_js(
        "the unsupported-file message",
        Duration::from_secs(10),
        "const e = document.getElementById('media-error');
         return !e.hidden && e.textContent.includes('notes.txt') && e.textContent.includes('not a video or an image');",
        json!([]),
    );
    b.assert_no_alert();
    // The same by drag and drop (a file dropped on the page).
    b.js("document.getElementById('media-error').hidden = true;", json!([]));
    b.js(
        "const dt = new DataTransfer();
         dt.items.add(new File(['%PDF-1.4'], 'slides.pdf', {type: 'application/pdf'}));
         document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        json!([]),
    );
    b.wait_js(
        "the unsupported-file message after a drop",
        Duration::from_secs(10),
        "const e = document.getElementById('media-error');
         return !e.hidden && e.textContent.includes('slides.pdf') && e.textContent.includes('application/pdf');",
        json!([]),
    );
    // A file that claims to be a video but is not: the server's error, as a message.
    let fake = dir.join("broken.mp4");
    std::fs::write(&fake, vec![0x42u8; 4096]).unwrap();
    b.type_into("#file", &fake.display().to_string());
    b.wait_js(
        "the server's error message",
        Duration::from_secs(20),
        "const e = document.getElementById('media-error');
         return !e.hidden && e.textContent.includes('cannot read this video') && e.textContent.includes('HTTP 400');",
        json!([]),
    );
    // ... and the video is not kept for the conversation.
    assert_eq!(b.js("return document.getElementById('attached').hidden;", json!([])), json!(true));
    b.assert_no_alert();
    assert_eq!(
        metric(&base, "videollava_requests_total{route=\"/v1/frames\",status=\"200\"}"),
        frames_requests,
        "no preview of the unsupported files succeeded"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // The size check before upload, against the server's limit (from /health).
    let small = start(ServerConfig {
        limits: videollava_server::Limits { max_media_bytes: 4096, ..Default::default() },
        ..ServerConfig::default()
    });
    b.goto(&format!("{}/", small.base));
    b.wait_js(
        "the server's limit",
        Duration::from_secs(20),
        "return document.getElementById('max-size').textContent === '4 KB';",
        json!([]),
    );
    b.type_into("#file", &clip.display().to_string());
    b.wait_js(
        "the size message",
        Duration::from_secs(10),
        "const e = document.getElementById('media-error');
         return !e.hidden && e.textContent.includes(arguments[0]) && e.textContent.includes('accepts files up to 4 KB');",
        json!([clip_name]),
    );
    let (_, metrics) = get(&small.base, "/metrics");
    assert!(!metrics.contains("route=\"/v1/frames\""), "the file was uploaded: {metrics}");
    b.assert_no_alert();
}
