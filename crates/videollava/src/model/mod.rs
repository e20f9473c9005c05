//! The model: weights in, logits out.
//!
//! - [`weights`]: safetensors files (single or sharded, any transformers naming) memory-mapped;
//! - [`clip`]: the CLIP vision towers (image and video);
//! - [`projector`]: the 2-layer GELU projector into the language model's width;
//! - [`linear`]: linear layers, with our own BF16 matrix-vector kernel for decoding;
//! - [`llama`]: the Llama / Mistral decoder with its KV cache;
//! - [`video_llava`]: the whole `VideoLlavaForConditionalGeneration`: features merged into the
//!   placeholder positions, then the decoder.

pub mod clip;
pub mod linear;
pub mod llama;
pub mod projector;
pub mod video_llava;
pub mod weights;

pub use video_llava::{ForwardInput, ForwardOutput, LogitsSelection, VideoLlava};
