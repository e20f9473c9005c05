//! Linear layers `y = x W^T + b` (`W` `[out, in]`, `x` `[..., in]`, `y` in `x`'s dtype).
//!
//! Dense weights: large inputs (prefill, vision) use candle's matmul. For a few rows on the CPU
//! with BF16 weights (decoding) we use a kernel of our own: candle's CPU BF16 matmul widens the
//! whole weight to f32 on every call (about 88 ms for one 4096x11008 matrix), while decoding only
//! needs to stream the weight once. Ours reads the BF16 weight directly, widens each value in
//! registers and accumulates in f32 (the output is rounded to BF16, as candle's would be); it is
//! compiled for AVX2+FMA when the CPU has them and split across threads over output features.
//!
//! Quantized weights (`--quantize`, see [`super::quantize`]) are GGML blocks (Q8_0, Q4K) run by
//! candle's quantized kernels (AVX-512 VNNI on this CPU): the input is quantized to 8 bits per
//! block on the fly and dot products run in integers.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Most input rows handled by our matrix-vector kernel; above it candle's GEMM wins.
const GEMV_MAX_ROWS: usize = 8;
/// Output features per parallel task.
const BLOCK: usize = 64;

/// The weight of a linear layer: dense `[out, in]` or GGML-quantized blocks of the same shape.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl From<candle_nn::Linear> for Linear {
    fn from(l: candle_nn::Linear) -> Self {
        Self { weight: LinearWeight::Dense(l.weight().clone()), bias: l.bias().cloned() }
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Dense(weight), bias }
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match &self.weight {
            LinearWeight::Dense(w) => w.dims2()?,
            LinearWeight::Quantized(q) => q.shape().dims2()?,
        })
    }

    /// Replaces the weight (e.g. by its quantized form); the shape must stay the same.
    pub fn set_weight(&mut self, weight: LinearWeight) -> Result<()> {
        let new = match &weight {
            LinearWeight::Dense(w) => w.dims2()?,
            LinearWeight::Quantized(q) => q.shape().dims2()?,
        };
        let old = self.dims()?;
        if new != old {
            return Err(Error::Model(format!("replacing a {old:?} linear weight by one of shape {new:?}")));
        }
        self.weight = weight;
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.weight {
            LinearWeight::Dense(w) => w,
            LinearWeight::Quantized(q) => {
                // candle's quantized matmul takes f32/f16/bf16 contiguous input of any rank.
                // On x86 it repacks Q4K/Q8_0 blocks into VNNI tiles on first use and keeps them
                // beside the blocks (about twice the quantized bytes resident, 3x faster prefill
                // than its unpacked f16 path, measured on the 7B shapes).
                let xs = match x.dtype() {
                    DType::F32 | DType::BF16 | DType::F16 => x.contiguous()?,
                    _ => x.to_dtype(DType::F32)?.contiguous()?,
                };
                let y = xs.apply_op1_no_bwd(q.as_ref())?.to_dtype(x.dtype())?;
                return Ok(match &self.bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                    None => y,
                });
            }
        };
        let (out_f, in_f) = w.dims2()?;
        let rows = x.elem_count() / in_f.max(1);
        if rows <= GEMV_MAX_ROWS && w.dtype() == DType::BF16 && matches!(x.device(), Device::Cpu) && w.is_contiguous() {
            let mut dims = x.dims().to_vec();
            let last = dims.len() - 1;
            dims[last] = out_f;
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let ys = {
                let (storage, layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    return Err(Error::Model("bf16 weight not in CPU memory".into()));
                };
                let w = &cpu.as_slice::<half::bf16>()?[layout.start_offset()..layout.start_offset() + out_f * in_f];
                // SAFETY: bf16 is a transparent 16-bit value; reading it as u16 bits is sound.
                let w: &[u16] = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len()) };
                gemv_bf16(&xs, rows, w, out_f, in_f)
            };
            let y = Tensor::from_vec(ys, dims, x.device())?.to_dtype(x.dtype())?;
            return Ok(match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        let l = candle_nn::Linear::new(w.clone(), self.bias.clone());
        Ok(l.forward(x)?)
    }
}

/// `y[r, j] = sum_k x[r, k] * w[j, k]` with `w` as BF16 bits `[n, k]`; returns `[rows, n]`.
pub fn gemv_bf16(x: &[f32], rows: usize, w: &[u16], n: usize, k: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * rows]; // [n, rows]
    out_t.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(bi, chunk)| {
        let j0 = bi * BLOCK;
        let nj = chunk.len() / rows;
        block(x, rows, &w[j0 * k..(j0 + nj) * k], nj, k, chunk);
    });
    if rows == 1 {
        return out_t;
    }
    let mut out = vec![0f32; n * rows];
    for j in 0..n {
        for r in 0..rows {
            out[r * n + j] = out_t[j * rows + r];
        }
    }
    out
}

fn block(x: &[f32], rows: usize, w: &[u16], nj: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            unsafe { block_avx2(x, rows, w, nj, k, out) };
            return;
        }
    }
    block_generic(x, rows, w, nj, k, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(x: &[f32], rows: usize, w: &[u16], nj: usize, k: usize, out: &mut [f32]) {
    block_generic(x, rows, w, nj, k, out);
}

#[inline(always)]
fn block_generic(x: &[f32], rows: usize, w: &[u16], nj: usize, k: usize, out: &mut [f32]) {
    for j in 0..nj {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..rows {
            out[j * rows + r] = dot(&x[r * k..(r + 1) * k], wr);
        }
    }
}

#[inline(always)]
fn dot(x: &[f32], w: &[u16]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = x.len() / LANES;
    for c in 0..chunks {
        let xs = &x[c * LANES..(c + 1) * LANES];
        let ws = &w[c * LANES..(c + 1) * LANES];
        for i in 0..LANES {
            acc[i] = xs[i].mul_add(f32::from_bits((ws[i] as u32) << 16), acc[i]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * LANES..x.len() {
        sum += x[i] * f32::from_bits((w[i] as u32) << 16);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_gemv_matches_candle_matmul() {
        let dev = Device::Cpu;
        for (rows, n, k) in [(1, 70, 131), (3, 129, 64), (8, 5, 1000)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let ours = Linear::new(w.clone(), Some(bias.clone())).forward(&x).unwrap();
            assert_eq!(ours.dims(), &[rows, n]);
            // Reference: everything in f32 from the same bf16 weights.
            let want = x.matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
            let d = (ours - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "rows {rows}: max diff {d}");
        }
    }

    #[test]
    fn bf16_inputs_go_through_the_kernel_and_come_back_bf16() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (33, 48), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 1, 48), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let ours = Linear::new(w.clone(), None).forward(&x).unwrap();
        assert_eq!(ours.dtype(), DType::BF16);
        assert_eq!(ours.dims(), &[1, 1, 33]);
        let candle = candle_nn::Linear::new(w, None).forward(&x).unwrap();
        let d = (ours.to_dtype(DType::F32).unwrap() - candle.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 0.1, "differs from candle's bf16 matmul by {d}");
    }
}
