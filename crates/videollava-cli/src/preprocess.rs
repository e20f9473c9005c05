//! `videollava preprocess`: the processor's tensors, written as safetensors (the command's output
//! format: the tensors transformers' processor returns, by its names).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use safetensors::tensor::{Dtype, TensorView};
use videollava::processor::{Processor, ProcessorOutput};

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
    write_processor_output(&out, &args.output, meta).context("writing the preprocess output")?;
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

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `input_ids` and `attention_mask` (I64 `[B, L]`), and `pixel_values_images`
/// (F32 `[N, 3, H, W]`) / `pixel_values_videos` (F32 `[M, T, 3, H, W]`) when present.
fn write_processor_output(out: &ProcessorOutput, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
    let shape = vec![out.batch_size, out.seq_len];
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("input_ids".into(), Dtype::I64, shape.clone(), i64_bytes(&out.input_ids)),
        ("attention_mask".into(), Dtype::I64, shape, i64_bytes(&out.attention_mask)),
    ];
    if let Some(t) = &out.pixel_values_images {
        owned.push(("pixel_values_images".into(), Dtype::F32, t.shape.clone(), f32_bytes(&t.data)));
    }
    if let Some(t) = &out.pixel_values_videos {
        owned.push(("pixel_values_videos".into(), Dtype::F32, t.shape.clone(), f32_bytes(&t.data)));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, Some(metadata), path).with_context(|| format!("writing {}", path.display()))
}
