//! Read-only memory maps of weight files (checkpoint shards, quantized caches). Mapping is the one
//! `unsafe` operation weight loading needs; it lives here, under its contract, so that `model/`
//! holds none.

use std::fs::File;

/// Maps `file` read-only.
///
/// Contract (the caller's, as for any memory-mapped weights, e.g. llama.cpp's default): the file
/// is not modified in place while the map lives. Replacing it by renaming a new file over it is
/// fine: the map keeps the old one.
pub fn map_read_only(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is only read; the file is not modified in place while it lives (the
    // contract above, stated at every caller).
    unsafe { memmap2::Mmap::map(file) }
}
