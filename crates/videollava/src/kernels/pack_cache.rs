//! A packing buffer kept between calls of a kernel: fresh pages cost more than the packing,
//! which overwrites every element it reads back.

use std::sync::Mutex;

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

    /// Runs `f` on a buffer of `len` elements whose contents are unspecified (`fill` or an
    /// earlier call's packing): `f` must write every element it reads.
    pub(crate) fn with<R>(&self, len: usize, fill: T, f: impl FnOnce(&mut [T]) -> R) -> R {
        let mut kept = if len <= self.max { self.buf.try_lock().ok() } else { None };
        let mut own = Vec::new();
        let buf: &mut Vec<T> = match kept.as_deref_mut() {
            Some(v) => v,
            None => &mut own,
        };
        if buf.len() < len {
            buf.resize(len, fill);
        }
        f(&mut buf[..len])
    }
}
