//! The `videollava` command: a thin layer over the `videollava` library.

mod batch;
mod bench;
mod chat;
mod common;
mod generate;
mod preprocess;
mod quality;
mod serve;
mod stderr_log;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "videollava", version, about = "Video-LLaVA: answer questions about videos and images")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer questions about images and videos (several --prompt make one batch).
    Generate(generate::GenerateArgs),
    /// Run a manifest of questions (JSON Lines or CSV) to a results file, resumable and shardable.
    Batch(batch::BatchArgs),
    /// Talk to the model turn by turn; `/image PATH`, `/video PATH`, `/reset`, `/quit`.
    Chat(chat::ChatArgs),
    /// Serve an OpenAI-compatible API (`/v1/chat/completions` with image_url and video_url parts).
    Serve(serve::ServeArgs),
    /// Time each stage of one request (load, media, preprocess, vision, prefill, decode) and peak memory.
    Bench(bench::BenchArgs),
    /// Compare a quantized model (--quantize) with the unquantized one: top-1 agreement and mean
    /// KL divergence of next-token distributions over generated positions.
    Quality(quality::QualityArgs),
    /// Run the processor only and write the model inputs (input_ids, attention_mask, pixel values)
    /// to a safetensors file: the tensors transformers' processor returns for the same input.
    Preprocess(preprocess::PreprocessArgs),
}

/// Large blocks on transparent huge pages (see [`videollava::huge_pages`]).
#[global_allocator]
static ALLOC: videollava::huge_pages::HugePages = videollava::huge_pages::HugePages;

/// Keeps freed memory in the process for reuse: every layer allocates and frees activation
/// tensors of the same sizes, and by default glibc returns large blocks to the kernel, which must
/// then fault in and zero fresh pages on the next allocation (measured on the 7B shapes: vision
/// 2.4 -> 1.3 s, prefill of 271 tokens 13.5 -> 11.1 s, load 27 -> 19 s, same peak RSS).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        // 32 MiB is glibc's largest allowed mmap threshold; trimming only beyond 1 GiB free.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        stderr_log::init();
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Quality(args) => quality::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
