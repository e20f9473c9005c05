//! `videollava quality`: how close a quantized model's next-token distributions stay to the
//! unquantized model's. The reference model (default f32) answers the question greedily for
//! `--positions` tokens; then both models read the same prompt + answer (teacher forcing) and the
//! logits at those positions are compared: top-1 agreement and mean KL(reference || quantized).
//! What is quantized: the weights (`--quantize`), the KV cache (`--kv-cache q8_0`: every position
//! then attends to keys and values read back from 8-bit codes), or both.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde_json::json;
use videollava::engine::{DTypeChoice, Engine};
use videollava::generate::{generate, GenerateOptions};
use videollava::model::quantize::compare_logits;
use videollava::model::{ForwardInput, KvCacheFormat, LogitsSelection, QuantCache};
use videollava::processor::ProcessorOutput;

use crate::common::{MediaArgs, ModelArgs};

#[derive(Args)]
pub struct QualityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The question (wrapped in the chat format like `generate` does).
    #[arg(long, default_value = "Describe what you see in detail.")]
    prompt: String,
    #[command(flatten)]
    media: MediaArgs,
    /// Positions compared (tokens the reference generates greedily, EOS ignored).
    #[arg(long, default_value_t = 128, value_name = "N")]
    positions: usize,
    /// Compute dtype of the unquantized reference.
    #[arg(long, default_value = "f32", value_name = "auto|f32|bf16|f16")]
    reference_dtype: DTypeChoice,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Logits `[positions, vocab]` (f32, row-major) of the last `positions` positions of `ids`,
/// with the media of `inputs`.
fn teacher_forced_logits(engine: &Engine, ids: &[u32], inputs: &ProcessorOutput, positions: usize) -> Result<Vec<f32>> {
    let dev = Device::Cpu;
    let input_ids = Tensor::from_slice(ids, (1, ids.len()), &dev)?;
    let pixels = |p: &videollava::processor::PixelTensor| Tensor::from_slice(&p.data, p.shape.as_slice(), &dev);
    let images = inputs.pixel_values_images.as_ref().map(pixels).transpose()?;
    let videos = inputs.pixel_values_videos.as_ref().map(pixels).transpose()?;
    let mut input = ForwardInput::new(&input_ids);
    input.pixel_values_images = images.as_ref();
    input.pixel_values_videos = videos.as_ref();
    input.logits = LogitsSelection::All;
    let out = engine.model().forward(&input, None)?;
    let logits = out.logits.context("the model returned no logits")?;
    let (_, l, _) = logits.dims3()?;
    Ok(logits.narrow(1, l - positions, positions)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

pub fn run(args: QualityArgs) -> Result<()> {
    let kv = args.model.kv_cache;
    if args.model.quantize.is_none() && kv == KvCacheFormat::Model {
        bail!("quality compares a quantized model: pass --quantize q8_0|q4k and/or --kv-cache q8_0")
    }
    let format = match args.model.quantize {
        Some(q) if kv == KvCacheFormat::Model => q.name().to_string(),
        Some(q) => format!("{} + {kv} KV cache", q.name()),
        None => format!("{kv} KV cache"),
    };
    if args.positions == 0 {
        bail!("--positions must be at least 1");
    }
    if let Some(n) = args.model.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let dir = args.model.resolve()?;
    let frames = videollava::config::CheckpointConfig::from_dir(&dir)?.video_processor.default_num_frames();
    let (images, videos, _) = args.media.load(frames)?;

    // 1. The reference answers greedily.
    let reference = Engine::load_quantized(&dir, args.reference_dtype, None, QuantCache::Off, true, &Device::Cpu)
        .with_context(|| format!("loading the reference {}", dir.display()))?;
    let prompt = reference.prompt_for(&args.prompt, images.len(), videos.len())?;
    let inputs = reference.processor().process(&[prompt.as_str()], &images, &videos)?;
    let options = GenerateOptions { max_new_tokens: args.positions, ignore_eos: true, ..reference.default_options() };
    let (out, _) = generate(&reference.model(), reference.tokenizer(), &inputs, &options, &mut |_| {})?;
    let answer = &out[0].token_ids;
    let positions = answer.len();
    let mut ids: Vec<u32> = inputs.ids(0).iter().map(|&i| i as u32).collect();
    let prompt_tokens = ids.len();
    ids.extend_from_slice(&answer[..positions - 1]);
    eprintln!("reference ({:?}) answered {positions} tokens; teacher forcing both models", reference.model().dtype);
    let ref_logits = teacher_forced_logits(&reference, &ids, &inputs, positions)?;
    let ref_dtype = format!("{:?}", reference.model().dtype).to_lowercase();
    drop(reference);

    // 2. The quantized model reads the same tokens.
    let quantized = args.model.load()?;
    let q_logits = teacher_forced_logits(&quantized, &ids, &inputs, positions)?;
    let vocab = ref_logits.len() / positions;
    let stats = compare_logits(&ref_logits, &q_logits, vocab)?;

    let report = json!({
        "model": dir.display().to_string(),
        "quantize": args.model.quantize.map(|q| q.name()),
        "kv_cache": kv.to_string(),
        "compute_dtype": format!("{:?}", quantized.model().dtype).to_lowercase(),
        "reference_dtype": ref_dtype,
        "prompt_tokens": prompt_tokens,
        "positions": stats.positions,
        "top1_agreement": stats.top1_agreement,
        "mean_kl": stats.mean_kl,
        "max_kl": stats.max_kl,
        "mean_reference_top1_prob": stats.mean_reference_top1_prob,
        "mean_reference_margin": stats.mean_reference_margin,
        "reference_answer": answer,
        "quantized_layers": quantized.model().quantization.as_ref().map(|q| json!(q.quantized)),
        "quantized_gb": quantized.model().quantization.as_ref().map(|q| q.quantized_bytes as f64 / 1e9),
    });
    eprintln!(
        "{format} vs {ref_dtype} over {} positions: top-1 agreement {:.2}%, mean KL {:.5} nats (max {:.5}); \
         reference top-1 probability {:.4}, margin {:.4} logits",
        stats.positions,
        stats.top1_agreement * 100.0,
        stats.mean_kl,
        stats.max_kl,
        stats.mean_reference_top1_prob,
        stats.mean_reference_margin
    );
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{text}");
    Ok(())
}
