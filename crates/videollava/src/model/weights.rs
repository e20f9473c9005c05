//! Finding and opening a checkpoint's safetensors, whatever layout of names it was saved with.
//!
//! Files: a single `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
//! Tensors may be stored as F32, F16 or BF16; the [`VarBuilder`] converts each to the compute
//! dtype chosen at load. Each tensor is read with positioned reads straight into its own buffer
//! (candle copies tensors out of a memory map anyway, which doubled resident memory), except the
//! linear layers' BF16 weights of a BF16 model on a CPU with our BF16 kernels: those stay in the
//! memory-mapped files ([`CheckpointWeights::map_bf16`], [`MappedBf16`]) and are read in place,
//! so loading copies almost nothing and the OS keeps the files cached between runs.
//!
//! Model code asks for the names of the hub checkpoint (transformers 4.46's on-disk layout,
//! reference-spec §2): `image_tower.vision_model.…`, `video_tower.vision_model.…`,
//! `multi_modal_projector.…`, `language_model.model.…`, `language_model.lm_head.weight`.
//! Checkpoints saved with the 4.52+ runtime names (`model.language_model.…`, `lm_head.weight`,
//! `model.image_tower.…`) or by transformers 5.x (no `vision_model.` level) are mapped onto
//! those names by prefix.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Shape, Tensor, WithDType};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The safetensors files of checkpoint directory `dir`, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&index, "", format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| Error::config(&index, format!("weight_map.{name}"), "expected a file name"))?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(Error::config(
                    &index,
                    format!("weight_map.{name}"),
                    format!("`{file}` is not a plain file name"),
                ));
            }
            files.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            return Err(Error::io(
                missing,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "shard listed in model.safetensors.index.json is missing",
                ),
            ));
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Error::io(
            dir.join("model.safetensors"),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no safetensors weights in the checkpoint directory"),
        ));
    }
    Ok(found)
}

/// Canonical prefix -> the prefixes other transformers versions save it under, in order of preference.
const PREFIX_ALTERNATIVES: &[(&str, &[&str])] = &[
    (
        "image_tower.vision_model.",
        &["image_tower.vision_model.", "model.image_tower.vision_model.", "model.image_tower.", "image_tower."],
    ),
    (
        "video_tower.vision_model.",
        &["video_tower.vision_model.", "model.video_tower.vision_model.", "model.video_tower.", "video_tower."],
    ),
    ("multi_modal_projector.", &["multi_modal_projector.", "model.multi_modal_projector."]),
    ("language_model.model.", &["language_model.model.", "model.language_model.", "language_model."]),
    ("language_model.lm_head.", &["language_model.lm_head.", "lm_head."]),
];

/// The opened weights of a checkpoint plus the mapping of canonical names onto stored ones.
pub struct CheckpointWeights {
    pub files: Vec<PathBuf>,
    names: BTreeSet<String>,
    prefix_map: Vec<(String, String)>,
    tensors: SafetensorsReader,
}

/// Where one stored tensor lies.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// Reads tensors of safetensors files on demand with positioned reads.
struct SafetensorsReader {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, TensorEntry>,
    /// Stored names whose values come from elsewhere (a quantized-weights cache): `get` checks
    /// their shape and returns a zero-byte broadcast placeholder instead of reading them.
    deferred: HashSet<String>,
}

impl SafetensorsReader {
    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let (path, file) = &self.files[e.file];
        let n: usize = e.shape.iter().product();
        if (e.end - e.start) as usize != n * e.dtype.size_in_bytes() {
            candle_core::bail!(
                "{}: tensor `{name}` has {} bytes for shape {:?} {:?}",
                path.display(),
                e.end - e.start,
                e.shape,
                e.dtype
            );
        }
        let read = |buf: &mut [u8]| -> candle_core::Result<()> {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(buf, e.start)
                .map_err(|err| candle_core::Error::Msg(format!("{}: reading tensor `{name}`: {err}", path.display())))
        };
        match e.dtype {
            DType::F32 => read_typed::<f32>(n, &e.shape, dev, read),
            DType::BF16 => read_typed::<half::bf16>(n, &e.shape, dev, read),
            DType::F16 => read_typed::<half::f16>(n, &e.shape, dev, read),
            other => candle_core::bail!(
                "{}: tensor `{name}` is {other:?}; only F32, F16 and BF16 weights are supported",
                path.display()
            ),
        }
    }
}

/// Reads `n` little-endian values of `T` into a fresh buffer and wraps it as a tensor.
fn read_typed<T: WithDType + bytemuck::Pod>(
    n: usize,
    shape: &[usize],
    dev: &Device,
    read: impl FnOnce(&mut [u8]) -> candle_core::Result<()>,
) -> candle_core::Result<Tensor> {
    let mut v: Vec<T> = vec![T::from_f64(0.0); n];
    read(bytemuck::cast_slice_mut(&mut v))?;
    Tensor::from_vec(v, shape, dev)
}

impl SimpleBackend for SafetensorsReader {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if self.deferred.contains(name) {
            return Tensor::zeros((), dtype, dev)?.broadcast_as(s);
        }
        let t = self.load(name, dev)?.to_dtype(dtype)?;
        if t.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt())?
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// A BF16 matrix `[rows, cols]` read in place from a memory-mapped safetensors file (the file's
/// pages are the weight: nothing is copied, the OS keeps them cached between runs, and a first
/// run reads them from disk as the model touches them).
#[derive(Clone)]
pub struct MappedBf16 {
    map: std::sync::Arc<memmap2::Mmap>,
    /// Byte offset of the first value in the map (even).
    offset: usize,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for MappedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedBf16 {{ shape: [{}, {}], offset: {} }}", self.rows, self.cols, self.offset)
    }
}

impl MappedBf16 {
    /// Maps the values' pages into the process now ([`crate::mapped::populate`]).
    pub fn prefault(&self) {
        crate::mapped::populate(&self.map, self.offset, self.rows * self.cols * 2);
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The values as BF16 bit patterns, row-major.
    pub fn bits(&self) -> &[u16] {
        let bytes = &self.map[self.offset..self.offset + self.rows * self.cols * 2];
        // Cannot fail: `offset` is even and the map page-aligned (2-byte aligned), the length even;
        // both checked when the view was made.
        bytemuck::cast_slice(bytes)
    }

    /// A copy as a BF16 tensor (for code paths without a kernel reading the map).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let values: Vec<half::bf16> = self.bits().iter().map(|&b| half::bf16::from_bits(b)).collect();
        Ok(Tensor::from_vec(values, (self.rows, self.cols), device)?)
    }
}

impl CheckpointWeights {
    /// Memory-maps, instead of reading, those of `tensors` (canonical name, `[rows, cols]`)
    /// stored as BF16 with that shape; they are deferred (not read by the [`VarBuilder`]), so
    /// the caller must put each returned one in place of the placeholder the model gets.
    ///
    /// The files must not change while the model is loaded (as with any memory-mapped weights,
    /// e.g. llama.cpp's default).
    pub fn map_bf16(&mut self, tensors: &[(String, Vec<usize>)]) -> Result<HashMap<String, MappedBf16>> {
        let mut maps: HashMap<usize, std::sync::Arc<memmap2::Mmap>> = HashMap::new();
        let mut out = HashMap::new();
        for (name, shape) in tensors {
            let stored = self.stored_name(name);
            let Some(e) = self.tensors.entries.get(&stored) else { continue };
            if e.dtype != DType::BF16 || &e.shape != shape || shape.len() != 2 || e.start % 2 != 0 {
                continue;
            }
            if (e.end - e.start) as usize != shape[0] * shape[1] * 2 {
                continue; // the reader reports the inconsistency when it loads the tensor
            }
            let map = match maps.get(&e.file) {
                Some(m) => m.clone(),
                None => {
                    let (path, file) = &self.tensors.files[e.file];
                    // The checkpoint's files are not modified while the model is loaded (above).
                    let m = crate::mapped::map_read_only(file).map_err(|err| Error::io(path, err))?;
                    let m = std::sync::Arc::new(m);
                    maps.insert(e.file, m.clone());
                    m
                }
            };
            if e.end as usize > map.len() {
                continue;
            }
            self.tensors.deferred.insert(stored);
            out.insert(name.clone(), MappedBf16 { map, offset: e.start as usize, rows: shape[0], cols: shape[1] });
        }
        Ok(out)
    }

    /// Opens the weights of `dir` (headers read and checked; tensors are read on demand).
    pub fn open(dir: &Path) -> Result<Self> {
        let files = weight_files(dir)?;
        let mut entries = HashMap::new();
        let mut handles = Vec::new();
        for (i, f) in files.iter().enumerate() {
            for (name, entry) in read_header(f, i)? {
                entries.insert(name, entry);
            }
            handles.push((f.clone(), File::open(f).map_err(|e| Error::io(f, e))?));
        }
        let names: BTreeSet<String> = entries.keys().cloned().collect();
        let tensors = SafetensorsReader { files: handles, entries, deferred: HashSet::new() };
        let mut prefix_map = Vec::new();
        for (canonical, alternatives) in PREFIX_ALTERNATIVES {
            // Longest stored prefix that some tensor name starts with, most specific first.
            let chosen = alternatives.iter().find(|alt| {
                names.iter().any(|n| {
                    n.starts_with(*alt)
                        // `model.image_tower.` also prefixes `model.image_tower.vision_model.`: skip
                        // the shorter form when the longer one is what the file holds.
                        && !(alt.ends_with("_tower.") && n[alt.len()..].starts_with("vision_model."))
                        // `language_model.` also prefixes `language_model.model.` and `.lm_head.`.
                        && !(**alt == "language_model." && (n.starts_with("language_model.model.") || n.starts_with("language_model.lm_head.")))
                })
            });
            if let Some(alt) = chosen {
                prefix_map.push((canonical.to_string(), alt.to_string()));
            }
        }
        Ok(Self { files, names, prefix_map, tensors })
    }

    /// The stored name of canonical tensor name `name`.
    pub fn stored_name(&self, name: &str) -> String {
        for (canonical, stored) in &self.prefix_map {
            if let Some(rest) = name.strip_prefix(canonical.as_str()) {
                return format!("{stored}{rest}");
            }
        }
        name.to_string()
    }

    /// The stored shape of canonical tensor `name`, if present.
    pub fn stored_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.entries.get(&self.stored_name(name)).map(|e| e.shape.clone())
    }

    /// Whether canonical tensor `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(&self.stored_name(name))
    }

    /// Marks canonical tensors as provided elsewhere (see [`SafetensorsReader::deferred`]): of
    /// `tensors` (canonical name, shape), those stored here with that shape are not read. Returns
    /// the canonical names deferred.
    pub fn defer(&mut self, tensors: &[(String, Vec<usize>)]) -> Vec<String> {
        let mut done = Vec::new();
        for (name, shape) in tensors {
            let stored = self.stored_name(name);
            if self.tensors.entries.get(&stored).is_some_and(|e| &e.shape == shape) {
                self.tensors.deferred.insert(stored);
                done.push(name.clone());
            }
        }
        done
    }

    /// Stored dtypes and how many tensors have each (for reporting).
    pub fn dtype_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for e in self.tensors.entries.values() {
            *counts.entry(format!("{:?}", e.dtype)).or_insert(0) += 1;
        }
        counts
    }

    /// A [`VarBuilder`] over canonical names producing tensors of `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let prefix_map = self.prefix_map.clone();
        VarBuilder::from_backend(Box::new(self.tensors), dtype, device.clone()).rename_f(move |name: &str| {
            for (canonical, stored) in &prefix_map {
                if let Some(rest) = name.strip_prefix(canonical.as_str()) {
                    return format!("{stored}{rest}");
                }
            }
            name.to_string()
        })
    }
}

/// Reads and validates a safetensors header, so a truncated or foreign file gives an error naming
/// it; returns where each tensor lies.
fn read_header(path: &Path, file_index: usize) -> Result<Vec<(String, TensorEntry)>> {
    use std::io::Read;
    let bad = |why: String| Error::Model(format!("{}: {why}", path.display()));
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad("not a safetensors file (too short)".into()))?;
    let header_len = u64::from_le_bytes(n);
    if header_len == 0 || header_len > 100 << 20 || 8 + header_len > len {
        return Err(bad("not a safetensors file (bad header length)".into()));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("corrupt safetensors header: {e}")))?;
    let map = json.as_object().ok_or_else(|| bad("corrupt safetensors header: not an object".into()))?;
    let data_start = 8 + header_len;
    let data_len = len - data_start;
    let mut out = Vec::with_capacity(map.len());
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        let (start, end) =
            match offsets.map(|o| (o.first().and_then(|v| v.as_u64()), o.get(1).and_then(|v| v.as_u64()))) {
                Some((Some(s), Some(e))) if s <= e => (s, e),
                _ => return Err(bad(format!("tensor `{name}` has no valid data_offsets"))),
            };
        if end > data_len {
            return Err(bad(format!("tensor `{name}` lies past the end of the file (truncated download?)")));
        }
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("I64") => DType::I64,
            Some("U32") => DType::U32,
            Some("U8") => DType::U8,
            other => return Err(bad(format!("tensor `{name}` has unsupported dtype {other:?}"))),
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
            .flatten()
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
        out.push((
            name.clone(),
            TensorEntry { file: file_index, dtype, shape, start: data_start + start, end: data_start + end },
        ));
    }
    Ok(out)
}

/// One tensor of GGML blocks (`[out, in]`, a format our kernels read) inside the memory-mapped
/// quantized-weights cache file.
#[derive(Clone)]
pub struct MappedQuant {
    map: Arc<memmap2::Mmap>,
    offset: usize,
    len: usize,
    dtype: GgmlDType,
    dims: (usize, usize),
}

impl std::fmt::Debug for MappedQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedQuant {{ {:?} {:?}, {} bytes at {} }}", self.dtype, self.dims, self.len, self.offset)
    }
}

impl MappedQuant {
    /// Maps the blocks' pages into the process now ([`crate::mapped::populate`]).
    pub fn prefault(&self) {
        crate::mapped::populate(&self.map, self.offset, self.len);
    }

    /// `len` bytes of `dtype` blocks at `offset` in `map`, shaped `dims` `(out, in)`; the caller
    /// checked that they lie inside the map.
    pub(crate) fn new(
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
        dtype: GgmlDType,
        dims: (usize, usize),
    ) -> Self {
        Self { map, offset, len, dtype, dims }
    }

    /// The blocks, row after row.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        self.dims
    }
}
