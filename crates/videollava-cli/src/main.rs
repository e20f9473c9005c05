//! The `videollava` command: a thin layer over the `videollava` library.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, FrameSampling, VideoOptions};
use videollava::processor::Processor;

#[derive(Parser)]
#[command(name = "videollava", version, about = "Video-LLaVA: answer questions about videos and images")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the processor only and write the model inputs (input_ids, attention_mask, pixel values)
    /// to a safetensors file: the tensors transformers' processor returns for the same input.
    Preprocess(PreprocessArgs),
}

#[derive(Args)]
struct MediaArgs {
    /// Image file, consumed by the `<image>` placeholders in order (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// Video file, consumed by the `<video>` placeholders in order (repeatable).
    #[arg(long = "video", value_name = "PATH")]
    videos: Vec<PathBuf>,
    /// Frames taken from each video.
    #[arg(long, default_value_t = 8, value_name = "N")]
    num_frames: usize,
    /// How frames are chosen: `uniform` (floor(i*total/N), the Hugging Face default) or
    /// `linspace` (the original Video-LLaVA repo: linspace(0, total-1, N)).
    #[arg(long, default_value = "uniform", value_name = "uniform|linspace")]
    frame_sampling: FrameSampling,
}

#[derive(Args)]
struct PreprocessArgs {
    /// Checkpoint directory (config.json, preprocessor_config.json, tokenizer files).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Prompt text with `<image>` / `<video>` placeholders; several make one batch.
    #[arg(long = "prompt", value_name = "TEXT", required = true)]
    prompts: Vec<String>,
    #[command(flatten)]
    media: MediaArgs,
    /// Output safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    output: PathBuf,
}

fn load_media(args: &MediaArgs) -> Result<(Vec<videollava::media::RgbImage>, Vec<videollava::media::Video>)> {
    let images = args.images.iter().map(|p| decode_image_file(p)).collect::<videollava::Result<Vec<_>>>()?;
    let options = VideoOptions { num_frames: args.num_frames, sampling: args.frame_sampling };
    let videos = args.videos.iter().map(|p| decode_video_file(p, &options)).collect::<videollava::Result<Vec<_>>>()?;
    Ok((images, videos))
}

fn preprocess(args: PreprocessArgs) -> Result<()> {
    let processor = Processor::from_dir(&args.model)?;
    let (images, videos) = load_media(&args.media)?;
    let prompts: Vec<&str> = args.prompts.iter().map(String::as_str).collect();
    let out = processor.process(&prompts, &images, &videos)?;
    let mut meta = HashMap::new();
    meta.insert("num_frames".to_string(), args.media.num_frames.to_string());
    meta.insert("frame_sampling".to_string(), format!("{:?}", args.media.frame_sampling).to_lowercase());
    videollava::output::write_processor_output(&out, &args.output, meta)
        .with_context(|| "writing the preprocess output".to_string())?;
    eprintln!(
        "wrote {} (batch {}, {} tokens, {} images, {} videos)",
        args.output.display(),
        out.batch_size,
        out.seq_len,
        images.len(),
        videos.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Preprocess(args) => preprocess(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
