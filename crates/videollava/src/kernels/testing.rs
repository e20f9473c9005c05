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

/// Deterministic f32 values in about ±1, with every 97th value (from the 13th) scaled by `outlier`.
pub(crate) fn values_with_outliers(len: usize, seed: u64, outlier: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..len).map(|i| if i % 97 == 13 { outlier * r.unit() } else { r.unit() }).collect()
}

/// The kernel sets of this CPU above the portable one (the SIMD paths a test must prove).
pub(crate) fn simd_sets() -> Vec<KernelSet> {
    cpu::available_sets().into_iter().filter(|&s| s > KernelSet::Portable).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
