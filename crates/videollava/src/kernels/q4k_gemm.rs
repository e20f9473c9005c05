//! Matrix product `out = x · Wᵀ` with `W` in GGML Q4K blocks, for the CPU (prefill).
//!
//! Conventions (every function of this file):
//! - `x`: activations, f32, row-major `[m, k]`;
//! - `w`: the weight `[n, k]` as raw GGML Q4K blocks: row `j` is the byte range
//!   `[j * row_bytes, (j + 1) * row_bytes)`, `row_bytes = k / 256 * 144`, each block of 256 values
//!   `{ d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128] }` (little-endian; exactly candle's
//!   `QTensor::data()` for a Q4K tensor of shape `[n, k]`); `k` is a multiple of 256. Sub-block
//!   `s` (values `32s..32s + 32` of the block) has the six-bit scale `sc[s]` and min `mn[s]`
//!   (packed in `scales` as ggml's `get_scale_min_k4`) and takes the low nibbles of
//!   `qs[32 * (s / 2)..][..32]` for even `s`, the high nibbles for odd `s`: its value `l` is
//!   `d · sc[s] · q − dmin · mn[s]`, `q` in `0..16`;
//! - `out`: f32, row-major `[m, n]`, overwritten: `out[i, j] = Σ_p x[i, p] · W[j, p]`.
//!
//! Why it exists: candle's CPU quantized matmul for Q4K runs the 7B Llama prefill shapes at
//! about BF16 speed on 2 Zen 4 cores and keeps a repacked copy of every weight (twice the
//! resident memory). This is [`super::q8_gemm`]'s int8 GEMM (AVX-512 VNNI `vpdpbusd`) with the
//! Q4K nibbles as the unsigned operand, reading the compact blocks in place.
//!
//! Paths, picked at run time (the shape checks and the choice: `kernels::qgemm`):
//! - AVX-512 F/BW/VL/VNNI: `kernels::qgemm_avx512`'s blocked driver (shared with
//!   [`super::q8_gemm`]). Activations are quantized once per call and packed into micro-panels
//!   of 6 rows as `i8`, with the products `d_a · Σ qa` (the block sums of the quantized
//!   activations) after the scales; each task packs its stripe of `W` (this module) as
//!   micro-panels of 32 columns: per 32-value sub-block, 8 k-quads × 32 columns × 4 nibbles
//!   widened to `u8`, then 32 f32 scales `d · sc` and 32 f32 mins `dmin · mn` (both exact in
//!   f32). A 6×32 micro-kernel (this module; 12 zmm integer accumulators, 12 zmm f32
//!   accumulators) then runs each micro-panel of `W` (in L1) against the row tiles.
//! - AVX2 + FMA + F16C (no AVX-512 VNNI): `kernels::qgemm_avx2`, the same blocking with a 6×8
//!   micro-kernel (256-bit vectors, a broadcast activation word against 8 columns; the nibbles as
//!   `u8` against `i8` activations, `maddubs` summed in i16 (`vpdpbusd` with AVX-VNNI); the same
//!   bits with or without AVX-VNNI), the same quantized numbers (exact integer per 32-value block).
//! - Portable (any CPU): the same quantized numbers, integer dot per sub-block, in plain Rust.
//!
//! Numerics: each activation row is quantized per 32-value block to Q8_0 exactly as candle's
//! `BlockQ8_0::from_float` (f16-rounded scale `d_a`, `qa` in `-127..=127`). This differs from
//! candle's Q4K matmul, which quantizes the activations to Q8K (one f32 scale per 256 values):
//! ours is the finer quantization (8 scales per 256 values, so a smaller rounding error where
//! the magnitudes vary within 256 values). Then, per row `i`, column `j` and 32-value block `b`,
//! `isum = Σ q · qa` (exact integer, `vpdpbusd` with the nibbles unsigned and `qa` signed) and
//! `out[i, j] = Σ_b d_a[i, b] · ((d · sc)[j, b] · isum − (dmin · mn)[j, b] · Σ qa[i, b])`
//! summed in f32 (the fast path as `fma(isum, (d · sc) · d_a, acc) − (dmin · mn) · (d_a · Σ qa)`,
//! the last product exact).
//! Parallelism: rayon's global pool. Memory: no copy of the weight is kept; the packed
//! activations (about `m · k · 1.25` bytes) are kept between calls, and each rayon thread keeps
//! its packed stripe of `W` (`256 · k · 1.25` bytes).

use super::qgemm::QGemm;
use super::qgemv::{q4k_scales_mins, ActQ80, Kernel};
use half::f16;
use rayon::prelude::*;

/// Values per Q4K block.
const QK_K: usize = 256;
/// Bytes per Q4K block.
const BLOCK_BYTES: usize = 144;
/// Values per sub-block (and per activation Q8_0 block).
const QK: usize = 32;
/// Sub-blocks per Q4K block.
const SUBS: usize = QK_K / QK;

/// `out[i, j] = Σ_p x[i, p] · W[j, p]` with `W` the Q4K blocks `w` (see the module doc for the
/// layouts); `out` is overwritten. With `k == 0` the output is zeros. Runs on rayon's global
/// pool. Each call packs all of `W` again (about `n · k · 1.25` bytes written): for a few rows
/// [`super::qgemv::qgemv`] is faster (see the `bench_prefill_shapes` test).
///
/// Panics when `k` is not a multiple of 256 or a slice length does not match its shape.
pub fn matmul_q4k(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    super::qgemm::matmul::<Q4K>(x, m, w, n, k, out);
}

/// Whether [`matmul_q4k`] uses a SIMD path (AVX-512 VNNI, AVX-VNNI or AVX2) on the calling
/// thread ([`super::cpu::features`]).
pub fn has_fast_path() -> bool {
    super::qgemm::has_fast_path()
}

/// The Q4K weight format of the int8 GEMMs.
pub(crate) struct Q4K;

impl QGemm for Q4K {
    const NAME: &'static str = "matmul_q4k";
    const BLOCK_VALUES: usize = QK_K;
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn portable(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
        portable(x, m, w, n, k, out);
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(vnni: bool, x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
        // SAFETY: the trait's contract (features and shapes).
        unsafe { super::qgemm_avx2::q4k(vnni, x, m, w, n, k, out) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
        // SAFETY: the trait's contract (features and shapes).
        unsafe { super::qgemm_avx512::gemm::<Q4K>(x, m, w, n, k, out) }
    }
}

/// The f16 at `b[0..2]` (little-endian), as f32.
#[inline]
fn f16_le(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Portable path: any CPU. Tasks: groups of rows (each weight block is decoded once per group).
fn portable(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    const ROWS: usize = 4;
    let nb = k / QK;
    let row_bytes = k / QK_K * BLOCK_BYTES;
    let act = ActQ80::quantize(Kernel::Scalar, x, m, nb);
    let act = &act;
    // Σ qa per row and block, [m, nb_pad].
    let asum: Vec<i32> = act.qs.chunks_exact(QK).map(|q| q.iter().map(|&v| v as i32).sum()).collect();
    let asum = &asum;
    out.par_chunks_mut(ROWS * n).enumerate().for_each(|(g, oc)| {
        let i0 = g * ROWS;
        let rows = oc.len() / n;
        let mut q = [0u8; QK_K];
        for (j, wr) in w.chunks_exact(row_bytes).enumerate() {
            let mut s = [0f32; ROWS];
            for (bq, blk) in wr.chunks_exact(BLOCK_BYTES).enumerate() {
                let (d, dmin) = (f16_le(&blk[0..2]), f16_le(&blk[2..4]));
                let (sc, mn) = q4k_scales_mins(&blk[4..16]);
                let (sc, mn) = (sc.to_le_bytes(), mn.to_le_bytes());
                for (l, &byte) in blk[16..].iter().enumerate() {
                    // Sub-block 2c takes the low nibbles of qs[32c..32c + 32], 2c + 1 the high.
                    let (c, t) = (l / QK, l % QK);
                    q[2 * c * QK + t] = byte & 0xF;
                    q[(2 * c + 1) * QK + t] = byte >> 4;
                }
                for sub in 0..SUBS {
                    let dsc = d * sc[sub] as f32;
                    let dmn = dmin * mn[sub] as f32;
                    let qw = &q[sub * QK..(sub + 1) * QK];
                    for (r, s) in s.iter_mut().enumerate().take(rows) {
                        let o = (i0 + r) * act.nb_pad + bq * SUBS + sub;
                        let qa = &act.qs[o * QK..(o + 1) * QK];
                        let isum: i32 = qa.iter().zip(qw).map(|(&a, &b)| a as i32 * b as i32).sum();
                        *s += act.dvec[o * 8] * (dsc * isum as f32 - dmn * asum[o] as f32);
                    }
                }
            }
            for (r, &s) in s.iter().enumerate().take(rows) {
                oc[r * n + j] = s;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index their accumulator arrays by loop counters on purpose.
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::{BLOCK_BYTES, Q4K, QK_K, SUBS};
    use crate::kernels::qgemm_avx512::{pack_columns, store_tile, Format, A_D, A_DSUM, MR, NR, NV};
    use core::arch::x86_64::*;

    // Q4K weights for [`crate::kernels::qgemm_avx512`]: the nibbles as the unsigned operand
    // (`u8`), activations as `i8` with their block sums `d_a · Σ qa` for the min term.

    /// Bytes of one block of a packed weight micro-panel: 8 k-quads × `NR` columns × 4 `u8`, then
    /// `NR` f32 scales `d · sc`, then `NR` f32 mins `dmin · mn`.
    const W_BLK: usize = 8 * NR * 4 + NR * 8;
    /// Offsets, in a packed weight block, of the scales and of the mins.
    const W_SCALE: usize = 8 * NR * 4;
    const W_MIN: usize = W_SCALE + NR * 4;
    /// Bytes of one block of a packed activation micro-panel.
    const A_BLK: usize = <Q4K as Format>::A_BLK;

    impl Format for Q4K {
        const BIASED_ACT: bool = false;
        const ACT_SUMS: bool = true;
        const W_BLK: usize = W_BLK;
        const SUBS: usize = SUBS;

        fn row_bytes(k: usize) -> usize {
            k / QK_K * BLOCK_BYTES
        }

        /// Packs weight rows `j0..j0 + valid` (`valid <= NR`; `w` the whole weight, `row_bytes` per
        /// row), sub-blocks `pc..pc + kcb` (whole Q4K blocks), into `dst` (`kcb * W_BLK` bytes,
        /// 64-byte aligned): per sub-block, `dst[(q * NR + c) * 4 + l] = q[j0 + c, 4q + l]` (the
        /// nibble as a byte), then the scales `d · sc` (f32), then the mins `dmin · mn` (f32);
        /// missing columns are zeros.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn pack_w(w: &[u8], row_bytes: usize, j0: usize, valid: usize, pc: usize, kcb: usize, dst: &mut [u8]) {
            assert!(pc.is_multiple_of(SUBS) && kcb.is_multiple_of(SUBS), "pack_w: whole Q4K blocks");
            assert!((pc + kcb) / SUBS * BLOCK_BYTES <= row_bytes, "pack_w: range");
            let m4 = _mm512_set1_epi8(0x0F);
            let (k1, k2, k3) =
                (_mm512_set1_epi32(0x3f3f3f3f), _mm512_set1_epi32(0x0f0f0f0f), _mm512_set1_epi32(0x03030303));
            let byte = _mm512_set1_epi32(0xff);
            // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
            // features it is compiled for; the blocks read lie within the rows (asserted above
            // and by `pack_columns`) and the stores within the group's bytes of `dst`.
            unsafe {
                pack_columns(w, row_bytes, j0, valid, kcb, W_BLK, dst, |cg| {
                    let g = cg.g;
                    for bq in 0..kcb / SUBS {
                        let src = cg.base.add((pc / SUBS + bq) * BLOCK_BYTES);
                        let sb = cg.dst.add(bq * SUBS * W_BLK);
                        // d and dmin (the block's first dword), then the 12 scale bytes as 3 dwords,
                        // decoded as `q4k_scales_mins` for 16 columns at once.
                        let dd = cg.gather(src);
                        let dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
                        let dminv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dd)));
                        let u0 = cg.gather(src.add(4));
                        let u1 = cg.gather(src.add(8));
                        let u2 = cg.gather(src.add(12));
                        let sc = [
                            _mm512_and_si512(u0, k1),
                            _mm512_or_si512(
                                _mm512_and_si512(u2, k2),
                                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(u0), k3)),
                            ),
                        ];
                        let mn = [
                            _mm512_and_si512(u1, k1),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi32::<4>(u2), k2),
                                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(u1), k3)),
                            ),
                        ];
                        for s in 0..SUBS {
                            let sh = _mm512_set1_epi32(8 * (s % 4) as i32);
                            let scs = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(sc[s / 4], sh), byte));
                            let mns = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(mn[s / 4], sh), byte));
                            let blk = sb.add(s * W_BLK);
                            // Exact: an 11-bit mantissa times a 6-bit integer.
                            _mm512_storeu_ps(blk.add(W_SCALE + 64 * g) as *mut f32, _mm512_mul_ps(dv, scs));
                            _mm512_storeu_ps(blk.add(W_MIN + 64 * g) as *mut f32, _mm512_mul_ps(dminv, mns));
                        }
                        // qs: chunk c (32 bytes) holds sub-blocks 2c (low nibbles) and 2c + 1 (high).
                        for c in 0..SUBS / 2 {
                            for quad in 0..8 {
                                let v = cg.gather(src.add(16 + 32 * c + 4 * quad));
                                let lo = _mm512_and_si512(v, m4);
                                let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m4);
                                _mm512_storeu_si512(sb.add(2 * c * W_BLK + quad * NR * 4 + 64 * g) as *mut _, lo);
                                _mm512_storeu_si512(sb.add((2 * c + 1) * W_BLK + quad * NR * 4 + 64 * g) as *mut _, hi);
                            }
                        }
                    }
                });
            }
        }

        /// `R`×`NR` micro-tile over `nblk` blocks:
        /// `c[r, 0..NR] (+)= Σ_b dsc[b] · da[r, b] · isum − dmn[b] · (da · Σ qa)[r, b]`,
        /// `isum = Σ q · qa` (exact integers), from the packed micro-panels `a` (`A_BLK` bytes per
        /// block) and `b` (`W_BLK` bytes per block, 64-byte aligned). Stores the columns enabled in
        /// `masks` (16 per vector) of rows `0..R` (stride `ldc`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn micro<const R: usize>(
            a: *const u8,
            b: *const u8,
            nblk: usize,
            c: *mut f32,
            ldc: usize,
            masks: [u16; NV],
            accumulate: bool,
        ) {
            // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
            // features it is compiled for, and the pointers and lengths it gets are valid as documented.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); NV]; R];
                for blk in 0..nblk {
                    let ab = a.add(blk * A_BLK);
                    let bb = b.add(blk * W_BLK);
                    let mut isum = [[_mm512_setzero_si512(); NV]; R];
                    for quad in 0..8 {
                        let mut wv = [_mm512_setzero_si512(); NV];
                        for v in 0..NV {
                            wv[v] = _mm512_load_si512(bb.add(quad * NR * 4 + 64 * v) as *const _);
                        }
                        for r in 0..R {
                            let av = _mm512_set1_epi32((ab.add((quad * MR + r) * 4) as *const i32).read_unaligned());
                            for v in 0..NV {
                                // Nibbles (0..15) unsigned, activations signed.
                                isum[r][v] = _mm512_dpbusd_epi32(isum[r][v], wv[v], av);
                            }
                        }
                    }
                    let mut dsc = [_mm512_setzero_ps(); NV];
                    let mut dmn = [_mm512_setzero_ps(); NV];
                    for v in 0..NV {
                        dsc[v] = _mm512_load_ps(bb.add(W_SCALE + 64 * v) as *const f32);
                        dmn[v] = _mm512_load_ps(bb.add(W_MIN + 64 * v) as *const f32);
                    }
                    for r in 0..R {
                        let da = _mm512_set1_ps((ab.add(A_D + 4 * r) as *const f32).read_unaligned());
                        let dsum = _mm512_set1_ps((ab.add(A_DSUM + 4 * r) as *const f32).read_unaligned());
                        for v in 0..NV {
                            let t =
                                _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][v]), _mm512_mul_ps(dsc[v], da), acc[r][v]);
                            acc[r][v] = _mm512_fnmadd_ps(dmn[v], dsum, t);
                        }
                    }
                }
                store_tile::<R>(&acc, c, ldc, masks, accumulate);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::{self, KernelSet};

    /// [`matmul_q4k`] with the kernel set capped at `set` through the switch.
    fn matmul_q4k_forced(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32], set: KernelSet) {
        let _forced = cpu::force(set);
        matmul_q4k(x, m, w, n, k, out);
    }
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Module, Tensor};

    use crate::kernels::testing::{check_gemm, simd_sets, values_with_outliers, Rng};

    /// Activations in about ±1, with outliers, and one all-zero block when there is room.
    fn activations(len: usize, seed: u64) -> Vec<f32> {
        let mut x = values_with_outliers(len, seed, 8.0);
        if len >= 2 * QK {
            x[QK..2 * QK].fill(0.0);
        }
        x
    }

    /// Random Q4K blocks for `[n, k]`: all nibbles and all six-bit scales and mins, `d` and
    /// `dmin` of both signs.
    fn weights(n: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut r = Rng::new(seed);
        let mut w = Vec::with_capacity(n * k / QK_K * BLOCK_BYTES);
        for _ in 0..n * k / QK_K {
            for _ in 0..2 {
                let v = f16::from_f32(r.unit() * 0.002 + if r.next() & 1 == 0 { 0.001 } else { -0.001 });
                w.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            for _ in 0..140 {
                w.push(r.next() as u8);
            }
        }
        w
    }

    /// One Q4K block decoded independently of the code under test (ggml's `get_scale_min_k4` and
    /// `dequantize_row_q4_K`): the 256 nibbles `q`, and per sub-block `d · sc` and `dmin · mn`.
    fn decode(blk: &[u8]) -> ([u8; QK_K], [f64; SUBS], [f64; SUBS]) {
        let (d, dmin) = (f16_le(&blk[0..2]) as f64, f16_le(&blk[2..4]) as f64);
        let s = &blk[4..16];
        let (mut dsc, mut dmn) = ([0f64; SUBS], [0f64; SUBS]);
        for j in 0..SUBS {
            let (sc, mn) = if j < 4 {
                (s[j] & 63, s[j + 4] & 63)
            } else {
                ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
            };
            dsc[j] = d * sc as f64;
            dmn[j] = dmin * mn as f64;
        }
        let mut q = [0u8; QK_K];
        for (c, qs) in blk[16..].chunks_exact(32).enumerate() {
            for (l, &b) in qs.iter().enumerate() {
                q[64 * c + l] = b & 0xF;
                q[64 * c + 32 + l] = b >> 4;
            }
        }
        (q, dsc, dmn)
    }

    /// The weight `[n, k]` dequantized (f64, exact).
    fn dequantize(w: &[u8], n: usize, k: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n * k);
        for blk in w.chunks_exact(BLOCK_BYTES) {
            let (q, dsc, dmn) = decode(blk);
            out.extend(q.iter().enumerate().map(|(l, &q)| dsc[l / QK] * q as f64 - dmn[l / QK]));
        }
        assert_eq!(out.len(), n * k);
        out
    }

    /// f64 reference from the same quantized activations (Q8_0, scalar quantizer) and the exact
    /// weights ([`check_gemm`]; terms: `d_a · dsc · isum` and `d_a · dmn · Σ qa` per block).
    fn check(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &[f32]) -> Result<(), (usize, usize, f32, f64)> {
        let nb = k / QK;
        let row_bytes = k / QK_K * BLOCK_BYTES;
        let act = ActQ80::quantize(Kernel::Scalar, x, m, nb);
        let decoded: Vec<_> = w.chunks_exact(BLOCK_BYTES).map(decode).collect();
        check_gemm(out, m, n, 1e-30, |i, j| {
            let (mut s, mut abs) = (0f64, 0f64);
            for b in 0..nb {
                let (q, dsc, dmn) = &decoded[j * row_bytes / BLOCK_BYTES + b / SUBS];
                let o = i * act.nb_pad + b;
                let qa = &act.qs[o * QK..(o + 1) * QK];
                let qw = &q[b % SUBS * QK..][..QK];
                let isum: i64 = qa.iter().zip(qw).map(|(&a, &q)| a as i64 * q as i64).sum();
                let asum: i64 = qa.iter().map(|&a| a as i64).sum();
                let da = act.dvec[o * 8] as f64;
                let (t1, t2) = (da * dsc[b % SUBS] * isum as f64, da * dmn[b % SUBS] * asum as f64);
                s += t1 - t2;
                abs += t1.abs() + t2.abs();
            }
            (s, abs)
        })
    }

    fn run(m: usize, n: usize, k: usize, set: KernelSet) {
        let x = activations(m * k, (m * 1000 + k) as u64);
        let w = weights(n, k, (n * 7919 + k) as u64 + 1);
        // NaN everywhere: every element must be overwritten.
        let mut out = vec![f32::NAN; m * n];
        matmul_q4k_forced(&x, m, &w, n, k, &mut out, set);
        if let Err((i, j, got, want)) = check(&x, m, &w, n, k, &out) {
            panic!("m={m} n={n} k={k} {set}: out[{i}, {j}] = {got}, want {want}");
        }
    }

    const MS: [usize; 8] = [1, 2, 5, 6, 7, 13, 31, 130];
    const NS: [usize; 6] = [1, 15, 16, 17, 33, 100];
    const KS: [usize; 3] = [256, 512, 4096];

    #[test]
    fn simd_paths_match_reference() {
        if simd_sets().is_empty() {
            eprintln!("no AVX2 on this CPU: the public entry point runs the portable path");
        }
        for set in simd_sets() {
            for m in MS {
                for n in NS {
                    for k in KS {
                        run(m, n, k, set);
                    }
                }
            }
        }
    }

    #[test]
    fn portable_path_matches_reference() {
        for m in MS {
            for n in NS {
                for k in KS {
                    run(m, n, k, KernelSet::Portable);
                }
            }
        }
    }

    /// Shapes that cross the cache blocks: several k-chunks (with a partial last one), several
    /// column stripes and row-tile blocks, partial tiles and partial 32-column panels, every
    /// tile height.
    #[test]
    fn blocked_shapes_match_reference() {
        for &(m, n, k) in &[(200, 300, 1280), (97, 530, 2304), (400, 40, 768), (3, 1000, 512), (61, 257, 256)] {
            for set in cpu::available_sets() {
                run(m, n, k, set);
            }
        }
        for m in 1..=13 {
            for set in simd_sets() {
                run(m, 70, 1536, set);
            }
        }
    }

    /// Extreme values: every nibble 15, every six-bit scale and min 63, activations quantized to
    /// ±127 (the largest block sums `32 · 15 · 127`, and the largest `Σ qa`), then mixed signs.
    #[test]
    fn extreme_values() {
        let (m, n, k) = (7, 19, 512);
        let mut w = weights(n, k, 3);
        for blk in w.chunks_exact_mut(BLOCK_BYTES) {
            blk[4..].fill(0xFF);
        }
        let all_plus = vec![1f32; m * k];
        let mixed: Vec<f32> = (0..m * k).map(|t| if (t / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let all_minus = vec![-1f32; m * k];
        for x in [all_plus, mixed, all_minus] {
            for set in cpu::available_sets() {
                let mut out = vec![f32::NAN; m * n];
                matmul_q4k_forced(&x, m, &w, n, k, &mut out, set);
                assert!(check(&x, m, &w, n, k, &out).is_ok(), "{set}");
            }
        }
    }

    #[test]
    fn empty_shapes_and_zero_k() {
        let mut out = vec![f32::NAN; 6];
        matmul_q4k(&[], 2, &[], 3, 0, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
        let mut out: Vec<f32> = vec![];
        matmul_q4k(&[], 0, &weights(3, 256, 1), 3, 256, &mut out);
        matmul_q4k(&activations(512, 1), 2, &[], 0, 256, &mut out);
    }

    /// Weights quantized by candle (`QTensor::quantize`): our output against the f64 product of
    /// `x` and candle's `dequantize` (which must equal our own decoding), within the error of
    /// quantizing the activations. Per 32-value block with `amax` the largest `|x|`, the
    /// quantizer's step is `d = amax / 127`, `qa = round(x / d)` and the stored scale `d_a` is `d`
    /// rounded to f16, so `|x − d_a · qa| <= d / 2 + 127 · |d − d_a|` and the block's error is
    /// at most that times `Σ |w|` over the block. Also reports how far candle's own
    /// `x.apply_op1_no_bwd(&qtensor)` (Q8K activations) is from the same product.
    #[test]
    fn matches_candle() {
        let dev = Device::Cpu;
        for &(m, n, k) in &[(5, 17, 256), (130, 33, 512), (64, 100, 4096), (9, 40, 768), (70, 64, 1024), (33, 48, 4096)]
        {
            let mut r = Rng::new((m * n + k) as u64);
            let wv: Vec<f32> = (0..n * k).map(|_| r.unit()).collect();
            let qt = QTensor::quantize(&Tensor::from_vec(wv, (n, k), &dev).unwrap(), GgmlDType::Q4K).unwrap();
            let bytes = qt.data().unwrap().into_owned();
            assert_eq!(bytes.len(), n * k / QK_K * BLOCK_BYTES);
            let deq: Vec<f32> = qt.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let ours_deq = dequantize(&bytes, n, k);
            for (p, (&a, &b)) in deq.iter().zip(&ours_deq).enumerate() {
                assert!((a as f64 - b).abs() <= 1e-6 * (b.abs() + 1e-3), "dequantized W[{p}]: candle {a}, ours {b}");
            }
            let x = activations(m * k, (m + 3 * k) as u64);
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let op: Vec<f32> = xt.apply_op1_no_bwd(&qt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // Per element: the activation rounding bound of its block, and |x|.
            let e: Vec<f64> = x
                .chunks_exact(QK)
                .flat_map(|xb| {
                    let amax = xb.iter().fold(0f32, |a, &v| a.max(v.abs()));
                    let d = amax as f64 / 127.0;
                    let da = f16::from_f32(amax / 127.0).to_f32() as f64;
                    std::iter::repeat_n(d / 2.0 + 127.0 * (d - da).abs(), QK)
                })
                .collect();
            for set in cpu::available_sets() {
                let mut out = vec![f32::NAN; m * n];
                matmul_q4k_forced(&x, m, &bytes, n, k, &mut out, set);
                // Largest error relative to the bound, ours and candle's.
                let (mut worst_ours, mut worst_candle, mut max_ours, mut max_candle) = (0f64, 0f64, 0f64, 0f64);
                for i in 0..m {
                    let xr = &x[i * k..(i + 1) * k];
                    let er = &e[i * k..(i + 1) * k];
                    for j in 0..n {
                        let wr = &ours_deq[j * k..(j + 1) * k];
                        let (mut want, mut bound, mut mag) = (0f64, 0f64, 0f64);
                        for p in 0..k {
                            want += wr[p] * xr[p] as f64;
                            bound += wr[p].abs() * er[p];
                            mag += wr[p].abs() * (xr[p].abs() as f64 + er[p]);
                        }
                        // f32 rounding of the sums (the scale and min terms each at most `mag`).
                        let slack = 1e-5 * 2.0 * mag;
                        let d = (out[i * n + j] as f64 - want).abs();
                        assert!(
                            d <= bound + slack,
                            "m={m} n={n} k={k} {set}: out[{i}, {j}] = {}, f32 product {want} (bound {bound})",
                            out[i * n + j]
                        );
                        let dc = (op[i * n + j] as f64 - want).abs();
                        worst_ours = worst_ours.max(d / bound);
                        worst_candle = worst_candle.max(dc / bound);
                        max_ours = max_ours.max(d);
                        max_candle = max_candle.max(dc);
                    }
                }
                eprintln!(
                    "m={m:3} n={n:3} k={k:4} {set:8}: max |ours - x·Wdeqᵀ| {max_ours:.3e} \
                     ({worst_ours:.3} of the bound), candle op {max_candle:.3e} ({worst_candle:.3} of our bound)"
                );
            }
        }
    }

    /// The checker itself rejects a wrong result.
    #[test]
    fn checker_detects_errors() {
        let (m, n, k) = (3, 4, 512);
        let x = activations(m * k, 3);
        let w = weights(n, k, 4);
        let mut out = vec![0f32; m * n];
        matmul_q4k(&x, m, &w, n, k, &mut out);
        assert!(check(&x, m, &w, n, k, &out).is_ok());
        let good = out[5];
        out[5] = good + 1e-3 * (1.0 + good.abs());
        assert!(check(&x, m, &w, n, k, &out).is_err());
        out[5] = f32::NAN;
        assert!(check(&x, m, &w, n, k, &out).is_err());
        // A nibble-order mistake (sub-blocks 0 and 1 swapped in one weight row) is caught too.
        out[5] = good;
        let mut w2 = w.clone();
        for b in &mut w2[16..48] {
            *b = b.rotate_left(4);
        }
        assert!(check(&x, m, &w2, n, k, &out).is_err());
    }

    /// Prefill shapes of a 7B Llama (m = 2074): ours vs candle's `QMatMul`.
    /// `cargo test --release -p videollava --lib q4k_gemm -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_prefill_shapes() {
        use candle_core::quantized::QMatMul;
        use std::time::Instant;
        let dev = Device::Cpu;
        let m = 2074;
        let iters = 5;
        eprintln!("threads: rayon {}, fast path: {}", rayon::current_num_threads(), has_fast_path());
        for &(n, k) in &[(4096, 4096), (11008, 4096), (4096, 11008)] {
            let mut r = Rng::new((n + k) as u64);
            let wv: Vec<f32> = (0..n * k).map(|_| r.unit()).collect();
            let qt = QTensor::quantize(&Tensor::from_vec(wv, (n, k), &dev).unwrap(), GgmlDType::Q4K).unwrap();
            let bytes = qt.data().unwrap().into_owned();
            let x = activations(m * k, 7);
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let qmm = QMatMul::from_qtensor(qt).unwrap();
            let ops = 2.0 * (m * n * k) as f64;
            // Best of `iters` timed calls after a warm-up call, in GOP/s (the best, not the median:
            // the machine may be shared).
            let rate = |f: &mut dyn FnMut()| {
                f();
                let t = (0..iters)
                    .map(|_| {
                        let t = Instant::now();
                        f();
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::MAX, f64::min);
                ops / t / 1e9
            };
            let mut out = vec![0f32; m * n];
            let ours = rate(&mut || matmul_q4k(&x, m, &bytes, n, k, &mut out));
            // candle packs its tiles on the first call (the warm-up).
            let theirs = rate(&mut || {
                std::hint::black_box(qmm.forward(&xt).unwrap());
            });
            let reference = qmm.forward(&xt).unwrap();
            let want: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
            let max_out = out.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = out.iter().zip(&want).fold(0f32, |a, (&g, &e)| a.max((g - e).abs()));
            eprintln!(
                "m={m} n={n:5} k={k:5}: ours {ours:6.1} GOP/s, candle QMatMul {theirs:6.1} GOP/s ({:.2}x); \
                 max |diff| {d:.3e} (max |out| {max_out:.3e})",
                ours / theirs
            );
        }
        // Short prompts: this GEMM against the matrix-vector kernel (8 rows at a time).
        let (n, k) = (4096, 4096);
        let mut r = Rng::new(5);
        let wv: Vec<f32> = (0..n * k).map(|_| r.unit()).collect();
        let qt = QTensor::quantize(&Tensor::from_vec(wv, (n, k), &dev).unwrap(), GgmlDType::Q4K).unwrap();
        let bytes = qt.data().unwrap().into_owned();
        for m in [1, 2, 4, 8, 12, 16, 32, 64] {
            let x = activations(m * k, 9);
            let mut out = vec![0f32; m * n];
            // Best of 3 × `iters` calls after a warm-up call, in GOP/s.
            let time = |f: &mut dyn FnMut()| {
                f();
                let t = (0..3)
                    .map(|_| {
                        let t = Instant::now();
                        for _ in 0..iters {
                            f();
                        }
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::MAX, f64::min);
                2.0 * (m * n * k) as f64 * iters as f64 / t / 1e9
            };
            let ours = time(&mut || matmul_q4k(&x, m, &bytes, n, k, &mut out));
            let gemv = time(&mut || {
                for (xc, oc) in x.chunks(8 * k).zip(out.chunks_mut(8 * n)) {
                    let rows = xc.len() / k;
                    crate::kernels::qgemv::qgemv(crate::kernels::qgemv::QFormat::Q4K, xc, rows, &bytes, n, k, oc);
                }
            });
            eprintln!("m={m:4} n={n} k={k}: ours {ours:6.1} GOP/s, qgemv (8 rows a call) {gemv:6.1} GOP/s");
        }
    }
}
