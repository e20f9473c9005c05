//! The prefix cache through the scheduler: a prompt that starts like an earlier one (same
//! tokens, same media) reuses its keys/values and gets the same greedy tokens as with the cache
//! off; other media do not hit; saved prefixes survive a restart, foreign ones are ignored.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::fixtures_dir;
use candle_core::Device;
use videollava::engine::{
    DTypeChoice, Engine, GenerationRequest, RequestTimings, Scheduler, SchedulerConfig, StreamEvent,
};
use videollava::generate::{GenerateOptions, GeneratedSequence};
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, VideoOptions};
use videollava::model::KvCacheFormat;

/// Prefill chunk of these tests' engines.
const CHUNK: usize = 16;

fn engine(name: &str, dtype: DTypeChoice, kv: KvCacheFormat, prefix_bytes: usize) -> Engine {
    let mut e = Engine::load(&fixtures_dir().join("checkpoints").join(name), dtype, &Device::Cpu).unwrap();
    e.model_mut().set_kv_cache_format(kv);
    // Small chunks, so the tiny prompts span several.
    e.model_mut().set_prefill_chunk(CHUNK);
    e.model().set_prefix_cache_capacity(prefix_bytes);
    e
}

fn collect(mut h: videollava::engine::RequestHandle) -> (GeneratedSequence, RequestTimings) {
    loop {
        match h.events.blocking_recv().expect("events end with Finished or Failed") {
            StreamEvent::Token { .. } => {}
            StreamEvent::Finished { sequence, timings } => return (sequence, timings),
            StreamEvent::Failed { message, .. } => panic!("request failed: {message}"),
        }
    }
}

/// One request at a time (the batch is one row, as without the cache).
fn run(s: &Scheduler, r: &GenerationRequest) -> (GeneratedSequence, RequestTimings) {
    collect(s.submit(r.clone()).unwrap())
}

/// One past the last placeholder position of `r`'s processed prompt.
fn media_end(e: &Engine, r: &GenerationRequest) -> usize {
    let (inputs, _) = e.preprocess(&[r.prompt.as_str()], &r.images, &r.videos).unwrap();
    let (img, vid) = (e.model().config.image_token_id as i64, e.model().config.video_token_id as i64);
    inputs.input_ids.iter().rposition(|&t| t == img || t == vid).map(|p| p + 1).unwrap_or(0)
}

fn prompt_len(e: &Engine, r: &GenerationRequest) -> usize {
    e.preprocess(&[r.prompt.as_str()], &r.images, &r.videos).unwrap().0.seq_len
}

/// The requests, in order: a video question; the same again; the conversation's second turn
/// (history resent whole); the same question about another video; an image question and its
/// follow-up.
fn requests(e: &Engine, first_answer: Option<&str>) -> Vec<GenerationRequest> {
    let m = fixtures_dir().join("media");
    let opts = |n: usize| GenerateOptions { max_new_tokens: n, ignore_eos: true, ..e.default_options() };
    let vo = VideoOptions { num_frames: 8, ..Default::default() };
    let clip = decode_video_file(&m.join("clip.mp4"), &vo).unwrap();
    let other = decode_video_file(&m.join("short.webm"), &vo).unwrap();
    let image = decode_image_file(&m.join("landscape.png")).unwrap();
    let q = |text: &str, i: usize, v: usize| e.question_prompt(text, i, v).unwrap();
    let first = q("Why is this video funny?", 0, 1);
    let video = |prompt: String, v: &videollava::media::Video, n: usize| GenerationRequest {
        prompt,
        images: vec![],
        videos: vec![v.clone()],
        options: opts(n),
    };
    let eos = e.tokenizer().token_name(e.tokenizer().eos_token_id);
    let second = format!("{first} {}{eos}USER: And then what? ASSISTANT:", first_answer.unwrap_or("fine"));
    let image_q = q("Describe it.", 1, 0);
    vec![
        video(first.clone(), &clip, 6),
        video(first.clone(), &clip, 6),
        video(second, &clip, 5),
        video(first, &other, 4),
        GenerationRequest { prompt: image_q.clone(), images: vec![image.clone()], videos: vec![], options: opts(4) },
        GenerationRequest {
            prompt: format!("{image_q} a view{eos}USER: Which colours? ASSISTANT:"),
            images: vec![image],
            videos: vec![],
            options: opts(4),
        },
    ]
}

fn check(name: &str, dtype: DTypeChoice, kv: KvCacheFormat) {
    let tag = format!("{name} {dtype:?} {kv}");
    let off = engine(name, dtype, kv, 0);
    let r0 = requests(&off, None).remove(0);
    let turn1 =
        off.generate(&[r0.prompt.as_str()], &[], &r0.videos, &r0.options, &mut |_| {}).unwrap().0.remove(0).text;
    let reqs = requests(&off, Some(&turn1));
    let lens: Vec<usize> = reqs.iter().map(|r| prompt_len(&off, r)).collect();
    let media: Vec<usize> = reqs.iter().map(|r| media_end(&off, r)).collect();
    let config = SchedulerConfig { max_batch_size: 1, max_queue: 8, ..Default::default() };
    let without = Scheduler::start(off, config);
    let want: Vec<GeneratedSequence> = reqs.iter().map(|r| run(&without, r).0).collect();
    without.shutdown();
    assert_eq!(without.prefix_cache_stats().hits, 0, "{tag}: a zero budget caches nothing");

    let with = Scheduler::start(engine(name, dtype, kv, 64 << 20), config);
    let got: Vec<(GeneratedSequence, RequestTimings)> = reqs.iter().map(|r| run(&with, r)).collect();
    for (i, ((g, _), w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.token_ids, w.token_ids, "{tag}: request {i}: greedy ids differ with the prefix cache");
        assert_eq!(g.logprobs, w.logprobs, "{tag}: request {i}: the numbers are the same bit for bit");
    }
    let cached: Vec<usize> = got.iter().map(|(_, t)| t.cached_prompt_tokens).collect();
    // Hits are cut to a multiple of the prefill chunk (CHUNK). The first request finds nothing,
    // the same prompt again reuses all whole chunks before its last position, the second turn
    // at least the chunks its video fills.
    let whole = |n: usize| n / CHUNK * CHUNK;
    assert_eq!(cached[0], 0, "{tag}");
    assert_eq!(cached[1], whole(lens[1] - 1), "{tag}");
    assert!(cached[1] > 0, "{tag}");
    assert!(
        cached[2] >= whole(media[0]) && cached[2] > 0,
        "{tag}: second turn reused {}, video ends at {}",
        cached[2],
        media[0]
    );
    // Another video: only the text before the first placeholder can match.
    let video_positions = {
        let e = engine(name, dtype, kv, 0);
        let (inputs, _) = e.preprocess(&[reqs[3].prompt.as_str()], &[], &reqs[3].videos).unwrap();
        inputs.input_ids.iter().position(|&t| t == e.model().config.video_token_id as i64).unwrap()
    };
    assert!(cached[3] <= video_positions, "{tag}: another video reused {} positions", cached[3]);
    assert!(cached[5] >= whole(media[4]) && cached[5] > 0, "{tag}: the image follow-up reused {} positions", cached[5]);
    let s = with.prefix_cache_stats();
    assert!(s.hits >= 3 && s.bytes > 0 && s.bytes <= 64 << 20, "{tag}: {s:?}");
    assert_eq!(s.reused_tokens, cached.iter().sum::<usize>() as u64, "{tag}");
    with.shutdown();
}

#[test]
fn a_cache_hit_gives_the_same_greedy_tokens_llama_f32() {
    check("model-llama", DTypeChoice::F32, KvCacheFormat::Model);
}

#[test]
fn a_cache_hit_gives_the_same_greedy_tokens_llama_bf16_and_8bit_kv() {
    check("model-llama", DTypeChoice::BF16, KvCacheFormat::Model);
    check("model-llama", DTypeChoice::F32, KvCacheFormat::Q8_0);
    check("model-llama", DTypeChoice::BF16, KvCacheFormat::Q8_0);
}

#[test]
fn a_cache_hit_gives_the_same_greedy_tokens_mistral() {
    check("model-mistral-full", DTypeChoice::F32, KvCacheFormat::Model);
    check("model-mistral-full", DTypeChoice::BF16, KvCacheFormat::Q8_0);
}

/// With prefixes of any length reused: the same greedy tokens as with the cache off, and every
/// shared position reused (not only whole chunks).
fn check_any_length(name: &str, dtype: DTypeChoice, kv: KvCacheFormat) {
    let tag = format!("{name} {dtype:?} {kv} any length");
    let off = engine(name, dtype, kv, 0);
    let r0 = requests(&off, None).remove(0);
    let turn1 =
        off.generate(&[r0.prompt.as_str()], &[], &r0.videos, &r0.options, &mut |_| {}).unwrap().0.remove(0).text;
    let reqs = requests(&off, Some(&turn1));
    let ids: Vec<Vec<i64>> =
        reqs.iter().map(|r| off.preprocess(&[r.prompt.as_str()], &r.images, &r.videos).unwrap().0.input_ids).collect();
    let config = SchedulerConfig { max_batch_size: 1, max_queue: 8, ..Default::default() };
    let without = Scheduler::start(off, config);
    let want: Vec<GeneratedSequence> = reqs.iter().map(|r| run(&without, r).0).collect();
    without.shutdown();
    let mut e = engine(name, dtype, kv, 64 << 20);
    e.model_mut().set_prefix_any_length(true);
    let with = Scheduler::start(e, config);
    let got: Vec<(GeneratedSequence, RequestTimings)> = reqs.iter().map(|r| run(&with, r)).collect();
    for (i, ((g, _), w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.token_ids, w.token_ids, "{tag}: request {i}: greedy ids differ with the prefix cache");
    }
    let cached: Vec<usize> = got.iter().map(|(_, t)| t.cached_prompt_tokens).collect();
    let shared = |a: &[i64], b: &[i64]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    // The same prompt again: all but its last position; the second turn: everything it shares
    // with the first (the first turn's prompt), whatever the chunks.
    assert_eq!(cached[1], ids[1].len() - 1, "{tag}");
    assert_eq!(cached[2], shared(&ids[2], &ids[0]), "{tag}");
    assert!(cached[2] % CHUNK != 0 || cached[1] % CHUNK != 0, "{tag}: {cached:?} all whole chunks");
    with.shutdown();
}

#[test]
fn any_length_reuse_gives_the_same_greedy_tokens() {
    check_any_length("model-llama", DTypeChoice::F32, KvCacheFormat::Model);
    check_any_length("model-llama", DTypeChoice::BF16, KvCacheFormat::Model);
    check_any_length("model-llama", DTypeChoice::BF16, KvCacheFormat::Q8_0);
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("videollava-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn saved_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        })
        .unwrap_or_default()
}

/// A saved media prefix is used by a new engine (a restart); a damaged or foreign one is
/// ignored, and the answer is the same every time.
#[test]
fn saved_prefixes_survive_a_restart_and_foreign_files_are_ignored() {
    let dir = temp_dir("saved-prefix");
    let name = "model-llama";
    let fresh = |dir: Option<&Path>| {
        let e = engine(name, DTypeChoice::F32, KvCacheFormat::Model, 64 << 20);
        e.set_prefix_cache_dir(dir).unwrap();
        e
    };
    let e = fresh(None);
    let reqs = requests(&e, None);
    let mut follow_up = reqs[0].clone();
    follow_up.prompt = e.question_prompt("What colour is the sky?", 0, 1).unwrap();
    let media = media_end(&e, &follow_up);
    let config = SchedulerConfig { max_batch_size: 1, max_queue: 8, ..Default::default() };
    let reference = Scheduler::start(e, config);
    let want = run(&reference, &follow_up).0;
    reference.shutdown();

    let first = Scheduler::start(fresh(Some(&dir)), config);
    run(&first, &reqs[0]);
    let t = Instant::now();
    while saved_files(&dir).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "no prefix saved in {}", dir.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(first.prefix_cache_stats().disk_saves, 1);
    first.shutdown();

    let e = fresh(Some(&dir));
    let model = e.model().clone(); // shares the feature cache
    let restarted = Scheduler::start(e, config);
    let (got, timings) = run(&restarted, &follow_up);
    assert_eq!(got.token_ids, want.token_ids);
    // Only the video's frames after the cut went through the tower, outside the feature cache.
    assert_eq!(model.feature_cache_stats().misses, 0, "{:?}", model.feature_cache_stats());
    assert_eq!(timings.cached_prompt_tokens, media / CHUNK * CHUNK, "the saved video prefix is reused");
    assert!(timings.cached_prompt_tokens > 0);
    let s = restarted.prefix_cache_stats();
    assert_eq!((s.disk_loads, s.disk_rejected), (1, 0), "{s:?}");
    restarted.shutdown();

    // A file of another model under this name (same key, another fingerprint in its header),
    // then a damaged one: each is refused with a log line, the prompt recomputed.
    let files = saved_files(&dir);
    assert_eq!(files.len(), 1);
    let e = fresh(Some(&dir));
    let (inputs, _) = e.preprocess(&[follow_up.prompt.as_str()], &[], &follow_up.videos).unwrap();
    let key = e.model().prefix_key(&inputs).unwrap();
    let media_key = &key.elems()[..media];
    let store = e.model().prefix_cache().lock().unwrap().store().cloned().unwrap();
    assert_eq!(store.file_for(media_key), files[0]);
    let layers = e.model().config.text_config.num_hidden_layers;
    let kv =
        store.load(media_key, KvCacheFormat::Model, candle_core::DType::F32, &Device::Cpu, layers).unwrap().unwrap();
    let other_dir = temp_dir("saved-prefix-other");
    let other = videollava::model::prefix_cache::PrefixStore::new(&other_dir, "another model".into()).unwrap();
    std::fs::copy(other.save(media_key, &kv).unwrap(), &files[0]).unwrap();
    for what in ["foreign", "damaged"] {
        if what == "damaged" {
            std::fs::write(&files[0], b"\x10\0\0\0\0\0\0\0{\"a\":1}        ").unwrap();
        }
        let s = Scheduler::start(fresh(Some(&dir)), config);
        let (got, timings) = run(&s, &follow_up);
        assert_eq!(got.token_ids, want.token_ids, "{what}");
        assert!(timings.cached_prompt_tokens < media / CHUNK * CHUNK, "{what}: {}", timings.cached_prompt_tokens);
        let stats = s.prefix_cache_stats();
        assert_eq!((stats.disk_loads, stats.disk_rejected), (0, 1), "{what}: {stats:?}");
        s.shutdown();
    }
    let _ = std::fs::remove_dir_all(&other_dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Questions about one video admitted together (as `batch` and a busy server admit them): the
/// prefix is looked up when each prefill starts, so the later ones reuse the keys/values the
/// first one's prefill has just cached, and answer as they do alone.
#[test]
fn questions_admitted_together_reuse_the_first_ones_prefix() {
    let name = "model-llama";
    let alone = engine(name, DTypeChoice::F32, KvCacheFormat::Model, 0);
    let reqs = requests(&alone, None);
    let (a, b) = (reqs[0].clone(), reqs[2].clone()); // "Why is this video funny?", then a follow-up
    let media = media_end(&alone, &a);
    let config = SchedulerConfig { max_batch_size: 1, max_queue: 8, ..Default::default() };
    let solo = Scheduler::start(alone, config);
    let want: Vec<GeneratedSequence> = [&a, &b].iter().map(|r| run(&solo, r).0).collect();
    solo.shutdown();

    let config = SchedulerConfig { max_batch_size: 4, max_queue: 8, ..Default::default() };
    let together = Scheduler::start(engine(name, DTypeChoice::F32, KvCacheFormat::Model, 64 << 20), config);
    let (ha, hb) = (together.submit(a).unwrap(), together.submit(b).unwrap());
    let (got_a, got_b) = (collect(ha), collect(hb));
    assert_eq!(got_a.1.cached_prompt_tokens, 0);
    assert!(
        got_b.1.cached_prompt_tokens >= media / CHUNK * CHUNK && got_b.1.cached_prompt_tokens > 0,
        "the second question reused {} positions (its video ends at {media})",
        got_b.1.cached_prompt_tokens
    );
    assert_eq!(got_a.0.token_ids, want[0].token_ids);
    assert_eq!(got_b.0.token_ids, want[1].token_ids);
    together.shutdown();
}

/// Questions about one video decoding together with the 8-bit cache: their keys and values of
/// the video come from one cached prefix (the same bits), so each decode step reads them once
/// for all the rows (`shared_position_reads`), and every question gets its answer alone.
#[test]
fn questions_decoding_together_read_their_video_once() {
    let name = "model-llama";
    let m = fixtures_dir().join("media");
    let clip = decode_video_file(&m.join("clip.mp4"), &VideoOptions { num_frames: 8, ..Default::default() }).unwrap();
    for dtype in [DTypeChoice::F32, DTypeChoice::BF16] {
        let alone = engine(name, dtype, KvCacheFormat::Q8_0, 0);
        let questions = ["Why is this video funny?", "What happens next?", "Describe the video.", "Who is in it?"];
        let reqs: Vec<GenerationRequest> = questions
            .iter()
            .enumerate()
            .map(|(i, q)| GenerationRequest {
                prompt: alone.question_prompt(q, 0, 1).unwrap(),
                images: vec![],
                videos: vec![clip.clone()],
                options: GenerateOptions { max_new_tokens: 12 + 2 * i, ignore_eos: true, ..alone.default_options() },
            })
            .collect();
        let solo = Scheduler::start(alone, SchedulerConfig { max_batch_size: 1, max_queue: 8, ..Default::default() });
        let want: Vec<GeneratedSequence> = reqs.iter().map(|r| run(&solo, r).0).collect();
        assert_eq!(solo.stats().shared_position_reads, 0, "one row at a time shares nothing");
        solo.shutdown();

        let config = SchedulerConfig { max_batch_size: 4, max_queue: 8, ..Default::default() };
        let together = Scheduler::start(engine(name, dtype, KvCacheFormat::Q8_0, 64 << 20), config);
        let handles: Vec<_> = reqs.iter().map(|r| together.submit(r.clone()).unwrap()).collect();
        for (i, (h, w)) in handles.into_iter().zip(&want).enumerate() {
            let (got, _) = collect(h);
            assert_eq!(got.token_ids, w.token_ids, "{dtype:?}: question {i} answers otherwise beside the others");
            // BF16: a batch's matrix products round elsewhere than one row's (6.2e-4 here with
            // the rows reading their own keys and values too, measured); shared reads add nothing
            // (the kernel gives each row its bits alone, `kv_quant`'s tests).
            let max = got.logprobs.iter().zip(&w.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let tol = if dtype == DTypeChoice::BF16 { 2e-3 } else { 1e-4 };
            assert!(max < tol, "{dtype:?}: question {i} logprobs differ by {max}");
        }
        let reads = together.stats().shared_position_reads;
        // The 8-bit decode kernel runs with AVX2 (else each row is dequantized).
        if videollava::kernels::cpu::features().avx2 {
            // At least the video's positions (8 frames of 16 patches), for a few steps.
            assert!(reads >= 10 * 128, "{dtype:?}: {reads} positions read from another row");
        } else {
            assert_eq!(reads, 0, "{dtype:?}: the dequantizing path reads every row");
        }
        together.shutdown();
    }
}
