//! `videollava generate` and `videollava chat` as a user runs them, on the tiny checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../videollava/tests/fixtures")
}

fn checkpoint(name: &str) -> String {
    fixtures().join("checkpoints").join(name).display().to_string()
}

fn media(name: &str) -> String {
    fixtures().join("media").join(name).display().to_string()
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_videollava"));
    cmd.args(args).env_remove("HF_HUB_OFFLINE").env_remove("HF_HUB_CACHE").env_remove("HF_HOME");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run videollava")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("videollava-gen-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The image prompt of `model/model-llama-greedy.json`, run from the files through the CLI.
#[test]
fn greedy_json_output_equals_transformers_generate() {
    let text = std::fs::read_to_string(fixtures().join("model/model-llama-greedy.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &want["cases"]["image"];
    let prompt = case["prompts"][0].as_str().unwrap();
    let n = want["max_new_tokens"].to_string();
    let out = run(
        &[
            "generate",
            "--model",
            &checkpoint("model-llama"),
            "--raw-prompt",
            "--prompt",
            prompt,
            "--image",
            &media("landscape.png"),
            "--max-new-tokens",
            &n,
            "--dtype",
            "f32",
            "--format",
            "json",
            "--top-logprobs",
            "3",
        ],
        &[],
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let got = &lines[0];
    assert_eq!(got["token_ids"], case["new_tokens"][0], "greedy ids");
    for (g, w) in got["logprobs"].as_array().unwrap().iter().zip(case["logprobs"][0].as_array().unwrap()) {
        assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4);
    }
    assert_eq!(got["finish_reason"], "length");
    assert_eq!(got["prompt_tokens"], case["prompt_length"]);
    assert_eq!(got["top_logprobs"].as_array().unwrap().len(), 8);
    assert_eq!(got["top_logprobs"][0].as_array().unwrap().len(), 3);
    for key in ["load", "media", "preprocess", "vision", "prefill", "decode"] {
        assert!(got["timings_ms"][key].as_f64().is_some(), "timings_ms.{key}");
    }
}

#[test]
fn a_question_is_wrapped_in_the_chat_format_and_streams_as_text() {
    // The wrapped question must give exactly what the raw prompt gives.
    let raw = run(
        &[
            "generate",
            "--model",
            &checkpoint("model-llama"),
            "--raw-prompt",
            "--prompt",
            "USER: <image>\nWhat is shown in this picture? ASSISTANT:",
            "--image",
            &media("landscape.png"),
            "--max-new-tokens",
            "6",
            "--dtype",
            "f32",
        ],
        &[],
    );
    let wrapped = run(
        &[
            "generate",
            "--model",
            &checkpoint("model-llama"),
            "--prompt",
            "What is shown in this picture?",
            "--image",
            &media("landscape.png"),
            "--max-new-tokens",
            "6",
            "--dtype",
            "f32",
        ],
        &[],
    );
    assert!(raw.status.success() && wrapped.status.success(), "{}", String::from_utf8_lossy(&wrapped.stderr));
    assert!(!raw.stdout.is_empty());
    assert_eq!(raw.stdout, wrapped.stdout);
}

#[test]
fn sampling_is_reproducible_under_a_seed() {
    let args = |seed: &str| {
        run(
            &[
                "generate",
                "--model",
                &checkpoint("model-llama"),
                "--prompt",
                "Describe the video.",
                "--video",
                &media("clip.mp4"),
                "--max-new-tokens",
                "12",
                "--temperature",
                "1.0",
                "--top-p",
                "0.95",
                "--seed",
                seed,
                "--dtype",
                "f32",
                "--format",
                "json",
            ],
            &[],
        )
    };
    let a = json_lines(&args("11"));
    let b = json_lines(&args("11"));
    let c = json_lines(&args("12"));
    assert_eq!(a[0]["token_ids"], b[0]["token_ids"]);
    assert_ne!(a[0]["token_ids"], c[0]["token_ids"], "another seed should sample differently");
}

#[test]
fn a_batch_of_prompts_gives_one_json_line_each_equal_to_running_alone() {
    let batch = json_lines(&run(
        &[
            "generate",
            "--model",
            &checkpoint("model-llama"),
            "--prompt",
            "What is this?",
            "--prompt",
            "And what happens in this short video?",
            "--image",
            &media("landscape.png"),
            "--video",
            &media("clip.mp4"),
            "--max-new-tokens",
            "5",
            "--dtype",
            "f32",
            "--format",
            "json",
        ],
        &[],
    ));
    assert_eq!(batch.len(), 2);
    let alone = json_lines(&run(
        &[
            "generate",
            "--model",
            &checkpoint("model-llama"),
            "--prompt",
            "And what happens in this short video?",
            "--video",
            &media("clip.mp4"),
            "--max-new-tokens",
            "5",
            "--dtype",
            "f32",
            "--format",
            "json",
        ],
        &[],
    ));
    assert_eq!(batch[1]["index"], 1);
    assert_eq!(batch[1]["token_ids"], alone[0]["token_ids"]);
}

/// A hub cache laid out as hf-hub / huggingface_hub write it, holding the tiny checkpoint.
fn make_hub_cache(root: &Path, repo: &str) -> PathBuf {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let snap = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for f in std::fs::read_dir(fixtures().join("checkpoints/model-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    snap
}

#[test]
fn a_hub_id_resolves_offline_through_the_cache() {
    let dir = temp_dir("hub");
    make_hub_cache(&dir, "tiny-org/video-llava-tiny");
    let cache = dir.display().to_string();
    let env = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache.as_str())];
    let out = run(
        &[
            "generate",
            "--model",
            "tiny-org/video-llava-tiny",
            "--prompt",
            "What is this?",
            "--image",
            &media("landscape.png"),
            "--max-new-tokens",
            "3",
            "--dtype",
            "f32",
            "--format",
            "json",
        ],
        &env,
    );
    assert_eq!(json_lines(&out)[0]["token_ids"].as_array().unwrap().len(), 3);

    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let home = temp_dir("hub-home");
    make_hub_cache(&home.join("hub"), "tiny-org/video-llava-tiny");
    let home_s = home.display().to_string();
    let out = run(
        &[
            "generate",
            "--model",
            "tiny-org/video-llava-tiny",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--format",
            "json",
        ],
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", home_s.as_str())],
    );
    assert_eq!(json_lines(&out).len(), 1);

    let out = run(&["generate", "--model", "nobody/unknown-model", "--prompt", "Hi"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("nobody/unknown-model") && err.contains("HF_HUB_OFFLINE"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn chat_keeps_the_cache_between_turns() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_videollava"))
        .args([
            "chat",
            "--model",
            &checkpoint("model-llama"),
            "--image",
            &media("landscape.png"),
            "--max-new-tokens",
            "4",
            "--dtype",
            "f32",
            "--stats",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is this?\n/video /nonexistent/file.mp4\nAnd why?\n/quit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stats: Vec<(usize, usize)> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("[turn: "))
        .map(|l| {
            let nums: Vec<usize> = l.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
            (nums[0], nums[1])
        })
        .collect();
    assert_eq!(stats.len(), 2, "two answered turns: {stderr}");
    assert_eq!(stats[0].1, 0, "first turn starts from an empty cache");
    assert!(stats[1].1 > stats[0].0, "second turn reuses the first's cache: {stats:?}");
    assert!(stats[1].0 < stats[1].1, "second turn prefills only its new tokens: {stats:?}");
    assert!(stderr.contains("file.mp4"), "a bad /video is reported and the session goes on: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2, "two answers");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let dir = temp_dir("ctx");
    for f in std::fs::read_dir(fixtures().join("checkpoints/model-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"max_position_embeddings\": 4096", "\"max_position_embeddings\": 64"),
    )
    .unwrap();
    let out = run(
        &["generate", "--model", dir.to_str().unwrap(), "--prompt", "Describe.", "--video", &media("clip.mp4")],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("more than the model's context of 64"), "{err}");
    assert!(!err.contains("panicked"));
}

/// `--quantize` quantizes at load, saves the blocks, and the next load reads them back: both runs
/// answer the same, and the second says where it read from.
#[test]
fn quantize_saves_the_weights_and_the_next_load_reads_them() {
    let cache = temp_dir("quant-cache");
    let cache_s = cache.display().to_string();
    let args = [
        "generate",
        "--model",
        &checkpoint("model-llama"),
        "--prompt",
        "What is shown?",
        "--image",
        &media("landscape.png"),
        "--max-new-tokens",
        "6",
        "--dtype",
        "f32",
        "--quantize",
        "q8_0",
        "--quantized-cache",
        &cache_s,
        "--format",
        "json",
    ];
    let first = run(&args, &[]);
    let first_err = String::from_utf8_lossy(&first.stderr).to_string();
    assert!(first_err.contains("quantized 15 linear layers (15 Q8_0") && first_err.contains("saved to"), "{first_err}");
    let files: Vec<_> = std::fs::read_dir(cache.join("quantized")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].extension().is_some_and(|e| e == "gguf"));
    let second = run(&args, &[]);
    let second_err = String::from_utf8_lossy(&second.stderr).to_string();
    assert!(second_err.contains("15 read from"), "{second_err}");
    let (a, b) = (json_lines(&first), json_lines(&second));
    assert_eq!(a[0]["token_ids"], b[0]["token_ids"]);
    assert_eq!(a[0]["token_ids"].as_array().map(|t| t.len()), Some(6));

    // A corrupt cache file is reported and replaced, never loaded.
    std::fs::write(&files[0], b"GGUF garbage").unwrap();
    let third = run(&args, &[]);
    let third_err = String::from_utf8_lossy(&third.stderr).to_string();
    assert!(third_err.contains("note:") && third_err.contains("saved to"), "{third_err}");
    assert_eq!(json_lines(&third)[0]["token_ids"], a[0]["token_ids"]);

    let bad = run(&["generate", "--model", &checkpoint("model-llama"), "--prompt", "x", "--quantize", "nf3"], &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown quantization `nf3`"));
    let _ = std::fs::remove_dir_all(cache);
}

/// `videollava quality` on the tiny checkpoint: 8-bit weights keep the f32 model's next-token
/// choices on nearly every one of 128 generated positions.
#[test]
fn quality_reports_top1_agreement_and_kl_of_quantized_weights() {
    let dir = temp_dir("quality");
    let json_path = dir.join("q.json");
    let out = run(
        &[
            "quality",
            "--model",
            &checkpoint("model-llama"),
            "--quantize",
            "q8_0",
            "--quantized-cache",
            "off",
            "--image",
            &media("landscape.png"),
            "--positions",
            "128",
            "--json",
            &json_path.display().to_string(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["positions"], 128);
    assert_eq!(report["reference_dtype"], "f32");
    let top1 = report["top1_agreement"].as_f64().unwrap();
    let kl = report["mean_kl"].as_f64().unwrap();
    assert!(top1 >= 0.85 && top1 <= 1.0, "top-1 agreement {top1}");
    assert!(kl > 0.0 && kl < 0.01, "mean KL {kl}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `--kv-cache q8_0`: `quality` measures the 8-bit cache alone (reference: the same weights with
/// the full-precision cache); `generate` answers with it; an unknown format is one clear line.
#[test]
fn an_8bit_kv_cache_is_measured_and_generates() {
    let dir = temp_dir("quality-kv");
    let json_path = dir.join("q.json");
    let out = run(
        &[
            "quality",
            "--model",
            &checkpoint("model-llama"),
            "--kv-cache",
            "q8_0",
            "--video",
            &media("clip.mp4"),
            "--positions",
            "64",
            "--json",
            &json_path.display().to_string(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["kv_cache"], "q8_0");
    assert!(report["quantize"].is_null());
    let top1 = report["top1_agreement"].as_f64().unwrap();
    let kl = report["mean_kl"].as_f64().unwrap();
    eprintln!("8-bit KV cache on the tiny checkpoint: top-1 {top1}, mean KL {kl}");
    assert!(top1 >= 0.85, "top-1 agreement {top1}");
    assert!(kl > 0.0 && kl < 0.01, "mean KL {kl}");

    let gen = run(
        &[
            "generate",
            "--model",
            &checkpoint("model-llama"),
            "--prompt",
            "What happens?",
            "--video",
            &media("clip.mp4"),
            "--max-new-tokens",
            "5",
            "--kv-cache",
            "q8_0",
            "--format",
            "json",
        ],
        &[],
    );
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    assert_eq!(json_lines(&gen)[0]["token_ids"].as_array().map(|t| t.len()), Some(5));

    let bad = run(&["generate", "--model", &checkpoint("model-llama"), "--prompt", "x", "--kv-cache", "q4"], &[]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown KV cache format `q4`") && !err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The prompt as the model card and the transformers docs write it, given to `--prompt`, is used
/// verbatim: the same ids as `--raw-prompt` (and as the bare question, which is wrapped into it).
#[test]
fn a_prompt_in_the_chat_format_is_used_verbatim() {
    let docs = "USER: <video>\nWhy is this video funny? ASSISTANT:";
    let (model, video) = (checkpoint_str(), media_str());
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--video",
            &video,
            "--max-new-tokens",
            "6",
            "--dtype",
            "f32",
            "--format",
            "json",
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        let lines = json_lines(&run(&args, &[]));
        assert_eq!(lines.len(), 1);
        (lines[0]["token_ids"].clone(), lines[0]["prompt_tokens"].clone())
    };
    let raw = gen(&["--raw-prompt", "--prompt", docs]);
    assert_eq!(gen(&["--prompt", docs]), raw, "--prompt in the chat format differs from --raw-prompt");
    assert_eq!(
        gen(&["--prompt", "Why is this video funny?"]),
        raw,
        "the bare question is wrapped into the same prompt"
    );
    // Wrapping it again would be a longer prompt: `USER: USER: <video>...`.
    let twice = gen(&["--raw-prompt", "--prompt", &format!("USER: {docs} ASSISTANT:")]);
    assert_ne!(twice.1, raw.1);

    // `chat` does the same with a line in the chat format.
    let line = "USER: <video> Why is this video funny? ASSISTANT:";
    let mut child = Command::new(env!("CARGO_BIN_EXE_videollava"))
        .args([
            "chat",
            "--model",
            &checkpoint_str(),
            "--video",
            &media_str(),
            "--max-new-tokens",
            "6",
            "--dtype",
            "f32",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{line}\n/quit\n").as_bytes()).unwrap();
    let chat = child.wait_with_output().unwrap();
    assert!(chat.status.success(), "{}", String::from_utf8_lossy(&chat.stderr));
    let out = run(
        &[
            "generate",
            "--model",
            &checkpoint_str(),
            "--video",
            &media_str(),
            "--max-new-tokens",
            "6",
            "--dtype",
            "f32",
            "--raw-prompt",
            "--prompt",
            line,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&chat.stdout), String::from_utf8_lossy(&out.stdout));
}

fn checkpoint_str() -> String {
    checkpoint("model-llama")
}

fn media_str() -> String {
    media("clip.mp4")
}
