//! # videollava
//!
//! A native engine for Video-LLaVA (`VideoLlavaForConditionalGeneration`). Data flows through the
//! modules in this order:
//!
//! - [`config`]: the checkpoint's Hugging Face JSON files, with transformers' defaults filled in;
//! - [`media`]: decoding images and videos to RGB u8 and choosing video frames;
//! - [`processor`]: pixels (a Pillow-exact image processor), prompt expansion, tokens, batches;
//! - [`batch_feature`]: what the processor hands the model (token ids, mask, pixel values);
//! - [`model`]: the CLIP towers, projector and Llama/Mistral decoder: weights in, logits out;
//! - [`generate`]: KV cache, sampling, stopping, streaming;
//! - [`engine`]: one loaded checkpoint that the CLI and the server drive;
//! - [`hub`]: `--model` as a local directory or a Hugging Face hub id;
//! - [`kernels`]: the CPU kernels (GEMMs, matrix-vector products, attention, fused element-wise
//!   ops) under the model, with one CPU-feature detection.
//! - [`batch`]: manifests, shards and results files of offline batch runs.

pub mod batch;
pub mod batch_feature;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod hub;
pub mod huge_pages;
pub mod kernels;
pub mod mapped;
pub mod media;
pub mod model;
pub mod processor;

pub use candle_core::{DType, Device};
pub use engine::{DTypeChoice, Engine, EngineBuilder, StageTimings};
pub use error::{Error, Result};
pub use generate::{FinishReason, GenerateOptions, GeneratedSequence, SamplingParams, TokenEvent};
pub use media::{RgbImage, Video};
pub use model::{KvCacheFormat, QuantCache, QuantFormat};
