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

/// Maps `len` bytes at `offset` of `map` into the process now (Linux's `MADV_POPULATE_READ`,
/// reading them from disk first where the page cache lacks them), so that the first forward
/// pass does not take a page fault per page (a fresh process's first short pass over the 7B
/// weights: 1.1-1.35 s against ~0.6 s warm, with 785,000 page faults). Best effort: a no-op on
/// other systems and on kernels before 5.14.
pub fn populate(map: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(target_os = "linux")]
    if offset.checked_add(len).is_some_and(|end| end <= map.len()) {
        let _ = map.advise_range(memmap2::Advice::PopulateRead, offset, len);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (map, offset, len);
}
