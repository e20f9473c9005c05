//! The `videollava` command, run as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../videollava/tests/fixtures")
}

fn videollava(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_videollava")).args(args).output().expect("run videollava")
}

fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("videollava-cli-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A failure must be one clean line on stderr naming the problem, with a non-zero exit.
fn assert_clean_failure(out: &Output, must_contain: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in must_contain {
        assert!(stderr.contains(needle), "`{needle}` missing from: {stderr}");
    }
}

fn tiny() -> String {
    fixtures().join("checkpoints/tiny-llama").display().to_string()
}

fn media(name: &str) -> String {
    fixtures().join("media").join(name).display().to_string()
}

#[test]
fn preprocess_writes_what_transformers_returns() {
    let dir = temp_dir("preprocess");
    let out_path = dir.join("out.safetensors");
    let out = videollava(&[
        "preprocess",
        "--model",
        &tiny(),
        "--prompt",
        "USER: <image>\nWhat is this? ASSISTANT: A red car.</s>USER: <video>\nAnd what happens in this video? ASSISTANT:",
        "--image",
        &media("landscape.png"),
        "--video",
        &media("clip.mp4"),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = std::fs::read(&out_path).unwrap();
    let want = std::fs::read(fixtures().join("processor/multi_turn_image_video.safetensors")).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let want = safetensors::SafeTensors::deserialize(&want).unwrap();
    let mut names = got.names();
    names.sort();
    assert_eq!(names, vec!["attention_mask", "input_ids", "pixel_values_images", "pixel_values_videos"]);
    for name in names {
        let (g, w) = (got.tensor(name).unwrap(), want.tensor(name).unwrap());
        assert_eq!(g.dtype(), w.dtype(), "{name} dtype");
        assert_eq!(g.shape(), w.shape(), "{name} shape");
        if name.starts_with("pixel") {
            let f = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
            let max = f(g.data()).iter().zip(f(w.data())).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(max <= 1e-5, "{name}: max abs diff {max}");
        } else {
            assert_eq!(g.data(), w.data(), "{name} differs");
        }
    }
}

#[test]
fn bad_inputs_fail_with_one_line_naming_the_problem() {
    let dir = temp_dir("bad-inputs");
    let out = dir.join("out.safetensors");
    let out = out.to_str().unwrap();

    let missing = dir.join("missing.mp4");
    let random = dir.join("random.mp4");
    std::fs::write(&random, (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>())
        .unwrap();
    let truncated = dir.join("truncated.mp4");
    let clip = std::fs::read(media("clip.mp4")).unwrap();
    std::fs::write(&truncated, &clip[..clip.len() / 3]).unwrap();
    let text_file = dir.join("notes.png");
    std::fs::write(&text_file, "this is not an image\n").unwrap();
    let video_as_image = media("clip.mp4");
    let tiff = dir.join("scan.tiff");
    std::fs::write(&tiff, b"II*\x00\x08\x00\x00\x00 not really a tiff").unwrap();
    let videos = fixtures().join("videos");

    let v = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (vec!["--prompt".into(), "<video> hi".into(), "--video".into(), v(&missing)], vec!["missing.mp4"]),
        (vec!["--prompt".into(), "<video> hi".into(), "--video".into(), v(&random)], vec!["random.mp4"]),
        (vec!["--prompt".into(), "<video> hi".into(), "--video".into(), v(&truncated)], vec!["truncated.mp4"]),
        (vec!["--prompt".into(), "<image> hi".into(), "--image".into(), v(&text_file)], vec!["notes.png"]),
        (vec!["--prompt".into(), "<image> hi".into(), "--image".into(), video_as_image.clone()], vec!["clip.mp4"]),
        (vec!["--prompt".into(), "<image> hi".into(), "--image".into(), v(&tiff)], vec!["scan.tiff", "TIFF"]),
        (
            vec!["--prompt".into(), "<video> hi".into(), "--video".into(), v(&videos.join("zero_frames.mp4"))],
            vec!["zero_frames.mp4"],
        ),
        (
            vec!["--prompt".into(), "<video> hi".into(), "--video".into(), v(&videos.join("audio_only.m4a"))],
            vec!["audio_only.m4a", "no video stream"],
        ),
        (
            vec!["--prompt".into(), "<image> <image> two?".into(), "--image".into(), media("landscape.png")],
            vec!["2 <image> placeholders but 1 image was given"],
        ),
        (
            vec!["--prompt".into(), "no placeholder".into(), "--image".into(), media("landscape.png")],
            vec!["0 <image> placeholders but 1 image was given"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["preprocess".to_string(), "--model".into(), tiny(), "--output".into(), out.into()];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_failure(&videollava(&refs), &needles);
    }
}

#[test]
fn broken_checkpoint_files_name_file_and_field() {
    let dir = temp_dir("broken-config");
    for f in std::fs::read_dir(fixtures().join("checkpoints/tiny-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let config_path = dir.join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let run =
        || videollava(&["preprocess", "--model", dir.to_str().unwrap(), "--prompt", "hi", "--output", "/dev/null"]);

    std::fs::write(&config_path, original.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3")).unwrap();
    assert_clean_failure(&run(), &["config.json", "text_config.num_key_value_heads"]);

    std::fs::write(&config_path, &original[..original.len() / 2]).unwrap();
    assert_clean_failure(&run(), &["config.json", "not valid JSON"]);

    std::fs::write(&config_path, &original).unwrap();
    let pre = dir.join("preprocessor_config.json");
    let pre_text = std::fs::read_to_string(&pre).unwrap();
    std::fs::write(&pre, pre_text.replace("\"do_resize\": true", "\"do_resize\": \"yes\"")).unwrap();
    assert_clean_failure(&run(), &["preprocessor_config.json", "do_resize"]);
}
