//! The operations the blocks call, each choosing its implementation once for every block: our
//! fused CPU kernel ([`crate::kernels`]) where one applies (CPU tensors of the dtypes it takes),
//! else candle's ops, which state the reference formula. This is the role candle's `CustomOp`s
//! play: `clip.rs` and `llama.rs` read as the paper's blocks, without device branches.
//!
//! Dtypes: inputs and outputs in the compute dtype (f32 or BF16) unless a function says
//! otherwise; normalisations, softmax and attention scores are computed in f32.

use candle_core::{DType, Device, Tensor, D};

use super::kv_cache::KvBuffer;
use crate::error::Result;
use crate::kernels::attention::{self as attention_kernel, MaskRules};
use crate::kernels::fused;
use crate::kernels::kv_quant::{self, SharedPrefix};

pub use crate::kernels::fused::residual_add;

/// Llama's RMSNorm of `x` `[..., H]` with `weight` `[H]`: `weight * (x / sqrt(mean(x²) + eps))`,
/// the normalisation in f32, cast back to `x`'s dtype before the weight multiply (transformers'
/// `LlamaRMSNorm`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = fused::rms_norm(x, weight, eps)? {
        return Ok(y);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// LayerNorm of `x` `[..., H]` with f32 `weight` and `bias` `[H]`, computed in f32 and cast back
/// to `x`'s dtype once.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = fused::layer_norm(x, weight, bias, eps)? {
        return Ok(y);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let y = candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32)?;
    Ok(y.to_dtype(dtype)?)
}

/// `x` `[B, L, heads * head_dim]` split into heads `[B, heads, L, head_dim]` with the rotary
/// embedding (rotate-half form) applied from `cos`, `sin` `[B, L, head_dim / 2]` (x's dtype).
pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(y) = fused::rope_heads(x, heads, cos, sin)? {
        return Ok(y);
    }
    Ok(candle_nn::rotary_emb::rope(&split_heads(x, heads)?, cos, sin)?)
}

/// `x` `[B, L, heads * head_dim]` -> `[B, heads, L, head_dim]` as a strided view (no copy): for
/// [`full_attention`], whose CPU kernel reads each head's rows in place.
pub fn heads_view(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, width) = x.dims3()?;
    Ok(x.reshape((b, l, heads, width / heads))?.transpose(1, 2)?)
}

/// `x` `[B, L, heads * head_dim]` -> `[B, heads, L, head_dim]`, contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, width) = x.dims3()?;
    Ok(x.reshape((b, l, heads, width / heads))?.transpose(1, 2)?.contiguous()?)
}

/// The gated MLP's `act(gate) * up` (same shapes): SiLU in one fused pass for BF16 on the CPU.
pub fn gated(act: &str, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if matches!(act, "silu" | "swish") {
        if let Some(h) = fused::silu_mul(gate, up)? {
            return Ok(h);
        }
    }
    Ok((super::activation::activation(act, gate)? * up)?)
}

/// Unmasked attention of each image's tokens: `q` (already scaled), `k`, `v` `[N, heads, L, d]`
/// -> `[N, L, heads * d]`. On the CPU the fused kernel (f32 scores per chunk of queries, no
/// `[L, L]` matrix); elsewhere candle's matmuls with an f32 softmax.
pub fn full_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if q.device().is_cpu() {
        let (n, _, l, _) = q.dims4()?;
        let all = vec![1u32; n * l];
        let rules = MaskRules { key_valid: &all, past: 0, causal: false, sliding_window: None };
        return attention_kernel::attention(q, k, v, 1.0, &rules);
    }
    let (n, h, l, d) = q.dims4()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let scores = q.matmul(&k.t()?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((n, l, h * d))?)
}

/// How the attention of `L` new positions after `P` cached ones is masked.
#[derive(Debug)]
pub enum AttentionMask {
    /// CPU: the rules, applied inside the fused kernel. `key_valid` `[B, P + L]` row-major (1 =
    /// real token), `past` = `P`, `window` Mistral's sliding window; `shared` rows whose cached
    /// keys and values are the same bits over a prefix (read once by the 8-bit decode kernel).
    Rules { key_valid: Vec<u32>, past: usize, window: Option<usize>, shared: Vec<SharedPrefix> },
    /// Other devices: the additive f32 mask `[B, 1, L, P + L]` of [`additive_mask`].
    Additive(Tensor),
}

impl AttentionMask {
    /// The causal (and, with `window`, sliding-window) masking of the last `l` of the positions
    /// `full_mask` `[B, P + L]` (u32 1/0: real token or padding) covers, for `full_mask`'s device.
    pub fn causal(full_mask: &Tensor, l: usize, window: Option<usize>) -> Result<Self> {
        if full_mask.device().is_cpu() {
            let (_, total) = full_mask.dims2()?;
            let key_valid = full_mask.flatten_all()?.to_vec1::<u32>()?;
            Ok(Self::Rules { key_valid, past: total - l, window, shared: Vec::new() })
        } else {
            Ok(Self::Additive(additive_mask(full_mask, l, window, full_mask.device())?))
        }
    }
}

/// The additive f32 mask `[B, 1, L, P + L]` for `L` new positions after `P` cached ones, from
/// `full_mask` `[B, P + L]` (u32 1/0): `f32::MIN` where the key is padding, after the query, or
/// (with `window`) `window` or more positions before it; 0 elsewhere.
pub fn additive_mask(full_mask: &Tensor, l: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let (b, total) = full_mask.dims2()?;
    let past = total - l;
    let keep = full_mask.to_vec2::<u32>()?;
    let min = f32::MIN;
    let mut data = vec![0f32; b * l * total];
    for (bi, row) in keep.iter().enumerate() {
        for qi in 0..l {
            let q = past + qi;
            let out = &mut data[(bi * l + qi) * total..(bi * l + qi + 1) * total];
            for (k, v) in out.iter_mut().enumerate() {
                let visible = k <= q && row[k] != 0 && window.is_none_or(|w| q - k < w);
                if !visible {
                    *v = min;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, l, total), device)?)
}

/// Attention of `q` `[B, heads, L, d]` over everything in `cache` (keys and values `[B, kv_heads,
/// P + L, d]`, each kv head serving `heads / kv_heads` query heads in a row), masked by `mask`,
/// scores scaled by `scale`. Returns `[B, L, heads * d]`. An 8-bit cache is read in place when
/// decoding (the mask's shared prefixes once for all their rows); otherwise (and for prefill)
/// dequantized for the dense kernel.
pub fn cached_attention(q: &Tensor, cache: &KvBuffer, mask: &AttentionMask, scale: f64) -> Result<Tensor> {
    match mask {
        AttentionMask::Rules { key_valid, past, window, shared } => {
            let rules = MaskRules { key_valid, past: *past, causal: true, sliding_window: *window };
            let in_place = match cache.q8_views()? {
                Some((k, v)) => kv_quant::attention(q, (&k.0, &k.1), (&v.0, &v.1), scale as f32, &rules, shared)?,
                None => None,
            };
            match in_place {
                Some(out) => Ok(out),
                // Strided views of the filled part of the cache: [B, kv_heads, P + L, d].
                None => attention_kernel::attention(q, &cache.keys()?, &cache.values()?, scale as f32, &rules),
            }
        }
        AttentionMask::Additive(mask) => {
            let (b, heads, l, d) = q.dims4()?;
            let (k, v) = (cache.keys()?, cache.values()?);
            let rep = heads / k.dim(1)?;
            let (k, v) = (repeat_kv(&k.contiguous()?, rep)?, repeat_kv(&v.contiguous()?, rep)?);
            let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
            let scores = scores.broadcast_add(mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, heads * d))?)
        }
    }
}

/// `[B, kv, T, d]` -> `[B, kv * rep, T, d]`, each kv head serving `rep` query heads in a row.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, kv, rep, t, d))?.reshape((b, kv * rep, t, d))?)
}
