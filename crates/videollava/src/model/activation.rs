//! The activation functions the checkpoints' configs name (`hidden_act`, `projector_hidden_act`).

use candle_core::Tensor;

use crate::error::{Error, Result};

/// `name` (transformers' `ACT2FN` key) applied to `x`; `quick_gelu` on BF16/f32 CPU tensors in one
/// fused pass.
pub fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    Ok(match name {
        "quick_gelu" => match crate::kernels::fused::quick_gelu(x)? {
            Some(y) => y,
            None => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        },
        "gelu" => x.gelu_erf()?,
        "gelu_new" | "gelu_pytorch_tanh" => x.gelu()?,
        "relu" => x.relu()?,
        "silu" | "swish" => x.silu()?,
        other => return Err(Error::Model(format!("unsupported activation `{other}`"))),
    })
}
