//! The model: weights in, logits out.
//!
//! - [`weights`]: safetensors files (single or sharded, any transformers naming) read on demand;
//! - [`activation`]: the activation functions configs name;
//! - [`clip`]: the CLIP vision towers (image and video);
//! - [`projector`]: the 2-layer GELU projector into the language model's width;
//! - [`ops`]: the operations the blocks call (norms, RoPE, gated activation, attention), each
//!   running a fused CPU kernel where one applies and candle's op elsewhere;
//! - [`linear`]: linear layers (dense, memory-mapped or quantized), dispatching to the kernels of
//!   [`crate::kernels`] on the CPU;
//! - [`quantize`]: 8-bit and 4-bit weights for the language model's linear layers (`--quantize`);
//! - [`kv_cache`]: one layer's key/value buffers, in the compute dtype or 8-bit (`--kv-cache q8_0`);
//! - [`feature_cache`]: projected visual features kept by pixel content across requests;
//! - [`llama`]: the Llama / Mistral decoder with its KV cache;
//! - [`video_llava`]: the whole `VideoLlavaForConditionalGeneration`: features merged into the
//!   placeholder positions, then the decoder.

pub mod activation;
pub mod clip;
pub mod feature_cache;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod ops;
pub mod prefix_cache;
pub mod projector;
pub mod quantize;
pub mod video_llava;
pub mod weights;

pub use crate::kernels::kv_quant::KvCacheFormat;
pub use quantize::{QuantCache, QuantFormat, QuantizeReport};
pub use video_llava::{ForwardInput, ForwardOutput, LoadOptions, LogitsSelection, VideoLlava};
