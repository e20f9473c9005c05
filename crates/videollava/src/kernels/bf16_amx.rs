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
//! tile operand (16 rows of `W`, 32 values of `k` each) and `A` the pair-interleaved ("VNNI")
//! one: `A` is packed once per call, tile `(mt, s)` holding `[16 pairs of k][16 rows of A]`
//! 32-bit pairs (a 16×16 transpose of 32-bit words). Tasks (rayon) take a stripe of [`NS`] rows
//! of `W`. A task walks `k` in blocks of [`KC`]: it copies the block of its stripe into a
//! buffer (rows padded by one cache line: at the weight's power-of-two row stride the 16 rows of
//! a tile share one L1 set), then for each pair of `W` tiles and each pair of row tiles of `A`
//! (in blocks of [`MB`] rows) runs 2×2 accumulator tiles over the block, prefetching the tiles
//! two steps ahead into L1. Partial sums live in a task buffer of `Cᵀ` tiles for every row of
//! `A`; at the end each tile is transposed (AVX-512) into `out`, or, for a BF16 output
//! ([`matmul_bf16_out`]), a band of 16 rows at a time into a small f32 buffer that is then
//! rounded (bias added, activation applied: [`super::fused::finish_row`]) while it is in L1, so the
//! f32 product never goes through memory. Rows of `W` past `n` in the last tile come from a
//! zero-padded copy.
//!
//! Speed (2 threads, the Xeon with AMX this was written on): 1.1-1.9 TFLOP/s on the 7B and
//! CLIP-L shapes (`bf16_gemm::tests::bench_prefill_shapes`), against 0.07-0.11 for the AVX-512
//! BF16 kernel and 1.3-1.8 for PyTorch's oneDNN. Every buffer a tile is loaded from starts on a
//! cache line ([`super::pack_cache`]): a tile row straddling two lines halved the tile loads'
//! speed (1.0-1.3 TFLOP/s before). The products themselves run at 3.4 TFLOP/s a core with the
//! operands in tile registers and 1.7-1.9 with them streaming from L2, so what bounds this kernel
//! is feeding the tiles, and then packing `A`, copying `W` and writing the output.
//!
//! Numerics: `tdpbf16ps` sums BF16 products into f32 (BF16 denormal inputs read as zero, f32
//! results flushed to zero, round-to-nearest-even), as `vdpbf16ps` does; the order of the sums
//! differs from the other paths, so results agree to f32 rounding.
//!
//! Tile state: each task configures the tiles (`ldtilecfg`) and releases them (`tilerelease`)
//! before it returns, so nothing is left configured on a pool thread. The process asked Linux for
//! the tile-data permission when the CPU was detected ([`super::cpu`]).

use super::cpu::KernelSet;
use super::fused::{finish_row, Activation};
use super::out_ptr::OutPtr;
use super::pack_cache::{aligned_mut, Aligned, PackCache};
use super::transpose::transpose16;
use core::arch::asm;
use core::arch::x86_64::*;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of `W` per task.
const NS: usize = 128;
/// Rows of `A` per block: the row pairs one pair of `W` tiles meets before the next.
const MB: usize = 128;

/// Values of `k` per block: [`KC`] / 32 tile steps per accumulation run (a task's stripe of `W`
/// is packed one block at a time: `NS * KC * 2` bytes; measured best of 512..8192 on the 7B and
/// CLIP shapes).
const KC: usize = 2048;

/// Tile edge (rows) and the `k` values per tile step.
const T: usize = 16;
const KS: usize = 32;

/// Packed `A`, kept between calls (at most 64 Mi u32 elements: 256 MiB).
static A_PACK: PackCache<u32> = PackCache::new(64 << 20);

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
    // SAFETY: the caller's contract, `out` of `m * n` elements.
    unsafe { blocked(a, m, w, n, k, Out::F32(OutPtr::new(out))) }
}

/// `out = act(A · Wᵀ + bias)` rounded to BF16 as [`super::fused::linear_output_bf16`] rounds
/// the f32 product (bit for bit the same), in the GEMM's own pass.
///
/// # Safety
/// As [`matmul`]; `bias` is empty or of `n` values; `set` is [`super::cpu::kernel_set`] of the
/// calling thread.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_bf16_out(
    a: &[u16],
    m: usize,
    w: &[u16],
    n: usize,
    k: usize,
    bias: &[f32],
    act: Activation,
    set: KernelSet,
    out: &mut [half::bf16],
) {
    debug_assert!(bias.is_empty() || bias.len() == n);
    debug_assert_eq!(out.len(), m * n);
    // SAFETY: the caller's contract, `out` of `m * n` elements.
    unsafe { blocked(a, m, w, n, k, Out::Bf16 { out: OutPtr::new(out), bias, act, set }) }
}

/// Where [`blocked`] writes `[m, n]`.
#[derive(Clone, Copy)]
enum Out<'a> {
    /// The f32 sums.
    F32(OutPtr),
    /// `act(sum + bias)` rounded to BF16 (`bias` empty for none).
    Bf16 { out: OutPtr<half::bf16>, bias: &'a [f32], act: Activation, set: KernelSet },
}

/// The blocked tile GEMM of [`matmul`] and [`matmul_bf16_out`].
///
/// # Safety
/// As [`matmul`]; `out` points to `m * n` elements nothing else writes.
unsafe fn blocked(a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: Out) {
    let steps = k / KS;
    // Even tile counts, so that every pair of tiles exists (the extra ones are zeros).
    let m_tiles = m.div_ceil(T).next_multiple_of(2);
    let n_tiles = n.div_ceil(T).next_multiple_of(2);
    A_PACK.with(m_tiles * steps * T * T, 0, |apack| {
        apack.par_chunks_mut(steps * T * T).enumerate().for_each(|(mt, dst)| {
            // SAFETY: the CPU has AVX-512 (caller's contract).
            unsafe { pack_a(a, m, k, mt, dst) };
        });
        // Rows of `W` from the last whole tile on, zero-padded to two tiles (the tail tiles read
        // here instead of past the end of `w`).
        let tail0 = (n / T) * T;
        let mut wtail = Aligned::new((n_tiles * T - tail0) * k, 0u16);
        wtail[..(n - tail0) * k].copy_from_slice(&w[tail0 * k..]);
        let stripes = n_tiles.div_ceil(NS / T);
        let ctx = Ctx { apack, m, m_tiles, steps, w, wtail: &wtail, tail0, n, k };
        (0..stripes).into_par_iter().for_each(|s| {
            let (t0, t1) = (s * NS / T, n_tiles.min((s + 1) * NS / T));
            CBUF.with(|cell| match cell.try_borrow_mut() {
                // SAFETY: as for `matmul`; the task writes the columns of tiles t0..t1 only.
                Ok(mut buf) => unsafe { task(&ctx, t0, t1, out, &mut buf) },
                // SAFETY: as above, with a fresh buffer.
                Err(_) => unsafe { task(&ctx, t0, t1, out, &mut Vec::new()) },
            });
        });
    })
}

/// Rows of `W` per task of [`matmul_few_rows`].
const NS_FEW: usize = 128;

/// Fewest and most rows of `A` for [`matmul_few_rows`].
const FEW_ROWS_MIN: usize = 2;
const FEW_ROWS_MAX: usize = 4 * T;

/// Whether [`matmul_few_rows`] takes this product: AMX BF16, `k % 32 == 0` and `2..=64` rows of
/// `A` (a decode step of several running requests, a conversation's next turn, a short chunk).
/// One row stays on the AVX-512 streaming kernel, which reads `W` at the memory's speed already.
pub(crate) fn applies_few_rows(m: usize, k: usize) -> bool {
    super::cpu::features().amx_bf16 && k % KS == 0 && k > 0 && (FEW_ROWS_MIN..=FEW_ROWS_MAX).contains(&m)
}

/// `out = A · Wᵀ` for at most 64 rows of `A` (1 to 4 tile rows, zero-padded): `W` streamed once
/// from memory straight into the tiles, one tile of `W` (16 rows) at a time over the whole of
/// `k`, each meeting every tile row of `A` (read from L2) as it passes; with one tile row, even
/// and odd steps go to two accumulators. Why: a few rows of `A` on the AVX-512 streaming kernel
/// are bound by its `vdpbf16ps` arithmetic (8 rows: twice the time of one), and the blocked tile
/// GEMM copies its stripe of `W` for rows it meets only a few times; here `W` is read once, so a
/// decode step of 8 requests, or a next turn's ~50 new positions, cost about what one row does.
/// Why one tile of `W` at a time: 16 rows read side by side are streams the hardware prefetcher
/// follows; four tiles (64 streams a core) read `W` at 20-23 GB/s instead of 27-28 on the Xeon
/// this was written on.
///
/// # Safety
/// [`applies_few_rows`] held for `m` and `k` on the calling thread; `a.len() == m * k`,
/// `w.len() == n * k`, `out.len() == m * n`.
pub(crate) unsafe fn matmul_few_rows(a: &[u16], m: usize, w: &[u16], n: usize, k: usize, out: &mut [f32]) {
    let steps = k / KS;
    let m_tiles = m.div_ceil(T);
    let mut apack = Aligned::new(m_tiles * steps * T * T, 0u32);
    for (mt, dst) in apack.chunks_exact_mut(steps * T * T).enumerate() {
        // SAFETY: the CPU has AVX-512 (caller's contract); `dst` holds `steps` tiles.
        unsafe { pack_a(a, m, k, mt, dst) };
    }
    // Rows of `W` from the last whole tile on, zero-padded to one.
    let tail0 = (n / T) * T;
    let n_tiles = n.div_ceil(T);
    let mut wtail = Aligned::new((n_tiles * T - tail0) * k, 0u16);
    wtail[..(n - tail0) * k].copy_from_slice(&w[tail0 * k..]);
    let outp = OutPtr::new(out);
    let ctx = Ctx { apack: &apack, m, m_tiles, steps, w, wtail: &wtail, tail0, n, k };
    let tiles_per_task = NS_FEW / T;
    (0..n_tiles.div_ceil(tiles_per_task)).into_par_iter().for_each(|t| {
        let (t0, t1) = (t * tiles_per_task, n_tiles.min((t + 1) * tiles_per_task));
        // SAFETY: as for `matmul_few_rows`; the task writes the columns of tiles t0..t1 only.
        unsafe { task_few_rows(&ctx, t0, t1, outp) };
    });
}

/// One task of [`matmul_few_rows`]: tiles `t0..t1` of `W`.
///
/// # Safety
/// As [`matmul_few_rows`] (`1 <= m_tiles <= 4`); no other task writes these columns of `out`.
#[target_feature(enable = "avx512f")]
unsafe fn task_few_rows(c: &Ctx, t0: usize, t1: usize, out: OutPtr) {
    #[repr(C, align(64))]
    struct Tiles([f32; 4 * T * T]);
    let mut acc = Tiles([0.0; 4 * T * T]);
    let (ws, s64) = (c.k * 2, 64usize);
    // Tile row `i` of packed `A` at step `st`.
    let at = |i: usize, st: usize| c.apack.as_ptr().cast::<u8>().wrapping_add((i * c.steps + st) * T * T * 4);
    let p = acc.0.as_mut_ptr();
    // SAFETY: the CPU has AMX (caller's contract); released at the end of the task.
    unsafe { configure() };
    for j in t0..t1 {
        let w = c.w_tile(j, 0).cast::<u8>();
        let wt = |st: usize| w.wrapping_add(st * 64);
        // SAFETY: tiles configured above; every tile read lies inside `w`/`wtail` (16 rows of
        // `k` values from the tile's first row) or `apack` (`m_tiles * steps` tiles of 1 KiB),
        // every tile stored inside `acc` (4 tiles).
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            match c.m_tiles {
                1 => {
                    let mut st = 0;
                    while st + 1 < c.steps {
                        asm!(
                            "tileloadd tmm6, [{a0} + {s64}]",
                            "tileloadd tmm4, [{w0} + {ws}]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{a1} + {s64}]",
                            "tileloadd tmm5, [{w1} + {ws}]",
                            "tdpbf16ps tmm1, tmm5, tmm7",
                            a0 = in(reg) at(0, st), a1 = in(reg) at(0, st + 1),
                            w0 = in(reg) wt(st), w1 = in(reg) wt(st + 1),
                            s64 = in(reg) s64, ws = in(reg) ws,
                            options(nostack, readonly),
                        );
                        st += 2;
                    }
                    if st < c.steps {
                        asm!(
                            "tileloadd tmm6, [{a0} + {s64}]",
                            "tileloadd tmm4, [{w0} + {ws}]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            a0 = in(reg) at(0, st), w0 = in(reg) wt(st),
                            s64 = in(reg) s64, ws = in(reg) ws,
                            options(nostack, readonly),
                        );
                    }
                }
                2 => {
                    for st in 0..c.steps {
                        asm!(
                            "tileloadd tmm4, [{w0} + {ws}]",
                            "tileloadd tmm5, [{a0} + {s64}]",
                            "tdpbf16ps tmm0, tmm4, tmm5",
                            "tileloadd tmm6, [{a1} + {s64}]",
                            "tdpbf16ps tmm1, tmm4, tmm6",
                            a0 = in(reg) at(0, st), a1 = in(reg) at(1, st), w0 = in(reg) wt(st),
                            s64 = in(reg) s64, ws = in(reg) ws,
                            options(nostack, readonly),
                        );
                    }
                }
                3 => {
                    for st in 0..c.steps {
                        asm!(
                            "tileloadd tmm4, [{w0} + {ws}]",
                            "tileloadd tmm5, [{a0} + {s64}]",
                            "tdpbf16ps tmm0, tmm4, tmm5",
                            "tileloadd tmm6, [{a1} + {s64}]",
                            "tdpbf16ps tmm1, tmm4, tmm6",
                            "tileloadd tmm7, [{a2} + {s64}]",
                            "tdpbf16ps tmm2, tmm4, tmm7",
                            a0 = in(reg) at(0, st), a1 = in(reg) at(1, st), a2 = in(reg) at(2, st),
                            w0 = in(reg) wt(st),
                            s64 = in(reg) s64, ws = in(reg) ws,
                            options(nostack, readonly),
                        );
                    }
                }
                _ => {
                    for st in 0..c.steps {
                        asm!(
                            "tileloadd tmm4, [{w0} + {ws}]",
                            "tileloadd tmm5, [{a0} + {s64}]",
                            "tdpbf16ps tmm0, tmm4, tmm5",
                            "tileloadd tmm6, [{a1} + {s64}]",
                            "tdpbf16ps tmm1, tmm4, tmm6",
                            "tileloadd tmm7, [{a2} + {s64}]",
                            "tdpbf16ps tmm2, tmm4, tmm7",
                            "tileloadd tmm5, [{a3} + {s64}]",
                            "tdpbf16ps tmm3, tmm4, tmm5",
                            a0 = in(reg) at(0, st), a1 = in(reg) at(1, st), a2 = in(reg) at(2, st),
                            a3 = in(reg) at(3, st), w0 = in(reg) wt(st),
                            s64 = in(reg) s64, ws = in(reg) ws,
                            options(nostack, readonly),
                        );
                    }
                }
            }
            asm!(
                "tilestored [{c0} + {s64}], tmm0",
                "tilestored [{c1} + {s64}], tmm1",
                "tilestored [{c2} + {s64}], tmm2",
                "tilestored [{c3} + {s64}], tmm3",
                c0 = in(reg) p, c1 = in(reg) p.add(T * T), c2 = in(reg) p.add(2 * T * T), c3 = in(reg) p.add(3 * T * T),
                s64 = in(reg) s64,
                options(nostack),
            );
        }
        if c.m_tiles == 1 {
            // Odd steps were summed apart.
            let (even, odd) = acc.0.split_at_mut(T * T);
            for (e, o) in even.iter_mut().zip(odd.iter()) {
                *e += *o;
            }
        }
        let col0 = j * T;
        if col0 < c.n {
            for i in 0..c.m_tiles {
                // SAFETY: tile `i` of `acc`; columns `col0..` (< n) of the rows `16 i..` (< m)
                // of `out`, which only this task writes (caller's contract).
                unsafe { store_transposed(&acc.0[i * T * T..][..T * T], out, c.m, c.n, i * T, col0) };
            }
        }
    }
    // SAFETY: the CPU has AMX; no tile is used after this.
    unsafe { release() };
}

/// Writes the `Cᵀ` tile `tile` (16 rows of `W` by 16 rows of `A`) transposed into `out[row0..,
/// col0..]` (rows `< m`, columns `< n`; `out` row-major `[m, n]`).
///
/// # Safety
/// The CPU has AVX-512 F; `out` points to `m * n` f32 and nothing else writes those elements.
#[target_feature(enable = "avx512f")]
unsafe fn store_transposed(tile: &[f32], out: OutPtr, m: usize, n: usize, row0: usize, col0: usize) {
    let cols = T.min(n - col0);
    let mask: __mmask16 = if cols == T { !0 } else { (1u16 << cols) - 1 };
    let mut v = [_mm512_setzero_si512(); T];
    for (r, x) in v.iter_mut().enumerate() {
        // SAFETY: `tile` holds 16 rows of 16 f32.
        *x = unsafe { _mm512_loadu_si512(tile[r * T..].as_ptr().cast()) };
    }
    for (r, x) in transpose16(v).into_iter().enumerate().take(T.min(m - row0)) {
        // SAFETY: row `row0 + r < m`, columns `col0..col0 + cols <= n` (caller's contract);
        // masked store.
        unsafe { _mm512_mask_storeu_epi32(out.get().add((row0 + r) * n + col0).cast(), mask, x) };
    }
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
unsafe fn task(c: &Ctx, t0: usize, t1: usize, out: Out, cbuf: &mut Vec<f32>) {
    let nt = t1 - t0;
    let tiles_per_block = MB / T;
    let steps_per_block = KC / KS;
    let mt = c.m_tiles;
    // Partial `Cᵀ` tiles of every row tile, then this stripe of `W` packed per `k` block.
    let cbuf = aligned_mut(cbuf, nt * mt * T * T + nt * T * (steps_per_block + 1) * KS / 2, 0.0);
    let (cpart, wpart) = cbuf.split_at_mut(nt * mt * T * T);
    let cb = cpart.as_mut_ptr();
    // The `k` block of this stripe of `W`, row-major, each row padded by 64 bytes (so that the
    // 16 rows of a tile fall in different L1 sets; at the weight's own stride of a power of two
    // they share one set and evict each other).
    let wpk: &mut [u16] = bytemuck::cast_slice_mut(wpart);
    // SAFETY: the CPU has AMX (caller's contract); released at the end of the task.
    unsafe { configure() };
    for s0 in (0..c.steps).step_by(steps_per_block) {
        let ns = steps_per_block.min(c.steps - s0);
        let ws = (ns + 1) * KS;
        for j in 0..nt {
            for r in 0..T {
                let src = c.w_tile(t0 + j, s0).wrapping_add(r * c.k);
                for s in 0..ns {
                    let dst = &mut wpk[(j * T + r) * ws + s * KS..][..KS];
                    // SAFETY: row `r` of tile `j` holds `k >= (s0 + ns) * 32` values from `src`
                    // on (within `w` or `wtail`); `dst` holds 32 values.
                    unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), _mm512_loadu_si512(src.add(s * KS).cast())) };
                }
            }
        }
        for mb0 in (0..mt).step_by(tiles_per_block) {
            let mbt = tiles_per_block.min(mt - mb0);
            for jp in (0..nt).step_by(2) {
                let wt = |j: usize| wpk[(jp + j) * T * ws..].as_ptr();
                for ip in (0..mbt).step_by(2) {
                    let at = |i: usize| c.apack[((mb0 + ip + i) * c.steps + s0) * T * T..].as_ptr();
                    let ct = |j: usize, i: usize| cb.wrapping_add(((jp + j) * mt + mb0 + ip + i) * T * T);
                    // SAFETY: every tile read lies inside `wpk` or `apack` (tile-contiguous, `ns`
                    // steps of 1 KiB), every tile stored inside `cbuf` (1 KiB each); the tiles are
                    // configured above.
                    unsafe {
                        run_2x2::<2>(
                            [wt(0).cast(), wt(1).cast()],
                            ws * 2,
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
    }
    // SAFETY: the CPU has AMX; no tile is used after this.
    unsafe { release() };
    // Every tile is complete: transposed into `out`.
    let tile = |j: usize, i: usize| &cpart[(j * mt + i) * T * T..][..T * T];
    match out {
        Out::F32(out) => {
            for j in 0..nt {
                let col0 = (t0 + j) * T;
                if col0 >= c.n {
                    break;
                }
                for i in 0..mt {
                    let row0 = i * T;
                    if row0 >= c.m {
                        break;
                    }
                    // SAFETY: rows `< m`, columns `< n` of `out`, which only this task writes
                    // (caller's contract).
                    unsafe { store_transposed(tile(j, i), out, c.m, c.n, row0, col0) };
                }
            }
        }
        Out::Bf16 { out, bias, act, set } => {
            // A band of 16 rows of this stripe's columns in f32, rounded while in L1.
            let col0 = t0 * T;
            let cols = c.n.min(t1 * T) - col0;
            let mut band = [0f32; T * NS];
            for i in 0..mt {
                let row0 = i * T;
                if row0 >= c.m {
                    break;
                }
                let rows = T.min(c.m - row0);
                for j in 0..cols.div_ceil(T) {
                    // SAFETY: `band` is `[T][NS]` f32 and `(j + 1) * T <= NS` (a stripe has at
                    // most `NS / T` tiles); rows `< rows <= T`.
                    unsafe { store_transposed(tile(j, i), OutPtr::new(&mut band), rows, NS, 0, j * T) };
                }
                for r in 0..rows {
                    // SAFETY: row `row0 + r < m`, columns `col0..col0 + cols <= n` of `out`,
                    // which only this task writes (caller's contract).
                    let o = unsafe { std::slice::from_raw_parts_mut(out.get().add((row0 + r) * c.n + col0), cols) };
                    let b = if bias.is_empty() { bias } else { &bias[col0..col0 + cols] };
                    finish_row(set, &band[r * NS..][..cols], b, act, o);
                }
            }
        }
    }
}

/// Two row-major tiles `a0`, `a1` (16 rows `a_stride` bytes apart, 32 BF16 values each;
/// advancing 64 bytes a step) times two pair-interleaved tiles `b0`, `b1` (16 rows of 16 pairs,
/// `b_stride` bytes apart; advancing `b_step` bytes a step), summed over `steps` steps into
/// `c = [C00, C01, C10, C11]` (`C_ji += A_j · B_i`: 16 rows of 16 f32, `c_stride` bytes apart),
/// loaded first (or zeroed when `fresh`) and stored back. With `PD > 0` the four tiles `PD`
/// steps ahead are prefetched into L1 (16 lines each): a tile load that misses L1 costs several
/// times one that hits, and the GEMM's tiles stream from L2.
///
/// # Safety
/// Tiles configured as [`CONFIG`] on this thread; every tile read and written lies in memory the
/// caller may read (write, for `c`); `steps >= 1` (prefetches past the operands never fault).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run_2x2<const PD: usize>(
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
    // SAFETY: the caller's contract (every tile address below lies in the buffers it names).
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
        for st in 0..steps {
            if PD > 0 && st + PD < steps {
                let ahead = st + PD;
                for r in 0..16 {
                    _mm_prefetch::<_MM_HINT_T0>(a[0].wrapping_add(ahead * 64 + r * a_stride).cast());
                    _mm_prefetch::<_MM_HINT_T0>(a[1].wrapping_add(ahead * 64 + r * a_stride).cast());
                    _mm_prefetch::<_MM_HINT_T0>(b[0].wrapping_add(ahead * b_step + r * b_stride).cast());
                    _mm_prefetch::<_MM_HINT_T0>(b[1].wrapping_add(ahead * b_step + r * b_stride).cast());
                }
            }
            asm!(
                "tileloadd tmm4, [{a0} + {as_}]",
                "tileloadd tmm6, [{b0} + {bs}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {bs}]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {as_}]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a[0].wrapping_add(st * 64),
                a1 = in(reg) a[1].wrapping_add(st * 64),
                b0 = in(reg) b[0].wrapping_add(st * b_step),
                b1 = in(reg) b[1].wrapping_add(st * b_step),
                as_ = in(reg) a_stride,
                bs = in(reg) b_stride,
                options(nostack, readonly),
            );
        }
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
