//! A global allocator for the programs built on this library (the CLI and server, the Python
//! module): the system allocator, with every large block marked for transparent huge pages
//! (`madvise(MADV_HUGEPAGE)`, Linux).
//!
//! Why: a request allocates and frees activation buffers of a few to tens of MiB in every layer
//! (products, attention outputs, packed operands). Where the kernel gives huge pages only to
//! memory that asks for them (`transparent_hugepage=madvise`, Debian's and many distributions'
//! default), each fresh 4 KiB page of those buffers costs a fault and a clear. Measured on the 7B
//! shapes with a 2,074-token video prompt (Xeon with AMX under KVM, 2 threads): 1.17 M page faults
//! per request, `clear_page` ~15% of the CPU samples of the prefill; with the blocks marked
//! (as glibc's `glibc.malloc.hugetlb=1` tunable does) 0.30 M, the same peak memory.
//!
//! Blocks below [`MIN_BLOCK`] are left as they are (their pages are mostly reused); elsewhere
//! than Linux this is the system allocator.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: videollava::huge_pages::HugePages = videollava::huge_pages::HugePages;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, marking blocks of [`MIN_BLOCK`] bytes or more for huge pages.
pub struct HugePages;

/// Bytes from which a block is marked.
pub const MIN_BLOCK: usize = 4 << 20;

/// The huge page size the marks are aligned to (x86-64, arm64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// Marks the whole huge pages inside `[p, p + size)`.
fn advise(p: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    if size >= MIN_BLOCK && !p.is_null() {
        let start = (p as usize).next_multiple_of(HUGE_PAGE);
        let end = (p as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside the block just allocated, which the caller owns;
            // MADV_HUGEPAGE only changes how the kernel backs those pages (a failure, e.g. THP
            // compiled out, leaves them as they were).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, size);
}

// SAFETY: every call is the system allocator's with the same arguments; `advise` only adds a
// hint on memory the block owns.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks below and above the threshold, zeroed or not, grown by `realloc`: what they hold
    /// is what was written (the hint changes no content).
    #[test]
    fn blocks_hold_what_is_written() {
        for size in [64, MIN_BLOCK - 1, MIN_BLOCK, 3 * MIN_BLOCK + 12345] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: a non-zero layout; every access stays inside the block; freed once.
            unsafe {
                let z = HugePages.alloc_zeroed(layout);
                assert!(!z.is_null());
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                HugePages.dealloc(z, layout);
                let p = HugePages.alloc(layout);
                std::ptr::write_bytes(p, 7, size);
                let q = HugePages.realloc(p, layout, size * 2);
                let s = std::slice::from_raw_parts_mut(q, size * 2);
                assert!(s[..size].iter().all(|&b| b == 7));
                s[size..].fill(9);
                HugePages.dealloc(q, Layout::from_size_align(size * 2, 64).unwrap());
            }
        }
    }
}
