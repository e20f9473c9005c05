//! Videos decoded from memory, kept by the digest of their bytes: a conversation resends its video
//! with every turn (OpenAI clients send the whole history), and several people ask about one
//! clip; decoding it again would cost a full FFmpeg pass each time (~0.15 s for a 10 s clip, more
//! than the rest of a follow-up question's intake).
//!
//! Key: SHA-256 of the encoded bytes, the frame options and the limits that shape the result (a
//! caller with other limits decodes, and is checked, itself). Value: the decoded [`Video`].
//! Eviction: least recently used, bounded by the bytes of the kept frames; 0 disables it. A hit
//! still asks the caller's [`MediaLimits::budget`] for the frames' pixels, as a decode would.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::{MediaLimits, Video};

/// Default bound: 64 MiB of frames (eight 360p clips of 8 frames).
pub const DEFAULT_CAPACITY_BYTES: usize = 64 << 20;

/// Hits and misses since start, and what is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecentStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub bytes: usize,
}

struct Recent {
    capacity: usize,
    /// Most recently used last.
    entries: VecDeque<([u8; 32], Arc<Video>, usize)>,
    stats: RecentStats,
}

static RECENT: Mutex<Recent> = Mutex::new(Recent::new(DEFAULT_CAPACITY_BYTES));

fn recent() -> std::sync::MutexGuard<'static, Recent> {
    // A panic while holding the lock leaves a consistent map (every update is one push or pop).
    RECENT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets the bound on the frames kept, in bytes (0 disables the cache and empties it).
pub fn set_capacity(bytes: usize) {
    let mut r = recent();
    r.capacity = bytes;
    r.evict();
}

/// Current counts.
pub fn stats() -> RecentStats {
    recent().stats
}

/// The key of `bytes` decoded with the frame options `options` (as numbers) under `limits`.
pub(super) fn key(bytes: &[u8], options: &[u64], limits: &MediaLimits) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"videollava decoded video v1\0");
    h.update((options.len() as u64).to_le_bytes());
    for x in options {
        h.update(x.to_le_bytes());
    }
    for x in [
        limits.max_side as u64,
        limits.max_pixels,
        limits.max_aspect_ratio.to_bits(),
        limits.max_video_frames,
        limits.max_video_seconds.to_bits(),
        bytes.len() as u64,
    ] {
        h.update(x.to_le_bytes());
    }
    h.update(bytes);
    h.finalize().into()
}

/// Whether a video is kept under `key`.
pub(super) fn holds(key: &[u8; 32]) -> bool {
    recent().entries.iter().any(|e| &e.0 == key)
}

/// The video kept under `key`, now the most recently used.
pub(super) fn get(key: &[u8; 32]) -> Option<Arc<Video>> {
    recent().get(key)
}

/// Keeps `video` under `key` (not when it alone is over the bound).
pub(super) fn put(key: [u8; 32], video: &Video) {
    recent().put(key, video)
}

impl Recent {
    const fn new(capacity: usize) -> Self {
        Self { capacity, entries: VecDeque::new(), stats: RecentStats { hits: 0, misses: 0, entries: 0, bytes: 0 } }
    }

    fn get(&mut self, key: &[u8; 32]) -> Option<Arc<Video>> {
        let Some(i) = self.entries.iter().position(|e| &e.0 == key) else {
            self.stats.misses += 1;
            return None;
        };
        let entry = self.entries.remove(i)?;
        let video = entry.1.clone();
        self.entries.push_back(entry);
        self.stats.hits += 1;
        Some(video)
    }

    fn put(&mut self, key: [u8; 32], video: &Video) {
        let size: usize = video.frames.iter().map(|f| f.data.len()).sum();
        if size > self.capacity || self.entries.iter().any(|e| e.0 == key) {
            return;
        }
        self.entries.push_back((key, Arc::new(video.clone()), size));
        self.stats.bytes += size;
        self.evict();
    }

    fn evict(&mut self) {
        while self.stats.bytes > self.capacity {
            let Some((_, _, size)) = self.entries.pop_front() else { break };
            self.stats.bytes -= size;
        }
        self.stats.entries = self.entries.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::RgbImage;

    fn clip(shade: u8, frames: usize) -> Video {
        Video::from_frames(vec![RgbImage::new(4, 2, vec![shade; 24]).unwrap(); frames]).unwrap()
    }

    #[test]
    fn least_recently_used_goes_first_and_oversize_is_not_kept() {
        let mut r = Recent::new(3 * 48);
        let k = |i: u8| [i; 32];
        for i in 0..3 {
            r.put(k(i), &clip(i, 2));
        }
        assert_eq!((r.stats.entries, r.stats.bytes), (3, 144));
        assert_eq!(r.get(&k(0)).as_deref(), Some(&clip(0, 2)), "0 is now the most recent");
        r.put(k(3), &clip(3, 2));
        assert!(r.get(&k(1)).is_none(), "1 was the least recently used");
        assert!(r.get(&k(0)).is_some() && r.get(&k(2)).is_some() && r.get(&k(3)).is_some());
        r.put(k(4), &clip(4, 7));
        assert!(r.get(&k(4)).is_none(), "over the bound alone: not kept");
        assert_eq!((r.stats.hits, r.stats.misses, r.stats.entries, r.stats.bytes), (4, 2, 3, 144));
        r.capacity = 48;
        r.evict();
        assert_eq!((r.stats.entries, r.stats.bytes), (1, 48));
        assert!(r.get(&k(3)).is_some(), "the most recent stays");
    }
}
