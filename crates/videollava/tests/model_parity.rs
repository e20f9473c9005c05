//! The model against transformers' `VideoLlavaForConditionalGeneration` on tiny random
//! checkpoints: fixtures made by `scripts/reference/model_fixtures.py` (transformers 4.57.6, f32).
//!
//! Tolerances: logits and decoder hidden states at every non-pad position within 1e-4 absolute,
//! loss within 1e-5, projected image/video features within 1e-5.

use std::collections::HashMap;
use std::path::Path;

use crate::common::{fixtures_dir, read_safetensors, FixtureTensor};
use candle_core::{DType, Device, Tensor};
use videollava::model::{ForwardInput, LogitsSelection, VideoLlava};

const LOGITS_TOL: f32 = 1e-4;
const LOSS_TOL: f32 = 1e-5;
const FEATURE_TOL: f32 = 1e-5;

fn tensor(t: &FixtureTensor) -> Tensor {
    let dev = Device::Cpu;
    match t.dtype {
        safetensors::Dtype::F32 => Tensor::from_vec(t.f32s(), t.shape.clone(), &dev).unwrap(),
        safetensors::Dtype::I64 => Tensor::from_vec(t.i64s(), t.shape.clone(), &dev).unwrap(),
        other => panic!("unexpected fixture dtype {other:?}"),
    }
}

/// Max abs difference over the positions where `mask` (`[B, L]`) is 1; tensors `[B, L, ...]`.
fn masked_max_diff(got: &Tensor, want: &Tensor, mask: &[i64]) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let per_pos = got.len() / mask.len();
    let mut max = 0f32;
    for (p, &m) in mask.iter().enumerate() {
        if m == 0 {
            continue;
        }
        for i in p * per_pos..(p + 1) * per_pos {
            let d = (got[i] - want[i]).abs();
            if d.is_nan() {
                return f32::NAN;
            }
            max = max.max(d);
        }
    }
    max
}

fn max_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape");
    (got.to_dtype(DType::F32).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn run_case(path: &Path, models: &mut HashMap<String, VideoLlava>) {
    let name = path.file_stem().unwrap().to_string_lossy().to_string();
    let (t, meta) = read_safetensors(path);
    let meta: serde_json::Value = serde_json::from_str(meta.values().next().expect("metadata")).unwrap();
    let ckpt = meta["checkpoint"].as_str().unwrap().to_string();
    let model = models.entry(ckpt.clone()).or_insert_with(|| {
        VideoLlava::load(&fixtures_dir().join("checkpoints").join(&ckpt), DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{ckpt}: {e}"))
    });
    let ids = tensor(&t["input_ids"]);
    let mask = tensor(&t["attention_mask"]);
    let positions = tensor(&t["position_ids"]);
    let labels = t.get("labels").map(tensor);
    let images = t.get("pixel_values_images").map(tensor);
    let videos = t.get("pixel_values_videos").map(tensor);
    let input = ForwardInput {
        input_ids: &ids,
        attention_mask: Some(&mask),
        position_ids: Some(&positions),
        pixel_values_images: images.as_ref(),
        pixel_values_videos: videos.as_ref(),
        labels: labels.as_ref(),
        logits: LogitsSelection::All,
        output_hidden_states: true,
    };
    let out = model.forward(&input, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mask_v = t["attention_mask"].i64s();

    let d = masked_max_diff(out.logits.as_ref().unwrap(), &tensor(&t["logits"]), &mask_v);
    eprintln!("{name}: logits max abs diff {d:.3e}");
    assert!(d <= LOGITS_TOL, "{name}: logits max abs diff {d} > {LOGITS_TOL}");

    if let Some(want) = t.get("loss") {
        let want = want.f32s()[0];
        let got = out.loss.expect("loss");
        eprintln!("{name}: loss {got} vs {want}");
        assert!((got - want).abs() <= LOSS_TOL, "{name}: loss {got} vs {want}");
    }
    for (key, got) in [("image_features", &out.image_features), ("video_features", &out.video_features)] {
        if let Some(want) = t.get(key) {
            let d = max_diff(got.as_ref().unwrap_or_else(|| panic!("{name}: no {key}")), &tensor(want));
            eprintln!("{name}: {key} max abs diff {d:.3e}");
            assert!(d <= FEATURE_TOL, "{name}: {key} max abs diff {d} > {FEATURE_TOL}");
        }
    }
    if let Some(want) = t.get("hidden_states") {
        let got = out.hidden_states.as_ref().unwrap();
        assert_eq!(got.len(), want.shape[0], "{name}: number of hidden states");
        let want = tensor(want);
        for (i, g) in got.iter().enumerate() {
            let d = masked_max_diff(g, &want.get(i).unwrap(), &mask_v);
            assert!(d <= LOGITS_TOL, "{name}: hidden state {i} max abs diff {d} > {LOGITS_TOL}");
        }
    }
}

#[test]
fn forward_matches_transformers_on_every_case() {
    let dir = fixtures_dir().join("model");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 16, "expected at least 16 model fixtures (4 variants x 4 inputs), found {}", cases.len());
    let mut models = HashMap::new();
    for case in &cases {
        run_case(case, &mut models);
    }
    assert!(models.len() >= 4, "expected 4 checkpoint variants, found {}", models.len());
}
