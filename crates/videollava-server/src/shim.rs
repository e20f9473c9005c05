//! A stand-in for `videollava::engine::scheduler` with the same API (one request at a time, no
//! batching), used until the real scheduler lands. Swap `crate::engine_api` to the real module.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use videollava::engine::Engine;
use videollava::generate::{GenerateOptions, GeneratedSequence};
use videollava::media::{RgbImage, Video};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_batch_size: usize,
    pub max_queue: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { max_batch_size: 8, max_queue: 64 }
    }
}

pub struct GenerationRequest {
    pub prompt: String,
    pub images: Vec<RgbImage>,
    pub videos: Vec<Video>,
    pub options: GenerateOptions,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestTimings {
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub time_to_first_token_ms: f64,
}

#[derive(Debug)]
pub enum StreamEvent {
    Token { token_id: u32, text: String, logprob: f32, top_logprobs: Vec<(u32, f32)> },
    Finished { sequence: GeneratedSequence, timings: RequestTimings },
    Failed { message: String, client_error: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model_dir: PathBuf,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    pub max_position_embeddings: usize,
    pub default_options: GenerateOptions,
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerStats {
    pub queue_depth: usize,
    pub running: usize,
    pub max_batch_size: usize,
}

pub struct RequestHandle {
    pub events: mpsc::UnboundedReceiver<StreamEvent>,
}

struct Job {
    req: GenerationRequest,
    tx: mpsc::UnboundedSender<StreamEvent>,
    queued: Instant,
}

struct Inner {
    info: EngineInfo,
    config: SchedulerConfig,
    queue: Mutex<std::collections::VecDeque<Job>>,
    cv: std::sync::Condvar,
    queued: AtomicUsize,
    running: AtomicUsize,
    stopping: AtomicBool,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    pub fn start(engine: Engine, config: SchedulerConfig) -> Scheduler {
        let tok = engine.tokenizer();
        let name = |id: Option<u32>| id.and_then(|i| tok.inner().id_to_token(i)).unwrap_or_default();
        let info = EngineInfo {
            model_dir: engine.model_dir.clone(),
            chat_template: tok.chat_template.clone(),
            bos_token: name(tok.bos_token_id),
            eos_token: name(tok.eos_token_id),
            max_position_embeddings: engine.checkpoint.model.text_config.max_position_embeddings,
            default_options: engine.default_options(),
        };
        let inner = Arc::new(Inner {
            info,
            config,
            queue: Mutex::new(Default::default()),
            cv: Default::default(),
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let worker = inner.clone();
        std::thread::spawn(move || loop {
            let job = {
                let mut q = worker.queue.lock().unwrap();
                loop {
                    if let Some(j) = q.pop_front() {
                        break Some(j);
                    }
                    if worker.stopping.load(Ordering::SeqCst) {
                        break None;
                    }
                    q = worker.cv.wait(q).unwrap();
                }
            };
            let Some(job) = job else { return };
            worker.queued.fetch_sub(1, Ordering::SeqCst);
            if job.tx.is_closed() {
                continue;
            }
            worker.running.fetch_add(1, Ordering::SeqCst);
            let queue_ms = job.queued.elapsed().as_secs_f64() * 1e3;
            let start = Instant::now();
            let mut ttft = None;
            let tx = job.tx.clone();
            let top_n = job.req.options.top_logprobs;
            let mut step = 0usize;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.generate(&[job.req.prompt.as_str()], &job.req.images, &job.req.videos, &job.req.options, &mut |ev| {
                    if ttft.is_none() {
                        ttft = Some(start.elapsed().as_secs_f64() * 1e3);
                    }
                    if ev.logprob.is_nan() {
                        // trailing text released at the end (not a new token)
                        let _ = tx.send(StreamEvent::Token { token_id: ev.token_id, text: ev.text_delta.to_string(), logprob: f32::NAN, top_logprobs: vec![] });
                        return;
                    }
                    step += 1;
                    let _ = tx.send(StreamEvent::Token {
                        token_id: ev.token_id,
                        text: ev.text_delta.to_string(),
                        logprob: ev.logprob,
                        top_logprobs: Vec::with_capacity(top_n),
                    });
                })
            }));
            worker.running.fetch_sub(1, Ordering::SeqCst);
            let ev = match result {
                Ok(Ok((mut seqs, t))) => StreamEvent::Finished {
                    sequence: seqs.remove(0),
                    timings: RequestTimings {
                        queue_ms,
                        preprocess_ms: t.preprocess_ms,
                        prefill_ms: t.vision_ms + t.prefill_ms,
                        decode_ms: t.decode_ms,
                        time_to_first_token_ms: ttft.unwrap_or(0.0),
                    },
                },
                Ok(Err(e)) => {
                    let client_error = matches!(e, videollava::Error::Input(_) | videollava::Error::Media { .. });
                    StreamEvent::Failed { message: e.to_string(), client_error }
                }
                Err(_) => StreamEvent::Failed { message: "internal error: generation panicked".into(), client_error: false },
            };
            let _ = job.tx.send(ev);
        });
        Scheduler { inner }
    }

    pub fn submit(&self, req: GenerationRequest) -> Result<RequestHandle, SubmitError> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let mut q = self.inner.queue.lock().unwrap();
        if q.len() >= self.inner.config.max_queue {
            return Err(SubmitError::QueueFull);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        q.push_back(Job { req, tx, queued: Instant::now() });
        self.inner.queued.fetch_add(1, Ordering::SeqCst);
        self.inner.cv.notify_one();
        Ok(RequestHandle { events: rx })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.inner.info
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            queue_depth: self.inner.queued.load(Ordering::SeqCst),
            running: self.inner.running.load(Ordering::SeqCst),
            max_batch_size: self.inner.config.max_batch_size,
        }
    }

    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _q = self.inner.queue.lock().unwrap();
        self.inner.cv.notify_all();
    }
}
