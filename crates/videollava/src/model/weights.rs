//! Finding and opening a checkpoint's safetensors, whatever layout of names it was saved with.
//!
//! Files are memory-mapped: a single `model.safetensors`, or the shards listed by
//! `model.safetensors.index.json`. Tensors may be stored as F32, F16 or BF16; the
//! [`VarBuilder`] converts each to the compute dtype chosen at load.
//!
//! Model code asks for the names of the hub checkpoint (transformers 4.46's on-disk layout,
//! reference-spec §2): `image_tower.vision_model.…`, `video_tower.vision_model.…`,
//! `multi_modal_projector.…`, `language_model.model.…`, `language_model.lm_head.weight`.
//! Checkpoints saved with the 4.52+ runtime names (`model.language_model.…`, `lm_head.weight`,
//! `model.image_tower.…`) or by transformers 5.x (no `vision_model.` level) are mapped onto
//! those names by prefix.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The safetensors files of checkpoint directory `dir`, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&index, "", format!("not valid JSON: {e}")))?;
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
                return Err(Error::config(&index, format!("weight_map.{name}"), format!("`{file}` is not a plain file name")));
            }
            files.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            return Err(Error::io(
                missing,
                std::io::Error::new(std::io::ErrorKind::NotFound, "shard listed in model.safetensors.index.json is missing"),
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
    tensors: MmapedSafetensors,
}

impl CheckpointWeights {
    /// Memory-maps the weights of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = weight_files(dir)?;
        for f in &files {
            check_header(f)?;
        }
        // SAFETY: the files are memory-mapped read-only; like every mmap user we rely on them not
        // being modified while the model is alive.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::Model(format!("{}: cannot map weights: {e}", dir.display())))?;
        let names: BTreeSet<String> = tensors.tensors().into_iter().map(|(n, _)| n).collect();
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

    /// Whether canonical tensor `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(&self.stored_name(name))
    }

    /// Stored dtypes and how many tensors have each (for reporting).
    pub fn dtype_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (_, view) in self.tensors.tensors() {
            *counts.entry(format!("{:?}", view.dtype())).or_insert(0) += 1;
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

/// Validates a safetensors header so a truncated or foreign file gives an error naming it.
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| Error::Model(format!("{}: not a safetensors file (too short)", path.display())))?;
    let header_len = u64::from_le_bytes(n);
    if header_len == 0 || header_len > 100 << 20 || 8 + header_len > len {
        return Err(Error::Model(format!("{}: not a safetensors file (bad header length)", path.display())));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::Model(format!("{}: corrupt safetensors header: {e}", path.display())))?;
    let data_len = len - 8 - header_len;
    if let Some(map) = json.as_object() {
        for (name, info) in map {
            if name == "__metadata__" {
                continue;
            }
            let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
            if end > data_len {
                return Err(Error::Model(format!(
                    "{}: tensor `{name}` lies past the end of the file (truncated download?)",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}
