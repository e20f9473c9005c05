//! A linear layer's output finished on 16 lanes (AVX-512): `act(y + bias)` rounded to BF16,
//! the scalar [`super::fused`] `finish`'s operations in its order, so the same bits (a NaN for a
//! NaN: its sign is the compiler's choice in either form).
//!
//! Why: the AMX GEMM finishes each band of its output while in L1 ([`super::bf16_amx`]); for
//! CLIP's `fc1` + `quick_gelu` (2,056 x 4,096 values a layer) the compiler's vectorisation of
//! the scalar form cost about as much as the product itself (an `exp`, a division and three
//! roundings a value).
//!
//! Conventions: `y` f32, `bias` f32 of `y`'s length or empty (none), `out` BF16 of `y`'s length.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::finish;

/// The element-wise function a linear layer's output goes through in the same pass as its
/// rounding ([`super::fused::linear_output_bf16`], the AMX GEMM's store): the output never
/// makes a second trip through memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// The rounded sum itself.
    Identity,
    /// CLIP's `quick_gelu` in BF16, as [`super::fused::quick_gelu`] computes it.
    QuickGelu,
    /// The rounded sum times a factor, rounded again: PyTorch's BF16 `q_proj(x) * scale`.
    Scale(f32),
}

impl Activation {
    /// The fused form of a `hidden_act` name, where there is one.
    pub fn fused(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;
    use half::bf16;

    use super::Activation;
    use crate::kernels::vexp::exp16;

    /// f32 lanes -> BF16 bits in the low half of each 32-bit lane: round to nearest even, a NaN
    /// kept quiet (as `fused::to_bf16_bits`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round_bits(v: __m512) -> __m512i {
        let x = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))));
        let nan = _mm512_cmpgt_epu32_mask(
            _mm512_and_si512(x, _mm512_set1_epi32(0x7FFF_FFFF)),
            _mm512_set1_epi32(0x7F80_0000),
        );
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x0040));
        _mm512_mask_blend_epi32(nan, rounded, quiet)
    }

    /// BF16 bits (low half of each lane) as f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn widen(b: __m512i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(b))
    }

    /// `round(v)` widened back: the value PyTorch's BF16 tensor holds.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round(v: __m512) -> __m512 {
        widen(round_bits(v))
    }

    /// `act` of the rounded sums `v` (already BF16 values), as BF16 bits.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn post(v: __m512, act: Activation) -> __m512i {
        match act {
            Activation::Identity => round_bits(v),
            // `v * sigmoid(1.702 v)`, each of PyTorch's three ops rounded (`quick_gelu_bf16`).
            Activation::QuickGelu => {
                let t = round(_mm512_mul_ps(_mm512_set1_ps(1.702), v));
                // SAFETY: this function's features include exp16's.
                let e = unsafe { exp16(_mm512_sub_ps(_mm512_setzero_ps(), t)) };
                let one = _mm512_set1_ps(1.0);
                let s = round(_mm512_div_ps(one, _mm512_add_ps(one, e)));
                round_bits(_mm512_mul_ps(v, s))
            }
            Activation::Scale(f) => round_bits(_mm512_mul_ps(v, _mm512_set1_ps(f))),
        }
    }

    /// `out = act(round(y + bias))` (no bias: `round(y)`, so that a `-0.0` stays one).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; `bias` is empty or of `y.len()` values;
    /// `out.len() == y.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn finish(y: &[f32], bias: &[f32], act: Activation, out: &mut [bf16]) {
        debug_assert!(out.len() == y.len() && (bias.is_empty() || bias.len() == y.len()));
        let n = y.len();
        let (yp, bp, op) = (y.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let k: __mmask16 = if n - i >= 16 { !0 } else { (1u16 << (n - i)) - 1 };
            // SAFETY: lanes `i..i + popcount(k)` lie inside `y`, `bias` (when not empty) and `out`
            // (caller's contract); masked loads and stores touch no other lane.
            unsafe {
                let mut v = _mm512_maskz_loadu_ps(k, yp.add(i));
                if !bias.is_empty() {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bp.add(i)));
                }
                let bits = post(round(v), act);
                _mm256_mask_storeu_epi16(op.add(i).cast(), k, _mm512_cvtepi32_epi16(bits));
            }
            i += 16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[cfg(test)]
mod tests {
    use crate::kernels::cpu::{self, KernelSet};
    use crate::kernels::fused::{finish_row, Activation};
    use half::bf16;

    /// Every activation, with and without a bias, on ordinary values, ties of the rounding,
    /// signed zeros, denormals, infinities and NaNs, at lengths with and without a tail: the
    /// same bits as the scalar form (a NaN for a NaN). Fails if one rounding is left out or a
    /// step is reordered.
    #[test]
    fn vector_finish_gives_the_scalar_bits() {
        if !cpu::available_sets().contains(&KernelSet::Avx512) {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        let mut y: Vec<f32> = (0..4000).map(|i| ((i * 7919) % 4001) as f32 / 137.0 - 14.6).collect();
        let specials = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
            f32::MIN_POSITIVE,
            3.0e38,
            -3.0e38,
            60.0,
            -60.0,
            100.0,
            -100.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0x7FC1_2345),
            -5.5e-39,
        ];
        for (i, &s) in specials.iter().enumerate() {
            y[i * 13] = s;
        }
        let bias: Vec<f32> = (0..y.len()).map(|j| (j % 97) as f32 / 31.0 - 1.5).collect();
        for len in [y.len(), 3993, 15, 1] {
            for b in [&bias[..len], &[][..]] {
                for act in
                    [Activation::Identity, Activation::QuickGelu, Activation::Scale(0.125), Activation::Scale(0.3)]
                {
                    let mut want = vec![bf16::ZERO; len];
                    finish_row(KernelSet::Portable, &y[..len], b, act, &mut want);
                    let mut got = vec![bf16::ZERO; len];
                    // SAFETY: the CPU has AVX-512 (checked above); lengths match.
                    unsafe { super::finish(&y[..len], b, act, &mut got) };
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        // A NaN's sign follows which operand the compiler put first (LLVM takes
                        // `a * b` as `b * a`): NaN for NaN is all that is asked.
                        let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
                        assert!(same, "{act:?} bias {}: y[{i}] = {:e}: {g} against {w}", !b.is_empty(), y[i]);
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod bench {
    use crate::kernels::cpu::KernelSet;
    use crate::kernels::fused::{finish_row, Activation};
    use half::bf16;

    /// The finish of one band of the AMX GEMM (16 rows of 128 values, in L1) on 16 lanes against
    /// the compiler's vectorisation of the scalar form: nanoseconds per value.
    /// `cargo test --release -p videollava --lib finish16::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn bench_finish() {
        let y: Vec<f32> = (0..2048).map(|i| ((i * 7919) % 4001) as f32 / 400.0 - 5.0).collect();
        let mut out = vec![bf16::ZERO; y.len()];
        for act in [Activation::Identity, Activation::QuickGelu] {
            let mut line = format!("{act:?}:");
            for set in [KernelSet::Avx2, KernelSet::Avx512] {
                let reps = 20_000;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    for (yr, or) in y.chunks(128).zip(out.chunks_mut(128)) {
                        finish_row(set, yr, &[], act, or);
                    }
                    std::hint::black_box(&mut out);
                }
                line += &format!(" {set} {:.3} ns", t.elapsed().as_secs_f64() * 1e9 / (reps * y.len()) as f64);
            }
            eprintln!("{line} per value");
        }
    }
}
