//! Greedy generation against transformers' `generate(do_sample=False)` on the tiny checkpoints:
//! an image prompt, a video prompt, a multi-turn prompt holding both, and a left-padded batch:
//! token ids identical, log-probabilities within 1e-4 (`model/<variant>-greedy.json`, made by
//! `scripts/reference/model_fixtures.py` from the inputs stored in `model/<variant>-<case>.safetensors`).

use crate::common::{fixtures_dir, read_safetensors};
use candle_core::{DType, Device};
use videollava::generate::{generate, FinishReason, GenerateOptions, SamplingParams};
use videollava::model::VideoLlava;
use videollava::processor::tokenizer::TextTokenizer;
use videollava::processor::{PixelTensor, ProcessorOutput};

const LOGPROB_TOL: f32 = 1e-4;

fn inputs(variant: &str, case: &str) -> ProcessorOutput {
    let (t, _) = read_safetensors(&fixtures_dir().join("model").join(format!("{variant}-{case}.safetensors")));
    let ids = &t["input_ids"];
    let pixels = |k: &str| t.get(k).map(|p| PixelTensor { shape: p.shape.clone(), data: p.f32s() });
    ProcessorOutput {
        batch_size: ids.shape[0],
        seq_len: ids.shape[1],
        input_ids: ids.i64s(),
        attention_mask: t["attention_mask"].i64s(),
        pixel_values_images: pixels("pixel_values_images"),
        pixel_values_videos: pixels("pixel_values_videos"),
        image_tokens_per_item: 0,
        video_tokens_per_item: 0,
    }
}

fn check_variant(variant: &str, prefill_chunk: usize) -> usize {
    let dir = fixtures_dir().join("checkpoints").join(variant);
    let mut model = VideoLlava::load(&dir, DType::F32, &Device::Cpu).unwrap();
    model.set_prefill_chunk(prefill_chunk);
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    let text = std::fs::read_to_string(fixtures_dir().join("model").join(format!("{variant}-greedy.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let max_new = json["max_new_tokens"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for (case, want) in json["cases"].as_object().unwrap() {
        let batch = inputs(variant, case);
        let options = GenerateOptions {
            max_new_tokens: max_new,
            sampling: SamplingParams::default(),
            eos_token_ids: vec![2],
            ..Default::default()
        };
        let (out, _) = generate(&model, &tokenizer, &batch, &options, &mut |_| {}).unwrap();
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(want["new_tokens"].clone()).unwrap();
        let want_lp: Vec<Vec<f32>> = serde_json::from_value(want["logprobs"].clone()).unwrap();
        assert_eq!(out.len(), want_ids.len(), "{variant}/{case}: batch size");
        for (row, (got, (ids, lps))) in out.iter().zip(want_ids.iter().zip(&want_lp)).enumerate() {
            // transformers pads finished rows; compare up to and including EOS.
            let n = ids.iter().position(|&t| t == 2).map(|p| p + 1).unwrap_or(ids.len());
            assert_eq!(got.token_ids, ids[..n], "{variant}/{case} row {row}: greedy ids differ");
            let max = got.logprobs.iter().zip(&lps[..n]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            eprintln!(
                "{variant}/{case} row {row} (prefill chunk {prefill_chunk}): ids equal, logprob max abs diff {max:.2e}"
            );
            assert!(max <= LOGPROB_TOL, "{variant}/{case} row {row}: logprob diff {max}");
            let reason =
                if n < ids.len() || ids.last() == Some(&2) { FinishReason::Stop } else { FinishReason::Length };
            assert_eq!(got.finish_reason, reason);
            checked += 1;
        }
    }
    checked
}

#[test]
fn greedy_ids_and_logprobs_match_transformers() {
    let mut rows = 0;
    for variant in ["model-llama", "model-mistral-full", "model-llama-5x", "model-llama-bf16-sharded"] {
        rows += check_variant(variant, 0);
    }
    assert!(rows >= 20, "only {rows} rows checked");
}

/// The same with the prompt run through the decoder 7 positions at a time (chunks cutting
/// through the image and video features, the left padding of batched rows, on Llama and
/// Mistral): still transformers' ids and log-probabilities.
#[test]
fn a_chunked_prefill_gives_the_same_answers() {
    let mut rows = 0;
    for variant in ["model-llama", "model-mistral-full"] {
        rows += check_variant(variant, 7);
    }
    assert!(rows >= 10, "only {rows} rows checked");
}

/// Asking again about the same image and video takes their features from the cache (no tower
/// runs) and answers exactly as the first time; with the cache off, the towers run again.
#[test]
fn a_second_request_about_the_same_media_skips_the_towers_and_answers_the_same() {
    let dir = fixtures_dir().join("checkpoints").join("model-llama");
    let model = VideoLlava::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    let batch = inputs("model-llama", "image_video");
    let options = GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![], ..Default::default() };
    let run = || generate(&model, &tokenizer, &batch, &options, &mut |_| {}).unwrap().0;
    let first = run();
    let s1 = model.feature_cache_stats();
    assert_eq!((s1.hits, s1.misses, s1.entries), (0, 2, 2), "one image and one video computed: {s1:?}");
    let second = run();
    let s2 = model.feature_cache_stats();
    assert_eq!((s2.hits, s2.misses), (2, 2), "both taken from the cache: {s2:?}");
    assert_eq!(first[0].token_ids, second[0].token_ids);
    assert_eq!(first[0].logprobs, second[0].logprobs);
    model.set_feature_cache_capacity(0);
    let third = run();
    let s3 = model.feature_cache_stats();
    assert_eq!((s3.hits, s3.misses, s3.entries), (2, 4, 0), "cache off: towers again: {s3:?}");
    assert_eq!(third[0].token_ids, first[0].token_ids);
}
