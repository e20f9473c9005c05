//! Writing processor outputs as safetensors (the `videollava preprocess` contract).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};
use crate::processor::ProcessorOutput;

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `input_ids` and `attention_mask` (I64 `[B, L]`), and `pixel_values_images`
/// (F32 `[N, 3, H, W]`) / `pixel_values_videos` (F32 `[M, T, 3, H, W]`) when present.
pub fn write_processor_output(out: &ProcessorOutput, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
    let shape = vec![out.batch_size, out.seq_len];
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("input_ids".into(), Dtype::I64, shape.clone(), i64_bytes(&out.input_ids)),
        ("attention_mask".into(), Dtype::I64, shape, i64_bytes(&out.attention_mask)),
    ];
    if let Some(t) = &out.pixel_values_images {
        owned.push(("pixel_values_images".into(), Dtype::F32, t.shape.clone(), f32_bytes(&t.data)));
    }
    if let Some(t) = &out.pixel_values_videos {
        owned.push(("pixel_values_videos".into(), Dtype::F32, t.shape.clone(), f32_bytes(&t.data)));
    }
    let err = |message: String| Error::Output { path: path.to_path_buf(), message };
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v)).map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| err(e.to_string()))
}
