//! The processor against transformers' `VideoLlavaProcessor`: fixtures made by
//! `scripts/reference/processor_fixtures.py` (transformers 4.57.6). Token ids and attention masks
//! must be identical; pixel values within 1e-5.

use std::path::Path;

use crate::common::{abs_diff, fixtures_dir, read_safetensors, shared_dir};
use videollava::config::CheckpointConfig;
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, FrameSampling, VideoOptions};
use videollava::media::{RgbImage, Video};
use videollava::processor::tokenizer::TextTokenizer;
use videollava::processor::Processor;

const PIXEL_TOLERANCE: f32 = 1e-5;

fn json_list(meta: &std::collections::HashMap<String, String>, key: &str) -> Vec<String> {
    serde_json::from_str(&meta[key]).unwrap_or_else(|e| panic!("metadata {key}: {e}"))
}

fn run_case(path: &Path) {
    let name = path.file_stem().unwrap().to_string_lossy().to_string();
    let (expected, meta) = read_safetensors(path);
    let dir = fixtures_dir();
    let processor = Processor::from_dir(&dir.join("checkpoints").join(&meta["checkpoint"])).expect("processor loads");
    let prompts = json_list(&meta, "prompts");
    let images: Vec<RgbImage> = json_list(&meta, "images")
        .iter()
        .map(|p| decode_image_file(&dir.join("media").join(p)).expect("image decodes"))
        .collect();
    let options = VideoOptions {
        num_frames: meta["num_frames"].parse().unwrap(),
        sampling: meta["sampling"].parse::<FrameSampling>().unwrap(),
    };
    let videos: Vec<Video> = json_list(&meta, "videos")
        .iter()
        .map(|p| decode_video_file(&dir.join("media").join(p), &options).expect("video decodes"))
        .collect();
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let out = processor.process(&prompt_refs, &images, &videos).expect("processor runs");

    let ids = &expected["input_ids"];
    assert_eq!(vec![out.batch_size, out.seq_len], ids.shape, "{name}: input_ids shape");
    assert_eq!(out.input_ids, ids.i64s(), "{name}: input_ids differ");
    assert_eq!(out.attention_mask, expected["attention_mask"].i64s(), "{name}: attention_mask differs");

    for (key, got) in
        [("pixel_values_images", &out.pixel_values_images), ("pixel_values_videos", &out.pixel_values_videos)]
    {
        match (expected.get(key), got) {
            (None, None) => {}
            (Some(want), Some(got)) => {
                assert_eq!(want.shape, got.shape, "{name}: {key} shape");
                let (max, mean) = abs_diff(&got.data, &want.f32s());
                eprintln!("{name}: {key} {:?} max abs diff {max:.3e}, mean {mean:.3e}", got.shape);
                assert!(max <= PIXEL_TOLERANCE, "{name}: {key} max abs diff {max} > {PIXEL_TOLERANCE}");
            }
            (want, got) => panic!("{name}: {key} expected present={} got present={}", want.is_some(), got.is_some()),
        }
    }
}

#[test]
fn processor_matches_transformers_on_every_case() {
    let dir = fixtures_dir().join("processor");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 8, "expected at least 8 processor fixtures in {}, found {}", dir.display(), cases.len());
    for case in &cases {
        run_case(case);
    }
}

#[test]
fn real_llama_tokenizer_ids_match_transformers() {
    let Some(tok_dir) = shared_dir("real_llama_tokenizer_ids_match_transformers", "fixtures/videollava-tokenizer")
    else {
        return;
    };
    let config = CheckpointConfig::from_dir(&fixtures_dir().join("checkpoints/hub-config")).unwrap();
    let tokenizer = TextTokenizer::from_dir(&tok_dir).unwrap();
    let processor = Processor::new(&config, tokenizer).unwrap();
    let text = std::fs::read_to_string(fixtures_dir().join("processor/real_tokenizer.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 7);
    let grey = RgbImage::new(40, 30, vec![128; 40 * 30 * 3]).unwrap();
    for case in &cases {
        let prompts: Vec<String> = serde_json::from_value(case["prompts"].clone()).unwrap();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let images = vec![grey.clone(); case["num_images"].as_u64().unwrap() as usize];
        let video = Video::from_frames(vec![grey.clone(); 8]).unwrap();
        let videos = vec![video; case["num_videos"].as_u64().unwrap() as usize];
        let out = processor.process(&refs, &images, &videos).unwrap();
        let want_ids: Vec<Vec<i64>> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want_mask: Vec<Vec<i64>> = serde_json::from_value(case["attention_mask"].clone()).unwrap();
        assert_eq!(out.input_ids, want_ids.concat(), "ids differ for {prompts:?}");
        assert_eq!(out.attention_mask, want_mask.concat(), "mask differs for {prompts:?}");
        for (b, row) in want_ids.iter().enumerate() {
            let row: Vec<u32> = row.iter().map(|&t| t as u32).collect();
            assert_eq!(
                processor.decode(&row, false).unwrap(),
                case["decoded"][b].as_str().unwrap(),
                "decode {prompts:?}"
            );
            assert_eq!(
                processor.decode(&row, true).unwrap(),
                case["decoded_skip_special"][b].as_str().unwrap(),
                "decode skip special {prompts:?}"
            );
        }
    }
}

fn tiny_processor() -> Processor {
    Processor::from_dir(&fixtures_dir().join("checkpoints/tiny-llama")).unwrap()
}

fn grey(w: usize, h: usize) -> RgbImage {
    RgbImage::new(w, h, vec![100; w * h * 3]).unwrap()
}

#[test]
fn placeholder_and_media_counts_must_agree() {
    let p = tiny_processor();
    let img = grey(30, 30);
    let cases: Vec<(Vec<&str>, Vec<RgbImage>, usize, &str)> = vec![
        (vec!["<image> <image> what?"], vec![img.clone()], 0, "2 <image> placeholders but 1 image was given"),
        (vec!["what is this?"], vec![img.clone()], 0, "0 <image> placeholders but 1 image was given"),
        (vec!["<video> go"], vec![], 0, "1 <video> placeholder but no video was given"),
        (vec!["plain", "<image>"], vec![], 0, "1 <image> placeholder but no image was given"),
        (vec!["two videos"], vec![], 2, "0 <video> placeholders but 2 videos were given"),
    ];
    for (prompts, images, n_videos, want) in cases {
        let videos = vec![Video::from_frames(vec![grey(20, 20); 8]).unwrap(); n_videos];
        let err = p.process(&prompts, &images, &videos).unwrap_err().to_string();
        assert!(err.contains(want), "{prompts:?}: got `{err}`, want `{want}`");
    }
}

#[test]
fn videos_of_different_frame_counts_are_refused() {
    let p = tiny_processor();
    let a = Video::from_frames(vec![grey(20, 20); 8]).unwrap();
    let b = Video::from_frames(vec![grey(20, 20); 4]).unwrap();
    let err = p.process(&["<video> <video>"], &[], &[a, b]).unwrap_err().to_string();
    assert!(err.contains("video #2 has 4 frames but video #1 has 8 frames"), "{err}");
}

#[test]
fn token_counts_follow_the_strategy() {
    let llama = tiny_processor(); // patch 7 on 28x28, strategy default
    assert_eq!(llama.image_token_count(28, 28), 16);
    assert_eq!(llama.video_token_count(8, 28, 28), 17 * 8);
    let full = Processor::from_dir(&fixtures_dir().join("checkpoints/tiny-mistral-full")).unwrap();
    assert_eq!(full.image_token_count(28, 28), 17);
    assert_eq!(full.video_token_count(8, 28, 28), 17 * 8);
}

#[test]
fn decode_round_trips_text() {
    let p = tiny_processor();
    let ids = p.tokenizer.encode("Why is this video funny? café 🎉", true).unwrap();
    assert_eq!(ids[0], 1, "BOS first");
    assert_eq!(p.decode(&ids, true).unwrap(), "Why is this video funny? café 🎉");
    assert!(p.decode(&ids, false).unwrap().starts_with("<s>"));
}

/// The real photos and bigbuckbunny.mp4 from `shared/` through decode + image processor (default
/// 224 config) against transformers (`scripts/reference/shared_media_fixtures.py`): the f32 bytes
/// must hash the same; a mismatch reports max/mean abs difference on a strided sample.
#[test]
fn shared_photos_and_video_pixel_values_match_transformers() {
    use sha2::Digest;
    let Some(media) = shared_dir("shared_photos_and_video_pixel_values_match_transformers", "fixtures/media") else {
        return;
    };
    let config = CheckpointConfig::from_dir(&fixtures_dir().join("checkpoints/hub-config")).unwrap();
    let processor =
        videollava::processor::image_processor::ImageProcessor::new(config.image_processor.clone()).unwrap();
    let text = std::fs::read_to_string(fixtures_dir().join("processor/shared_media.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 5);
    for case in &cases {
        let file = case["file"].as_str().unwrap();
        let frames: Vec<RgbImage> = if case["kind"] == "image" {
            vec![decode_image_file(&media.join(file)).unwrap()]
        } else {
            let options = VideoOptions {
                num_frames: case["num_frames"].as_u64().unwrap() as usize,
                sampling: case["sampling"].as_str().unwrap().parse().unwrap(),
            };
            decode_video_file(&media.join(file), &options).unwrap().frames
        };
        let mut data = Vec::new();
        for f in &frames {
            data.extend(processor.preprocess(f).unwrap().data);
        }
        let want_shape: Vec<usize> = serde_json::from_value(case["shape"].clone()).unwrap();
        assert_eq!(data.len(), want_shape.iter().product::<usize>(), "{file}: size");
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let hash = format!("{:x}", sha2::Sha256::digest(&bytes));
        let stride = case["stride"].as_u64().unwrap() as usize;
        let sample: Vec<f32> = data.iter().step_by(stride).copied().collect();
        let want: Vec<f32> = serde_json::from_value(case["sample"].clone()).unwrap();
        let (max, mean) = abs_diff(&sample, &want);
        eprintln!(
            "{file} {:?}: sample max abs diff {max:.3e}, mean {mean:.3e}, hash equal {}",
            want_shape,
            hash == case["sha256"]
        );
        assert!(max <= PIXEL_TOLERANCE, "{file}: max abs diff {max}");
        assert_eq!(
            hash,
            case["sha256"].as_str().unwrap(),
            "{file}: pixel values are not bit-identical (sample max diff {max})"
        );
    }
}
