//! The multimodal projector: `linear_2(act(linear_1(x)))`, vision features `[.., D_v * k]`
//! (k selected layers) to the language model's width `[.., H]`. GELU is the exact erf form.

use candle_core::Tensor;
use candle_nn::{linear_b, VarBuilder};

use super::linear::Linear;

use crate::config::VideoLlavaConfig;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: String,
}

impl Projector {
    /// Loads `multi_modal_projector.linear_{1,2}`.
    pub fn load(cfg: &VideoLlavaConfig, vb: VarBuilder) -> Result<Self> {
        let input = cfg.vision_config.hidden_size * cfg.vision_feature_layer.0.len();
        let hidden = cfg.text_config.hidden_size;
        let bias = cfg.multimodal_projector_bias;
        Ok(Self {
            linear_1: linear_b(input, hidden, bias, vb.pp("linear_1"))?.into(),
            linear_2: linear_b(hidden, hidden, bias, vb.pp("linear_2"))?.into(),
            act: cfg.projector_hidden_act.clone(),
        })
    }

    /// Both linear layers with their canonical weight names.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        vec![
            ("multi_modal_projector.linear_1.weight".to_string(), &mut self.linear_1),
            ("multi_modal_projector.linear_2.weight".to_string(), &mut self.linear_2),
        ]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = super::activation::activation(&self.act, &self.linear_1.forward(x)?)?;
        self.linear_2.forward(&h)
    }
}
