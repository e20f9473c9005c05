//! The CPU kernels: every SIMD and hand-written numerical routine, apart from the model that
//! calls them (as ggml's `ggml-cpu`). The model's blocks reach them through small dispatch
//! functions (`model::linear`, the fused element-wise ops, attention) that fall back to candle's
//! ops on other devices.
//!
//! - [`cpu`]: the one CPU-feature detection, and the switch that forces a lower kernel set;
//! - [`bandwidth`]: the machine's measured memory read bandwidth (what bounds decoding);
//! - [`bf16_gemm`]: BF16 matrix products with f32 accumulation (AVX-512 BF16, portable);
//! - [`qgemv`]: matrix-vector products over GGML Q4K / Q6K / Q8_0 blocks (quantized decoding);
//! - [`q8_gemm`], [`q4k_gemm`]: int8 GEMMs over Q8_0 / Q4K blocks (AVX-512 VNNI; quantized prefill);
//! - [`fused`]: one-pass BF16 element-wise ops (norms, SiLU·up, RoPE, residual adds, linear outputs);
//! - [`attention`]: fused attention with the masking rules applied while scoring;
//! - [`kv_quant`]: the 8-bit key/value format and its decode attention.
//!
//! Every kernel is checked against a plain reference with each kernel set this CPU has forced in
//! turn ([`cpu::for_each_set`]), so one machine with AVX-512 also proves the lower paths.

#![allow(unsafe_op_in_unsafe_fn)]

pub mod attention;
pub mod bandwidth;
pub mod bf16_gemm;
pub mod cpu;
pub mod fused;
pub mod kv_quant;
pub mod q4k_gemm;
pub mod q8_gemm;
pub mod qgemv;

pub use cpu::{Features, KernelSet};
