//! The engine: one loaded checkpoint (model + processor) that the CLI and the server drive.
//!
//! It turns requests (prompts plus decoded media) into generated text, timing each stage.
//! [`Scheduler`] serves many requests at once with continuous batching.

pub mod builder;
pub mod scheduler;

pub use builder::EngineBuilder;
pub use scheduler::{
    EngineInfo, GenerationRequest, RequestHandle, RequestTimings, Scheduler, SchedulerConfig, SchedulerStats,
    StreamEvent, SubmitError,
};

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};

use crate::config::CheckpointConfig;
use crate::error::{Error, Result};
use crate::generate::{generate_cancellable, GenerateOptions, GenerateTimings, GeneratedSequence, TokenEvent};
use crate::media::{Cancel, RgbImage, Video};
use crate::model::llama::KvCache;
use crate::model::{LoadOptions, QuantCache, QuantFormat, VideoLlava};
use crate::processor::tokenizer::TextTokenizer;
use crate::processor::{Processor, ProcessorOutput};

/// The compute dtype requested at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// The dtype the checkpoint says it was saved in (`torch_dtype` / `dtype`), else f32.
    #[default]
    Auto,
    F32,
    BF16,
    F16,
}

impl std::str::FromStr for DTypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            other => Err(Error::Input(format!("unknown dtype `{other}` (expected auto, f32, bf16 or f16)"))),
        }
    }
}

impl DTypeChoice {
    /// The concrete dtype for a checkpoint whose config states `saved` (e.g. "bfloat16").
    pub fn resolve(self, saved: Option<&str>) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::BF16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::Auto => match saved {
                Some("bfloat16") => DType::BF16,
                Some("float16") => DType::F16,
                _ => DType::F32,
            },
        }
    }
}

/// Stage timings of one request, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub load_ms: f64,
    pub media_ms: f64,
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

impl StageTimings {
    fn with_generation(mut self, g: &GenerateTimings) -> Self {
        self.vision_ms = g.vision_ms;
        self.prefill_ms = g.prefill_ms;
        self.decode_ms = g.decode_ms;
        self
    }
}

/// A loaded checkpoint: the model, its processor and its configuration.
pub struct Engine {
    model: VideoLlava,
    processor: Processor,
    checkpoint: CheckpointConfig,
    model_dir: PathBuf,
    load_ms: f64,
}

impl Engine {
    /// Options for loading `model` (a checkpoint directory or a hub id); `.load()` loads it.
    pub fn builder(model: impl Into<String>) -> EngineBuilder {
        EngineBuilder::new(model)
    }

    /// Loads the checkpoint directory `dir` (use [`crate::hub::resolve_model`] for hub ids).
    pub fn load(dir: &Path, dtype: DTypeChoice, device: &Device) -> Result<Self> {
        Self::load_quantized(dir, dtype, None, QuantCache::Default, true, device)
    }

    /// Loads `dir`, quantizing the language model's linear layers to `quantize` if given
    /// (see [`crate::model::quantize`]); `mmap`: see [`LoadOptions::mmap`].
    pub fn load_quantized(
        dir: &Path,
        dtype: DTypeChoice,
        quantize: Option<QuantFormat>,
        quant_cache: QuantCache,
        mmap: bool,
        device: &Device,
    ) -> Result<Self> {
        let t = Instant::now();
        let checkpoint = CheckpointConfig::from_dir(dir)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let processor = Processor::new(&checkpoint, tokenizer)?;
        let dtype = dtype.resolve(checkpoint.model.dtype.as_deref());
        let options = LoadOptions { dtype, quantize, quant_cache, mmap };
        let model = VideoLlava::load_with(dir, &options, device)?;
        Ok(Self {
            model,
            processor,
            checkpoint,
            model_dir: dir.to_path_buf(),
            load_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The model (weights, caches of visual features).
    pub fn model(&self) -> &VideoLlava {
        &self.model
    }

    /// The model, to change its run-time settings (KV cache format, prefill chunk).
    pub fn model_mut(&mut self) -> &mut VideoLlava {
        &mut self.model
    }

    /// The processor (image and video pixels, tokenizer, chat format).
    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    /// The checkpoint's configuration files.
    pub fn checkpoint(&self) -> &CheckpointConfig {
        &self.checkpoint
    }

    /// The checkpoint directory.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// Milliseconds the load took.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Saves the keys/values of media prefixes in `dir` and looks them up there, so a question
    /// about a video seen before (by another process, or before a restart) skips its prefill
    /// (`None`: memory only). Files are named and headed by a fingerprint of this checkpoint as
    /// loaded ([`crate::model::prefix_cache::model_fingerprint`]); others are ignored.
    /// The directory is bounded to [`crate::model::prefix_cache::DEFAULT_DIR_BYTES`]; see
    /// [`Self::set_prefix_cache_dir_bounded`].
    pub fn set_prefix_cache_dir(&self, dir: Option<&Path>) -> Result<()> {
        self.set_prefix_cache_dir_bounded(dir, crate::model::prefix_cache::DEFAULT_DIR_BYTES)
    }

    /// [`Self::set_prefix_cache_dir`] with the directory bounded to `max_bytes` of saved
    /// prefixes: the least recently used are deleted after each save while it holds more.
    pub fn set_prefix_cache_dir_bounded(&self, dir: Option<&Path>, max_bytes: u64) -> Result<()> {
        let store = match dir {
            None => None,
            Some(d) => {
                let quant = self.model.quantization.as_ref().and_then(|q| q.format).map(|f| f.name());
                let fingerprint =
                    crate::model::prefix_cache::model_fingerprint(&self.model_dir, self.model.dtype, quant)?;
                Some(crate::model::prefix_cache::PrefixStore::new(d, fingerprint)?.with_max_bytes(max_bytes))
            }
        };
        self.model.set_prefix_store(store);
        Ok(())
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.processor.tokenizer
    }

    /// Default generation options from `generation_config.json` (EOS ids, limits).
    pub fn default_options(&self) -> GenerateOptions {
        let g = &self.checkpoint.generation;
        let mut eos = g.eos_token_ids.clone();
        if let Some(e) = self.tokenizer().eos_token_id {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        GenerateOptions { eos_token_ids: eos, max_new_tokens: g.max_new_tokens.unwrap_or(256), ..Default::default() }
    }

    /// Wraps a plain question in the checkpoint's chat format with `images` `<image>` and
    /// `videos` `<video>` placeholders (images first).
    pub fn question_prompt(&self, question: &str, images: usize, videos: usize) -> Result<String> {
        let tok = self.tokenizer();
        let name = |id: Option<u32>| tok.token_name(id);
        crate::processor::chat::question_prompt(
            tok.chat_template.as_deref(),
            question,
            images,
            videos,
            &name(tok.bos_token_id),
            &name(tok.eos_token_id),
        )
    }

    /// The prompt for a user's `text`: verbatim when it already holds the chat format (the
    /// template's `USER:` / `ASSISTANT:` turns, as the model card writes prompts), otherwise a
    /// question wrapped by [`Self::question_prompt`]. See [`crate::processor::prompt`].
    pub fn prompt_for(&self, text: &str, images: usize, videos: usize) -> Result<String> {
        let tok = self.tokenizer();
        let name = |id: Option<u32>| tok.token_name(id);
        crate::processor::prompt::prompt_for(
            tok.chat_template.as_deref(),
            text,
            images,
            videos,
            &name(tok.bos_token_id),
            &name(tok.eos_token_id),
        )
    }

    /// Whether `text` already holds the checkpoint's chat format (see [`Self::prompt_for`]).
    pub fn is_chat_formatted(&self, text: &str) -> bool {
        let tok = self.tokenizer();
        let name = |id: Option<u32>| tok.token_name(id);
        crate::processor::prompt::is_chat_formatted(
            tok.chat_template.as_deref(),
            text,
            &name(tok.bos_token_id),
            &name(tok.eos_token_id),
        )
    }

    /// Runs the processor over prompts and media (timed as `preprocess`).
    pub fn preprocess(
        &self,
        prompts: &[&str],
        images: &[RgbImage],
        videos: &[Video],
    ) -> Result<(ProcessorOutput, f64)> {
        let t = Instant::now();
        let out = self.processor.process(prompts, images, videos)?;
        Ok((out, t.elapsed().as_secs_f64() * 1e3))
    }

    /// Generates for a batch of prompts; `on_token` sees every token as it is produced.
    pub fn generate(
        &self,
        prompts: &[&str],
        images: &[RgbImage],
        videos: &[Video],
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(TokenEvent),
    ) -> Result<(Vec<GeneratedSequence>, StageTimings)> {
        self.generate_cancellable(prompts, images, videos, options, &Cancel::new(), on_token)
    }

    /// Like [`Engine::generate`], but stops with [`Error::Cancelled`] at the first decode step
    /// after `cancel` is set (a caller that stopped listening: an abandoned stream).
    pub fn generate_cancellable(
        &self,
        prompts: &[&str],
        images: &[RgbImage],
        videos: &[Video],
        options: &GenerateOptions,
        cancel: &Cancel,
        on_token: &mut dyn FnMut(TokenEvent),
    ) -> Result<(Vec<GeneratedSequence>, StageTimings)> {
        let (inputs, preprocess_ms) = self.preprocess(prompts, images, videos)?;
        let mut cache = KvCache::default();
        let (out, g) =
            generate_cancellable(&self.model, self.tokenizer(), &inputs, options, &mut cache, cancel, on_token)?;
        let timings = StageTimings { load_ms: self.load_ms, preprocess_ms, ..Default::default() }.with_generation(&g);
        Ok((out, timings))
    }
}
