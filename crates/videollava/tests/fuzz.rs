//! Mutation fuzzing of everything that reads untrusted bytes: image decoding, video decoding from
//! memory, and the image processor on arbitrary sizes. Seeds are the fixture files; each
//! iteration applies random mutations (bit flips, interesting bytes, insertions, deletions,
//! truncation, splices of another seed; PNG chunk CRCs recomputed so mutations reach the
//! decoder). An input may be refused (an error) but must never panic, hang or exceed the limits.
//!
//! Each target runs for `FUZZ_SECONDS` seconds (default 2, so CI runs them briefly) from seed
//! `FUZZ_SEED` (default 1). A long run: `FUZZ_SECONDS=1800 cargo test --release -p videollava
//! --test integration fuzz:: -- --ignored --nocapture` (the `long_` tests split the time).
//! A panicking input is written to `$TMPDIR/videollava-fuzz-<target>-<n>.bin` before failing.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use videollava::media::image::decode_image_bytes_with;
use videollava::media::video::{decode_video_bytes, FrameSampling, VideoOptions};
use videollava::media::{Cancel, MediaLimits, RgbImage};
use videollava::processor::image_processor::{ImageProcessor, ImageProcessorConfig};

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn seconds() -> f64 {
    std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

fn read_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect();
    files.sort();
    files.into_iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

const INTERESTING: [u8; 8] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE, 0x40, 0x10];

/// One to eight random mutations of `input` (splicing from `others`).
fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if len > 4 => {
                // A 16- or 32-bit field set to a large or small value (sizes, counts, lengths).
                let i = rng.below(len - 4);
                let val: u32 = [0, 1, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 16384, 2_000_000][rng.below(7)];
                if rng.below(2) == 0 {
                    v[i..i + 4].copy_from_slice(&val.to_be_bytes());
                } else {
                    v[i..i + 2].copy_from_slice(&(val as u16).to_le_bytes());
                }
            }
            3 if len > 0 => {
                let at = rng.below(len);
                v.truncate(at.max(1));
            }
            4 if len > 1 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                v.drain(a..b);
            }
            5 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            6 if len > 1 => {
                // Duplicate a range (repeated chunks, frames).
                let a = rng.below(len);
                let b = (a + 1 + rng.below(256)).min(len);
                let copy = v[a..b].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, copy);
            }
            7 if !others.is_empty() => {
                let o = &others[rng.below(others.len())];
                if !o.is_empty() && len > 0 {
                    let a = rng.below(o.len());
                    let b = (a + 1 + rng.below(512)).min(o.len());
                    let at = rng.below(len);
                    let end = (at + (b - a)).min(len);
                    v.splice(at..end, o[a..b].iter().copied());
                }
            }
            _ => {}
        }
    }
    if v.starts_with(b"\x89PNG\r\n\x1a\n") && rng.below(4) != 0 {
        fix_png_crcs(&mut v);
    }
    v
}

/// Recomputes the CRC of every complete PNG chunk, so that mutations reach the decoder.
fn fix_png_crcs(v: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= v.len() {
        let len = u32::from_be_bytes([v[at], v[at + 1], v[at + 2], v[at + 3]]) as usize;
        let Some(end) = at.checked_add(8 + len) else { return };
        if end + 4 > v.len() {
            return;
        }
        let crc = crc32(&v[at + 4..end]);
        v[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Runs `f` on mutated seeds until `secs` have passed; returns the number of executions.
fn run(target: &str, secs: f64, seeds: &[Vec<u8>], mut f: impl FnMut(&[u8])) -> u64 {
    assert!(!seeds.is_empty(), "{target}: no seeds");
    let mut rng = Rng(
        seed() ^ target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    );
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut execs = 0u64;
    let mut corpus: Vec<Vec<u8>> = seeds.to_vec();
    while Instant::now() < deadline {
        let base = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, base, seeds);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input)));
        if result.is_err() {
            let path = std::env::temp_dir().join(format!("videollava-fuzz-{target}-{execs}.bin"));
            std::fs::write(&path, &input).unwrap();
            panic!("{target}: input {execs} panicked; saved to {}", path.display());
        }
        // Keep a few mutants around so that mutations stack up.
        if rng.below(16) == 0 {
            if corpus.len() < 256 {
                corpus.push(input);
            } else {
                let i = seeds.len() + rng.below(corpus.len() - seeds.len());
                corpus[i] = input;
            }
        }
        execs += 1;
    }
    eprintln!("fuzz {target}: {execs} executions in {secs} s, no panic");
    execs
}

fn small_limits() -> MediaLimits {
    MediaLimits { max_pixels: 4096 * 4096, max_video_frames: 2000, max_video_seconds: 120.0, ..MediaLimits::default() }
}

fn image_target(secs: f64) -> u64 {
    let seeds = read_dir(&fixtures().join("images"), |n| !n.ends_with(".safetensors") && !n.ends_with(".json"));
    let mut extra = read_dir(&fixtures().join("media"), |n| n.ends_with(".png") || n.ends_with(".jpg"));
    extra.extend(seeds);
    let limits = small_limits();
    run("image", secs, &extra, |b| {
        if let Ok(img) = decode_image_bytes_with(b, "fuzz", &limits) {
            assert_eq!(img.data.len(), img.width * img.height * 3);
            assert!((img.width as u64 * img.height as u64) <= limits.max_pixels);
            assert!(img.width.max(img.height) as f64 <= img.width.min(img.height) as f64 * limits.max_aspect_ratio);
        }
    })
}

fn video_target(secs: f64) -> u64 {
    let mut seeds = read_dir(&fixtures().join("videos"), |n| {
        [".mp4", ".mkv", ".webm", ".avi", ".gif", ".m4a"].iter().any(|e| n.ends_with(e))
    });
    seeds.extend(read_dir(&fixtures().join("media"), |n| n.ends_with(".mp4") || n.ends_with(".webm")));
    seeds.push(b"YUV4MPEG2 W8 H6 F25:1 Ip A1:1 C420jpeg\nFRAME\n".iter().copied().chain([128u8; 72]).collect());
    let limits = small_limits();
    let cancel = Cancel::new();
    run("video", secs, &seeds, |b| {
        for (n, sampling) in [(8, FrameSampling::Uniform), (3, FrameSampling::Linspace)] {
            let opts = VideoOptions { num_frames: n, sampling };
            if let Ok(v) = decode_video_bytes(Arc::from(b.to_vec()), "fuzz", &opts, &limits, &cancel) {
                assert_eq!(v.frames.len(), n);
                assert!(v.total_frames as u64 <= limits.max_video_frames);
                assert!(v.frame_indices.iter().all(|&i| i < v.total_frames));
            }
        }
    })
}

/// The processor on arbitrary image sizes (extreme aspect ratios included) and configurations:
/// an error or an output of the promised size, never a panic or a huge allocation.
fn processor_target(secs: f64) -> u64 {
    let configs: Vec<ImageProcessor> = [
        r#"{"size": {"shortest_edge": 224}, "crop_size": 224}"#,
        r#"{"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}, "resample": 1}"#,
        r#"{"size": {"height": 40, "width": 60}, "do_center_crop": false, "resample": 2}"#,
        r#"{"do_resize": false, "crop_size": 20}"#,
        r#"{"size": {"shortest_edge": 64}, "do_center_crop": false, "resample": 0}"#,
    ]
    .iter()
    .map(|c| {
        let cfg: ImageProcessorConfig = serde_json::from_str(c).unwrap();
        ImageProcessor::new(cfg).unwrap()
    })
    .collect();
    let mut rng = Rng(seed() ^ 0xABCD);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut execs = 0u64;
    while Instant::now() < deadline {
        // Sides from 1 to 4096 with a bias to thin shapes; at most 2 Mpx so each run is quick.
        let side = |rng: &mut Rng| match rng.below(3) {
            0 => 1 + rng.below(4),
            1 => 1 + rng.below(300),
            _ => 1 + rng.below(4096),
        };
        let (mut w, mut h) = (side(&mut rng), side(&mut rng));
        while w * h > 2_000_000 {
            if w > h {
                w /= 2
            } else {
                h /= 2
            }
        }
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i as u64).wrapping_mul(2654435761) as u8).collect();
        let image = RgbImage::new(w, h, data).unwrap();
        let p = &configs[rng.below(configs.len())];
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.preprocess(&image)));
        match result {
            Err(_) => panic!("processor: {w}x{h} with {:?} panicked", p.config()),
            Ok(Ok(out)) => {
                let (eh, ew) = p.output_size(h, w);
                assert_eq!((out.height, out.width), (eh, ew), "{w}x{h}");
                assert_eq!(out.data.len(), 3 * eh * ew);
            }
            Ok(Err(e)) => assert!(e.to_string().contains("aspect ratio"), "{w}x{h}: unexpected error {e}"),
        }
        execs += 1;
    }
    eprintln!("fuzz processor: {execs} executions in {secs} s, no panic");
    execs
}

#[test]
fn fuzz_image_decoding() {
    assert!(image_target(seconds()) > 0);
}

#[test]
fn fuzz_video_decoding() {
    assert!(video_target(seconds()) > 0);
}

#[test]
fn fuzz_processor() {
    assert!(processor_target(seconds()) > 0);
}

/// The long run: `FUZZ_SECONDS` split over the three targets, one after the other.
#[test]
#[ignore = "long-running fuzzing; run with FUZZ_SECONDS=1800 and --ignored"]
fn long_fuzz_all() {
    let s = seconds();
    let (i, v, p) = (image_target(s * 0.4), video_target(s * 0.45), processor_target(s * 0.15));
    eprintln!("fuzz total: image {i}, video {v}, processor {p} executions");
}
