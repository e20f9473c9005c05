//! Arguments and steps the subcommands share: model source, media, dtype, threads.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use videollava::engine::{DTypeChoice, Engine, StageTimings};
use videollava::generate::{GenerateOptions, GeneratedSequence, SamplingParams};
use videollava::hub::{resolve_model, HubOptions, DEFAULT_MODEL};
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, FrameSampling, VideoOptions};
use videollava::media::{RgbImage, Video};
use videollava::model::{KvCacheFormat, QuantCache, QuantFormat};
use videollava::processor::tokenizer::TextTokenizer;

#[derive(Args, Clone)]
pub struct MediaArgs {
    /// Image file, consumed by the `<image>` placeholders in order (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// Video file, consumed by the `<video>` placeholders in order (repeatable).
    #[arg(long = "video", value_name = "PATH")]
    pub videos: Vec<PathBuf>,
    /// Frames taken from each video [default: the checkpoint's video processor `num_frames`
    /// when it samples frames (transformers 5.x `do_sample_frames`), else 8].
    #[arg(long, value_name = "N")]
    pub num_frames: Option<usize>,
    /// How frames are chosen: `uniform` (floor(i*total/N), the Hugging Face default) or
    /// `linspace` (the original Video-LLaVA repo: linspace(0, total-1, N)).
    #[arg(long, default_value = "uniform", value_name = "uniform|linspace")]
    pub frame_sampling: FrameSampling,
}

impl MediaArgs {
    /// Frame choice: `--num-frames`, else `checkpoint_frames` (see [`Processor::num_frames`]), else 8.
    ///
    /// [`Processor::num_frames`]: videollava::processor::Processor::num_frames
    pub fn video_options(&self, checkpoint_frames: Option<usize>) -> VideoOptions {
        let num_frames = self.num_frames.or(checkpoint_frames).unwrap_or(VideoOptions::default().num_frames);
        VideoOptions { num_frames, sampling: self.frame_sampling }
    }

    /// Decodes every image and video; returns them with the time it took (ms).
    pub fn load(&self, checkpoint_frames: Option<usize>) -> Result<(Vec<RgbImage>, Vec<Video>, f64)> {
        let t = Instant::now();
        let images = self.images.iter().map(|p| decode_image_file(p)).collect::<videollava::Result<Vec<_>>>()?;
        let options = self.video_options(checkpoint_frames);
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
    /// rest (0: off). Default: 2560 (two 7B video prefixes in BF16, ~1.1 GB each) for `serve`,
    /// `chat`, `batch` and `quality`; 0 for `generate` and `bench`, which answer once and exit
    /// (a kept copy would only add to their peak memory).
    #[arg(long, value_name = "MIB")]
    pub prefix_cache_mib: Option<usize>,
    /// Also save the keys/values of media prefixes (a prompt up to its last image or video) in
    /// this directory, so the same media after a restart, or in another process, skips their
    /// prefill. Files of another checkpoint, dtype or cache format are ignored.
    #[arg(long, value_name = "DIR")]
    pub prefix_cache_dir: Option<PathBuf>,
    /// MiB of saved prefixes kept in `--prefix-cache-dir` (the least recently used deleted
    /// first after each save). The default holds about fourteen 7B video prefixes in BF16.
    #[arg(long, default_value_t = videollava::model::prefix_cache::DEFAULT_DIR_BYTES >> 20, value_name = "MIB")]
    pub prefix_cache_dir_mib: u64,
    /// Reuse a cached prefix of any length, not only whole prefill chunks: the next turn of a
    /// conversation prefills only its new tokens, so its first token comes sooner. The
    /// positions after the reused prefix may then go through kernels for fewer rows than
    /// without the cache, which can change the last bits of the numbers (by default a prompt's
    /// numbers are the same bit for bit whatever was cached before it).
    #[arg(long)]
    pub prefix_any_length: bool,
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
    /// `--prefix-cache-mib`, or its default for a command that answers more than once.
    pub fn prefix_cache_mib(&self) -> usize {
        self.prefix_cache_mib.unwrap_or(videollava::model::prefix_cache::DEFAULT_CAPACITY_BYTES >> 20)
    }

    /// For a command that answers once and exits: no prefix cache unless asked for.
    pub fn one_shot(&mut self) {
        self.prefix_cache_mib.get_or_insert(0);
    }

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
        engine.model().set_feature_cache_capacity(self.feature_cache_mib << 20);
        engine.model_mut().set_kv_cache_format(self.kv_cache);
        engine.model_mut().set_prefill_chunk(self.prefill_chunk);
        engine.model_mut().set_prefix_any_length(self.prefix_any_length);
        engine.model().set_prefix_cache_capacity(self.prefix_cache_mib() << 20);
        engine
            .set_prefix_cache_dir_bounded(self.prefix_cache_dir.as_deref(), self.prefix_cache_dir_mib << 20)
            .with_context(|| format!("--prefix-cache-dir {:?}", self.prefix_cache_dir))?;
        if let Some(q) = &engine.model().quantization {
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

/// The generation options of `generate`, also the defaults of `batch` rows.
#[derive(Args, Clone)]
pub struct GenerationArgs {
    /// Most tokens to generate per prompt.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temperature: f64,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to P.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f64,
    /// Drop tokens less likely than MIN_P times the most likely one.
    #[arg(long, default_value_t = 0.0, value_name = "MIN_P")]
    pub min_p: f64,
    /// transformers' repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f64,
    /// Seed of the sampler (runs with the same seed give the same text).
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Report the K most likely alternatives of each token (JSON output).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_logprobs: usize,
}

impl GenerationArgs {
    /// `defaults` (the checkpoint's EOS ids, ...) with these options.
    pub fn options(&self, defaults: GenerateOptions) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            stop_strings: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            top_logprobs: self.top_logprobs,
            ..defaults
        }
    }
}

/// One answer as `generate --format json` writes it (and `batch`, with `id`): `index`, `text`,
/// `token_ids`, `logprobs`, `prompt_tokens`, `finish_reason`, `timings_ms`, and `top_logprobs`
/// when asked for.
pub fn sequence_json(
    index: usize,
    r: &GeneratedSequence,
    timings: &StageTimings,
    tok: &TextTokenizer,
    with_top_logprobs: bool,
) -> serde_json::Value {
    let mut obj = json!({
        "index": index,
        "text": r.text,
        "token_ids": r.token_ids,
        "logprobs": r.logprobs,
        "prompt_tokens": r.prompt_tokens,
        "finish_reason": r.finish_reason.as_str(),
        "timings_ms": {
            "load": timings.load_ms,
            "media": timings.media_ms,
            "preprocess": timings.preprocess_ms,
            "vision": timings.vision_ms,
            "prefill": timings.prefill_ms,
            "decode": timings.decode_ms,
        },
    });
    if with_top_logprobs {
        obj["top_logprobs"] = r
            .top_logprobs
            .iter()
            .map(|alts| {
                alts.iter()
                    .map(|&(id, lp)| json!({"token_id": id, "token": tok.decode(&[id], false).unwrap_or_default(), "logprob": lp}))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .into();
    }
    obj
}

/// How much memory the keys/values of concurrent rows may take (`serve`, `batch`).
#[derive(clap::Args, Debug, Clone)]
pub struct KvBudgetArgs {
    /// MiB of keys/values the rows prefilled or decoded together may claim (prompt plus
    /// max_new_tokens positions each; a prompt that does not fit waits for running rows to
    /// finish; one row always runs). Default: half of the memory available after loading, less
    /// the weights, the prefix cache and 1 GiB (unbounded where it cannot be read). 0: no bound.
    #[arg(long, value_name = "MIB")]
    pub kv_budget_mib: Option<usize>,
}

impl KvBudgetArgs {
    /// The budget in bytes for `engine` loaded by `model` (`None`: unbounded).
    pub fn bytes(&self, engine: &Engine, model: &ModelArgs) -> Option<usize> {
        match self.kv_budget_mib {
            Some(0) => None,
            Some(mib) => Some(mib << 20),
            None => {
                let available = mem_available_bytes()?;
                // Mapped weights sit in the page cache, which MemAvailable counts as free.
                let weights = engine.model().decode_weight_bytes();
                let claimed = weights + (model.prefix_cache_mib() << 20) + (1 << 30);
                // Halved: a row's keys/values exist twice while it joins the running batch (its
                // own cache and the batch's grown copy). Measured: the whole difference on 7B BF16
                // (5.5 GB budget, 24 GiB) thrashed the page cache holding the mapped weights.
                Some(available.saturating_sub(claimed) / 2)
            }
        }
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes (Linux; `None` elsewhere).
fn mem_available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[cfg(test)]
mod tests {
    use super::ModelArgs;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        model: ModelArgs,
    }

    fn model(args: &[&str]) -> ModelArgs {
        Cli::try_parse_from([&["videollava"], args].concat()).expect("parses").model
    }

    /// The prefix cache is on by default for commands that answer more than once, off for the
    /// one-shot ones unless asked for.
    #[test]
    fn one_shot_commands_keep_no_prefixes_unless_asked() {
        let default = videollava::model::prefix_cache::DEFAULT_CAPACITY_BYTES >> 20;
        assert_eq!(model(&["--model", "m"]).prefix_cache_mib(), default);
        let mut once = model(&["--model", "m"]);
        once.one_shot();
        assert_eq!(once.prefix_cache_mib(), 0);
        let mut asked = model(&["--model", "m", "--prefix-cache-mib", "100"]);
        asked.one_shot();
        assert_eq!(asked.prefix_cache_mib(), 100);
    }
}
