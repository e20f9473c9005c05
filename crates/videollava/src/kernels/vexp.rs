//! `exp` on 16 f32 lanes (AVX-512), the vector form of the scalar [`super::fused::exp_f32`]
//! that the softmaxes use: the same bits, so every path agrees.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// [`super::fused::exp_f32`] on 16 lanes: the same operations in the same order
/// (no fused multiply-adds), so the same bits for every input but NaN.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.97)), _mm512_set1_ps(88.722_83));
    let magic = _mm512_set1_ps(12_582_912.0);
    let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)), magic), magic);
    let r = _mm512_sub_ps(
        _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693_359_4))),
        _mm512_mul_ps(n, _mm512_set1_ps(-2.121_944_4e-4)),
    );
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3f32, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0));
    let ni = _mm512_cvttps_epi32(n);
    // n / 2 rounded toward zero, as Rust's i32 division.
    let h = _mm512_srai_epi32::<1>(_mm512_add_epi32(ni, _mm512_srli_epi32::<31>(ni)));
    let bias = _mm512_set1_epi32(127);
    let s1 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(h, bias)));
    let s2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_sub_epi32(ni, h), bias)));
    let v = _mm512_mul_ps(_mm512_mul_ps(y, s1), s2);
    let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(88.722_83));
    let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-103.97));
    let v = _mm512_mask_blend_ps(under, v, _mm512_setzero_ps());
    _mm512_mask_blend_ps(over, v, _mm512_set1_ps(f32::INFINITY))
}
