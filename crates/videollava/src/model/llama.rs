//! The Llama / Mistral decoder that Video-LLaVA's language model is.
//!
//! Shapes: embeddings `[B, L, H]` in the compute dtype; `position_ids` `[B, L]` (u32, they follow
//! left padding: `cumsum(mask) - 1`); `attention_mask` `[B, P + L]` (u32 1/0 over the cached
//! and new positions). Keys and values are cached per layer in preallocated buffers
//! `[B, kv_heads, capacity, head_dim]` ([`KvBuffer`]), the first `P + L` positions filled.
//! RMSNorm is computed in f32 then cast back before the weight multiply (as transformers does);
//! RoPE tables are computed in f32; attention scores and softmax are in f32.
//! The causal and sliding-window masks follow cache positions (the index in the padded sequence),
//! the padding mask hides padded keys, as transformers' mask builders do ([`ops::AttentionMask`]:
//! on the CPU the fused kernel applies these rules without materialising an `[L, P + L]` mask).

use candle_core::{DType, Tensor};
use candle_nn::{linear_b, VarBuilder};
use rayon::prelude::*;

use super::kv_cache::KvBuffer;
use super::linear::Linear;
use super::ops::{self, residual_add, AttentionMask};
use crate::kernels::kv_quant::{self, KvCacheFormat, SharedPrefix};

use crate::config::{RopeScaling, TextConfig, TextModelType};
use crate::error::{Error, Result};

/// RMSNorm: `w * (x / sqrt(mean(x^2) + eps))`, the normalisation in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// RoPE inverse frequencies `[head_dim / 2]` (f32), with the configured scaling applied.
pub fn inverse_frequencies(cfg: &TextConfig) -> Result<Vec<f32>> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let mut inv: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0f32 / base.powf(i as f32 / dim as f32)).collect();
    match &cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            let f = *factor as f32;
            inv.iter_mut().for_each(|v| *v /= f);
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
            let old = *original_max_position_embeddings as f32;
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            for v in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *v;
                if wavelen > low_wavelen {
                    *v /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - low) / (high - low);
                    *v = (1.0 - smooth) * *v / factor + smooth * *v;
                }
            }
        }
        RopeScaling::Dynamic { .. } => {
            return Err(Error::Model(
                "rope_scaling type `dynamic` is not supported yet (supported: default, linear, llama3)".into(),
            ))
        }
    }
    Ok(inv)
}

/// cos / sin tables `[B, L, head_dim / 2]` for `position_ids` `[B, L]`, in `dtype`.
fn rope_tables(inv_freq: &[f32], position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
    let (b, l) = position_ids.dims2()?;
    let pos = position_ids.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(b * l * half);
    let mut sin = Vec::with_capacity(b * l * half);
    for row in &pos {
        for &p in row {
            for &f in inv_freq {
                let angle = p * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let dev = position_ids.device();
    let cos = Tensor::from_vec(cos, (b, l, half), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (b, l, half), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// How this layer's keys and values are cached.
    kv_format: KvCacheFormat,
}

impl Attention {
    fn load(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: linear_b(h, cfg.num_attention_heads * hd, bias, vb.pp("q_proj"))?.into(),
            k_proj: linear_b(h, cfg.num_key_value_heads * hd, bias, vb.pp("k_proj"))?.into(),
            v_proj: linear_b(h, cfg.num_key_value_heads * hd, bias, vb.pp("v_proj"))?.into(),
            o_proj: linear_b(cfg.num_attention_heads * hd, h, bias, vb.pp("o_proj"))?.into(),
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            kv_format: KvCacheFormat::Model,
        })
    }

    /// `x` `[B, L, H]`; `mask` the masking of `L` new positions after `P` cached ones; appends
    /// the new keys and values `[B, kv_heads, L, head_dim]` to `cache` in place.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: &mut Option<KvBuffer>,
    ) -> Result<Tensor> {
        // Heads [B, n, L, head_dim], queries and keys with the rotary embedding.
        let q = ops::rope_heads(&self.q_proj.forward(x)?, self.num_heads, cos, sin)?;
        let k = ops::rope_heads(&self.k_proj.forward(x)?, self.num_kv_heads, cos, sin)?;
        let v = ops::split_heads(&self.v_proj.forward(x)?, self.num_kv_heads)?;
        let buffer = match cache {
            Some(buffer) => {
                buffer.append(&k, &v)?;
                buffer
            }
            None => cache.insert(KvBuffer::with_format(&k, &v, self.kv_format)?),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = ops::cached_attention(&q, buffer, mask, scale)?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: String,
}

impl Mlp {
    fn load(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear_b(h, i, bias, vb.pp("gate_proj"))?.into(),
            up_proj: linear_b(h, i, bias, vb.pp("up_proj"))?.into(),
            down_proj: linear_b(i, h, bias, vb.pp("down_proj"))?.into(),
            act: cfg.hidden_act.clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&ops::gated(&self.act, &gate, &up)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::load(cfg, vb.pp("mlp"))?,
            input_layernorm: RmsNorm::load(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::load(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: &mut Option<KvBuffer>,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x)?, cos, sin, mask, cache)?;
        let h = residual_add(x, &attn)?;
        residual_add(&h, &self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)
    }
}

/// Per-layer key/value cache plus the attention mask of everything cached so far.
///
/// Each layer keeps preallocated buffers ([`KvBuffer`]) that a forward pass appends to in place;
/// a clone shares them until either side appends (copy on write), so clones stay independent.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<KvBuffer>>,
    /// `[B, P]` u32: which cached positions are real tokens.
    mask: Option<Tensor>,
    /// Rows whose keys and values are the same bits in every layer over their first real
    /// positions (found as rows join, [`Self::append_rows`]).
    shared: Vec<SharedRows>,
}

/// Batch rows (the first one read for all) holding the same keys and values over `len`
/// positions from each row's first real one.
#[derive(Debug, Clone)]
struct SharedRows {
    rows: Vec<usize>,
    len: usize,
}

/// Fewest common positions worth reading once for several rows.
const MIN_SHARED: usize = 64;

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.mask.as_ref().map(|m| m.dim(1).unwrap_or(0)).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real (unpadded) tokens held for each row.
    pub fn real_tokens_per_row(&self) -> Result<Vec<usize>> {
        match &self.mask {
            None => Ok(Vec::new()),
            Some(m) => Ok(m.to_vec2::<u32>()?.iter().map(|r| r.iter().filter(|&&x| x != 0).count()).collect()),
        }
    }

    /// Appends the rows of `other` after this cache's rows. The shorter cache is left-padded
    /// (masked positions), so each row keeps its keys' distances to the next query. Where the
    /// buffers must move, they get room for `room_for_rows` rows (a running batch's largest
    /// size), so that later rows, if not longer than the batch, are copied alone.
    pub fn append_rows(&mut self, other: KvCache, room_for_rows: usize) -> Result<()> {
        if other.mask.is_none() {
            return Ok(());
        }
        let first_new = self.batch_size();
        let (Some(mask_a), Some(mask_b)) = (self.mask.take(), other.mask.clone()) else {
            *self = other;
            return Ok(());
        };
        let (ta, tb) = (mask_a.dim(1)?, mask_b.dim(1)?);
        let t = ta.max(tb);
        let pad_mask = |m: Tensor, len: usize| -> Result<Tensor> {
            if len == t {
                return Ok(m);
            }
            let z = Tensor::zeros((m.dim(0)?, t - len), m.dtype(), m.device())?;
            Ok(Tensor::cat(&[&z, &m], 1)?)
        };
        self.mask = Some(Tensor::cat(&[&pad_mask(mask_a, ta)?, &pad_mask(mask_b, tb)?], 0)?);
        if self.layers.len() != other.layers.len() {
            return Err(Error::Model("cannot merge caches of different depths".into()));
        }
        // Layers on every thread: the copy into fresh pages is mostly the kernel clearing them
        // (0.4-1 GB/s a thread on this project's VMs: 1.8 s for a 7B row of 8-bit video keys and
        // values on one thread).
        self.layers
            .par_iter_mut()
            .zip(other.layers.into_par_iter())
            .map(|(mine, theirs)| match (mine.as_mut(), theirs) {
                (Some(a), Some(b)) => {
                    if (a.len(), b.len()) != (ta, tb) {
                        return Err(Error::Model("cache layers and mask disagree in length".into()));
                    }
                    a.append_rows(&b, t, room_for_rows)
                }
                _ => Err(Error::Model("cannot merge an unfilled cache".into())),
            })
            .collect::<Result<Vec<()>>>()?;
        self.find_shared(first_new)
    }

    /// Groups each row from `first` on with the earlier row (a group's first, or a row in no
    /// group) whose keys and values are the same bits as its own over the most positions, from
    /// each row's first real one, if at least [`MIN_SHARED`] (a group keeps the positions all of
    /// its rows share). Questions about one video find each other so: their prompts' keys and
    /// values come from one cached prefix.
    fn find_shared(&mut self, first: usize) -> Result<()> {
        let Some(mask) = &self.mask else { return Ok(()) };
        // Only the 8-bit cache's decode kernel reads shared positions once.
        let q8 = self.layers.iter().flatten().all(|b| b.format() == KvCacheFormat::Q8_0);
        if !q8 || !kv_quant::reads_shared_prefixes() {
            return Ok(());
        }
        let t = mask.dim(1)?;
        let starts: Vec<usize> =
            mask.to_vec2::<u32>()?.iter().map(|r| r.iter().take_while(|&&m| m == 0).count()).collect();
        for r in first..starts.len() {
            let followers: Vec<usize> = self.shared.iter().flat_map(|g| g.rows[1..].to_vec()).collect();
            let mut best: Option<(usize, usize)> = None;
            for c in (0..r).filter(|c| !followers.contains(c)) {
                let max = (t - starts[r]).min(t - starts[c]);
                let n = self.common_positions((r, starts[r]), (c, starts[c]), max)?;
                if n >= MIN_SHARED && best.is_none_or(|(_, m)| n > m) {
                    best = Some((c, n));
                }
            }
            let Some((c, n)) = best else { continue };
            match self.shared.iter_mut().find(|g| g.rows[0] == c) {
                Some(g) => {
                    g.rows.push(r);
                    g.len = g.len.min(n);
                }
                None => self.shared.push(SharedRows { rows: vec![c, r], len: n }),
            }
        }
        Ok(())
    }

    /// Positions (from index `a.1` of row `a.0` and `b.1` of row `b.0`, at most `max`) over
    /// which both rows hold the same bits in every layer; 0 if fewer than [`MIN_SHARED`].
    fn common_positions(&self, a: (usize, usize), b: (usize, usize), max: usize) -> Result<usize> {
        let mut n = max;
        for layer in self.layers.iter().flatten() {
            n = layer.common_positions(a, b, n)?;
            if n < MIN_SHARED {
                return Ok(0);
            }
        }
        Ok(n)
    }

    /// The shared groups for the attention kernels, each row with the cache index of its first
    /// real position (`key_valid` `[B, T]` row-major).
    fn shared_prefixes(&self, key_valid: &[u32], t: usize) -> Vec<SharedPrefix> {
        let start = |r: usize| key_valid[r * t..(r + 1) * t].iter().take_while(|&&m| m == 0).count();
        self.shared
            .iter()
            .map(|g| SharedPrefix { rows: g.rows.iter().map(|&r| (r, start(r))).collect(), len: g.len })
            .collect()
    }

    /// Positions each row reads from another row's keys and values (0 for a group's first row).
    pub fn shared_positions(&self) -> usize {
        self.shared.iter().map(|g| (g.rows.len() - 1) * g.len).sum()
    }

    /// Drops leading positions that are padding in every row (left behind by removed rows).
    pub fn compact(&mut self) -> Result<()> {
        let Some(mask) = &self.mask else { return Ok(()) };
        let rows = mask.to_vec2::<u32>()?;
        let t = mask.dim(1)?;
        let lead = rows.iter().map(|r| r.iter().take_while(|&&m| m == 0).count()).min().unwrap_or(0);
        if lead == 0 || lead == t {
            return Ok(());
        }
        self.mask = Some(mask.narrow(1, lead, t - lead)?);
        self.layers.par_iter_mut().flatten().try_for_each(|layer| -> Result<()> {
            *layer = layer.drop_front(lead)?;
            Ok(())
        })
    }

    /// Positions `start..start + len` of every row, copied (what a prefix cache keeps).
    pub fn narrow_positions(&self, start: usize, len: usize) -> Result<KvCache> {
        self.positions(start, len, |b| b.narrow_positions(start, len))
    }

    /// The first `n` positions of every row, sharing this cache's buffers (no copy; an append to
    /// either copies first).
    pub fn truncated(&self, n: usize) -> Result<KvCache> {
        self.positions(0, n, |b| b.truncated(n))
    }

    /// Positions `start..start + len`: each layer's buffer through `layer`, the mask narrowed.
    fn positions(&self, start: usize, len: usize, layer: impl Fn(&KvBuffer) -> Result<KvBuffer>) -> Result<KvCache> {
        let Some(mask) = &self.mask else { return Err(Error::Model("taking positions of an empty cache".into())) };
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some(b) => Ok(Some(layer(b)?)),
                None => Err(Error::Model("taking positions of an unfilled cache".into())),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers, mask: Some(mask.narrow(1, start, len)?.contiguous()?), shared: Vec::new() })
    }

    /// The positions of `pieces` one after another (same rows and depth), with room to append.
    pub fn concat_positions(pieces: &[&KvCache]) -> Result<KvCache> {
        let first = pieces.first().ok_or_else(|| Error::Model("no cache pieces to join".into()))?;
        let mut layers = Vec::with_capacity(first.layers.len());
        for i in 0..first.layers.len() {
            let bufs = pieces
                .iter()
                .map(|p| p.layers.get(i).and_then(|l| l.as_ref()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::Model("cannot join caches of different depths".into()))?;
            layers.push(Some(KvBuffer::concat_positions(&bufs)?));
        }
        let masks = pieces
            .iter()
            .map(|p| p.mask.as_ref())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Model("cannot join an empty cache".into()))?;
        Ok(KvCache { layers, mask: Some(Tensor::cat(&masks, 1)?), shared: Vec::new() })
    }

    /// One row's cache from its layers' buffers (all of one length, every position real).
    pub fn from_layers(layers: Vec<KvBuffer>) -> Result<KvCache> {
        let len = layers.first().map(|b| b.len()).unwrap_or(0);
        if layers.iter().any(|b| b.len() != len) || len == 0 {
            return Err(Error::Model("cache layers differ in length or are empty".into()));
        }
        let dev = layers[0].stored_parts()?[0].device().clone();
        let mask = Tensor::ones((1, len), DType::U32, &dev)?;
        Ok(KvCache { layers: layers.into_iter().map(Some).collect(), mask: Some(mask), shared: Vec::new() })
    }

    /// Each layer's buffer (`None` for a layer never filled).
    pub fn layers(&self) -> &[Option<KvBuffer>] {
        &self.layers
    }

    /// Bytes held by the layers' buffers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|b| b.bytes()).sum()
    }

    /// Whether every layer's buffers hold exactly the cached positions and rows (no spare room).
    pub fn is_exact(&self) -> bool {
        let (len, rows) = (self.len(), self.batch_size());
        self.layers.iter().flatten().all(|b| b.capacity() == len && b.row_capacity() == rows)
    }

    /// Number of rows (sequences) in the cache.
    pub fn batch_size(&self) -> usize {
        self.mask.as_ref().map(|m| m.dim(0).unwrap_or(0)).unwrap_or(0)
    }

    /// Keeps only the rows `rows` (in that order): finished sequences stop costing compute.
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        let Some(mask) = &self.mask else { return Ok(()) };
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), mask.device())?;
        self.mask = Some(mask.index_select(&idx, 0)?);
        // Layers on every thread, as when rows join.
        self.layers.par_iter_mut().flatten().try_for_each(|layer| -> Result<()> {
            *layer = layer.index_rows(&idx)?;
            Ok(())
        })?;
        // Each group's rows that stay, renumbered; any of them can be the one read.
        self.shared = std::mem::take(&mut self.shared)
            .into_iter()
            .filter_map(|g| {
                let kept: Vec<usize> = g.rows.iter().filter_map(|&r| rows.iter().position(|&k| k == r)).collect();
                (kept.len() >= 2).then_some(SharedRows { rows: kept, len: g.len })
            })
            .collect();
        Ok(())
    }
}

/// Output of [`LanguageModel::forward`].
#[derive(Debug)]
pub struct DecoderOutput {
    /// Final hidden states after the last norm, `[B, L, H]`.
    pub last_hidden: Tensor,
    /// With `output_hidden_states`: the embeddings then each layer's output (`num_layers + 1`
    /// entries; the last one replaced by the normed output, as transformers returns it).
    pub hidden_states: Option<Vec<Tensor>>,
}

/// The decoder stack plus embeddings and LM head (`LlamaForCausalLM` / `MistralForCausalLM`).
#[derive(Debug, Clone)]
pub struct LanguageModel {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    pub cfg: TextConfig,
}

impl LanguageModel {
    /// Loads from `vb` at the root of the canonical names (`language_model.model.…`,
    /// `language_model.lm_head.weight`).
    pub fn load(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let m = vb.pp("language_model").pp("model");
        let embed_tokens = m.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(cfg, m.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let head = vb.pp("language_model").pp("lm_head");
        let lm_head = if cfg.tie_word_embeddings && !head.contains_tensor("weight") {
            Linear::new(embed_tokens.clone(), None)
        } else {
            Linear::new(head.get((cfg.vocab_size, cfg.hidden_size), "weight")?, None)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?,
            lm_head,
            inv_freq: inverse_frequencies(cfg)?,
            cfg: cfg.clone(),
        })
    }

    /// Token embeddings `[B, L, H]` for ids `[B, L]` (u32); ids must be below `vocab_size`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        let max = flat.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            return Err(Error::Input(format!(
                "token id {max} is outside the model's vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        Ok(self.embed_tokens.index_select(&flat, 0)?.reshape((b, l, self.cfg.hidden_size))?)
    }

    /// The sliding window of the attention mask (Mistral only).
    fn sliding_window(&self) -> Option<usize> {
        match self.cfg.model_type {
            TextModelType::Mistral => self.cfg.sliding_window,
            TextModelType::Llama => None,
        }
    }

    /// Runs the decoder over `embeds` `[B, L, H]` at `position_ids` `[B, L]` (u32), where
    /// `attention_mask` `[B, L]` (u32) marks the real tokens among the new ones. With `cache`, the
    /// keys and values are appended to it and earlier ones attended to.
    pub fn forward(
        &self,
        embeds: &Tensor,
        position_ids: &Tensor,
        attention_mask: &Tensor,
        cache: Option<&mut KvCache>,
        output_hidden_states: bool,
    ) -> Result<DecoderOutput> {
        let (b, l, _) = embeds.dims3()?;
        if position_ids.dims2()? != (b, l) || attention_mask.dims2()? != (b, l) {
            return Err(Error::Input(format!(
                "position_ids {:?} and attention_mask {:?} must both be [{b}, {l}]",
                position_ids.dims(),
                attention_mask.dims()
            )));
        }
        let max_pos = position_ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_pos >= self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "position {max_pos} is beyond the model's context of {} tokens (max_position_embeddings)",
                self.cfg.max_position_embeddings
            )));
        }
        let mut scratch = KvCache::default();
        let cache = cache.unwrap_or(&mut scratch);
        if cache.layers.is_empty() {
            cache.layers = vec![None; self.layers.len()];
        }
        let full_mask = match &cache.mask {
            Some(m) => Tensor::cat(&[m, attention_mask], 1)?,
            None => attention_mask.clone(),
        };
        let mut mask = AttentionMask::causal(&full_mask, l, self.sliding_window())?;
        if let AttentionMask::Rules { key_valid, shared, .. } = &mut mask {
            *shared = cache.shared_prefixes(key_valid, full_mask.dim(1)?);
        }
        let (cos, sin) = rope_tables(&self.inv_freq, position_ids, embeds.dtype())?;

        let mut x = embeds.clone();
        let mut states = output_hidden_states.then(Vec::new);
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            if let Some(s) = states.as_mut() {
                s.push(x.clone());
            }
            x = layer.forward(&x, &cos, &sin, &mask, layer_cache)?;
        }
        cache.mask = Some(full_mask);
        let last_hidden = self.norm.forward(&x)?;
        if let Some(s) = states.as_mut() {
            s.push(last_hidden.clone());
        }
        Ok(DecoderOutput { last_hidden, hidden_states: states })
    }

    /// Logits `[B, L, V]` for hidden states `[B, L, H]`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}

impl LanguageModel {
    /// Bytes of weights one decode step reads: every decoder layer's linear layers and the LM
    /// head (the embedding row and norms are negligible).
    pub fn decode_weight_bytes(&self) -> usize {
        self.decode_linears().map(|x| x.weight().bytes()).sum()
    }

    /// Maps the pages of the memory-mapped weights every decode step reads into the process now
    /// ([`crate::mapped::populate`]): a server does this on a thread of its own after loading,
    /// so that its first request does not take the page faults.
    pub fn prefault_weights(&self) {
        self.decode_linears().for_each(|x| x.weight().prefault());
    }

    /// The linear layers every decode step reads: each layer's projections, then `lm_head`.
    fn decode_linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
            })
            .chain(std::iter::once(&self.lm_head))
    }

    /// Every linear layer with its canonical weight name (`language_model.model.layers.{i}.…`,
    /// `language_model.lm_head.weight`), for quantization.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("language_model.model.layers.{i}");
            let a = &mut layer.self_attn;
            for (n, l) in [("q_proj", &mut a.q_proj), ("k_proj", &mut a.k_proj), ("v_proj", &mut a.v_proj)] {
                out.push((format!("{p}.self_attn.{n}.weight"), l));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), &mut a.o_proj));
            let m = &mut layer.mlp;
            for (n, l) in
                [("gate_proj", &mut m.gate_proj), ("up_proj", &mut m.up_proj), ("down_proj", &mut m.down_proj)]
            {
                out.push((format!("{p}.mlp.{n}.weight"), l));
            }
        }
        out.push(("language_model.lm_head.weight".to_string(), &mut self.lm_head));
        out
    }

    /// How caches created from now on keep keys and values (a cache already filled keeps its
    /// format; appending to it in another format is refused).
    pub fn set_kv_cache_format(&mut self, format: KvCacheFormat) {
        for layer in &mut self.layers {
            layer.self_attn.kv_format = format;
        }
    }

    /// See [`Self::set_kv_cache_format`].
    pub fn kv_cache_format(&self) -> KvCacheFormat {
        self.layers.first().map(|l| l.self_attn.kv_format).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::additive_mask;
    use candle_core::Device;

    /// Rows joining a batch are grouped with the earlier row whose 8-bit keys and values are the
    /// same bits over at least `MIN_SHARED` positions from their first real ones; groups follow
    /// rows leaving, and the kernel gets each row's first real position.
    #[test]
    fn rows_with_the_same_keys_and_values_are_grouped() {
        if !kv_quant::reads_shared_prefixes() {
            eprintln!("skipped: the 8-bit decode kernel does not run on this kernel set");
            return;
        }
        let dev = Device::Cpu;
        let rand = |l: usize| Tensor::randn(0f32, 1.0, (1, 2, l, 32), &dev).unwrap();
        let row = |kv: &[(Tensor, Tensor)]| {
            let layers = kv.iter().map(|(k, v)| KvBuffer::with_format(k, v, KvCacheFormat::Q8_0).unwrap()).collect();
            KvCache::from_layers(layers).unwrap()
        };
        let a: Vec<(Tensor, Tensor)> = (0..3).map(|_| (rand(100), rand(100))).collect();
        // `a`'s first 90 positions, then 30 of its own (in the last layer's values only).
        let mut b = a.clone();
        for (i, (k, v)) in b.iter_mut().enumerate() {
            let n = if i == 2 { 90 } else { 100 };
            *k = Tensor::cat(&[&k.narrow(2, 0, 100).unwrap(), &rand(20)], 2).unwrap();
            *v = Tensor::cat(&[&v.narrow(2, 0, n).unwrap(), &rand(120 - n)], 2).unwrap();
        }
        let c: Vec<(Tensor, Tensor)> = (0..3).map(|_| (rand(80), rand(80))).collect();
        let mut cache = row(&a);
        cache.append_rows(row(&b), 8).unwrap();
        assert_eq!(cache.shared_positions(), 90, "b shares 90 positions with a");
        cache.append_rows(row(&c), 8).unwrap();
        assert_eq!(cache.shared_positions(), 90, "c shares nothing");
        cache.append_rows(row(&a), 8).unwrap();
        assert_eq!(cache.shared_positions(), 180, "a again joins the group, which keeps 90");
        let t = cache.len();
        let key_valid = cache.mask.as_ref().unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let want = SharedPrefix { rows: vec![(0, 20), (1, 0), (3, 20)], len: 90 };
        assert_eq!(cache.shared_prefixes(&key_valid, t), vec![want]);
        cache.retain_rows(&[1, 2, 3]).unwrap();
        assert_eq!(cache.shared_positions(), 90, "the first row left: the other two still share");
        cache.compact().unwrap();
        cache.retain_rows(&[0, 1]).unwrap();
        assert_eq!(cache.shared_positions(), 0, "b and c share nothing");
        // Dense caches are not grouped (their kernel reads every row).
        let dense = |kv: &[(Tensor, Tensor)]| {
            KvCache::from_layers(kv.iter().map(|(k, v)| KvBuffer::new(k, v).unwrap()).collect()).unwrap()
        };
        let mut cache = dense(&a);
        cache.append_rows(dense(&a), 8).unwrap();
        assert_eq!(cache.shared_positions(), 0);
    }

    /// The CPU kernel (mask rules) and the candle path (additive mask) agree through a prefill
    /// with left padding, a chunked continuation and a decode step, with and without a window.
    #[test]
    fn fused_cpu_attention_matches_the_additive_mask_path() {
        let dev = Device::Cpu;
        let (hidden, heads, kv_heads, head_dim, b) = (32, 4, 2, 8, 2);
        let w = |o: usize, i: usize| Tensor::randn(0f32, 0.3, (o, i), &dev).unwrap();
        let weights = [w(heads * head_dim, hidden), w(kv_heads * head_dim, hidden), w(kv_heads * head_dim, hidden)];
        let o_weight = w(hidden, heads * head_dim);
        let inv_freq: Vec<f32> =
            (0..head_dim / 2).map(|i| 1.0 / 100f32.powf(2.0 * i as f32 / head_dim as f32)).collect();
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
            let lin = |t: &Tensor| Linear::new(t.to_dtype(dtype).unwrap(), None);
            let attn = Attention {
                q_proj: lin(&weights[0]),
                k_proj: lin(&weights[1]),
                v_proj: lin(&weights[2]),
                o_proj: lin(&o_weight),
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim,
                kv_format: KvCacheFormat::Model,
            };
            for window in [None, Some(4)] {
                let (mut fused, mut candle) = (None, None);
                let mut full: Vec<Vec<u32>> = vec![Vec::new(); b];
                // Row 1 starts with 3 padding positions.
                for (step, l) in [7usize, 3, 1].into_iter().enumerate() {
                    let past = full[0].len();
                    for (r, row) in full.iter_mut().enumerate() {
                        row.extend((0..l).map(|i| u32::from(!(r == 1 && step == 0 && i < 3))));
                    }
                    let total = past + l;
                    let x = Tensor::randn(0f32, 1.0, (b, l, hidden), &dev).unwrap().to_dtype(dtype).unwrap();
                    let pos: Vec<u32> = (0..b).flat_map(|_| past as u32..total as u32).collect();
                    let pos = Tensor::from_vec(pos, (b, l), &dev).unwrap();
                    let (cos, sin) = rope_tables(&inv_freq, &pos, dtype).unwrap();
                    let mask = Tensor::from_vec(full.concat(), (b, total), &dev).unwrap();
                    let rules = AttentionMask::Rules { key_valid: full.concat(), past, window, shared: Vec::new() };
                    let additive = AttentionMask::Additive(additive_mask(&mask, l, window, &dev).unwrap());
                    let a = attn.forward(&x, &cos, &sin, &rules, &mut fused).unwrap();
                    let c = attn.forward(&x, &cos, &sin, &additive, &mut candle).unwrap();
                    let (a, c) = (a.to_dtype(DType::F32).unwrap(), c.to_dtype(DType::F32).unwrap());
                    let max_abs = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                    let d = max_abs(&(&a - &c).unwrap()).to_scalar::<f32>().unwrap();
                    // Relative to the largest output (the candle path rounds bf16 scores to bf16).
                    let d = d / max_abs(&c).to_scalar::<f32>().unwrap().max(1.0);
                    assert!(d <= tol, "{dtype:?} window {window:?} step {step}: max diff {d} (relative)");
                }
            }
        }
    }
}
