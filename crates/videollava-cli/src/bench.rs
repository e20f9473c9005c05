//! `videollava bench`: times each stage of one request the way a user runs it, and reports peak
//! resident memory, as a table on stderr and JSON on stdout (or `--json FILE`).
//!
//! Its JSON has the same keys as `scripts/reference/bench_checkpoint.py run` so the two can be put
//! side by side (`scripts/reference/bench_report.py`).

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use videollava::generate::{generate, GenerateOptions};
use videollava::kernels::bandwidth::read_bandwidth;
use videollava::kernels::cpu;
use videollava::KvCacheFormat;

use crate::common::{MediaArgs, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The question (wrapped in the chat format like `generate` does).
    #[arg(long, default_value = "Why is this video funny?")]
    prompt: String,
    #[command(flatten)]
    media: MediaArgs,
    /// Tokens to decode after the first (greedy, EOS ignored so every run decodes the same count).
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_new_tokens: usize,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// MiB read to measure the memory read bandwidth (several times the last-level cache; 0: skip).
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    bandwidth_mib: usize,
}

/// Peak resident set size of this process in MiB (VmHWM), where the OS reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    let t_load = Instant::now();
    args.model.one_shot();
    let engine = args.model.load()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let rss_after_load = peak_rss_mib();

    let (images, videos, media_ms) = args.media.load(engine.processor().num_frames)?;
    let prompt = engine.prompt_for(&args.prompt, images.len(), videos.len())?;
    let t_pre = Instant::now();
    let inputs = engine.processor().process(&[prompt.as_str()], &images, &videos)?;
    let preprocess_s = t_pre.elapsed().as_secs_f64();
    drop((images, videos));

    let options = GenerateOptions { max_new_tokens: args.max_new_tokens, ignore_eos: true, ..engine.default_options() };
    let mut stamps: Vec<Instant> = Vec::new();
    let t_gen = Instant::now();
    let (out, timings) =
        generate(&engine.model(), engine.tokenizer(), &inputs, &options, &mut |_| stamps.push(Instant::now()))?;
    let total_gen_s = t_gen.elapsed().as_secs_f64();
    let mut per_token: Vec<f64> = stamps.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    let decode_tokens = per_token.len();
    let decode_s: f64 = per_token.iter().sum();
    let ttft_s = stamps.first().map(|t| (*t - t_gen).as_secs_f64()).unwrap_or(f64::NAN);
    let prompt_tokens = out[0].prompt_tokens;
    // Before the bandwidth probe's buffer.
    let peak_rss = peak_rss_mib();

    // What bounds decoding: each step reads every decoder weight once, plus the KV cache.
    let bandwidth = (args.bandwidth_mib > 0).then(|| read_bandwidth(args.bandwidth_mib << 20, 3));
    let text = &engine.model().config.text_config;
    let kv_bytes_per_position = match args.model.kv_cache {
        KvCacheFormat::Model => engine.model().dtype.size_in_bytes() as f64,
        KvCacheFormat::Q8_0 => 1.0 + 4.0 / 32.0,
    } * (2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim) as f64;
    let mean_context = prompt_tokens as f64 + decode_tokens as f64 / 2.0;
    let bytes_per_token = engine.model().decode_weight_bytes() as f64 + kv_bytes_per_position * mean_context;
    let decode_rate = decode_tokens as f64 / decode_s;
    let decode_limit = bandwidth.map(|bw| bw / bytes_per_token);
    let kernels = cpu::kernel_set();
    let f = cpu::features();

    let report = json!({
        "engine": "videollava",
        "kernel_set": kernels.name(),
        "cpu_features": {"avx2": f.avx2, "avx_vnni": f.avx_vnni, "avx512": f.avx512, "avx512_bf16": f.avx512_bf16, "avx512_vnni": f.avx512_vnni, "amx_bf16": f.amx_bf16},
        "read_bandwidth_gb_s": bandwidth.map(|b| b / 1e9),
        "decode_bytes_per_token": bytes_per_token,
        "decode_limit_tokens_per_s": decode_limit,
        "decode_fraction_of_limit": decode_limit.map(|l| decode_rate / l),
        "model": engine.model_dir().display().to_string(),
        "dtype": format!("{:?}", engine.model().dtype).to_lowercase(),
        "quantize": args.model.quantize.map(|q| q.name()),
        "kv_cache": args.model.kv_cache.to_string(),
        "prefill_chunk": args.model.prefill_chunk,
        "prefix_cache_mib": args.model.prefix_cache_mib(),
        "threads": args.model.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "prompt_tokens": prompt_tokens,
        "new_tokens": out[0].token_ids.len(),
        "load_s": load_s,
        "media_decode_s": media_ms / 1e3,
        "preprocess_s": preprocess_s,
        "vision_s": timings.vision_ms / 1e3,
        "prefill_s": timings.prefill_ms / 1e3,
        "prefill_tokens_per_s": prompt_tokens as f64 / (timings.prefill_ms / 1e3),
        "time_to_first_token_s": ttft_s,
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "decode_tokens_per_s": decode_tokens as f64 / decode_s,
        "decode_median_token_s": median(&mut per_token),
        "generate_total_s": total_gen_s,
        "peak_rss_after_load_mib": rss_after_load,
        "peak_rss_mib": peak_rss,
    });
    let rows = [
        ("load", format!("{load_s:.2} s")),
        ("media decode", format!("{:.3} s", media_ms / 1e3)),
        ("preprocess", format!("{preprocess_s:.3} s")),
        ("vision towers", format!("{:.2} s", timings.vision_ms / 1e3)),
        (
            "prefill",
            format!(
                "{:.2} s ({prompt_tokens} tokens, {:.1} tokens/s)",
                timings.prefill_ms / 1e3,
                report["prefill_tokens_per_s"].as_f64().unwrap_or(0.0)
            ),
        ),
        ("time to first token", format!("{ttft_s:.2} s")),
        (
            "decode",
            format!(
                "{:.2} tokens/s ({decode_tokens} tokens, median {:.3} s/token)",
                report["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
                report["decode_median_token_s"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "decode bound",
            match (bandwidth, decode_limit) {
                (Some(bw), Some(limit)) => format!(
                    "{:.1} GB/s read, {:.2} GB per token: <= {limit:.2} tokens/s; measured {:.0}% of it",
                    bw / 1e9,
                    bytes_per_token / 1e9,
                    100.0 * decode_rate / limit
                ),
                _ => "not measured (--bandwidth-mib 0)".to_string(),
            },
        ),
        ("kernels", format!("{kernels} (VIDEOLLAVA_KERNELS caps it)")),
        ("peak RSS", format!("{:.0} MiB", report["peak_rss_mib"].as_f64().unwrap_or(f64::NAN))),
    ];
    for (k, v) in rows {
        eprintln!("{k:>20}  {v}");
    }
    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
