//! A checkpoint saved by transformers 5.x (`checkpoints/model-llama-tf5`, made by
//! `scripts/reference/checkpoint_5x_fixtures.py` under transformers 5.25.0): one
//! `processor_config.json` nesting `image_processor` and `video_processor` (with
//! `do_sample_frames: true, num_frames: 4`), no `preprocessor_config.json`, 5.x tokenizer files.
//! Expected values are what transformers 5.x computed from that directory
//! (`processor-5x/image_video.safetensors`): ids and mask identical; image pixels and the
//! Pillow-path video pixels within 1e-5; transformers' own (torchvision) video pixels within 0.02
//! (reference-spec §5, "Videos in 5.24"); greedy ids of `generate()` identical.

use crate::common::{abs_diff, fixtures_dir, read_safetensors};
use candle_core::{DType, Device};
use videollava::config::CheckpointConfig;
use videollava::generate::{generate, GenerateOptions};
use videollava::media::image::decode_image_file;
use videollava::media::video::{decode_video_file, FrameSampling, VideoOptions};
use videollava::model::VideoLlava;
use videollava::processor::{PixelTensor, Processor, ProcessorOutput};

const PIXEL_TOLERANCE: f32 = 1e-5;
/// transformers 5.x resizes video frames with torchvision, not Pillow (measured 0.015 here).
const TORCHVISION_TOLERANCE: f32 = 0.02;

fn checkpoint() -> std::path::PathBuf {
    fixtures_dir().join("checkpoints/model-llama-tf5")
}

#[test]
fn the_5x_layout_is_read() {
    let dir = checkpoint();
    assert!(!dir.join("preprocessor_config.json").exists(), "the fixture must have the 5.x layout");
    let c = CheckpointConfig::from_dir(&dir).unwrap();
    assert_eq!(c.image_processor.size.shortest_edge, Some(32));
    assert_eq!(c.image_processor.crop_size.height, Some(28));
    assert_eq!(c.video_processor.frame.size.shortest_edge, Some(32));
    assert!(c.video_processor.do_sample_frames);
    assert_eq!(c.video_processor.default_num_frames(), Some(4));
    assert_eq!(c.processor.patch_size, 7);
    let p = Processor::from_dir(&dir).unwrap();
    assert_eq!(p.num_frames, Some(4));
}

#[test]
fn processor_outputs_equal_transformers_5x() {
    let dir = checkpoint();
    let (want, meta) = read_safetensors(&fixtures_dir().join("processor-5x/image_video.safetensors"));
    assert!(meta["transformers_version"].starts_with('5'), "made by transformers {}", meta["transformers_version"]);
    let processor = Processor::from_dir(&dir).unwrap();
    let media = fixtures_dir().join("media");
    let image = decode_image_file(&media.join("landscape.png")).unwrap();
    // The checkpoint's video processor samples 4 of the decoded frames, as `uniform` does.
    let options = VideoOptions { num_frames: processor.num_frames.unwrap(), sampling: FrameSampling::Uniform };
    let video = decode_video_file(&media.join("clip.mp4"), &options).unwrap();
    assert_eq!(video.total_frames.to_string(), meta["decoded_frames"]);
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let out = processor.process(&[prompts[0].as_str()], &[image], &[video]).unwrap();

    assert_eq!(vec![out.batch_size, out.seq_len], want["input_ids"].shape);
    assert_eq!(out.input_ids, want["input_ids"].i64s(), "input_ids differ");
    assert_eq!(out.attention_mask, want["attention_mask"].i64s(), "attention_mask differs");
    for (key, got, tol) in [
        ("pixel_values_images", &out.pixel_values_images, PIXEL_TOLERANCE),
        ("pixel_values_videos_pillow", &out.pixel_values_videos, PIXEL_TOLERANCE),
        ("pixel_values_videos", &out.pixel_values_videos, TORCHVISION_TOLERANCE),
    ] {
        let got = got.as_ref().unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(got.shape, want[key].shape, "{key} shape");
        let (max, mean) = abs_diff(&got.data, &want[key].f32s());
        eprintln!("{key} {:?}: max abs diff {max:.3e}, mean {mean:.3e}", got.shape);
        assert!(max <= tol, "{key}: max abs diff {max} > {tol}");
    }
}

#[test]
fn greedy_ids_equal_transformers_5x_generate() {
    let dir = checkpoint();
    let (t, meta) = read_safetensors(&fixtures_dir().join("processor-5x/image_video.safetensors"));
    let want: Vec<u32> = serde_json::from_str(&meta["new_tokens"]).unwrap();
    // transformers' own inputs, so only the loading of the 5.x checkpoint is under test here.
    let pixels = |k: &str| Some(PixelTensor { shape: t[k].shape.clone(), data: t[k].f32s() });
    let inputs = ProcessorOutput {
        batch_size: 1,
        seq_len: t["input_ids"].shape[1],
        input_ids: t["input_ids"].i64s(),
        attention_mask: t["attention_mask"].i64s(),
        pixel_values_images: pixels("pixel_values_images"),
        pixel_values_videos: pixels("pixel_values_videos"),
        image_tokens_per_item: 0,
        video_tokens_per_item: 0,
    };
    let model = VideoLlava::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = videollava::processor::tokenizer::TextTokenizer::from_dir(&dir).unwrap();
    let options = GenerateOptions { max_new_tokens: want.len(), eos_token_ids: vec![2], ..Default::default() };
    let (out, _) = generate(&model, &tokenizer, &inputs, &options, &mut |_| {}).unwrap();
    let n = want.iter().position(|&id| id == 2).map_or(want.len(), |p| p + 1);
    assert_eq!(out[0].token_ids, want[..n], "greedy ids differ from transformers 5.x");
}

#[test]
fn a_checkpoint_without_any_image_processor_config_is_refused_clearly() {
    let dir = std::env::temp_dir().join(format!("videollava-no-preproc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(checkpoint().join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("processor_config.json"), r#"{"patch_size": 7}"#).unwrap();
    let err = CheckpointConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("preprocessor_config.json") && err.contains("image_processor"), "{err}");
    std::fs::write(dir.join("processor_config.json"), r#"{"image_processor": {}, "video_processor": 3}"#).unwrap();
    let err = CheckpointConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("video_processor"), "{err}");
    std::fs::write(dir.join("processor_config.json"), r#"{"image_processor": {"crop_size": "big"}}"#).unwrap();
    let err = CheckpointConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("image_processor.crop_size"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// 5.x saves the chat template as `chat_template.jinja`; a question is wrapped as transformers'
/// `apply_chat_template` renders it, and that rendering, given back as a prompt, is used verbatim.
#[test]
fn the_5x_chat_template_is_used_and_its_prompts_are_kept_verbatim() {
    let dir = checkpoint();
    let (_, meta) = read_safetensors(&fixtures_dir().join("processor-5x/image_video.safetensors"));
    let want = &meta["chat_prompt"];
    assert!(dir.join("chat_template.jinja").exists());
    let tok = videollava::processor::tokenizer::TextTokenizer::from_dir(&dir).unwrap();
    let template = tok.chat_template.as_deref();
    assert!(template.is_some(), "chat_template.jinja is read");
    let prompt_for =
        |text: &str| videollava::processor::prompt::prompt_for(template, text, 0, 1, "<s>", "</s>").unwrap();
    assert_eq!(&prompt_for("Why is this video funny?"), want);
    assert_eq!(&prompt_for(want), want, "a prompt in the chat format is not wrapped again");
}
