//! Fused element-wise kernels for BF16 activations on the CPU.
//!
//! candle runs each element-wise step of a layer as its own pass, and for BF16 several of them
//! round to BF16 after every arithmetic step (`silu` is `v / (1 + exp(-v))` in BF16 arithmetic),
//! widen and narrow one 8-value vector at a time behind a run-time feature check, or run on one
//! thread. On a 2,074-token prompt through the 7B decoder and the CLIP towers those passes were
//! about 11% of the prefill and 45% of the vision towers. These kernels make one parallel pass per
//! step and round the way PyTorch's CPU kernels for BF16 do: compute in f32, round once to BF16
//! (round-to-nearest-even, NaN kept) where PyTorch's op returns a BF16 tensor.
//!
//! Conventions: every tensor argument is a contiguous CPU tensor; activations are BF16 `[..., H]`
//! (rows of `H` values, the last dimension), norm weights `[H]`. Each function returns `None`
//! when its inputs are not of that kind (other dtypes, devices or layouts), and the caller then
//! runs candle's ops instead. The loops are written as plain scalar code and compiled twice, once
//! with AVX-512 enabled (picked at run time) so that the compiler vectorises them.

use candle_core::{DType, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::cpu::{self, KernelSet};
use crate::error::{Error, Result};

/// Values per parallel task for purely element-wise steps.
const CHUNK: usize = 1 << 15;

/// Runs `f` on the values of the contiguous CPU tensor `t` (of element type `T`).
pub(crate) fn with_slice<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Model("tensor not in CPU memory".into()));
    };
    let start = layout.start_offset();
    let values = cpu.as_slice::<T>()?;
    let len = t.elem_count();
    let values = values
        .get(start..start + len)
        .ok_or_else(|| Error::Model(format!("tensor holds {} values, {len} needed", values.len())))?;
    f(values)
}

fn is_cpu_bf16(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::BF16 && t.is_contiguous()
}

/// f32 -> BF16 bits, round to nearest even, NaN kept quiet (`half::bf16::from_f32`), written so
/// that it vectorises.
#[inline(always)]
fn to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((x >> 16) | 0x0040) as u16;
    }
    (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn widen(b: bf16) -> f32 {
    f32::from_bits((b.to_bits() as u32) << 16)
}

#[inline(always)]
fn from_bits(b: u16) -> bf16 {
    bf16::from_bits(b)
}

/// Defines `$name(set, args)` that runs `$body` compiled for the kernel set `set` (AVX-512,
/// AVX2 + FMA, or the baseline target). The bodies are plain Rust with no fused multiply-adds, so
/// every set gives bit-identical results; the entry points read the set once (on the calling
/// thread, where [`cpu::force`] applies) and hand it to their parallel tasks.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name(set: KernelSet, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,avx2")]
            fn avx512($($arg: $ty),*) { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn avx2($($arg: $ty),*) { body($($arg),*) }
            match set {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `set` comes from `cpu::kernel_set()`, which allows AVX-512 only where it
                // was detected at run time.
                s if s >= KernelSet::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above, for AVX2 + FMA + F16C.
                s if s >= KernelSet::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

/// The element-wise function a linear layer's output goes through in the same pass as its
/// rounding ([`linear_output_bf16`], the AMX GEMM's store): the output never makes a second
/// trip through memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// The rounded sum itself.
    Identity,
    /// CLIP's `quick_gelu` in BF16, as [`quick_gelu`] computes it.
    QuickGelu,
    /// The rounded sum times a factor, rounded again: PyTorch's BF16 `q_proj(x) * scale`.
    Scale(f32),
}

impl Activation {
    /// The fused form of a `hidden_act` name, where there is one.
    pub fn fused(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }
}

/// `quick_gelu` of a BF16 value `v` (widened), rounded to BF16 after each of PyTorch's three ops
/// (`1.702 * x`, `sigmoid`, the product).
#[inline(always)]
fn quick_gelu_bf16(v: f32) -> u16 {
    let round = |v: f32| widen(from_bits(to_bf16_bits(v)));
    let t = round(1.702 * v);
    let s = round(1.0 / (1.0 + exp_f32(-t)));
    to_bf16_bits(v * s)
}

/// One row of a linear layer's output: `act(y + bias)` with the sum rounded once to BF16 (no
/// bias: `y` itself, so that a `-0.0` stays one), `y`, `bias` (empty for none) and `out` of one
/// length.
#[inline(always)]
fn finish(y: &[f32], bias: &[f32], act: Activation, out: &mut [bf16]) {
    // One loop per activation (the `match` outside the loops, so that each vectorises): `post`
    // gets the rounded sum, widened.
    #[inline(always)]
    fn rows(y: &[f32], bias: &[f32], out: &mut [bf16], post: impl Fn(f32) -> u16) {
        if bias.is_empty() {
            for (o, &v) in out.iter_mut().zip(y) {
                *o = from_bits(post(widen(from_bits(to_bf16_bits(v)))));
            }
        } else {
            for ((o, &v), &b) in out.iter_mut().zip(y).zip(bias) {
                *o = from_bits(post(widen(from_bits(to_bf16_bits(v + b)))));
            }
        }
    }
    match act {
        Activation::Identity => rows(y, bias, out, to_bf16_bits),
        Activation::QuickGelu => rows(y, bias, out, quick_gelu_bf16),
        Activation::Scale(f) => rows(y, bias, out, |v| to_bf16_bits(v * f)),
    }
}

multiversion! {
    fn convert_rows(y: &[f32], bias: &[f32], act: Activation, out: &mut [bf16]) {
        if bias.is_empty() {
            finish(y, bias, act, out);
        } else {
            for (orow, yrow) in out.chunks_exact_mut(bias.len()).zip(y.chunks_exact(bias.len())) {
                finish(yrow, bias, act, orow);
            }
        }
    }
}

multiversion! {
    /// One row of [`linear_output_bf16`] (`y`, `bias` (empty for none) and `out` of one length),
    /// for the GEMMs that finish their output a block at a time.
    pub(crate) fn finish_row(y: &[f32], bias: &[f32], act: Activation, out: &mut [bf16]) {
        finish(y, bias, act, out);
    }
}

/// The f32 output `y` `[rows, n]` of a matrix product as BF16, plus `bias` `[n]` (f32) when given,
/// rounded once (PyTorch's BF16 `addmm` adds the bias to the f32 accumulator before rounding),
/// then `act` (rounded as its unfused form).
pub fn linear_output_bf16(y: &[f32], n: usize, bias: Option<&[f32]>, act: Activation) -> Vec<bf16> {
    let set = cpu::kernel_set();
    let mut out = vec![bf16::ZERO; y.len()];
    let bias = bias.unwrap_or(&[]);
    let rows_per_task = (CHUNK / n.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * n.max(1))
        .zip(y.par_chunks(rows_per_task * n.max(1)))
        .for_each(|(o, y)| convert_rows(set, y, bias, act, o));
    out
}

multiversion! {
    fn widen_chunk(x: &[bf16], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = widen(v);
        }
    }
}

/// Runs `f` on the values of `x` as f32: a contiguous F32 CPU tensor is read in place, a
/// contiguous BF16 one widened (exactly) in one parallel pass, anything else converted by candle.
pub fn with_f32_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let set = cpu::kernel_set();
    if x.device().is_cpu() && x.is_contiguous() {
        match x.dtype() {
            DType::F32 => return with_slice::<f32, _>(x, f),
            DType::BF16 => {
                let wide = with_slice::<bf16, _>(x, |xs| {
                    let mut out = vec![0f32; xs.len()];
                    out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(o, i)| widen_chunk(set, i, o));
                    Ok(out)
                })?;
                return f(&wide);
            }
            _ => {}
        }
    }
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    f(&v)
}

/// `Σ g(x)` over a BF16 row in f32, with 16 partial sums so that the reduction vectorises.
#[inline(always)]
fn row_sum(xrow: &[bf16], g: impl Fn(f32) -> f32) -> f32 {
    let mut part = [0f32; 16];
    let mut chunks = xrow.chunks_exact(16);
    for c in &mut chunks {
        for (p, &v) in part.iter_mut().zip(c) {
            *p += g(widen(v));
        }
    }
    let mut sum: f32 = part.iter().sum();
    for &v in chunks.remainder() {
        sum += g(widen(v));
    }
    sum
}

multiversion! {
    fn rms_norm_rows(x: &[bf16], w: &[bf16], eps: f32, out: &mut [bf16]) {
        let h = w.len();
        for (orow, xrow) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let s = (row_sum(xrow, |v| v * v) / h as f32 + eps).sqrt();
            for ((o, &v), &wv) in orow.iter_mut().zip(xrow).zip(w) {
                let n = widen(from_bits(to_bf16_bits(widen(v) / s)));
                *o = from_bits(to_bf16_bits(n * widen(wv)));
            }
        }
    }
}

/// Llama's RMSNorm of BF16 `x` `[..., H]` with BF16 `weight` `[H]`: in f32,
/// `x / sqrt(mean(x²) + eps)`, rounded to BF16, times the weight, rounded (transformers'
/// `LlamaRMSNorm`: `weight * hidden_states.to(input_dtype)`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let set = cpu::kernel_set();
    let h = weight.elem_count();
    if !is_cpu_bf16(x) || !is_cpu_bf16(weight) || h == 0 || x.dim(candle_core::D::Minus1)? != h {
        return Ok(None);
    }
    let out = with_slice::<bf16, _>(x, |xs| {
        with_slice::<bf16, _>(weight, |w| {
            let mut out = vec![bf16::ZERO; xs.len()];
            let rows_per_task = (CHUNK / h).max(1);
            out.par_chunks_mut(rows_per_task * h)
                .zip(xs.par_chunks(rows_per_task * h))
                .for_each(|(o, x)| rms_norm_rows(set, x, w, eps as f32, o));
            Ok(out)
        })
    })?;
    Ok(Some(Tensor::from_vec(out, x.dims(), x.device())?))
}

multiversion! {
    fn layer_norm_rows(x: &[bf16], w: &[f32], b: &[f32], eps: f32, out: &mut [bf16]) {
        let h = w.len();
        for (orow, xrow) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let mean = row_sum(xrow, |v| v) / h as f32;
            // Two passes (the mean first), as accurate as PyTorch's row moments.
            let sq = row_sum(xrow, |v| (v - mean) * (v - mean));
            let inv_std = 1.0 / (sq / h as f32 + eps).sqrt();
            for (((o, &v), &wv), &bv) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
                *o = from_bits(to_bf16_bits((widen(v) - mean) * inv_std * wv + bv));
            }
        }
    }
}

/// LayerNorm of BF16 `x` `[..., H]` with f32 `weight` and `bias` `[H]`, computed in f32 (mean,
/// then variance around it) and rounded once to BF16.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let set = cpu::kernel_set();
    let h = weight.elem_count();
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if !is_cpu_bf16(x) || !f32_cpu(weight) || !f32_cpu(bias) || h == 0 || bias.elem_count() != h {
        return Ok(None);
    }
    if x.dim(candle_core::D::Minus1)? != h {
        return Ok(None);
    }
    let out = with_slice::<bf16, _>(x, |xs| {
        with_slice::<f32, _>(weight, |w| {
            with_slice::<f32, _>(bias, |b| {
                let mut out = vec![bf16::ZERO; xs.len()];
                let rows_per_task = (CHUNK / h).max(1);
                out.par_chunks_mut(rows_per_task * h)
                    .zip(xs.par_chunks(rows_per_task * h))
                    .for_each(|(o, x)| layer_norm_rows(set, x, w, b, eps as f32, o));
                Ok(out)
            })
        })
    })?;
    Ok(Some(Tensor::from_vec(out, x.dims(), x.device())?))
}

/// `e^x` in f32 with plain arithmetic (no libm call), so that loops over it vectorise: Cephes'
/// `expf` (range reduction by `ln 2` in two parts, degree-5 polynomial; within 2 ulps of the
/// exact value), `+inf` above ln(f32::MAX) = 88.72283 and `0` below -103.97 like `f32::exp`.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5 * 2^23 trick (exact for |v| < 2^22).
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-103.97, 88.722_83);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n in two factors, so that n down to -150 (results below f32's normal range) works.
    // `n` as an integer from the low bits of `t` (`1.5 * 2^23 + n`): `n as i32` (a saturating
    // conversion) would not vectorise.
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let h = n / 2;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - h + 127) as u32) << 23);
    let v = y * s1 * s2;
    if x > 88.722_83 {
        f32::INFINITY
    } else if x < -103.97 {
        0.0
    } else {
        v
    }
}

multiversion! {
    fn silu_mul_chunk(g: &[bf16], u: &[bf16], out: &mut [bf16]) {
        for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
            let gv = widen(gv);
            let s = widen(from_bits(to_bf16_bits(gv / (1.0 + exp_f32(-gv)))));
            *o = from_bits(to_bf16_bits(s * widen(uv)));
        }
    }
}

/// `silu(gate) * up` for BF16 tensors of one shape: `silu` in f32 rounded to BF16 (PyTorch's
/// BF16 `silu`), then the product rounded.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    zip_bf16(gate, up, silu_mul_chunk)
}

/// `f` over matching chunks of two BF16 tensors of one shape, in parallel, into a new tensor;
/// `None` unless both are contiguous BF16 CPU tensors of the same shape.
fn zip_bf16(a: &Tensor, b: &Tensor, f: fn(KernelSet, &[bf16], &[bf16], &mut [bf16])) -> Result<Option<Tensor>> {
    let set = cpu::kernel_set();
    if !is_cpu_bf16(a) || !is_cpu_bf16(b) || a.dims() != b.dims() {
        return Ok(None);
    }
    let out = with_slice::<bf16, _>(a, |x| {
        with_slice::<bf16, _>(b, |y| {
            let mut out = vec![bf16::ZERO; x.len()];
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                .for_each(|(o, (x, y))| f(set, x, y, o));
            Ok(out)
        })
    })?;
    Ok(Some(Tensor::from_vec(out, a.dims(), a.device())?))
}

multiversion! {
    fn quick_gelu_bf16_chunk(x: &[bf16], out: &mut [bf16]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = from_bits(quick_gelu_bf16(widen(v)));
        }
    }
}

multiversion! {
    fn quick_gelu_f32_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * (1.0 / (1.0 + exp_f32(-(1.702 * v))));
        }
    }
}

/// CLIP's `quick_gelu`, `x * sigmoid(1.702 x)`, in one parallel pass over a contiguous CPU tensor:
/// F32 in f32; BF16 rounded to BF16 after each of PyTorch's three ops (`1.702 * x`, `sigmoid`,
/// the product), as transformers computes it in BF16.
pub fn quick_gelu(x: &Tensor) -> Result<Option<Tensor>> {
    let set = cpu::kernel_set();
    if !x.device().is_cpu() || !x.is_contiguous() {
        return Ok(None);
    }
    let y = match x.dtype() {
        DType::BF16 => with_slice::<bf16, _>(x, |xs| {
            let mut out = vec![bf16::ZERO; xs.len()];
            out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(o, i)| quick_gelu_bf16_chunk(set, i, o));
            Ok(Tensor::from_vec(out, x.dims(), x.device())?)
        })?,
        DType::F32 => with_slice::<f32, _>(x, |xs| {
            let mut out = vec![0f32; xs.len()];
            out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(o, i)| quick_gelu_f32_chunk(set, i, o));
            Ok(Tensor::from_vec(out, x.dims(), x.device())?)
        })?,
        _ => return Ok(None),
    };
    Ok(Some(y))
}

multiversion! {
    fn rope_rows(src: &[bf16], stride: usize, cos: &[bf16], sin: &[bf16], d: usize, out: &mut [bf16]) {
        let half = d / 2;
        let r = |v: f32| widen(from_bits(to_bf16_bits(v)));
        for (l, orow) in out.chunks_exact_mut(d).enumerate() {
            let x = &src[l * stride..l * stride + d];
            let (c, s) = (&cos[l * half..(l + 1) * half], &sin[l * half..(l + 1) * half]);
            let (o1, o2) = orow.split_at_mut(half);
            for i in 0..half {
                let (x1, x2, ci, si) = (widen(x[i]), widen(x[i + half]), widen(c[i]), widen(s[i]));
                o1[i] = from_bits(to_bf16_bits(r(x1 * ci) - r(x2 * si)));
                o2[i] = from_bits(to_bf16_bits(r(x1 * si) + r(x2 * ci)));
            }
        }
    }
}

/// Splits the BF16 projection `x` `[B, L, N * D]` into heads `[B, N, L, D]` and applies the
/// rotary embedding (rotate-half form) with BF16 `cos`, `sin` `[B, L, D / 2]` in the same pass:
/// `x1 cos - x2 sin`, `x1 sin + x2 cos`, each product and the sum rounded to BF16 as PyTorch's
/// `q * cos + rotate_half(q) * sin` and candle's `rope` do in BF16.
pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    let set = cpu::kernel_set();
    if !is_cpu_bf16(x) || !is_cpu_bf16(cos) || !is_cpu_bf16(sin) || heads == 0 {
        return Ok(None);
    }
    let (b, l, nd) = x.dims3()?;
    let d = nd / heads;
    if d * heads != nd || !d.is_multiple_of(2) || cos.dims() != [b, l, d / 2] || sin.dims() != cos.dims() {
        return Ok(None);
    }
    let out = with_slice::<bf16, _>(x, |xs| {
        with_slice::<bf16, _>(cos, |c| {
            with_slice::<bf16, _>(sin, |s| {
                let mut out = vec![bf16::ZERO; xs.len()];
                if out.is_empty() {
                    return Ok(out);
                }
                out.par_chunks_mut(l * d).enumerate().for_each(|(bn, o)| {
                    let (bi, n) = (bn / heads, bn % heads);
                    let src = &xs[bi * l * nd + n * d..];
                    let cs = bi * l * (d / 2)..(bi + 1) * l * (d / 2);
                    rope_rows(set, src, nd, &c[cs.clone()], &s[cs], d, o);
                });
                Ok(out)
            })
        })
    })?;
    Ok(Some(Tensor::from_vec(out, (b, heads, l, d), x.device())?))
}

multiversion! {
    fn add_chunk(a: &[bf16], b: &[bf16], out: &mut [bf16]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = from_bits(to_bf16_bits(widen(x) + widen(y)));
        }
    }
}

/// `a + b` for BF16 tensors of one shape (the residual connections), rounded once.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    zip_bf16(a, b, add_chunk)
}

/// `a + b` through [`add`] where it applies, else candle's broadcasting add.
pub fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match add(a, b)? {
        Some(y) => Ok(y),
        None => Ok(a.broadcast_add(b)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn randn(dims: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, dims, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Largest difference in BF16 units in the last place (relative to the reference's magnitude).
    fn max_ulps(got: &Tensor, want: &Tensor) -> f32 {
        let g = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        g.iter()
            .zip(&w)
            .map(|(&g, &w)| {
                let ulp = (w.abs().max(1e-30) * 2f32.powi(-7)).max(f32::MIN_POSITIVE);
                (g - w).abs() / ulp
            })
            .fold(0f32, f32::max)
    }

    #[test]
    fn bf16_rounding_is_halfs() {
        let mut bits = 0u32;
        for _ in 0..200_000 {
            bits = bits.wrapping_mul(2_654_435_761).wrapping_add(0x9E37_79B9);
            let v = f32::from_bits(bits);
            assert_eq!(to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e} ({bits:#x})");
        }
        for v in [0.0f32, -0.0, 1.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1.0039062] {
            assert_eq!(to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e}");
        }
        assert!(bf16::from_bits(to_bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn exp_is_within_two_ulps_of_f64() {
        let mut worst = 0f64;
        let mut x = -110.0f32;
        while x < 90.0 {
            let got = exp_f32(x);
            let want = (x as f64).exp();
            if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            } else if want >= f32::MIN_POSITIVE as f64 {
                let ulp = 2f64.powi((want.log2().floor() as i32) - 23);
                let e = (got as f64 - want).abs() / ulp;
                assert!(e <= 2.0, "exp({x}) = {got:e}, want {want:e}: {e} ulps");
                worst = worst.max(e);
            } else {
                // Subnormal results: within one subnormal step (2^-149) plus a relative error.
                assert!(
                    (got as f64 - want).abs() <= 2f64.powi(-149) * 2.0 + want * 1e-6,
                    "exp({x}) = {got:e}, want {want:e}"
                );
            }
            x += 0.001_37;
        }
        assert!(worst <= 2.0, "exp is {worst} ulps off");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
    }

    #[test]
    fn linear_output_equals_rounding_the_sum_once() {
        let (rows, n) = (37, 300);
        let y: Vec<f32> = (0..rows * n).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        let b: Vec<f32> = (0..n).map(|j| j as f32 / 301.0 - 0.5).collect();
        let got = linear_output_bf16(&y, n, Some(&b), Activation::Identity);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.to_bits(), bf16::from_f32(y[i] + b[i % n]).to_bits(), "element {i}");
        }
        let got = linear_output_bf16(&y, n, None, Activation::Identity);
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.to_bits(), bf16::from_f32(y[i]).to_bits(), "element {i}");
        }
    }

    /// The activation fused into the rounding pass equals the rounded output through the
    /// unfused activation, bit for bit, on every kernel set (with and without a bias).
    #[test]
    fn fused_activation_equals_the_separate_pass() {
        let (rows, n) = (29, 333);
        let y: Vec<f32> = (0..rows * n).map(|i| ((i * 7919) % 2001) as f32 / 97.0 - 10.0).collect();
        let b: Vec<f32> = (0..n).map(|j| j as f32 / 301.0 - 0.5).collect();
        cpu::for_each_set(|set| {
            for bias in [Some(&b[..]), None] {
                let plain = linear_output_bf16(&y, n, bias, Activation::Identity);
                let x = Tensor::from_vec(plain, (rows, n), &candle_core::Device::Cpu).unwrap();
                let want = quick_gelu(&x).unwrap().unwrap().flatten_all().unwrap().to_vec1::<bf16>().unwrap();
                let got = linear_output_bf16(&y, n, bias, Activation::QuickGelu);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{set}, bias {}: element {i}", bias.is_some());
                }
                // A scale, as PyTorch multiplies a BF16 tensor by a Python float (in f32, rounded).
                let plain = x.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
                for f in [0.125f32, 0.3] {
                    let got = linear_output_bf16(&y, n, bias, Activation::Scale(f));
                    for (i, (g, p)) in got.iter().zip(&plain).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            bf16::from_f32(p.to_f32() * f).to_bits(),
                            "{set} scale {f}: element {i}"
                        );
                    }
                }
            }
        });
    }

    #[test]
    fn rms_norm_matches_the_op_by_op_formula() {
        let x = randn(&[3, 50, 4096 + 5], 2.0).to_dtype(DType::BF16).unwrap();
        let w = (randn(&[4096 + 5], 0.5) + 1.0).unwrap().to_dtype(DType::BF16).unwrap();
        let eps = 1e-5;
        let got = rms_norm(&x, &w, eps).unwrap().unwrap();
        let xf = x.to_dtype(DType::F32).unwrap();
        let var = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let want = xf
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .broadcast_mul(&w)
            .unwrap();
        // Only the order of the f32 sum of squares differs: the normalised value may round one
        // BF16 step apart, which the product with the weight carries (at most two steps).
        let u = max_ulps(&got, &want);
        assert!(u <= 2.01, "rms_norm differs by {u} bf16 ulps");
        assert!(rms_norm(&xf, &w, eps).unwrap().is_none(), "f32 input is left to candle");
    }

    #[test]
    fn layer_norm_matches_candle_in_f32_then_rounded() {
        let x = (randn(&[2, 257, 1024], 3.0) + 0.7).unwrap().to_dtype(DType::BF16).unwrap();
        let w = randn(&[1024], 1.0);
        let b = randn(&[1024], 1.0);
        let got = layer_norm(&x, &w, &b, 1e-5).unwrap().unwrap();
        let want = candle_nn::ops::layer_norm(&x.to_dtype(DType::F32).unwrap(), &w, &b, 1e-5).unwrap();
        let d = max_diff(&got, &want.to_dtype(DType::BF16).unwrap());
        let m = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // One BF16 rounding step of the largest value at most.
        assert!(d <= m * 2f32.powi(-7), "layer_norm: max diff {d} (max |y| {m})");
        assert!(max_diff(&got, &want) > 0.0, "the output is rounded to bf16");
    }

    #[test]
    fn silu_mul_rounds_like_pytorch() {
        let g = randn(&[5, 11008 + 3], 3.0).to_dtype(DType::BF16).unwrap();
        let u = randn(&[5, 11008 + 3], 1.0).to_dtype(DType::BF16).unwrap();
        let got = silu_mul(&g, &u).unwrap().unwrap();
        // f64 silu rounded to bf16, times up, rounded.
        let gv = g.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let uv = u.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = gv
            .iter()
            .zip(&uv)
            .map(|(&g, &u)| {
                let s = bf16::from_f64(g as f64 / (1.0 + (-(g as f64)).exp())).to_f32();
                bf16::from_f32(s * u).to_f32()
            })
            .collect();
        let want = Tensor::from_vec(want, g.dims(), &Device::Cpu).unwrap();
        let u = max_ulps(&got, &want);
        // f32 exp is within 2 ulps of f64, so near a rounding boundary the bf16 silu may land one
        // step off, which the product with `up` carries (at most two steps of the result).
        assert!(u <= 2.01, "silu*up differs by {u} bf16 ulps");
    }

    #[test]
    fn rope_heads_equals_split_then_candles_rope() {
        let (b, l, n, d) = (2, 19, 3, 8);
        let x = randn(&[b, l, n * d], 2.0).to_dtype(DType::BF16).unwrap();
        let cos = randn(&[b, l, d / 2], 1.0).to_dtype(DType::BF16).unwrap();
        let sin = randn(&[b, l, d / 2], 1.0).to_dtype(DType::BF16).unwrap();
        let got = rope_heads(&x, n, &cos, &sin).unwrap().unwrap();
        let heads = x.reshape((b, l, n, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let want = candle_nn::rotary_emb::rope(&heads, &cos, &sin).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert_eq!(max_diff(&got, &want), 0.0, "bit-identical to candle's BF16 rope");
        assert!(rope_heads(&x, 5, &cos, &sin).unwrap().is_none(), "heads not dividing the width");
    }

    #[test]
    fn add_is_exact_bf16_addition() {
        let a = randn(&[7, 1000], 5.0).to_dtype(DType::BF16).unwrap();
        let b = randn(&[7, 1000], 0.01).to_dtype(DType::BF16).unwrap();
        let got = add(&a, &b).unwrap().unwrap();
        let want = (&a + &b).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
        assert!(add(&a, &b.narrow(0, 0, 3).unwrap()).unwrap().is_none(), "shape mismatch left to candle");
    }
}
