//! Arguments and steps the subcommands share: model source, media, dtype, threads.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use videollava::engine::{DTypeChoice, Engine};
use videollava::hub::{resolve_model, HubOptions, DEFAULT_MODEL};
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, FrameSampling, VideoOptions};
use videollava::media::{RgbImage, Video};
use videollava::model::{KvCacheFormat, QuantCache, QuantFormat};

#[derive(Args, Clone)]
pub struct MediaArgs {
    /// Image file, consumed by the `<image>` placeholders in order (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// Video file, consumed by the `<video>` placeholders in order (repeatable).
    #[arg(long = "video", value_name = "PATH")]
    pub videos: Vec<PathBuf>,
    /// Frames taken from each video.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub num_frames: usize,
    /// How frames are chosen: `uniform` (floor(i*total/N), the Hugging Face default) or
    /// `linspace` (the original Video-LLaVA repo: linspace(0, total-1, N)).
    #[arg(long, default_value = "uniform", value_name = "uniform|linspace")]
    pub frame_sampling: FrameSampling,
}

impl MediaArgs {
    pub fn video_options(&self) -> VideoOptions {
        VideoOptions { num_frames: self.num_frames, sampling: self.frame_sampling }
    }

    /// Decodes every image and video; returns them with the time it took (ms).
    pub fn load(&self) -> Result<(Vec<RgbImage>, Vec<Video>, f64)> {
        let t = Instant::now();
        let images = self.images.iter().map(|p| decode_image_file(p)).collect::<videollava::Result<Vec<_>>>()?;
        let options = self.video_options();
        let videos =
            self.videos.iter().map(|p| decode_video_file(p, &options)).collect::<videollava::Result<Vec<_>>>()?;
        Ok((images, videos, t.elapsed().as_secs_f64() * 1e3))
    }
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Checkpoint directory, or a Hugging Face hub id (`org/name[@revision]`), resolved through
    /// the hub cache (HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses the cache only).
    #[arg(long, default_value = DEFAULT_MODEL, value_name = "DIR|HUB_ID")]
    pub model: String,
    /// Compute dtype: auto (the checkpoint's), f32, bf16 or f16.
    #[arg(long, default_value = "auto", value_name = "auto|f32|bf16|f16")]
    pub dtype: DTypeChoice,
    /// CPU threads for the tensor kernels (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Quantize the language model's linear layers at load: q8_0 (8-bit) or q4k (4-bit).
    /// The result is saved in the cache directory, so the next load reads it instead.
    #[arg(long, value_name = "q8_0|q4k")]
    pub quantize: Option<QuantFormat>,
    /// Where quantized weights are saved: a directory, or `off` [default: $VIDEOLLAVA_CACHE,
    /// else $XDG_CACHE_HOME/videollava, else ~/.cache/videollava].
    #[arg(long, value_name = "DIR|off")]
    pub quantized_cache: Option<String>,
    /// MiB of projected image/video features kept by content, so another question about the
    /// same media skips the vision towers (0: off).
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub feature_cache_mib: usize,
    /// MiB of computed prompt prefixes' keys/values kept in memory (least recently used
    /// dropped first), so a prompt that starts like an earlier one (same tokens, same media: a
    /// follow-up question about a video, the next turn of a conversation) prefills only the
    /// rest (0: off). The default holds two 7B video prefixes in BF16 (~1.1 GB each).
    #[arg(long, default_value_t = videollava::model::prefix_cache::DEFAULT_CAPACITY_BYTES >> 20, value_name = "MIB")]
    pub prefix_cache_mib: usize,
    /// Also save the keys/values of media prefixes (a prompt up to its last image or video) in
    /// this directory, so the same media after a restart, or in another process, skips their
    /// prefill. Files of another checkpoint, dtype or cache format are ignored.
    #[arg(long, value_name = "DIR")]
    pub prefix_cache_dir: Option<PathBuf>,
    /// Copy the BF16 weights into memory at load instead of reading them in place from the
    /// memory-mapped checkpoint files (the default where the CPU has AVX-512 BF16).
    #[arg(long)]
    pub no_mmap: bool,
    /// How the decoder keeps keys and values: `model` (the compute dtype, as transformers) or
    /// `q8_0` (8-bit codes with a scale per 32 values: 56% of the bytes of BF16, read in place
    /// when decoding; a small change to the numbers, measured in docs/benchmarks.md).
    #[arg(long, default_value = "model", value_name = "model|q8_0")]
    pub kv_cache: KvCacheFormat,
    /// Prompt positions run through the decoder at a time (0: the whole prompt at once); the
    /// results are the same, with fewer activations alive for long prompts.
    #[arg(long, default_value_t = videollava::model::video_llava::DEFAULT_PREFILL_CHUNK, value_name = "N")]
    pub prefill_chunk: usize,
}

impl ModelArgs {
    /// Resolves `--model` to a directory (downloading if needed).
    pub fn resolve(&self) -> Result<PathBuf> {
        Ok(resolve_model(&self.model, &HubOptions::from_env())?)
    }

    /// Resolves and loads the checkpoint.
    pub fn load(&self) -> Result<Engine> {
        if let Some(n) = self.threads {
            // candle's CPU kernels read this before their first use.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        let dir = self.resolve()?;
        let spinner = progress_spinner(&format!("loading {}", dir.display()));
        let cache = match self.quantized_cache.as_deref() {
            None => QuantCache::Default,
            Some("off") => QuantCache::Off,
            Some(d) => QuantCache::Dir(PathBuf::from(d)),
        };
        let mut engine =
            Engine::load_quantized(&dir, self.dtype, self.quantize, cache, !self.no_mmap, &candle_core::Device::Cpu)
                .with_context(|| format!("loading the checkpoint {}", dir.display()))?;
        if let Some(s) = spinner {
            s.finish_and_clear();
        }
        engine.model.set_feature_cache_capacity(self.feature_cache_mib << 20);
        engine.model.set_kv_cache_format(self.kv_cache);
        engine.model.set_prefill_chunk(self.prefill_chunk);
        engine.model.set_prefix_cache_capacity(self.prefix_cache_mib << 20);
        engine
            .set_prefix_cache_dir(self.prefix_cache_dir.as_deref())
            .with_context(|| format!("--prefix-cache-dir {:?}", self.prefix_cache_dir))?;
        if let Some(q) = &engine.model.quantization {
            let mut kinds: Vec<String> = q.quantized.iter().map(|(k, n)| format!("{n} {k}")).collect();
            kinds.sort();
            let source = match (&q.cache_file, q.from_cache) {
                (Some(f), n) if n > 0 => format!("{n} read from {}", f.display()),
                (Some(f), _) => format!("saved to {}", f.display()),
                (None, _) => "not saved".to_string(),
            };
            eprintln!(
                "quantized {} linear layers ({}; {:.2} GB) in {:.1} s, {source}",
                q.quantized.values().sum::<usize>(),
                kinds.join(", "),
                q.quantized_bytes as f64 / 1e9,
                q.elapsed_ms / 1e3
            );
            if !q.kept_dense.is_empty() {
                eprintln!("kept dense (row length fits no block): {}", q.kept_dense.join(", "));
            }
            if let Some(note) = &q.cache_note {
                eprintln!("note: {note}");
            }
        }
        Ok(engine)
    }
}

/// A spinner on stderr when it is a terminal.
pub fn progress_spinner(message: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(bar)
}
