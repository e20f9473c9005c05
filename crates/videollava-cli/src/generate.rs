//! `videollava generate`: answer one or several prompts (one batch), streamed or as JSON lines.

use std::io::Write;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use videollava::engine::Engine;
use videollava::generate::{GenerateOptions, SamplingParams};

use crate::common::{MediaArgs, ModelArgs};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    /// The answer streams to stdout as it is generated.
    Text,
    /// One JSON object per prompt, one per line.
    Json,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A question (wrapped in the checkpoint's chat format) or, with --raw-prompt, the exact
    /// prompt text with `<image>` / `<video>` placeholders. Several make one batch.
    #[arg(long = "prompt", value_name = "TEXT", required = true)]
    prompts: Vec<String>,
    /// Pass the prompts verbatim, without the chat format.
    #[arg(long)]
    raw_prompt: bool,
    #[command(flatten)]
    media: MediaArgs,
    /// Most tokens to generate per prompt.
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    temperature: f64,
    /// Sample among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to P.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    top_p: f64,
    /// Drop tokens less likely than MIN_P times the most likely one.
    #[arg(long, default_value_t = 0.0, value_name = "MIN_P")]
    min_p: f64,
    /// transformers' repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    repetition_penalty: f64,
    /// Seed of the sampler (runs with the same seed give the same text).
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Report the K most likely alternatives of each token (JSON output).
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_logprobs: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
}

/// The prompts to run: verbatim, or questions wrapped in the chat format with their media.
fn build_prompts(engine: &Engine, args: &GenerateArgs, n_images: usize, n_videos: usize) -> Result<Vec<String>> {
    if args.raw_prompt {
        return Ok(args.prompts.clone());
    }
    let proc_cfg = &engine.processor.config;
    let has_placeholders =
        args.prompts.iter().any(|p| p.contains(&proc_cfg.image_token) || p.contains(&proc_cfg.video_token));
    if has_placeholders {
        // The user placed the media: wrap the text as is.
        return args.prompts.iter().map(|p| Ok(engine.question_prompt(p, 0, 0)?)).collect();
    }
    // Which media go with which question: all to a single question; otherwise one medium per
    // question (images first, then videos), or one image and one video each.
    let n = args.prompts.len();
    let (images, videos): (Vec<usize>, Vec<usize>) = if n == 1 {
        (vec![n_images], vec![n_videos])
    } else if n_images + n_videos == n {
        ((0..n).map(|i| usize::from(i < n_images)).collect(), (0..n).map(|i| usize::from(i >= n_images)).collect())
    } else if n_images == n && n_videos == n {
        (vec![1; n], vec![1; n])
    } else if n_images + n_videos == 0 {
        (vec![0; n], vec![0; n])
    } else {
        bail!(
            "{n_images} images and {n_videos} videos for {n} prompts: give one medium per prompt, or put <image>/<video> \
             placeholders in the prompts (or use --raw-prompt)"
        )
    };
    args.prompts.iter().enumerate().map(|(i, q)| Ok(engine.question_prompt(q, images[i], videos[i])?)).collect()
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let engine = args.model.load()?;
    let (images, videos, media_ms) = args.media.load()?;
    let prompts = build_prompts(&engine, &args, images.len(), videos.len())?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();

    let mut options: GenerateOptions = engine.default_options();
    options.max_new_tokens = args.max_new_tokens;
    options.sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    options.stop_strings = args.stop.clone();
    options.ignore_eos = args.ignore_eos;
    options.top_logprobs = args.top_logprobs;

    let stream = args.format == OutputFormat::Text && refs.len() == 1;
    let mut stdout = std::io::stdout().lock();
    let (results, mut timings) = engine.generate(&refs, &images, &videos, &options, &mut |ev| {
        if stream && !ev.text_delta.is_empty() {
            let _ = stdout.write_all(ev.text_delta.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    timings.media_ms = media_ms;

    match args.format {
        OutputFormat::Text => {
            if stream {
                writeln!(stdout)?;
            } else {
                for (i, r) in results.iter().enumerate() {
                    writeln!(stdout, "[{i}] {}", r.text)?;
                }
            }
        }
        OutputFormat::Json => {
            let tok = engine.tokenizer();
            for (i, r) in results.iter().enumerate() {
                let mut obj = json!({
                    "index": i,
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
                if args.top_logprobs > 0 {
                    obj["top_logprobs"] = r
                        .top_logprobs
                        .iter()
                        .map(|alts| {
                            alts.iter()
                                .map(|&(id, lp)| {
                                    json!({"token_id": id, "token": tok.decode(&[id], false).unwrap_or_default(), "logprob": lp})
                                })
                                .collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                        .into();
                }
                writeln!(stdout, "{obj}")?;
            }
        }
    }
    Ok(())
}
