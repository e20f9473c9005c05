//! Matrix product `out = x · Wᵀ` with `W` in GGML Q8_0 blocks, for the CPU (prefill).
//!
//! Conventions (every function of this file):
//! - `x`: activations, f32, row-major `[m, k]`;
//! - `w`: the weight `[n, k]` as raw GGML Q8_0 blocks: row `j` is the byte range
//!   `[j * row_bytes, (j + 1) * row_bytes)`, `row_bytes = k / 32 * 34`, each block
//!   `{ d: f16 (little-endian), qs: [i8; 32] }` (exactly candle's `QTensor::data()` for a Q8_0
//!   tensor of shape `[n, k]`); `k` is a multiple of 32;
//! - `out`: f32, row-major `[m, n]`, overwritten: `out[i, j] = Σ_p x[i, p] · W[j, p]`.
//!
//! Why it exists: candle's CPU quantized matmul reaches about 400 GOP/s on the prefill shapes of
//! a 7B Llama on 2 Zen 4 cores; the AVX-512 VNNI `vpdpbusd` (64 u8 × s8 products per
//! instruction) peaks at about twice the BF16 GEMM's rate.
//!
//! Paths, picked at run time (the shape checks and the choice: `kernels::qgemm`):
//! - AVX-512 F/BW/VL/VNNI: `kernels::qgemm_avx512`'s blocked driver (shared with
//!   [`super::q4k_gemm`]). Activations are quantized once per call and packed into micro-panels
//!   of 6 rows as `u8` (`qa + 128`); each task packs its stripe of `W` (this module) as
//!   micro-panels of 32 columns: per block, 8 k-quads × 32 columns × 4 `i8`, then 32 `i32`
//!   corrections (`-128 · Σ qw` of the block, which undo the `+128` of the activations) and 32
//!   f32 scales. A 6×32 micro-kernel (this module; 12 zmm integer accumulators, 12 zmm f32
//!   accumulators) then runs each micro-panel of `W` (in L1) against the row tiles.
//! - AVX2 + FMA + F16C (no AVX-512 VNNI): `kernels::qgemm_avx2`, the same blocking with a 6×8
//!   micro-kernel (256-bit vectors, a broadcast activation word against 8 columns; weights and
//!   activations widened to i16, `madd` pairs (`vpdpwssd` with AVX-VNNI); the same bits with or
//!   without AVX-VNNI), the same quantized numbers (exact integer per 32-value block).
//! - Portable (any CPU): the same quantized numbers, integer dot per block, in plain Rust.
//!
//! Numerics: as candle's CPU quantized matmul for Q8_0 weights (ggml `vec_dot_q8_0_q8_0`):
//! each activation row is quantized per 32-value block exactly as candle's
//! `BlockQ8_0::from_float` (f16-rounded scale `d_a`), each block's dot product is an exact
//! integer, and `out[i, j] = Σ_b d_w[j, b] · d_a[i, b] · isum[i, j, b]` summed in f32; only the
//! order of those f32 sums (and of the two scale products) differs from candle.
//! (candle's own `QMatMul` on x86 with AVX-512 VNNI, when `n % 16 == 0` and `k % 256 == 0`,
//! quantizes the activations to Q8K instead: it differs from this by the activation rounding.)
//! Parallelism: rayon's global pool. Memory: the packed activations (about `m · k · 1.2` bytes)
//! are kept between calls, and each rayon thread keeps its packed stripe of `W`
//! (`256 · k · 1.25` bytes).

use super::qgemm::QGemm;
use super::qgemv::{ActQ80, Kernel};
use half::f16;
use rayon::prelude::*;

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes per Q8_0 block.
const BLOCK_BYTES: usize = 34;

/// `out[i, j] = Σ_p x[i, p] · W[j, p]` with `W` the Q8_0 blocks `w` (see the module doc for the
/// layouts); `out` is overwritten. With `k == 0` the output is zeros. Runs on rayon's global
/// pool. Each call packs all of `W` again (about `n · k · 1.25` bytes written): for a few rows
/// (measured: `m <= 4` at 4096 × 4096) [`super::qgemv::qgemv`] is faster.
///
/// Panics when `k` is not a multiple of 32 or a slice length does not match its shape.
pub fn matmul_q8_0(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    super::qgemm::matmul::<Q8_0>(x, m, w, n, k, out);
}

/// Whether [`matmul_q8_0`] uses a SIMD path (AVX-512 VNNI, AVX-VNNI or AVX2) on the calling
/// thread ([`super::cpu::features`]).
pub fn has_fast_path() -> bool {
    super::qgemm::has_fast_path()
}

/// The Q8_0 weight format of the int8 GEMMs.
pub(crate) struct Q8_0;

impl QGemm for Q8_0 {
    const NAME: &'static str = "matmul_q8_0";
    const BLOCK_VALUES: usize = QK;
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn portable(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
        portable(x, m, w, n, k, out);
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(vnni: bool, x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
        // SAFETY: the trait's contract (features and shapes).
        unsafe { super::qgemm_avx2::q8_0(vnni, x, m, w, n, k, out) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
        // SAFETY: the trait's contract (features and shapes).
        unsafe { super::qgemm_avx512::gemm::<Q8_0>(x, m, w, n, k, out) }
    }
}

/// The f16 scale of the block starting at `blk[0]`, as f32.
#[inline]
fn f16_le(blk: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32()
}

/// Portable path: any CPU. Tasks: groups of rows (each weight row is read once per group).
fn portable(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    const ROWS: usize = 4;
    let nb = k / QK;
    let row_bytes = nb * BLOCK_BYTES;
    let act = ActQ80::quantize(Kernel::Scalar, x, m, nb);
    let act = &act;
    out.par_chunks_mut(ROWS * n).enumerate().for_each(|(g, oc)| {
        let i0 = g * ROWS;
        let rows = oc.len() / n;
        for (j, wr) in w.chunks_exact(row_bytes).enumerate() {
            for r in 0..rows {
                let mut s = 0f32;
                for (b, blk) in wr.chunks_exact(BLOCK_BYTES).enumerate() {
                    let o = (i0 + r) * act.nb_pad + b;
                    let qa = &act.qs[o * QK..(o + 1) * QK];
                    let isum: i32 = qa.iter().zip(&blk[2..]).map(|(&a, &q)| a as i32 * q as i8 as i32).sum();
                    // As candle: the integer sum times the weight scale times the activation scale.
                    s += isum as f32 * f16_le(blk) * act.dvec[o * 8];
                }
                oc[r * n + j] = s;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index their accumulator arrays by loop counters on purpose.
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::{BLOCK_BYTES, Q8_0, QK};
    use crate::kernels::qgemm_avx512::{pack_columns, store_tile, Format, A_D, MR, NR, NV};
    use core::arch::x86_64::*;

    // Q8_0 weights for [`crate::kernels::qgemm_avx512`]: activations packed as `qa + 128`
    // (`u8`), weights as `i8` with the corrections `-128 · Σ qw` that undo the bias.

    /// Bytes of one block of a packed weight micro-panel: 8 k-quads × `NR` columns × 4 `i8`, then
    /// `NR` i32 corrections, then `NR` f32 scales.
    const W_BLK: usize = 8 * NR * 4 + NR * 8;
    /// Offsets, in a packed weight block, of the corrections and of the scales.
    const W_CORR: usize = 8 * NR * 4;
    const W_SCALE: usize = W_CORR + NR * 4;
    /// Bytes of one block of a packed activation micro-panel.
    const A_BLK: usize = <Q8_0 as Format>::A_BLK;

    impl Format for Q8_0 {
        const BIASED_ACT: bool = true;
        const ACT_SUMS: bool = false;
        const W_BLK: usize = W_BLK;
        const SUBS: usize = 1;

        fn row_bytes(k: usize) -> usize {
            k / QK * BLOCK_BYTES
        }

        /// Packs weight rows `j0..j0 + valid` (`valid <= NR`; `w` the whole weight, `row_bytes` per
        /// row), blocks `pc..pc + kcb`, into `dst` (`kcb * W_BLK` bytes, 64-byte aligned): per
        /// block, `dst[(q * NR + c) * 4 + l] = qw[j0 + c, 4q + l]`, then the corrections
        /// `-128 · Σ qw[j0 + c, block]` (i32), then the scales (f32); missing columns are zeros.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn pack_w(w: &[u8], row_bytes: usize, j0: usize, valid: usize, pc: usize, kcb: usize, dst: &mut [u8]) {
            assert!((pc + kcb) * BLOCK_BYTES <= row_bytes, "pack_w: range");
            let ones = _mm512_set1_epi8(1);
            // SAFETY: this `unsafe fn`'s contract, which its callers uphold: the CPU has the
            // features it is compiled for; the blocks read lie within the rows (asserted above
            // and by `pack_columns`) and the stores within the group's bytes of `dst`.
            unsafe {
                pack_columns(w, row_bytes, j0, valid, kcb, W_BLK, dst, |cg| {
                    let g = cg.g;
                    for b in 0..kcb {
                        let src = cg.base.add((pc + b) * BLOCK_BYTES);
                        let blk = cg.dst.add(b * W_BLK);
                        let mut sum = _mm512_setzero_si512();
                        for quad in 0..8 {
                            let v = cg.gather(src.add(2 + 4 * quad));
                            sum = _mm512_dpbusd_epi32(sum, ones, v);
                            _mm512_storeu_si512(blk.add(quad * NR * 4 + 64 * g) as *mut _, v);
                        }
                        let corr = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<7>(sum));
                        _mm512_storeu_si512(blk.add(W_CORR + 64 * g) as *mut _, corr);
                        // The dword at the block start: its low half is the f16 scale.
                        let scale = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(cg.gather(src)));
                        _mm512_storeu_ps(blk.add(W_SCALE + 64 * g) as *mut f32, scale);
                    }
                });
            }
        }

        /// `R`×`NR` micro-tile over `nblk` blocks: `c[r, 0..NR] (+)= Σ_b dw[b] · da[r, b] · isum`,
        /// `isum = Σ_q (qa + 128) · qw - 128 · Σ qw` (exact integers), from the packed micro-panels
        /// `a` (`A_BLK` bytes per block) and `b` (`W_BLK` bytes per block, 64-byte aligned). Stores
        /// the columns enabled in `masks` (16 per vector) of rows `0..R` (stride `ldc`).
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
                    for v in 0..NV {
                        let corr = _mm512_load_si512(bb.add(W_CORR + 64 * v) as *const _);
                        for r in 0..R {
                            isum[r][v] = corr;
                        }
                    }
                    for quad in 0..8 {
                        let mut wv = [_mm512_setzero_si512(); NV];
                        for v in 0..NV {
                            wv[v] = _mm512_load_si512(bb.add(quad * NR * 4 + 64 * v) as *const _);
                        }
                        for r in 0..R {
                            let av = _mm512_set1_epi32((ab.add((quad * MR + r) * 4) as *const i32).read_unaligned());
                            for v in 0..NV {
                                isum[r][v] = _mm512_dpbusd_epi32(isum[r][v], av, wv[v]);
                            }
                        }
                    }
                    let mut dw = [_mm512_setzero_ps(); NV];
                    for v in 0..NV {
                        dw[v] = _mm512_load_ps(bb.add(W_SCALE + 64 * v) as *const f32);
                    }
                    for r in 0..R {
                        let da = _mm512_set1_ps((ab.add(A_D + 4 * r) as *const f32).read_unaligned());
                        for v in 0..NV {
                            acc[r][v] =
                                _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][v]), _mm512_mul_ps(dw[v], da), acc[r][v]);
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

    /// [`matmul_q8_0`] with the kernel set capped at `set` through the switch.
    fn matmul_q8_0_forced(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32], set: KernelSet) {
        let _forced = cpu::force(set);
        matmul_q8_0(x, m, w, n, k, out);
    }
    use candle_core::quantized::{k_quants, GgmlDType, QTensor};
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

    /// Random Q8_0 blocks for `[n, k]`: all i8 values (-128 included), scales of both signs.
    fn weights(n: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut r = Rng::new(seed);
        let mut w = Vec::with_capacity(n * k / QK * BLOCK_BYTES);
        for _ in 0..n * k / QK {
            let d = f16::from_f32(r.unit() * 0.02 + if r.next() & 1 == 0 { 0.01 } else { -0.01 });
            w.extend_from_slice(&d.to_bits().to_le_bytes());
            for _ in 0..QK {
                w.push(r.next() as u8);
            }
        }
        w
    }

    /// f64 reference from the same quantized activations and weight integers
    /// ([`check_gemm`]; terms: `d_w · d_a · isum` per block).
    fn check(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &[f32]) -> Result<(), (usize, usize, f32, f64)> {
        let nb = k / QK;
        let row_bytes = nb * BLOCK_BYTES;
        let act = ActQ80::quantize(Kernel::Scalar, x, m, nb);
        check_gemm(out, m, n, 1e-30, |i, j| {
            let (mut s, mut abs) = (0f64, 0f64);
            for b in 0..nb {
                let blk = &w[j * row_bytes + b * BLOCK_BYTES..][..BLOCK_BYTES];
                let o = i * act.nb_pad + b;
                let isum: i64 = (0..QK).map(|l| act.qs[o * QK + l] as i64 * blk[2 + l] as i8 as i64).sum::<i64>();
                let t = f16_le(blk) as f64 * act.dvec[o * 8] as f64 * isum as f64;
                s += t;
                abs += t.abs();
            }
            (s, abs)
        })
    }

    fn run(m: usize, n: usize, k: usize, set: KernelSet) {
        let x = activations(m * k, (m * 1000 + k) as u64);
        let w = weights(n, k, (n * 7919 + k) as u64 + 1);
        // NaN everywhere: every element must be overwritten.
        let mut out = vec![f32::NAN; m * n];
        matmul_q8_0_forced(&x, m, &w, n, k, &mut out, set);
        if let Err((i, j, got, want)) = check(&x, m, &w, n, k, &out) {
            panic!("m={m} n={n} k={k} {set}: out[{i}, {j}] = {got}, want {want}");
        }
    }

    const MS: [usize; 8] = [1, 2, 5, 6, 7, 13, 31, 130];
    const NS: [usize; 6] = [1, 15, 16, 17, 33, 100];
    const KS: [usize; 4] = [32, 64, 96, 4096];

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
        for &(m, n, k) in &[(200, 300, 1184), (97, 530, 288), (400, 40, 608), (3, 1000, 544), (61, 257, 32)] {
            for set in cpu::available_sets() {
                run(m, n, k, set);
            }
        }
        for m in 1..=13 {
            for set in simd_sets() {
                run(m, 70, 576, set);
            }
        }
    }

    /// Extreme integers: activations that quantize to ±127 against weights of -128 and 127 (the
    /// largest block sums, and the `-128 · Σ qw` corrections at their extremes).
    #[test]
    fn extreme_values() {
        let (m, n, k) = (7, 19, 128);
        let x: Vec<f32> = (0..m * k).map(|t| if (t / 3) % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let mut w = weights(n, k, 3);
        for (b, blk) in w.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            for (l, q) in blk[2..].iter_mut().enumerate() {
                *q = match (b + l / 3) % 3 {
                    0 => 0x80, // -128
                    1 => 0x7f,
                    _ => 0x80,
                };
            }
        }
        for set in cpu::available_sets() {
            let mut out = vec![f32::NAN; m * n];
            matmul_q8_0_forced(&x, m, &w, n, k, &mut out, set);
            assert!(check(&x, m, &w, n, k, &out).is_ok(), "{set}");
        }
    }

    #[test]
    fn empty_shapes_and_zero_k() {
        let mut out = vec![f32::NAN; 6];
        matmul_q8_0(&[], 2, &[], 3, 0, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
        let mut out: Vec<f32> = vec![];
        matmul_q8_0(&[], 0, &weights(3, 64, 1), 3, 64, &mut out);
        matmul_q8_0(&activations(128, 1), 2, &[], 0, 64, &mut out);
    }

    /// candle's generic quantized matmul (`k_quants::matmul`, per-block `vec_dot_q8_0_q8_0`),
    /// the numerics this module reproduces.
    fn candle_generic(x: &[f32], m: usize, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
        use k_quants::{BlockQ8_0, GgmlType};
        let size = std::mem::size_of::<BlockQ8_0>();
        assert_eq!(size, BLOCK_BYTES);
        let mut blocks = vec![BlockQ8_0::zeros(); bytes.len() / size];
        // SAFETY: BlockQ8_0 is a repr(C) plain-data struct of exactly these 34 bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len()) };
        let mut dst = vec![0f32; m * n];
        k_quants::matmul::<BlockQ8_0>((m, k, n), x, &blocks, &mut dst).unwrap();
        dst
    }

    /// Weights quantized by candle (`QTensor::quantize`), results against candle's matmul.
    /// `x.apply_op1_no_bwd(&qtensor)` (as linear.rs calls it) runs candle's generic Q8_0 path
    /// unless `n % 16 == 0 && k % 256 == 0` on an AVX-512 VNNI CPU, where it takes its x86 tiles
    /// with Q8K activations: those shapes are compared with `k_quants::matmul` (the generic
    /// path) tightly, and with `apply_op1_no_bwd` within the activation rounding.
    #[test]
    fn matches_candle() {
        let dev = Device::Cpu;
        for &(m, n, k) in &[(5, 17, 96), (130, 33, 320), (64, 100, 4096), (9, 40, 288), (70, 64, 512), (33, 48, 4096)] {
            let mut r = Rng::new((m * n + k) as u64);
            let wv: Vec<f32> = (0..n * k).map(|_| r.unit()).collect();
            let qt = QTensor::quantize(&Tensor::from_vec(wv, (n, k), &dev).unwrap(), GgmlDType::Q8_0).unwrap();
            let bytes = qt.data().unwrap().into_owned();
            assert_eq!(bytes.len(), n * k / QK * BLOCK_BYTES);
            let x = activations(m * k, (m + 3 * k) as u64);
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let op: Vec<f32> = xt.apply_op1_no_bwd(&qt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let generic = candle_generic(&x, m, &bytes, n, k);
            let tiled = n % 16 == 0 && k % 256 == 0;
            for set in cpu::available_sets() {
                let mut out = vec![f32::NAN; m * n];
                matmul_q8_0_forced(&x, m, &bytes, n, k, &mut out, set);
                let max_out = out.iter().fold(0f32, |a, &v| a.max(v.abs()));
                let diff = |want: &[f32]| out.iter().zip(want).fold(0f32, |a, (&g, &e)| a.max((g - e).abs()));
                let tol = 1e-4 * (max_out + 1.0);
                let d = diff(&generic);
                assert!(d <= tol, "m={m} n={n} k={k} {set}: max |ours - candle generic| = {d} > {tol}");
                if !tiled {
                    let d = diff(&op);
                    assert!(d <= tol, "m={m} n={n} k={k} {set}: max |ours - candle op| = {d} > {tol}");
                    continue;
                }
                // Q8K activations (one scale per 256 values) against our Q8_0 ones: each rounds
                // a value by at most half a step, amax(block) / 254 (f16 scale: 1% slack).
                let row_bytes = k / QK * BLOCK_BYTES;
                let err = |xb: &[f32]| xb.iter().fold(0f64, |a, &v| a.max(v.abs() as f64)) / 254.0 * 1.01;
                for i in 0..m {
                    let xr = &x[i * k..(i + 1) * k];
                    let e: Vec<f64> =
                        (0..k).map(|p| err(&xr[p / 256 * 256..][..256]) + err(&xr[p / QK * QK..][..QK])).collect();
                    for j in 0..n {
                        let wr = &bytes[j * row_bytes..(j + 1) * row_bytes];
                        let bound: f64 = (0..k)
                            .map(|p| {
                                let blk = &wr[p / QK * BLOCK_BYTES..][..BLOCK_BYTES];
                                (f16_le(blk) as f64 * blk[2 + p % QK] as i8 as f64).abs() * e[p]
                            })
                            .sum();
                        let (g, want) = (out[i * n + j], op[i * n + j]);
                        let d = (g as f64 - want as f64).abs();
                        assert!(
                            d <= bound + tol as f64,
                            "m={m} n={n} k={k} {set}: out[{i}, {j}] = {g}, candle op {want} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    /// The checker itself rejects a wrong result.
    #[test]
    fn checker_detects_errors() {
        let (m, n, k) = (3, 4, 64);
        let x = activations(m * k, 3);
        let w = weights(n, k, 4);
        let mut out = vec![0f32; m * n];
        matmul_q8_0(&x, m, &w, n, k, &mut out);
        assert!(check(&x, m, &w, n, k, &out).is_ok());
        out[5] += 1e-3 * (1.0 + out[5].abs());
        assert!(check(&x, m, &w, n, k, &out).is_err());
        out[5] = f32::NAN;
        assert!(check(&x, m, &w, n, k, &out).is_err());
    }

    /// Prefill shapes of a 7B Llama (m = 2074): ours vs candle's `QMatMul`.
    /// `cargo test --release -p videollava --lib q8_gemm -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_prefill_shapes() {
        use candle_core::quantized::QMatMul;
        use std::time::Instant;
        let dev = Device::Cpu;
        let m = 2074;
        let iters = 7;
        eprintln!("threads: rayon {}, fast path: {}", rayon::current_num_threads(), has_fast_path());
        for &(n, k) in &[(4096, 4096), (11008, 4096), (4096, 11008)] {
            let mut r = Rng::new((n + k) as u64);
            let wv: Vec<f32> = (0..n * k).map(|_| r.unit()).collect();
            let qt = QTensor::quantize(&Tensor::from_vec(wv, (n, k), &dev).unwrap(), GgmlDType::Q8_0).unwrap();
            let bytes = qt.data().unwrap().into_owned();
            let x = activations(m * k, 7);
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let qmm = QMatMul::from_qtensor(qt).unwrap();
            let ops = 2.0 * (m * n * k) as f64;
            // Median of `iters` timed calls after a warm-up call, in GOP/s.
            let rate = |f: &mut dyn FnMut()| {
                f();
                let mut t: Vec<f64> = (0..iters)
                    .map(|_| {
                        let t = Instant::now();
                        f();
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                t.sort_by(f64::total_cmp);
                ops / t[iters / 2] / 1e9
            };
            let mut out = vec![0f32; m * n];
            let ours = rate(&mut || matmul_q8_0(&x, m, &bytes, n, k, &mut out));
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
        let qt = QTensor::quantize(&Tensor::from_vec(wv, (n, k), &dev).unwrap(), GgmlDType::Q8_0).unwrap();
        let bytes = qt.data().unwrap().into_owned();
        for m in [1, 4, 8, 16, 32, 64, 128] {
            let x = activations(m * k, 9);
            let mut out = vec![0f32; m * n];
            let time = |f: &mut dyn FnMut()| {
                f();
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                2.0 * (m * n * k) as f64 * iters as f64 / t.elapsed().as_secs_f64() / 1e9
            };
            let ours = time(&mut || matmul_q8_0(&x, m, &bytes, n, k, &mut out));
            let gemv = time(&mut || {
                for (xc, oc) in x.chunks(8 * k).zip(out.chunks_mut(8 * n)) {
                    let rows = xc.len() / k;
                    crate::kernels::qgemv::qgemv(crate::kernels::qgemv::QFormat::Q8_0, xc, rows, &bytes, n, k, oc);
                }
            });
            eprintln!("m={m:4} n={n} k={k}: ours {ours:6.1} GOP/s, qgemv (8 rows a call) {gemv:6.1} GOP/s");
        }
    }
}
