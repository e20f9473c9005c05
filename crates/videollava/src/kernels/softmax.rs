//! The softmax of one row of attention scores for the 8-bit cache's decode kernel
//! ([`super::kv_quant`]): `attention::softmax_probs` (scalar: scores scaled, invisible
//! keys excluded, `exp(x - max)`, each probability `x / sum` rounded to the query's dtype) on
//! 16 lanes (AVX-512) and on two vectors of 8 (AVX2), with the same operations in the same order,
//! so the same bits: lane `i` of the sum takes entries `16 m + i` of the whole chunks of 16, the
//! rest is summed in order after them, then [`super::attention::hsum`]. Probabilities are
//! rounded to nearest even for BF16 and F16 (as `half` rounds finite values); callers pass F32,
//! BF16 or F16 only.
//!
//! Row: `row` (f32 raw scores, overwritten with the probabilities) and `valid` (u32 1/0) of
//! one length; returns false, leaving zeros, when no key is visible.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{softmax_probs16, softmax_probs8};

/// A probability rounded to `dtype` (BF16, F16: to nearest even; anything else: as is), as the
/// scalar softmax rounds it.
pub(crate) fn round_prob(x: f32, dtype: candle_core::DType) -> f32 {
    match dtype {
        candle_core::DType::BF16 => half::bf16::from_f32(x).to_f32(),
        candle_core::DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use candle_core::DType;

    use crate::kernels::attention::{hsum, mask16};
    use crate::kernels::fused::exp_f32;
    use crate::kernels::vexp::exp16;

    /// The 16-lane form (AVX-512), see the module documentation.
    ///
    /// # Safety
    /// AVX-512 F/BW; `valid.len() == row.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn softmax_probs16(row: &mut [f32], valid: &[u32], scale: f32, dtype: DType) -> bool {
        // SAFETY: this `unsafe fn`'s contract: AVX-512 F/BW; the whole chunks and the rest are
        // inside `row` and `valid` (of one length).
        unsafe {
            let n = row.len();
            let full = n / 16 * 16;
            let (rp, vp) = (row.as_mut_ptr(), valid.as_ptr());
            let vs = _mm512_set1_ps(scale);
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut m = ninf;
            for i in (0..full).step_by(16) {
                let ok = _mm512_cmpneq_epi32_mask(_mm512_loadu_si512(vp.add(i) as *const _), _mm512_setzero_si512());
                let x = _mm512_mask_blend_ps(ok, ninf, _mm512_mul_ps(_mm512_loadu_ps(rp.add(i)), vs));
                _mm512_storeu_ps(rp.add(i), x);
                m = _mm512_max_ps(m, x);
            }
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), m);
            let Some(max) = scale_rest(row, valid, full, scale, &lanes) else { return false };
            let vmax = _mm512_set1_ps(max);
            let mut acc = _mm512_setzero_ps();
            for i in (0..full).step_by(16) {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(rp.add(i)), vmax));
                _mm512_storeu_ps(rp.add(i), e);
                acc = _mm512_add_ps(acc, e);
            }
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
            let vsum = _mm512_set1_ps(exp_rest(row, full, max, &lanes));
            // Round to nearest even on the upper 16 bits (finite, non-negative values).
            let (half, one) = (_mm512_set1_epi32(0x7FFF), _mm512_set1_epi32(1));
            let keep = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
            for i in (0..n).step_by(16) {
                let k = mask16(n - i);
                let p = _mm512_div_ps(_mm512_maskz_loadu_ps(k, rp.add(i)), vsum);
                let p = match dtype {
                    DType::BF16 => {
                        let bits = _mm512_castps_si512(p);
                        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), one);
                        _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(half, lsb)), keep))
                    }
                    DType::F16 => {
                        _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p))
                    }
                    _ => p,
                };
                _mm512_mask_storeu_ps(rp.add(i), k, p);
            }
            true
        }
    }

    /// The scalar steps after the whole chunks' scaling: the rest scaled, the maximum with the
    /// chunks' lane maxima (`None`, the row zeroed, when nothing is visible).
    fn scale_rest(row: &mut [f32], valid: &[u32], full: usize, scale: f32, lanes: &[f32; 16]) -> Option<f32> {
        let mut max = f32::NEG_INFINITY;
        for (x, &ok) in row[full..].iter_mut().zip(&valid[full..]) {
            *x = if ok != 0 { *x * scale } else { f32::NEG_INFINITY };
            max = max.max(*x);
        }
        for &x in lanes {
            max = max.max(x);
        }
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return None;
        }
        Some(max)
    }

    /// The rest's `exp(x - max)` summed in order, then the chunks' lane sums: the sum.
    fn exp_rest(row: &mut [f32], full: usize, max: f32, lanes: &[f32; 16]) -> f32 {
        let mut sum = 0f32;
        for x in &mut row[full..] {
            *x = exp_f32(*x - max);
            sum += *x;
        }
        sum + hsum(lanes)
    }

    /// [`crate::kernels::fused::exp_f32`] on 8 lanes: the same operations in the same order (no
    /// fused multiply-adds), so the same bits for every input but NaN (as [`exp16`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let c = _mm256_set1_ps;
        let xc = _mm256_min_ps(_mm256_max_ps(x, c(-103.97)), c(88.722_83));
        let magic = c(12_582_912.0);
        let n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(xc, c(std::f32::consts::LOG2_E)), magic), magic);
        let r =
            _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, c(0.693_359_4))), _mm256_mul_ps(n, c(-2.121_944_4e-4)));
        let mut p = c(1.987_569_1e-4);
        for k in [1.398_199_9e-3f32, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), c(k));
        }
        let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), c(1.0));
        let ni = _mm256_cvttps_epi32(n);
        // n / 2 rounded toward zero, as Rust's i32 division.
        let h = _mm256_srai_epi32::<1>(_mm256_add_epi32(ni, _mm256_srli_epi32::<31>(ni)));
        let bias = _mm256_set1_epi32(127);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(h, bias)));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_sub_epi32(ni, h), bias)));
        let v = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, c(88.722_83));
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, c(-103.97));
        let v = _mm256_blendv_ps(v, _mm256_setzero_ps(), under);
        _mm256_blendv_ps(v, c(f32::INFINITY), over)
    }

    /// The form on two vectors of 8 (AVX2 + FMA + F16C), lanes 0-7 and 8-15 of each chunk of 16,
    /// see the module documentation.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `valid.len() == row.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn softmax_probs8(row: &mut [f32], valid: &[u32], scale: f32, dtype: DType) -> bool {
        // SAFETY: this `unsafe fn`'s contract: AVX2 + F16C; the whole chunks are inside `row`
        // and `valid` (of one length), the rest is left to the scalar steps.
        unsafe {
            let n = row.len();
            let full = n / 16 * 16;
            let (rp, vp) = (row.as_mut_ptr(), valid.as_ptr());
            let vs = _mm256_set1_ps(scale);
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut m = [ninf; 2];
            for i in (0..full).step_by(16) {
                for (h, m) in m.iter_mut().enumerate() {
                    let at = i + 8 * h;
                    let invisible =
                        _mm256_cmpeq_epi32(_mm256_loadu_si256(vp.add(at) as *const _), _mm256_setzero_si256());
                    let x = _mm256_blendv_ps(
                        _mm256_mul_ps(_mm256_loadu_ps(rp.add(at)), vs),
                        ninf,
                        _mm256_castsi256_ps(invisible),
                    );
                    _mm256_storeu_ps(rp.add(at), x);
                    *m = _mm256_max_ps(*m, x);
                }
            }
            let mut lanes = [0f32; 16];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), m[1]);
            let Some(max) = scale_rest(row, valid, full, scale, &lanes) else { return false };
            let vmax = _mm256_set1_ps(max);
            let mut acc = [_mm256_setzero_ps(); 2];
            for i in (0..full).step_by(16) {
                for (h, acc) in acc.iter_mut().enumerate() {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(rp.add(i + 8 * h)), vmax));
                    _mm256_storeu_ps(rp.add(i + 8 * h), e);
                    *acc = _mm256_add_ps(*acc, e);
                }
            }
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
            let sum = exp_rest(row, full, max, &lanes);
            let vsum = _mm256_set1_ps(sum);
            let (half, one) = (_mm256_set1_epi32(0x7FFF), _mm256_set1_epi32(1));
            let keep = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
            let whole = n / 8 * 8;
            for i in (0..whole).step_by(8) {
                let p = _mm256_div_ps(_mm256_loadu_ps(rp.add(i)), vsum);
                let p = match dtype {
                    DType::BF16 => {
                        let bits = _mm256_castps_si256(p);
                        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), one);
                        _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(half, lsb)), keep))
                    }
                    DType::F16 => _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(p)),
                    _ => p,
                };
                _mm256_storeu_ps(rp.add(i), p);
            }
            for x in &mut row[whole..] {
                *x = super::round_prob(*x / sum, dtype);
            }
            true
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::kernels::attention::softmax_probs;

    /// Both vector forms give the scalar softmax's bits: every length of tail, masked keys, all
    /// three probability dtypes, and rows that see nothing.
    #[test]
    fn vector_softmax_probs_give_the_scalar_bits() {
        let f = crate::kernels::cpu::features();
        if !f.avx2 {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut state = 11u64;
        let rounds: [(DType, fn(f32) -> f32); 3] = [
            (DType::F32, |x| x),
            (DType::BF16, |x| half::bf16::from_f32(x).to_f32()),
            (DType::F16, |x| half::f16::from_f32(x).to_f32()),
        ];
        for n in (1usize..70).chain([517, 2074]) {
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 60.0 - 30.0
                })
                .collect();
            let valid: Vec<u32> = (0..n).map(|i| u32::from(i % 5 != 2)).collect();
            for (dtype, round) in rounds {
                for valid in [valid.clone(), vec![0; n]] {
                    let mut want = row.clone();
                    let seen = softmax_probs(&mut want, &valid, 0.7, round);
                    let mut forms: Vec<(&str, Vec<f32>, bool)> = Vec::new();
                    let mut b = row.clone();
                    // SAFETY: AVX2, FMA and F16C detected above (the `avx2` set has all three).
                    let sb = unsafe { softmax_probs8(&mut b, &valid, 0.7, dtype) };
                    forms.push(("avx2", b, sb));
                    if f.avx512 {
                        let mut c = row.clone();
                        // SAFETY: AVX-512 F/BW detected (the `avx512` set has both).
                        let sc = unsafe { softmax_probs16(&mut c, &valid, 0.7, dtype) };
                        forms.push(("avx512", c, sc));
                    }
                    for (set, got, s) in forms {
                        assert_eq!(s, seen, "{set} n {n}");
                        let differ = want.iter().zip(&got).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                        assert_eq!(differ, 0, "{set} n {n} {dtype:?}: {differ} probabilities differ");
                    }
                }
            }
        }
    }
}
