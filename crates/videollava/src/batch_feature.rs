//! The processor's output and the model's input: transformers' `BatchFeature`, plain row-major
//! buffers that neither side owns (the processor fills them, the model reads them; the pixel
//! buffers' bytes also key the feature and prefix caches).

/// A dense f32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// What the processor returns for a batch: transformers' `BatchFeature`.
///
/// - `input_ids`, `attention_mask`: `[batch, seq_len]`, row-major, padded.
/// - `pixel_values_images`: F32 `[num_images, 3, H, W]`, images in placeholder order.
/// - `pixel_values_videos`: F32 `[num_videos, frames, 3, H, W]`, videos in placeholder order.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorOutput {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub pixel_values_images: Option<PixelTensor>,
    pub pixel_values_videos: Option<PixelTensor>,
    /// Placeholder tokens per image and per video.
    pub image_tokens_per_item: usize,
    pub video_tokens_per_item: usize,
}

impl ProcessorOutput {
    /// Row `b` of `input_ids`.
    pub fn ids(&self, b: usize) -> &[i64] {
        &self.input_ids[b * self.seq_len..(b + 1) * self.seq_len]
    }
    /// Row `b` of `attention_mask`.
    pub fn mask(&self, b: usize) -> &[i64] {
        &self.attention_mask[b * self.seq_len..(b + 1) * self.seq_len]
    }
}
