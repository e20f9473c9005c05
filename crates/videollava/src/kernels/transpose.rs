//! A 16×16 transpose of 32-bit words on AVX-512 registers, shared by the kernels that repack
//! tiles (the BF16 GEMMs, attention).

use core::arch::x86_64::*;

/// Transpose of a 16×16 matrix of 32-bit values (`v[r]` = row `r`); also used by the
/// fused attention's BF16 path.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(v: [__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    // t[2i]: in each 128-bit lane l: (r2i c4l, r2i+1 c4l, r2i c4l+1, r2i+1 c4l+1); t[2i+1]: c4l+2, c4l+3.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        for h in 0..2 {
            let (x, y) = (t[4 * i + h], t[4 * i + 2 + h]);
            u[4 * i + 2 * h] = _mm512_unpacklo_epi64(x, y);
            u[4 * i + 2 * h + 1] = _mm512_unpackhi_epi64(x, y);
        }
    }
    // u[4i + j], lane l: rows 4i..4i+4 of column 4l + j.
    let mut x = [_mm512_setzero_si512(); 16];
    for i in 0..2 {
        for j in 0..4 {
            let (p, q) = (u[8 * i + j], u[8 * i + 4 + j]);
            x[8 * i + j] = _mm512_shuffle_i32x4::<0x88>(p, q);
            x[8 * i + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(p, q);
        }
    }
    // x[8i + j]: lanes (rows 8i..8i+4 of col j, same of col 8 + j, rows 8i+4..8i+8 of col j,
    // same of col 8 + j); x[8i + 4 + j]: the same for columns 4 + j and 12 + j.
    let mut o = [_mm512_setzero_si512(); 16];
    for j in 0..8 {
        let (p, q) = (x[j], x[8 + j]);
        o[j] = _mm512_shuffle_i32x4::<0x88>(p, q);
        o[j + 8] = _mm512_shuffle_i32x4::<0xdd>(p, q);
    }
    o
}
