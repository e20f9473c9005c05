//! Test helpers shared by the kernel tests: deterministic value streams and the kernel-set
//! loops.

use super::cpu::{self, KernelSet};

/// Deterministic xorshift stream.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Deterministic BF16 bit patterns of values in about ±4 (a few exact zeros, no denormals), for
/// the BF16 GEMMs' tests.
pub(crate) fn bf16_values(len: usize, seed: u64) -> Vec<u16> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| {
            let s = rng.next();
            if s.is_multiple_of(17) {
                return 0;
            }
            let f = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0;
            (f.to_bits() >> 16) as u16
        })
        .collect()
}

/// Deterministic f32 values in about ±1, with every 97th value (from the 13th) scaled by `outlier`.
pub(crate) fn values_with_outliers(len: usize, seed: u64, outlier: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..len).map(|i| if i % 97 == 13 { outlier * r.unit() } else { r.unit() }).collect()
}

/// Checks a matrix product `out` (`[m, n]`, row-major) against an f64 reference:
/// `reference(i, j)` gives the exact element and the sum of the magnitudes of its terms, and
/// each element must lie within `1e-5 · Σ |terms| + floor` of it (written so that a NaN fails).
/// `Err` holds the first violation `(i, j, got, want)`.
pub(crate) fn check_gemm(
    out: &[f32],
    m: usize,
    n: usize,
    floor: f64,
    reference: impl Fn(usize, usize) -> (f64, f64),
) -> Result<(), (usize, usize, f32, f64)> {
    assert_eq!(out.len(), m * n, "check_gemm: out is not m * n");
    for i in 0..m {
        for j in 0..n {
            let (want, abs) = reference(i, j);
            let got = out[i * n + j];
            if (got as f64 - want).abs() <= 1e-5 * abs + floor {
                continue;
            }
            return Err((i, j, got, want));
        }
    }
    Ok(())
}

/// Whether forcing [`KernelSet::AvxVnni`] runs the AVX-VNNI forms of the AVX2 kernels on this
/// thread: the CPU has AVX-VNNI and `VIDEOLLAVA_KERNELS` leaves it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn avx_vnni_reachable() -> bool {
    let _g = cpu::force(KernelSet::AvxVnni);
    cpu::features().avx_vnni
}

/// The kernel sets of this CPU above the portable one (the SIMD paths a test must prove).
pub(crate) fn simd_sets() -> Vec<KernelSet> {
    cpu::available_sets().into_iter().filter(|&s| s > KernelSet::Portable).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_gemm_rejects_wrong_and_nan_elements() {
        // out = 1 · 1 + 2 · 2 per element: the terms' magnitudes sum to 5.
        let reference = |_: usize, _: usize| (5.0, 5.0);
        let mut out = vec![5f32; 6];
        assert_eq!(check_gemm(&out, 2, 3, 1e-30, reference), Ok(()));
        out[4] = 5.0 + 1e-4;
        assert_eq!(check_gemm(&out, 2, 3, 1e-30, reference), Err((1, 1, out[4], 5.0)));
        out[4] = f32::NAN;
        assert!(check_gemm(&out, 2, 3, 1e-30, reference).is_err());
    }

    #[test]
    fn streams_are_deterministic_and_bounded() {
        let (a, b) = (values_with_outliers(1000, 7, 4.0), values_with_outliers(1000, 7, 4.0));
        assert_eq!(a, b);
        assert_ne!(a, values_with_outliers(1000, 8, 4.0));
        assert!(a.iter().all(|v| v.abs() <= 4.0));
        assert!(a.iter().enumerate().all(|(i, v)| i % 97 == 13 || v.abs() <= 1.0));
        assert!(a.iter().any(|v| v.abs() > 1.0));
    }
}
