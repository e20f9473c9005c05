//! `videollava preprocess`: the processor's tensors, written as safetensors.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use videollava::processor::Processor;

use crate::common::MediaArgs;

#[derive(Args)]
pub struct PreprocessArgs {
    /// Checkpoint directory (config.json, preprocessor_config.json, tokenizer files), or a hub id.
    #[arg(long, value_name = "DIR|HUB_ID")]
    model: String,
    /// Prompt text with `<image>` / `<video>` placeholders; several make one batch.
    #[arg(long = "prompt", value_name = "TEXT", required = true)]
    prompts: Vec<String>,
    #[command(flatten)]
    media: MediaArgs,
    /// Output safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    output: PathBuf,
}

pub fn run(args: PreprocessArgs) -> Result<()> {
    let dir = videollava::hub::resolve_model(&args.model, &videollava::hub::HubOptions::from_env())?;
    let processor = Processor::from_dir(&dir)?;
    let (images, videos, _) = args.media.load(processor.num_frames)?;
    let prompts: Vec<&str> = args.prompts.iter().map(String::as_str).collect();
    let out = processor.process(&prompts, &images, &videos)?;
    let mut meta = HashMap::new();
    meta.insert("num_frames".to_string(), args.media.video_options(processor.num_frames).num_frames.to_string());
    meta.insert("frame_sampling".to_string(), args.media.frame_sampling.to_string());
    videollava::output::write_processor_output(&out, &args.output, meta).context("writing the preprocess output")?;
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
