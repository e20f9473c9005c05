//! BF16 matrix product `out = A · Wᵀ` on Intel AMX tiles (`tdpbf16ps`), f32 accumulation.
//!
//! Conventions as [`super::bf16_gemm`]: `a` BF16 bits `[m, k]`, `w` BF16 bits `[n, k]` (the
//! `nn.Linear` layout, read in place: memory-mapped weights are not copied), `out` f32 `[m, n]`,
//! overwritten. Used for `k % 32 == 0` (every projection of CLIP-L and Llama-7B), any `m`, `n`.
//!
//! Why: one `tdpbf16ps` does 16×16×32 multiply-adds (16 times an AVX-512 `vdpbf16ps`), so the
//! prefill and the vision towers, which are matrix products of hundreds to thousands of rows, are
//! bound by how fast the tiles are fed rather than by the arithmetic.
//!
//! Scheme: the product is computed transposed, `Cᵀ[n, m] = W · Aᵀ`, so that `W` is the row-major
//! tile operand (16 rows of `W`, 32 values of `k` each, loaded straight from the weight with the
//! row stride `k`) and only `A` is packed, once per call, into the pair-interleaved ("VNNI")
//! layout of the second operand: tile `(mt, s)` holds `[16 pairs of k][16 rows of A]` 32-bit
//! pairs (a 16×16 transpose of 32-bit words). Tasks (rayon) take a stripe of [`NS`] rows of `W`;
//! a task walks blocks of [`MB`] rows of `A` and [`KC`] values of `k` (the block of packed `A`
//! stays in L2, the 32 rows of `W` of the current pair in L1), and for each pair of `W` tiles and
//! pair of `A` tiles runs 2×2 accumulator tiles over the block. Partial sums live in a task
//! buffer of `Cᵀ` tiles between `k` blocks; at the end each tile is transposed (AVX-512) into
//! `out`. Rows of `W` past `n` in the last tile come from a zero-padded copy.
//!
//! Numerics: `tdpbf16ps` sums BF16 products into f32 (BF16 denormal inputs read as zero, f32
//! results flushed to zero, round-to-nearest-even), as `vdpbf16ps` does; the order of the sums
//! differs from the other paths, so results agree to f32 rounding.
//!
//! Tile state: each task configures the tiles (`ldtilecfg`) and releases them (`tilerelease`)
//! before it returns, so nothing is left configured on a pool thread. The process asked Linux for
//! the tile-data permission when the CPU was detected ([`super::cpu`]).

use super::bf16_gemm::avx512::transpose16;
use core::arch::asm;
use core::arch::x86_64::*;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of `W` per task.
const NS: usize = 128;
/// Rows of `A` per block (`MB * KC * 2` bytes of packed `A` in L2).
const MB: usize = 256;
/// Values of `k` per block: [`KC`] / 32 tile steps per accumulation run.
const KC: usize = 512;
/// Tile edge (rows) and the `k` values per tile step.
const T: usize = 16;
const KS: usize = 32;

/// Packed `A`, kept between calls, and the largest kept (u32 elements: 256 MiB).
static A_PACK: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
const A_CACHE_MAX: usize = 64 << 20;

thread_local! {
    /// A task's partial `Cᵀ` tiles, reused by the tasks run on this thread.
    static CBUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether the AMX path takes this product: the CPU (within the kernel-set switch) has AMX BF16,
/// `k` is a multiple of 32 and there are enough rows of `A` for the tiles to pay.
pub(crate) fn applies(m: usize, k: usize) -> bool {
    super::cpu::features().amx_bf16 && k % KS == 0 && k > 0 && m >= T
}

/// The tile configuration `ldtilecfg` reads (palette 1, 64 bytes).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Every one of the 8 tiles as 16 rows of 64 bytes: tmm0-3 the accumulators `Cᵀ`, tmm4-5 two
/// tiles of `W`, tmm6-7 two packed tiles of `A`.
const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// `out = A · Wᵀ`.
///
/// # Safety
/// [`applies`] held for `m` and `k` on the calling thread (the CPU has AVX-512 and AMX BF16, and
/// the process may use the tiles); `a.len() == m * k`, `w.len() == n * k`, `out.len() == m * n`.
pub(crate) unsafe fn matmul(a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: &mut [f32]) {
    let steps = k / KS;
    // Even tile counts, so that every pair of tiles exists (the extra ones are zeros).
    let m_tiles = m.div_ceil(T).next_multiple_of(2);
    let n_tiles = n.div_ceil(T).next_multiple_of(2);
    // The buffer is kept between calls (fresh pages cost more than the packing, which writes
    // every element); a concurrent call, or a very large one, gets a buffer of its own.
    let len = m_tiles * steps * T * T;
    let mut cached = if len <= A_CACHE_MAX { A_PACK.try_lock().ok() } else { None };
    let mut own = Vec::new();
    let apack: &mut Vec<u32> = match cached.as_deref_mut() {
        Some(v) => v,
        None => &mut own,
    };
    if apack.len() < len {
        apack.resize(len, 0);
    }
    let apack = &mut apack[..len];
    apack.par_chunks_mut(steps * T * T).enumerate().for_each(|(mt, dst)| {
        // SAFETY: the CPU has AVX-512 (caller's contract).
        unsafe { pack_a(a, m, k, mt, dst) };
    });
    // Rows of `W` from the last whole tile on, zero-padded to two tiles (the tail tiles read
    // here instead of past the end of `w`).
    let tail0 = (n / T) * T;
    let mut wtail = vec![0u16; (n_tiles * T - tail0) * k];
    wtail[..(n - tail0) * k].copy_from_slice(&w[tail0 * k..]);
    let stripes = n_tiles.div_ceil(NS / T);
    let outp = super::bf16_gemm::OutPtr::new(out);
    let ctx = Ctx { apack, m, m_tiles, steps, w, wtail: &wtail, tail0, n, k };
    (0..stripes).into_par_iter().for_each(|s| {
        let (t0, t1) = (s * NS / T, n_tiles.min((s + 1) * NS / T));
        CBUF.with(|cell| match cell.try_borrow_mut() {
            // SAFETY: as for `matmul`; the task writes the columns of tiles t0..t1 only.
            Ok(mut buf) => unsafe { task(&ctx, t0, t1, outp, &mut buf) },
            // SAFETY: as above, with a fresh buffer.
            Err(_) => unsafe { task(&ctx, t0, t1, outp, &mut Vec::new()) },
        });
    });
}

/// What every task reads.
struct Ctx<'a> {
    /// Packed `A`: `[m_tiles][steps][16 pairs][16 rows]` pairs.
    apack: &'a [u32],
    m: usize,
    m_tiles: usize,
    steps: usize,
    w: &'a [u16],
    /// Rows `tail0..` of `W`, zero-padded to whole tiles.
    wtail: &'a [u16],
    tail0: usize,
    n: usize,
    k: usize,
}

impl Ctx<'_> {
    /// The first value of row tile `nt` of `W` at tile step `s` (rows `k` values apart).
    fn w_tile(&self, nt: usize, s: usize) -> *const u16 {
        let (row, col) = (nt * T, s * KS);
        if row < self.tail0 {
            self.w[row * self.k + col..].as_ptr()
        } else {
            self.wtail[(row - self.tail0) * self.k + col..].as_ptr()
        }
    }
}

/// Packs row tile `mt` of `A` (rows `16 mt..`, zeros past `m`) into `dst`: for each tile step
/// `s`, `[16 pairs][16 rows]` 32-bit pairs of consecutive-`k` values.
///
/// # Safety
/// The CPU has AVX-512 F; `k % 32 == 0`; `dst.len() == k / 32 * 256`.
#[target_feature(enable = "avx512f")]
unsafe fn pack_a(a: &[u16], m: usize, k: usize, mt: usize, dst: &mut [u32]) {
    let r0 = mt * T;
    for (s, tile) in dst.chunks_exact_mut(T * T).enumerate() {
        let mut rows = [_mm512_setzero_si512(); T];
        for (i, row) in rows.iter_mut().enumerate() {
            if r0 + i < m {
                let src = &a[(r0 + i) * k + s * KS..][..KS];
                // SAFETY: `src` holds 32 u16 values (64 bytes); unaligned load.
                *row = unsafe { _mm512_loadu_si512(src.as_ptr().cast()) };
            }
        }
        for (p, v) in transpose16(rows).into_iter().enumerate() {
            // SAFETY: `tile` holds 256 u32; row `p` is 16 of them.
            unsafe { _mm512_storeu_si512(tile[p * T..].as_mut_ptr().cast(), v) };
        }
    }
}

/// One task: tiles `t0..t1` of `W` (output columns `16 t0..16 t1`), every row of `A`.
///
/// # Safety
/// As [`matmul`]; no other task writes these columns of `out`.
#[target_feature(enable = "avx512f")]
unsafe fn task(c: &Ctx, t0: usize, t1: usize, out: super::bf16_gemm::OutPtr, cbuf: &mut Vec<f32>) {
    let nt = t1 - t0;
    let tiles_per_block = MB / T;
    cbuf.resize(nt * tiles_per_block * T * T, 0.0);
    let steps_per_block = KC / KS;
    let cb = cbuf.as_mut_ptr();
    // SAFETY: the CPU has AMX (caller's contract); released at the end of the task.
    unsafe { configure() };
    for mb0 in (0..c.m_tiles).step_by(tiles_per_block) {
        let mbt = tiles_per_block.min(c.m_tiles - mb0);
        for s0 in (0..c.steps).step_by(steps_per_block) {
            let ns = steps_per_block.min(c.steps - s0);
            // The pair of `W` tiles after each one (the next `k` block's first, or the next row
            // block's, after the last), prefetched while the current pair runs: its 32 rows'
            // `64 * steps` bytes come from memory in short runs the hardware prefetcher misses.
            let next_s0 = if s0 + ns < c.steps { s0 + ns } else { 0 };
            let next_ns = steps_per_block.min(c.steps - next_s0);
            let last_block = mb0 + tiles_per_block >= c.m_tiles && s0 + ns >= c.steps;
            for jp in (0..nt).step_by(2) {
                let (w0, w1) = (c.w_tile(t0 + jp, s0), c.w_tile(t0 + jp + 1, s0));
                let (pj, ps, pn) = if jp + 2 < nt { (jp + 2, s0, ns) } else { (0, next_s0, next_ns) };
                let prefetch = jp + 2 < nt || !last_block;
                let lines = 2 * T * pn;
                let per_ip = lines.div_ceil(mbt.div_ceil(2));
                for ip in (0..mbt).step_by(2) {
                    if prefetch {
                        for l in (ip / 2) * per_ip..lines.min((ip / 2 + 1) * per_ip) {
                            let (r, q) = (l / pn, l % pn);
                            let line = c.w_tile(t0 + pj + r / T, ps).wrapping_add((r % T) * c.k + q * KS);
                            _mm_prefetch::<_MM_HINT_T0>(line.cast());
                        }
                    }
                    let at = |i: usize| c.apack[((mb0 + ip + i) * c.steps + s0) * T * T..].as_ptr();
                    let ct = |j: usize, i: usize| cb.wrapping_add(((jp + j) * tiles_per_block + ip + i) * T * T);
                    // SAFETY: every tile read lies inside `w`/`wtail` (16 rows of `k` values from
                    // a whole tile) or `apack` (tile-contiguous, `ns` steps of 1 KiB), every tile
                    // stored inside `cbuf` (1 KiB each); the tiles are configured above.
                    unsafe {
                        run_2x2(
                            [w0.cast(), w1.cast()],
                            c.k * 2,
                            [at(0).cast(), at(1).cast()],
                            64,
                            1024,
                            [ct(0, 0), ct(0, 1), ct(1, 0), ct(1, 1)],
                            64,
                            ns,
                            s0 == 0,
                        )
                    };
                }
            }
        }
        // The block's tiles are complete: transposed into `out`.
        for j in 0..nt {
            let col0 = (t0 + j) * T;
            if col0 >= c.n {
                break;
            }
            let cols = T.min(c.n - col0);
            let mask: __mmask16 = if cols == T { !0 } else { (1u16 << cols) - 1 };
            for i in 0..mbt {
                let row0 = (mb0 + i) * T;
                if row0 >= c.m {
                    break;
                }
                let tile = &cbuf[(j * tiles_per_block + i) * T * T..][..T * T];
                let mut v = [_mm512_setzero_si512(); T];
                for (r, x) in v.iter_mut().enumerate() {
                    // SAFETY: `tile` holds 16 rows of 16 f32.
                    *x = unsafe { _mm512_loadu_si512(tile[r * T..].as_ptr().cast()) };
                }
                for (r, x) in transpose16(v).into_iter().enumerate().take(T.min(c.m - row0)) {
                    // SAFETY: row `row0 + r < m`, columns `col0..col0 + cols <= n` of `out`,
                    // which only this task writes (caller's contract); masked store.
                    unsafe { _mm512_mask_storeu_epi32(out.get().add((row0 + r) * c.n + col0).cast(), mask, x) };
                }
            }
        }
    }
    // SAFETY: the CPU has AMX; no tile is used after this.
    unsafe { release() };
}

/// Two row-major tiles `a0`, `a1` (16 rows `a_stride` bytes apart, 32 BF16 values each;
/// advancing 64 bytes a step) times two pair-interleaved tiles `b0`, `b1` (16 rows of 16 pairs,
/// `b_stride` bytes apart; advancing `b_step` bytes a step), summed over `steps` steps into
/// `c = [C00, C01, C10, C11]` (`C_ji += A_j · B_i`: 16 rows of 16 f32, `c_stride` bytes apart),
/// loaded first (or zeroed when `fresh`) and stored back.
///
/// # Safety
/// Tiles configured as [`CONFIG`] on this thread; every tile read and written lies in memory the
/// caller may read (write, for `c`); `steps >= 1`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run_2x2(
    a: [*const u8; 2],
    a_stride: usize,
    b: [*const u8; 2],
    b_stride: usize,
    b_step: usize,
    c: [*mut f32; 4],
    c_stride: usize,
    steps: usize,
    fresh: bool,
) {
    // SAFETY: the caller's contract (every address below lies in the buffers it names).
    unsafe {
        if fresh {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        } else {
            asm!(
                "tileloadd tmm0, [{c0} + {s}]",
                "tileloadd tmm1, [{c1} + {s}]",
                "tileloadd tmm2, [{c2} + {s}]",
                "tileloadd tmm3, [{c3} + {s}]",
                c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3],
                s = in(reg) c_stride,
                options(nostack, readonly),
            );
        }
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {as_}]",
            "tileloadd tmm6, [{b0} + {bs}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {bs}]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {as_}]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, {bstep}",
            "add {b1}, {bstep}",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) a[0] => _,
            a1 = inout(reg) a[1] => _,
            b0 = inout(reg) b[0] => _,
            b1 = inout(reg) b[1] => _,
            n = inout(reg) steps => _,
            as_ = in(reg) a_stride,
            bs = in(reg) b_stride,
            bstep = in(reg) b_step,
            options(nostack, readonly),
        );
        asm!(
            "tilestored [{c0} + {s}], tmm0",
            "tilestored [{c1} + {s}], tmm1",
            "tilestored [{c2} + {s}], tmm2",
            "tilestored [{c3} + {s}], tmm3",
            c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3],
            s = in(reg) c_stride,
            options(nostack),
        );
    }
}

/// Configures the 8 tiles as [`CONFIG`] on this thread.
///
/// # Safety
/// The CPU has AMX and the process may use the tiles ([`applies`] held); pair with [`release`].
#[inline(always)]
pub(crate) unsafe fn configure() {
    // SAFETY: the caller's contract; `CONFIG` is a valid palette-1 configuration.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
}

/// Releases the tile state of this thread (after [`configure`]).
///
/// # Safety
/// The CPU has AMX.
#[inline(always)]
pub(crate) unsafe fn release() {
    // SAFETY: the caller's contract.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}
