//! The CLIP vision transformer (`CLIPVisionModel`), one per modality in Video-LLaVA.
//!
//! Shapes: pixels `[N, 3, S, S]` (S = `image_size`) -> patches `[N, (S/p)^2, D]` -> with the class
//! token and positions `[N, 1 + (S/p)^2, D]` -> `pre_layrnorm` -> pre-norm encoder layers.
//! `hidden_states[0]` is the encoder input (after `pre_layrnorm`), `hidden_states[i]` the output of
//! layer `i - 1`; `post_layernorm` is never applied (Video-LLaVA takes raw hidden states).
//! Activations are in the compute dtype; layer norms and softmax run in f32.

use candle_core::{DType, Tensor, D};
use candle_nn::{linear, VarBuilder};

use super::linear::Linear;
use super::ops::{self, residual_add};

use crate::config::VisionConfig;
use crate::error::{Error, Result};

/// LayerNorm computed in f32 whatever the activation dtype, cast back afterwards.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(size, "bias")?.to_dtype(DType::F32)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?.into(),
            k_proj: linear(d, d, vb.pp("k_proj"))?.into(),
            v_proj: linear(d, d, vb.pp("v_proj"))?.into(),
            out_proj: linear(d, d, vb.pp("out_proj"))?.into(),
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `x`: `[N, L, D]`; full (unmasked) attention over the L tokens of each image.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Views: the fused attention reads each head's rows in place.
        let heads = |t: Tensor| ops::heads_view(&t, self.num_heads);
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = heads(self.q_proj.forward_scaled(x, scale)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        // q is already scaled, as transformers scales it before the product.
        let out = ops::full_attention(&q, &k, &v)?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: String,
}

impl EncoderLayer {
    fn load(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(cfg, vb.pp("self_attn"))?,
            layer_norm1: LayerNorm::load(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?.into(),
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("mlp").pp("fc2"))?.into(),
            layer_norm2: LayerNorm::load(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            act: cfg.hidden_act.clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = residual_add(x, &self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        let m = self.fc2.forward(&self.fc1.forward_activated(&self.layer_norm2.forward(&h)?, &self.act)?)?;
        residual_add(&h, &m)
    }
}

/// One CLIP vision tower (`image_tower` or `video_tower`).
#[derive(Debug, Clone)]
pub struct ClipVisionTower {
    /// The patch convolution as a matrix `[D, 3 * p * p]` (no bias).
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    cfg: VisionConfig,
}

impl ClipVisionTower {
    /// Loads from `vb` positioned at `…_tower.vision_model`. Only the first `num_layers` encoder
    /// layers are loaded (those the selected hidden states need).
    pub fn load(cfg: &VisionConfig, num_layers: usize, vb: VarBuilder) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let emb = vb.pp("embeddings");
        let patch_weight = emb.get((d, c, p, p), "patch_embedding.weight")?.reshape((d, c * p * p))?;
        let num_positions = cfg.patches_per_side() * cfg.patches_per_side() + 1;
        let layers = (0..num_layers)
            .map(|i| EncoderLayer::load(cfg, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb.get((num_positions, d), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::load(d, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// Patch + class + position embeddings: `[N, 3, S, S]` -> `[N, 1 + (S/p)^2, D]`.
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size;
        if (c, h, w) != (self.cfg.num_channels, s, s) {
            return Err(Error::Input(format!(
                "pixel values are {c}x{h}x{w} but the vision tower takes {}x{s}x{s} (image_size {s})",
                self.cfg.num_channels
            )));
        }
        let p = self.cfg.patch_size;
        let g = s / p;
        let pixels = if g * p != s { pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)? } else { pixels.clone() };
        // [N, C, g, p, g, p] -> [N, g, g, C, p, p] -> [N, g*g, C*p*p]: the convolution as a matmul.
        let patches = pixels
            .to_dtype(self.patch_weight.dtype())?
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, g * g, c * p * p))?;
        let d = self.cfg.hidden_size;
        let x = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let cls = self.class_embedding.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        Ok(x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?)
    }

    /// Hidden states `0..=max_index` (index 0 after `pre_layrnorm`), each `[N, 1 + (S/p)^2, D]`.
    pub fn hidden_states(&self, pixels: &Tensor, max_index: usize) -> Result<Vec<Tensor>> {
        if max_index > self.layers.len() {
            return Err(Error::Model(format!(
                "hidden state {max_index} requested but only {} vision layers are loaded",
                self.layers.len()
            )));
        }
        let mut x = self.pre_layrnorm.forward(&self.embed(pixels)?)?;
        let mut states = vec![x.clone()];
        for layer in &self.layers[..max_index] {
            x = layer.forward(&x)?;
            states.push(x.clone());
        }
        Ok(states)
    }

    /// Every linear layer of the encoder with its weight name under `prefix` (e.g.
    /// `video_tower.vision_model.`).
    pub fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("{prefix}encoder.layers.{i}");
            let a = &mut layer.self_attn;
            for (n, l) in [
                ("q_proj", &mut a.q_proj),
                ("k_proj", &mut a.k_proj),
                ("v_proj", &mut a.v_proj),
                ("out_proj", &mut a.out_proj),
            ] {
                out.push((format!("{p}.self_attn.{n}.weight"), l));
            }
            out.push((format!("{p}.mlp.fc1.weight"), &mut layer.fc1));
            out.push((format!("{p}.mlp.fc2.weight"), &mut layer.fc2));
        }
        out
    }

    /// The hidden states at `indices` (resolved, non-negative), concatenated on the feature axis:
    /// `[N, 1 + (S/p)^2, D * indices.len()]`.
    pub fn select_features(&self, pixels: &Tensor, indices: &[usize]) -> Result<Tensor> {
        let max = indices.iter().copied().max().unwrap_or(0);
        let states = self.hidden_states(pixels, max)?;
        let picked: Vec<&Tensor> = indices.iter().map(|&i| &states[i]).collect();
        Ok(if picked.len() == 1 { picked[0].clone() } else { Tensor::cat(&picked, D::Minus1)? })
    }
}

#[cfg(test)]
mod quick_gelu_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_quick_gelu_matches_the_op_by_op_formula() {
        let x = Tensor::randn(0f32, 3.0, (3, 70_000), &Device::Cpu).unwrap();
        let want = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
        let got = crate::kernels::fused::quick_gelu(&x).unwrap().unwrap();
        let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "f32: max diff {d}");
        // bf16: within one bf16 rounding step of the f32 result (|y| <= ~12 here: step <= 0.0625).
        let xb = x.to_dtype(DType::BF16).unwrap();
        let got = crate::kernels::fused::quick_gelu(&xb).unwrap().unwrap().to_dtype(DType::F32).unwrap();
        let xf = xb.to_dtype(DType::F32).unwrap();
        let want = (&xf * candle_nn::ops::sigmoid(&(&xf * 1.702).unwrap()).unwrap()).unwrap();
        let rel = ((&got - &want).unwrap().abs().unwrap() / (want.abs().unwrap() + 1e-3).unwrap())
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(rel < 0.03, "bf16: max relative diff {rel}");
        assert_eq!(got.dims(), &[3, 70_000]);
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// The video tower of the 7B checkpoint (CLIP ViT-L/14, random BF16 weights, the 23 layers
    /// `vision_feature_layer = -2` needs) on 8 frames: milliseconds per run and GFLOP/s.
    /// `cargo test --release -p videollava --lib clip::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn bench_video_tower() {
        let cfg = VisionConfig::video_llava_default();
        let (d, f, layers) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers - 1);
        let dev = Device::Cpu;
        let rand = |shape: &[usize], std: f64| {
            Tensor::randn(0f32, std as f32, shape, &dev).unwrap().to_dtype(DType::BF16).unwrap()
        };
        let mut ts = HashMap::new();
        let p = cfg.patch_size;
        let positions = cfg.patches_per_side() * cfg.patches_per_side() + 1;
        ts.insert("embeddings.patch_embedding.weight".to_string(), rand(&[d, 3, p, p], 0.02));
        ts.insert("embeddings.class_embedding".to_string(), rand(&[d], 0.02));
        ts.insert("embeddings.position_embedding.weight".to_string(), rand(&[positions, d], 0.02));
        for n in ["pre_layrnorm"] {
            ts.insert(format!("{n}.weight"), rand(&[d], 1.0));
            ts.insert(format!("{n}.bias"), rand(&[d], 0.1));
        }
        for i in 0..layers {
            let l = format!("encoder.layers.{i}");
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                ts.insert(format!("{l}.self_attn.{n}.weight"), rand(&[d, d], 0.03));
                ts.insert(format!("{l}.self_attn.{n}.bias"), rand(&[d], 0.02));
            }
            ts.insert(format!("{l}.mlp.fc1.weight"), rand(&[f, d], 0.03));
            ts.insert(format!("{l}.mlp.fc1.bias"), rand(&[f], 0.02));
            ts.insert(format!("{l}.mlp.fc2.weight"), rand(&[d, f], 0.015));
            ts.insert(format!("{l}.mlp.fc2.bias"), rand(&[d], 0.02));
            for n in ["layer_norm1", "layer_norm2"] {
                ts.insert(format!("{l}.{n}.weight"), rand(&[d], 1.0));
                ts.insert(format!("{l}.{n}.bias"), rand(&[d], 0.1));
            }
        }
        let vb = VarBuilder::from_tensors(ts, DType::BF16, &dev);
        let tower = ClipVisionTower::load(&cfg, layers, vb).unwrap();
        let s = cfg.image_size;
        let pixels = Tensor::randn(0f32, 1.0, (8, 3, s, s), &dev).unwrap();
        let tokens = 8 * positions;
        let gemm = 2.0 * (tokens * layers * (4 * d * d + 2 * d * f)) as f64;
        let attn = 2.0 * 2.0 * (8 * positions * positions * d * layers) as f64;
        let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
        // `BENCH_STEP=attention`, say: that step alone (the whole tower once).
        let only = std::env::var("BENCH_STEP").ok();
        let tower_runs = if only.is_some() { 1 } else { runs };
        let mut t: Vec<f64> = (0..tower_runs + 1)
            .map(|_| {
                let t = std::time::Instant::now();
                tower.select_features(&pixels, &[layers]).unwrap();
                t.elapsed().as_secs_f64()
            })
            .skip(1)
            .collect();
        t.sort_by(f64::total_cmp);
        let m = t[t.len() / 2];
        // One layer's steps, each timed alone (the median of `runs`), summed over the layers.
        let x = tower.pre_layrnorm.forward(&tower.embed(&pixels).unwrap()).unwrap();
        let l = &tower.layers[0];
        let a = &l.self_attn;
        let time = |name: &str, f: &dyn Fn() -> Tensor| {
            if only.as_deref().is_some_and(|o| !name.starts_with(o)) {
                return;
            }
            let mut t: Vec<f64> = (0..runs + 1)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    t.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            eprintln!("  {name:<28} {:7.1} ms x {layers} layers", t[t.len() / 2] * 1e3 * layers as f64);
        };
        let h = l.layer_norm1.forward(&x).unwrap();
        let heads = |t: &Tensor| ops::heads_view(t, a.num_heads).unwrap();
        // The layer's own queries, keys and values (a product of the queries with themselves
        // peaks on the diagonal, and its `exp` underflows to denormals the model does not make).
        let q = a.q_proj.forward_scaled(&h, 0.125).unwrap();
        let (k, v) = (a.k_proj.forward(&h).unwrap(), a.v_proj.forward(&h).unwrap());
        let (qh, kh, vh) = (heads(&q), heads(&k), heads(&v));
        let o = ops::full_attention(&qh, &kh, &vh).unwrap();
        let m1 = l.fc1.forward_activated(&h, &l.act).unwrap();
        time("layer_norm", &|| l.layer_norm1.forward(&x).unwrap());
        time("q_proj (x3 for q, k, v)", &|| a.q_proj.forward(&h).unwrap());
        time("q_proj scaled", &|| a.q_proj.forward_scaled(&h, 0.125).unwrap());
        time("attention", &|| ops::full_attention(&qh, &kh, &vh).unwrap());
        time("out_proj", &|| a.out_proj.forward(&o).unwrap());
        time("residual add (x2)", &|| residual_add(&x, &h).unwrap());
        time("fc1 + quick_gelu", &|| l.fc1.forward_activated(&h, &l.act).unwrap());
        time("fc2", &|| l.fc2.forward(&m1).unwrap());
        eprintln!(
            "video tower, 8 frames, {layers} layers: median {:.0} ms of {tower_runs} ({:.1} TFLOP: {:.0} GFLOP/s)",
            m * 1e3,
            (gemm + attn) / 1e12,
            (gemm + attn) / m / 1e9
        );
    }
}
