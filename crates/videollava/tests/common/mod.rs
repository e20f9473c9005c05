//! Support shared by the integration tests: where fixtures live, reading them, comparing floats.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

/// `crates/videollava/tests/fixtures`: small files made by `scripts/reference`, committed.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The `shared/` folder that lies beside the repository (real media and the real tokenizer).
/// `VIDEOLLAVA_SHARED_DIR` overrides the location.
///
/// Returns `None` (and says why on stderr) when it is missing and `CI` is not set; when `CI` is set
/// a missing folder fails the test, so CI never passes by skipping.
pub fn shared_dir(test: &str, relative: &str) -> Option<PathBuf> {
    let base = match std::env::var_os("VIDEOLLAVA_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    };
    let path = base.join(relative);
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {} is missing and CI is set: the shared fixtures must be present", path.display());
    }
    eprintln!("SKIPPED {test}: {} not found (set VIDEOLLAVA_SHARED_DIR to the shared/ folder)", path.display());
    None
}

/// A tensor read from a fixture: shape plus values widened to f64 (exact for every dtype we store).
#[derive(Debug, Clone)]
pub struct FixtureTensor {
    pub shape: Vec<usize>,
    pub dtype: safetensors::Dtype,
    pub bytes: Vec<u8>,
}

impl FixtureTensor {
    pub fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, safetensors::Dtype::F32, "tensor is {:?}, not F32", self.dtype);
        self.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
    pub fn i64s(&self) -> Vec<i64> {
        assert_eq!(self.dtype, safetensors::Dtype::I64, "tensor is {:?}, not I64", self.dtype);
        self.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }
    pub fn u8s(&self) -> Vec<u8> {
        assert_eq!(self.dtype, safetensors::Dtype::U8, "tensor is {:?}, not U8", self.dtype);
        self.bytes.clone()
    }
}

/// Reads every tensor of a safetensors file, plus its `__metadata__`.
pub fn read_safetensors(path: &std::path::Path) -> (HashMap<String, FixtureTensor>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors file");
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (name, FixtureTensor { shape: view.shape().to_vec(), dtype: view.dtype(), bytes: view.data().to_vec() })
        })
        .collect();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

/// Largest and mean absolute difference of two equal-length slices.
pub fn abs_diff(a: &[f32], b: &[f32]) -> (f32, f64) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut max = 0f32;
    let mut sum = 0f64;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if d.is_nan() {
            return (f32::NAN, f64::NAN);
        }
        max = max.max(d);
        sum += d as f64;
    }
    (max, if a.is_empty() { 0.0 } else { sum / a.len() as f64 })
}
