//! `videollava batch`: run a manifest of questions to a results file.
//!
//! Rows go through the engine's continuous-batching [`Scheduler`], so answers of several rows
//! are decoded together; the media of upcoming rows are decoded on `--decode-threads` threads
//! while the model runs, at most `--max-batch-size + --decode-threads` rows ahead; decoded media
//! are kept for the next rows that name the same file, and the model's feature cache computes the
//! visual features of one medium once for all the questions about it. Results are appended and
//! flushed row by row, in the order rows finish; a rerun skips the ids already written.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};
use videollava::batch::{read_manifest, ResultsFile, Row, Shard};
use videollava::engine::{GenerationRequest, RequestTimings, Scheduler, SchedulerConfig, StageTimings, StreamEvent};
use videollava::generate::{GenerateOptions, GeneratedSequence};
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, FrameSampling, VideoOptions};
use videollava::media::Cancel;
use videollava::media::{RgbImage, Video};
use videollava::processor::tokenizer::TextTokenizer;
use videollava_server::media::{load_image, load_video_with, MediaPolicy, RequestPixels};

use crate::common::{sequence_json, GenerationArgs, KvBudgetArgs, ModelArgs};

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    kv_budget: KvBudgetArgs,
    /// The manifest: JSON Lines (CSV when the name ends in .csv), one question per row with `id`,
    /// `prompt`, `image` and/or `video` (a path or an http(s) URL) and optional per-row options.
    #[arg(long, value_name = "ROWS.jsonl|ROWS.csv")]
    input: PathBuf,
    /// The results file: JSON Lines, one object per row (`id` and the fields of
    /// `generate --format json`, or `error`).
    #[arg(long, value_name = "RESULTS.jsonl")]
    output: PathBuf,
    /// Run only shard I of N: the rows whose FNV-1a 64-bit hash of the UTF-8 `id`, mod N, is I.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// Skip the ids already in the results file (the default).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Empty the results file first instead of resuming.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Frames per video [default: the checkpoint's video processor `num_frames` when it samples
    /// frames, else 8]; a row's `num_frames` overrides it.
    #[arg(long, value_name = "N")]
    num_frames: Option<usize>,
    /// How frames are chosen: `uniform` or `linspace` (see `generate`).
    #[arg(long, default_value = "uniform", value_name = "uniform|linspace")]
    frame_sampling: FrameSampling,
    /// Pass every prompt verbatim, without the chat format (a row's `raw_prompt` overrides it).
    #[arg(long)]
    raw_prompt: bool,
    /// Most rows decoded together.
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_batch_size: usize,
    /// Threads that decode the media of upcoming rows.
    #[arg(long, default_value_t = 2, value_name = "N")]
    decode_threads: usize,
    /// Let URL media resolve to loopback, private or link-local addresses.
    #[arg(long)]
    allow_private_media_urls: bool,
}

/// What a row needs besides its manifest entry, shared by the media threads.
struct RowContext {
    template: Option<String>,
    bos: String,
    eos: String,
    image_token: String,
    video_token: String,
    raw_prompt: bool,
    options: GenerateOptions,
    video: VideoOptions,
    policy: MediaPolicy,
    media: MediaCache,
}

impl RowContext {
    /// The model prompt of a row: verbatim with `raw_prompt` or when it is already in the chat
    /// format; a question with its own placeholders is wrapped as is; otherwise its images and
    /// videos are placed in front of the question (images first).
    fn prompt(&self, row: &Row) -> videollava::Result<String> {
        if row.options.raw_prompt.unwrap_or(self.raw_prompt) {
            return Ok(row.prompt.clone());
        }
        let placed = row.prompt.contains(&self.image_token) || row.prompt.contains(&self.video_token);
        let (images, videos) = if placed { (0, 0) } else { (row.images.len(), row.videos.len()) };
        videollava::processor::prompt::prompt_for(
            self.template.as_deref(),
            &row.prompt,
            images,
            videos,
            &self.bos,
            &self.eos,
        )
    }

    /// Decodes a row's media and builds its request; the error names the row's problem.
    fn prepare(&self, row: &Row) -> std::result::Result<(GenerationRequest, f64), String> {
        let t = Instant::now();
        let video = row.options.video_options(&self.video);
        let mut images = Vec::with_capacity(row.images.len());
        for src in &row.images {
            images.push(self.media.image(src, &self.policy)?);
        }
        let mut videos = Vec::with_capacity(row.videos.len());
        for src in &row.videos {
            videos.push(self.media.video(src, &video, &self.policy)?);
        }
        let media_ms = t.elapsed().as_secs_f64() * 1e3;
        let prompt = self.prompt(row).map_err(|e| e.to_string())?;
        let options = row.options.generate_options(&self.options);
        Ok((GenerationRequest { prompt, images, videos, options }, media_ms))
    }
}

fn is_url(src: &str) -> bool {
    let lower = src.get(..8).unwrap_or(src).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

#[derive(Clone)]
enum Media {
    Image(RgbImage),
    Video(Video),
}

/// One decoded medium, or why it could not be decoded; shared by the rows that name it.
type Decoded = Arc<OnceLock<std::result::Result<Media, String>>>;

/// The last few decoded media, by source and frame choice: the questions about one video decode
/// it once, even when two media threads reach it at the same time (the second waits for the
/// first's result).
struct MediaCache {
    entries: Mutex<VecDeque<(String, Decoded)>>,
    capacity: usize,
}

impl MediaCache {
    fn get_or_decode(
        &self,
        key: String,
        decode: impl FnOnce() -> std::result::Result<Media, String>,
    ) -> std::result::Result<Media, String> {
        let slot = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.iter().find(|(k, _)| *k == key) {
                Some((_, slot)) => slot.clone(),
                None => {
                    if entries.len() >= self.capacity {
                        entries.pop_front();
                    }
                    let slot = Decoded::default();
                    entries.push_back((key, slot.clone()));
                    slot
                }
            }
        };
        slot.get_or_init(decode).clone()
    }

    fn image(&self, src: &str, policy: &MediaPolicy) -> std::result::Result<RgbImage, String> {
        let decoded = self.get_or_decode(format!("image\0{src}"), || {
            let im = if is_url(src) {
                load_image(src, policy, &Cancel::new(), &RequestPixels::default())
                    .map_err(|e| format!("image {src}: {}", e.message))?
            } else {
                decode_image_file(Path::new(src)).map_err(|e| format!("image {e}"))?
            };
            Ok(Media::Image(im))
        })?;
        match decoded {
            Media::Image(im) => Ok(im),
            Media::Video(_) => Err(format!("image {src}: not an image")),
        }
    }

    fn video(&self, src: &str, options: &VideoOptions, policy: &MediaPolicy) -> std::result::Result<Video, String> {
        let key = format!("video\0{src}\0{}\0{}", options.num_frames, options.sampling);
        let decoded = self.get_or_decode(key, || {
            let v = if is_url(src) {
                load_video_with(src, policy, &Cancel::new(), &RequestPixels::default(), options)
                    .map_err(|e| format!("video {src}: {}", e.message))?
            } else {
                decode_video_file(Path::new(src), options).map_err(|e| format!("video {e}"))?
            };
            Ok(Media::Video(v))
        })?;
        match decoded {
            Media::Video(v) => Ok(v),
            Media::Image(_) => Err(format!("video {src}: not a video")),
        }
    }
}

/// Counting permits: how many rows may be between "media decoding started" and "result written".
struct Permits {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Permits {
    fn acquire(&self) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
    }

    fn release(&self) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cv.notify_one();
    }
}

enum Msg {
    /// A row's media are decoded (or failed to).
    Prepared(Row, std::result::Result<(GenerationRequest, f64), String>),
    /// A row's answer is complete (or failed).
    Done(Row, f64, std::result::Result<(GeneratedSequence, RequestTimings), String>),
}

/// Waits for a request's end on its own thread and reports it on `tx`.
fn collect(row: Row, media_ms: f64, mut handle: videollava::engine::RequestHandle, tx: mpsc::Sender<Msg>) {
    std::thread::spawn(move || {
        let mut outcome = Err("the engine stopped before the row finished".to_string());
        while let Some(event) = handle.events.blocking_recv() {
            match event {
                StreamEvent::Token { .. } => {}
                StreamEvent::Finished { sequence, timings } => {
                    outcome = Ok((sequence, timings));
                    break;
                }
                StreamEvent::Failed { message, .. } => {
                    outcome = Err(message);
                    break;
                }
            }
        }
        let _ = tx.send(Msg::Done(row, media_ms, outcome));
    });
}

fn error_line(id: &str, index: usize, message: &str) -> Value {
    json!({"id": id, "index": index, "error": message})
}

pub fn run(args: BatchArgs) -> Result<()> {
    let started = Instant::now();
    let manifest = read_manifest(&args.input)?;
    for (id, index) in &manifest.duplicates {
        eprintln!("warning: row {index} repeats the id `{id}` of an earlier row: skipped");
    }
    let (mut results, done) = ResultsFile::open(&args.output, !args.overwrite)
        .with_context(|| format!("opening the results file {}", args.output.display()))?;
    let shard = args.shard.unwrap_or(Shard::ALL);
    let mut todo = Vec::new();
    let mut bad = Vec::new();
    let (mut other_shards, mut already) = (0usize, 0usize);
    for entry in manifest.rows {
        let id = match &entry {
            Ok(r) => r.id.as_str(),
            Err(b) => b.id.as_str(),
        };
        if !shard.contains(id) {
            other_shards += 1;
        } else if done.contains(id) {
            already += 1;
        } else {
            match entry {
                Ok(row) => todo.push(row),
                Err(b) => bad.push(b),
            }
        }
    }
    let total = todo.len() + bad.len();
    let bar = progress_bar(total as u64);
    let (mut written, mut failed) = (0usize, 0usize);
    for b in &bad {
        results.append(&error_line(&b.id, b.index, &b.message))?;
        written += 1;
        failed += 1;
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }

    if !todo.is_empty() {
        let engine = args.model.load()?;
        let load_ms = engine.load_ms();
        let tok: TextTokenizer = engine.tokenizer().clone();
        let name = |id: Option<u32>| tok.token_name(id);
        let frames = args.num_frames.or(engine.processor().num_frames).unwrap_or(VideoOptions::default().num_frames);
        let ctx = Arc::new(RowContext {
            template: tok.chat_template.clone(),
            bos: name(tok.bos_token_id),
            eos: name(tok.eos_token_id),
            image_token: engine.processor().config.image_token.clone(),
            video_token: engine.processor().config.video_token.clone(),
            raw_prompt: args.raw_prompt,
            options: args.generation.options(engine.default_options()),
            video: VideoOptions { num_frames: frames, sampling: args.frame_sampling },
            policy: MediaPolicy {
                allowed_media_dir: None,
                allow_private_media_urls: args.allow_private_media_urls,
                limits: videollava_server::Limits::default(),
            },
            media: MediaCache { entries: Mutex::new(VecDeque::new()), capacity: 8 },
        });
        let max_batch = args.max_batch_size.max(1);
        let threads = args.decode_threads.max(1);
        let ahead = max_batch + threads;
        let kv_budget_bytes = args.kv_budget.bytes(&engine, &args.model);
        let config = SchedulerConfig { max_batch_size: max_batch, max_queue: ahead + 1, kv_budget_bytes };
        let scheduler = Scheduler::start(engine, config);

        let n_rows = todo.len();
        let queue = Arc::new(Mutex::new(VecDeque::from(todo)));
        let permits = Arc::new(Permits { free: Mutex::new(ahead), cv: Condvar::new() });
        let (tx, rx) = mpsc::channel::<Msg>();
        for _ in 0..threads {
            let (queue, permits, ctx, tx) = (queue.clone(), permits.clone(), ctx.clone(), tx.clone());
            std::thread::spawn(move || loop {
                permits.acquire();
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some(row) = next else {
                    permits.release();
                    return;
                };
                // A panic must not leave the row unreported (the run would wait for it forever).
                let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.prepare(&row)))
                    .unwrap_or_else(|_| Err("decoding this row's media panicked".to_string()));
                if tx.send(Msg::Prepared(row, prepared)).is_err() {
                    return;
                }
            });
        }

        let mut finished = 0;
        let top_logprobs = ctx.options.top_logprobs > 0;
        while finished < n_rows {
            let msg = rx.recv().context("the media threads stopped")?;
            let line = match msg {
                Msg::Prepared(row, Ok((request, media_ms))) => match scheduler.submit(request) {
                    Ok(handle) => {
                        collect(row, media_ms, handle, tx.clone());
                        continue;
                    }
                    Err(e) => error_line(&row.id, row.index, &e.to_string()),
                },
                Msg::Prepared(row, Err(message)) => error_line(&row.id, row.index, &message),
                Msg::Done(row, media_ms, Ok((sequence, t))) => {
                    let timings = StageTimings {
                        load_ms,
                        media_ms,
                        preprocess_ms: t.preprocess_ms,
                        vision_ms: t.vision_ms,
                        prefill_ms: t.prefill_ms - t.vision_ms,
                        decode_ms: t.decode_ms,
                    };
                    let mut obj = sequence_json(row.index, &sequence, &timings, &tok, top_logprobs);
                    obj["id"] = Value::String(row.id.clone());
                    obj
                }
                Msg::Done(row, _, Err(message)) => error_line(&row.id, row.index, &message),
            };
            if line.get("error").is_some() {
                failed += 1;
            }
            results.append(&line)?;
            permits.release();
            finished += 1;
            written += 1;
            if let Some(bar) = &bar {
                bar.inc(1);
                bar.set_message(format!("{failed} failed"));
            }
        }
        scheduler.shutdown();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "batch: {written} rows written to {} ({failed} failed) in {secs:.1} s ({:.2} rows/s); {already} already there{}{}",
        args.output.display(),
        written as f64 / secs.max(1e-9),
        if shard == Shard::ALL { String::new() } else { format!("; shard {shard}: {other_shards} rows of other shards") },
        if manifest.duplicates.is_empty() {
            String::new()
        } else {
            format!("; {} duplicate ids skipped", manifest.duplicates.len())
        },
    );
    Ok(())
}

/// Rows done, rows/s and ETA on stderr when it is a terminal.
fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || total == 0 {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} rows  {per_sec}  elapsed {elapsed}  ETA {eta}  {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}
