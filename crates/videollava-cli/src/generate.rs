//! `videollava generate`: answer one or several prompts (one batch), streamed or as JSON lines.

use std::io::Write;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use videollava::engine::Engine;

use crate::common::{sequence_json, GenerationArgs, MediaArgs, ModelArgs};

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
    /// A question (wrapped in the checkpoint's chat format), or a prompt already in that format
    /// (`USER: <video>\nWhy? ASSISTANT:`, used verbatim), or with --raw-prompt the exact prompt
    /// text with `<image>` / `<video>` placeholders. Several make one batch.
    #[arg(long = "prompt", value_name = "TEXT", required = true)]
    prompts: Vec<String>,
    /// Pass the prompts verbatim, without the chat format.
    #[arg(long)]
    raw_prompt: bool,
    #[command(flatten)]
    media: MediaArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
}

/// The prompts to run: verbatim, or questions wrapped in the chat format with their media.
fn build_prompts(engine: &Engine, args: &GenerateArgs, n_images: usize, n_videos: usize) -> Result<Vec<String>> {
    if args.raw_prompt {
        return Ok(args.prompts.clone());
    }
    let proc_cfg = &engine.processor().config;
    let places_media = |p: &String| {
        p.contains(&proc_cfg.image_token) || p.contains(&proc_cfg.video_token) || engine.is_chat_formatted(p)
    };
    if args.prompts.iter().any(places_media) {
        // The user placed the media: a prompt already in the chat format (as the model card
        // writes it) is used verbatim, any other text is wrapped as is.
        return args.prompts.iter().map(|p| Ok(engine.prompt_for(p, 0, 0)?)).collect();
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

pub fn run(mut args: GenerateArgs) -> Result<()> {
    args.model.one_shot();
    let engine = args.model.load()?;
    let (images, videos, media_ms) = args.media.load(engine.processor().num_frames)?;
    let prompts = build_prompts(&engine, &args, images.len(), videos.len())?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();

    let options = args.generation.options(engine.default_options());

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
            for (i, r) in results.iter().enumerate() {
                let obj = sequence_json(i, r, &timings, engine.tokenizer(), args.generation.top_logprobs > 0);
                writeln!(stdout, "{obj}")?;
            }
        }
    }
    Ok(())
}
