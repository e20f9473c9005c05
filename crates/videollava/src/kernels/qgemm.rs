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

#[cfg(test)]
mod tests {
    use crate::kernels::{q4k_gemm, q8_gemm};

    /// The message `f` panics with.
    fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let err = std::panic::catch_unwind(f).expect_err("no panic");
        match (err.downcast_ref::<String>(), err.downcast_ref::<&str>()) {
            (Some(s), _) => s.clone(),
            (None, Some(s)) => s.to_string(),
            (None, None) => String::new(),
        }
    }

    /// Each shape mismatch panics with a message that names the function and the problem,
    /// for both formats.
    #[test]
    fn bad_shapes_panic_naming_the_problem() {
        type Gemm = fn(&[f32], usize, &[u8], usize, usize, &mut [f32]);
        let formats: [(Gemm, &str, usize, usize); 2] =
            [(q8_gemm::matmul_q8_0, "matmul_q8_0", 32, 34), (q4k_gemm::matmul_q4k, "matmul_q4k", 256, 144)];
        for (gemm, name, qk, block_bytes) in formats {
            let (m, n, k) = (2, 2, qk);
            // (len of x, len of w, len of out, k, what the message must say)
            let cases = [
                (m * k, n * block_bytes - 1, m * n, k, "expected n*row_bytes".to_string()),
                (m * k - 1, n * block_bytes, m * n, k, "expected m*k".to_string()),
                (m * k, n * block_bytes, m * n - 1, k, "expected m*n".to_string()),
                (m * k / 2, n * block_bytes / 2, m * n, k / 2, format!("is not a multiple of {qk}")),
            ];
            for (x_len, w_len, out_len, k, want) in cases {
                let msg = panic_message(|| gemm(&vec![0.0; x_len], m, &vec![0; w_len], n, k, &mut vec![0.0; out_len]));
                assert!(msg.starts_with(name) && msg.contains(&want), "{name}: {msg:?} lacks {want:?}");
            }
        }
    }
}
