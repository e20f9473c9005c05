//! Video decoding against PyAV: frame indices and RGB pixels must be identical.
//!
//! Fixtures come from `scripts/reference/video_fixtures.py` (PyAV 18.1, numpy); no Python runs here.

use crate::common;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use videollava::media::limits::Budget;
use videollava::media::video::{
    decode_video_bytes, decode_video_file, decoded_bytes_are_kept, sample_indices, FrameSampling, VideoOptions,
};
use videollava::media::{Cancel, MediaLimits};

/// Videos the fixture script makes; each has `<name>.<sampling>.expected.safetensors` for both samplings.
const VIDEOS: &[&str] = &["h264_bframes.mp4", "vp9.webm", "h264.mkv", "mjpeg.avi", "anim.gif", "short5.mp4"];
const SAMPLINGS: &[(FrameSampling, &str)] =
    &[(FrameSampling::Uniform, "uniform"), (FrameSampling::Linspace, "linspace")];

fn videos_dir() -> PathBuf {
    common::fixtures_dir().join("videos")
}

fn opts(sampling: FrameSampling) -> VideoOptions {
    VideoOptions { num_frames: 8, sampling }
}

#[test]
fn fixture_folder_is_complete() {
    let dir = videos_dir();
    let mut expected_files = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".expected.safetensors") {
            expected_files += 1;
        }
    }
    assert_eq!(expected_files, VIDEOS.len() * SAMPLINGS.len(), "expected-output files in {}", dir.display());
    for v in VIDEOS {
        assert!(dir.join(v).is_file(), "{v} missing from {}", dir.display());
    }
}

#[test]
fn frames_match_pyav() {
    let dir = videos_dir();
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in VIDEOS {
        for (sampling, label) in SAMPLINGS {
            let (tensors, meta) = common::read_safetensors(&dir.join(format!("{name}.{label}.expected.safetensors")));
            assert_eq!(meta.get("sampling").map(String::as_str), Some(*label));
            let want_idx: Vec<usize> = tensors["indices"].i64s().iter().map(|&i| i as usize).collect();
            let want_total: usize = meta["total_frames"].parse().unwrap();
            let frames = &tensors["frames"];
            let (h, w) = (frames.shape[1], frames.shape[2]);
            let want = frames.u8s();

            let video = match decode_video_file(&dir.join(name), &opts(*sampling)) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{name} {label}: error {e}"));
                    continue;
                }
            };
            if video.total_frames != want_total || video.frame_indices != want_idx {
                failures.push(format!(
                    "{name} {label}: total {} indices {:?}, PyAV total {want_total} indices {want_idx:?}",
                    video.total_frames, video.frame_indices
                ));
                continue;
            }
            assert_eq!(video.frames.len(), 8);
            let got: Vec<u8> = video
                .frames
                .iter()
                .flat_map(|f| {
                    assert_eq!((f.height, f.width), (h, w), "{name}: frame size");
                    f.data.iter().copied()
                })
                .collect();
            let diffs = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let max = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            if diffs > 0 {
                failures.push(format!("{name} {label}: {diffs} of {} bytes differ, max abs diff {max}", want.len()));
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
    assert_eq!(checked, VIDEOS.len() * SAMPLINGS.len());
}

#[test]
fn bigbuckbunny_matches_pyav() {
    let Some(path) = common::shared_dir("bigbuckbunny_matches_pyav", "fixtures/media/bigbuckbunny.mp4") else {
        return;
    };
    let text = std::fs::read_to_string(videos_dir().join("bigbuckbunny.expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (sampling, label) in SAMPLINGS {
        let video = decode_video_file(&path, &opts(*sampling)).unwrap();
        assert_eq!(video.total_frames as u64, expected["total_frames"].as_u64().unwrap());
        let want_idx: Vec<usize> =
            expected[label]["indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(video.frame_indices, want_idx, "{label} indices");
        let hashes: Vec<String> = video
            .frames
            .iter()
            .map(|f| {
                assert_eq!((f.width, f.height), (1280, 720));
                Sha256::digest(&f.data).iter().map(|b| format!("{b:02x}")).collect()
            })
            .collect();
        let want: Vec<&str> =
            expected[label]["sha256"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(hashes, want, "{label}: sha256 of the rgb24 frames");
    }
}

/// A fresh folder under the system temp dir for files made at run time.
/// Limits whose budget records every reservation.
fn counting_limits() -> (MediaLimits, std::sync::Arc<std::sync::Mutex<Vec<u64>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let limits = MediaLimits {
        budget: Budget::new(move |n| {
            log.lock().unwrap().push(n);
            Ok(())
        }),
        ..MediaLimits::default()
    };
    (limits, seen)
}

#[test]
fn bytes_decoded_again_come_from_memory_under_the_same_checks() {
    let path = videos_dir().join("h264_bframes.mp4");
    let bytes: std::sync::Arc<[u8]> = std::fs::read(&path).unwrap().into();
    // Seven linspace frames: no other test decodes these bytes with these options.
    let options = VideoOptions { num_frames: 7, sampling: FrameSampling::Linspace };
    let (limits, seen) = counting_limits();
    assert!(!decoded_bytes_are_kept(&bytes, &options, &limits), "nothing decoded yet");
    let first = decode_video_bytes(bytes.clone(), "clip", &options, &limits, &Cancel::new()).unwrap();
    assert_eq!(first, decode_video_file(&path, &options).unwrap(), "bytes and file decode alike");
    assert!(decoded_bytes_are_kept(&bytes, &options, &limits), "kept after the first decode");
    let reserved = seen.lock().unwrap().clone();
    assert!(!reserved.is_empty());

    let again = decode_video_bytes(bytes.clone(), "clip", &options, &limits, &Cancel::new()).unwrap();
    assert_eq!(again, first);
    let pixels: u64 = first.frames.iter().map(|f| (f.width * f.height) as u64).sum();
    assert_eq!(seen.lock().unwrap()[reserved.len()..], [pixels], "a hit reserves the frames' pixels once");

    let cancel = Cancel::new();
    cancel.cancel();
    assert!(decode_video_bytes(bytes.clone(), "clip", &options, &limits, &cancel).is_err(), "cancelled");
    let refusing = MediaLimits { budget: Budget::new(|_| Err("no room".into())), ..MediaLimits::default() };
    let err = decode_video_bytes(bytes.clone(), "clip", &options, &refusing, &Cancel::new()).unwrap_err();
    assert!(err.to_string().contains("no room"), "{err}");
    // Other limits are checked by a decode of their own: this clip has more than 3 frames.
    let strict = MediaLimits { max_video_frames: 3, ..MediaLimits::default() };
    assert!(!decoded_bytes_are_kept(&bytes, &options, &strict));
    let err = decode_video_bytes(bytes, "clip", &options, &strict, &Cancel::new()).unwrap_err();
    assert!(err.to_string().contains("frames"), "{err}");
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("videollava-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn expect_error(path: &Path, options: &VideoOptions, what: &str) -> String {
    match decode_video_file(path, options) {
        Ok(v) => panic!("{what}: decoding {} succeeded with {} frames", path.display(), v.frames.len()),
        Err(e) => {
            let msg = e.to_string();
            let file = path.file_name().unwrap().to_string_lossy();
            assert!(msg.contains(&*file), "{what}: message does not name {file}: {msg}");
            assert!(!msg.contains('\n'), "{what}: message spans lines: {msg}");
            eprintln!("{what}: {msg}");
            msg
        }
    }
}

#[test]
fn errors_name_the_file() {
    let dir = scratch_dir("errors");
    let src = videos_dir();
    let o = VideoOptions::default();

    expect_error(&dir.join("does_not_exist.mp4"), &o, "missing file");

    let random: Vec<u8> = (0u32..20_000).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let noise = dir.join("random_bytes.mp4");
    std::fs::write(&noise, &random).unwrap();
    expect_error(&noise, &o, "not a media file");

    let mp4 = std::fs::read(src.join("h264_bframes.mp4")).unwrap();
    let truncated = dir.join("truncated.mp4");
    std::fs::write(&truncated, &mp4[..mp4.len() / 2]).unwrap();
    expect_error(&truncated, &o, "truncated mp4");

    // A Matroska file cut 8 bytes into its first cluster: a video stream, no complete packet.
    let mkv = std::fs::read(src.join("h264.mkv")).unwrap();
    let cluster = mkv.windows(4).position(|w| w == [0x1F, 0x43, 0xB6, 0x75]).expect("a Cluster element in h264.mkv");
    let headers_only = dir.join("headers_only.mkv");
    std::fs::write(&headers_only, &mkv[..cluster + 8]).unwrap();
    let msg = expect_error(&headers_only, &o, "no packets");
    assert!(msg.contains("no decodable frames"), "{msg}");

    expect_error(&src.join("audio_only.m4a"), &o, "audio only");
    expect_error(&src.join("zero_frames.mp4"), &o, "zero frames");

    // An AVI whose video FourCC no decoder knows.
    let avi = std::fs::read(src.join("mjpeg.avi")).unwrap();
    let mut patched = avi.clone();
    let mut replaced = 0;
    for i in 0..patched.len() - 4 {
        if &patched[i..i + 4] == b"MJPG" {
            patched[i..i + 4].copy_from_slice(b"QQ9Z");
            replaced += 1;
        }
    }
    assert!(replaced > 0, "no MJPG tag in mjpeg.avi");
    let unknown = dir.join("unknown_codec.avi");
    std::fs::write(&unknown, &patched).unwrap();
    expect_error(&unknown, &o, "unsupported codec");

    expect_error(
        &src.join("h264_bframes.mp4"),
        &VideoOptions { num_frames: 0, sampling: FrameSampling::Uniform },
        "num_frames 0",
    );

    let _ = std::fs::remove_dir_all(&dir);
}

/// An AVI whose headers claim `claimed` frames (the real count is 20): the decoder must count the
/// decoded frames and give exactly what PyAV gives for the intact file.
#[test]
fn wrong_header_count_uses_decoded_count() {
    let dir = scratch_dir("wrong-count");
    let src = videos_dir();
    let avi = std::fs::read(src.join("mjpeg.avi")).unwrap();
    let find = |tag: &[u8]| avi.windows(4).position(|w| w == tag).unwrap();
    let (strh, avih) = (find(b"strh"), find(b"avih"));
    // strh: tag, size, fccType, fccHandler, flags, priority, language, initialFrames, scale, rate, start, length
    assert_eq!(avi[strh + 40..strh + 44], 20u32.to_le_bytes(), "strh length of mjpeg.avi");
    for claimed in [31u32, 12] {
        let mut patched = avi.clone();
        patched[strh + 40..strh + 44].copy_from_slice(&claimed.to_le_bytes());
        patched[avih + 24..avih + 28].copy_from_slice(&claimed.to_le_bytes()); // avih dwTotalFrames
        let path = dir.join(format!("claims_{claimed}.avi"));
        std::fs::write(&path, &patched).unwrap();
        for (sampling, label) in SAMPLINGS {
            let (tensors, meta) =
                common::read_safetensors(&src.join(format!("mjpeg.avi.{label}.expected.safetensors")));
            let video = decode_video_file(&path, &opts(*sampling)).unwrap();
            assert_eq!(video.total_frames.to_string(), meta["total_frames"], "claims {claimed}, {label}");
            let want_idx: Vec<usize> = tensors["indices"].i64s().iter().map(|&i| i as usize).collect();
            assert_eq!(video.frame_indices, want_idx, "claims {claimed}, {label}");
            let got: Vec<u8> = video.frames.iter().flat_map(|f| f.data.iter().copied()).collect();
            assert!(got == tensors["frames"].u8s(), "claims {claimed}, {label}: pixels differ");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn other_frame_counts() {
    // 16 frames from a 37-frame video: indices from numpy, frames equal to those of the 8-frame run
    // where indices coincide.
    let path = videos_dir().join("h264_bframes.mp4");
    let v16 = decode_video_file(&path, &VideoOptions { num_frames: 16, sampling: FrameSampling::Uniform }).unwrap();
    assert_eq!(v16.frames.len(), 16);
    assert_eq!(v16.frame_indices, sample_indices(37, 16, FrameSampling::Uniform).unwrap());
    let v8 = decode_video_file(&path, &VideoOptions::default()).unwrap();
    for (i, f) in v8.frame_indices.iter().zip(&v8.frames) {
        if let Some(p) = v16.frame_indices.iter().position(|j| j == i) {
            assert_eq!(&v16.frames[p], f, "frame {i}");
        }
    }
}

#[test]
fn sample_indices_match_numpy() {
    let mut n_checked = 0;
    for line in NUMPY_INDICES.lines() {
        let (head, values) = line.split_once(':').unwrap();
        let mut parts = head.split_whitespace();
        let kind = parts.next().unwrap();
        let total: usize = parts.next().unwrap().parse().unwrap();
        let n: usize = parts.next().unwrap().parse().unwrap();
        let want: Vec<usize> = values.split_whitespace().map(|v| v.parse().unwrap()).collect();
        let sampling = if kind == "u" { FrameSampling::Uniform } else { FrameSampling::Linspace };
        let got = sample_indices(total, n, sampling).unwrap();
        assert_eq!(got, want, "{kind} total {total} N {n}");
        n_checked += 1;
    }
    assert_eq!(n_checked, 1104);
}

/// Expected indices from numpy, one line per case, `u|l TOTAL N: indices` (made by
/// `scripts/reference/frame_index_fixtures.py`, which documents the cases).
const NUMPY_INDICES: &str = include_str!("fixtures/frame_indices_numpy.txt");
