//! Hostile input against `videollava serve` run as a separate process (issue 13): every attack
//! is generated here, must be refused with a 4xx naming the problem, must leave the server
//! answering, and all together must grow the server's peak resident memory (VmHWM, read from
//! `/proc/<pid>/status`) by less than 1 GB.

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../videollava/tests/fixtures")
}

/// A fresh directory for one test, removed when dropped (also when the test fails).
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(test: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("videollava-hostile-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// A `videollava serve` child on a loopback port; killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(model: &Path, allowed: &Path, extra: &[&str]) -> Server {
        // `VIDEOLLAVA_BIN` runs the same attacks against another build (the "before" numbers).
        let bin = std::env::var("VIDEOLLAVA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_videollava").to_string());
        let mut child = Command::new(bin)
            .args(["serve", "--model", model.to_str().unwrap(), "--host", "127.0.0.1", "--port", "0"])
            .args(["--allowed-media-dir", allowed.to_str().unwrap()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start videollava serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on http://") {
                    let addr = line[at + "listening on http://".len()..].split_whitespace().next().unwrap().to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(120)).expect("the server starts listening within 120 s");
        Server { child, base: format!("http://{addr}") }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `VmHWM` / `VmRSS` of the server process, in kB.
    fn mem_kb(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("server process alive");
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn post(base: &str, body: &Value) -> (u16, Value, Duration) {
    let t = Instant::now();
    let mut resp = agent()
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(serde_json::to_vec(body).unwrap())
        .expect("the server answers");
    let status = resp.status().as_u16();
    let text = resp.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), t.elapsed())
}

fn health(base: &str) -> u16 {
    agent().get(format!("{base}/health")).call().map(|r| r.status().as_u16()).unwrap_or(0)
}

fn message(v: &Value) -> String {
    v["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn request(parts: Vec<Value>) -> Value {
    let mut content = parts;
    content.push(json!({"type": "text", "text": "describe"}));
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0})
}

fn image(url: String) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn video(url: String) -> Value {
    json!({"type": "video_url", "video_url": {"url": url}})
}

/// A PNG of zeros written row by row (a decompression bomb when large).
fn png(width: u32, height: u32, color: png::ColorType, depth: png::BitDepth) -> Vec<u8> {
    /// The encoder's sink, readable once the encoder is gone.
    #[derive(Clone, Default)]
    struct Sink(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let mut enc = png::Encoder::new(sink.clone(), width, height);
    enc.set_color(color);
    enc.set_depth(depth);
    enc.set_compression(png::Compression::High);
    let mut w = enc.write_header().unwrap().into_stream_writer().unwrap();
    let bytes_per_px = color.samples() * if depth == png::BitDepth::Sixteen { 2 } else { 1 };
    let row = vec![0u8; width as usize * bytes_per_px];
    for _ in 0..height {
        w.write_all(&row).unwrap();
    }
    w.finish().unwrap();
    let out = sink.0.borrow().clone();
    out
}

/// A Y4M video of grey 4:2:0 frames (FFmpeg's yuv4mpegpipe demuxer, rawvideo decoder).
fn y4m(width: usize, height: usize, frames: usize, fps: &str) -> Vec<u8> {
    let mut v = format!("YUV4MPEG2 W{width} H{height} F{fps} Ip A1:1 C420jpeg\n").into_bytes();
    let size = width * height + 2 * width.div_ceil(2) * height.div_ceil(2);
    for _ in 0..frames {
        v.extend_from_slice(b"FRAME\n");
        v.extend(std::iter::repeat_n(128u8, size));
    }
    v
}

fn expect_4xx(base: &str, what: &str, body: &Value, needles: &[&str]) {
    let (status, v, took) = post(base, body);
    let msg = message(&v);
    eprintln!("{what}: {status} in {:.2} s: {msg}", took.as_secs_f64());
    assert!((400..500).contains(&status), "{what}: expected a 4xx, got {status}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{what}: `{n}` missing from: {msg}");
    }
    assert_eq!(health(base), 200, "{what}: /health after the attack");
}

#[test]
fn hostile_media_is_refused_in_bounded_memory() {
    let allowed = temp_dir("allowed");
    // A real video in the allowed directory, that playlists try to make FFmpeg read.
    std::fs::copy(fixtures().join("media/clip.mp4"), allowed.join("secret.mp4")).unwrap();
    let secret = allowed.join("secret.mp4");
    let server = Server::start(&fixtures().join("checkpoints/model-llama"), &allowed, &[]);
    let base = server.base.clone();

    // Warm up with a valid request (model loaded, allocator pools in place), then measure.
    let ok = request(vec![video("secret.mp4".into())]);
    let (status, v, _) = post(&base, &ok);
    assert_eq!(status, 200, "valid request: {v}");
    let hwm0 = server.mem_kb("VmHWM");

    // 1. Playlists and lists naming local files: refused; the named video is never decoded
    //    (a decoded playlist would make the request succeed).
    let playlists = [
        (
            "HLS, file URL",
            format!("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nfile://{}\n#EXT-X-ENDLIST\n", secret.display()),
        ),
        ("HLS, absolute path", format!("#EXTM3U\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n", secret.display())),
        ("HLS, relative path", "#EXTM3U\n#EXTINF:1.0,\nsecret.mp4\n#EXT-X-ENDLIST\n".to_string()),
        ("ffconcat", format!("ffconcat version 1.0\nfile '{}'\n", secret.display())),
    ];
    for (what, text) in &playlists {
        expect_4xx(
            &base,
            what,
            &request(vec![video(data_uri("application/vnd.apple.mpegurl", text.as_bytes()))]),
            &["refused"],
        );
    }
    // Playlists stored in the allowed directory are refused the same way.
    std::fs::write(allowed.join("list.m3u8"), &playlists[1].1).unwrap();
    expect_4xx(&base, "HLS file in the allowed dir", &request(vec![video("list.m3u8".into())]), &["refused"]);
    let (_, v, _) = post(&base, &request(vec![video("list.m3u8".into())]));
    assert!(!message(&v).contains(allowed.to_str().unwrap()), "the server's paths stay private: {v}");

    // 2. Thin images and frames: refused from the header (aspect ratio), 16 per request.
    let thin = png(16384, 1, png::ColorType::Rgb, png::BitDepth::Eight);
    assert!(thin.len() < 1024, "the thin PNG is tiny ({} bytes)", thin.len());
    expect_4xx(&base, "16 thin PNGs", &request(vec![image(data_uri("image/png", &thin)); 16]), &["aspect ratio"]);
    let thin_video = y4m(2_000_000, 1, 1, "25:1");
    expect_4xx(
        &base,
        "2000000x1 video frame",
        &request(vec![video(data_uri("video/x-yuv4mpeg", &thin_video))]),
        &["2000000x1"],
    );

    // 3. Limits before work: 16-bit RGBA PNG bombs (10000x10000 in under 1 MB each).
    let bomb = png(10000, 10000, png::ColorType::Rgba, png::BitDepth::Sixteen);
    assert!(bomb.len() < 1 << 20, "bomb is {} bytes", bomb.len());
    expect_4xx(
        &base,
        "4 PNG bombs",
        &request(vec![image(data_uri("image/png", &bomb)); 4]),
        &["10000x10000", "over the limit"],
    );
    // Frame count and duration enforced while decoding, whatever the container says (Y4M has
    // no frame count in its header).
    let many = y4m(2, 2, 40_000, "1000:1");
    expect_4xx(&base, "40000 frames", &request(vec![video(data_uri("video/x-yuv4mpeg", &many))]), &["frames"]);
    let slow = y4m(16, 16, 3, "1:3600");
    expect_4xx(&base, "frames an hour apart", &request(vec![video(data_uri("video/x-yuv4mpeg", &slow))]), &["lasts"]);

    // 5. Stop strings bounded.
    let mut body = request(vec![]);
    body["stop"] = json!(vec!["x".repeat(100_000); 16]);
    expect_4xx(&base, "long stop strings", &body, &["stop string"]);

    let hwm1 = server.mem_kb("VmHWM");
    let grown_mb = (hwm1.saturating_sub(hwm0)) as f64 / 1024.0;
    eprintln!("server VmHWM {} -> {} MB (+{grown_mb:.0} MB)", hwm0 / 1024, hwm1 / 1024);
    assert!(grown_mb < 1024.0, "the attacks grew the server's peak memory by {grown_mb:.0} MB");

    // The server still serves valid requests.
    let (status, v, _) = post(&base, &ok);
    assert_eq!(status, 200, "valid request after the attacks: {v}");
}

/// A request whose media cannot fit the context is refused at once, before any decoding: the
/// checkpoint's context is cut to 64 tokens; one video takes 8 x 17 tokens.
#[test]
fn media_over_the_context_is_refused_before_decoding() {
    let dir = temp_dir("small-context");
    let src = fixtures().join("checkpoints/model-llama");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let config_path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["text_config"]["max_position_embeddings"] = json!(64);
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let allowed = temp_dir("small-context-media");
    let server = Server::start(&dir, &allowed, &[]);
    // A video that would fail to decode if it were decoded (not a video at all): the context
    // check must answer first.
    let body = request(vec![video(data_uri("video/mp4", b"not decoded"))]);
    let (status, v, _) = post(&server.base, &body);
    let msg = message(&v);
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("cannot fit") && msg.contains("context"), "{msg}");
}

/// An MJPEG AVI: `frames` copies of one smooth `side`x`side` JPEG. Small per frame, but each
/// costs the decoder a full-size decode.
fn mjpeg_avi(side: usize, frames: usize) -> Vec<u8> {
    let pixels: Vec<u8> = (0..side * side * 3).map(|i| ((i / 3 % side + i / 3 / side) / 16) as u8).collect();
    let image = turbojpeg::Image {
        pixels: &pixels[..],
        width: side,
        pitch: side * 3,
        height: side,
        format: turbojpeg::PixelFormat::RGB,
    };
    let jpeg = turbojpeg::compress(image, 90, turbojpeg::Subsamp::Sub2x2).unwrap().to_vec();
    let u32le = |v: usize| (v as u32).to_le_bytes();
    let chunk = |id: &[u8], data: &[u8]| {
        let mut c = id.to_vec();
        c.extend(u32le(data.len()));
        c.extend(data);
        if data.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    let list = |kind: &[u8], body: &[u8]| chunk(b"LIST", &[kind, body].concat());
    let (n, w) = (frames, side);
    let avih: Vec<u8> =
        [40000, 0, 0, 0, n, 0, 1, jpeg.len(), w, w, 0, 0, 0, 0].iter().flat_map(|&v| u32le(v)).collect();
    let mut strh = b"vidsMJPG".to_vec();
    for v in [0, 0, 0, 1, 25, 0, n, jpeg.len(), u32::MAX as usize, 0, 0, 0] {
        strh.extend(u32le(v));
    }
    let mut strf = Vec::new();
    for v in [40, w, w] {
        strf.extend(u32le(v));
    }
    strf.extend([1, 0, 24, 0]);
    strf.extend(b"MJPG");
    for v in [w * w * 3, 0, 0, 0, 0] {
        strf.extend(u32le(v));
    }
    let strl = list(b"strl", &[chunk(b"strh", &strh), chunk(b"strf", &strf)].concat());
    let hdrl = list(b"hdrl", &[chunk(b"avih", &avih), strl].concat());
    let frame = chunk(b"00dc", &jpeg);
    let movi = list(b"movi", &frame.repeat(frames));
    chunk(b"RIFF", &[&b"AVI "[..], &hdrl, &movi].concat())
}

/// User plus system CPU seconds of a process (`/proc/<pid>/stat`, clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// Media work stops when its request fails, times out or loses its client: the server's CPU
/// time stops growing right after the answer (a video whose decoding alone takes many seconds).
#[test]
fn media_work_stops_with_its_request() {
    let allowed = temp_dir("cancel");
    let video_bytes = mjpeg_avi(2048, 600);
    std::fs::write(allowed.join("long.avi"), &video_bytes).unwrap();
    let server = Server::start(&fixtures().join("checkpoints/model-llama"), &allowed, &["--request-timeout", "2"]);
    let base = server.base.clone();
    let idle_after = |what: &str| {
        std::thread::sleep(Duration::from_millis(500));
        let c1 = cpu_seconds(server.pid());
        std::thread::sleep(Duration::from_secs(2));
        let busy = cpu_seconds(server.pid()) - c1;
        eprintln!("{what}: {busy:.2} s of server CPU in the 2 s after the answer");
        assert!(busy < 0.3, "{what}: the server kept working ({busy:.2} CPU seconds in 2 s)");
    };

    // The decoding really is long: without cancellation the server would stay busy.
    let t = Instant::now();
    let c0 = cpu_seconds(server.pid());
    let (status, v, _) = post(&base, &request(vec![video("long.avi".into())]));
    let busy = cpu_seconds(server.pid()) - c0;
    eprintln!("timeout: {status} after {:.1} s, {busy:.1} CPU s: {}", t.elapsed().as_secs_f64(), message(&v));
    assert_eq!(status, 504, "{v}");
    assert!(busy > 0.4, "the video must keep the decoder busy until the timeout ({busy:.2} CPU s)");
    idle_after("request timeout");

    // One part fails: the other parts stop.
    let parts = vec![video("long.avi".into()), image(data_uri("image/png", b"\x89PNG\r\n\x1a\nbroken"))];
    let (status, v, _) = post(&base, &request(parts));
    assert_eq!(status, 400, "{v}");
    idle_after("a failed part");

    // The client goes away (a server without a short request timeout, so only the disconnect
    // can stop the work).
    drop(server);
    let server = Server::start(&fixtures().join("checkpoints/model-llama"), &allowed, &[]);
    let base = server.base.clone();
    let idle_after = |what: &str| {
        std::thread::sleep(Duration::from_millis(500));
        let c1 = cpu_seconds(server.pid());
        std::thread::sleep(Duration::from_secs(2));
        let busy = cpu_seconds(server.pid()) - c1;
        eprintln!("{what}: {busy:.2} s of server CPU in the 2 s after the answer");
        assert!(busy < 0.3, "{what}: the server kept working ({busy:.2} CPU seconds in 2 s)");
    };
    let quick: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_millis(700))).build().into();
    let r = quick
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(serde_json::to_vec(&request(vec![video("long.avi".into())])).unwrap());
    assert!(r.is_err(), "the client gives up first");
    idle_after("a client that left");
    assert_eq!(health(&base), 200);
}

/// The CLI decodes with the same checks and fails with the same one-line errors.
#[test]
fn the_cli_shares_the_checks() {
    let dir = temp_dir("cli");
    let thin = dir.join("thin.png");
    std::fs::write(&thin, png(16384, 1, png::ColorType::Rgb, png::BitDepth::Eight)).unwrap();
    let bomb = dir.join("bomb.png");
    std::fs::write(&bomb, png(10000, 10000, png::ColorType::Rgba, png::BitDepth::Sixteen)).unwrap();
    let secret = dir.join("secret.mp4");
    std::fs::copy(fixtures().join("media/clip.mp4"), &secret).unwrap();
    let list = dir.join("list.m3u8");
    std::fs::write(&list, format!("#EXTM3U\n#EXTINF:1.0,\nfile://{}\n#EXT-X-ENDLIST\n", secret.display())).unwrap();
    let tall = dir.join("tall.y4m");
    std::fs::write(&tall, y4m(1, 2_000_000, 1, "25:1")).unwrap();
    let out = dir.join("out.safetensors");
    let tiny = fixtures().join("checkpoints/tiny-llama");
    let cases: [(&str, &Path, &[&str]); 4] = [
        ("--image", &thin, &["thin.png", "aspect ratio"]),
        ("--image", &bomb, &["bomb.png", "10000x10000", "over the limit"]),
        ("--video", &list, &["list.m3u8", "playlist", "refused"]),
        ("--video", &tall, &["tall.y4m", "1x2000000"]),
    ];
    for (flag, path, needles) in cases {
        let prompt = if flag == "--image" { "<image> hi" } else { "<video> hi" };
        let t = Instant::now();
        let o = Command::new(env!("CARGO_BIN_EXE_videollava"))
            .args(["preprocess", "--model", tiny.to_str().unwrap(), "--output", out.to_str().unwrap()])
            .args(["--prompt", prompt, flag, path.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        eprintln!("{}: {:.2} s: {}", path.display(), t.elapsed().as_secs_f64(), stderr.trim());
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "`{n}` missing from: {stderr}");
        }
    }
}
