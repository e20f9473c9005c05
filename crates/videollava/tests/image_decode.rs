//! Image decoding against Pillow: every fixture made by
//! `scripts/reference/image_decode_fixtures.py` must decode byte-identical to
//! `np.asarray(Image.open(f).convert("RGB"))`, the shared photos must match their recorded sha256,
//! and broken inputs must give one-line errors naming the file.

use crate::common;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use videollava::media::image::{decode_image_bytes, decode_image_file};

/// Number of image fixtures the script writes; guards against a vacuous pass.
const EXPECTED_FIXTURES: usize = 53;

fn images_dir() -> PathBuf {
    common::fixtures_dir().join("images")
}

fn fixture_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(images_dir())
        .expect("tests/fixtures/images is missing: run scripts/reference/image_decode_fixtures.py")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            !n.ends_with(".safetensors") && !n.ends_with(".json")
        })
        .collect();
    files.sort();
    files
}

fn expected_rgb(file: &Path) -> (usize, usize, Vec<u8>) {
    let path = PathBuf::from(format!("{}.rgb.safetensors", file.display()));
    let (tensors, _) = common::read_safetensors(&path);
    let t = &tensors["rgb"];
    assert_eq!(t.shape.len(), 3, "{}: rgb must be [H, W, 3]", path.display());
    assert_eq!(t.shape[2], 3);
    (t.shape[0], t.shape[1], t.u8s())
}

#[test]
fn fixtures_decode_exactly_as_pillow() {
    let files = fixture_files();
    assert_eq!(files.len(), EXPECTED_FIXTURES, "fixture count changed: {files:?}");
    let mut failures = Vec::new();
    for file in &files {
        let (h, w, want) = expected_rgb(file);
        let got = match decode_image_file(file) {
            Ok(img) => img,
            Err(e) => {
                failures.push(format!("{}: error {e}", file.display()));
                continue;
            }
        };
        if (got.height, got.width) != (h, w) {
            failures.push(format!("{}: size {}x{}, Pillow {w}x{h}", file.display(), got.width, got.height));
            continue;
        }
        let diffs: Vec<usize> =
            got.data.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).unsigned_abs() as usize).collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        if max != 0 {
            let count = diffs.iter().filter(|&&d| d != 0).count();
            let first = diffs.iter().position(|&d| d != 0).unwrap();
            let (y, x, c) = (first / 3 / w, first / 3 % w, first % 3);
            failures.push(format!(
                "{}: max abs diff {max}, {count} of {} values differ; first at y={y} x={x} c={c}: ours {} Pillow {}",
                file.display(),
                diffs.len(),
                got.data[first],
                want[first]
            ));
        } else {
            // Same bytes through the in-memory entry point.
            let bytes = std::fs::read(file).unwrap();
            let again = decode_image_bytes(&bytes, "in-memory").unwrap();
            assert_eq!(again, got, "{}: decode_image_bytes differs from decode_image_file", file.display());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures differ from Pillow:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn shared_media_match_pillow_sha256() {
    let expected_path = images_dir().join("shared_media.expected.json");
    let text = std::fs::read_to_string(&expected_path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let images = json["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    for entry in images {
        let rel = entry["file"].as_str().unwrap();
        let Some(path) = common::shared_dir("shared_media_match_pillow_sha256", rel) else {
            return;
        };
        let img = decode_image_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(img.width as u64, entry["width"].as_u64().unwrap(), "{rel}: width");
        assert_eq!(img.height as u64, entry["height"].as_u64().unwrap(), "{rel}: height");
        let digest: String = Sha256::digest(&img.data).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest, entry["sha256_rgb"].as_str().unwrap(), "{rel}: RGB bytes differ from Pillow's");
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("videollava-image-decode-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Decoding must fail with one line that names the file.
fn assert_error(path: &Path, must_mention: &[&str]) -> String {
    let result = std::panic::catch_unwind(|| decode_image_file(path));
    let result = result.unwrap_or_else(|_| panic!("{}: decoder panicked", path.display()));
    let err = match result {
        Ok(img) => panic!("{}: decoded to {img:?}, expected an error", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&path.display().to_string()), "error does not name the file: {err}");
    assert!(!err.contains('\n'), "error is not one line: {err:?}");
    eprintln!("expected error: {err}");
    for word in must_mention {
        assert!(err.to_lowercase().contains(&word.to_lowercase()), "error {err:?} should mention {word:?}");
    }
    err
}

#[test]
fn broken_inputs_give_errors_naming_the_file() {
    let dir = temp_dir("broken");
    let write = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    assert_error(&dir.join("does_not_exist.jpg"), &[]);
    assert_error(&write("empty.png", b""), &["empty"]);

    // Random bytes (seeded LCG).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    assert_error(&write("random.jpg", &random), &["supported formats"]);

    // Unsupported formats are named, with the supported list.
    assert_error(&write("image.tiff", b"II*\0\x08\0\0\0\0\0\0\0"), &["TIFF", "supported formats"]);
    assert_error(
        &write(
            "drawing.svg",
            b"<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"></svg>",
        ),
        &["SVG", "supported formats"],
    );

    // Truncated files of every format, cut at several points.
    for name in [
        "jpeg_420.jpg",
        "jpeg_progressive.jpg",
        "png_rgb.png",
        "png_palette.png",
        "gif_static.gif",
        "webp_lossy.webp",
        "webp_lossless.webp",
        "bmp_24.bmp",
    ] {
        let bytes = std::fs::read(images_dir().join(name)).unwrap();
        for cut in [bytes.len() / 3, bytes.len() / 2, bytes.len() * 9 / 10] {
            assert_error(&write(&format!("truncated_{cut}_{name}"), &bytes[..cut]), &[]);
        }
        // Only the magic bytes.
        assert_error(&write(&format!("magic_only_{name}"), &bytes[..8.min(bytes.len())]), &[]);
    }

    // Absurd dimensions: a PNG header claiming 100000 x 100000 pixels.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    assert_error(&write("huge.png", &png), &["100000x100000"]);

    // Absurd dimensions: a JPEG whose SOF claims 60000 x 60000 (header patched in a real file).
    let mut jpeg = std::fs::read(images_dir().join("jpeg_444.jpg")).unwrap();
    let sof = (0..jpeg.len() - 1).find(|&i| jpeg[i] == 0xFF && jpeg[i + 1] == 0xC0).expect("SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&60000u16.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&60000u16.to_be_bytes());
    assert_error(&write("huge.jpg", &jpeg), &["60000x60000"]);

    // Absurd dimensions: a GIF screen of 65535 x 65535.
    let mut gif = std::fs::read(images_dir().join("gif_static.gif")).unwrap();
    gif[6..10].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    assert_error(&write("huge.gif", &gif), &["65535x65535"]);

    // In-memory input is named by its source name.
    let err = decode_image_bytes(&random, "image #2").unwrap_err().to_string();
    assert!(err.starts_with("image #2: "), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn jpeg_with_extraneous_bytes_decodes_like_pillow() {
    // libjpeg warns "Corrupt JPEG data: N extraneous bytes before marker" and goes on; Pillow
    // ignores the warning and so must we. Insert junk before the SOS marker of a fixture.
    let file = images_dir().join("jpeg_420.jpg");
    let mut bytes = std::fs::read(&file).unwrap();
    let sos = (0..bytes.len() - 1).find(|&i| bytes[i] == 0xFF && bytes[i + 1] == 0xDA).expect("SOS");
    bytes.splice(sos..sos, [0x12u8, 0x34, 0x56]);
    let got = decode_image_bytes(&bytes, "junk.jpg").unwrap_or_else(|e| panic!("{e}"));
    let (_, _, want) = expected_rgb(&file);
    assert!(
        got.data == want,
        "junk.jpg: {} of {} values differ from Pillow",
        got.data.iter().zip(&want).filter(|(a, b)| a != b).count(),
        want.len()
    );
}

#[test]
fn cmyk_formula_matches_pillow() {
    use videollava::media::image::cmyk_to_rgb;
    // Values computed with Pillow 13: Image.new("CMYK", (1, 1), c).convert("RGB").
    assert_eq!(cmyk_to_rgb([0, 0, 0, 0]), [255, 255, 255]);
    assert_eq!(cmyk_to_rgb([255, 255, 255, 255]), [0, 0, 0]);
    assert_eq!(cmyk_to_rgb([0, 0, 0, 255]), [0, 0, 0]);
    assert_eq!(cmyk_to_rgb([128, 64, 32, 16]), PILLOW_CMYK_128_64_32_16);
}

/// `Image.new("CMYK", (1, 1), (128, 64, 32, 16)).convert("RGB").getpixel((0, 0))`.
const PILLOW_CMYK_128_64_32_16: [u8; 3] = [119, 179, 209];

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
