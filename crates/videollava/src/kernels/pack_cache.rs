//! Packing buffers: kept between calls of a kernel (fresh pages cost more than the packing,
//! which overwrites every element it reads back), and aligned to cache lines.
//!
//! Why aligned: an AMX tile row is 64 bytes; a row that straddles two cache lines costs two
//! line reads, and a whole tile then loads at half the speed or worse (the blocked BF16 GEMM ran
//! at 0.6-0.8 TFLOP/s per core from a buffer 16 bytes past a line, 1.4-1.9 from an aligned one,
//! on the Xeon with AMX this was measured on). `Vec` only promises the element's alignment
//! (glibc returns large blocks 16 bytes past a page).

use std::sync::Mutex;

/// Bytes every buffer here starts on.
const LINE: usize = 64;

/// The first `len` elements of `v` from its first 64-byte boundary on; `v` grows (with `fill`)
/// to hold them. For element sizes that divide 64.
pub(crate) fn aligned_mut<T: Copy>(v: &mut Vec<T>, len: usize, fill: T) -> &mut [T] {
    let slack = LINE / std::mem::size_of::<T>().max(1);
    if v.len() < len + slack {
        v.resize(len + slack, fill);
    }
    let off = v.as_ptr().align_offset(LINE);
    debug_assert!(off < slack);
    &mut v[off..off + len]
}

/// A `Vec` of `len` elements (`fill`) whose slice starts on a 64-byte boundary.
pub(crate) struct Aligned<T> {
    v: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Copy> Aligned<T> {
    pub(crate) fn new(len: usize, fill: T) -> Self {
        let v = vec![fill; len + LINE / std::mem::size_of::<T>().max(1)];
        let off = v.as_ptr().align_offset(LINE);
        Self { v, off, len }
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v[self.off..self.off + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// A buffer of `T` lent to one call at a time; a concurrent call, or one needing more than `max`
/// elements, packs into a buffer of its own.
pub(crate) struct PackCache<T> {
    buf: Mutex<Vec<T>>,
    max: usize,
}

impl<T: Copy> PackCache<T> {
    pub(crate) const fn new(max: usize) -> Self {
        Self { buf: Mutex::new(Vec::new()), max }
    }

    /// Runs `f` on a buffer of `len` elements, starting on a 64-byte boundary, whose contents
    /// are unspecified (`fill` or an earlier call's packing): `f` must write every element it
    /// reads.
    pub(crate) fn with<R>(&self, len: usize, fill: T, f: impl FnOnce(&mut [T]) -> R) -> R {
        let mut kept = if len <= self.max { self.buf.try_lock().ok() } else { None };
        let mut own = Vec::new();
        let buf: &mut Vec<T> = match kept.as_deref_mut() {
            Some(v) => v,
            None => &mut own,
        };
        f(aligned_mut(buf, len, fill))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_cache_line() {
        for len in [1, 15, 16, 1000, 1 << 20] {
            let a = Aligned::new(len, 7u16);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % LINE, 0);
            assert!(a.iter().all(|&x| x == 7));
            let b = Aligned::new(len, 1u32);
            assert_eq!(b.as_ptr() as usize % LINE, 0);
            let cache = PackCache::<f32>::new(1 << 30);
            cache.with(len, 0.0, |s| {
                assert_eq!(s.len(), len);
                assert_eq!(s.as_ptr() as usize % LINE, 0);
            });
        }
        let mut v = vec![0u8; 3];
        let s = aligned_mut(&mut v, 100, 1);
        assert_eq!((s.len(), s.as_ptr() as usize % LINE), (100, 0));
    }
}
