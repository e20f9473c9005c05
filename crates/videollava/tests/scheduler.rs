//! Continuous batching: requests served together give what each gives alone.

use std::time::Duration;

use crate::common::fixtures_dir;
use candle_core::Device;
use videollava::engine::{
    DTypeChoice, Engine, GenerationRequest, Scheduler, SchedulerConfig, StreamEvent, SubmitError,
};
use videollava::generate::{GenerateOptions, GeneratedSequence};
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, VideoOptions};
use videollava::media::{RgbImage, Video};
use videollava::model::KvCacheFormat;

fn engine(name: &str) -> Engine {
    Engine::load(&fixtures_dir().join("checkpoints").join(name), DTypeChoice::F32, &Device::Cpu).unwrap()
}

fn media() -> (RgbImage, Video) {
    let m = fixtures_dir().join("media");
    (
        decode_image_file(&m.join("landscape.png")).unwrap(),
        decode_video_file(&m.join("clip.mp4"), &VideoOptions { num_frames: 8, ..Default::default() }).unwrap(),
    )
}

/// Varied requests: text, image, video; different lengths and token budgets.
fn requests(engine: &Engine) -> Vec<GenerationRequest> {
    let (image, video) = media();
    let q = |text: &str, i: usize, v: usize| engine.question_prompt(text, i, v).unwrap();
    let opts = |n: usize| GenerateOptions { max_new_tokens: n, ignore_eos: true, ..engine.default_options() };
    vec![
        GenerationRequest {
            prompt: q("What is this?", 1, 0),
            images: vec![image.clone()],
            videos: vec![],
            options: opts(9),
        },
        GenerationRequest {
            prompt: q("Why is this video funny?", 0, 1),
            images: vec![],
            videos: vec![video.clone()],
            options: opts(14),
        },
        GenerationRequest {
            prompt: q("Tell me a joke about rabbits and the forest.", 0, 0),
            images: vec![],
            videos: vec![],
            options: opts(5),
        },
        GenerationRequest {
            prompt: q("Compare them.", 1, 1),
            images: vec![image.clone()],
            videos: vec![video.clone()],
            options: opts(11),
        },
        GenerationRequest {
            prompt: q("Describe it.", 1, 0),
            images: vec![image.clone()],
            videos: vec![],
            options: opts(3),
        },
        GenerationRequest { prompt: q("Hi", 0, 0), images: vec![], videos: vec![], options: opts(16) },
        GenerationRequest {
            prompt: q("What happens next in the video?", 0, 1),
            images: vec![],
            videos: vec![video.clone()],
            options: opts(7),
        },
        GenerationRequest { prompt: q("One word.", 1, 0), images: vec![image], videos: vec![], options: opts(1) },
    ]
}

fn solo(engine: &Engine, r: &GenerationRequest) -> GeneratedSequence {
    engine.generate(&[r.prompt.as_str()], &r.images, &r.videos, &r.options, &mut |_| {}).unwrap().0.remove(0)
}

/// Collects a request's events: streamed text and the final sequence.
fn collect(mut h: videollava::engine::RequestHandle) -> (String, GeneratedSequence) {
    let mut text = String::new();
    loop {
        match h.events.blocking_recv().expect("events end with Finished or Failed") {
            StreamEvent::Token { text: t, .. } => text.push_str(&t),
            StreamEvent::Finished { sequence, .. } => return (text, sequence),
            StreamEvent::Failed { message, .. } => panic!("request failed: {message}"),
        }
    }
}

fn check_concurrent(name: &str) {
    check_concurrent_with(name, KvCacheFormat::Model, 0)
}

fn check_concurrent_with(name: &str, kv: KvCacheFormat, prefill_chunk: usize) {
    let engine = |name: &str| {
        let mut e = engine(name);
        e.model_mut().set_kv_cache_format(kv);
        e.model_mut().set_prefill_chunk(prefill_chunk);
        // Batching alone: requests about the same media admitted together would otherwise reuse
        // each other's prefixes, which with a chunk of 0 may round differently (see
        // `model::prefix_cache`; tests/prefix_cache.rs checks hits, chunked, bit for bit).
        e.model().set_prefix_cache_capacity(0);
        e
    };
    let reference = engine(name);
    let reqs = requests(&reference);
    let want: Vec<GeneratedSequence> = reqs.iter().map(|r| solo(&reference, r)).collect();
    let scheduler =
        Scheduler::start(engine(name), SchedulerConfig { max_batch_size: 4, max_queue: 16, ..Default::default() });
    // Submit from several threads at staggered times so requests join a running batch.
    let handles: Vec<_> = reqs
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let s = scheduler.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(7 * i as u64));
                collect(s.submit(r).unwrap())
            })
        })
        .collect();
    for (i, (h, want)) in handles.into_iter().zip(&want).enumerate() {
        let (streamed, got) = h.join().unwrap();
        assert_eq!(got.token_ids, want.token_ids, "{name}: request {i} differs from running alone");
        assert_eq!(got.text, want.text);
        assert_eq!(streamed, got.text, "streamed deltas concatenate to the text");
        let max = got.logprobs.iter().zip(&want.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // An 8-bit cache read through the dense kernel (the portable set: the decode kernel
        // needs AVX2): left padding moves keys to other summation lanes, and an f32
        // rounding difference can flip one 8-bit code of a later key (a step of amax/127), which
        // moves logprobs by up to ~5e-4 here (measured); greedy ids must still be equal. The
        // in-place kernel is layout-independent: 1e-4 there.
        let dense_q8 = kv == KvCacheFormat::Q8_0 && !videollava::kernels::cpu::features().avx2;
        let tol = if dense_q8 { 2e-3 } else { 1e-4 };
        assert!(max < tol, "{name}: request {i} logprobs differ by {max} (tolerance {tol})");
    }
    scheduler.shutdown();
}

#[test]
fn concurrent_requests_get_their_solo_answers_llama() {
    check_concurrent("model-llama");
}

#[test]
fn concurrent_requests_get_their_solo_answers_mistral_sliding_window() {
    check_concurrent("model-mistral-full");
}

/// With the 8-bit KV cache: rows joining, leaving and left-padded keep their answers too
/// (quantization is per position and head, so batching changes nothing).
#[test]
fn concurrent_requests_get_their_solo_answers_with_an_8bit_kv_cache() {
    check_concurrent_with("model-llama", KvCacheFormat::Q8_0, 0);
    check_concurrent_with("model-mistral-full", KvCacheFormat::Q8_0, 0);
}

/// Prompts prefilled 16 positions per scheduler step, with decode steps of the running rows in
/// between: every request still gets its solo answer.
#[test]
fn concurrent_requests_get_their_solo_answers_with_a_chunked_prefill() {
    check_concurrent_with("model-llama", KvCacheFormat::Model, 16);
    check_concurrent_with("model-mistral-full", KvCacheFormat::Q8_0, 16);
}

#[test]
fn a_dropped_receiver_frees_its_slot_and_bad_requests_fail_alone() {
    let e = engine("model-llama");
    let mut reqs = requests(&e);
    let long = GenerationRequest {
        options: GenerateOptions { max_new_tokens: 2000, ignore_eos: true, ..e.default_options() },
        ..reqs[5].clone()
    };
    let scheduler = Scheduler::start(e, SchedulerConfig { max_batch_size: 2, max_queue: 2, ..Default::default() });
    let mut h = scheduler.submit(long).unwrap();
    // Wait until it runs, then leave.
    assert!(matches!(h.events.blocking_recv(), Some(StreamEvent::Token { .. })));
    assert_eq!(scheduler.stats().running, 1);
    drop(h);
    let t = std::time::Instant::now();
    while scheduler.stats().running != 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the cancelled request kept its slot");
        std::thread::sleep(Duration::from_millis(5));
    }

    // A request with more placeholders than media fails alone; the next one is served.
    let mut bad = reqs.remove(0);
    bad.images.clear();
    let mut hb = scheduler.submit(bad).unwrap();
    match hb.events.blocking_recv() {
        Some(StreamEvent::Failed { message, client_error }) => {
            assert!(client_error);
            assert!(message.contains("<image>"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let (_, ok) = collect(scheduler.submit(reqs[1].clone()).unwrap());
    assert_eq!(ok.token_ids.len(), 5);
    scheduler.shutdown();
    assert_eq!(scheduler.submit(reqs[1].clone()).err(), Some(SubmitError::ShuttingDown));
}

#[test]
fn a_full_queue_refuses() {
    let e = engine("model-llama");
    let reqs = requests(&e);
    let long = GenerationRequest {
        options: GenerateOptions { max_new_tokens: 300, ignore_eos: true, ..e.default_options() },
        ..reqs[5].clone()
    };
    let scheduler = Scheduler::start(e, SchedulerConfig { max_batch_size: 1, max_queue: 1, ..Default::default() });
    let mut first = scheduler.submit(long.clone()).unwrap();
    assert!(matches!(first.events.blocking_recv(), Some(StreamEvent::Token { .. })));
    let _queued = scheduler.submit(long.clone()).unwrap();
    assert_eq!(scheduler.submit(long).err(), Some(SubmitError::QueueFull));
}

/// With a KV budget for one row, a second prompt waits until the first row has finished (its
/// first token comes after the first's end); without one, it is prefilled between the first
/// row's decode steps (its first token comes before that end). Same requests, same order.
#[test]
fn a_kv_budget_keeps_a_prompt_waiting_until_running_rows_finish() {
    for bounded in [false, true] {
        let e = engine("model-llama");
        let req = GenerationRequest {
            options: GenerateOptions { max_new_tokens: 40, ignore_eos: true, ..e.default_options() },
            ..requests(&e)[2].clone()
        };
        let prompt_len = e.processor().process(&[req.prompt.as_str()], &[], &[]).unwrap().seq_len;
        let claim = (prompt_len + 40) * videollava::engine::scheduler::kv_bytes_per_position(&e);
        // Room for one claim, not two.
        let budget = bounded.then_some(2 * claim - 1);
        let config = SchedulerConfig { max_batch_size: 4, max_queue: 4, kv_budget_bytes: budget };
        let scheduler = Scheduler::start(e, config);
        let (mut a, mut b) = (scheduler.submit(req.clone()).unwrap(), scheduler.submit(req).unwrap());
        // Events of both, in the order they were received by one reader polling both.
        let mut order = Vec::new();
        let (mut a_done, mut b_first) = (false, false);
        let t = std::time::Instant::now();
        while !(a_done && b_first) {
            assert!(t.elapsed() < Duration::from_secs(60), "no progress");
            while let Ok(ev) = a.events.try_recv() {
                if matches!(ev, StreamEvent::Finished { .. }) {
                    a_done = true;
                    order.push("a finished");
                }
            }
            while let Ok(ev) = b.events.try_recv() {
                if matches!(ev, StreamEvent::Token { .. }) && !b_first {
                    b_first = true;
                    order.push("b first token");
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let expected = if bounded { ["a finished", "b first token"] } else { ["b first token", "a finished"] };
        assert_eq!(order, expected, "kv budget {budget:?}");
        scheduler.shutdown();
    }
}
