//! The AVX2 paths of the int8 GEMMs ([`super::q8_gemm`], [`super::q4k_gemm`]) for CPUs without
//! AVX-512 VNNI (AMD Zen 1-3, Intel Haswell to Comet Lake, and Alder Lake and later cores
//! without AVX-512): one blocked driver over both block formats, monomorphised per row kernel.
//! The row kernels' dot products are `maddubs` + `madd`, or where the CPU has AVX-VNNI its
//! `vpdpbusd` (the same exact integers: see `qgemv::avx2`).
//!
//! Conventions as in those modules: `x` f32 `[m, k]`; `w` raw GGML blocks `[n, k]` (`row_bytes`
//! per row); `out` f32 `[m, n]`, overwritten. Activations are quantized once per call to Q8_0
//! (32 values, f16-rounded scale) by the scalar quantizer, exactly as the portable paths: the
//! per-block integer dot products are exact and only the order of the f32 sums differs.
//!
//! Blocking: rayon tasks take a tile of up to [`ROW_BLOCK`] activation rows by a stripe of
//! weight rows (output columns). A task walks its stripe in panels of [`PANEL`] weight rows (a
//! few hundred KiB at most, which stay in L2) and runs each panel against its rows 8 at a time
//! with the register-blocked row kernels (the weight block decoded once per 8 rows): the weight
//! is read from memory about `m / ROW_BLOCK` times. Tiles are written to a task buffer, then
//! copied into `out`.

use super::qgemv::avx2::{self as rows, avx2_forms, dpbusd};
use super::qgemv::{ActQ80, Kernel};
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Activation rows per task.
const ROW_BLOCK: usize = 64;
/// Weight rows per panel.
const PANEL: usize = 32;
/// Activation rows per row-kernel call (the most the row kernels take).
const GROUP: usize = 8;

/// The driver. `kern(w_panel, nw, r0, rows, out_t)` computes the `[nw, rows]` (weight-row
/// major) products of the `nw` weight rows `w_panel` with activation rows `r0..r0 + rows`
/// (`rows <= 8`).
fn blocked<F>(m: usize, w: &[u8], n: usize, row_bytes: usize, out: &mut [f32], kern: F)
where
    F: Fn(&[u8], usize, usize, usize, &mut [f32]) + Sync,
{
    let threads = rayon::current_num_threads().max(1);
    let row_blocks = m.div_ceil(ROW_BLOCK);
    // Enough tasks for every thread (4 each, for balance), stripes of at least one panel.
    let stripes = (4 * threads).div_ceil(row_blocks).clamp(1, n.div_ceil(PANEL));
    let stripe = n.div_ceil(stripes).div_ceil(PANEL) * PANEL;
    let stripes = n.div_ceil(stripe);
    let tiles: Vec<(usize, usize, Vec<f32>)> = (0..row_blocks * stripes)
        .into_par_iter()
        .map(|t| {
            let (rb, cs) = (t / stripes, t % stripes);
            let (r0, r1) = (rb * ROW_BLOCK, m.min((rb + 1) * ROW_BLOCK));
            let (j0, j1) = (cs * stripe, n.min((cs + 1) * stripe));
            let cols = j1 - j0;
            let mut tile = vec![0f32; (r1 - r0) * cols];
            let mut tmp = [0f32; PANEL * GROUP];
            for p0 in (j0..j1).step_by(PANEL) {
                let nw = PANEL.min(j1 - p0);
                let wp = &w[p0 * row_bytes..(p0 + nw) * row_bytes];
                for g0 in (r0..r1).step_by(GROUP) {
                    let rows = GROUP.min(r1 - g0);
                    let ot = &mut tmp[..nw * rows];
                    kern(wp, nw, g0, rows, ot);
                    for (jj, vals) in ot.chunks_exact(rows).enumerate() {
                        for (r, &v) in vals.iter().enumerate() {
                            tile[(g0 - r0 + r) * cols + p0 - j0 + jj] = v;
                        }
                    }
                }
            }
            (rb, cs, tile)
        })
        .collect();
    for (rb, cs, tile) in tiles {
        let (r0, j0) = (rb * ROW_BLOCK, cs * stripe);
        let cols = n.min(j0 + stripe) - j0;
        for (r, vals) in tile.chunks_exact(cols).enumerate() {
            out[(r0 + r) * n + j0..][..cols].copy_from_slice(vals);
        }
    }
}

/// [`super::q8_gemm::matmul_q8_0`] on AVX2, with AVX-VNNI when `vnni` (shapes checked by the
/// caller: `k` a positive multiple of 32, slices matching).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
pub(crate) unsafe fn q8_0(vnni: bool, x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    let nb = k / 32;
    let act = ActQ80::quantize(Kernel::Scalar, x, m, nb);
    let nb_pad = act.nb_pad;
    blocked(m, w, n, nb * 34, out, |wp, nw, r0, rows, ot| {
        let qs = &act.qs[r0 * nb_pad * 32..(r0 + rows) * nb_pad * 32];
        let dvec = &act.dvec[r0 * nb_pad * 8..(r0 + rows) * nb_pad * 8];
        // SAFETY: the CPU has the features `vnni` names (this function's contract).
        unsafe { rows::q8_0_slices(vnni, wp, nw, rows, qs, dvec, nb_pad, ot) }
    });
}

/// [`super::q4k_gemm::matmul_q4k`] on AVX2, with AVX-VNNI when `vnni` (shapes checked by the
/// caller: `k` a positive multiple of 256, slices matching).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
pub(crate) unsafe fn q4k(vnni: bool, x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    let nb = k / 32;
    let act = ActQ80::quantize(Kernel::Scalar, x, m, nb);
    let nb_pad = act.nb_pad;
    // d_a, and d_a · Σ qa (the min term's activation factor), per row and 32-value block.
    let da: Vec<f32> = act.dvec.iter().step_by(8).copied().collect();
    let dasum: Vec<f32> = act
        .qs
        .chunks_exact(32)
        .zip(act.dvec.chunks_exact(8))
        .map(|(q, d)| d[0] * q.iter().map(|&v| v as i32).sum::<i32>() as f32)
        .collect();
    blocked(m, w, n, k / 256 * 144, out, |wp, nw, r0, rows, ot| {
        let at = ActRows {
            nb_pad,
            qs: &act.qs[r0 * nb_pad * 32..(r0 + rows) * nb_pad * 32],
            da: &da[r0 * nb_pad..(r0 + rows) * nb_pad],
            dasum: &dasum[r0 * nb_pad..(r0 + rows) * nb_pad],
        };
        // SAFETY: the CPU has the features `vnni` names (this function's contract).
        unsafe { q4k_rows(vnni, wp, nw, rows, &at, ot) }
    });
}

/// Q8_0-quantized activation rows, borrowed: `qs` `[rows, nb_pad, 32]`, the scales `da` and
/// the products `dasum = d_a · Σ qa`, both `[rows, nb_pad]`.
struct ActRows<'a> {
    nb_pad: usize,
    qs: &'a [i8],
    da: &'a [f32],
    dasum: &'a [f32],
}

/// Q4K weight rows against Q8_0 activation rows; lengths are checked here.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
unsafe fn q4k_rows(vnni: bool, w: &[u8], nw: usize, rows: usize, act: &ActRows, out_t: &mut [f32]) {
    assert!((1..=8).contains(&rows), "q4k: rows");
    assert!(nw > 0 && w.len().is_multiple_of(nw * 144), "q4k: weight chunk size");
    let nbk = w.len() / (nw * 144);
    assert!(8 * nbk <= act.nb_pad, "q4k: activation stride");
    assert_eq!(out_t.len(), nw * rows, "q4k: output chunk size");
    assert_eq!(act.qs.len(), rows * act.nb_pad * 32, "q4k: activation size");
    assert_eq!(act.da.len(), rows * act.nb_pad, "q4k: activation scale size");
    assert_eq!(act.dasum.len(), rows * act.nb_pad, "q4k: activation sums size");
    // SAFETY: the caller's contract; the lengths the kernel relies on are checked above.
    unsafe { q4k_forms(vnni, rows, w, nw, nbk, act, out_t) }
}

avx2_forms!(
    /// [`q4k_r`] for `rows` activation rows.
    fn q4k_forms => q4k_r(w: &[u8], nw: usize, nbk: usize, act: &ActRows, out_t: &mut [f32])
);

/// Per weight block: the 8 sub-blocks' nibbles as u8 operands (sub-block `2c`: low nibbles of
/// `qs[32c..32c + 32]`, `2c + 1`: high), then per activation row and sub-block
/// `madd(maddubs(q, qa), 1)` (at most 2 · 15 · 127 per i16: no saturation; one [`dpbusd`]),
/// the 8 sub-blocks' sums reduced into one vector of exact integers (lane = sub-block) and
/// accumulated as `fma(isum, (d · sc) · d_a, acc)`; the min term of the 8 sub-blocks is one
/// vector product `(dmin · mn) · (d_a · Σ qa)` subtracted from the accumulator.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `VNNI` (it runs inlined into a function
/// compiled for them: [`avx2_forms`]).
#[inline(always)]
unsafe fn q4k_r<const VNNI: bool, const R: usize>(w: &[u8], nw: usize, nbk: usize, act: &ActRows, out_t: &mut [f32]) {
    // SAFETY: the features are the caller's contract (this body runs inlined into a function
    // compiled for them); memory is read through bounds-checked slices.
    unsafe {
        let row_bytes = nbk * 144;
        let nb_pad = act.nb_pad;
        let m4 = _mm256_set1_epi8(0x0F);
        for (j, row) in w.chunks_exact(row_bytes).take(nw).enumerate() {
            let mut acc = [_mm256_setzero_ps(); R];
            for (bq, blk) in row.chunks_exact(144).enumerate() {
                let (d, dmin) = (rows::f16_at(&blk[0..2]), rows::f16_at(&blk[2..4]));
                let (sc, mn) = super::qgemv::q4k_scales_mins(&blk[4..16]);
                let (sc, mn) = (sc.to_le_bytes(), mn.to_le_bytes());
                // dmin · mn[s] by lane s, and d · sc[s] (both exact in f32: 11-bit × 6-bit).
                let mn32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(mn)));
                let dmn = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(mn32));
                let sc32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(sc)));
                let dsc = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sc32));
                let mut v = [_mm256_setzero_si256(); 8];
                for c in 0..4 {
                    let q = rows::load_u8(&blk[16 + 32 * c..]);
                    v[2 * c] = _mm256_and_si256(q, m4);
                    v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let o = r * nb_pad + 8 * bq;
                    let mut p = [_mm256_setzero_si256(); 8];
                    for (s, p) in p.iter_mut().enumerate() {
                        let qa = rows::load_i8(&act.qs[(o + s) * 32..]);
                        *p = dpbusd::<VNNI>(_mm256_setzero_si256(), v[s], qa);
                    }
                    // Lane s: the exact integer sum of sub-block s.
                    let isum = _mm256_cvtepi32_ps(rows::reduce8(&p));
                    let a = _mm256_fmadd_ps(isum, _mm256_mul_ps(dsc, rows::load_f32(&act.da[o..])), *acc);
                    *acc = _mm256_fnmadd_ps(dmn, rows::load_f32(&act.dasum[o..]), a);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                out_t[j * R + r] = rows::hsum(*acc);
            }
        }
    }
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
