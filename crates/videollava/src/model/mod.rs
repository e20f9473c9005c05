//! The model: weights in, logits out.
//!
//! - [`weights`]: safetensors files (single or sharded, any transformers naming) read on demand;
//! - [`clip`]: the CLIP vision towers (image and video);
//! - [`projector`]: the 2-layer GELU projector into the language model's width;
//! - [`linear`]: linear layers (dense, or quantized), dispatching to [`bf16_gemm`], our AVX-512 BF16
//!   GEMM, for BF16 on the CPU;
//! - [`qgemv`]: our matrix-vector kernel over GGML Q4K/Q6K/Q8_0 blocks (quantized decoding);
//! - [`q8_gemm`], [`q4k_gemm`]: our AVX-512 VNNI int8 GEMMs over Q8_0 / Q4K blocks (quantized prefill);
//! - [`quantize`]: 8-bit and 4-bit weights for the language model's linear layers (`--quantize`);
//! - [`fused`]: one-pass BF16 element-wise kernels (norms, SiLU·up, residual adds, linear outputs);
//! - [`kv_quant`]: the 8-bit key/value cache (`--kv-cache q8_0`) and its decode attention;
//! - [`feature_cache`]: projected visual features kept by pixel content across requests;
//! - [`llama`]: the Llama / Mistral decoder with its KV cache;
//! - [`video_llava`]: the whole `VideoLlavaForConditionalGeneration`: features merged into the
//!   placeholder positions, then the decoder.

pub mod attention;
pub mod bf16_gemm;
pub mod clip;
pub mod feature_cache;
pub mod fused;
pub mod kv_quant;
pub mod linear;
pub mod llama;
pub mod projector;
pub mod q4k_gemm;
pub mod q8_gemm;
pub mod qgemv;
pub mod quantize;
pub mod video_llava;
pub mod weights;

pub use kv_quant::KvCacheFormat;
pub use quantize::{QuantCache, QuantFormat, QuantizeReport};
pub use video_llava::{ForwardInput, ForwardOutput, LoadOptions, LogitsSelection, VideoLlava};
