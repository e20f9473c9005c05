//! The image processor against transformers' `VideoLlavaImageProcessor` (PIL path): every file in
//! `tests/fixtures/image_processor` (made by `scripts/reference/image_processor_fixtures.py`)
//! holds an input image, the processor kwargs and transformers' `pixel_values`, and for most cases
//! that resize the whole Pillow-resized `u8` image (`resized`), which must match exactly.

use crate::common;

use videollava::media::RgbImage;
use videollava::processor::image_processor::{ImageProcessor, ImageProcessorConfig};
use videollava::processor::resize::{resize, Resample};

/// The script writes this many cases; fewer files means fixtures went missing.
const EXPECTED_CASES: usize = 29;

#[test]
fn image_processor_matches_transformers() {
    let dir = common::fixtures_dir().join("image_processor");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(
        files.len() >= EXPECTED_CASES,
        "{} holds {} fixture files, expected at least {EXPECTED_CASES}",
        dir.display(),
        files.len()
    );

    let mut failures = Vec::new();
    for path in &files {
        let (tensors, meta) = common::read_safetensors(path);
        let case = meta.get("case").cloned().unwrap_or_else(|| path.display().to_string());
        let config: ImageProcessorConfig =
            serde_json::from_str(meta.get("config").expect("metadata `config`")).expect("config JSON");
        let input = &tensors["input"];
        assert_eq!(input.shape.len(), 3, "{case}: input must be [H, W, 3]");
        let (h, w) = (input.shape[0], input.shape[1]);
        let image = RgbImage::new(w, h, input.u8s()).unwrap();
        let expected = &tensors["pixel_values"];

        let filter = Resample::from_pil_code(config.resample);
        let processor = ImageProcessor::new(config).unwrap_or_else(|e| panic!("{case}: {e}"));
        if let Some(want) = tensors.get("resized") {
            let (rh, rw) = processor.resized_size(h, w);
            let got = resize(&image, rw, rh, filter.unwrap());
            if want.shape != [rh, rw, 3] {
                failures.push(format!("{case}: resized shape [{rh}, {rw}, 3] != expected {:?}", want.shape));
            } else {
                let want = want.u8s();
                let differing = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
                let worst = got.data.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
                println!("{case:<28} resize {w}x{h} -> {rw}x{rh}: {differing} differing bytes (max {worst})");
                if differing != 0 {
                    failures.push(format!("{case}: resize differs from Pillow in {differing} bytes (max {worst})"));
                }
            }
        }
        let out = processor.preprocess(&image).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(processor.output_size(h, w), (out.height, out.width), "{case}: output_size");
        let shape = vec![3, out.height, out.width];
        if shape != expected.shape {
            failures.push(format!("{case}: shape {shape:?} != expected {:?}", expected.shape));
            continue;
        }
        let (max, mean) = common::abs_diff(&out.data, &expected.f32s());
        println!("{case:<28} {}x{} -> {}x{}: max abs diff {max:e}, mean {mean:e}", w, h, out.width, out.height);
        if max.is_nan() || max > 1e-5 {
            failures.push(format!("{case}: max abs diff {max} > 1e-5 (mean {mean})"));
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}
