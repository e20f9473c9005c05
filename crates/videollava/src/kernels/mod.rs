//! The CPU kernels: every SIMD and hand-written numerical routine, apart from the model that
//! calls them (as ggml's `ggml-cpu`). The model's blocks reach them through small dispatch
//! functions (`model::linear`, the fused element-wise ops, attention) that fall back to candle's
//! ops on other devices.
//!
//! - [`cpu`]: the one CPU-feature detection, and the switch that forces a lower kernel set;
//! - [`bandwidth`]: the machine's measured memory read bandwidth (what bounds decoding);
//! - [`bf16_gemm`]: BF16 matrix products with f32 accumulation (AVX-512 BF16, portable; on AMX
//!   tiles in `bf16_amx`);
//! - [`qgemv`]: matrix-vector products over GGML Q4K / Q6K / Q8_0 blocks (quantized decoding);
//! - [`q8_gemm`], [`q4k_gemm`]: int8 GEMMs over Q8_0 / Q4K blocks (quantized prefill; shared by
//!   both formats: the entry in `qgemm`, the blocked drivers for AVX-512 VNNI in `qgemm_avx512`
//!   and for AVX2 / AVX-VNNI in `qgemm_avx2`);
//! - [`fused`]: one-pass BF16 element-wise ops (norms, SiLU·up, RoPE, residual adds, linear outputs);
//! - [`attention`]: fused attention with the masking rules applied while scoring;
//! - [`kv_quant`]: the 8-bit key/value format and its decode attention (its softmax on 16 or
//!   8 + 8 lanes in [`softmax`]).
//!
//! Every kernel is checked against a plain reference with each kernel set this CPU has forced in
//! turn ([`cpu::for_each_set`]), so one machine with AVX-512 also proves the lower paths.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

/// Calls `$f::<R>` with the activation row count as a compile-time constant.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! by_rows {
    // `$f::<$g, R>`: a kernel with one more leading const generic.
    ($rows:expr, $f:ident::<$g:tt>($($a:expr),*)) => {
        match $rows {
            1 => $f::<$g, 1>($($a),*),
            2 => $f::<$g, 2>($($a),*),
            3 => $f::<$g, 3>($($a),*),
            4 => $f::<$g, 4>($($a),*),
            5 => $f::<$g, 5>($($a),*),
            6 => $f::<$g, 6>($($a),*),
            7 => $f::<$g, 7>($($a),*),
            8 => $f::<$g, 8>($($a),*),
            _ => unreachable!("rows (1..=8) checked by the caller"),
        }
    };
    ($rows:expr, $f:ident($($a:expr),*)) => {
        match $rows {
            1 => $f::<1>($($a),*),
            2 => $f::<2>($($a),*),
            3 => $f::<3>($($a),*),
            4 => $f::<4>($($a),*),
            5 => $f::<5>($($a),*),
            6 => $f::<6>($($a),*),
            7 => $f::<7>($($a),*),
            8 => $f::<8>($($a),*),
            _ => unreachable!("rows (1..=8) checked by the caller"),
        }
    };
}

// The kernels are the crate's own (the model calls them); the CPU detection, its switch and the
// bandwidth probe are public for `bench` and for callers that report what runs.
pub(crate) mod attention;
pub mod bandwidth;
#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16_amx;
pub(crate) mod bf16_fma;
pub(crate) mod bf16_gemm;
pub mod cpu;
pub(crate) mod fused;
pub(crate) mod kv_quant;
#[cfg(target_arch = "x86_64")]
mod out_ptr;
mod pack_cache;
mod prefetch;
pub(crate) mod q4k_gemm;
pub(crate) mod q8_gemm;
mod qgemm;
#[cfg(target_arch = "x86_64")]
mod qgemm_avx2;
#[cfg(target_arch = "x86_64")]
mod qgemm_avx512;
pub(crate) mod qgemv;
pub(crate) mod softmax;
mod task_grid;
#[cfg(target_arch = "x86_64")]
mod transpose;
pub(crate) mod vexp;

#[cfg(test)]
mod testing;

pub use cpu::{Features, KernelSet};
