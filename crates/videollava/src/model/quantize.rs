//! Weight quantization at load time (`--quantize`), like bitsandbytes' `load_in_8bit` /
//! `load_in_4bit` in transformers, with GGML block formats run by candle's quantized CPU kernels.
//!
//! What is quantized: every linear layer of the language model (attention q/k/v/o, MLP
//! gate/up/down, and the LM head), i.e. ~96% of the 7B checkpoint's bytes. The vision towers, the
//! projector, embeddings and norms stay in the compute dtype.
//!
//! Formats (weights `[out, in]` quantized along `in` in blocks):
//! - `q8_0`: blocks of 32 values, one f16 scale + 32 int8 (8.5 bits/weight).
//! - `q4k`: super-blocks of 256 values, 4-bit values with 6-bit sub-block scales and mins
//!   (4.5 bits/weight); the LM head gets `Q6K` (6.6 bits/weight) as in llama.cpp's Q4_K_M. A
//!   layer whose `in` is not a multiple of 256 falls back to `q8_0`, and one whose `in` is not a
//!   multiple of 32 stays dense; [`QuantizeReport`] lists them.
//!
//! Quantizing a 7B model takes tens of seconds, so the result is saved as a GGUF file in a cache
//! directory keyed by the checkpoint's weight files (names, sizes, modification times) and the
//! format; the next load maps that file into memory and our kernels read the blocks in place
//! ([`MappedQuant`]: no copy, nothing read until used, the OS keeps the file cached between runs),
//! never reading those layers' 16-bit weights from the checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use rayon::prelude::*;

use super::linear::{Linear, LinearWeight};
pub use super::weights::MappedQuant;
use crate::error::{Error, Result};

/// A weight quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit: blocks of 32 int8 values with one f16 scale.
    Q8_0,
    /// 4-bit k-quant: super-blocks of 256 values.
    Q4K,
}

impl std::str::FromStr for QuantFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "q8_0" | "q8" | "8bit" | "int8" => Ok(Self::Q8_0),
            "q4k" | "q4_k" | "q4" | "4bit" | "int4" => Ok(Self::Q4K),
            other => Err(Error::Input(format!("unknown quantization `{other}` (expected q8_0 or q4k)"))),
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl QuantFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4k",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// The GGML type used for a weight with `in_features` columns: the format itself, `q8_0` when
    /// the row length does not fit its blocks, `None` (stay dense) when neither fits.
    pub fn for_row_length(self, in_features: usize) -> Option<GgmlDType> {
        [self.ggml(), GgmlDType::Q8_0].into_iter().find(|t| in_features % t.block_size() == 0)
    }

    /// The GGML type for layer `name`: like [`Self::for_row_length`], except that under `q4k` the
    /// LM head gets 6 bits (`Q6K`), as llama.cpp's Q4_K_M does: 4-bit noise on 32,000 logits
    /// flips the most likely token far more often than noise inside the decoder does.
    pub fn for_layer(self, name: &str, in_features: usize) -> Option<GgmlDType> {
        if self == Self::Q4K && name.ends_with("lm_head.weight") {
            return [GgmlDType::Q6K, GgmlDType::Q8_0].into_iter().find(|t| in_features % t.block_size() == 0);
        }
        self.for_row_length(in_features)
    }
}

/// Where quantized weights are cached between loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantCache {
    /// `$VIDEOLLAVA_CACHE`, else `$XDG_CACHE_HOME/videollava`, else `~/.cache/videollava`.
    Default,
    /// This directory.
    Dir(PathBuf),
    /// Neither read nor written.
    Off,
}

impl QuantCache {
    /// The cache directory, if any.
    pub fn dir(&self) -> Option<PathBuf> {
        match self {
            Self::Off => None,
            Self::Dir(d) => Some(d.clone()),
            Self::Default => {
                let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
                env("VIDEOLLAVA_CACHE")
                    .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("videollava")))
                    .or_else(|| env("HOME").map(|d| d.join(".cache").join("videollava")))
            }
        }
    }

    /// The cache file for checkpoint `dir` (its `weight_files`) quantized to `format`.
    pub fn file_for(&self, dir: &Path, weight_files: &[PathBuf], format: QuantFormat) -> Result<Option<PathBuf>> {
        let Some(root) = self.dir() else { return Ok(None) };
        let key = source_key(weight_files, format)?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        Ok(Some(root.join("quantized").join(format!("{name}-{key}-{format}.gguf"))))
    }
}

/// A stable key of the weight files and the format: FNV-1a over names, sizes and mtimes.
pub fn source_key(weight_files: &[PathBuf], format: QuantFormat) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(concat!("videollava-quant-v1-", env!("CARGO_PKG_VERSION")).as_bytes());
    feed(format.name().as_bytes());
    for f in weight_files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        let canonical = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        feed(canonical.to_string_lossy().as_bytes());
        feed(&meta.len().to_le_bytes());
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        feed(&mtime.map(|d| d.as_nanos()).unwrap_or(0).to_le_bytes());
    }
    Ok(format!("{h:016x}"))
}

/// What [`quantize_linears`] did.
#[derive(Debug, Clone, Default)]
pub struct QuantizeReport {
    pub format: Option<QuantFormat>,
    /// Layers quantized now or read from the cache, by GGML type name.
    pub quantized: HashMap<String, usize>,
    /// Layers whose row length fits no block size (stay dense).
    pub kept_dense: Vec<String>,
    /// Layers read from the cache file instead of being quantized.
    pub from_cache: usize,
    /// The cache file read or written.
    pub cache_file: Option<PathBuf>,
    /// Why the cache was not used or not written, when that happened.
    pub cache_note: Option<String>,
    /// Bytes of the quantized weights.
    pub quantized_bytes: usize,
    pub elapsed_ms: f64,
}

/// Quantized tensors read from a cache file, by canonical name.
pub struct CachedQuantized {
    path: PathBuf,
    content: gguf_file::Content,
    /// The whole file, memory-mapped (`None` where mapping failed: tensors are then read).
    map: Option<Arc<memmap2::Mmap>>,
}

const META_FORMAT: &str = "videollava.quant_format";
const META_KEY: &str = "videollava.source_key";

impl CachedQuantized {
    /// Opens cache file `path` if it exists and was made from the same weights in `format`.
    pub fn open(path: &Path, format: QuantFormat, key: &str) -> std::result::Result<Option<Self>, String> {
        if !path.is_file() {
            return Ok(None);
        }
        let mut f = BufReader::new(File::open(path).map_err(|e| format!("{}: {e}", path.display()))?);
        let content = gguf_file::Content::read(&mut f).map_err(|e| format!("{}: {e}", path.display()))?;
        let meta = |k: &str| content.metadata.get(k).and_then(|v| v.to_string().ok().cloned());
        if meta(META_FORMAT).as_deref() != Some(format.name()) || meta(META_KEY).as_deref() != Some(key) {
            return Err(format!("{}: made from other weights or another format; ignored", path.display()));
        }
        // Like any memory-mapped weights, the file must not be rewritten in place while the model
        // runs (the cache is replaced by renaming a new file over it, which leaves this map on the
        // old one).
        let map = File::open(path).ok().and_then(|f| crate::mapped::map_read_only(&f).ok()).map(Arc::new);
        Ok(Some(Self { path: path.to_path_buf(), content, map }))
    }

    /// Tensor `name` read in place from the mapped file, when it is there in a format our kernels
    /// read (Q8_0, Q4K, Q6K) with the byte count its shape needs.
    fn mapped(&self, name: &str) -> Option<MappedQuant> {
        let map = self.map.as_ref()?;
        let info = self.content.tensor_infos.get(name)?;
        if !matches!(info.ggml_dtype, GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K) {
            return None;
        }
        let dims = info.shape.dims2().ok()?;
        let (bs, ts) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        if !dims.1.is_multiple_of(bs) {
            return None;
        }
        let len = dims.0 * (dims.1 / bs) * ts;
        let offset = self.content.tensor_data_offset as usize + info.offset as usize;
        (offset + len <= map.len()).then(|| MappedQuant::new(map.clone(), offset, len, info.ggml_dtype, dims))
    }

    /// Canonical names and shapes (`[out, in]`) of the tensors in the file.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.content.tensor_infos.iter().map(|(n, i)| (n.clone(), i.shape.dims().to_vec())).collect()
    }

    fn tensor(&self, name: &str) -> Result<Option<QTensor>> {
        if !self.content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let mut f = BufReader::new(File::open(&self.path).map_err(|e| Error::io(&self.path, e))?);
        let t = self
            .content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: tensor `{name}`: {e}", self.path.display())))?;
        Ok(Some(t))
    }
}

/// Quantizes `linears` (canonical weight name, layer) to `format` in place, taking layers from
/// `cached` when it holds them, and writes a new cache file to `save_to` when anything was
/// quantized now. Layers are quantized in parallel on rayon's pool.
pub fn quantize_linears(
    linears: Vec<(String, &mut Linear)>,
    format: QuantFormat,
    cached: Option<&CachedQuantized>,
    save_to: Option<(&Path, &str)>,
) -> Result<QuantizeReport> {
    let t = Instant::now();
    let mut report = QuantizeReport { format: Some(format), ..Default::default() };
    // Read cached layers first (sequential file reads), then quantize the rest in parallel.
    let mut todo = Vec::new();
    for (name, linear) in linears {
        if let Some(m) = cached.and_then(|c| c.mapped(&name)) {
            linear.set_weight(LinearWeight::MappedQuantized(m))?;
            report.from_cache += 1;
            continue;
        }
        match cached.map(|c| c.tensor(&name)).transpose()?.flatten() {
            Some(q) => {
                linear.set_weight(LinearWeight::Quantized(Arc::new(q)))?;
                report.from_cache += 1;
            }
            None => todo.push((name, linear)),
        }
    }
    let results: Vec<Result<Option<(String, Arc<QTensor>)>>> = todo
        .into_par_iter()
        .map(|(name, linear)| {
            let (_, in_f) = linear.dims()?;
            let Some(ggml) = format.for_layer(&name, in_f) else { return Ok(None) };
            let LinearWeight::Dense(w) = linear.weight() else { return Ok(None) };
            let q = Arc::new(
                QTensor::quantize(w, ggml)
                    .map_err(|e| Error::Model(format!("quantizing `{name}` to {ggml:?}: {e}")))?,
            );
            linear.set_weight(LinearWeight::Quantized(q.clone()))?;
            Ok(Some((name, q)))
        })
        .collect();
    let mut fresh = Vec::new();
    for r in results {
        if let Some(x) = r? {
            fresh.push(x);
        }
    }
    if let (false, Some((path, key))) = (fresh.is_empty(), save_to) {
        match write_cache(path, format, key, &fresh, cached) {
            Ok(()) => report.cache_file = Some(path.to_path_buf()),
            Err(e) => report.cache_note = Some(format!("quantized weights not saved: {e}")),
        }
    } else if cached.is_some() {
        report.cache_file = cached.map(|c| c.path.clone());
    }
    report.elapsed_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// Counts what the layers hold now (called after [`quantize_linears`]).
pub fn summarize<'a>(linears: impl IntoIterator<Item = (String, &'a Linear)>, report: &mut QuantizeReport) {
    report.quantized.clear();
    report.kept_dense.clear();
    report.quantized_bytes = 0;
    for (name, l) in linears {
        match l.weight() {
            LinearWeight::Quantized(q) => {
                *report.quantized.entry(format!("{:?}", q.dtype())).or_insert(0) += 1;
                report.quantized_bytes += q.storage_size_in_bytes();
            }
            LinearWeight::MappedQuantized(m) => {
                *report.quantized.entry(format!("{:?}", m.dtype())).or_insert(0) += 1;
                report.quantized_bytes += m.bytes().len();
            }
            LinearWeight::Dense(_) | LinearWeight::Mapped(_) => report.kept_dense.push(name),
        }
    }
}

/// Writes every quantized tensor (fresh and, if any, previously cached) to `path` atomically.
fn write_cache(
    path: &Path,
    format: QuantFormat,
    key: &str,
    fresh: &[(String, Arc<QTensor>)],
    cached: Option<&CachedQuantized>,
) -> Result<()> {
    let mut all: Vec<(String, Arc<QTensor>)> = fresh.to_vec();
    if let Some(c) = cached {
        for (name, _) in c.shapes() {
            if !fresh.iter().any(|(n, _)| *n == name) {
                if let Some(q) = c.tensor(&name)? {
                    all.push((name, Arc::new(q)));
                }
            }
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut w = BufWriter::new(File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
        let fmt = gguf_file::Value::String(format.name().to_string());
        let k = gguf_file::Value::String(key.to_string());
        let metadata = [(META_FORMAT, &fmt), (META_KEY, &k)];
        let tensors: Vec<(&str, &QTensor)> = all.iter().map(|(n, q)| (n.as_str(), q.as_ref())).collect();
        gguf_file::write(&mut w, &metadata, &tensors).map_err(|e| Error::Model(format!("{}: {e}", tmp.display())))?;
        use std::io::Write;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Agreement of a quantized model's next-token distributions with a reference's, over the same
/// positions (teacher-forced on the same tokens).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LogitAgreement {
    pub positions: usize,
    /// Share of positions whose most likely token is the same.
    pub top1_agreement: f64,
    /// Mean over positions of KL(p_reference || p_quantized), in nats.
    pub mean_kl: f64,
    pub max_kl: f64,
    /// Mean over positions of the reference's top-1 probability and of its logit margin over the
    /// runner-up: how decided the reference is (random-weight checkpoints are nearly undecided,
    /// so their argmax flips under tiny perturbations).
    pub mean_reference_top1_prob: f64,
    pub mean_reference_margin: f64,
}

/// Compares logits `reference` and `other`, both row-major `[positions, vocab]` f32.
pub fn compare_logits(reference: &[f32], other: &[f32], vocab: usize) -> Result<LogitAgreement> {
    if vocab == 0 || reference.len() != other.len() || reference.len() % vocab != 0 {
        return Err(Error::Input(format!(
            "logits of {} and {} values do not both hold rows of {vocab}",
            reference.len(),
            other.len()
        )));
    }
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        row.iter().map(|&v| v as f64 - lse).collect()
    };
    let argmax = |row: &[f32]| {
        row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
    };
    let positions = reference.len() / vocab;
    let (mut agree, mut kl_sum, mut kl_max, mut p1_sum, mut margin_sum) = (0usize, 0f64, 0f64, 0f64, 0f64);
    for (r, o) in reference.chunks(vocab).zip(other.chunks(vocab)) {
        let top = argmax(r);
        agree += (top == argmax(o)) as usize;
        let runner_up = r.iter().enumerate().filter(|(i, _)| *i != top).fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
        if runner_up.is_finite() {
            margin_sum += (r[top] - runner_up) as f64;
        }
        let (lr, lo) = (log_softmax(r), log_softmax(o));
        p1_sum += lr[top].exp();
        let kl: f64 = lr.iter().zip(&lo).map(|(a, b)| a.exp() * (a - b)).sum::<f64>().max(0.0);
        kl_sum += kl;
        kl_max = kl_max.max(kl);
    }
    Ok(LogitAgreement {
        positions,
        top1_agreement: agree as f64 / positions.max(1) as f64,
        mean_kl: kl_sum / positions.max(1) as f64,
        max_kl: kl_max,
        mean_reference_top1_prob: p1_sum / positions.max(1) as f64,
        mean_reference_margin: margin_sum / positions.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Tensor};

    #[test]
    fn logit_agreement_counts_top1_and_kl() {
        // Identical rows: full agreement, zero divergence.
        let a = [1.0f32, 2.0, 0.5, -1.0, 3.0, 0.0];
        let same = compare_logits(&a, &a, 3).unwrap();
        assert_eq!((same.positions, same.top1_agreement), (2, 1.0));
        assert!(same.mean_kl.abs() < 1e-12);
        // Second row's argmax moves: half agreement; KL by hand for row 2 of p=[.5,.5] vs q=[.2,.8].
        let r = [0.0f32, 0.0, 0.0, 0.0];
        let o = [0.0f32, 0.0, 0.0, (0.8f32 / 0.2).ln()];
        let c = compare_logits(&r, &o, 2).unwrap();
        assert_eq!(c.top1_agreement, 0.5);
        let want = 0.5 * (0.5f64 / 0.8).ln() + 0.5 * (0.5f64 / 0.2).ln();
        assert!((c.max_kl - want).abs() < 1e-6, "{} vs {want}", c.max_kl);
        assert!((c.mean_kl - want / 2.0).abs() < 1e-6);
        assert_eq!(c.mean_reference_margin, 0.0); // the reference rows are ties
        assert!((c.mean_reference_top1_prob - 0.5).abs() < 1e-9);
        assert!(compare_logits(&r, &o[..3], 2).is_err());
    }

    #[test]
    fn formats_parse_and_fall_back_by_row_length() {
        assert_eq!("Q4_K".parse::<QuantFormat>().unwrap(), QuantFormat::Q4K);
        assert_eq!("8bit".parse::<QuantFormat>().unwrap(), QuantFormat::Q8_0);
        let e = "nf4".parse::<QuantFormat>().unwrap_err().to_string();
        assert!(e.contains("nf4") && e.contains("q4k"), "{e}");
        assert_eq!(QuantFormat::Q4K.for_row_length(4096), Some(GgmlDType::Q4K));
        assert_eq!(QuantFormat::Q4K.for_row_length(96), Some(GgmlDType::Q8_0));
        assert_eq!(QuantFormat::Q8_0.for_row_length(40), None);
        assert_eq!(QuantFormat::Q4K.for_layer("language_model.lm_head.weight", 4096), Some(GgmlDType::Q6K));
        assert_eq!(
            QuantFormat::Q4K.for_layer("language_model.model.layers.0.mlp.up_proj.weight", 4096),
            Some(GgmlDType::Q4K)
        );
        assert_eq!(QuantFormat::Q8_0.for_layer("language_model.lm_head.weight", 4096), Some(GgmlDType::Q8_0));
    }

    /// Whether our int8 GEMM runs `format`'s blocks on this CPU.
    fn q8_gemm_fast(format: QuantFormat) -> bool {
        match format {
            QuantFormat::Q8_0 => crate::kernels::q8_gemm::has_fast_path(),
            QuantFormat::Q4K => crate::kernels::q4k_gemm::has_fast_path(),
        }
    }

    /// The LM head's Q6K blocks from the mapped cache with more than 8 rows (teacher-forced
    /// logits of every position): the matrix-vector kernel 8 rows at a time, close to candle's
    /// quantized matmul on the same blocks.
    #[test]
    fn mapped_q6k_blocks_take_any_number_of_rows() {
        let dev = Device::Cpu;
        let values = |n: usize, seed: f32, scale: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 * 12.9898 + seed).sin() * 43758.547).fract() * scale).collect()
        };
        let w = Tensor::from_vec(values(40 * 512, 1.0, 0.05), (40, 512), &dev).unwrap();
        let tmp = std::env::temp_dir().join(format!("videollava-q6k-test-{}", std::process::id()));
        let path = tmp.join("q.gguf");
        let mut head = Linear::new(w.clone(), None);
        // The LM head's name gives Q6K under q4k.
        quantize_linears(
            vec![("language_model.lm_head.weight".into(), &mut head)],
            QuantFormat::Q4K,
            None,
            Some((&path, "k")),
        )
        .unwrap();
        assert!(matches!(head.weight(), LinearWeight::Quantized(q) if q.dtype() == GgmlDType::Q6K));
        let cached = CachedQuantized::open(&path, QuantFormat::Q4K, "k").unwrap().unwrap();
        let mut mapped = Linear::new(Tensor::zeros((40, 512), DType::F32, &dev).unwrap(), None);
        quantize_linears(
            vec![("language_model.lm_head.weight".into(), &mut mapped)],
            QuantFormat::Q4K,
            Some(&cached),
            None,
        )
        .unwrap();
        assert!(matches!(mapped.weight(), LinearWeight::MappedQuantized(m) if m.dtype() == GgmlDType::Q6K));
        let x = Tensor::from_vec(values(21 * 512, 5.0, 1.0), (21, 512), &dev).unwrap();
        let (ya, yb) = (head.forward(&x).unwrap(), mapped.forward(&x).unwrap());
        let scale = ya.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let d = (&yb - &ya).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Both quantize the input per 256 values to 8 bits (exact integer products); only the
        // order of the f32 sums differs.
        assert!(d <= 1e-4 * scale, "mapped Q6K differs by {d} (outputs up to {scale})");
        let _ = std::fs::remove_dir_all(tmp);
    }

    #[test]
    fn quantized_linear_is_close_and_the_cache_round_trips() {
        let dev = Device::Cpu;
        // Deterministic pseudo-random values in (-1, 1).
        let values = |n: usize, seed: f32, scale: f32| -> Vec<f32> {
            (0..n).map(|i| ((i as f32 * 12.9898 + seed).sin() * 43758.547).fract() * scale).collect()
        };
        let w = Tensor::from_vec(values(48 * 512, 0.0, 0.05), (48, 512), &dev).unwrap();
        let x = Tensor::from_vec(values(3 * 512, 7.0, 1.0), (3, 512), &dev).unwrap();
        let dense = Linear::new(w.clone(), None).forward(&x).unwrap();
        let tmp = std::env::temp_dir().join(format!("videollava-quant-test-{}", std::process::id()));
        let path = tmp.join("q.gguf");
        for format in [QuantFormat::Q8_0, QuantFormat::Q4K] {
            let mut a = Linear::new(w.clone(), None);
            let mut b = Linear::new(w.to_dtype(DType::BF16).unwrap(), None);
            let r = quantize_linears(
                vec![("a.weight".into(), &mut a), ("b.weight".into(), &mut b)],
                format,
                None,
                Some((&path, "k1")),
            )
            .unwrap();
            assert_eq!(r.cache_file.as_deref(), Some(path.as_path()));
            let ya = a.forward(&x).unwrap();
            let rel = ((&ya - &dense).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
                / dense.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sqrt();
            // Uniform weights and inputs (both quantized, the input to 8 bits per block):
            // ~1% RMS error at 8 bits, ~8% at 4 bits.
            let bound = if format == QuantFormat::Q8_0 { 0.02 } else { 0.12 };
            assert!(rel < bound, "{format}: relative error {rel}");
            assert!(rel > 0.0, "{format}: no quantization happened");
            // The cache gives back the same blocks, and a wrong key is refused.
            assert!(CachedQuantized::open(&path, format, "other").is_err());
            let cached = CachedQuantized::open(&path, format, "k1").unwrap().unwrap();
            let mut c = Linear::new(Tensor::zeros((48, 512), DType::F32, &dev).unwrap(), None);
            let r = quantize_linears(vec![("a.weight".into(), &mut c)], format, Some(&cached), None).unwrap();
            assert_eq!(r.from_cache, 1);
            // ... read in place from the memory-mapped file.
            assert!(matches!(c.weight(), LinearWeight::MappedQuantized(_)), "{format}: not mapped");
            let yc = c.forward(&x).unwrap();
            let d = (yc - &ya).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "{format}: cached layer differs");
            // Prefill-sized inputs: our int8 GEMM on both (or, without it, the mapped blocks
            // through the matrix-vector kernel 8 rows at a time against candle's matmul).
            let x13 = Tensor::from_vec(values(13 * 512, 3.0, 1.0), (13, 512), &dev).unwrap();
            let (y13a, y13c) = (a.forward(&x13).unwrap(), c.forward(&x13).unwrap());
            let d = (&y13c - &y13a).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // Without our GEMM, `a` runs candle's quantized matmul, which on x86 with AVX-512
            // VNNI quantizes the activations per 256 values (its tiled path) where the mapped
            // blocks' kernel quantizes per 32: the two differ by activation quantization noise.
            let max = y13a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let tol = if q8_gemm_fast(format) { 0.0 } else { 5e-3 * (max + 1.0) };
            assert!(d <= tol, "{format}: 13 rows from the mapped cache differ by {d}");
        }
        let _ = std::fs::remove_dir_all(tmp);
    }
}
