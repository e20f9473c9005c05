//! Everything the bindings ask of the `videollava` library, in one place: loading, prompts,
//! media decoding, preprocessing and generation. No Python types here (see `lib.rs`), so a change
//! of the library's API is adapted in this file alone.
//!
//! Conventions: pixels are 8-bit RGB, row-major HWC (`[height, width, 3]`); a clip is `T` such
//! frames of one size. Times are milliseconds.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use videollava::engine::{DTypeChoice, Engine};
use videollava::generate::GenerateOptions;
use videollava::hub::{resolve_model, HubOptions};
use videollava::media::image::{decode_image_bytes, decode_image_file};
use videollava::media::video::{decode_video_bytes, decode_video_file, FrameSampling};
use videollava::media::MediaLimits;
use videollava::media::{RgbImage, Video};
use videollava::model::{KvCacheFormat, QuantCache, QuantFormat};

// The library types `lib.rs` handles, named here so that it uses nothing else of the library.
pub use videollava::engine::StageTimings;
pub use videollava::generate::SamplingParams;
pub use videollava::hub::DEFAULT_MODEL;
pub use videollava::media::video::VideoOptions;
pub use videollava::media::Cancel;
pub use videollava::processor::{Processor, ProcessorOutput};
pub use videollava::{Error, Result};

/// Most frames a caller-supplied clip may have (the checkpoints use 8).
pub const MAX_FRAMES: usize = 1024;

/// How to load a checkpoint (the keyword arguments of `VideoLlava.from_pretrained`).
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Checkpoint directory or hub id (`org/name[@revision]`).
    pub model: String,
    pub dtype: String,
    pub quantize: Option<String>,
    /// `None`: the default cache directory; `"off"`: no cache; else a directory.
    pub quantized_cache: Option<String>,
    pub mmap: bool,
    pub kv_cache: String,
    pub feature_cache_mib: usize,
    pub prefill_chunk: Option<usize>,
}

/// Resolves a checkpoint directory or hub id to a local directory (downloads when needed).
pub fn resolve(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let mut hub = HubOptions::from_env();
    // Progress bars would write over a notebook's or a log's output.
    hub.progress = false;
    resolve_model(model, &hub)
}

/// A loaded checkpoint.
pub struct Model {
    engine: Engine,
}

impl Model {
    /// Resolves and loads `config.model` on the CPU.
    pub fn load(config: &LoadConfig) -> Result<Self> {
        let dtype = DTypeChoice::from_str(&config.dtype)?;
        let quantize = config.quantize.as_deref().map(QuantFormat::from_str).transpose()?;
        let kv_cache = KvCacheFormat::from_str(&config.kv_cache)?;
        let cache = match config.quantized_cache.as_deref() {
            None => QuantCache::Default,
            Some("off") => QuantCache::Off,
            Some(dir) => QuantCache::Dir(PathBuf::from(dir)),
        };
        let dir = resolve(&config.model)?;
        let mut engine = Engine::load_quantized(&dir, dtype, quantize, cache, config.mmap, &candle_core::Device::Cpu)?;
        engine.model().set_feature_cache_capacity(config.feature_cache_mib << 20);
        engine.model_mut().set_kv_cache_format(kv_cache);
        if let Some(n) = config.prefill_chunk {
            engine.model_mut().set_prefill_chunk(n);
        }
        Ok(Self { engine })
    }

    pub fn processor(&self) -> &Processor {
        self.engine.processor()
    }

    pub fn model_dir(&self) -> &Path {
        self.engine.model_dir()
    }

    pub fn load_ms(&self) -> f64 {
        self.engine.load_ms()
    }

    /// The prompt for `text`: verbatim when it already holds the chat format's turns (the
    /// library's rule, [`Engine::prompt_for`], as `videollava generate`, `chat` and `batch`);
    /// else the checkpoint's chat format around it, with one placeholder per image and per video
    /// unless the text places them itself.
    pub fn chat_prompt(&self, text: &str, images: usize, videos: usize) -> Result<String> {
        let prompt = self.engine.prompt_for(text, images, videos)?;
        if prompt == text {
            return Ok(prompt);
        }
        let config = &self.engine.processor().config;
        if text.contains(&config.image_token) || text.contains(&config.video_token) {
            return self.engine.question_prompt(text, 0, 0);
        }
        Ok(prompt)
    }

    /// The checkpoint's defaults (EOS ids, `max_new_tokens`) with the caller's settings on top.
    pub fn options(&self, settings: &Settings) -> Result<GenerateOptions> {
        settings.sampling.validate().map_err(Error::Input)?;
        if settings.top_logprobs > 20 {
            return Err(Error::Input(format!("top_logprobs must be at most 20, got {}", settings.top_logprobs)));
        }
        let mut options = self.engine.default_options();
        if let Some(n) = settings.max_new_tokens {
            options.max_new_tokens = n;
        }
        options.sampling = settings.sampling.clone();
        options.stop_strings = settings.stop.clone();
        options.ignore_eos = settings.ignore_eos;
        options.top_logprobs = settings.top_logprobs;
        Ok(options)
    }

    /// Generates for every prompt of the batch (prompts already in the chat format; media in
    /// placeholder order across the batch). `on_token(row, text_delta)` sees every token, with
    /// the text that became final (often empty). Once `cancel` is set it stops before the next
    /// decode step with [`Error::Cancelled`].
    pub fn generate(
        &self,
        prompts: &[String],
        images: &[RgbImage],
        videos: &[Video],
        options: &GenerateOptions,
        cancel: &Cancel,
        on_token: &mut dyn FnMut(usize, &str),
    ) -> Result<(Vec<Generated>, StageTimings)> {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let (seqs, timings) = self
            .engine
            .generate_cancellable(&refs, images, videos, options, cancel, &mut |ev| on_token(ev.row, ev.text_delta))?;
        let tok = self.engine.tokenizer();
        let out = seqs
            .into_iter()
            .map(|s| Generated {
                top_logprobs: s
                    .top_logprobs
                    .iter()
                    .map(|alts| {
                        alts.iter().map(|&(id, lp)| (id, tok.decode(&[id], false).unwrap_or_default(), lp)).collect()
                    })
                    .collect(),
                text: s.text,
                token_ids: s.token_ids,
                logprobs: s.logprobs,
                finish_reason: s.finish_reason.as_str(),
                prompt_tokens: s.prompt_tokens,
            })
            .collect();
        Ok((out, timings))
    }
}

/// Generation settings of one call.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `None`: the checkpoint's `generation_config.json`, else 256.
    pub max_new_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub top_logprobs: usize,
}

/// The result for one prompt.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Per generated token: the most likely alternatives as (id, token text, log-probability).
    pub top_logprobs: Vec<Vec<(u32, String, f32)>>,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
}

/// The processor of a checkpoint directory or hub id (no weights needed).
pub fn load_processor(model: &str) -> Result<Processor> {
    Processor::from_dir(&resolve(model)?)
}

/// transformers' processor call: prompts verbatim, media in placeholder order.
pub fn process(
    processor: &Processor,
    prompts: &[String],
    images: &[RgbImage],
    videos: &[Video],
) -> Result<ProcessorOutput> {
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    processor.process(&refs, images, videos)
}

/// One image or video as it arrives from Python.
#[derive(Debug)]
pub enum Medium {
    /// A file.
    Path(PathBuf),
    /// An encoded file in memory (JPEG, PNG, MP4, ...).
    Encoded(Vec<u8>),
    /// Decoded pixels: `shape` is `[H, W, 3]` (an image) or `[T, H, W, 3]` (a clip), u8 HWC.
    Pixels { shape: Vec<usize>, data: Vec<u8> },
}

/// How a video file becomes a clip (`num_frames` frames chosen by `frame_sampling`).
pub fn video_options(num_frames: usize, frame_sampling: &str) -> Result<VideoOptions> {
    if num_frames == 0 || num_frames > MAX_FRAMES {
        return Err(Error::Input(format!("num_frames must be in 1..={MAX_FRAMES}, got {num_frames}")));
    }
    Ok(VideoOptions { num_frames, sampling: FrameSampling::from_str(frame_sampling)? })
}

/// Checks an `[H, W]` size against the decoders' limits.
fn check_size(height: usize, width: usize, name: &str) -> Result<()> {
    MediaLimits::default().check_size(name, "image", width as u64, height as u64)
}

/// Wraps `[H, W, 3]` u8 pixels.
fn pixels_to_image(height: usize, width: usize, data: Vec<u8>, name: &str) -> Result<RgbImage> {
    check_size(height, width, name)?;
    RgbImage::new(width, height, data).map_err(|e| Error::media(name, e.to_string()))
}

/// Decodes an image; `name` names it in errors (e.g. `image #2`).
pub fn decode_image(medium: Medium, name: &str) -> Result<RgbImage> {
    match medium {
        Medium::Path(p) => decode_image_file(&p),
        Medium::Encoded(bytes) => decode_image_bytes(&bytes, name),
        Medium::Pixels { shape, data } => match shape[..] {
            [h, w, 3] => pixels_to_image(h, w, data, name),
            _ => Err(Error::media(name, format!("an image array must have shape (H, W, 3), got {shape:?}"))),
        },
    }
}

/// Decodes a video into a clip. Files and encoded bytes give `options.num_frames` frames chosen
/// by `options.sampling`; caller-supplied frames are the clip as they are. `cancel` stops the
/// decoding of encoded bytes early.
pub fn decode_video(medium: Medium, options: &VideoOptions, name: &str, cancel: &Cancel) -> Result<Video> {
    match medium {
        Medium::Path(p) => decode_video_file(&p, options),
        // FFmpeg reads the bytes from memory (no temporary file).
        Medium::Encoded(bytes) => decode_video_bytes(bytes.into(), name, options, &MediaLimits::default(), cancel),
        Medium::Pixels { shape, data } => match shape[..] {
            [t, h, w, 3] => {
                if t == 0 || t > MAX_FRAMES {
                    return Err(Error::media(name, format!("a clip must have 1..={MAX_FRAMES} frames, got {t}")));
                }
                check_size(h, w, name)?;
                let frame_len = h * w * 3;
                if data.len() != t * frame_len {
                    return Err(Error::media(
                        name,
                        format!("buffer holds {} bytes, expected {t}x{h}x{w}x3 = {}", data.len(), t * frame_len),
                    ));
                }
                let frames = data
                    .chunks_exact(frame_len)
                    .map(|f| pixels_to_image(h, w, f.to_vec(), name))
                    .collect::<Result<Vec<_>>>()?;
                Video::from_frames(frames).map_err(|e| Error::media(name, e.to_string()))
            }
            _ => Err(Error::media(name, format!("a video array must have shape (T, H, W, 3), got {shape:?}"))),
        },
    }
}

/// Decodes the images and videos of a call; returns them with the time taken (ms).
pub fn decode_media(
    images: Vec<Medium>,
    videos: Vec<Medium>,
    options: &VideoOptions,
    cancel: &Cancel,
) -> Result<(Vec<RgbImage>, Vec<Video>, f64)> {
    let t = Instant::now();
    let images = images
        .into_iter()
        .enumerate()
        .map(|(i, m)| decode_image(m, &format!("image #{}", i + 1)))
        .collect::<Result<Vec<_>>>()?;
    let videos = videos
        .into_iter()
        .enumerate()
        .map(|(i, m)| decode_video(m, options, &format!("video #{}", i + 1), cancel))
        .collect::<Result<Vec<_>>>()?;
    Ok((images, videos, t.elapsed().as_secs_f64() * 1e3))
}
