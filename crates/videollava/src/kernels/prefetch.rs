//! Software prefetch for kernels that stream memory faster than the hardware prefetchers follow
//! (they stop at 4 KiB page boundaries, and this machine's pages are 4 KiB).

/// Positions ahead that [`prefetch_ahead`] asks for: far enough to cover the memory latency, and
/// across 4 KiB pages, where the hardware prefetchers stop.
const AHEAD: usize = 32;

/// Prefetches the `len` bytes of the cache row [`AHEAD`] positions after `row` (rows `stride`
/// bytes apart); a no-op off x86-64. The address is only computed (wrapping), never
/// dereferenced: a prefetch past the buffer is a hint the CPU drops.
///
/// Measured where it is used (interleaved A/B, this project's AVX-512 machine, 2 threads):
/// decode attention reads each head's cached keys and values once per step (0.3-0.5 MB per head
/// at a 2,000-position context) from pages no earlier step left in cache: 32 layers of the 7B
/// shapes, one row, 8-bit cache 40-44 -> 36-38 ms (AVX-512) and 110-113 -> 65-68 ms (AVX2), BF16
/// cache on the AVX2 path 203-217 -> 105-116 ms; the `vdpbf16ps` kernel
/// (`attention::bf16dot::direct`) got slower with them (52-61 -> 58-66 ms) and has none.
#[inline(always)]
pub(crate) fn prefetch_ahead(row: *const u8, stride: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let ahead = row.wrapping_add(AHEAD * stride);
        let mut off = 0;
        while off < len {
            // SAFETY: `_mm_prefetch` never faults, whatever the address; SSE is part of x86-64.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    ahead.wrapping_add(off) as *const i8
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (row, stride, len, AHEAD);
}
