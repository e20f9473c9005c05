//! Keys and values of computed prompt prefixes, reused by later prompts that start the same way:
//! a follow-up question about the same video (the OpenAI API resends the whole conversation,
//! video included, every turn), a list of questions over one video, several people asking about
//! one clip. A new prompt runs through the decoder only after its longest cached prefix.
//!
//! Keys ([`PrefixKey`]): one 64-bit element per prompt position: the token id for text; for a
//! placeholder position, a mix of its media item's SHA-256 pixel digest and its offset in the
//! item, with the top bit set so it never equals a token id. Equal elements up to `P` mean equal
//! embeddings up to `P`, hence (causal attention, prefill at positions `0..L` with no padding)
//! equal keys and values up to `P`; other media differ in their digest and cannot hit.
//!
//! Exactness: a hit is cut down to a multiple of the prefill chunk
//! ([`crate::model::VideoLlava::set_prefill_chunk`]), so the rest of the prompt goes through the
//! decoder in the same chunks, hence the same kernels with the same row counts, as without the
//! cache: the numbers are the same bit for bit. (So a prompt shorter than one chunk reuses
//! nothing; a chunk of 0, the whole prompt at once, reuses any length, where the BF16 and
//! 8-bit-cache kernels for few rows may then round differently from those for many.)
//!
//! Storage: a radix tree of segments, each holding its positions' keys/values for one row
//! (`[1, kv_heads, n, head_dim]` per layer, in the cache's format: compute dtype or 8-bit), so
//! prompts that share a video share its keys/values once. Eviction: least recently used leaf
//! first, while the bytes held exceed the budget.
//!
//! Saved prefixes ([`PrefixStore`], `--prefix-cache-dir`): the keys/values of a prompt's media
//! prefix (up to the end of its last placeholder) are written to a safetensors file named by a
//! digest of the model fingerprint and the key, with a header naming the model fingerprint,
//! dtype, cache format and key digest; a file whose header disagrees is ignored with a log line
//! (the `log` crate's `warn!`). The directory is bounded: after each save, the least recently
//! used saved prefixes (by modification time, refreshed on every load) are deleted while the
//! directory's `.safetensors` files exceed [`PrefixStore::max_bytes`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::batch_feature::{PixelTensor, ProcessorOutput};
use crate::error::{Error, Result};
use crate::kernels::kv_quant::KvCacheFormat;
use crate::model::kv_cache::KvBuffer;
use crate::model::llama::KvCache;

/// Default budget: 2.5 GiB, two video prefixes of the 7B model in BF16 (2,074 positions x 32
/// layers x 2 x 4,096 x 2 bytes = 1.09 GB each), or four with the 8-bit cache.
pub const DEFAULT_CAPACITY_BYTES: usize = 2560 << 20;

/// Default bound on the bytes of saved prefixes in a [`PrefixStore`]'s directory: 16 GiB, about
/// fourteen 7B video prefixes in BF16.
pub const DEFAULT_DIR_BYTES: u64 = 16 << 30;

/// Version of the saved-prefix file layout (part of the header).
const FILE_FORMAT: &str = "videollava-prefix-v1";

/// Marks placeholder elements of a [`PrefixKey`].
const MEDIA_BIT: u64 = 1 << 63;

/// splitmix64's finalizer: a bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SHA-256 of one media item's preprocessed pixels (f32 little-endian) with its shape and tower.
fn item_digest(tower: &str, shape: &[usize], data: &[f32]) -> u64 {
    let mut h = Sha256::new();
    h.update(tower.as_bytes());
    for &d in shape {
        h.update((d as u64).to_le_bytes());
    }
    let mut buf = Vec::with_capacity(4096 * 4);
    for chunk in data.chunks(4096) {
        buf.clear();
        chunk.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
        h.update(&buf);
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap_or_default())
}

/// A prompt as the prefix cache sees it: one element per position (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixKey {
    elems: Vec<u64>,
    media_end: usize,
}

impl PrefixKey {
    /// The key of a one-row processed prompt without padding (`None` otherwise, or when the
    /// placeholders and pixels disagree: such a prompt fails later anyway).
    pub fn from_inputs(inputs: &ProcessorOutput, image_token: u32, video_token: u32) -> Option<Self> {
        if inputs.batch_size != 1 || inputs.attention_mask.iter().any(|&m| m != 1) {
            return None;
        }
        let ids: Vec<u32> = inputs.input_ids.iter().map(|&x| x as u32).collect();
        let digests = |p: Option<&PixelTensor>, tower: &str| -> Option<Vec<u64>> {
            let Some(p) = p else { return Some(Vec::new()) };
            let n = *p.shape.first()?;
            if n == 0 || p.data.len() % n != 0 {
                return None;
            }
            let per = p.data.len() / n;
            Some((0..n).map(|i| item_digest(tower, &p.shape[1..], &p.data[i * per..(i + 1) * per])).collect())
        };
        let images = digests(inputs.pixel_values_images.as_ref(), "image")?;
        let videos = digests(inputs.pixel_values_videos.as_ref(), "video")?;
        Self::new(
            &ids,
            &[(image_token, images, inputs.image_tokens_per_item), (video_token, videos, inputs.video_tokens_per_item)],
        )
    }

    /// `media`: for each placeholder token, the digests of its items in order and the positions
    /// each item fills.
    pub fn new(ids: &[u32], media: &[(u32, Vec<u64>, usize)]) -> Option<Self> {
        let mut elems: Vec<u64> = ids.iter().map(|&t| t as u64).collect();
        let mut media_end = 0;
        for (token, digests, per_item) in media {
            if *per_item == 0 {
                // No items of this kind: a placeholder then has no features (the prompt fails).
                if digests.is_empty() && !ids.contains(token) {
                    continue;
                }
                return None;
            }
            let mut k = 0usize;
            for (p, &t) in ids.iter().enumerate() {
                if t != *token {
                    continue;
                }
                let item = *digests.get(k / per_item)?;
                elems[p] = MEDIA_BIT | (mix(item ^ mix((k % per_item) as u64 ^ ((*token as u64) << 32))) >> 1);
                media_end = media_end.max(p + 1);
                k += 1;
            }
            if k != digests.len() * per_item {
                return None;
            }
        }
        Some(Self { elems, media_end })
    }

    pub fn len(&self) -> usize {
        self.elems.len()
    }

    pub fn is_empty(&self) -> bool {
        self.elems.is_empty()
    }

    /// One past the last placeholder position (0 without media).
    pub fn media_end(&self) -> usize {
        self.media_end
    }

    pub fn elems(&self) -> &[u64] {
        &self.elems
    }
}

/// Counters since load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixCacheStats {
    /// Prompts that reused a cached prefix.
    pub hits: u64,
    pub misses: u64,
    /// Prompt positions not run through the decoder thanks to hits.
    pub reused_tokens: u64,
    /// Segments held, and their bytes.
    pub entries: usize,
    pub bytes: usize,
    pub capacity: usize,
    /// Saved prefixes read, written, and ignored (stale or foreign files).
    pub disk_loads: u64,
    pub disk_saves: u64,
    pub disk_rejected: u64,
}

/// One segment of the radix tree: positions `start..start + key.len()` of the prompts under it.
#[derive(Debug)]
struct Node {
    key: Vec<u64>,
    kv: KvCache,
    bytes: usize,
    parent: Option<usize>,
    children: Vec<usize>,
    last_used: u64,
}

/// Computed prompt prefixes, by [`PrefixKey`], under a byte budget (see the module docs).
#[derive(Debug)]
pub struct PrefixCache {
    nodes: HashMap<usize, Node>,
    roots: Vec<usize>,
    next_id: usize,
    clock: u64,
    capacity: usize,
    bytes: usize,
    stats: PrefixCacheStats,
    store: Option<PrefixStore>,
}

impl Drop for PrefixCache {
    /// A saved prefix still being written (on its own thread) is finished first: a command that
    /// answers once and exits (`generate`), or a server shutting down, leaves the file whole
    /// for the next process instead of a temporary file.
    fn drop(&mut self) {
        if let Some(store) = &self.store {
            store.wait_saved();
        }
    }
}

fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// An empty cache holding at most `capacity_bytes` (0 turns it off).
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            nodes: HashMap::new(),
            roots: Vec::new(),
            next_id: 0,
            clock: 0,
            capacity: capacity_bytes,
            bytes: 0,
            stats: PrefixCacheStats::default(),
            store: None,
        }
    }

    pub fn stats(&self) -> PrefixCacheStats {
        PrefixCacheStats { entries: self.nodes.len(), bytes: self.bytes, capacity: self.capacity, ..self.stats }
    }

    /// Whether lookups can find anything (a memory budget or a directory of saved prefixes).
    pub fn enabled(&self) -> bool {
        self.capacity > 0 || self.store.is_some()
    }

    pub fn set_capacity(&mut self, capacity_bytes: usize) {
        self.capacity = capacity_bytes;
        self.evict();
    }

    /// Where media prefixes are saved and looked up (`None`: nowhere).
    pub fn set_store(&mut self, store: Option<PrefixStore>) {
        self.store = store;
    }

    pub fn store(&self) -> Option<&PrefixStore> {
        self.store.as_ref()
    }

    /// Counts a saved prefix being written.
    pub fn note_disk_save(&mut self) {
        self.stats.disk_saves += 1;
    }

    /// Forgets every prefix held in memory (e.g. when the cache format changes).
    pub fn clear(&mut self) {
        self.nodes.clear();
        self.roots.clear();
        self.bytes = 0;
    }

    /// The path of segments matching `key`: `(node, positions of it that match)`.
    fn walk(&self, key: &[u64]) -> Vec<(usize, usize)> {
        let mut path = Vec::new();
        let mut pos = 0;
        let mut children = &self.roots;
        loop {
            let rest = &key[pos..];
            let best = children.iter().map(|&c| (c, common_prefix(&self.nodes[&c].key, rest))).max_by_key(|x| x.1);
            match best {
                Some((c, n)) if n > 0 => {
                    path.push((c, n));
                    pos += n;
                    if n < self.nodes[&c].key.len() {
                        break;
                    }
                    children = &self.nodes[&c].children;
                }
                _ => break,
            }
        }
        path
    }

    fn touch(&mut self, path: &[(usize, usize)]) {
        self.clock += 1;
        for (id, _) in path {
            if let Some(n) = self.nodes.get_mut(id) {
                n.last_used = self.clock;
            }
        }
    }

    /// The keys/values of the longest cached prefix of `key` no longer than `max_len`
    /// positions and, with `align > 0`, cut down to a multiple of `align`: its length and a
    /// one-row cache with room to append (`None` on a miss). `format`, `dtype`, `device` and
    /// `layers` describe the model, to check saved prefixes.
    #[allow(clippy::too_many_arguments)]
    pub fn lookup(
        &mut self,
        key: &PrefixKey,
        max_len: usize,
        align: usize,
        format: KvCacheFormat,
        dtype: DType,
        device: &Device,
        layers: usize,
    ) -> Result<Option<(usize, KvCache)>> {
        let mut want = &key.elems[..max_len.min(key.len())];
        let mut path = self.walk(want);
        let matched: usize = path.iter().map(|x| x.1).sum();
        let media = key.media_end;
        if matched < media && media <= want.len() {
            let loaded = match &self.store {
                Some(store) => store.load(&key.elems[..media], format, dtype, device, layers),
                None => None,
            };
            match loaded {
                Some(Ok(kv)) => {
                    self.stats.disk_loads += 1;
                    self.insert(&key.elems[..media], &kv)?;
                    path = self.walk(want);
                    let n = if align > 0 { media - media % align } else { media };
                    if path.iter().map(|x| x.1).sum::<usize>() < media && n > 0 {
                        // Not kept in memory (no budget for it): use it once.
                        self.stats.hits += 1;
                        self.stats.reused_tokens += n as u64;
                        return Ok(Some((n, KvCache::concat_positions(&[&kv.truncated(n)?])?)));
                    }
                }
                Some(Err(why)) => {
                    self.stats.disk_rejected += 1;
                    log::warn!("ignoring a saved prefix: {why}");
                }
                None => {}
            }
        }
        let mut matched: usize = path.iter().map(|x| x.1).sum();
        if align > 0 && !matched.is_multiple_of(align) {
            matched -= matched % align;
            want = &want[..matched];
            path = self.walk(want);
        }
        if matched == 0 {
            self.stats.misses += 1;
            return Ok(None);
        }
        let mut partial = None;
        if let Some(&(id, n)) = path.last() {
            if n < self.nodes[&id].key.len() {
                partial = Some(self.nodes[&id].kv.truncated(n)?);
            }
        }
        let mut pieces: Vec<&KvCache> = path.iter().map(|(id, _)| &self.nodes[id].kv).collect();
        if let Some(p) = &partial {
            if let Some(last) = pieces.last_mut() {
                *last = p;
            }
        }
        let kv = KvCache::concat_positions(&pieces)?;
        self.touch(&path);
        self.stats.hits += 1;
        self.stats.reused_tokens += matched as u64;
        Ok(Some((matched, kv)))
    }

    /// The keys/values held for exactly `key` (all of it cached), sharing the held buffers when
    /// one entry covers it (no copy), else joined; `None` when not all of `key` is held.
    pub fn held(&self, key: &[u64]) -> Result<Option<KvCache>> {
        let path = self.walk(key);
        if path.iter().map(|x| x.1).sum::<usize>() < key.len() || key.is_empty() {
            return Ok(None);
        }
        let mut pieces = Vec::with_capacity(path.len());
        for &(id, n) in &path {
            let kv = &self.nodes[&id].kv;
            pieces.push(if n < kv.len() { kv.truncated(n)? } else { kv.clone() });
        }
        Ok(Some(match pieces.len() {
            1 => pieces.remove(0),
            _ => KvCache::concat_positions(&pieces.iter().collect::<Vec<_>>())?,
        }))
    }

    /// Keeps positions `0..key.len()` of `kv` (one row, at least that long) under `key`.
    pub fn insert(&mut self, key: &[u64], kv: &KvCache) -> Result<()> {
        if self.capacity == 0 || key.is_empty() {
            return Ok(());
        }
        if kv.len() < key.len() || kv.batch_size() != 1 {
            return Err(Error::Model(format!(
                "a prefix of {} positions from a cache of {} rows x {} positions",
                key.len(),
                kv.batch_size(),
                kv.len()
            )));
        }
        let mut path = self.walk(key);
        if let Some(&(id, n)) = path.last() {
            if n < self.nodes[&id].key.len() {
                self.split(id, n)?;
            }
        }
        let pos: usize = path.iter().map(|x| x.1).sum();
        if pos < key.len() {
            // A cache of exactly the key (a saved prefix just loaded) is kept as it is.
            let seg = if pos == 0 && kv.len() == key.len() && kv.is_exact() {
                kv.clone()
            } else {
                kv.narrow_positions(pos, key.len() - pos)?
            };
            let bytes = seg.bytes();
            if bytes > self.capacity {
                self.touch(&path);
                return Ok(());
            }
            let parent = path.last().map(|x| x.0);
            let id = self.next_id;
            self.next_id += 1;
            let node = Node { key: key[pos..].to_vec(), kv: seg, bytes, parent, children: Vec::new(), last_used: 0 };
            self.nodes.insert(id, node);
            match parent {
                Some(p) => self.nodes.get_mut(&p).map(|n| n.children.push(id)).unwrap_or_default(),
                None => self.roots.push(id),
            }
            self.bytes += bytes;
            path.push((id, key.len() - pos));
        }
        self.touch(&path);
        self.evict();
        Ok(())
    }

    /// Cuts node `id` after `n` positions: the rest becomes its only child.
    fn split(&mut self, id: usize, n: usize) -> Result<()> {
        let node = self.nodes.get(&id).ok_or_else(|| Error::Model("prefix cache node missing".into()))?;
        // A head of most of the node keeps the node's buffer (no copy of the long part, at the
        // cost of holding the tail's positions twice); a shorter one is copied.
        let len = node.key.len();
        let head = if 2 * n > len { node.kv.truncated(n)? } else { node.kv.narrow_positions(0, n)? };
        let tail = node.kv.narrow_positions(n, len - n)?;
        let child_id = self.next_id;
        self.next_id += 1;
        let node = self.nodes.get_mut(&id).ok_or_else(|| Error::Model("prefix cache node missing".into()))?;
        let tail_key = node.key.split_off(n);
        let children = std::mem::take(&mut node.children);
        let old_bytes = node.bytes;
        let (head_bytes, tail_bytes) = (head.bytes(), tail.bytes());
        node.kv = head;
        node.bytes = head_bytes;
        node.children = vec![child_id];
        let last_used = node.last_used;
        for c in &children {
            if let Some(cn) = self.nodes.get_mut(c) {
                cn.parent = Some(child_id);
            }
        }
        let child = Node { key: tail_key, kv: tail, bytes: tail_bytes, parent: Some(id), children, last_used };
        self.nodes.insert(child_id, child);
        self.bytes = self.bytes - old_bytes + head_bytes + tail_bytes;
        Ok(())
    }

    /// Drops least recently used leaves until the bytes held fit the budget.
    fn evict(&mut self) {
        while self.bytes > self.capacity {
            let Some(id) =
                self.nodes.iter().filter(|(_, n)| n.children.is_empty()).min_by_key(|(_, n)| n.last_used).map(|x| *x.0)
            else {
                break;
            };
            let Some(node) = self.nodes.remove(&id) else { break };
            self.bytes -= node.bytes;
            match node.parent.and_then(|p| self.nodes.get_mut(&p)) {
                Some(p) => p.children.retain(|&c| c != id),
                None => self.roots.retain(|&c| c != id),
            }
        }
    }
}

/// A directory of saved media prefixes for one model (see the module docs).
#[derive(Debug, Clone)]
pub struct PrefixStore {
    dir: PathBuf,
    /// Identifies the weights and the numbers they give ([`model_fingerprint`]).
    model: String,
    /// A save is being written (one at a time: each holds a copy of its keys/values).
    saving: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bound on the bytes of saved prefixes in `dir`.
    max_bytes: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dtype_name(d: DType) -> &'static str {
    d.as_str()
}

/// A digest naming the checkpoint in `dir` as loaded: crate version, `config.json`, the weight
/// files (name, size, modification time), compute dtype and weight quantization.
pub fn model_fingerprint(dir: &Path, dtype: DType, quantization: Option<&str>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(concat!("videollava-", env!("CARGO_PKG_VERSION")).as_bytes());
    let config = dir.join("config.json");
    h.update(std::fs::read(&config).map_err(|e| Error::io(&config, e))?);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors" || x == "bin"))
        .collect();
    files.sort();
    for f in files {
        let meta = std::fs::metadata(&f).map_err(|e| Error::io(&f, e))?;
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(meta.len().to_le_bytes());
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        h.update(mtime.map(|d| d.as_nanos()).unwrap_or(0).to_le_bytes());
    }
    h.update(dtype_name(dtype).as_bytes());
    h.update(quantization.unwrap_or("none").as_bytes());
    Ok(hex(&h.finalize()[..16]))
}

impl PrefixStore {
    /// Saved prefixes of the model `fingerprint` in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>, fingerprint: String) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self { dir, model: fingerprint, saving: Default::default(), max_bytes: DEFAULT_DIR_BYTES })
    }

    /// The same store bounded to `max_bytes` of saved prefixes (0: save nothing).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Bound on the bytes of saved prefixes in the directory.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Deletes the least recently used saved prefixes (oldest modification time first; `keep`
    /// never) while the directory's `.safetensors` files hold more than [`Self::max_bytes`].
    /// Returns the number of files deleted.
    pub fn prune(&self, keep: &Path) -> Result<usize> {
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                meta.is_file().then(|| (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        let mut deleted = 0;
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            // Another process may have deleted it first: either way its bytes are gone.
            if std::fs::remove_file(&path).is_ok() || !path.exists() {
                total -= len;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Claims the right to write one save (`false` while another is being written); release
    /// it with [`Self::end_save`].
    pub fn begin_save(&self) -> bool {
        !self.saving.swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    pub fn end_save(&self) {
        self.saving.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Returns once no save begun by [`Self::begin_save`] is in flight.
    pub fn wait_saved(&self) {
        while self.saving.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key_digest(key: &[u64]) -> String {
        let mut h = Sha256::new();
        h.update((key.len() as u64).to_le_bytes());
        key.iter().for_each(|e| h.update(e.to_le_bytes()));
        hex(&h.finalize())
    }

    /// The file for `key` of this model.
    pub fn file_for(&self, key: &[u64]) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.model.as_bytes());
        h.update(Self::key_digest(key).as_bytes());
        self.dir.join(format!("{}.safetensors", hex(&h.finalize()[..20])))
    }

    /// Writes positions `0..key.len()` of one-row `kv` under `key` (through a temporary file,
    /// so a reader sees a whole file or none).
    pub fn save(&self, key: &[u64], kv: &KvCache) -> Result<PathBuf> {
        let file = self.file_for(key);
        let kv = if kv.len() == key.len() { kv.clone() } else { kv.narrow_positions(0, key.len())? };
        // The file holds the filled positions of each layer's buffers.
        let bytes: usize = kv.layers().iter().flatten().map(|b| b.bytes() / b.capacity().max(1) * b.len()).sum();
        if bytes as u64 > self.max_bytes {
            return Err(Error::Model(format!(
                "a prefix of {bytes} bytes does not fit the saved prefixes' bound of {} bytes",
                self.max_bytes
            )));
        }
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let (mut format, mut dtype) = (KvCacheFormat::Model, DType::F32);
        for (i, layer) in kv.layers().iter().enumerate() {
            let buf = layer.as_ref().ok_or_else(|| Error::Model("saving an unfilled cache".into()))?;
            (format, dtype) = (buf.format(), buf.dtype());
            for (j, part) in buf.stored_parts()?.into_iter().enumerate() {
                tensors.push((format!("layers.{i}.{j}"), part.contiguous()?));
            }
        }
        let header = HashMap::from([
            ("format".to_string(), FILE_FORMAT.to_string()),
            ("model".to_string(), self.model.clone()),
            ("dtype".to_string(), dtype_name(dtype).to_string()),
            ("kv_cache".to_string(), format.to_string()),
            ("key".to_string(), Self::key_digest(key)),
            ("len".to_string(), key.len().to_string()),
            ("layers".to_string(), kv.layers().len().to_string()),
        ]);
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(header), &tmp)
            .map_err(|e| Error::Model(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &file).map_err(|e| Error::io(&file, e))?;
        self.prune(&file)?;
        Ok(file)
    }

    /// The saved prefix for `key`: `None` when there is no file, `Some(Err(why))` when one exists
    /// but is stale, foreign or damaged (to be ignored).
    pub fn load(
        &self,
        key: &[u64],
        format: KvCacheFormat,
        dtype: DType,
        device: &Device,
        layers: usize,
    ) -> Option<std::result::Result<KvCache, String>> {
        let file = self.file_for(key);
        if !file.is_file() {
            return None;
        }
        let read = self.read(&file, key, format, dtype, device, layers);
        if read.is_ok() {
            // Recently used: pruned last. Best effort (a read-only directory still serves).
            let _ = std::fs::File::options()
                .write(true)
                .open(&file)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        }
        Some(read.map_err(|e| format!("{}: {e}", file.display())))
    }

    fn read(
        &self,
        file: &Path,
        key: &[u64],
        format: KvCacheFormat,
        dtype: DType,
        device: &Device,
        layers: usize,
    ) -> std::result::Result<KvCache, String> {
        // Mapped, not read into memory: the tensors below are the one copy. Saved prefixes are
        // written under a temporary name and renamed, never modified in place
        // (`crate::mapped::map_read_only`'s contract).
        let opened = std::fs::File::open(file).map_err(|e| e.to_string())?;
        let bytes = crate::mapped::map_read_only(&opened).map_err(|e| e.to_string())?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
        let header = meta.metadata().clone().unwrap_or_default();
        let expect = [
            ("format", FILE_FORMAT.to_string()),
            ("model", self.model.clone()),
            ("dtype", dtype_name(dtype).to_string()),
            ("kv_cache", format.to_string()),
            ("key", Self::key_digest(key)),
            ("len", key.len().to_string()),
            ("layers", layers.to_string()),
        ];
        for (field, want) in expect {
            let got = header.get(field).map(String::as_str).unwrap_or("(missing)");
            if got != want {
                return Err(format!("header `{field}` is `{got}`, this model needs `{want}`"));
            }
        }
        // The tensors copied out of the map on every thread (one layer's keys or values each).
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
        let names: Vec<&str> = file.names();
        let mut tensors = names
            .into_par_iter()
            .map(|name| {
                let view = file.tensor(name).map_err(|e| e.to_string())?;
                Ok((name.to_string(), view.load(device).map_err(|e| e.to_string())?))
            })
            .collect::<std::result::Result<HashMap<String, Tensor>, String>>()?;
        let parts_per_layer = match format {
            KvCacheFormat::Model => 2,
            KvCacheFormat::Q8_0 => 4,
        };
        let mut bufs = Vec::with_capacity(layers);
        for i in 0..layers {
            let parts = (0..parts_per_layer)
                .map(|j| tensors.remove(&format!("layers.{i}.{j}")).ok_or(format!("tensor layers.{i}.{j} missing")))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            if parts[0].dims().first() != Some(&1) || parts[0].dims().get(2) != Some(&key.len()) {
                return Err(format!(
                    "layer {i} holds {:?}, expected one row of {} positions",
                    parts[0].dims(),
                    key.len()
                ));
            }
            bufs.push(KvBuffer::from_stored_parts(parts, format, dtype).map_err(|e| e.to_string())?);
        }
        if !tensors.is_empty() {
            return Err(format!("{} unexpected tensors", tensors.len()));
        }
        KvCache::from_layers(bufs).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-row cache of `len` positions (2 layers, 2 heads of 4) whose values encode `tag`
    /// and the position, so pieces can be told apart after joining.
    fn cache(tag: f32, len: usize) -> KvCache {
        let dev = Device::Cpu;
        let layer = |l: f32| {
            let data: Vec<f32> = (0..2 * len * 4).map(|i| tag * 1000.0 + l * 100.0 + ((i / 4) % len) as f32).collect();
            let t = Tensor::from_vec(data, (1, 2, len, 4), &dev).unwrap();
            KvBuffer::from_filled(t.clone(), t).unwrap()
        };
        KvCache::from_layers(vec![layer(0.0), layer(1.0)]).unwrap()
    }

    fn firsts(kv: &KvCache) -> Vec<f32> {
        let k = kv.layers()[0].as_ref().unwrap().keys().unwrap();
        k.get(0).unwrap().get(0).unwrap().narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn lookup(c: &mut PrefixCache, key: &[u64]) -> Option<(usize, KvCache)> {
        let key = PrefixKey { elems: key.to_vec(), media_end: 0 };
        c.lookup(&key, key.len() - 1, 0, KvCacheFormat::Model, DType::F32, &Device::Cpu, 2).unwrap()
    }

    #[test]
    fn longest_prefix_shared_segments_and_lru_budget() {
        let per_position = cache(0.0, 1).bytes();
        let mut c = PrefixCache::new(20 * per_position);
        c.insert(&[1, 2, 3, 4, 5, 6, 7, 8], &cache(1.0, 8)).unwrap();
        // Shares 1..=4, then differs: the first segment is split, the shared part held once.
        c.insert(&[1, 2, 3, 4, 9, 9], &cache(2.0, 6)).unwrap();
        assert_eq!(c.stats().bytes, (8 + 2) * per_position);
        assert_eq!(c.stats().entries, 3);
        // The longest match, capped one short of the prompt.
        // What is held for a whole key: one entry's buffer shared, or several joined.
        let held = c.held(&[1, 2, 3]).unwrap().unwrap();
        assert_eq!(firsts(&held), vec![1000.0, 1001.0, 1002.0]);
        let held = c.held(&[1, 2, 3, 4, 9, 9]).unwrap().unwrap();
        assert_eq!(firsts(&held), vec![1000.0, 1001.0, 1002.0, 1003.0, 2004.0, 2005.0]);
        assert!(c.held(&[1, 2, 3, 4, 9, 9, 9]).unwrap().is_none(), "longer than what is held");
        assert!(c.held(&[1, 2, 7]).unwrap().is_none());
        let (n, kv) = lookup(&mut c, &[1, 2, 3, 4, 9, 9, 5]).unwrap();
        assert_eq!((n, kv.len()), (6, 6));
        // Positions 0..4 come from the first prompt, 4..6 from the second.
        assert_eq!(firsts(&kv), vec![1000.0, 1001.0, 1002.0, 1003.0, 2004.0, 2005.0]);
        let (n, _) = lookup(&mut c, &[1, 2, 3, 4, 9, 9]).unwrap();
        assert_eq!(n, 5, "at least one position is left to compute");
        let (n, kv) = lookup(&mut c, &[1, 2, 3, 7, 7]).unwrap();
        assert_eq!((n, firsts(&kv)), (3, vec![1000.0, 1001.0, 1002.0]));
        assert!(lookup(&mut c, &[5, 1, 2]).is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.reused_tokens), (3, 1, 14));

        // Over budget: the least recently used leaf (the `5, 6, 7, 8` tail) goes first.
        c.insert(&[20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], &cache(3.0, 12)).unwrap();
        let s = c.stats();
        assert!(s.bytes <= 20 * per_position, "{} bytes held, budget {}", s.bytes, 20 * per_position);
        assert_eq!(s.bytes, (4 + 2 + 12) * per_position);
        assert_eq!(lookup(&mut c, &[1, 2, 3, 4, 5, 6, 7]).unwrap().0, 4);
        assert_eq!(lookup(&mut c, &[1, 2, 3, 4, 9, 9, 0]).unwrap().0, 6);
        // A prefix larger than the whole budget is not kept; a zero budget keeps nothing.
        c.insert(&(100..130).collect::<Vec<u64>>(), &cache(4.0, 30)).unwrap();
        assert!(c.stats().bytes <= 20 * per_position);
        c.set_capacity(0);
        assert_eq!((c.stats().bytes, c.stats().entries), (0, 0));
    }

    #[test]
    fn keys_tell_media_apart_and_text_from_media() {
        let per = 3;
        let ids = [1, 2, 800, 800, 800, 5];
        let a = PrefixKey::new(&ids, &[(800, vec![11], per)]).unwrap();
        let b = PrefixKey::new(&ids, &[(800, vec![12], per)]).unwrap();
        assert_eq!(a.media_end(), 5);
        assert_eq!(common_prefix(a.elems(), b.elems()), 2, "other pixels differ from the first placeholder");
        assert_eq!(a, PrefixKey::new(&ids, &[(800, vec![11], per)]).unwrap());
        assert!(a.elems()[2..5].iter().all(|&e| e & MEDIA_BIT != 0));
        assert!(PrefixKey::new(&ids, &[(800, vec![11, 12], per)]).is_none(), "placeholders and items disagree");
        assert!(PrefixKey::new(&ids, &[(800, vec![], 0)]).is_none(), "placeholders without items");
        let text = PrefixKey::new(&[1, 2, 3], &[(800, vec![], 0), (801, vec![], 0)]).unwrap();
        assert_eq!((text.elems(), text.media_end()), (&[1u64, 2, 3][..], 0));
    }

    #[test]
    fn saved_prefixes_round_trip_and_foreign_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("videollava-prefix-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mine = PrefixStore::new(&dir, "model-a".into()).unwrap();
        let key = [1u64, 2, 3, 4];
        let file = mine.save(&key, &cache(5.0, 6)).unwrap();
        let back = mine.load(&key, KvCacheFormat::Model, DType::F32, &Device::Cpu, 2).unwrap().unwrap();
        assert_eq!(firsts(&back), vec![5000.0, 5001.0, 5002.0, 5003.0]);
        // Another model's store looks under another name; given this file anyway, it refuses it.
        let other = PrefixStore::new(&dir, "model-b".into()).unwrap();
        assert!(other.load(&key, KvCacheFormat::Model, DType::F32, &Device::Cpu, 2).is_none());
        std::fs::copy(&file, other.file_for(&key)).unwrap();
        let why = other.load(&key, KvCacheFormat::Model, DType::F32, &Device::Cpu, 2).unwrap().unwrap_err();
        assert!(why.contains("`model`"), "{why}");
        // Another dtype or cache format, a damaged file: refused with the reason.
        let why = mine.load(&key, KvCacheFormat::Model, DType::BF16, &Device::Cpu, 2).unwrap().unwrap_err();
        assert!(why.contains("`dtype`"), "{why}");
        let why = mine.load(&key, KvCacheFormat::Q8_0, DType::F32, &Device::Cpu, 2).unwrap().unwrap_err();
        assert!(why.contains("`kv_cache`"), "{why}");
        std::fs::write(&file, b"not a safetensors file").unwrap();
        assert!(mine.load(&key, KvCacheFormat::Model, DType::F32, &Device::Cpu, 2).unwrap().is_err());
        // Through the cache: the refused file is counted and the lookup misses.
        let mut c = PrefixCache::new(1 << 20);
        c.set_store(Some(mine));
        let k = PrefixKey { elems: vec![1, 2, 3, 4, 5], media_end: 4 };
        assert!(c.lookup(&k, 4, 0, KvCacheFormat::Model, DType::F32, &Device::Cpu, 2).unwrap().is_none());
        assert_eq!((c.stats().disk_rejected, c.stats().misses), (1, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Dropping the cache (the end of a one-shot command, a shutdown) waits for the save in
    /// flight, so the file is there, whole, when the process ends.
    #[test]
    fn dropping_the_cache_finishes_the_save_in_flight() {
        let dir = std::env::temp_dir().join(format!("videollava-prefix-drop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = PrefixStore::new(&dir, "model-a".into()).unwrap();
        let key = [7u64, 8, 9];
        let mut c = PrefixCache::new(1 << 20);
        c.set_store(Some(store.clone()));
        assert!(store.begin_save());
        let kv = cache(1.0, 3);
        let writer = std::thread::spawn(move || {
            // Slower than the drop below would be without waiting.
            std::thread::sleep(std::time::Duration::from_millis(300));
            store.save(&key, &kv).unwrap();
            store.end_save();
        });
        let file = c.store().unwrap().file_for(&key);
        drop(c);
        assert!(file.is_file(), "the cache was dropped before its save finished");
        writer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The directory stays within its bound: the least recently used files (a load counts as a
    /// use) are deleted after a save, and a prefix larger than the bound is not written.
    #[test]
    fn saved_prefixes_stay_within_the_directory_bound() {
        let dir = std::env::temp_dir().join(format!("videollava-prefix-bound-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = PrefixStore::new(&dir, "model-a".into()).unwrap();
        let one = std::fs::metadata(store.save(&[1; 6], &cache(1.0, 6)).unwrap()).unwrap().len();
        std::fs::remove_dir_all(&dir).unwrap();
        // Room for two files of this size, not three.
        let store = PrefixStore::new(&dir, "model-a".into()).unwrap().with_max_bytes(2 * one + one / 2);
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        let age = |key: &[u64], secs: u64| {
            let f = std::fs::File::options().write(true).open(store.file_for(key)).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(secs)).unwrap();
        };
        store.save(&[1; 6], &cache(1.0, 6)).unwrap();
        age(&[1; 6], 1);
        store.save(&[2; 6], &cache(2.0, 6)).unwrap();
        age(&[2; 6], 2);
        // Key 1 used after key 2 was saved: key 2 is now the least recently used.
        assert!(store.load(&[1; 6], KvCacheFormat::Model, DType::F32, &Device::Cpu, 2).unwrap().is_ok());
        store.save(&[3; 6], &cache(3.0, 6)).unwrap();
        let present = |key: &[u64]| store.file_for(key).is_file();
        assert_eq!((present(&[1; 6]), present(&[2; 6]), present(&[3; 6])), (true, false, true));
        // Bigger than the whole bound: refused, nothing deleted.
        let err = store.save(&[4; 60], &cache(4.0, 60)).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        assert_eq!((present(&[1; 6]), present(&[3; 6]), present(&[4; 60])), (true, true, false));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
