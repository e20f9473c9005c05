//! The AVX-512 VNNI paths of the int8 GEMMs ([`super::q8_gemm`], [`super::q4k_gemm`]): one
//! blocked driver over both block formats, monomorphised per [`Format`] (the weight packing and
//! the micro-kernel), so that each format's code is only what differs.
//!
//! Conventions as in those modules: `x` f32 `[m, k]`; `w` raw GGML blocks `[n, k]`
//! ([`Format::row_bytes`] per row); `out` f32 `[m, n]`, overwritten. `k` is a positive multiple
//! of 32 (of the format's block).
//!
//! Blocking: activations are quantized once per call to Q8_0 (32 values, f16-rounded scale
//! `d_a`, exactly as candle's `BlockQ8_0::from_float`) and packed into micro-panels of
//! [`MR`] = 6 rows: per 32-value block, 8 k-quads × 6 rows × 4 bytes (the 32-bit broadcast
//! `vpdpbusd` takes; `qa + 128` as `u8` for formats with [`Format::BIASED_ACT`], else `qa` as
//! `i8`), then the 6 f32 scales `d_a` (offset [`A_D`]), then, for formats with
//! [`Format::ACT_SUMS`], the 6 f32 products `d_a · Σ qa` (offset [`A_DSUM`]). The packed
//! activations are ordered by k-chunk ([`KCB`] blocks), then row tile, then block, so that a
//! task walking the row tiles of one k-chunk reads them contiguously. Tasks (rayon) take a
//! stripe of about 256 output columns (and a range of row tiles when there are too few stripes)
//! and pack their stripe of `W` ([`Format::pack_w`]) into a thread-local buffer as micro-panels
//! of [`NR`] = 32 columns ([`Format::W_BLK`] bytes per 32-value block). The format's 6×32
//! micro-kernel ([`Format::micro`]) then runs, per k-chunk, each micro-panel of `W` (in L1)
//! against the row tiles (streaming from L2), and stores straight into `out` (masked at a
//! partial panel; the first k-chunk overwrites, the others add).
//!
//! Memory: the packed activations (about `m · k · 1.25` bytes) are kept between calls (one
//! buffer for both formats), and each rayon thread keeps its packed stripe of `W`
//! (`256 · k · 1.25` bytes).

// Register-blocked kernels index their arrays by loop counters on purpose.
#![allow(clippy::needless_range_loop)]

use super::out_ptr::OutPtr;
use super::pack_cache::PackCache;
use super::qgemv::avx512::q8_0_block;
use super::task_grid::{activation_jobs, TaskGrid};
use core::arch::x86_64::*;
use rayon::prelude::*;
use std::cell::RefCell;

/// Values per activation block (Q8_0).
const QK: usize = 32;
/// Rows of the micro-tile (each a 32-bit broadcast).
pub(crate) const MR: usize = 6;
/// zmm vectors (of 16 columns) per micro-tile row.
pub(crate) const NV: usize = 2;
/// Columns of the micro-tile.
pub(crate) const NR: usize = 16 * NV;
/// Offset, in a packed activation block, of the `MR` f32 scales `d_a` (after 8 k-quads × `MR`
/// rows × 4 bytes).
pub(crate) const A_D: usize = 8 * MR * 4;
/// Offset, in a packed activation block, of the `MR` f32 products `d_a · Σ qa`
/// ([`Format::ACT_SUMS`] only).
pub(crate) const A_DSUM: usize = A_D + MR * 4;
/// Blocks per k-chunk: the micro-panel of `W` for one chunk (`KCB * W_BLK` bytes) stays in L1.
pub(crate) const KCB: usize = 16;
/// Micro-panels (of `NR` columns) per column stripe (one task's packed `W`).
const NC_PANELS: usize = 8;
/// Row tiles per cache block of the packed activations (`MC_TILES * KCB * A_BLK` bytes, in L2).
const MC_TILES: usize = 32;
/// Row tiles per activation packing task.
const PACK_TILES: usize = 16;

/// What one weight format brings to the driver. Every method runs on a CPU with
/// avx512f/bw/vl/vnni, avx2, fma and f16c (the driver's contract).
pub(crate) trait Format {
    /// Activations packed as `qa + 128` (`u8`, the unsigned operand of `vpdpbusd`) rather
    /// than `qa` (`i8`).
    const BIASED_ACT: bool;
    /// Whether the packed activation blocks carry `d_a · Σ qa` (at [`A_DSUM`]).
    const ACT_SUMS: bool;
    /// Bytes of one 32-value block of a packed weight micro-panel (a multiple of 64).
    const W_BLK: usize;
    /// 32-value blocks per weight block: k-chunks start and end on whole weight blocks.
    const SUBS: usize;
    /// Bytes of one block of a packed activation micro-panel.
    const A_BLK: usize = A_D + MR * 4 * (1 + Self::ACT_SUMS as usize);

    /// Bytes of one weight row of `k` values.
    fn row_bytes(k: usize) -> usize;

    /// Packs weight rows `j0..j0 + valid` (`valid <= NR`; `w` the whole weight, `row_bytes` per
    /// row), 32-value blocks `pc..pc + kcb` (whole weight blocks), into `dst` (`kcb * W_BLK`
    /// bytes, 64-byte aligned); missing columns are zeros.
    ///
    /// # Safety
    /// The CPU has the features above.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_w(w: &[u8], row_bytes: usize, j0: usize, valid: usize, pc: usize, kcb: usize, dst: &mut [u8]);

    /// `R`×`NR` micro-tile over `nblk` blocks of the packed micro-panels `a` (`A_BLK` bytes per
    /// block) and `b` (`W_BLK` bytes per block, 64-byte aligned): stores the columns enabled in
    /// `masks` (16 per vector) of rows `0..R` of `c` (stride `ldc`), overwriting, or adding to
    /// them when `accumulate`.
    ///
    /// # Safety
    /// The CPU has the features above; `a` and `b` hold `nblk` blocks; the enabled elements of
    /// `c` are valid for reads and writes.
    unsafe fn micro<const R: usize>(
        a: *const u8,
        b: *const u8,
        nblk: usize,
        c: *mut f32,
        ldc: usize,
        masks: [u16; NV],
        accumulate: bool,
    );
}

/// 64-byte aligned storage for the packed operands.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Packed activations, kept between calls (at most 4 Mi lines: 256 MiB).
static A_PACK: PackCache<Line> = PackCache::new(4 << 20);

thread_local! {
    /// Packed stripe of `W`, reused by the tasks run on this thread.
    static PACK: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Grows `buf` to at least `bytes` bytes and returns its first `bytes` bytes.
fn bytes_of(buf: &mut Vec<Line>, bytes: usize) -> &mut [u8] {
    let lines = bytes.div_ceil(64);
    if buf.len() < lines {
        // Every byte in use is overwritten by the packing.
        buf.resize(lines, Line([0; 64]));
    }
    line_bytes(buf, bytes)
}

/// The first `bytes` bytes of `lines` (at least that many).
fn line_bytes(lines: &mut [Line], bytes: usize) -> &mut [u8] {
    assert!(lines.len() * 64 >= bytes, "{} lines hold fewer than {bytes} bytes", lines.len());
    // SAFETY: `Line` is 64 plain bytes; the slice holds at least `bytes` bytes (asserted).
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, bytes) }
}

/// Blocked GEMM (any `m >= 1`, `n >= 1`): `out[i, j] = Σ_p x[i, p] · W[j, p]`.
///
/// # Safety
/// The CPU has avx512f/bw/vl/vnni, avx2, fma and f16c; the slices match the shapes
/// (`w.len() == n * F::row_bytes(k)`); `k` is a positive multiple of `32 * F::SUBS`.
pub(crate) unsafe fn gemm<F: Format>(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    const { assert!(KCB.is_multiple_of(F::SUBS), "k-chunks hold whole weight blocks") };
    let a_blk = F::A_BLK;
    let nb = k / QK;
    let m_tiles = m.div_ceil(MR);
    let len = m_tiles * nb * a_blk;
    A_PACK.with(len.div_ceil(64), Line([0; 64]), |lines| {
        let apack = line_bytes(lines, len);
        let jobs = activation_jobs(&mut apack[..], nb, m_tiles, KCB, PACK_TILES, a_blk);
        jobs.into_par_iter().for_each(|(pc, kcb, t0, tiles, dst)| {
            for t in 0..tiles {
                let r0 = (t0 + t) * MR;
                let rows = MR.min(m - r0);
                let dst = &mut dst[t * kcb * a_blk..(t + 1) * kcb * a_blk];
                // The row count as a constant: the full tiles' 6 row quantizations are unrolled.
                macro_rules! pack {
                    ($($r:literal)*) => {
                        match rows {
                            // SAFETY: the CPU has the features (caller's contract).
                            $($r => unsafe { pack_a::<F, $r>(x, k, r0, pc, kcb, dst) },)*
                            _ => unreachable!("rows in 1..=MR"),
                        }
                    };
                }
                pack!(1 2 3 4 5 6);
            }
        });
        let grid = TaskGrid::new(n, NR, NC_PANELS, m_tiles);
        let outp = OutPtr::new(out);
        let apack = &apack[..];
        grid.run(&PACK, |j0, j1, t0, t1, buf| {
            // SAFETY: as for `gemm`; the task writes the rows of tiles t0..t1, columns j0..j1 only.
            unsafe { gemm_task::<F>(apack, m, t0, t1, w, n, k, j0, j1 - j0, outp, buf) }
        });
    })
}

/// Quantizes rows `r0..r0 + ROWS` (`ROWS <= MR`) of `x` (`[m, k]`), blocks `pc..pc + kcb`,
/// into `dst` (`kcb * A_BLK` bytes): per block, `dst[(q * MR + r) * 4 + l] = qa[r, 4q + l]`
/// (`+ 128` with [`Format::BIASED_ACT`]), then the `MR` f16-rounded scales `d_a`, then (with
/// [`Format::ACT_SUMS`]) the `MR` products `d_a · Σ qa` (exact: an 11-bit mantissa times at
/// most 32 · 127); missing rows: `qa = 0`, zeros.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pack_a<F: Format, const ROWS: usize>(x: &[f32], k: usize, r0: usize, pc: usize, kcb: usize, dst: &mut [u8]) {
    // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
    // features it is compiled for, and the pointers and lengths it gets are valid as documented.
    unsafe {
        let a_blk = F::A_BLK;
        // The 6 rows × 8 quads of a block are 3 zmm: transposed by dword permutes.
        const _: () = assert!(MR == 6, "pack_a transposes 6 rows");
        assert!(ROWS <= MR && dst.len() == kcb * a_blk, "pack_a: sizes");
        // Row-major quantized block of the MR rows ([r][32] i8 = dword r * 8 + quad).
        let mut q = [0i8; MR * QK];
        // Output dword j = quad * MR + r takes input dword r * 8 + quad.
        let mut src = [[0i32; 16]; 3];
        for j in 0..48 {
            src[j / 16][j % 16] = ((j % MR) * 8 + j / MR) as i32;
        }
        let idx = src.map(|v| _mm512_loadu_si512(v.as_ptr() as *const _));
        let from_v2 = src.map(|v| v.iter().enumerate().fold(0u16, |mk, (l, &i)| mk | (((i >= 32) as u16) << l)));
        let bias = _mm512_set1_epi8(-128);
        let d = dst.as_mut_ptr();
        for b in 0..kcb {
            let blk = d.add(b * a_blk);
            // Written out per row (not a loop) so that the rows' quantizations are unrolled.
            macro_rules! quantize_rows {
                ($($r:literal)*) => {$(
                    if $r < ROWS {
                        let p = (r0 + $r) * k + (pc + b) * QK;
                        let qr = &mut q[$r * QK..($r + 1) * QK];
                        let s = q8_0_block(&x[p..p + QK], qr);
                        // Rounded to f16 (nearest even, as `half`) and back.
                        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(s));
                        let da = _mm_cvtss_f32(_mm_cvtph_ps(h));
                        (blk.add(A_D + 4 * $r) as *mut f32).write_unaligned(da);
                    }
                )*};
            }
            const _: () = assert!(MR == 6, "quantize_rows covers 6 rows");
            quantize_rows!(0 1 2 3 4 5);
            if F::ACT_SUMS {
                // After all the rows: reading a row back just after its stores costs more.
                for r in 0..ROWS {
                    let sum: i32 = q[r * QK..(r + 1) * QK].iter().map(|&v| v as i32).sum();
                    let da = (blk.add(A_D + 4 * r) as *const f32).read_unaligned();
                    (blk.add(A_DSUM + 4 * r) as *mut f32).write_unaligned(da * sum as f32);
                }
            }
            for r in ROWS..MR {
                (blk.add(A_D + 4 * r) as *mut f32).write_unaligned(0.0);
                if F::ACT_SUMS {
                    (blk.add(A_DSUM + 4 * r) as *mut f32).write_unaligned(0.0);
                }
            }
            let qp = q.as_ptr();
            let v = [
                _mm512_loadu_si512(qp as *const _),
                _mm512_loadu_si512(qp.add(64) as *const _),
                _mm512_loadu_si512(qp.add(128) as *const _),
            ];
            for o in 0..3 {
                let t = _mm512_permutex2var_epi32(v[0], idx[o], v[1]);
                let t = _mm512_mask_permutexvar_epi32(t, from_v2[o], idx[o], v[2]);
                let t = if F::BIASED_ACT { _mm512_xor_si512(t, bias) } else { t };
                _mm512_storeu_si512(blk.add(64 * o) as *mut _, t);
            }
        }
    }
}

/// One task of [`gemm`]: row tiles `t0..t1` (`apack`: packed activations), columns
/// `j0..j0 + cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_task<F: Format>(
    apack: &[u8],
    m: usize,
    t0: usize,
    t1: usize,
    w: &[u8],
    n: usize,
    k: usize,
    j0: usize,
    cols: usize,
    out: OutPtr,
    buf: &mut Vec<Line>,
) {
    // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
    // features it is compiled for, and the pointers and lengths it gets are valid as documented.
    unsafe {
        let (a_blk, w_blk) = (F::A_BLK, F::W_BLK);
        let nb = k / QK;
        let row_bytes = F::row_bytes(k);
        let m_tiles = m.div_ceil(MR);
        let panels = cols.div_ceil(NR);
        // Packed stripe: by k-chunk, then panel (`kcb * W_BLK` bytes each).
        let wpack = bytes_of(buf, panels * nb * w_blk);
        let mut pc = 0;
        while pc < nb {
            let kcb = KCB.min(nb - pc);
            for p in 0..panels {
                let c0 = j0 + p * NR;
                let valid = NR.min(j0 + cols - c0);
                let o = (pc * panels + p * kcb) * w_blk;
                F::pack_w(w, row_bytes, c0, valid, pc, kcb, &mut wpack[o..o + kcb * w_blk]);
            }
            pc += kcb;
        }
        let c = out.get();
        let ap = apack.as_ptr();
        let bp = wpack.as_ptr();
        let mut tc = t0;
        while tc < t1 {
            let tc_end = t1.min(tc + MC_TILES);
            let mut pc = 0;
            while pc < nb {
                let kcb = KCB.min(nb - pc);
                let accumulate = pc > 0;
                for p in 0..panels {
                    let c0 = j0 + p * NR;
                    let valid = NR.min(j0 + cols - c0);
                    let mut masks = [0u16; NV];
                    for (v, mk) in masks.iter_mut().enumerate() {
                        let lanes = valid.saturating_sub(16 * v).min(16);
                        *mk = if lanes >= 16 { 0xffff } else { (1u32 << lanes) as u16 - 1 };
                    }
                    let b = bp.add((pc * panels + p * kcb) * w_blk);
                    // The micro-panel of `W` stays in L1 while the row tiles stream from L2.
                    for t in tc..tc_end {
                        let rows = MR.min(m - t * MR);
                        let a = ap.add((pc * m_tiles + t * kcb) * a_blk);
                        let ct = c.add(t * MR * n + c0);
                        macro_rules! call {
                            ($($r:literal)*) => {
                                match rows {
                                    $($r => F::micro::<$r>(a, b, kcb, ct, n, masks, accumulate),)*
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

/// One group of 16 columns (one zmm of 32-bit lanes) of a weight micro-panel being packed by
/// [`pack_columns`].
#[derive(Clone, Copy)]
pub(crate) struct ColumnGroup {
    /// Which group of the micro-panel: its bytes are `64 * g..64 * g + 64` of every
    /// `NR * 4`-byte row of a packed block.
    pub(crate) g: usize,
    /// The lanes whose columns exist (the others are zeros and their rows are not read).
    mask: __mmask16,
    /// Byte offsets of the 16 columns' weight rows (`lane · row_bytes`).
    idx: __m512i,
    /// The first byte of the group's first weight row.
    pub(crate) base: *const u8,
    /// The packed blocks (`dst` of [`pack_columns`]).
    pub(crate) dst: *mut u8,
}

impl ColumnGroup {
    /// The dword at `p` (a byte address within the group's first weight row) and at the same
    /// offset of its other 15 rows; zeros in the lanes of missing columns.
    ///
    /// # Safety
    /// The CPU has avx512f/bw/vl/vnni, avx2, fma and f16c; the 4 bytes at `p + lane · row_bytes`
    /// are readable for every lane in the mask.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn gather(self, p: *const u8) -> __m512i {
        // SAFETY: the caller's contract; masked-off lanes are not read.
        unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), self.mask, self.idx, p as *const i32) }
    }
}

/// The column loop of [`Format::pack_w`]: the micro-panel of weight rows `j0..j0 + valid`
/// (`valid <= NR`; `w` the whole weight, `row_bytes` per row) packed into `dst` (`kcb` blocks of
/// `w_blk` bytes: rows of `NR * 4` bytes, 16 columns × 4 bytes per group). Calls `pack` for each
/// group of 16 columns that holds a valid column; zero-fills the groups that hold none.
///
/// # Safety
/// The CPU has avx512f/bw/vl/vnni, avx2, fma and f16c; `w` holds rows `j0..j0 + valid`; `pack`
/// writes within the group's bytes of `dst` and reads within its rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pack_columns(
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    valid: usize,
    kcb: usize,
    w_blk: usize,
    dst: &mut [u8],
    mut pack: impl FnMut(ColumnGroup),
) {
    assert!(valid <= NR && dst.len() == kcb * w_blk && w_blk.is_multiple_of(NR * 4), "pack_w: sizes");
    assert!((j0 + valid) * row_bytes <= w.len(), "pack_w: rows");
    let d = dst.as_mut_ptr();
    for g in 0..NV {
        let cols = valid.saturating_sub(16 * g).min(16);
        if cols == 0 {
            for b in 0..kcb {
                for row in 0..w_blk / (NR * 4) {
                    // SAFETY: within block `b` of `dst` (`kcb * w_blk` bytes, asserted above).
                    unsafe {
                        _mm512_storeu_si512(d.add(b * w_blk + row * NR * 4 + 64 * g) as *mut _, _mm512_setzero_si512())
                    };
                }
            }
            continue;
        }
        let mask: __mmask16 = if cols >= 16 { 0xffff } else { (1u32 << cols) as u16 - 1 };
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(row_bytes as i32),
        );
        // SAFETY: row `j0 + 16 g` is within `w` (it is a valid column, asserted above).
        let base = unsafe { w.as_ptr().add((j0 + 16 * g) * row_bytes) };
        pack(ColumnGroup { g, mask, idx, base, dst: d });
    }
}

/// Stores the `R`×`NR` f32 accumulators `acc` into rows `0..R` of `c` (stride `ldc`): the
/// columns enabled in `masks` (16 per vector), overwriting, or adding when `accumulate`.
///
/// # Safety
/// The CPU has avx512f/bw/vl/vnni, avx2, fma and f16c; the enabled elements of `c` are valid
/// for reads and writes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn store_tile<const R: usize>(
    acc: &[[__m512; NV]; R],
    c: *mut f32,
    ldc: usize,
    masks: [u16; NV],
    accumulate: bool,
) {
    // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
    // features it is compiled for, and the pointers and lengths it gets are valid as documented.
    unsafe {
        for r in 0..R {
            for v in 0..NV {
                // `wrapping_add`: with a partial panel a masked-off vector may lie past the end
                // of `out`; a masked-off lane of a masked load or store never faults.
                let cr = c.wrapping_add(r * ldc + 16 * v);
                let mut val = acc[r][v];
                if accumulate {
                    val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(masks[v], cr));
                }
                _mm512_mask_storeu_ps(cr, masks[v], val);
            }
        }
    }
}
