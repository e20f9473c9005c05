//! Continuous batching: one engine thread serves many requests.
//!
//! Requests wait in a bounded queue. At every step the engine thread admits waiting requests
//! while the batch has room: each is preprocessed; when its turn to prefill comes, its longest
//! cached prefix is looked up (so questions about one video admitted together reuse what the
//! first one's prefill cached) and the vision towers run for the rest; its prompt is prefilled on its own, one chunk ([`crate::model::VideoLlava::set_prefill_chunk`])
//! per step, so that the running rows get a decode step between chunks instead of waiting for a
//! whole long prompt. After its last chunk its first token is chosen and its KV cache rows join
//! the running batch's cache (left-padded so every row keeps its key distances). Each step ends
//! with one decode step that feeds the last token of every running row together. Rows that
//! finish, and rows whose client went away (the event receiver was dropped), leave the batch at
//! the next step.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::Engine;
use crate::batch_feature::ProcessorOutput;
use crate::error::{Error, Result};
use crate::generate::{check_context, decode_logits, GenerateOptions, GeneratedSequence, SequenceState};
use crate::media::{RgbImage, Video};
use crate::model::llama::KvCache;
use crate::model::prefix_cache::{PrefixCache, PrefixCacheStats, PrefixKey};
use crate::model::video_llava::PreparedPrompt;
use crate::model::KvCacheFormat;

/// Sizes of the batch and of the waiting queue, and the memory the running rows may claim.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences decoded together.
    pub max_batch_size: usize,
    /// Most requests waiting for a place; `submit` refuses more.
    pub max_queue: usize,
    /// Bytes of keys/values the rows being prefilled or decoded may claim together: a row claims
    /// its prompt plus `max_new_tokens` positions ([`kv_bytes_per_position`]) when its prefill
    /// starts, and a prompt waits (preprocessed, not prefilled) while it would not fit beside the
    /// rows already claimed; one row always runs. `None`: bounded by `max_batch_size` only.
    pub kv_budget_bytes: Option<usize>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { max_batch_size: 8, max_queue: 64, kv_budget_bytes: None }
    }
}

/// Bytes one prompt position of one row takes in `engine`'s KV cache, over all layers (keys and
/// values; an 8-bit cache: one byte per value plus an f32 scale per 32 values).
pub fn kv_bytes_per_position(engine: &Engine) -> usize {
    let model = engine.model();
    let t = &model.config.text_config;
    let values = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim;
    match model.kv_cache_format() {
        KvCacheFormat::Model => values * model.dtype.size_in_bytes(),
        KvCacheFormat::Q8_0 => values + values / 32 * 4,
    }
}

/// One request: a rendered prompt with `<image>` / `<video>` placeholders and its media.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: String,
    pub images: Vec<RgbImage>,
    pub videos: Vec<Video>,
    pub options: GenerateOptions,
}

/// Time spent by one request in each stage, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestTimings {
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    /// Vision towers and prompt prefill.
    pub prefill_ms: f64,
    /// The vision towers' share of `prefill_ms` (0 when the features came from the cache).
    pub vision_ms: f64,
    pub decode_ms: f64,
    /// From submission to the first token.
    pub time_to_first_token_ms: f64,
    /// Prompt positions taken from the prefix cache instead of the decoder.
    pub cached_prompt_tokens: usize,
}

/// What a request's receiver sees, in order: tokens, then one `Finished` or `Failed`.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    Token {
        token_id: u32,
        text: String,
        logprob: f32,
        top_logprobs: Vec<(u32, f32)>,
    },
    Finished {
        sequence: GeneratedSequence,
        timings: RequestTimings,
    },
    /// `client_error`: the request itself was at fault (bad media, placeholders, too long).
    Failed {
        message: String,
        client_error: bool,
    },
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What clients of the scheduler need to know about the loaded checkpoint.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model_dir: PathBuf,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    pub max_position_embeddings: usize,
    pub default_options: GenerateOptions,
    /// Placeholder tokens of one image, and of one video frame, when the processor's output size
    /// does not depend on the input (so a request's media tokens are known before decoding).
    pub image_tokens: Option<usize>,
    pub video_tokens_per_frame: Option<usize>,
}

/// Queue and batch occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerStats {
    pub queue_depth: usize,
    pub running: usize,
    pub max_batch_size: usize,
    /// Cached positions of running requests whose keys and values a decode step reads from
    /// another request's (the same bits: e.g. questions about one video), not their own.
    pub shared_positions: usize,
    /// Positions decode steps have read from another request's keys and values so far (each
    /// step adds `shared_positions`).
    pub shared_position_reads: u64,
}

/// A submitted request. Dropping `events` cancels it.
pub struct RequestHandle {
    pub events: UnboundedReceiver<StreamEvent>,
}

struct Job {
    request: GenerationRequest,
    tx: UnboundedSender<StreamEvent>,
    submitted: Instant,
}

struct Shared {
    queue: Mutex<VecDeque<Job>>,
    wake: Condvar,
    closing: AtomicBool,
    /// False once the engine thread has ended (shut down, or died of a panic outside a request).
    alive: AtomicBool,
    running: AtomicUsize,
    /// [`KvCache::shared_positions`] of the running batch.
    shared_positions: AtomicUsize,
    shared_position_reads: AtomicU64,
    config: SchedulerConfig,
}

/// A handle on the engine thread; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
    info: Arc<EngineInfo>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    prefix_cache: Arc<Mutex<PrefixCache>>,
}

impl Scheduler {
    /// Starts the engine thread.
    pub fn start(engine: Engine, config: SchedulerConfig) -> Scheduler {
        let config = SchedulerConfig { max_batch_size: config.max_batch_size.max(1), ..config };
        let tok = engine.tokenizer();
        let name = |id: Option<u32>| tok.token_name(id);
        let info = EngineInfo {
            model_dir: engine.model_dir().to_path_buf(),
            chat_template: tok.chat_template.clone(),
            bos_token: name(tok.bos_token_id),
            eos_token: name(tok.eos_token_id),
            max_position_embeddings: engine.model().config.text_config.max_position_embeddings,
            default_options: engine.default_options(),
            image_tokens: engine
                .processor
                .image_processor
                .fixed_output_size()
                .map(|(h, w)| engine.processor().image_token_count(h, w)),
            video_tokens_per_frame: engine
                .processor
                .image_processor
                .fixed_output_size()
                .map(|(h, w)| engine.processor().video_token_count(1, h, w)),
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            closing: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            running: AtomicUsize::new(0),
            shared_positions: AtomicUsize::new(0),
            shared_position_reads: AtomicU64::new(0),
            config,
        });
        let worker = shared.clone();
        let prefix_cache = engine.model().prefix_cache();
        let thread = std::thread::Builder::new()
            .name("videollava-engine".into())
            .spawn(move || {
                // Marks the engine gone however the loop ends (a panic included) and fails the
                // requests still queued rather than leaving them waiting forever.
                struct Alive(Arc<Shared>);
                impl Drop for Alive {
                    fn drop(&mut self) {
                        self.0.alive.store(false, Ordering::SeqCst);
                        let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
                        for job in q.drain(..) {
                            failed(&job.tx, &Error::Model("the engine stopped".into()));
                        }
                    }
                }
                let _alive = Alive(worker.clone());
                run_loop(engine, worker)
            })
            .expect("spawn the engine thread");
        Scheduler { shared, info: Arc::new(info), thread: Arc::new(Mutex::new(Some(thread))), prefix_cache }
    }

    /// Queues a request; its events arrive on the returned handle.
    pub fn submit(&self, request: GenerationRequest) -> std::result::Result<RequestHandle, SubmitError> {
        if self.shared.closing.load(Ordering::SeqCst) || !self.is_alive() {
            return Err(SubmitError::ShuttingDown);
        }
        let (tx, rx) = unbounded_channel();
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= self.shared.config.max_queue {
                return Err(SubmitError::QueueFull);
            }
            q.push_back(Job { request, tx, submitted: Instant::now() });
        }
        self.shared.wake.notify_all();
        Ok(RequestHandle { events: rx })
    }

    /// Whether the engine thread is running (false after shutdown or if it died).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            queue_depth: self.shared.queue.lock().map(|q| q.len()).unwrap_or(0),
            running: self.shared.running.load(Ordering::SeqCst),
            max_batch_size: self.shared.config.max_batch_size,
            shared_positions: self.shared.shared_positions.load(Ordering::SeqCst),
            shared_position_reads: self.shared.shared_position_reads.load(Ordering::SeqCst),
        }
    }

    /// Hits, reused positions and bytes of the engine's prefix cache.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.prefix_cache.lock().map(|c| c.stats()).unwrap_or_default()
    }

    /// Stops accepting requests, lets queued and running ones finish, and waits for the thread.
    pub fn shutdown(&self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// A request in the running batch (row `i` of the batch cache).
struct Active {
    /// KV bytes this row claims against [`SchedulerConfig::kv_budget_bytes`].
    claim: usize,
    state: SequenceState,
    options: GenerateOptions,
    tx: UnboundedSender<StreamEvent>,
    timings: RequestTimings,
    decode_started: Instant,
}

impl Active {
    fn emit_step(&mut self, out: crate::generate::StepOutput) {
        let _ = self.tx.send(StreamEvent::Token {
            token_id: out.token_id,
            text: out.text_delta,
            logprob: out.logprob,
            top_logprobs: out.top_logprobs,
        });
    }

    fn finish(self) {
        let mut timings = self.timings;
        timings.decode_ms = self.decode_started.elapsed().as_secs_f64() * 1e3;
        let _ = self.tx.send(StreamEvent::Finished { sequence: self.state.into_result(), timings });
    }
}

fn failed(tx: &UnboundedSender<StreamEvent>, e: &Error) {
    let client_error = matches!(e, Error::Input(_) | Error::Media { .. } | Error::Tokenizer(_));
    let _ = tx.send(StreamEvent::Failed { message: e.to_string(), client_error });
}

/// Runs one request's (or one batch step's) work; a panic becomes an error, so that it fails
/// what it was serving and the engine thread goes on with the other requests.
fn isolate<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let detail = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            Err(Error::Model(format!("internal error during {what}: panic: {detail}")))
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A request whose prompt is going through the decoder, one chunk per scheduler step.
struct Prefilling {
    tx: UnboundedSender<StreamEvent>,
    options: GenerateOptions,
    submitted: Instant,
    timings: RequestTimings,
    ids: Vec<u32>,
    /// The processor's output until the prefill starts (then `None`).
    inputs: Option<ProcessorOutput>,
    /// Embeddings after the cached prefix, made when the prefill starts: the prefix is looked
    /// up then, not at admission, so a prompt admitted beside another about the same media
    /// reuses the keys/values that one's prefill has just cached (and skips the vision towers).
    prompt: Option<PreparedPrompt>,
    positions: Tensor,
    /// Prompt positions already in `cache` (from the prefix cache, then from earlier chunks).
    done: usize,
    /// The prompt's prefix-cache key (`None`: not cached).
    prefix_key: Option<PrefixKey>,
    cache: KvCache,
    decoder_ms: f64,
    /// KV bytes the row will claim: prompt plus `max_new_tokens` positions.
    claim: usize,
}

/// Preprocesses a request (processor, context check); its prompt then goes through the decoder
/// in [`prefill_step`]s.
fn start_prefill(engine: &Engine, job: Job) -> std::result::Result<Prefilling, (UnboundedSender<StreamEvent>, Error)> {
    let Job { request, tx, submitted } = job;
    let run = || -> Result<Prefilling> {
        request.options.validate()?;
        let mut timings = RequestTimings { queue_ms: ms(submitted), ..Default::default() };
        let t = Instant::now();
        let inputs = engine.processor().process(&[request.prompt.as_str()], &request.images, &request.videos)?;
        timings.preprocess_ms = ms(t);
        let max_ctx = engine.model().config.text_config.max_position_embeddings;
        check_context("the prompt", inputs.seq_len, max_ctx)?;
        let model = &engine.model();
        let l = inputs.seq_len;
        let ids: Vec<u32> = inputs.input_ids.iter().map(|&x| x as u32).collect();
        let positions = Tensor::from_vec((0..l as u32).collect::<Vec<_>>(), (1, l), &model.device)?;
        let prefix_key = model.prefix_key(&inputs);
        Ok(Prefilling {
            tx: tx.clone(),
            options: request.options.clone(),
            submitted,
            timings,
            ids,
            inputs: Some(inputs),
            prompt: None,
            positions,
            done: 0,
            prefix_key,
            cache: KvCache::default(),
            decoder_ms: 0.0,
            claim: (l + request.options.max_new_tokens).saturating_mul(kv_bytes_per_position(engine)),
        })
    };
    isolate("preprocessing", run).map_err(|e| (tx.clone(), e))
}

/// The embeddings of `p`'s prompt after its longest cached prefix (same tokens, same media), if
/// any, whose keys/values become the start of `p.cache`: only the rest goes through the decoder
/// (a failing lookup only costs the reuse). The vision towers run here for what is not cached.
fn start_decoder(engine: &Engine, p: &mut Prefilling) -> Result<()> {
    let Some(inputs) = p.inputs.take() else { return Ok(()) };
    let model = &engine.model();
    let hit = p.prefix_key.as_ref().and_then(|k| model.cached_prefix(k).unwrap_or(None));
    let (done, cache) = hit.unwrap_or_default();
    p.timings.cached_prompt_tokens = done;
    p.prompt = Some(model.prepare_prompt_after(&inputs, p.prefix_key.as_ref(), done)?);
    (p.done, p.cache) = (done, cache);
    Ok(())
}

/// Runs the next chunk of `p`'s prompt. After the last one, chooses the first token and returns
/// the request's running state and its cache row.
fn prefill_step(engine: &Engine, p: &mut Prefilling) -> Result<Option<(Active, KvCache)>> {
    if p.inputs.is_some() {
        let t = Instant::now();
        start_decoder(engine, p)?;
        log::debug!("prefix lookup and vision towers: {:.0} ms, {} positions reused", ms(t), p.done);
    }
    let model = &engine.model();
    let prompt = p.prompt.as_ref().ok_or_else(|| Error::Model("prefill without a prepared prompt".into()))?;
    let t = Instant::now();
    let n = model.prefill_chunk_len(prompt.len).min(prompt.len - p.done);
    let logits = model.prefill_part(prompt, &p.positions, p.done, n, &mut p.cache)?;
    p.done += n;
    p.decoder_ms += ms(t);
    let Some(logits) = logits else { return Ok(None) };
    let mut timings = p.timings;
    let vision_ms = prompt.vision_ms;
    timings.prefill_ms = vision_ms + p.decoder_ms;
    timings.vision_ms = vision_ms;
    let max_ctx = model.config.text_config.max_position_embeddings;
    let mut state = SequenceState::new(0, std::mem::take(&mut p.ids), &p.options);
    let row = logits.to_vec2::<f32>()?.remove(0);
    let out = state.step(&row, &p.options, engine.tokenizer(), max_ctx)?;
    timings.time_to_first_token_ms = ms(p.submitted);
    let mut active = Active {
        claim: p.claim,
        state,
        options: p.options.clone(),
        tx: p.tx.clone(),
        timings,
        decode_started: Instant::now(),
    };
    active.emit_step(out);
    // After the first token went out: keeping the prefix copies the prompt's keys/values.
    if let Some(key) = p.prefix_key.take() {
        let t = Instant::now();
        if let Err(e) = model.cache_prefix(&key, &p.cache) {
            log::warn!("prefix not cached: {e}");
        }
        log::debug!("prefix cached: {:.0} ms", ms(t));
    }
    Ok(Some((active, std::mem::take(&mut p.cache))))
}

fn run_loop(engine: Engine, shared: Arc<Shared>) {
    let mut cache = KvCache::default();
    let mut rows: Vec<Active> = Vec::new();
    // Admitted requests whose prompts are being prefilled, first come first served.
    let mut pending: VecDeque<Prefilling> = VecDeque::new();
    let max_ctx = engine.model().config.text_config.max_position_embeddings;
    loop {
        // Admit waiting requests while the batch has room.
        let jobs: Vec<Job> = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            if rows.is_empty() && pending.is_empty() && q.is_empty() {
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                let (guard, _) =
                    shared.wake.wait_timeout(q, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner());
                q = guard;
            }
            let room = shared.config.max_batch_size.saturating_sub(rows.len() + pending.len());
            let n = room.min(q.len());
            q.drain(..n).collect()
        };
        for job in jobs {
            if job.tx.is_closed() {
                continue; // the client left while waiting
            }
            match start_prefill(&engine, job) {
                Ok(p) => pending.push_back(p),
                Err((tx, e)) => failed(&tx, &e),
            }
        }
        // Counted as running from admission (its first token can reach the client before the
        // prefill step below returns).
        shared.running.store(rows.len() + pending.len(), Ordering::SeqCst);

        // One chunk of the oldest prompt being prefilled: a long prompt is cut into chunks with
        // decode steps of the running rows in between, so they keep streaming meanwhile.
        let claimed: usize = rows.iter().map(|r| r.claim).sum();
        if let Some(p) = pending.front_mut() {
            let fits = shared.config.kv_budget_bytes.is_none_or(|b| claimed.saturating_add(p.claim) <= b);
            if p.tx.is_closed() {
                pending.pop_front(); // the client left during its prefill
            } else if !fits && !rows.is_empty() {
                // Waits (preprocessed) until running rows finish.
            } else {
                let t = Instant::now();
                let step = isolate("prefill", || prefill_step(&engine, p));
                log::debug!("prefill chunk: {:.0} ms", ms(t));
                match step {
                    Ok(None) => {}
                    Ok(Some((active, row_cache))) => {
                        pending.pop_front();
                        let t = Instant::now();
                        match cache.append_rows(row_cache, shared.config.max_batch_size) {
                            Ok(()) => rows.push(active),
                            Err(e) => failed(&active.tx, &e),
                        }
                        log::debug!(
                            "row joined the batch ({} rows, {} positions read from another row): {:.0} ms",
                            rows.len(),
                            cache.shared_positions(),
                            ms(t)
                        );
                    }
                    Err(e) => {
                        if let Some(p) = pending.pop_front() {
                            failed(&p.tx, &e);
                        }
                    }
                }
            }
        }
        shared.running.store(rows.len() + pending.len(), Ordering::SeqCst);
        if rows.is_empty() {
            continue;
        }

        // Drop finished rows and rows whose client went away.
        let keep: Vec<usize> =
            (0..rows.len()).filter(|&i| rows[i].state.finish.is_none() && !rows[i].tx.is_closed()).collect();
        if keep.len() != rows.len() {
            let mut kept = Vec::with_capacity(keep.len());
            for (i, row) in rows.drain(..).enumerate() {
                if keep.contains(&i) {
                    kept.push(row);
                } else if row.state.finish.is_some() {
                    row.finish();
                }
            }
            rows = kept;
            let t = Instant::now();
            let ok = if rows.is_empty() {
                cache = KvCache::default();
                Ok(())
            } else {
                cache.retain_rows(&keep).and_then(|_| cache.compact())
            };
            if let Err(e) = ok {
                fail_all(&mut rows, &mut cache, &e);
            }
            shared.shared_positions.store(cache.shared_positions(), Ordering::SeqCst);
            log::debug!("rows left the batch ({} rows): {:.0} ms", rows.len(), ms(t));
            shared.running.store(rows.len() + pending.len(), Ordering::SeqCst);
            if rows.is_empty() {
                continue;
            }
        }

        // One decode step for the whole batch.
        let t = Instant::now();
        let sharing = cache.shared_positions();
        if let Err(e) = isolate("a decode step", || decode_step(&engine, &mut rows, &mut cache, max_ctx)) {
            fail_all(&mut rows, &mut cache, &e);
            shared.running.store(pending.len(), Ordering::SeqCst);
        } else {
            shared.shared_position_reads.fetch_add(sharing as u64, Ordering::SeqCst);
        }
        log::debug!("decode step ({} rows): {:.0} ms", rows.len(), ms(t));
        shared.shared_positions.store(cache.shared_positions(), Ordering::SeqCst);
    }
}

/// One decode step of the running batch, through the decode step every generation path runs
/// ([`decode_logits`]).
fn decode_step(engine: &Engine, rows: &mut [Active], cache: &mut KvCache, max_ctx: usize) -> Result<()> {
    let states: Vec<&SequenceState> = rows.iter().map(|r| &r.state).collect();
    let logits = decode_logits(&engine.model(), &states, cache)?;
    for (row, lg) in rows.iter_mut().zip(&logits) {
        let out = row.state.step(lg, &row.options, engine.tokenizer(), max_ctx)?;
        row.emit_step(out);
    }
    Ok(())
}

fn fail_all(rows: &mut Vec<Active>, cache: &mut KvCache, e: &Error) {
    for row in rows.drain(..) {
        let _ = row.tx.send(StreamEvent::Failed { message: e.to_string(), client_error: false });
    }
    *cache = KvCache::default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_of_that_request() {
        let e = isolate("preprocessing", || -> Result<()> { panic!("index out of bounds") }).unwrap_err();
        assert!(matches!(e, Error::Model(_)));
        assert!(e.to_string().contains("panic: index out of bounds"), "{e}");
        assert_eq!(isolate("x", || Ok(3)).unwrap(), 3);
    }
}
