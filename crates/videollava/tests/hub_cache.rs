//! `--model` resolution against a Hugging Face cache laid out as `huggingface_hub` and `hf-hub`
//! lay it out (`models--org--name/{refs,snapshots,blobs}`), built in a temporary directory from the
//! tiny checkpoint fixture. The online path runs against a small in-process HTTP server that answers
//! like the hub (`/api/models/...` and `/resolve/...` with the hub's headers); nothing leaves the
//! machine and the process environment is never changed.

use crate::common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use videollava::config::CheckpointConfig;
use videollava::hub::{parse_bool_env, resolve_model, HubOptions, ModelId, DEFAULT_MODEL};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const OTHER_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("videollava-hub-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture_checkpoint() -> PathBuf {
    common::fixtures_dir().join("checkpoints").join("model-llama")
}

/// The fixture checkpoint's files: name to content.
fn fixture_files() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(fixture_checkpoint()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            files.insert(entry.file_name().into_string().unwrap(), std::fs::read(entry.path()).unwrap());
        }
    }
    assert!(files.contains_key("config.json") && files.contains_key("model.safetensors"));
    files
}

/// A content hash standing in for the hub's etag (the blob's name).
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

/// Writes `files` as the snapshot `commit` of `repo_id` in `cache`, as real blobs plus relative
/// symlinks from the snapshot (like the hub cache) when `blobs`, else as plain files. `refs`
/// lists `(revision, commit)` pairs to write. Returns the snapshot directory.
fn write_cached_model(
    cache: &Path,
    repo_id: &str,
    commit: &str,
    files: &BTreeMap<String, Vec<u8>>,
    refs: &[&str],
    blobs: bool,
) -> PathBuf {
    let folder = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = folder.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for (name, bytes) in files {
        let target = snapshot.join(name);
        if blobs {
            let blob = folder.join("blobs").join(etag(bytes));
            std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
            std::fs::write(&blob, bytes).unwrap();
            #[cfg(unix)]
            std::os::unix::fs::symlink(Path::new("../../blobs").join(etag(bytes)), &target).unwrap();
            #[cfg(not(unix))]
            std::fs::write(&target, bytes).unwrap();
        } else {
            std::fs::write(&target, bytes).unwrap();
        }
    }
    for revision in refs {
        let path = folder.join("refs").join(revision);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, commit).unwrap();
    }
    snapshot
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions { cache_dir: cache.to_path_buf(), offline: true, token: None, progress: false, endpoint: None }
}

fn err_string(r: videollava::Result<PathBuf>) -> String {
    let e = r.expect_err("expected an error").to_string();
    assert!(!e.contains('\n'), "error is not one line: {e}");
    e
}

#[test]
fn offline_resolves_the_snapshot_and_it_loads() {
    let tmp = TempDir::new("snap");
    let snapshot = write_cached_model(tmp.path(), "org/name", COMMIT, &fixture_files(), &["main"], true);
    let dir = resolve_model("org/name", &offline(tmp.path())).unwrap();
    assert_eq!(dir, snapshot);
    assert!(dir.ends_with(format!("models--org--name/snapshots/{COMMIT}")));
    let config = CheckpointConfig::from_dir(&dir).unwrap();
    assert_eq!(config.dir, snapshot);
    assert!(dir.join("tokenizer.json").is_file());
    assert!(dir.join("model.safetensors").is_file());
}

#[test]
fn offline_plain_files_without_blobs() {
    let tmp = TempDir::new("plain");
    let snapshot = write_cached_model(tmp.path(), "org/name", COMMIT, &fixture_files(), &["main"], false);
    assert_eq!(resolve_model("org/name", &offline(tmp.path())).unwrap(), snapshot);
}

#[test]
fn offline_revisions_branch_tag_and_commit() {
    let tmp = TempDir::new("rev");
    let files = fixture_files();
    let main = write_cached_model(tmp.path(), "org/name", COMMIT, &files, &["main"], true);
    let tagged = write_cached_model(tmp.path(), "org/name", OTHER_COMMIT, &files, &["v1.0", "refs/pr/2"], true);
    let options = offline(tmp.path());
    assert_eq!(resolve_model("org/name@main", &options).unwrap(), main);
    assert_eq!(resolve_model("org/name@v1.0", &options).unwrap(), tagged);
    assert_eq!(resolve_model("org/name@refs/pr/2", &options).unwrap(), tagged);
    // A commit hash names its snapshot directly: there is no refs/<hash>.
    assert_eq!(resolve_model(&format!("org/name@{COMMIT}"), &options).unwrap(), main);
    assert_eq!(resolve_model(&format!("org/name@{OTHER_COMMIT}"), &options).unwrap(), tagged);
    // A ref file with a trailing newline (written by hand or by other tools) still works.
    std::fs::write(tmp.path().join("models--org--name/refs/main"), format!("{OTHER_COMMIT}\n")).unwrap();
    assert_eq!(resolve_model("org/name", &options).unwrap(), tagged);

    let e = err_string(resolve_model("org/name@v2", &options));
    assert!(e.contains("org/name@v2") && e.contains("revision `v2`"), "{e}");
}

#[test]
fn offline_unknown_model_is_a_clear_error() {
    let tmp = TempDir::new("unknown");
    write_cached_model(tmp.path(), "org/name", COMMIT, &fixture_files(), &["main"], true);
    let e = err_string(resolve_model("org/other", &offline(tmp.path())));
    assert!(e.contains("`org/other`"), "{e}");
    assert!(e.contains("local cache") && e.contains(&tmp.path().display().to_string()), "{e}");
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    let e = err_string(resolve_model(DEFAULT_MODEL, &offline(&tmp.path().join("empty"))));
    assert!(e.contains(DEFAULT_MODEL), "{e}");
}

#[test]
fn offline_missing_required_file_is_named() {
    let tmp = TempDir::new("missing");
    let mut files = fixture_files();
    files.remove("tokenizer.json");
    write_cached_model(tmp.path(), "org/name", COMMIT, &files, &["main"], true);
    let e = err_string(resolve_model("org/name", &offline(tmp.path())));
    assert!(e.contains("`org/name`") && e.contains("HF_HUB_OFFLINE"), "{e}");
    assert!(e.contains("missing tokenizer.json"), "{e}");

    // A snapshot symlink whose blob is gone counts as missing.
    let tmp = TempDir::new("dangling");
    let files = fixture_files();
    write_cached_model(tmp.path(), "org/name", COMMIT, &files, &["main"], true);
    std::fs::remove_file(tmp.path().join("models--org--name/blobs").join(etag(&files["config.json"]))).unwrap();
    let e = err_string(resolve_model("org/name", &offline(tmp.path())));
    assert!(e.contains("missing config.json"), "{e}");

    // No weights at all.
    let tmp = TempDir::new("noweights");
    let mut files = fixture_files();
    files.remove("model.safetensors");
    write_cached_model(tmp.path(), "org/name", COMMIT, &files, &["main"], true);
    let e = err_string(resolve_model("org/name", &offline(tmp.path())));
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn offline_optional_files_may_be_absent() {
    let tmp = TempDir::new("optional");
    let mut files = fixture_files();
    for f in ["generation_config.json", "processor_config.json", "special_tokens_map.json"] {
        files.remove(f);
    }
    let snapshot = write_cached_model(tmp.path(), "org/name", COMMIT, &files, &["main"], true);
    let dir = resolve_model("org/name", &offline(tmp.path())).unwrap();
    assert_eq!(dir, snapshot);
    CheckpointConfig::from_dir(&dir).unwrap();
}

fn sharded_files() -> BTreeMap<String, Vec<u8>> {
    let mut files = fixture_files();
    let weights = files.remove("model.safetensors").unwrap();
    files.insert("model-00001-of-00002.safetensors".into(), weights.clone());
    files.insert("model-00002-of-00002.safetensors".into(), weights);
    let index = serde_json::json!({
        "metadata": {"total_size": 0},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
            "c.weight": "model-00001-of-00002.safetensors"
        }
    });
    files.insert("model.safetensors.index.json".into(), serde_json::to_vec(&index).unwrap());
    files
}

#[test]
fn offline_sharded_weights_need_every_shard() {
    let tmp = TempDir::new("sharded");
    let files = sharded_files();
    let snapshot = write_cached_model(tmp.path(), "org/sharded", COMMIT, &files, &["main"], true);
    assert_eq!(resolve_model("org/sharded", &offline(tmp.path())).unwrap(), snapshot);

    let mut files = sharded_files();
    files.remove("model-00002-of-00002.safetensors");
    write_cached_model(tmp.path(), "org/partial", COMMIT, &files, &["main"], true);
    let e = err_string(resolve_model("org/partial", &offline(tmp.path())));
    assert!(e.contains("missing model-00002-of-00002.safetensors"), "{e}");
    assert!(!e.contains("00001"), "{e}");
}

#[test]
fn local_directories() {
    let tmp = TempDir::new("local");
    let options = offline(tmp.path());
    let fixture = fixture_checkpoint();
    let spec = fixture.to_str().unwrap();
    assert_eq!(resolve_model(spec, &options).unwrap(), fixture);
    // Online options do not matter for a local directory: nothing is fetched.
    let online = HubOptions { offline: false, endpoint: Some("http://127.0.0.1:1".into()), ..options.clone() };
    assert_eq!(resolve_model(spec, &online).unwrap(), fixture);

    // A relative directory of the form `a/b` is local, not a hub id, when it exists.
    let cwd_relative = Path::new("tests/fixtures");
    if cwd_relative.is_dir() {
        assert_eq!(resolve_model("tests/fixtures", &options).unwrap(), cwd_relative);
    }

    let missing = tmp.path().join("no/such/checkpoint");
    let e = err_string(resolve_model(missing.to_str().unwrap(), &options));
    assert!(e.contains("does not exist") && e.contains("no/such/checkpoint"), "{e}");
    let e = err_string(resolve_model("no-such-checkpoint", &options));
    assert!(e.contains("does not exist"), "{e}");
    let file = fixture.join("config.json");
    let e = err_string(resolve_model(file.to_str().unwrap(), &options));
    assert!(e.contains("not a checkpoint directory"), "{e}");
}

#[test]
fn model_id_parsing() {
    assert_eq!(ModelId::parse(DEFAULT_MODEL), Some(ModelId { repo_id: DEFAULT_MODEL.into(), revision: "main".into() }));
    assert_eq!(ModelId::parse("org/name@v1").unwrap().revision, "v1");
    for bad in ["", "name", "a/b/c", "/abs", "org/", "/name", "org/name@", "org name/x", "./x", "../x"] {
        assert_eq!(ModelId::parse(bad), None, "{bad}");
    }
}

#[test]
fn offline_flag_values() {
    for v in ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " 1 "] {
        assert!(parse_bool_env(Some(v)), "{v}");
    }
    for v in ["", "0", "false", "no", "off", "2", "y", "enabled"] {
        assert!(!parse_bool_env(Some(v)), "{v}");
    }
    assert!(!parse_bool_env(None));
}

#[test]
fn options_from_variables() {
    let tmp = TempDir::new("vars");
    let hf_home = tmp.path().join("hf");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_file_token\n").unwrap();
    let home = Some(tmp.path().join("home"));
    let hf_home_s = hf_home.to_str().unwrap().to_string();

    let vars = |pairs: Vec<(&'static str, String)>| {
        move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    };
    let o = HubOptions::from_vars(vars(vec![("HF_HOME", hf_home_s.clone())]), home.clone());
    assert_eq!(o.cache_dir, hf_home.join("hub"));
    assert_eq!(o.token.as_deref(), Some("hf_file_token"));
    assert!(!o.offline && o.progress);

    let o = HubOptions::from_vars(
        vars(vec![
            ("HF_HOME", hf_home_s.clone()),
            ("HF_HUB_CACHE", "/elsewhere".into()),
            ("HF_TOKEN", "hf_env_token".into()),
            ("HF_HUB_OFFLINE", "ON".into()),
        ]),
        home.clone(),
    );
    assert_eq!(o.cache_dir, PathBuf::from("/elsewhere"));
    assert_eq!(o.token.as_deref(), Some("hf_env_token"));
    assert!(o.offline);

    let o = HubOptions::from_vars(vars(vec![("HF_HUB_OFFLINE", "0".into())]), home.clone());
    assert_eq!(o.cache_dir, tmp.path().join("home/.cache/huggingface/hub"));
    assert_eq!(o.token, None);
    assert!(!o.offline);
}

// ---------------------------------------------------------------------------------------------
// Online, against an in-process server that answers like the hub
// ---------------------------------------------------------------------------------------------

/// A minimal hub: `GET /api/models/<id>/revision/<rev>` (sha and file list) and
/// `GET /<id>/resolve/<rev>/<file>` (with `Range`, `ETag`, `X-Repo-Commit`, `Content-Range`).
/// `listed` files are in the file list; `files` are served (listed but unserved files give 404).
struct MockHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl MockHub {
    fn start(repo_id: &'static str, sha: &'static str, files: BTreeMap<String, Vec<u8>>, listed: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut range_start = 0usize;
                let mut range_end: Option<usize> = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(r) = lower.strip_prefix("range: bytes=") {
                        let (s, e) = r.trim().split_once('-').unwrap();
                        range_start = s.parse().unwrap();
                        range_end = e.parse().ok();
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
                log.lock().unwrap().push(path.clone());
                let info_path = format!("/api/models/{repo_id}/revision/");
                let resolve_prefix = format!("/{repo_id}/resolve/");
                let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if path.starts_with(&info_path) {
                    let siblings: Vec<_> = listed.iter().map(|f| serde_json::json!({"rfilename": f})).collect();
                    let body = serde_json::to_vec(&serde_json::json!({"sha": sha, "siblings": siblings})).unwrap();
                    ("200 OK", vec!["Content-Type: application/json".into()], body)
                } else if let Some(rest) = path.strip_prefix(&resolve_prefix) {
                    let (_rev, file) = rest.split_once('/').unwrap();
                    match files.get(file) {
                        Some(bytes) => {
                            let end = range_end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                            let body = bytes[range_start..=end].to_vec();
                            let headers = vec![
                                format!("ETag: \"{}\"", etag(bytes)),
                                format!("X-Repo-Commit: {sha}"),
                                format!("Content-Range: bytes {range_start}-{end}/{}", bytes.len()),
                            ];
                            ("206 Partial Content", headers, body)
                        }
                        None => ("404 Not Found", vec![format!("X-Repo-Commit: {sha}")], b"Entry not found".to_vec()),
                    }
                } else {
                    ("404 Not Found", vec![], b"Repository not found".to_vec())
                };
                let mut response =
                    format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for h in headers {
                    response.push_str(&h);
                    response.push_str("\r\n");
                }
                response.push_str("\r\n");
                let _ = stream.write_all(response.as_bytes());
                let _ = stream.write_all(&body);
                let _ = stream.flush();
            }
        });
        Self { endpoint, requests }
    }

    fn downloads(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().filter(|p| p.contains("/resolve/")).cloned().collect()
    }
}

fn online(cache: &Path, endpoint: &str) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        offline: false,
        token: None,
        progress: false,
        endpoint: Some(endpoint.to_string()),
    }
}

#[test]
fn online_downloads_into_a_snapshot_then_reuses_it() {
    let files = fixture_files();
    let mut listed: Vec<String> = files.keys().cloned().collect();
    listed.push("README.md".into()); // listed, not needed: never fetched
    listed.push("chat_template.json".into()); // optional, listed but not served: a 404 is fine
    let hub = MockHub::start("org/name", COMMIT, files.clone(), listed);
    let tmp = TempDir::new("online");
    let options = online(tmp.path(), &hub.endpoint);

    let dir = resolve_model("org/name", &options).unwrap();
    let folder = tmp.path().join("models--org--name");
    assert_eq!(dir, folder.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(folder.join("refs/main")).unwrap().trim(), COMMIT);
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        assert!(folder.join("blobs").join(etag(bytes)).is_file(), "blob of {name}");
    }
    assert!(!dir.join("README.md").exists() && !dir.join("chat_template.json").exists());
    CheckpointConfig::from_dir(&dir).unwrap();
    let first = hub.downloads().len();
    assert!(first >= files.len(), "{:?}", hub.downloads());

    // Everything is cached now: resolving again fetches no file, and offline finds the same snapshot.
    assert_eq!(resolve_model("org/name", &options).unwrap(), dir);
    let again: Vec<_> =
        hub.downloads()[first..].iter().filter(|p| !p.ends_with("chat_template.json")).cloned().collect();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(resolve_model("org/name", &offline(tmp.path())).unwrap(), dir);
}

#[test]
fn online_sharded_and_revision_ref() {
    let files = sharded_files();
    let hub = MockHub::start("org/sharded", OTHER_COMMIT, files.clone(), files.keys().cloned().collect());
    let tmp = TempDir::new("online-sharded");
    let dir = resolve_model("org/sharded@v2", &online(tmp.path(), &hub.endpoint)).unwrap();
    assert!(dir.ends_with(format!("snapshots/{OTHER_COMMIT}")));
    for name in files.keys() {
        assert!(dir.join(name).is_file(), "{name}");
    }
    let folder = tmp.path().join("models--org--sharded");
    assert_eq!(std::fs::read_to_string(folder.join("refs/v2")).unwrap().trim(), OTHER_COMMIT);
    assert_eq!(resolve_model("org/sharded@v2", &offline(tmp.path())).unwrap(), dir);
}

#[test]
fn online_errors_name_the_model_and_file() {
    let mut files = fixture_files();
    let listed: Vec<String> = files.keys().cloned().collect();
    files.remove("tokenizer_config.json"); // listed but the download fails
    let hub = MockHub::start("org/name", COMMIT, files, listed);
    let tmp = TempDir::new("online-errors");
    let options = online(tmp.path(), &hub.endpoint);
    let e = err_string(resolve_model("org/name", &options));
    assert!(e.contains("`org/name`") && e.contains("tokenizer_config.json") && e.contains("404"), "{e}");

    let e = err_string(resolve_model("org/unknown", &options));
    assert!(e.contains("`org/unknown`") && e.contains("404") && e.contains("HF_TOKEN"), "{e}");

    let mut files = fixture_files();
    files.remove("preprocessor_config.json");
    let hub = MockHub::start("org/incomplete", COMMIT, files.clone(), files.keys().cloned().collect());
    let e = err_string(resolve_model("org/incomplete", &online(tmp.path(), &hub.endpoint)));
    assert!(e.contains("`org/incomplete` has no preprocessor_config.json"), "{e}");
}

#[test]
fn unreachable_hub_falls_back_to_a_complete_cache() {
    let tmp = TempDir::new("unreachable");
    let snapshot = write_cached_model(tmp.path(), "org/name", COMMIT, &fixture_files(), &["main"], true);
    // Port 1 on localhost: connection refused at once.
    let options = online(tmp.path(), "http://127.0.0.1:1");
    assert_eq!(resolve_model("org/name", &options).unwrap(), snapshot);
    let e = err_string(resolve_model("org/other", &options));
    assert!(e.contains("`org/other`") && e.contains("cannot reach the hub") && e.contains("local cache"), "{e}");
}
