//! The AVX2 paths of the int8 GEMMs ([`super::q8_gemm`], [`super::q4k_gemm`]) for CPUs without
//! AVX-512 VNNI (AMD Zen 1-3, Intel Haswell to Comet Lake, and Alder Lake and later cores
//! without AVX-512): one blocked driver over both block formats, monomorphised per [`Format`]
//! (the packing and the micro-kernel), with AVX-VNNI's fused forms where the CPU has them.
//!
//! Conventions as in those modules: `x` f32 `[m, k]`; `w` raw GGML blocks `[n, k]`
//! ([`Format::row_bytes`] per row); `out` f32 `[m, n]`, overwritten. `k` is a positive multiple
//! of 32 (of the format's block).
//!
//! Blocking (`qgemm_avx512`'s, with 256-bit vectors): activations are quantized once per call
//! to Q8_0 (32 values, f16-rounded scale `d_a`) by the scalar quantizer, exactly as the portable
//! path, and packed into micro-panels of [`MR`] = 6 rows, ordered by k-chunk ([`KCB`] blocks),
//! then row tile, then block. Tasks (rayon, [`TaskGrid`]) take a stripe of output columns, pack
//! it as micro-panels of [`NR`] = 8 columns (one ymm: lane = column), and run a 6×8
//! micro-kernel (6 integer and 6 f32 accumulators) over each micro-panel of `W` (in L1) against
//! the row tiles; the micro-kernel broadcasts a 32-bit word of one activation row against the
//! 8 columns, so no horizontal sums are needed and the results store straight into `out`.
//!
//! The products, per 32-value block an exact integer as on every path (only the order of the
//! f32 sums differs):
//! - Q8_0 without AVX-VNNI: weights and activations widened to i16 (pairs of `k`); `madd` of a
//!   column pair with a broadcast activation pair (at most 2 · 128 · 127 per lane), added to the
//!   block sum. Two µops per 16 products and no sign trick: `maddubs` on signed × signed bytes
//!   needs a `sign` per operand and a `madd` per step.
//! - Q8_0 with AVX-VNNI (`qgemm_avx512`'s scheme): activations biased to `qa + 128` (`u8`)
//!   against the `i8` weights, one `vpdpbusd` per 32 products (no saturation), the block sum
//!   starting from `-128 · Σ qw` (packed with the weights) to undo the bias: the same integers.
//! - Q4K: the nibbles as `u8` quads against broadcast `i8` activation quads: `maddubs` (at most
//!   2 · 15 · 128 per i16), the eight quads of a 32-value sub-block summed in i16 (at most
//!   30,720: no overflow), then one `madd` with ones (`vpdpbusd` with AVX-VNNI: the same
//!   integers); the min term is `(dmin · m) · (d_a · Σ qa)` per sub-block.
//!
//! Memory: the packed activations (`m · k · 2.1` bytes for Q8_0 without AVX-VNNI, else about
//! `m · k · 1.2`) are kept between calls, and each rayon thread keeps its packed stripe of `W`
//! (`256 · k · 2.1` bytes for Q8_0 without AVX-VNNI, else `256 · k · 1.25`).

// Register-blocked kernels index their arrays by loop counters on purpose.
#![allow(clippy::needless_range_loop)]

use super::out_ptr::OutPtr;
use super::pack_cache::PackCache;
use super::qgemv::{q4k_scales_mins, q8_0_block_scalar};
use super::task_grid::{activation_jobs, TaskGrid};
use half::f16;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Values per activation block (Q8_0).
const QK: usize = 32;
/// Rows of the micro-tile (each a 32-bit broadcast).
const MR: usize = 6;
/// Columns of the micro-tile (one ymm of f32 lanes).
const NR: usize = 8;
/// Blocks per k-chunk: the micro-panel of `W` for one chunk stays in L1 (Q8_0: 8.5 KiB).
const KCB: usize = 16;
/// Micro-panels (of `NR` columns) per column stripe (one task's packed `W`).
const NC_PANELS: usize = 32;
/// Row tiles per cache block of the packed activations (Q8_0: 204 KiB per k-chunk, in L2).
const MC_TILES: usize = 32;
/// Row tiles per activation packing task.
const PACK_TILES: usize = 16;

/// What one weight format brings to the driver.
trait Format {
    /// Bytes of one 32-value block of a packed activation micro-panel.
    const A_BLK: usize;
    /// Bytes of one 32-value block of a packed weight micro-panel.
    const W_BLK: usize;
    /// 32-value blocks per weight block: k-chunks start and end on whole weight blocks.
    const SUBS: usize;

    /// Bytes of one weight row of `k` values.
    fn row_bytes(k: usize) -> usize;

    /// Packs one 32-value block of a row tile: `q[r]` the quantized values of row `r`, `da[r]`
    /// its f16-rounded scale (zeros for missing rows), into `dst` (`A_BLK` bytes).
    fn pack_a(q: &[[i8; QK]; MR], da: &[f32; MR], dst: &mut [u8]);

    /// Packs weight rows `j0..j0 + valid` (`valid <= NR`; `w` the whole weight, `row_bytes` per
    /// row), 32-value blocks `pc..pc + kcb` (whole weight blocks), into `dst` (`kcb * W_BLK`
    /// bytes); missing columns are zeros.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (this runs inlined into a function compiled for them).
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_w(w: &[u8], row_bytes: usize, j0: usize, valid: usize, pc: usize, kcb: usize, dst: &mut [u8]);

    /// The `R`×`NR` products over `nblk` blocks of the packed micro-panels `a` (`A_BLK` bytes per
    /// block) and `b` (`W_BLK` bytes per block): `acc[r]` lane `c` = row `r` · column `c`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `VNNI` (this runs inlined into a
    /// function compiled for them); `a` and `b` hold `nblk` blocks.
    unsafe fn micro<const VNNI: bool, const R: usize>(a: *const u8, b: *const u8, nblk: usize) -> [__m256; R];
}

/// Packed activations, kept between calls (at most 256 MiB).
static A_PACK: PackCache<u8> = PackCache::new(256 << 20);

thread_local! {
    /// Packed stripe of `W`, reused by the tasks run on this thread.
    static PACK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// [`super::q8_gemm::matmul_q8_0`] on AVX2, with AVX-VNNI when `vnni` (shapes checked by the
/// caller: `k` a positive multiple of 32, slices matching).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
pub(crate) unsafe fn q8_0(vnni: bool, x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    // SAFETY: the caller's contract (AVX-VNNI for `task_vnni`).
    unsafe {
        if vnni {
            gemm::<Q80Vnni>(task_vnni::<Q80Vnni>, x, m, w, n, k, out)
        } else {
            gemm::<Q80>(task_plain::<Q80>, x, m, w, n, k, out)
        }
    }
}

/// [`super::q4k_gemm::matmul_q4k`] on AVX2, with AVX-VNNI when `vnni` (shapes checked by the
/// caller: `k` a positive multiple of 256, slices matching).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
pub(crate) unsafe fn q4k(vnni: bool, x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    // SAFETY: the caller's contract (AVX-VNNI for `task_vnni`).
    unsafe {
        if vnni {
            gemm::<Q4K>(task_vnni::<Q4K>, x, m, w, n, k, out)
        } else {
            gemm::<Q4K>(task_plain::<Q4K>, x, m, w, n, k, out)
        }
    }
}

/// [`task`] compiled for one set of CPU features ([`task_plain`] or [`task_vnni`]).
type TaskFn = unsafe fn(&Task, &mut Vec<u8>);

/// The blocked GEMM (any `m >= 1`, `n >= 1`), whose tasks `run` (`task_plain::<F>` or
/// `task_vnni::<F>`).
///
/// # Safety
/// The CPU has the features `run` is compiled for; the slices match the shapes
/// (`w.len() == n * F::row_bytes(k)`); `k` is a positive multiple of `32 * F::SUBS`.
unsafe fn gemm<F: Format>(run: TaskFn, x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    const { assert!(KCB.is_multiple_of(F::SUBS), "k-chunks hold whole weight blocks") };
    let a_blk = F::A_BLK;
    let nb = k / QK;
    let m_tiles = m.div_ceil(MR);
    A_PACK.with(m_tiles * nb * a_blk, 0, |apack| {
        let jobs = activation_jobs(&mut apack[..], nb, m_tiles, KCB, PACK_TILES, a_blk);
        jobs.into_par_iter().for_each(|(pc, kcb, t0, tiles, dst)| {
            for t in 0..tiles {
                let r0 = (t0 + t) * MR;
                let rows = MR.min(m - r0);
                for b in 0..kcb {
                    let (mut q, mut da) = ([[0i8; QK]; MR], [0f32; MR]);
                    for r in 0..rows {
                        let p = (r0 + r) * k + (pc + b) * QK;
                        da[r] = f16::from_f32(q8_0_block_scalar(&x[p..p + QK], &mut q[r])).to_f32();
                    }
                    F::pack_a(&q, &da, &mut dst[(t * kcb + b) * a_blk..(t * kcb + b + 1) * a_blk]);
                }
            }
        });
        let grid = TaskGrid::new(n, NR, NC_PANELS, m_tiles);
        let outp = OutPtr::new(out);
        let apack = &apack[..];
        grid.run(&PACK, |j0, j1, t0, t1, buf| {
            let task = Task { apack, m, t0, t1, w, n, k, j0, cols: j1 - j0, out: outp };
            // SAFETY: the features `run` needs (this function's contract); the task writes the
            // rows of tiles t0..t1, columns j0..j1 only.
            unsafe { run(&task, buf) }
        });
    })
}

/// One task of [`gemm`]: row tiles `t0..t1` of the packed activations, columns `j0..j0 + cols`
/// of `out` (`[m, n]`).
struct Task<'a> {
    apack: &'a [u8],
    m: usize,
    t0: usize,
    t1: usize,
    w: &'a [u8],
    n: usize,
    k: usize,
    j0: usize,
    cols: usize,
    out: OutPtr,
}

/// [`task`] compiled for AVX2, FMA and F16C.
///
/// # Safety
/// As for [`task`], without AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_plain<F: Format>(t: &Task, buf: &mut Vec<u8>) {
    // SAFETY: the caller's contract; the features are enabled here.
    unsafe { task::<F, false>(t, buf) }
}

/// [`task`] compiled for AVX2, FMA, F16C and AVX-VNNI.
///
/// # Safety
/// As for [`task`], with AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn task_vnni<F: Format>(t: &Task, buf: &mut Vec<u8>) {
    // SAFETY: the caller's contract; the features are enabled here.
    unsafe { task::<F, true>(t, buf) }
}

/// Packs the task's stripe of `W` into `buf`, then runs the micro-kernel over every micro-panel
/// and row tile, by k-chunk, and stores into `out` (the first k-chunk overwrites, the others
/// add).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `VNNI` (inlined into [`task_plain`] or
/// [`task_vnni`]); `t.apack` holds the packed tiles of all `m` rows; no other task writes the
/// task's elements of `out`.
#[inline(always)]
unsafe fn task<F: Format, const VNNI: bool>(t: &Task, buf: &mut Vec<u8>) {
    // SAFETY: this `unsafe fn`'s contract, which its callers uphold; the packed operands are
    // read within the blocks packed above and `out` within the task's rows and columns.
    unsafe {
        let (a_blk, w_blk) = (F::A_BLK, F::W_BLK);
        let nb = t.k / QK;
        let row_bytes = F::row_bytes(t.k);
        let m_tiles = t.m.div_ceil(MR);
        let panels = t.cols.div_ceil(NR);
        // Packed stripe: by k-chunk, then panel (`kcb * W_BLK` bytes each).
        let len = panels * nb * w_blk;
        if buf.len() < len {
            // Every byte in use is overwritten by the packing.
            buf.resize(len, 0);
        }
        let wpack = &mut buf[..len];
        let mut pc = 0;
        while pc < nb {
            let kcb = KCB.min(nb - pc);
            for p in 0..panels {
                let c0 = t.j0 + p * NR;
                let valid = NR.min(t.j0 + t.cols - c0);
                let o = (pc * panels + p * kcb) * w_blk;
                F::pack_w(t.w, row_bytes, c0, valid, pc, kcb, &mut wpack[o..o + kcb * w_blk]);
            }
            pc += kcb;
        }
        let c = t.out.get();
        let (ap, bp) = (t.apack.as_ptr(), wpack.as_ptr());
        let mut tc = t.t0;
        while tc < t.t1 {
            let tc_end = t.t1.min(tc + MC_TILES);
            let mut pc = 0;
            while pc < nb {
                let kcb = KCB.min(nb - pc);
                let accumulate = pc > 0;
                for p in 0..panels {
                    let c0 = t.j0 + p * NR;
                    let valid = NR.min(t.j0 + t.cols - c0);
                    let b = bp.add((pc * panels + p * kcb) * w_blk);
                    // The micro-panel of `W` stays in L1 while the row tiles stream from L2.
                    for tile in tc..tc_end {
                        let rows = MR.min(t.m - tile * MR);
                        let a = ap.add((pc * m_tiles + tile * kcb) * a_blk);
                        let ct = c.add(tile * MR * t.n + c0);
                        macro_rules! call {
                            ($($r:literal)*) => {
                                match rows {
                                    $($r => store_tile(&F::micro::<VNNI, $r>(a, b, kcb), ct, t.n, valid, accumulate),)*
                                    _ => unreachable!("rows in 1..=MR"),
                                }
                            };
                        }
                        call!(1 2 3 4 5 6);
                    }
                }
                pc += kcb;
            }
            tc = tc_end;
        }
    }
}

/// Stores the accumulators `acc` (`acc[r]` lane `c`) into rows `0..R`, columns `0..valid` of
/// `c` (stride `ldc`), overwriting, or adding when `accumulate`.
///
/// # Safety
/// The CPU has AVX2 (inlined into a function compiled for it); those elements of `c` are valid
/// for reads and writes.
#[inline(always)]
unsafe fn store_tile<const R: usize>(acc: &[__m256; R], c: *mut f32, ldc: usize, valid: usize, accumulate: bool) {
    // SAFETY: this `unsafe fn`'s contract; a masked-off lane is neither read nor written.
    unsafe {
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for r in 0..R {
            let cr = c.add(r * ldc);
            let mut v = acc[r];
            if valid == NR {
                if accumulate {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(cr));
                }
                _mm256_storeu_ps(cr, v);
            } else {
                if accumulate {
                    v = _mm256_add_ps(v, _mm256_maskload_ps(cr, mask));
                }
                _mm256_maskstore_ps(cr, mask, v);
            }
        }
    }
}

/// Transpose of an 8×8 matrix of 32-bit words (`v[r]` = row `r`).
///
/// # Safety
/// The CPU has AVX2 (inlined into a function compiled for it).
#[inline(always)]
unsafe fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    // SAFETY: the caller's contract (register operations only).
    unsafe {
        let mut t = [_mm256_setzero_si256(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        // t[2i], per 128-bit half l: (r2i c4l, r2i+1 c4l, r2i c4l+1, r2i+1 c4l+1); t[2i+1]: c4l+2, +3.
        let mut u = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let (p, q) = (4 * h, 4 * h + 2);
            u[4 * h] = _mm256_unpacklo_epi64(t[p], t[q]);
            u[4 * h + 1] = _mm256_unpackhi_epi64(t[p], t[q]);
            u[4 * h + 2] = _mm256_unpacklo_epi64(t[p + 1], t[q + 1]);
            u[4 * h + 3] = _mm256_unpackhi_epi64(t[p + 1], t[q + 1]);
        }
        // u[4h + j], half l: rows 4h..4h+4 of column 4l + j.
        let mut o = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            o[j] = _mm256_permute2x128_si256::<0x20>(u[j], u[4 + j]);
            o[4 + j] = _mm256_permute2x128_si256::<0x31>(u[j], u[4 + j]);
        }
        o
    }
}

/// The 32 bytes at `p`.
///
/// # Safety
/// The CPU has AVX2; 32 bytes at `p` are readable.
#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// The 32-bit word at `p` in every lane.
///
/// # Safety
/// The CPU has AVX2; 4 bytes at `p` are readable.
#[inline(always)]
unsafe fn broadcast(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
}

/// The f32 at `p` in every lane.
///
/// # Safety
/// As for [`broadcast`].
#[inline(always)]
unsafe fn broadcast_f32(p: *const u8) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe { _mm256_set1_ps((p as *const f32).read_unaligned()) }
}

/// `acc[r] += isum[r] · (dw · da[r])`: one block's exact sums scaled into the f32 accumulators
/// (`dw`: the `NR` weight scales, `da`: the `MR` activation scales, both f32).
///
/// # Safety
/// The CPU has AVX2 and FMA (inlined into a function compiled for them); 32 bytes at `dw` and
/// `4 · R` at `da` are readable.
#[inline(always)]
unsafe fn add_scaled<const R: usize>(acc: &mut [__m256; R], isum: &[__m256i; R], dw: *const u8, da: *const u8) {
    // SAFETY: the caller's contract.
    unsafe {
        let dw = _mm256_loadu_ps(dw.cast());
        for r in 0..R {
            let s = _mm256_mul_ps(dw, broadcast_f32(da.add(4 * r)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), s, acc[r]);
        }
    }
}

/// Block `blk` of the Q8_0 weight rows `j0..j0 + valid` (`valid <= NR`; `w` the whole weight,
/// `row_bytes` per row): the f16 scales' bits and the 32 codes of each column (zeros for missing
/// columns).
///
/// # Safety
/// The CPU has AVX2 (inlined into a function compiled for it).
#[inline(always)]
unsafe fn q8_0_columns(w: &[u8], row_bytes: usize, j0: usize, valid: usize, blk: usize) -> ([u16; NR], [__m256i; NR]) {
    assert!(valid <= NR && (blk + 1) * 34 <= row_bytes, "q8_0_columns: range");
    // SAFETY: the caller's contract (AVX2); `b[2..34]` is 32 readable bytes.
    unsafe {
        let (mut d, mut q) = ([0u16; NR], [_mm256_setzero_si256(); NR]);
        for c in 0..valid {
            let b = &w[(j0 + c) * row_bytes + blk * 34..][..34];
            d[c] = u16::from_le_bytes([b[0], b[1]]);
            q[c] = load(b[2..34].as_ptr());
        }
        (d, q)
    }
}

/// Q8_0 weights (blocks of `{ d: f16, qs: [i8; 32] }`).
struct Q80;

/// Q8_0's packed activation block: 16 k-pairs × `MR` rows × 2 i16, then the `MR` scales `d_a`.
const Q80_A_D: usize = 16 * MR * 4;
/// Q8_0's packed weight block: 16 k-pairs × `NR` columns × 2 i16, then the `NR` scales `d_w`.
const Q80_W_D: usize = 16 * NR * 4;

impl Format for Q80 {
    const A_BLK: usize = Q80_A_D + MR * 4;
    const W_BLK: usize = Q80_W_D + NR * 4;
    const SUBS: usize = 1;

    fn row_bytes(k: usize) -> usize {
        k / QK * 34
    }

    /// `dst[(p * MR + r) * 4..][..4]` = `(q[r][2p], q[r][2p + 1])` as little-endian i16.
    fn pack_a(q: &[[i8; QK]; MR], da: &[f32; MR], dst: &mut [u8]) {
        for p in 0..QK / 2 {
            for r in 0..MR {
                let o = (p * MR + r) * 4;
                dst[o..o + 2].copy_from_slice(&(q[r][2 * p] as i16).to_le_bytes());
                dst[o + 2..o + 4].copy_from_slice(&(q[r][2 * p + 1] as i16).to_le_bytes());
            }
        }
        for r in 0..MR {
            dst[Q80_A_D + 4 * r..Q80_A_D + 4 * r + 4].copy_from_slice(&da[r].to_le_bytes());
        }
    }

    /// Per block: `dst[(p * NR + c) * 4..][..4]` = column `c`'s pair `p` as i16, then the `NR`
    /// scales as f32.
    #[inline(always)]
    unsafe fn pack_w(w: &[u8], row_bytes: usize, j0: usize, valid: usize, pc: usize, kcb: usize, dst: &mut [u8]) {
        assert!(dst.len() == kcb * Self::W_BLK, "pack_w: sizes");
        // SAFETY: the caller's contract (the features); reads and writes through bounds-checked
        // slices.
        unsafe {
            for b in 0..kcb {
                let (d, q) = q8_0_columns(w, row_bytes, j0, valid, pc + b);
                let (mut lo, mut hi) = ([_mm256_setzero_si256(); NR], [_mm256_setzero_si256(); NR]);
                for c in 0..NR {
                    lo[c] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q[c]));
                    hi[c] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(q[c]));
                }
                let dst = &mut dst[b * Self::W_BLK..(b + 1) * Self::W_BLK];
                for (h, v) in [lo, hi].into_iter().enumerate() {
                    for (p, v) in transpose8(v).into_iter().enumerate() {
                        _mm256_storeu_si256(dst[(8 * h + p) * 32..][..32].as_mut_ptr().cast(), v);
                    }
                }
                let scales = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().cast()));
                _mm256_storeu_ps(dst[Q80_W_D..Q80_W_D + 32].as_mut_ptr().cast(), scales);
            }
        }
    }

    /// Per block: `isum[r]` lane `c` = `Σ_p madd(pair p of column c, pair p of row r)` (exact),
    /// then `acc[r] += isum · (d_w · d_a)`. Without AVX-VNNI only ([`Q80Vnni`] with it).
    #[inline(always)]
    unsafe fn micro<const VNNI: bool, const R: usize>(a: *const u8, b: *const u8, nblk: usize) -> [__m256; R] {
        const { assert!(!VNNI, "Q8_0 with AVX-VNNI is Q80Vnni") };
        // SAFETY: the caller's contract: the features, and `nblk` blocks behind `a` and `b`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            for blk in 0..nblk {
                let ab = a.add(blk * Self::A_BLK);
                let bb = b.add(blk * Self::W_BLK);
                let mut isum = [_mm256_setzero_si256(); R];
                for p in 0..QK / 2 {
                    let wv = load(bb.add(p * NR * 4));
                    for r in 0..R {
                        let av = broadcast(ab.add((p * MR + r) * 4));
                        isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(wv, av));
                    }
                }
                add_scaled(&mut acc, &isum, bb.add(Q80_W_D), ab.add(Q80_A_D));
            }
            acc
        }
    }
}

/// Q8_0 weights on AVX-VNNI.
struct Q80Vnni;

/// [`Q80Vnni`]'s packed activation block: 8 k-quads × `MR` rows × 4 `qa + 128` as u8, then the
/// `MR` scales `d_a`.
const Q80V_A_D: usize = 8 * MR * 4;
/// [`Q80Vnni`]'s packed weight block: 8 k-quads × `NR` columns × 4 i8, then the `NR`
/// corrections `-128 · Σ qw` (i32), then the `NR` scales `d_w`.
const Q80V_W_CORR: usize = 8 * NR * 4;
const Q80V_W_D: usize = Q80V_W_CORR + NR * 4;

impl Format for Q80Vnni {
    const A_BLK: usize = Q80V_A_D + MR * 4;
    const W_BLK: usize = Q80V_W_D + NR * 4;
    const SUBS: usize = 1;

    fn row_bytes(k: usize) -> usize {
        Q80::row_bytes(k)
    }

    /// `dst[(q * MR + r) * 4 + l]` = `q[r][4q + l] + 128` as u8, then the scales.
    fn pack_a(q: &[[i8; QK]; MR], da: &[f32; MR], dst: &mut [u8]) {
        for quad in 0..QK / 4 {
            for r in 0..MR {
                for l in 0..4 {
                    dst[(quad * MR + r) * 4 + l] = (q[r][4 * quad + l] as u8) ^ 0x80;
                }
            }
        }
        for r in 0..MR {
            dst[Q80V_A_D + 4 * r..Q80V_A_D + 4 * r + 4].copy_from_slice(&da[r].to_le_bytes());
        }
    }

    /// Per block: `dst[(q * NR + c) * 4 + l]` = column `c`'s `qw[4q + l]`, then the
    /// corrections, then the scales.
    #[inline(always)]
    unsafe fn pack_w(w: &[u8], row_bytes: usize, j0: usize, valid: usize, pc: usize, kcb: usize, dst: &mut [u8]) {
        assert!(dst.len() == kcb * Self::W_BLK, "pack_w: sizes");
        // SAFETY: the caller's contract (the features, AVX-VNNI included); reads and writes
        // through bounds-checked slices.
        unsafe {
            let ones = _mm256_set1_epi8(1);
            for b in 0..kcb {
                let (d, v) = q8_0_columns(w, row_bytes, j0, valid, pc + b);
                let dst = &mut dst[b * Self::W_BLK..(b + 1) * Self::W_BLK];
                let mut sum = _mm256_setzero_si256();
                for (quad, v) in transpose8(v).into_iter().enumerate() {
                    sum = _mm256_dpbusd_avx_epi32(sum, ones, v);
                    _mm256_storeu_si256(dst[quad * 32..][..32].as_mut_ptr().cast(), v);
                }
                let corr = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(sum));
                _mm256_storeu_si256(dst[Q80V_W_CORR..Q80V_W_CORR + 32].as_mut_ptr().cast(), corr);
                let scales = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().cast()));
                _mm256_storeu_ps(dst[Q80V_W_D..Q80V_W_D + 32].as_mut_ptr().cast(), scales);
            }
        }
    }

    /// Per block: `isum[r]` lane `c` = `-128 · Σ qw + Σ_q dpbusd(quad q of row r + 128, quad q of
    /// column c)` = `Σ qa · qw` (exact), then `acc[r] += isum · (d_w · d_a)` as [`Q80`]'s.
    #[inline(always)]
    unsafe fn micro<const VNNI: bool, const R: usize>(a: *const u8, b: *const u8, nblk: usize) -> [__m256; R] {
        const { assert!(VNNI, "Q80Vnni needs AVX-VNNI") };
        // SAFETY: the caller's contract: the features, and `nblk` blocks behind `a` and `b`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            for blk in 0..nblk {
                let ab = a.add(blk * Self::A_BLK);
                let bb = b.add(blk * Self::W_BLK);
                let corr = load(bb.add(Q80V_W_CORR));
                let mut isum = [corr; R];
                for quad in 0..QK / 4 {
                    let wv = load(bb.add(quad * NR * 4));
                    for r in 0..R {
                        isum[r] = _mm256_dpbusd_avx_epi32(isum[r], broadcast(ab.add((quad * MR + r) * 4)), wv);
                    }
                }
                add_scaled(&mut acc, &isum, bb.add(Q80V_W_D), ab.add(Q80V_A_D));
            }
            acc
        }
    }
}

/// Q4K weights (super-blocks of 256 values, 144 bytes: `d`, `dmin`, 12 bytes of six-bit
/// scales and mins, 128 bytes of nibbles).
struct Q4K;

/// Q4K's packed activation block: 8 k-quads × `MR` rows × 4 i8, then the `MR` scales `d_a`, then
/// the `MR` products `d_a · Σ qa` (exact: an 11-bit mantissa times at most 32 · 128).
const Q4K_A_D: usize = 8 * MR * 4;
const Q4K_A_DSUM: usize = Q4K_A_D + MR * 4;
/// Q4K's packed weight block (one 32-value sub-block): 8 k-quads × `NR` columns × 4 nibbles as
/// u8, then the `NR` scales `d · sc`, then the `NR` mins `dmin · m` (both exact in f32).
const Q4K_W_D: usize = 8 * NR * 4;
const Q4K_W_MIN: usize = Q4K_W_D + NR * 4;

impl Format for Q4K {
    const A_BLK: usize = Q4K_A_DSUM + MR * 4;
    const W_BLK: usize = Q4K_W_MIN + NR * 4;
    const SUBS: usize = 8;

    fn row_bytes(k: usize) -> usize {
        k / 256 * 144
    }

    /// `dst[(q * MR + r) * 4..][..4]` = `q[r][4q..4q + 4]`, then the scales, then the sums.
    fn pack_a(q: &[[i8; QK]; MR], da: &[f32; MR], dst: &mut [u8]) {
        for quad in 0..QK / 4 {
            for r in 0..MR {
                let o = (quad * MR + r) * 4;
                for l in 0..4 {
                    dst[o + l] = q[r][4 * quad + l] as u8;
                }
            }
        }
        for r in 0..MR {
            let sum: i32 = q[r].iter().map(|&v| v as i32).sum();
            dst[Q4K_A_D + 4 * r..Q4K_A_D + 4 * r + 4].copy_from_slice(&da[r].to_le_bytes());
            dst[Q4K_A_DSUM + 4 * r..Q4K_A_DSUM + 4 * r + 4].copy_from_slice(&(da[r] * sum as f32).to_le_bytes());
        }
    }

    /// Per 32-value sub-block `s` of a super-block: `dst[(q * NR + c) * 4..][..4]` = column
    /// `c`'s nibbles `4q..4q + 4` of sub-block `s` (sub-block `2i`: the low nibbles of `qs[32i..32i
    /// + 32]`, `2i + 1`: the high), then `d · sc[s]` and `dmin · m[s]` per column.
    #[inline(always)]
    unsafe fn pack_w(w: &[u8], row_bytes: usize, j0: usize, valid: usize, pc: usize, kcb: usize, dst: &mut [u8]) {
        assert!(valid <= NR && (j0 + valid) * row_bytes <= w.len(), "pack_w: rows");
        assert!(pc.is_multiple_of(8) && kcb.is_multiple_of(8), "pack_w: whole super-blocks");
        assert!((pc + kcb) / 8 * 144 <= row_bytes && dst.len() == kcb * Self::W_BLK, "pack_w: sizes");
        // SAFETY: the caller's contract (the features); reads and writes through bounds-checked
        // slices.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            for sb in 0..kcb / 8 {
                // Per column: d · sc[s] and dmin · m[s] of the 8 sub-blocks.
                let (mut dsc, mut dmn) = ([[0f32; NR]; 8], [[0f32; NR]; 8]);
                for c in 0..valid {
                    let blk = &w[(j0 + c) * row_bytes + (pc / 8 + sb) * 144..][..144];
                    let (d, dmin) = (f16_le(&blk[0..2]), f16_le(&blk[2..4]));
                    let (sc, mn) = q4k_scales_mins(&blk[4..16]);
                    for s in 0..8 {
                        dsc[s][c] = d * ((sc >> (8 * s)) & 0xFF) as f32;
                        dmn[s][c] = dmin * ((mn >> (8 * s)) & 0xFF) as f32;
                    }
                }
                for i in 0..4 {
                    let (mut lo, mut hi) = ([_mm256_setzero_si256(); NR], [_mm256_setzero_si256(); NR]);
                    for c in 0..valid {
                        let qs = &w[(j0 + c) * row_bytes + (pc / 8 + sb) * 144 + 16 + 32 * i..][..32];
                        let q = load(qs.as_ptr());
                        lo[c] = _mm256_and_si256(q, m4);
                        hi[c] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    }
                    for (h, v) in [lo, hi].into_iter().enumerate() {
                        let s = 2 * i + h;
                        let dst = &mut dst[(8 * sb + s) * Self::W_BLK..(8 * sb + s + 1) * Self::W_BLK];
                        for (quad, v) in transpose8(v).into_iter().enumerate() {
                            _mm256_storeu_si256(dst[quad * 32..][..32].as_mut_ptr().cast(), v);
                        }
                        _mm256_storeu_ps(
                            dst[Q4K_W_D..Q4K_W_D + 32].as_mut_ptr().cast(),
                            _mm256_loadu_ps(dsc[s].as_ptr()),
                        );
                        _mm256_storeu_ps(
                            dst[Q4K_W_MIN..Q4K_W_MIN + 32].as_mut_ptr().cast(),
                            _mm256_loadu_ps(dmn[s].as_ptr()),
                        );
                    }
                }
            }
        }
    }

    /// Per sub-block: `isum[r]` lane `c` = `Σ_q maddubs(quad q of column c, quad q of row r)`
    /// (exact), then `acc[r] += isum · (d · sc · d_a) - (dmin · m) · (d_a · Σ qa)`.
    #[inline(always)]
    unsafe fn micro<const VNNI: bool, const R: usize>(a: *const u8, b: *const u8, nblk: usize) -> [__m256; R] {
        // SAFETY: the caller's contract: the features, and `nblk` blocks behind `a` and `b`.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); R];
            for blk in 0..nblk {
                let ab = a.add(blk * Self::A_BLK);
                let bb = b.add(blk * Self::W_BLK);
                // i16 pair sums (without VNNI) or i32 sums (with).
                let mut s = [_mm256_setzero_si256(); R];
                for quad in 0..QK / 4 {
                    let wv = load(bb.add(quad * NR * 4));
                    for r in 0..R {
                        let av = broadcast(ab.add((quad * MR + r) * 4));
                        s[r] = if VNNI {
                            _mm256_dpbusd_avx_epi32(s[r], wv, av)
                        } else {
                            _mm256_add_epi16(s[r], _mm256_maddubs_epi16(wv, av))
                        };
                    }
                }
                if !VNNI {
                    for v in s.iter_mut() {
                        *v = _mm256_madd_epi16(*v, ones);
                    }
                }
                let isum = s;
                add_scaled(&mut acc, &isum, bb.add(Q4K_W_D), ab.add(Q4K_A_D));
                let dmn = _mm256_loadu_ps(bb.add(Q4K_W_MIN).cast());
                for r in 0..R {
                    acc[r] = _mm256_fnmadd_ps(dmn, broadcast_f32(ab.add(Q4K_A_DSUM + 4 * r)), acc[r]);
                }
            }
            acc
        }
    }
}

/// The little-endian f16 in `b[0..2]` as f32.
fn f16_le(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

#[cfg(test)]
mod tests {
    use crate::kernels::cpu;
    use crate::kernels::qgemv::{qgemv, Kernel, QFormat};
    use crate::kernels::testing::{avx_vnni_reachable, values_with_outliers};
    use crate::kernels::{q4k_gemm, q8_gemm};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use std::time::Instant;

    /// Both GEMMs through this driver give the same bits with AVX-VNNI as with `maddubs` +
    /// `madd` (the same exact block integers, then the same f32 arithmetic), also at the
    /// extremes (Q8_0 weights of -128 and 127 against activations quantized to ±127; Q4K
    /// nibbles of 15 with every six-bit scale 63). The f64 references of `q8_gemm` and
    /// `q4k_gemm` check each set on its own.
    #[test]
    fn avx_vnni_gemms_equal_avx2_bitwise() {
        if !avx_vnni_reachable() {
            eprintln!("no AVX-VNNI on this CPU (or VIDEOLLAVA_KERNELS caps it): nothing to compare");
            return;
        }
        let dev = Device::Cpu;
        for &(m, n, k) in &[(1, 5, 256), (13, 70, 512), (67, 33, 1024), (130, 40, 4096)] {
            let wv = Tensor::from_vec(values_with_outliers(n * k, 5 + n as u64, 4.0), (n, k), &dev).unwrap();
            let mut q8 = QTensor::quantize(&wv, GgmlDType::Q8_0).unwrap().data().unwrap().into_owned();
            for blk in q8.chunks_exact_mut(34).step_by(3) {
                for (l, q) in blk[2..].iter_mut().enumerate() {
                    *q = if l % 3 == 0 { 0x7f } else { 0x80 };
                }
            }
            let mut q4 = QTensor::quantize(&wv, GgmlDType::Q4K).unwrap().data().unwrap().into_owned();
            for blk in q4.chunks_exact_mut(144).step_by(3) {
                blk[4..].fill(0xFF);
            }
            let signs: Vec<f32> = (0..m * k).map(|t| if (t / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
            for x in [values_with_outliers(m * k, 7 + m as u64, 8.0), signs] {
                let bits = |set, q4k: bool| {
                    let _g = cpu::force(set);
                    let want = if set == cpu::KernelSet::AvxVnni { Kernel::AvxVnni } else { Kernel::Avx2 };
                    assert_eq!(Kernel::detect(), want, "{set}");
                    let mut out = vec![f32::NAN; m * n];
                    if q4k {
                        q4k_gemm::matmul_q4k(&x, m, &q4, n, k, &mut out);
                    } else {
                        q8_gemm::matmul_q8_0(&x, m, &q8, n, k, &mut out);
                    }
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                for q4k in [false, true] {
                    assert_eq!(
                        bits(cpu::KernelSet::AvxVnni, q4k),
                        bits(cpu::KernelSet::Avx2, q4k),
                        "q4k={q4k} m={m} n={n} k={k}"
                    );
                }
            }
        }
    }

    /// CPU time of this process so far (user + system, all threads), seconds; 10 ms ticks.
    fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
        if f.len() < 13 {
            return f64::NAN;
        }
        (f[11] + f[12]) / 100.0
    }

    /// After a warm-up call: the best wall time of one call, and the CPU time per call (all
    /// threads) averaged over calls run for at least `min_s` seconds (on a shared machine the
    /// wall time includes waiting for a core; the CPU time does not).
    fn time(min_s: f64, f: &mut dyn FnMut()) -> (f64, f64) {
        f();
        let (start, cpu0) = (Instant::now(), cpu_seconds());
        let (mut best, mut calls) = (f64::MAX, 0);
        while calls < 2 || start.elapsed().as_secs_f64() < min_s {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
            calls += 1;
        }
        (best, (cpu_seconds() - cpu0) / calls as f64)
    }

    /// The quantized kernels under each kernel set of this CPU (forced through the switch, two
    /// rounds):
    /// the matrix-vector product (1 and 8 rows, GB/s of compact blocks, 4 matrices in turn so
    /// that the weight comes from memory) and the int8 GEMMs (`m` rows), as GOP/s of wall time
    /// and GOP per CPU-second (all threads). `cargo test
    /// -p videollava --lib qgemm_avx2::tests::bench -- --ignored --nocapture` (with `--release`,
    /// or `--config 'profile.dev.package.videollava.opt-level=3'` and overflow checks off).
    #[test]
    #[ignore]
    fn bench_kernel_sets() {
        let dev = Device::Cpu;
        let (n, k) = (4096, 4096);
        eprintln!("threads: rayon {}", rayon::current_num_threads());
        for (format, dtype) in
            [(QFormat::Q8_0, GgmlDType::Q8_0), (QFormat::Q4K, GgmlDType::Q4K), (QFormat::Q6K, GgmlDType::Q6K)]
        {
            let mats: Vec<Vec<u8>> = (0..4)
                .map(|s| {
                    let w = Tensor::from_vec(values_with_outliers(n * k, 7 + s, 4.0), (n, k), &dev).unwrap();
                    QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned()
                })
                .collect();
            let x = values_with_outliers(8 * k, 3, 4.0);
            // Two rounds over the sets: neighbouring sets are measured close in time (the
            // machine may be shared), and a drift shows as a difference between the rounds.
            for set in [cpu::available_sets(), cpu::available_sets()].concat() {
                let _g = cpu::force(set);
                for rows in [1, 8] {
                    let mut out = vec![0f32; rows * n];
                    let mut it = 0;
                    let (t, cpu) = time(0.5, &mut || {
                        qgemv(format, &x[..rows * k], rows, &mats[it % 4], n, k, &mut out);
                        it += 1;
                    });
                    let ops = 2.0 * (rows * n * k) as f64;
                    eprintln!(
                        "qgemv {format:?} {n}x{k} rows={rows} {set:8}: best {:7.3} ms, {:5.1} GB/s, {:6.1} GOP/s; \
                         per CPU-second {:6.1} GOP",
                        t * 1e3,
                        mats[0].len() as f64 / t / 1e9,
                        ops / t / 1e9,
                        ops / cpu / 1e9
                    );
                }
            }
            if format == QFormat::Q6K {
                continue;
            }
            let m = 256;
            let x = values_with_outliers(m * k, 9, 4.0);
            let mut out = vec![0f32; m * n];
            for set in [cpu::available_sets(), cpu::available_sets()].concat() {
                let _g = cpu::force(set);
                let (t, cpu) = time(1.0, &mut || match format {
                    QFormat::Q8_0 => q8_gemm::matmul_q8_0(&x, m, &mats[0], n, k, &mut out),
                    _ => q4k_gemm::matmul_q4k(&x, m, &mats[0], n, k, &mut out),
                });
                let ops = 2.0 * (m * n * k) as f64;
                eprintln!(
                    "gemm  {format:?} m={m} {n}x{k} {set:8}: best {:8.2} ms, {:6.1} GOP/s; per CPU-second {:6.1} GOP",
                    t * 1e3,
                    ops / t / 1e9,
                    ops / cpu / 1e9
                );
            }
        }
    }
}
