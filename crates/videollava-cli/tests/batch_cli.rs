//! `videollava batch` on the tiny checkpoint: a manifest of images, videos, a missing file, a bad
//! video and bad rows; killed midway and resumed; sharded; against `generate`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../videollava/tests/fixtures")
}

fn checkpoint() -> String {
    fixtures().join("checkpoints/model-llama").display().to_string()
}

fn media(name: &str) -> String {
    fixtures().join("media").join(name).display().to_string()
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("videollava-batch-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `max_new_tokens` of every row: long enough that a run takes a while to kill it midway.
const NEW_TOKENS: &str = "48";

fn batch_command(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_videollava"));
    cmd.args(["batch", "--model", &checkpoint(), "--dtype", "f32", "--max-new-tokens", NEW_TOKENS, "--ignore-eos"])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME");
    cmd
}

fn run_batch(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let out = batch_command(input, output, extra).output().expect("run videollava batch");
    assert!(out.status.success(), "batch failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The results file as id -> object; every id must appear exactly once.
fn results(path: &Path) -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"));
        let id = v["id"].as_str().unwrap().to_string();
        assert!(map.insert(id.clone(), v).is_none(), "id {id} written twice");
    }
    map
}

/// What must be equal between runs: the answer, or the error.
fn answer(v: &Value) -> (Value, Value, Value) {
    (v["text"].clone(), v["token_ids"].clone(), v["error"].clone())
}

/// 24 rows: 4 videos x 3 questions (the same clip at two frame counts, the webm), images, a text
/// row, a missing file, a bad video, an audio-only file, a loopback URL, and unusable rows.
fn write_manifest(dir: &Path) -> (PathBuf, Vec<String>) {
    let bad_video = fixtures().join("videos/zero_frames.mp4").display().to_string();
    let audio = fixtures().join("videos/audio_only.m4a").display().to_string();
    let mut rows: Vec<Value> = Vec::new();
    let questions = ["Why is this video funny?", "What happens first?", "Describe the colours."];
    for (v, (video, frames)) in
        [(media("clip.mp4"), 8), (media("clip.mp4"), 4), (media("short.webm"), 8), (media("short.webm"), 2)]
            .iter()
            .enumerate()
    {
        for (q, question) in questions.iter().enumerate() {
            rows.push(serde_json::json!({"id": format!("v{v}-q{q}"), "prompt": question, "video": video, "num_frames": frames}));
        }
    }
    for (i, image) in ["landscape.png", "portrait.jpg", "landscape.png"].iter().enumerate() {
        rows.push(serde_json::json!({"id": format!("img{i}"), "prompt": "What is shown here?", "image": media(image)}));
    }
    rows.push(serde_json::json!({"id": "both", "prompt": "Compare them.", "image": media("portrait.jpg"), "video": media("clip.mp4")}));
    rows.push(serde_json::json!({"id": "text", "prompt": "Tell me a joke.", "max_new_tokens": 5}));
    rows.push(serde_json::json!({"id": "docs-format", "prompt": "USER: <video>\nWhy is this video funny? ASSISTANT:", "video": media("clip.mp4")}));
    rows.push(serde_json::json!({"id": "missing", "prompt": "Why?", "video": "/nonexistent/dir/none.mp4"}));
    rows.push(serde_json::json!({"id": "bad-video", "prompt": "Why?", "video": bad_video}));
    rows.push(serde_json::json!({"id": "audio-only", "prompt": "Why?", "video": audio}));
    rows.push(serde_json::json!({"id": "loopback-url", "prompt": "Why?", "image": "http://127.0.0.1:9/x.png"}));
    rows.push(serde_json::json!({"id": "typo", "prompt": "Why?", "max_tokens": 3}));
    let mut text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    text.push_str("this line is not JSON\n");
    let path = dir.join("rows.jsonl");
    std::fs::write(&path, text).unwrap();
    let mut ids: Vec<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    ids.push(format!("line-{}", rows.len() + 1));
    (path, ids)
}

const FAILING: [&str; 6] = ["missing", "bad-video", "audio-only", "loopback-url", "typo", "line-24"];

#[test]
fn killed_midway_and_resumed_equals_an_uninterrupted_run_and_generate() {
    let dir = temp_dir("resume");
    let (input, ids) = write_manifest(&dir);
    assert!(ids.len() >= 20);

    // The reference: one uninterrupted run.
    let whole = dir.join("whole.jsonl");
    let out = run_batch(&input, &whole, &["--max-batch-size", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{} rows written", ids.len())), "{stderr}");
    assert!(stderr.contains(&format!("({} failed)", FAILING.len())), "{stderr}");
    let want = results(&whole);
    assert_eq!(want.keys().cloned().collect::<HashSet<_>>(), ids.iter().cloned().collect::<HashSet<_>>());
    for id in &ids {
        let row = &want[id];
        if FAILING.contains(&id.as_str()) {
            let e = row["error"].as_str().unwrap_or_else(|| panic!("{id} should fail: {row}"));
            assert!(!e.is_empty());
        } else {
            assert!(row.get("error").is_none(), "{id}: {row}");
            for key in ["index", "text", "token_ids", "logprobs", "prompt_tokens", "finish_reason", "timings_ms"] {
                assert!(row.get(key).is_some(), "{id} lacks {key}: {row}");
            }
        }
    }
    let err = |id: &str| want[id]["error"].as_str().unwrap().to_string();
    assert!(err("missing").contains("none.mp4"), "{}", err("missing"));
    assert!(err("loopback-url").contains("127.0.0.1"), "{}", err("loopback-url"));
    assert!(err("typo").contains("max_tokens"), "{}", err("typo"));
    assert_eq!(want["text"]["token_ids"].as_array().unwrap().len(), 5, "a row's max_new_tokens applies");
    assert_eq!(want["v0-q0"]["token_ids"].as_array().unwrap().len(), 48);
    // The docs-format prompt is used verbatim: the same prompt as the wrapped question.
    assert_eq!(answer(&want["docs-format"]), answer(&want["v0-q0"]));
    assert_eq!(want["docs-format"]["prompt_tokens"], want["v0-q0"]["prompt_tokens"]);
    // 8 and 4 frames of one clip are different prompts.
    assert_ne!(want["v0-q0"]["prompt_tokens"], want["v1-q0"]["prompt_tokens"]);

    // Killed midway (SIGKILL), then rerun with the same command.
    let resumed = dir.join("resumed.jsonl");
    let slow = ["--max-batch-size", "1", "--decode-threads", "1"];
    let mut child = batch_command(&input, &resumed, &slow).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lines = std::fs::read_to_string(&resumed).map(|t| t.lines().count()).unwrap_or(0);
        if lines >= 3 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = std::fs::read_to_string(&resumed).unwrap();
    let complete = &before[..before.rfind('\n').map_or(0, |p| p + 1)];
    let n_before = complete.lines().count();
    assert!(n_before >= 3 && n_before < ids.len(), "killed after {n_before} of {} rows", ids.len());
    eprintln!("killed after {n_before} of {} rows", ids.len());
    let out = run_batch(&input, &resumed, &slow);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{n_before} already there")), "{stderr}");
    let after = std::fs::read_to_string(&resumed).unwrap();
    assert!(after.starts_with(complete), "the lines written before the kill are kept as they were");
    let got = results(&resumed);
    assert_eq!(got.len(), want.len());
    for (id, row) in &want {
        assert_eq!(answer(&got[id]), answer(row), "{id} differs after the resume");
    }

    // A third run finds nothing to do and does not load the model.
    let out = run_batch(&input, &resumed, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("0 rows written to {}", resumed.display())));
    assert_eq!(std::fs::read_to_string(&resumed).unwrap(), after);

    // The same answers as `generate` for a video row, an image row and the two-media row.
    for (id, args) in [
        ("v0-q0", vec!["--prompt", "Why is this video funny?", "--video", &media("clip.mp4")]),
        ("v3-q2", vec!["--prompt", "Describe the colours.", "--video", &media("short.webm"), "--num-frames", "2"]),
        ("img1", vec!["--prompt", "What is shown here?", "--image", &media("portrait.jpg")]),
        ("both", vec!["--prompt", "Compare them.", "--image", &media("portrait.jpg"), "--video", &media("clip.mp4")]),
    ]
    .iter()
    .map(|(id, a)| (id, a.iter().map(|s| s.to_string()).collect::<Vec<_>>()))
    {
        let out = Command::new(env!("CARGO_BIN_EXE_videollava"))
            .args([
                "generate",
                "--model",
                &checkpoint(),
                "--dtype",
                "f32",
                "--max-new-tokens",
                NEW_TOKENS,
                "--ignore-eos",
            ])
            .args(["--format", "json"])
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let g: Value = serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(answer(&g).0, answer(&want[*id]).0, "{id}: text differs from generate");
        assert_eq!(g["token_ids"], want[*id]["token_ids"], "{id}: ids differ from generate");
        assert_eq!(g["prompt_tokens"], want[*id]["prompt_tokens"], "{id}: prompt differs from generate");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn three_shards_make_the_whole_run() {
    let dir = temp_dir("shard");
    let (input, ids) = write_manifest(&dir);
    let whole = dir.join("whole.jsonl");
    run_batch(&input, &whole, &[]);
    let want = results(&whole);
    let mut union = BTreeMap::new();
    for i in 0..3 {
        let part = dir.join(format!("part{i}.jsonl"));
        let out = run_batch(&input, &part, &["--shard", &format!("{i}/3")]);
        let got = results(&part);
        assert!(!got.is_empty() && got.len() < ids.len(), "shard {i}/3 holds {} rows", got.len());
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("shard {i}/3")));
        for (id, row) in got {
            assert!(union.insert(id.clone(), row).is_none(), "{id} is in two shards");
        }
    }
    assert_eq!(union.len(), want.len());
    for (id, row) in &want {
        assert_eq!(answer(&union[id]), answer(row), "{id}");
    }
    let err = Command::new(env!("CARGO_BIN_EXE_videollava"))
        .args(["batch", "--model", &checkpoint(), "--shard", "3/3", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.join("x.jsonl"))
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("3/3"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_csv_manifest_runs_like_json_lines() {
    let dir = temp_dir("csv");
    let csv = dir.join("rows.csv");
    std::fs::write(
        &csv,
        format!(
            "id,prompt,video,image,max_new_tokens\nc1,\"Why is this video funny?\",{},,6\nc2,\"What, exactly?\",,{},3\n",
            media("clip.mp4"),
            media("landscape.png")
        ),
    )
    .unwrap();
    let jsonl = dir.join("rows.jsonl");
    std::fs::write(
        &jsonl,
        format!(
            "{}\n{}\n",
            serde_json::json!({"id": "c1", "prompt": "Why is this video funny?", "video": media("clip.mp4"), "max_new_tokens": 6}),
            serde_json::json!({"id": "c2", "prompt": "What, exactly?", "image": media("landscape.png"), "max_new_tokens": 3})
        ),
    )
    .unwrap();
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    run_batch(&csv, &a, &["--overwrite"]);
    run_batch(&jsonl, &b, &[]);
    let (a, b) = (results(&a), results(&b));
    assert_eq!(a.len(), 2);
    for id in ["c1", "c2"] {
        assert!(a[id].get("error").is_none(), "{}", a[id]);
        assert_eq!(answer(&a[id]), answer(&b[id]));
    }
    assert_eq!(a["c2"]["token_ids"].as_array().unwrap().len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}
