//! `videollava serve` as a user starts it: the web page at `/`, and `--no-web-ui`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `videollava serve` child process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on 127.0.0.1:port: the status code and the body (None when nothing listens yet).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

fn serve(extra: &[&str]) -> (Server, u16) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../videollava/tests/fixtures/checkpoints/model-llama");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_videollava"))
        .args(["serve", "--model", &model.display().to_string(), "--port", &port.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run videollava serve");
    let mut server = Server(child);
    let t = Instant::now();
    while get(port, "/health").map(|(s, _)| s) != Some(200) {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("videollava serve exited: {status}");
        }
        assert!(t.elapsed() < Duration::from_secs(60), "videollava serve did not answer /health");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, port)
}

#[test]
fn serve_has_a_web_page_unless_no_web_ui() {
    let (_on, port) = serve(&[]);
    let (status, body) = get(port, "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("<title>Video-LLaVA</title>"), "{body}");

    let (_off, port) = serve(&["--no-web-ui"]);
    let (status, body) = get(port, "/").unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(get(port, "/app.js").unwrap().0, 404);
    assert_eq!(get(port, "/v1/models").unwrap().0, 200, "the API stays");
}
