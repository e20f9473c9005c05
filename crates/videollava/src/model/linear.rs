//! Linear layers `y = x W^T + b` (`W` `[out, in]`, `x` `[..., in]`, `y` in `x`'s dtype).
//!
//! Dense BF16 weights with BF16 activations on any CPU (prefill, vision towers, decoding) go
//! through [`crate::kernels::bf16_gemm`]: f32 sums plus the bias rounded once to BF16, as
//! PyTorch's BF16 `addmm` (on AVX-512 BF16 `vdpbf16ps`, ~400 GFLOP/s on 2 cores against ~180 for
//! candle's BF16 matmul; elsewhere AVX2/FMA or portable kernels). BF16 weights may also be read in
//! place from the memory-mapped checkpoint ([`LinearWeight::Mapped`]), on every CPU. f32
//! activations against BF16 weights: a few rows through our matrix-vector kernel, else candle.
//!
//! Quantized weights (`--quantize`, see [`super::quantize`]) are GGML blocks (Q8_0, Q4K, Q6K):
//! the input is quantized to 8 bits per block on the fly and dot products run in integers. Up to
//! 4 rows (decoding) go through our kernel [`crate::kernels::qgemv`] over the compact blocks (3-5x faster
//! than candle's for one row). More rows: Q8_0 and Q4K through our int8 GEMMs [`crate::kernels::q8_gemm`]
//! and [`crate::kernels::q4k_gemm`] (AVX-512 VNNI, ~670 and ~610 GOP/s on the 7B prefill shapes against
//! ~410 for candle's); Q6K (the 4-bit model's LM head) through candle's quantized matmul, which on
//! x86 repacks the blocks into VNNI tiles on first use and keeps them beside the blocks.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::weights::{MappedBf16, MappedQuant};
use crate::error::{Error, Result};
use crate::kernels::bf16_gemm;
use crate::kernels::fused::{self, Activation};
use crate::kernels::q4k_gemm;
use crate::kernels::q8_gemm;
use crate::kernels::qgemv::{qgemv, QFormat};

/// `out[m, n] = x[m, k] · W[n, k]ᵀ` over quantized blocks: `(x, m, w_blocks, n, k, out)`.
type QuantizedGemm = fn(&[f32], usize, &[u8], usize, usize, &mut [f32]);

/// The weight of a linear layer: dense `[out, in]` or GGML-quantized blocks of the same shape.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    /// BF16 `[out, in]` read in place from the memory-mapped checkpoint (CPU).
    Mapped(MappedBf16),
    /// GGML blocks `[out, in]` read in place from the memory-mapped quantized-weights cache
    /// (CPU; only our kernels read them).
    MappedQuantized(MappedQuant),
}

impl LinearWeight {
    /// `(out_features, in_features)`.
    fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            LinearWeight::Dense(w) => w.dims2()?,
            LinearWeight::Quantized(q) => q.shape().dims2()?,
            LinearWeight::Mapped(m) => m.dims(),
            LinearWeight::MappedQuantized(m) => m.dims(),
        })
    }

    /// Maps a memory-mapped weight's pages into the process now (a no-op for the others, which
    /// are in memory already).
    pub fn prefault(&self) {
        match self {
            LinearWeight::Mapped(m) => m.prefault(),
            LinearWeight::MappedQuantized(m) => m.prefault(),
            LinearWeight::Dense(_) | LinearWeight::Quantized(_) => {}
        }
    }

    /// Bytes of the weight as stored: dense elements times their size, or the GGML blocks.
    pub fn bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.storage_size_in_bytes(),
            LinearWeight::Mapped(m) => m.bits().len() * 2,
            LinearWeight::MappedQuantized(m) => m.bytes().len(),
        }
    }
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
        self.weight.dims()
    }

    /// Replaces the weight (e.g. by its quantized form); the shape must stay the same.
    pub fn set_weight(&mut self, weight: LinearWeight) -> Result<()> {
        let new = weight.dims()?;
        let old = self.dims()?;
        if new != old {
            return Err(Error::Model(format!("replacing a {old:?} linear weight by one of shape {new:?}")));
        }
        self.weight = weight;
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // BF16 activations against dense or mapped BF16 weights on the CPU: our kernels.
        if let Some(y) = self.fused_bf16(x, Activation::Identity)? {
            return Ok(y);
        }
        let copied;
        let w = match &self.weight {
            LinearWeight::Dense(w) => w,
            LinearWeight::Mapped(m) => {
                // No kernel reads the map here: a copy, then the dense path.
                copied = m.to_tensor(x.device())?;
                &copied
            }
            LinearWeight::MappedQuantized(m) => {
                let (dtype, dims, data) = (m.dtype(), m.dims(), m.bytes());
                if let Some(y) = self.quantized_gemm(dtype, dims, data, x)? {
                    return Ok(y);
                }
                // Any number of rows through the matrix-vector kernel (8 rows at a time).
                return self.quantized_gemv(dtype, dims, data, x, usize::MAX)?.ok_or_else(|| {
                    Error::Model(format!("no kernel reads {dtype:?} blocks of shape {dims:?} for input {:?}", x.dims()))
                });
            }
            LinearWeight::Quantized(q) => {
                let (data, dims) = (q.data()?, q.shape().dims2()?);
                if let Some(y) = self.quantized_gemv(q.dtype(), dims, &data, x, 4)? {
                    return Ok(y);
                }
                if let Some(y) = self.quantized_gemm(q.dtype(), dims, &data, x)? {
                    return Ok(y);
                }
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
        let cpu_bf16 = w.dtype() == DType::BF16 && matches!(x.device(), Device::Cpu) && w.is_contiguous();
        let mut dims = x.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = out_f;
        if cpu_bf16 && rows <= bf16_gemm::GEMV_MAX_ROWS {
            // f32 activations against BF16 weights (a BF16 checkpoint run in f32 keeps its weights).
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let ys = with_bf16_bits(w, out_f * in_f, |wb| Ok(bf16_gemm::gemv_f32(&xs, rows, wb, out_f, in_f)))?;
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

impl Linear {
    /// `act(self.forward(x))` for the activation named `act` (`hidden_act`): for BF16 on the
    /// CPU, where the activation has a fused form ([`Activation::fused`]), in the pass that rounds
    /// the product (the same numbers as the two steps, one trip through memory fewer).
    pub fn forward_activated(&self, x: &Tensor, act: &str) -> Result<Tensor> {
        if let Some(y) = Activation::fused(act).map(|a| self.fused_bf16(x, a)).transpose()?.flatten() {
            return Ok(y);
        }
        super::activation::activation(act, &self.forward(x)?)
    }

    /// `self.forward(x) * scale` (the attention's scaled queries); for BF16 on the CPU the
    /// product is rounded, then scaled and rounded again, in one pass, as PyTorch's two BF16 ops.
    pub fn forward_scaled(&self, x: &Tensor, scale: f64) -> Result<Tensor> {
        if let Some(y) = self.fused_bf16(x, Activation::Scale(scale as f32))? {
            return Ok(y);
        }
        Ok((self.forward(x)? * scale)?)
    }

    /// The BF16 product with `act` in its rounding pass, where `x` is BF16 on the CPU and the
    /// weight dense BF16 or mapped; `None` elsewhere.
    fn fused_bf16(&self, x: &Tensor, act: Activation) -> Result<Option<Tensor>> {
        if x.dtype() != DType::BF16 || !x.device().is_cpu() {
            return Ok(None);
        }
        match &self.weight {
            LinearWeight::Mapped(m) => self.bf16_product(x, m.bits(), m.dims(), act).map(Some),
            LinearWeight::Dense(w) if w.dtype() == DType::BF16 && w.is_contiguous() => {
                let (out_f, in_f) = w.dims2()?;
                with_bf16_bits(w, out_f * in_f, |wb| self.bf16_product(x, wb, (out_f, in_f), act)).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// BF16 activations `x` `[..., in]` times the BF16 weight bits `w` `[out, in]` (row-major):
    /// our AVX-512 BF16 kernel, any number of rows; the f32 sums plus the bias rounded once to
    /// BF16, as PyTorch's BF16 `addmm` does. The caller checks the kernel's CPU features.
    /// `act` is applied in the same pass as the rounding.
    fn bf16_product(&self, x: &Tensor, w: &[u16], (out_f, in_f): (usize, usize), act: Activation) -> Result<Tensor> {
        let rows = x.elem_count() / in_f.max(1);
        let mut dims = x.dims().to_vec();
        let last = dims.len() - 1;
        if dims[last] != in_f {
            return Err(Error::Model(format!("linear layer takes {in_f} features, got input {:?}", x.dims())));
        }
        dims[last] = out_f;
        let xs = x.contiguous()?;
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let rounded = with_bf16_bits(&xs, rows * in_f, |a| {
            Ok(bf16_gemm::matmul_bf16_rounded(a, rows, w, out_f, in_f, bias.as_deref(), act))
        })?;
        let y = match rounded {
            Some(y) => y,
            None => with_f32_scratch(rows * out_f, |out| {
                with_bf16_bits(&xs, rows * in_f, |a| {
                    bf16_gemm::matmul_bf16(a, rows, w, out_f, in_f, out);
                    Ok(fused::linear_output_bf16(out, out_f, bias.as_deref(), act))
                })
            })?,
        };
        Ok(Tensor::from_vec(y, dims, x.device())?)
    }

    /// Up to `max_rows` rows on the CPU through our matrix-vector kernel over the compact GGML
    /// blocks `data` (`dtype`, `[out, in]`; [`crate::kernels::qgemv`]: the weight streamed once at memory
    /// speed per 8 rows); `None` where it does not apply.
    fn quantized_gemv(
        &self,
        dtype: GgmlDType,
        (out_f, in_f): (usize, usize),
        data: &[u8],
        x: &Tensor,
        max_rows: usize,
    ) -> Result<Option<Tensor>> {
        let rows = x.elem_count() / in_f.max(1);
        let format = match dtype {
            GgmlDType::Q4K => QFormat::Q4K,
            GgmlDType::Q6K => QFormat::Q6K,
            GgmlDType::Q8_0 => QFormat::Q8_0,
            _ => return Ok(None),
        };
        if rows > max_rows || !x.device().is_cpu() || rows == 0 || in_f % format.block_values() != 0 {
            return Ok(None);
        }
        if data.len() != out_f * format.row_bytes(in_f) {
            return Ok(None);
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut ys = vec![0f32; rows * out_f];
        for (xc, yc) in xs.chunks(8 * in_f).zip(ys.chunks_mut(8 * out_f)) {
            qgemv(format, xc, xc.len() / in_f, data, out_f, in_f, yc);
        }
        let mut dims = x.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = out_f;
        let y = Tensor::from_vec(ys, dims, x.device())?.to_dtype(x.dtype())?;
        Ok(Some(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        }))
    }
}

/// Largest f32 scratch buffer kept between calls (bytes); a 2,074-token prompt through the 7B MLP
/// needs 91 MB.
const SCRATCH_KEEP_BYTES: usize = 256 << 20;

thread_local! {
    /// The f32 product before it is rounded to BF16, reused across calls: a fresh buffer of this
    /// size is a new mapping whose pages the kernel zeroes on first touch (~3% of a long prefill).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a buffer of `len` f32 values with unspecified contents.
fn with_f32_scratch<T>(len: usize, f: impl FnOnce(&mut [f32]) -> Result<T>) -> Result<T> {
    if len * 4 > SCRATCH_KEEP_BYTES {
        return f(&mut vec![0f32; len]);
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Re-entered (not expected): a fresh buffer.
        Err(_) => f(&mut vec![0f32; len]),
    })
}

impl Linear {
    /// More rows (prefill) with Q8_0 or Q4K weights on the CPU through our int8 GEMMs
    /// ([`crate::kernels::q8_gemm`], [`crate::kernels::q4k_gemm`]: ~1.6x and ~1.4x candle's quantized matmul on
    /// the 7B shapes, and no repacked copy of the weight kept); `None` where they do not apply.
    /// The f32 product is rounded once to the activation dtype, with the bias added first.
    fn quantized_gemm(
        &self,
        dtype: GgmlDType,
        (out_f, in_f): (usize, usize),
        data: &[u8],
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        let (format, gemm): (QFormat, QuantizedGemm) = match dtype {
            GgmlDType::Q8_0 if q8_gemm::has_fast_path() => (QFormat::Q8_0, q8_gemm::matmul_q8_0),
            GgmlDType::Q4K if q4k_gemm::has_fast_path() => (QFormat::Q4K, q4k_gemm::matmul_q4k),
            _ => return Ok(None),
        };
        if !x.device().is_cpu() || in_f % format.block_values() != 0 {
            return Ok(None);
        }
        let rows = x.elem_count() / in_f.max(1);
        if data.len() != out_f * format.row_bytes(in_f) || rows <= 4 {
            return Ok(None);
        }
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let mut dims = x.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = out_f;
        let y = with_f32_scratch(rows * out_f, |out| {
            fused::with_f32_values(x, |xs| {
                gemm(xs, rows, data, out_f, in_f, out);
                Ok(())
            })?;
            if x.dtype() == DType::BF16 {
                let y = fused::linear_output_bf16(out, out_f, bias.as_deref(), Activation::Identity);
                return Ok(Tensor::from_vec(y, dims.as_slice(), x.device())?);
            }
            let y = Tensor::from_slice(out, dims.as_slice(), x.device())?;
            let y = match &bias {
                Some(b) => y.broadcast_add(&Tensor::from_slice(b, out_f, x.device())?)?,
                None => y,
            };
            Ok(y.to_dtype(x.dtype())?)
        })?;
        Ok(Some(y))
    }
}

/// Runs `f` on the first `len` values of the contiguous BF16 CPU tensor `t` as raw 16-bit patterns.
fn with_bf16_bits<T>(t: &Tensor, len: usize, f: impl FnOnce(&[u16]) -> Result<T>) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Model("bf16 tensor not in CPU memory".into()));
    };
    let start = layout.start_offset();
    let values = cpu.as_slice::<half::bf16>()?;
    let values = values
        .get(start..start + len)
        .ok_or_else(|| Error::Model(format!("bf16 tensor holds {} values, {len} needed", values.len())))?;
    let bits: &[u16] = bytemuck::cast_slice(values);
    f(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `forward_activated` gives `activation(forward(x))` bit for bit, fused or not, on every
    /// kernel set (the AMX GEMM rounds and activates in its own pass from 65 rows).
    #[test]
    fn activation_fused_into_the_product_changes_no_bit() {
        let dev = Device::Cpu;
        for (rows, n, k) in [(100, 70, 64), (7, 33, 96), (300, 129, 128)] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let lin = Linear::new(w, Some(b));
            crate::kernels::cpu::for_each_set(|set| {
                for act in ["quick_gelu", "gelu"] {
                    let want = super::super::activation::activation(act, &lin.forward(&x).unwrap()).unwrap();
                    let got = lin.forward_activated(&x, act).unwrap();
                    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                    let (g, w) = (bits(&got), bits(&want));
                    let same = g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same && g.len() == w.len(), "{set} {act} rows={rows} n={n} k={k}");
                }
                let want =
                    (lin.forward(&x).unwrap() * 0.125).unwrap().flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                let got =
                    lin.forward_scaled(&x, 0.125).unwrap().flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                assert!(got.iter().zip(&want).all(|(a, b)| a == b), "{set} scaled rows={rows} n={n} k={k}");
            });
        }
    }

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
        // 1 row (decode) and 100 rows (prefill: the BF16 GEMM where the CPU has AVX-512 BF16).
        for rows in [1, 100] {
            let w = Tensor::randn(0f32, 1.0, (33, 48), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, rows, 48), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let ours = Linear::new(w.clone(), None).forward(&x).unwrap();
            assert_eq!(ours.dtype(), DType::BF16);
            assert_eq!(ours.dims(), &[1, rows, 33]);
            let candle = candle_nn::Linear::new(w, None).forward(&x).unwrap();
            let d = (ours.to_dtype(DType::F32).unwrap() - candle.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 0.1, "rows {rows}: differs from candle's bf16 matmul by {d}");
        }
    }

    /// BF16 inputs with a bias: the f32 product plus the bias, rounded once: within half a bf16
    /// step of the exact value (plus f32 summation-order noise; rounding the product first and
    /// the sum again would exceed it), for shapes of several sizes in a row, so that the reused
    /// f32 scratch buffer never leaks an earlier product.
    #[test]
    fn bf16_bias_is_added_before_the_single_rounding() {
        // Every kernel set this CPU has: AVX-512 BF16, AVX2 + FMA and the portable path round once.
        crate::kernels::cpu::for_each_set(bf16_bias_rounded_once);
    }

    fn bf16_bias_rounded_once(set: crate::kernels::KernelSet) {
        let dev = Device::Cpu;
        for (rows, n, k) in [(100, 33, 48), (7, 40, 64), (1, 33, 48), (100, 33, 48), (60, 129, 31)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let b = Tensor::randn(0f32, 3.0, n, &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let ours = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
            assert_eq!((ours.dtype(), ours.dims()), (DType::BF16, &[rows, n][..]));
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let exact = f(&x).matmul(&f(&w).t().unwrap()).unwrap().broadcast_add(&f(&b)).unwrap();
            let got = f(&ours).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = exact.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                // Spacing of the bf16 values at |e| (the half step of round-to-nearest).
                let e_bits = e.abs().max(f32::MIN_POSITIVE).to_bits() >> 23;
                let step = 2f32.powi(e_bits as i32 - 127 - 7);
                let bound = 0.5 * step * (1.0 + 1e-3) + 1e-5 * e.abs() + 1e-6;
                assert!((g - e).abs() <= bound, "{set}: {rows}x{n}x{k} element {i}: {g} vs exact {e}");
            }
        }
    }

    /// Q8_0 weights: every row count (qgemv up to 4 rows, the int8 GEMM above) agrees with
    /// candle's quantized matmul run on the same blocks; k = 96 keeps candle on its per-block Q8_0
    /// path (its VNNI-tiled path quantizes activations in 256-value blocks instead).
    #[test]
    fn q8_0_weights_match_candles_quantized_matmul_for_every_row_count() {
        let dev = Device::Cpu;
        let (n, k) = (70, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let lin = Linear { weight: LinearWeight::Quantized(q.clone()), bias: None };
        for rows in [1, 3, 4, 5, 8, 100] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
            let ours = lin.forward(&x).unwrap();
            let want = x.apply_op1_no_bwd(q.as_ref()).unwrap();
            assert_eq!(ours.dims(), want.dims());
            let m = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = (ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-4 * (m + 1.0), "rows {rows}: max diff {d} (max |y| {m})");
            let xb = x.to_dtype(DType::BF16).unwrap();
            let ours = lin.forward(&xb).unwrap();
            assert_eq!(ours.dtype(), DType::BF16);
            let want = xb.to_dtype(DType::F32).unwrap().apply_op1_no_bwd(q.as_ref()).unwrap();
            let d = (ours.to_dtype(DType::F32).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(d <= m * 2f32.powi(-8) + 1e-4, "bf16 rows {rows}: max diff {d}");
        }
    }

    /// Q4K weights: every row count (qgemv up to 4 rows, the int8 GEMM above) is as close to
    /// the product with the dequantized weight as candle's quantized matmul is (both quantize
    /// the activations to 8 bits: ours per 32 values, candle's per 256).
    #[test]
    fn q4k_weights_are_as_close_to_the_dequantized_product_as_candles() {
        let dev = Device::Cpu;
        let (n, k) = (40, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).unwrap());
        let wd = q.dequantize(&dev).unwrap();
        let lin = Linear { weight: LinearWeight::Quantized(q.clone()), bias: None };
        let max_err =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        for rows in [1, 4, 5, 9, 64] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let exact = x.matmul(&wd.t().unwrap()).unwrap();
            let ours = lin.forward(&x).unwrap();
            let candle = x.apply_op1_no_bwd(q.as_ref()).unwrap();
            let m = exact.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let (e_ours, e_candle) = (max_err(&ours, &exact), max_err(&candle, &exact));
            assert!(e_ours <= 1.5 * e_candle + 1e-3 * m, "rows {rows}: ours {e_ours}, candle {e_candle}");
            assert!(e_ours < 0.02 * m, "rows {rows}: error {e_ours} of max {m}");
        }
    }
}
