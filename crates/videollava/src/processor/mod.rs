//! The processor: prompts and media in, the tensors the model takes out.
//!
//! Equal to transformers' `VideoLlavaProcessor` (reference-spec §4, the expanding behaviour of
//! 4.47+): every `<image>` becomes `(H/p)(W/p) + 1` placeholder tokens (minus 1 under strategy
//! `default`), every `<video>` becomes `((H/p)(W/p) + 1) * frames`; media are consumed in the order
//! of their placeholders across the whole batch; batches are padded with the pad token on the
//! tokenizer's padding side (left for Video-LLaVA) with an attention mask.

pub mod chat;
pub mod image_processor;
pub mod prompt;
pub mod resize;
pub mod tokenizer;

use std::path::Path;

pub use crate::batch_feature::{PixelTensor, ProcessorOutput};
use crate::config::{CheckpointConfig, FeatureSelectStrategy, ProcessorConfig};
use crate::error::{Error, Result};
use crate::media::{RgbImage, Video};
use image_processor::{ImageProcessor, ProcessedImage};
use tokenizer::{PaddingSide, TextTokenizer};

/// Tokenizer, image processor and placeholder rules of one checkpoint.
#[derive(Debug, Clone)]
pub struct Processor {
    pub tokenizer: TextTokenizer,
    pub image_processor: ImageProcessor,
    /// The per-frame steps of the video processor (the image processor's settings unless the
    /// checkpoint has a video processor config of its own).
    pub video_processor: ImageProcessor,
    /// Frames per video the checkpoint's video processor asks for (5.x `do_sample_frames` with
    /// `num_frames`); `None` leaves the choice to the caller.
    pub num_frames: Option<usize>,
    pub config: ProcessorConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub pad_token_id: Option<u32>,
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

impl Processor {
    /// Loads the processor of checkpoint directory `dir` (its JSON files and tokenizer).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = CheckpointConfig::from_dir(dir)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        Self::new(&config, tokenizer)
    }

    /// Builds the processor from parsed config files and a tokenizer, checking they agree.
    pub fn new(config: &CheckpointConfig, tokenizer: TextTokenizer) -> Result<Self> {
        let image_processor = ImageProcessor::new(config.image_processor.clone())
            .map_err(|e| Error::config(config.dir.join("preprocessor_config.json"), "", e.to_string()))?;
        let video_processor = ImageProcessor::new(config.video_processor.frame.clone())
            .map_err(|e| Error::config(config.dir.join("processor_config.json"), "video_processor", e.to_string()))?;
        let pc = config.processor.clone();
        let token_id = |token: &str, expected: u32, field: &str| -> Result<u32> {
            let id = tokenizer.token_to_id(token).ok_or_else(|| {
                Error::config(
                    config.dir.join("tokenizer.json"),
                    "",
                    format!("placeholder token `{token}` is not in the vocabulary"),
                )
            })?;
            if id != expected {
                return Err(Error::config(
                    config.dir.join("config.json"),
                    field,
                    format!("is {expected} but the tokenizer gives `{token}` id {id}"),
                ));
            }
            Ok(id)
        };
        let image_token_id = token_id(&pc.image_token, config.model.image_token_id, "image_token_index")?;
        let video_token_id = token_id(&pc.video_token, config.model.video_token_id, "video_token_index")?;
        let pad_token_id = tokenizer.pad_token_id.or(config.model.pad_token_id);
        Ok(Self {
            tokenizer,
            image_processor,
            video_processor,
            num_frames: config.video_processor.default_num_frames(),
            config: pc,
            image_token_id,
            video_token_id,
            pad_token_id,
        })
    }

    /// Placeholder tokens for one image of processed size `height` x `width`.
    pub fn image_token_count(&self, height: usize, width: usize) -> usize {
        let p = self.config.patch_size;
        let n = (height / p) * (width / p) + self.config.num_additional_image_tokens;
        match self.config.vision_feature_select_strategy {
            FeatureSelectStrategy::Default => n.saturating_sub(1),
            FeatureSelectStrategy::Full => n,
        }
    }

    /// Placeholder tokens for one video of `frames` frames of processed size `height` x `width`.
    pub fn video_token_count(&self, frames: usize, height: usize, width: usize) -> usize {
        let p = self.config.patch_size;
        ((height / p) * (width / p) + self.config.num_additional_image_tokens) * frames
    }

    /// Preprocesses images (in placeholder order) into `[N, 3, H, W]`; all must come out one size.
    pub fn preprocess_images(&self, images: &[RgbImage]) -> Result<Option<PixelTensor>> {
        let processed = self.run_image_processor(&self.image_processor, images.iter().collect())?;
        let Some(first) = processed.first() else { return Ok(None) };
        let (h, w) = (first.height, first.width);
        let mut data = Vec::with_capacity(processed.len() * 3 * h * w);
        for (i, p) in processed.iter().enumerate() {
            if (p.height, p.width) != (h, w) {
                return Err(Error::Input(format!(
                    "image #{} preprocesses to {}x{} but image #1 to {w}x{h}: all images of a batch must have one size \
                     (enable do_resize/do_center_crop in preprocessor_config.json)",
                    i + 1,
                    p.width,
                    p.height
                )));
            }
            data.extend_from_slice(&p.data);
        }
        Ok(Some(PixelTensor { shape: vec![processed.len(), 3, h, w], data }))
    }

    /// Preprocesses videos (in placeholder order) into `[M, T, 3, H, W]`; all must share T, H, W.
    pub fn preprocess_videos(&self, videos: &[Video]) -> Result<Option<PixelTensor>> {
        let Some(first) = videos.first() else { return Ok(None) };
        let t = first.frames.len();
        for (i, v) in videos.iter().enumerate() {
            if v.frames.len() != t {
                return Err(Error::Input(format!(
                    "video #{} has {} but video #1 has {}: all videos of a batch need the same frame count",
                    i + 1,
                    plural(v.frames.len(), "frame"),
                    plural(t, "frame")
                )));
            }
        }
        let frames: Vec<&RgbImage> = videos.iter().flat_map(|v| v.frames.iter()).collect();
        let processed = self.run_image_processor(&self.video_processor, frames)?;
        let (h, w) = (processed[0].height, processed[0].width);
        let mut data = Vec::with_capacity(processed.len() * 3 * h * w);
        for p in &processed {
            if (p.height, p.width) != (h, w) {
                return Err(Error::Input(format!(
                    "video frames preprocess to different sizes ({}x{} and {w}x{h}): enable do_resize/do_center_crop",
                    p.width, p.height
                )));
            }
            data.extend_from_slice(&p.data);
        }
        Ok(Some(PixelTensor { shape: vec![videos.len(), t, 3, h, w], data }))
    }

    /// Runs `processor` (the image or the video frame processor) over `images` on up to `available_parallelism` threads.
    fn run_image_processor(&self, processor: &ImageProcessor, images: Vec<&RgbImage>) -> Result<Vec<ProcessedImage>> {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(images.len().max(1));
        if threads <= 1 {
            return images.iter().map(|im| processor.preprocess(im)).collect();
        }
        let chunk = images.len().div_ceil(threads);
        let results: Vec<Result<Vec<ProcessedImage>>> = std::thread::scope(|s| {
            let handles: Vec<_> = images
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().map(|im| processor.preprocess(im)).collect()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::Input("image processor thread panicked".into()))))
                .collect()
        });
        let mut out = Vec::with_capacity(images.len());
        for r in results {
            out.extend(r?);
        }
        Ok(out)
    }

    /// Processes a batch: `prompts` hold `<image>` / `<video>` placeholders, consumed in order
    /// across the whole batch by `images` and `videos`.
    pub fn process(&self, prompts: &[&str], images: &[RgbImage], videos: &[Video]) -> Result<ProcessorOutput> {
        self.process_inner(prompts, images, videos, true)
    }

    /// Like [`Processor::process`] but without the tokenizer's special tokens (no BOS): text that
    /// continues a conversation already in the model's cache.
    pub fn process_continuation(
        &self,
        prompts: &[&str],
        images: &[RgbImage],
        videos: &[Video],
    ) -> Result<ProcessorOutput> {
        self.process_inner(prompts, images, videos, false)
    }

    fn process_inner(
        &self,
        prompts: &[&str],
        images: &[RgbImage],
        videos: &[Video],
        add_special_tokens: bool,
    ) -> Result<ProcessorOutput> {
        if prompts.is_empty() {
            return Err(Error::Input("no prompt given".into()));
        }
        let image_token = self.config.image_token.as_str();
        let video_token = self.config.video_token.as_str();
        let n_image_ph: usize = prompts.iter().map(|p| p.matches(image_token).count()).sum();
        let n_video_ph: usize = prompts.iter().map(|p| p.matches(video_token).count()).sum();
        check_count(n_image_ph, images.len(), image_token, "image")?;
        check_count(n_video_ph, videos.len(), video_token, "video")?;

        let pixel_values_images = self.preprocess_images(images)?;
        let pixel_values_videos = self.preprocess_videos(videos)?;

        let image_tokens_per_item = match &pixel_values_images {
            Some(t) => self.image_token_count(t.shape[2], t.shape[3]),
            None => 0,
        };
        let video_tokens_per_item = match &pixel_values_videos {
            Some(t) => self.video_token_count(t.shape[1], t.shape[3], t.shape[4]),
            None => 0,
        };
        if pixel_values_images.is_some() && image_tokens_per_item == 0 {
            return Err(Error::Input(format!(
                "images preprocess to a size smaller than one {}-pixel patch: no visual tokens",
                self.config.patch_size
            )));
        }

        let mut rows = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let mut text = prompt.to_string();
            if image_tokens_per_item > 0 {
                text = text.replace(image_token, &image_token.repeat(image_tokens_per_item));
            }
            if video_tokens_per_item > 0 {
                text = text.replace(video_token, &video_token.repeat(video_tokens_per_item));
            }
            rows.push(self.tokenizer.encode(&text, add_special_tokens)?);
        }

        // The tokenizer must have turned every placeholder string into exactly one token.
        let count = |id: u32| rows.iter().map(|r| r.iter().filter(|&&t| t == id).count()).sum::<usize>();
        let (got_img, want_img) = (count(self.image_token_id), images.len() * image_tokens_per_item);
        let (got_vid, want_vid) = (count(self.video_token_id), videos.len() * video_tokens_per_item);
        if got_img != want_img || got_vid != want_vid {
            return Err(Error::Input(format!(
                "the tokenizer produced {got_img} image and {got_vid} video placeholder tokens, expected {want_img} and {want_vid}: \
                 the placeholder strings must be special tokens of the tokenizer"
            )));
        }

        let seq_len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let needs_pad = rows.iter().any(|r| r.len() != seq_len);
        let pad = match self.pad_token_id {
            Some(p) => p,
            None if !needs_pad => 0,
            None => {
                return Err(Error::Input(
                    "prompts of different lengths need padding, but the tokenizer defines no pad token".into(),
                ))
            }
        };
        let mut input_ids = Vec::with_capacity(rows.len() * seq_len);
        let mut attention_mask = Vec::with_capacity(rows.len() * seq_len);
        for row in &rows {
            let n_pad = seq_len - row.len();
            let pads = std::iter::repeat_n(pad as i64, n_pad);
            let zeros = std::iter::repeat_n(0i64, n_pad);
            let ids = row.iter().map(|&t| t as i64);
            let ones = std::iter::repeat_n(1i64, row.len());
            match self.tokenizer.padding_side {
                PaddingSide::Left => {
                    input_ids.extend(pads.chain(ids));
                    attention_mask.extend(zeros.chain(ones));
                }
                PaddingSide::Right => {
                    input_ids.extend(ids.chain(pads));
                    attention_mask.extend(ones.chain(zeros));
                }
            }
        }

        Ok(ProcessorOutput {
            batch_size: rows.len(),
            seq_len,
            input_ids,
            attention_mask,
            pixel_values_images,
            pixel_values_videos,
            image_tokens_per_item,
            video_tokens_per_item,
        })
    }

    /// Text of `ids` (transformers' `decode`), skipping special tokens on request.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens)
    }
}

fn check_count(placeholders: usize, items: usize, token: &str, what: &str) -> Result<()> {
    if placeholders == items {
        return Ok(());
    }
    let given = match items {
        0 => format!("no {what} was given"),
        1 => format!("1 {what} was given"),
        n => format!("{n} {what}s were given"),
    };
    Err(Error::Input(format!(
        "the prompts hold {} but {given}: each {what} needs exactly one {token} placeholder",
        plural(placeholders, &format!("{token} placeholder")),
    )))
}
