//! The entry of the int8 GEMMs ([`super::q8_gemm`], [`super::q4k_gemm`]): the shape checks and
//! the choice of path, shared by both weight formats (each brings a [`QGemm`]).
//!
//! Conventions as in those modules: `x` f32 `[m, k]`, row-major; `w` the weight `[n, k]` as raw
//! GGML blocks (row `j` is bytes `[j * row_bytes, (j + 1) * row_bytes)`, `row_bytes = k /
//! BLOCK_VALUES * BLOCK_BYTES`); `out` f32 `[m, n]`, row-major, overwritten:
//! `out[i, j] = Σ_p x[i, p] · W[j, p]`.

use super::qgemv::Kernel;

/// One weight format of the int8 GEMMs: its block shape and its paths. Every path gets
/// `m >= 1`, `n >= 1`, `k` a positive multiple of [`Self::BLOCK_VALUES`] and slices that match
/// the shapes (checked by [`matmul`]).
pub(crate) trait QGemm {
    /// The public function's name (for the panic messages).
    const NAME: &'static str;
    /// Values per block.
    const BLOCK_VALUES: usize;
    /// Bytes per block.
    const BLOCK_BYTES: usize;

    /// Plain Rust, any CPU.
    fn portable(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]);

    /// `kernels::qgemm_avx2`'s driver, with AVX-VNNI dot products when `vnni`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-VNNI when `vnni`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(vnni: bool, x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]);

    /// `kernels::qgemm_avx512`'s driver.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]);
}

/// Whether the int8 GEMMs use a SIMD path on the calling thread ([`super::cpu::features`]).
pub(crate) fn has_fast_path() -> bool {
    Kernel::detect() != Kernel::Scalar
}

/// `out = x · Wᵀ` for the format `G` on the best path the calling thread may use. With `k == 0`
/// the output is zeros.
///
/// Panics when `k` is not a multiple of the block or a slice length does not match its shape.
pub(crate) fn matmul<G: QGemm>(x: &[f32], m: usize, w: &[u8], n: usize, k: usize, out: &mut [f32]) {
    let (name, qk) = (G::NAME, G::BLOCK_VALUES);
    assert!(k.is_multiple_of(qk), "{name}: k = {k} is not a multiple of {qk}");
    assert!(m.checked_mul(k) == Some(x.len()), "{name}: `x` has {} elements, expected m*k = {m}*{k}", x.len());
    let row_bytes = k / qk * G::BLOCK_BYTES;
    assert!(
        n.checked_mul(row_bytes) == Some(w.len()),
        "{name}: `w` has {} bytes, expected n*row_bytes = {n}*{row_bytes}",
        w.len()
    );
    assert!(m.checked_mul(n) == Some(out.len()), "{name}: `out` has {} elements, expected m*n = {m}*{n}", out.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    match Kernel::detect() {
        Kernel::Scalar => G::portable(x, m, w, n, k, out),
        // SAFETY: Kernel::Avx2 means the CPU has AVX2, FMA and F16C; the shapes are checked above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { G::avx2(false, x, m, w, n, k, out) },
        // SAFETY: Kernel::AvxVnni means AVX2, FMA, F16C and AVX-VNNI; shapes as above.
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => unsafe { G::avx2(true, x, m, w, n, k, out) },
        // SAFETY: Kernel::Avx512 means AVX-512 F/BW/VL/VNNI with AVX2, FMA and F16C; shapes as
        // above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { G::avx512(x, m, w, n, k, out) },
    }
}
