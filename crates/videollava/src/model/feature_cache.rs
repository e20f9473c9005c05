//! Projected visual features cached by the content of their pixels, so a second question about the
//! same image or video (a new server request, a new `generate` batch) skips the vision towers.
//!
//! Keys: a 64-bit hash of the item's preprocessed pixel values (f32 bits and shape) and which
//! tower made it; equal media with equal preprocessing give equal pixels, hence equal keys.
//! Values: the item's projected features as the towers return them (compute dtype): an image
//! `[1, tokens, H]`, a video `[frames, tokens + 1, H]`. Eviction: least recently used, bounded by
//! bytes.

use std::collections::VecDeque;

use candle_core::Tensor;

/// Default bound: 256 MiB (about 15 videos' features at 7B shapes in BF16).
pub const DEFAULT_CAPACITY_BYTES: usize = 256 << 20;

/// Which tower an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Image,
    Video,
}

/// Hit and miss counts since load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeatureCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub bytes: usize,
}

/// A bounded LRU map from pixel content to features.
#[derive(Debug)]
pub struct FeatureCache {
    capacity: usize,
    entries: VecDeque<(u64, Tensor, usize)>,
    stats: FeatureCacheStats,
}

impl FeatureCache {
    /// A cache holding at most `capacity_bytes` of features (0 disables it).
    pub fn new(capacity_bytes: usize) -> Self {
        Self { capacity: capacity_bytes, entries: VecDeque::new(), stats: FeatureCacheStats::default() }
    }

    pub fn stats(&self) -> FeatureCacheStats {
        self.stats
    }

    pub fn set_capacity(&mut self, capacity_bytes: usize) {
        self.capacity = capacity_bytes;
        self.evict();
    }

    /// The key of one item's pixels `data` of `shape` for `tower`.
    pub fn key(tower: Tower, shape: &[usize], data: &[f32]) -> u64 {
        // FNV-1a over the shape, then a 64-bit multiply-xorshift mix over pairs of f32 bits
        // (fast enough: ~1 ms for a video's 4.8 MB of pixels).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ tower as u64;
        for &d in shape {
            h = (h ^ d as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut chunks = data.chunks_exact(2);
        for pair in &mut chunks {
            let v = (pair[0].to_bits() as u64) | ((pair[1].to_bits() as u64) << 32);
            h = (h ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        }
        for x in chunks.remainder() {
            h = (h ^ x.to_bits() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        h
    }

    /// Whether features are stored under `key` (no hit or miss counted).
    pub fn contains(&self, key: u64) -> bool {
        self.entries.iter().any(|(k, _, _)| *k == key)
    }

    /// The features stored under `key`, marking them most recently used.
    pub fn get(&mut self, key: u64) -> Option<Tensor> {
        match self.entries.iter().position(|(k, _, _)| *k == key) {
            Some(i) => {
                self.stats.hits += 1;
                let e = self.entries.remove(i)?;
                let t = e.1.clone();
                self.entries.push_back(e);
                Some(t)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Stores `features` under `key` (a copy, so the cache does not pin a larger batch tensor).
    pub fn insert(&mut self, key: u64, features: &Tensor) -> candle_core::Result<()> {
        let bytes = features.elem_count() * features.dtype().size_in_bytes();
        if bytes > self.capacity {
            return Ok(());
        }
        self.entries.retain(|(k, _, _)| *k != key);
        self.entries.push_back((key, features.copy()?, bytes));
        self.evict();
        Ok(())
    }

    fn evict(&mut self) {
        let mut used: usize = self.entries.iter().map(|e| e.2).sum();
        while used > self.capacity {
            match self.entries.pop_front() {
                Some(e) => used -= e.2,
                None => break,
            }
        }
        self.stats.entries = self.entries.len();
        self.stats.bytes = used;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn keys_follow_content_shape_and_tower() {
        let a = vec![0.5f32; 12];
        let mut b = a.clone();
        b[11] = 0.25;
        let k = FeatureCache::key(Tower::Image, &[1, 3, 2, 2], &a);
        assert_eq!(k, FeatureCache::key(Tower::Image, &[1, 3, 2, 2], &a.clone()));
        assert_ne!(k, FeatureCache::key(Tower::Image, &[1, 3, 2, 2], &b));
        assert_ne!(k, FeatureCache::key(Tower::Image, &[1, 3, 4, 1], &a));
        assert_ne!(k, FeatureCache::key(Tower::Video, &[1, 3, 2, 2], &a));
    }

    #[test]
    fn least_recently_used_entries_go_first_within_the_byte_bound() {
        let t = |v: f32| Tensor::full(v, (4, 4), &Device::Cpu).unwrap(); // 64 bytes each
        let mut c = FeatureCache::new(3 * 64);
        for k in 0..3 {
            c.insert(k, &t(k as f32)).unwrap();
        }
        assert!(c.get(0).is_some()); // 0 is now the most recent; 1 the least
        c.insert(3, &t(3.0)).unwrap();
        assert!(c.get(1).is_none());
        let got = c.get(0).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(got, 0.0);
        assert!(c.get(2).is_some() && c.get(3).is_some());
        let s = c.stats();
        assert_eq!((s.entries, s.bytes, s.hits, s.misses), (3, 192, 4, 1));
        c.set_capacity(0);
        assert_eq!(c.stats().entries, 0);
        c.insert(9, &t(1.0)).unwrap();
        assert!(c.get(9).is_none());
    }
}
