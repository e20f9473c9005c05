//! `VideoLlavaForConditionalGeneration`: two CLIP towers -> selected hidden states -> projector ->
//! features written over the placeholder embeddings -> Llama/Mistral decoder -> logits.
//!
//! Conventions: `input_ids` `[B, L]` u32, `attention_mask` / `position_ids` `[B, L]` u32,
//! `pixel_values_images` `[N, 3, S, S]`, `pixel_values_videos` `[M, T, 3, S, S]` (any float dtype;
//! cast to the compute dtype), `labels` `[B, L]` i64 with -100 ignored. Logits are returned as f32.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::batch_feature::{PixelTensor, ProcessorOutput};
use crate::config::{FeatureSelectStrategy, VideoLlavaConfig};
use crate::error::{Error, Result};
use crate::model::clip::ClipVisionTower;
use crate::model::feature_cache::{FeatureCache, FeatureCacheStats, Tower, DEFAULT_CAPACITY_BYTES};
use crate::model::linear::{Linear, LinearWeight};
use crate::model::llama::{KvCache, LanguageModel};
use crate::model::prefix_cache::{PrefixCache, PrefixCacheStats, PrefixKey, PrefixStore};
use crate::model::projector::Projector;
use crate::model::quantize::{self, CachedQuantized, QuantCache, QuantFormat, QuantizeReport};
use crate::model::weights::CheckpointWeights;

/// How to load a checkpoint: compute dtype and optional weight quantization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Compute dtype of everything not quantized (and of activations).
    pub dtype: DType,
    /// Quantize the language model's linear layers to this format.
    pub quantize: Option<QuantFormat>,
    /// Where quantized weights are saved and looked up.
    pub quant_cache: QuantCache,
    /// BF16 weights stored as BF16 stay in the memory-mapped files where our BF16 kernels read
    /// them (CPU with AVX-512 BF16), instead of being copied into memory at load.
    pub mmap: bool,
}

impl LoadOptions {
    pub fn new(dtype: DType) -> Self {
        Self { dtype, quantize: None, quant_cache: QuantCache::Default, mmap: true }
    }
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsSelection {
    /// Every position: `[B, L, V]`.
    All,
    /// The last position of each row: `[B, 1, V]` (what generation needs).
    Last,
    /// No logits (hidden states or features only).
    None,
}

/// Inputs of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInput<'a> {
    pub input_ids: &'a Tensor,
    /// Default: all ones.
    pub attention_mask: Option<&'a Tensor>,
    /// Default: `cumsum(attention_mask) - 1` with padded positions set to 1 (what `generate` uses),
    /// offset by the positions already in the cache.
    pub position_ids: Option<&'a Tensor>,
    pub pixel_values_images: Option<&'a Tensor>,
    pub pixel_values_videos: Option<&'a Tensor>,
    pub labels: Option<&'a Tensor>,
    pub logits: LogitsSelection,
    pub output_hidden_states: bool,
}

impl<'a> ForwardInput<'a> {
    /// Plain inputs: all logits, no labels, no hidden states.
    pub fn new(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            position_ids: None,
            pixel_values_images: None,
            pixel_values_videos: None,
            labels: None,
            logits: LogitsSelection::All,
            output_hidden_states: false,
        }
    }
}

/// Outputs of one forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// f32 `[B, L, V]` or `[B, 1, V]`.
    pub logits: Option<Tensor>,
    /// Mean cross-entropy over the shifted labels (f32), when labels were given.
    pub loss: Option<f32>,
    /// The decoder's hidden states (`num_layers + 1`, the last after the final norm).
    pub hidden_states: Option<Vec<Tensor>>,
    /// Projected image features `[N, tokens, H]`.
    pub image_features: Option<Tensor>,
    /// Projected video features `[M * T, tokens, H]`.
    pub video_features: Option<Tensor>,
}

/// The whole model.
#[derive(Debug, Clone)]
pub struct VideoLlava {
    image_tower: ClipVisionTower,
    video_tower: ClipVisionTower,
    projector: Projector,
    language_model: LanguageModel,
    feature_layers: Vec<usize>,
    pub config: VideoLlavaConfig,
    pub dtype: DType,
    pub device: Device,
    /// What `--quantize` did at load, if it was asked for.
    pub quantization: Option<QuantizeReport>,
    /// Projected features of recent images and videos, by pixel content (used by [`Self::prefill`];
    /// shared by clones).
    feature_cache: std::sync::Arc<std::sync::Mutex<FeatureCache>>,
    /// Keys/values of computed prompt prefixes ([`Self::cached_prefix`]; shared by clones).
    prefix_cache: std::sync::Arc<std::sync::Mutex<PrefixCache>>,
    /// [`Self::prefill`] runs the decoder over at most this many prompt positions at a time (0:
    /// all at once).
    prefill_chunk: usize,
    /// [`Self::cached_prefix`] reuses prefixes of any length, not only whole prefill chunks.
    prefix_any_length: bool,
}

/// Default of [`VideoLlava::set_prefill_chunk`].
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// A processed prompt ready for the decoder ([`VideoLlava::prepare_prompt`]).
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// `[B, L, H]` in the compute dtype, visual features in the placeholder positions.
    pub embeds: Tensor,
    /// `[B, L]` u32 attention mask.
    pub mask: Tensor,
    /// `L`.
    pub len: usize,
    /// Milliseconds in the vision towers.
    pub vision_ms: f64,
}

impl VideoLlava {
    /// Loads `config.json` and the weights of checkpoint `dir`, computing in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::new(dtype), device)
    }

    /// Loads checkpoint `dir` as `options` say. With quantization, layers found in the
    /// quantized-weights cache are read from it (their 16-bit weights are never read); the others
    /// are loaded, quantized, and the cache file is (re)written.
    pub fn load_with(dir: &Path, options: &LoadOptions, device: &Device) -> Result<Self> {
        let config = VideoLlavaConfig::from_file(&dir.join("config.json"))?;
        let mut weights = CheckpointWeights::open(dir)?;
        let Some(format) = options.quantize else {
            if !(options.mmap && device.is_cpu() && options.dtype == DType::BF16) {
                return Self::from_var_builder(config, weights.var_builder(options.dtype, device));
            }
            // BF16 on a CPU with our BF16 kernels: the linear layers' weights stay in the
            // memory-mapped files (no copy; cached by the OS between runs).
            let names: Vec<(String, Vec<usize>)> = Self::linear_weight_names(&config)
                .into_iter()
                .filter_map(|n| weights.stored_shape(&n).map(|s| (n, s)))
                .collect();
            let mut mapped = weights.map_bf16(&names)?;
            let mut model = Self::from_var_builder(config, weights.var_builder(options.dtype, device))?;
            for (name, linear) in model.linears_mut() {
                if let Some(m) = mapped.remove(&name) {
                    linear.set_weight(LinearWeight::Mapped(m)).map_err(|e| Error::Model(format!("`{name}`: {e}")))?;
                }
            }
            if let Some(name) = mapped.keys().next() {
                return Err(Error::Model(format!("memory-mapped weight `{name}` belongs to no linear layer")));
            }
            return Ok(model);
        };
        if !device.is_cpu() {
            return Err(Error::Input("--quantize is implemented for the CPU only".into()));
        }
        let key = quantize::source_key(&weights.files, format)?;
        let cache_file = options.quant_cache.file_for(dir, &weights.files, format)?;
        let mut note = None;
        let cached = match cache_file.as_deref().map(|f| CachedQuantized::open(f, format, &key)) {
            Some(Ok(c)) => c,
            Some(Err(why)) => {
                note = Some(why);
                None
            }
            None => None,
        };
        if let Some(c) = &cached {
            weights.defer(&c.shapes());
        }
        let mut model = Self::from_var_builder(config, weights.var_builder(options.dtype, device))?;
        let save_to = cache_file.as_deref().map(|f| (f, key.as_str()));
        let mut report =
            quantize::quantize_linears(model.language_model.linears_mut(), format, cached.as_ref(), save_to)?;
        quantize::summarize(model.language_model.linears_mut().into_iter().map(|(n, l)| (n, &*l)), &mut report);
        if report.cache_note.is_none() {
            report.cache_note = note;
        }
        model.quantization = Some(report);
        Ok(model)
    }

    /// Canonical weight names of every linear layer the model loads (vision towers up to the
    /// deepest selected layer, projector, language model, LM head).
    fn linear_weight_names(config: &VideoLlavaConfig) -> Vec<String> {
        let vc = &config.vision_config;
        let needed = config.vision_feature_layer.resolved(vc.num_hidden_layers).into_iter().max().unwrap_or(0);
        let mut names = Vec::new();
        for tower in ["image_tower", "video_tower"] {
            for i in 0..needed {
                let p = format!("{tower}.vision_model.encoder.layers.{i}");
                for n in [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.out_proj",
                    "mlp.fc1",
                    "mlp.fc2",
                ] {
                    names.push(format!("{p}.{n}.weight"));
                }
            }
        }
        names.push("multi_modal_projector.linear_1.weight".into());
        names.push("multi_modal_projector.linear_2.weight".into());
        for i in 0..config.text_config.num_hidden_layers {
            let p = format!("language_model.model.layers.{i}");
            for n in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ] {
                names.push(format!("{p}.{n}.weight"));
            }
        }
        names.push("language_model.lm_head.weight".into());
        names
    }

    /// How many linear layers read their weight from the memory-mapped checkpoint, and their bytes.
    pub fn mapped_weights(&mut self) -> (usize, usize) {
        self.linears_mut()
            .into_iter()
            .filter_map(|(_, l)| match l.weight() {
                LinearWeight::Mapped(m) => Some(m.dims().0 * m.dims().1 * 2),
                _ => None,
            })
            .fold((0, 0), |(n, b), bytes| (n + 1, b + bytes))
    }

    /// Every linear layer with its canonical weight name.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = self.image_tower.linears_mut("image_tower.vision_model.");
        out.extend(self.video_tower.linears_mut("video_tower.vision_model."));
        out.extend(self.projector.linears_mut());
        out.extend(self.language_model.linears_mut());
        out
    }

    /// Builds the model from a config and a [`candle_nn::VarBuilder`] over canonical names.
    pub fn from_var_builder(config: VideoLlavaConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        let vc = &config.vision_config;
        let feature_layers = config.vision_feature_layer.resolved(vc.num_hidden_layers);
        let needed = feature_layers.iter().copied().max().unwrap_or(0);
        let image_tower = ClipVisionTower::load(vc, needed, vb.pp("image_tower").pp("vision_model"))?;
        let video_tower = ClipVisionTower::load(vc, needed, vb.pp("video_tower").pp("vision_model"))?;
        let projector = Projector::load(&config, vb.pp("multi_modal_projector"))?;
        let language_model = LanguageModel::load(&config.text_config, vb.clone())?;
        for (what, id) in [("image_token_index", config.image_token_id), ("video_token_index", config.video_token_id)] {
            if id as usize >= config.text_config.vocab_size {
                return Err(Error::Model(format!(
                    "config.json: {what} {id} is outside the embedding table of {} rows",
                    config.text_config.vocab_size
                )));
            }
        }
        Ok(Self {
            image_tower,
            video_tower,
            projector,
            language_model,
            feature_layers,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            quantization: None,
            feature_cache: std::sync::Arc::new(std::sync::Mutex::new(FeatureCache::new(DEFAULT_CAPACITY_BYTES))),
            prefix_cache: std::sync::Arc::new(std::sync::Mutex::new(PrefixCache::new(
                crate::model::prefix_cache::DEFAULT_CAPACITY_BYTES,
            ))),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            prefix_any_length: false,
            config,
        })
    }

    /// The language model (for generation code that drives the decoder directly).
    pub fn language_model(&self) -> &LanguageModel {
        &self.language_model
    }

    /// Projected image features `[N, tokens, H]`: CLS dropped under strategy `default`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let feats = self.image_tower.select_features(&pixel_values.to_dtype(self.dtype)?, &self.feature_layers)?;
        let feats = match self.config.vision_feature_select_strategy {
            FeatureSelectStrategy::Default => {
                let n = feats.dim(1)?;
                feats.narrow(1, 1, n - 1)?
            }
            FeatureSelectStrategy::Full => feats,
        };
        self.projector.forward(&feats)
    }

    /// Projected video features `[M * T, tokens + 1, H]`: frames through the video tower as one
    /// batch, CLS always kept.
    pub fn video_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (m, t, c, h, w) = pixel_values.dims5().map_err(|_| {
            Error::Input(format!(
                "pixel_values_videos must be [videos, frames, 3, H, W], got {:?}",
                pixel_values.dims()
            ))
        })?;
        let frames = pixel_values.reshape((m * t, c, h, w))?.to_dtype(self.dtype)?;
        let feats = self.video_tower.select_features(&frames, &self.feature_layers)?;
        self.projector.forward(&feats)
    }

    /// Token embeddings with image, then video, features written over their placeholders in
    /// row-major (batch, then sequence) order. Returns `[B, L, H]`.
    pub fn merge_embeddings(
        &self,
        input_ids: &Tensor,
        image_features: Option<&Tensor>,
        video_features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let embeds = self.language_model.embed(input_ids)?;
        if image_features.is_none() && video_features.is_none() {
            return Ok(embeds);
        }
        let (b, l, h) = embeds.dims3()?;
        let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
        let mut table = vec![embeds.reshape((b * l, h))?];
        let mut index: Vec<u32> = (0..(b * l) as u32).collect();
        let mut offset = b * l;
        for (features, token, what) in [
            (image_features, self.config.image_token_id, "Image"),
            (video_features, self.config.video_token_id, "Video"),
        ] {
            let Some(features) = features else { continue };
            let positions: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == token).map(|(i, _)| i).collect();
            let (n, tokens, fh) = features.dims3()?;
            let lower = what.to_lowercase();
            if positions.len() != n * tokens {
                return Err(Error::Input(format!(
                    "{what} features and {lower} tokens do not match: tokens: {}, features {}",
                    positions.len(),
                    n * tokens
                )));
            }
            if fh != h {
                return Err(Error::Model(format!("{lower} features have width {fh}, the language model {h}")));
            }
            for (k, &p) in positions.iter().enumerate() {
                index[p] = (offset + k) as u32;
            }
            offset += n * tokens;
            table.push(features.to_dtype(embeds.dtype())?.reshape((n * tokens, h))?);
        }
        let table = Tensor::cat(&table, 0)?;
        let index = Tensor::from_vec(index, b * l, embeds.device())?;
        Ok(table.index_select(&index, 0)?.reshape((b, l, h))?)
    }

    /// One forward pass. With `cache`, keys and values are appended to it (prefill or decode).
    pub fn forward(&self, input: &ForwardInput, cache: Option<&mut KvCache>) -> Result<ForwardOutput> {
        let ids = input.input_ids.to_dtype(DType::U32)?;
        let (b, l) =
            ids.dims2().map_err(|_| Error::Input(format!("input_ids must be [batch, seq], got {:?}", ids.dims())))?;
        if l == 0 {
            return Err(Error::Input("empty input_ids".into()));
        }
        let mask = match input.attention_mask {
            Some(m) => m.to_dtype(DType::U32)?,
            None => Tensor::ones((b, l), DType::U32, &self.device)?,
        };
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let positions = match input.position_ids {
            Some(p) => p.to_dtype(DType::U32)?,
            None => default_position_ids(&mask, past)?,
        };

        let image_features = input.pixel_values_images.map(|p| self.image_features(p)).transpose()?;
        let video_features = input.pixel_values_videos.map(|p| self.video_features(p)).transpose()?;
        let embeds = self.merge_embeddings(&ids, image_features.as_ref(), video_features.as_ref())?;

        let out = self.language_model.forward(&embeds, &positions, &mask, cache, input.output_hidden_states)?;
        let need_all = input.logits == LogitsSelection::All || input.labels.is_some();
        let logits = match input.logits {
            LogitsSelection::None if !need_all => None,
            LogitsSelection::Last if !need_all => {
                Some(self.language_model.lm_head(&out.last_hidden.narrow(1, l - 1, 1)?)?.to_dtype(DType::F32)?)
            }
            _ => Some(self.language_model.lm_head(&out.last_hidden)?.to_dtype(DType::F32)?),
        };
        let loss = match (input.labels, &logits) {
            (Some(labels), Some(logits)) => Some(causal_lm_loss(logits, labels)?),
            _ => None,
        };
        let logits = match (input.logits, logits) {
            (LogitsSelection::None, _) => None,
            (LogitsSelection::Last, Some(lg)) if lg.dim(1)? == l && l > 1 => Some(lg.narrow(1, l - 1, 1)?),
            (_, lg) => lg,
        };
        Ok(ForwardOutput { logits, loss, hidden_states: out.hidden_states, image_features, video_features })
    }
}

impl VideoLlava {
    /// Prefill of a processed batch: visual features computed once (or taken from the feature
    /// cache when the same pixels were seen before; for one unpadded prompt into an empty
    /// `cache`, after its longest prefix in the prefix cache), merged into the placeholder
    /// embeddings, then the whole prompt through the decoder into `cache`, [`Self::set_prefill_chunk`]
    /// positions at a time. `position_ids` `[B, L]`. Returns f32 logits of the last position
    /// `[B, V]` and the milliseconds spent in the vision towers and in the decoder.
    pub fn prefill(
        &self,
        inputs: &ProcessorOutput,
        position_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<(Tensor, f64, f64)> {
        // One unpadded prompt into an empty cache: start after its longest cached prefix, and
        // keep its keys/values for later prompts (see `prefix_cache`).
        let key = if cache.is_empty() { self.prefix_key(inputs) } else { None };
        let mut start = 0;
        if let Some((n, kv)) = key.as_ref().and_then(|k| self.cached_prefix(k).unwrap_or(None)) {
            *cache = kv;
            start = n;
        }
        let prompt = self.prepare_prompt_after(inputs, key.as_ref(), start)?;
        let t = std::time::Instant::now();
        let chunk = self.prefill_chunk_len(prompt.len);
        let logits = loop {
            let n = chunk.min(prompt.len - start);
            if let Some(logits) = self.prefill_part(&prompt, position_ids, start, n, cache)? {
                break logits;
            }
            start += n;
        };
        if let Some(k) = &key {
            self.cache_prefix(k, cache)?;
        }
        Ok((logits, prompt.vision_ms, t.elapsed().as_secs_f64() * 1e3))
    }

    /// The first half of [`Self::prefill`]: visual features (or the feature cache) merged into
    /// the prompt's embeddings.
    pub fn prepare_prompt(&self, inputs: &ProcessorOutput) -> Result<PreparedPrompt> {
        let device = &self.device;
        let t = std::time::Instant::now();
        let image_features =
            inputs.pixel_values_images.as_ref().map(|p| self.features_cached(p, Tower::Image)).transpose()?;
        let video_features =
            inputs.pixel_values_videos.as_ref().map(|p| self.features_cached(p, Tower::Video)).transpose()?;
        let vision_ms = t.elapsed().as_secs_f64() * 1e3;
        let (b, l) = (inputs.batch_size, inputs.seq_len);
        let ids: Vec<u32> = inputs.input_ids.iter().map(|&x| x as u32).collect();
        let mask: Vec<u32> = inputs.attention_mask.iter().map(|&x| x as u32).collect();
        let ids = Tensor::from_vec(ids, (b, l), device)?;
        let mask = Tensor::from_vec(mask, (b, l), device)?;
        let embeds = self.merge_embeddings(&ids, image_features.as_ref(), video_features.as_ref())?;
        Ok(PreparedPrompt { embeds, mask, len: l, vision_ms })
    }

    /// The rest of [`Self::prefill`], one part at a time: positions `start..start + n` of
    /// `prompt` (`position_ids` `[B, L]` for the whole prompt) through the decoder, attending to
    /// what `cache` holds from the earlier parts. Returns the last position's logits once the
    /// part reaches the end of the prompt. Each position's numbers do not depend on how the
    /// prompt is cut: only fewer activations are alive at a time.
    pub fn prefill_part(
        &self,
        prompt: &PreparedPrompt,
        position_ids: &Tensor,
        start: usize,
        n: usize,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        let l = prompt.len;
        if n == 0 || start + n > l {
            return Err(Error::Input(format!("prefill part {start}..{} of a {l}-position prompt", start + n)));
        }
        let part = |t: &Tensor| -> Result<Tensor> {
            Ok(if n == l { t.clone() } else { t.narrow(1, start, n)?.contiguous()? })
        };
        let (e, m, p) = (part(&prompt.embeds)?, part(&prompt.mask)?, part(position_ids)?);
        if start + n == l {
            return Ok(Some(self.forward_embeddings(&e, &m, &p, Some(cache), true)?));
        }
        self.language_model.forward(&e, &p, &m, Some(cache), false)?;
        Ok(None)
    }

    /// Positions per [`Self::prefill_part`] for a prompt of `len` (the whole prompt when the
    /// chunk is 0).
    pub fn prefill_chunk_len(&self, len: usize) -> usize {
        if self.prefill_chunk == 0 {
            len.max(1)
        } else {
            self.prefill_chunk
        }
    }

    /// Prompt positions [`Self::prefill`] runs through the decoder at a time (0: the whole prompt
    /// at once). Smaller chunks keep fewer activations alive (a 2,074-token prompt of the 7B
    /// model holds ~0.3 GB less with 512) at the same results.
    pub fn set_prefill_chunk(&mut self, positions: usize) {
        self.prefill_chunk = positions;
    }

    /// Whether a cached prefix of any length is reused (`true`), or only whole prefill chunks
    /// (`false`, the default). Whole chunks keep the numbers of a prompt the same bit for bit
    /// whatever was cached before it (the rest of the prompt runs through the same kernels with
    /// the same row counts); any length prefills only what is new (the next turn of a
    /// conversation: its new question), where the positions after the reused prefix may go
    /// through kernels for fewer rows, which sum in another order (greedy tokens agree in the
    /// tests; the last bits of the numbers may not).
    pub fn set_prefix_any_length(&mut self, any: bool) {
        self.prefix_any_length = any;
    }

    /// Projected features of every item of `p` (pixels `[N, ...]`), as [`Self::image_features`] or
    /// [`Self::video_features`] return them, taking items seen before from the feature cache and
    /// running the tower once over the others.
    fn features_cached(&self, p: &PixelTensor, tower: Tower) -> Result<Tensor> {
        let n = p.shape.first().copied().unwrap_or(0);
        if n == 0 || p.data.len() % n != 0 {
            return Err(Error::Input(format!("pixel values of shape {:?} hold no items", p.shape)));
        }
        let per = p.data.len() / n;
        let item = |i: usize| &p.data[i * per..(i + 1) * per];
        let keys: Vec<u64> = (0..n).map(|i| FeatureCache::key(tower, &p.shape[1..], item(i))).collect();
        let lock = || self.feature_cache.lock().map_err(|_| Error::Model("feature cache lock poisoned".into()));
        let mut found: Vec<Option<Tensor>> = {
            let mut cache = lock()?;
            keys.iter().map(|k| cache.get(*k)).collect()
        };
        let missing: Vec<usize> = (0..n).filter(|&i| found[i].is_none()).collect();
        if !missing.is_empty() {
            let mut data = Vec::with_capacity(missing.len() * per);
            for &i in &missing {
                data.extend_from_slice(item(i));
            }
            let mut shape = p.shape.clone();
            shape[0] = missing.len();
            let px = Tensor::from_vec(data, shape, &self.device)?;
            let feats = match tower {
                Tower::Image => self.image_features(&px)?,
                Tower::Video => self.video_features(&px)?,
            };
            let rows = feats.dim(0)? / missing.len();
            let mut cache = lock()?;
            for (j, &i) in missing.iter().enumerate() {
                let f = feats.narrow(0, j * rows, rows)?;
                cache.insert(keys[i], &f)?;
                found[i] = Some(f);
            }
        }
        let parts: Vec<Tensor> = found.into_iter().flatten().collect();
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Hits, misses and size of the visual feature cache.
    pub fn feature_cache_stats(&self) -> FeatureCacheStats {
        self.feature_cache.lock().map(|c| c.stats()).unwrap_or_default()
    }

    /// How the decoder keeps keys and values in caches created from now on: the compute dtype
    /// (default) or 8-bit codes (`--kv-cache q8_0`, see [`crate::kernels::kv_quant`]).
    /// Bytes of weights one decode step reads (the language model's linear layers and LM head).
    pub fn decode_weight_bytes(&self) -> usize {
        self.language_model.decode_weight_bytes()
    }

    /// See [`crate::model::llama::LanguageModel::prefault_weights`].
    pub fn prefault_weights(&self) {
        self.language_model.prefault_weights();
    }

    pub fn set_kv_cache_format(&mut self, format: crate::kernels::kv_quant::KvCacheFormat) {
        self.language_model.set_kv_cache_format(format);
        // Cached prefixes in the other format could not be appended to.
        if let Ok(mut c) = self.prefix_cache.lock() {
            c.clear();
        }
    }

    /// How the decoder caches keys and values (`--kv-cache`).
    pub fn kv_cache_format(&self) -> crate::kernels::kv_quant::KvCacheFormat {
        self.language_model.kv_cache_format()
    }

    /// Bounds the visual feature cache to `bytes` (0 turns it off).
    pub fn set_feature_cache_capacity(&self, bytes: usize) {
        if let Ok(mut c) = self.feature_cache.lock() {
            c.set_capacity(bytes);
        }
    }

    fn prefix_lock(&self) -> Result<std::sync::MutexGuard<'_, PrefixCache>> {
        self.prefix_cache.lock().map_err(|_| Error::Model("prefix cache lock poisoned".into()))
    }

    /// The prefix-cache key of a one-row processed prompt (`None` when the prefix cache is off
    /// or the prompt is padded).
    pub fn prefix_key(&self, inputs: &ProcessorOutput) -> Option<PrefixKey> {
        if !self.prefix_cache.lock().map(|c| c.enabled()).unwrap_or(false) {
            return None;
        }
        PrefixKey::from_inputs(inputs, self.config.image_token_id, self.config.video_token_id)
    }

    /// The longest cached prefix of `key`, at most `key.len() - 1` positions (the last one must
    /// be computed for its logits) and cut down to a multiple of the prefill chunk (see
    /// `prefix_cache`; not cut with [`Self::set_prefix_any_length`]), from memory or a saved
    /// prefix: its length and a one-row cache holding it, to prefill the rest into
    /// ([`Self::prefill_part`] from that position).
    pub fn cached_prefix(&self, key: &PrefixKey) -> Result<Option<(usize, KvCache)>> {
        if key.len() < 2 {
            return Ok(None);
        }
        let layers = self.config.text_config.num_hidden_layers;
        // Cut at a chunk boundary: the rest is then prefilled exactly as without the cache.
        let align = if self.prefix_any_length { 0 } else { self.prefill_chunk };
        let max = key.len() - 1;
        self.prefix_lock()?.lookup(key, max, align, self.kv_cache_format(), self.dtype, &self.device, layers)
    }

    /// Keeps a prefilled prompt's keys/values (one row, `cache` holding at least `key.len()`
    /// positions) for later prompts; with a directory of saved prefixes, also writes its media
    /// prefix there (on a background thread) unless it is there already.
    pub fn cache_prefix(&self, key: &PrefixKey, cache: &KvCache) -> Result<()> {
        let mut c = self.prefix_lock()?;
        c.insert(key.elems(), cache)?;
        let media = key.media_end();
        if let Some(store) = c.store().cloned() {
            let media_key = &key.elems()[..media];
            // One save at a time (skipped while another is written: the next prompt with this
            // media saves it), so the copies waiting for the disk stay bounded.
            if media > 0 && !store.file_for(media_key).is_file() && store.begin_save() {
                // The media prefix as held by the cache just above (shared, no copy), else a copy.
                let held = c.held(media_key).ok().flatten();
                let kv = match held.map_or_else(|| cache.narrow_positions(0, media), Ok) {
                    Ok(kv) => kv,
                    Err(e) => {
                        store.end_save();
                        return Err(e);
                    }
                };
                let media_key = media_key.to_vec();
                c.note_disk_save();
                std::thread::spawn(move || {
                    if let Err(e) = store.save(&media_key, &kv) {
                        log::warn!("could not save a prefix: {e}");
                    }
                    store.end_save();
                });
            }
        }
        Ok(())
    }

    /// Bounds the prefix cache to `bytes` (0: nothing kept in memory).
    pub fn set_prefix_cache_capacity(&self, bytes: usize) {
        if let Ok(mut c) = self.prefix_cache.lock() {
            c.set_capacity(bytes);
        }
    }

    /// Saves media prefixes to, and looks them up in, `store` (`None`: memory only).
    pub fn set_prefix_store(&self, store: Option<PrefixStore>) {
        if let Ok(mut c) = self.prefix_cache.lock() {
            c.set_store(store);
        }
    }

    /// Hits, misses, reused positions and bytes of the prefix cache.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.prefix_cache.lock().map(|c| c.stats()).unwrap_or_default()
    }

    /// The prefix cache itself (shared with clones of this model), e.g. to read its statistics
    /// from another thread.
    pub fn prefix_cache(&self) -> std::sync::Arc<std::sync::Mutex<PrefixCache>> {
        self.prefix_cache.clone()
    }

    /// As [`Self::prepare_prompt`] for one unpadded prompt whose first `covered` positions come
    /// from a cached prefix: those positions' embeddings are never read, so the vision towers
    /// run only for the media items (and, of a video, the frames) with a placeholder at or after
    /// `covered`; the others get zeros. After a saved prefix is read back, a video whose last
    /// frame straddles the cut costs one frame through the tower instead of all.
    pub fn prepare_prompt_after(
        &self,
        inputs: &ProcessorOutput,
        key: Option<&PrefixKey>,
        covered: usize,
    ) -> Result<PreparedPrompt> {
        if covered == 0 || key.is_none_or(|k| k.media_end() == 0) || inputs.batch_size != 1 {
            return self.prepare_prompt(inputs);
        }
        let t = std::time::Instant::now();
        let l = inputs.seq_len;
        let ids: Vec<u32> = inputs.input_ids.iter().map(|&x| x as u32).collect();
        let image_features = inputs
            .pixel_values_images
            .as_ref()
            .map(|p| self.features_after(p, Tower::Image, &ids, inputs.image_tokens_per_item, covered))
            .transpose()?;
        let video_features = inputs
            .pixel_values_videos
            .as_ref()
            .map(|p| self.features_after(p, Tower::Video, &ids, inputs.video_tokens_per_item, covered))
            .transpose()?;
        let vision_ms = t.elapsed().as_secs_f64() * 1e3;
        let mask: Vec<u32> = inputs.attention_mask.iter().map(|&x| x as u32).collect();
        let ids = Tensor::from_vec(ids, (1, l), &self.device)?;
        let mask = Tensor::from_vec(mask, (1, l), &self.device)?;
        let embeds = self.merge_embeddings(&ids, image_features.as_ref(), video_features.as_ref())?;
        Ok(PreparedPrompt { embeds, mask, len: l, vision_ms })
    }

    /// Features of the items of `p` as [`Self::features_cached`] returns them (`[N * frames,
    /// tokens, H]`), computed only for the frames (videos) or items (images) holding a
    /// placeholder position at or after `covered` in `ids`; zeros elsewhere.
    fn features_after(
        &self,
        p: &PixelTensor,
        tower: Tower,
        ids: &[u32],
        per_item: usize,
        covered: usize,
    ) -> Result<Tensor> {
        let token = match tower {
            Tower::Image => self.config.image_token_id,
            Tower::Video => self.config.video_token_id,
        };
        let n = p.shape.first().copied().unwrap_or(0);
        // Rows of features per item: frames for a video, 1 for an image.
        let rows = match tower {
            Tower::Image => 1,
            Tower::Video => p.shape.get(1).copied().unwrap_or(0),
        };
        if n == 0 || rows == 0 || per_item == 0 || !per_item.is_multiple_of(rows) || !p.data.len().is_multiple_of(n) {
            return self.features_cached(p, tower);
        }
        let positions: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == token).map(|(i, _)| i).collect();
        if positions.len() != n * per_item {
            return self.features_cached(p, tower); // fails with the usual message
        }
        let per_row = per_item / rows;
        // The first row (frame or image) with a position at or after `covered`.
        let first = (0..n * rows).find(|&g| positions[g * per_row + per_row - 1] >= covered).unwrap_or(n * rows);
        let h = self.config.text_config.hidden_size;
        let mut parts = Vec::new();
        if first > 0 {
            parts.push(Tensor::zeros((first, per_row, h), self.dtype, &self.device)?);
        }
        let per = p.data.len() / n;
        let (item0, mut row0) = (first / rows, first % rows);
        if row0 > 0 {
            // The item holding the cut: whole from the feature cache if it is there.
            let key = FeatureCache::key(tower, &p.shape[1..], &p.data[item0 * per..(item0 + 1) * per]);
            if self.feature_cache.lock().map(|c| c.contains(key)).unwrap_or(false) {
                parts.pop();
                if item0 * rows > 0 {
                    parts.push(Tensor::zeros((item0 * rows, per_row, h), self.dtype, &self.device)?);
                }
                row0 = 0;
            }
        }
        if row0 > 0 {
            // The item holding the cut: only its frames from `row0` on.
            let frame = per / rows;
            let data = p.data[item0 * per + row0 * frame..(item0 + 1) * per].to_vec();
            let mut shape = p.shape.clone();
            shape[0] = 1;
            shape[1] = rows - row0;
            let px = Tensor::from_vec(data, shape, &self.device)?;
            parts.push(self.video_features(&px)?);
        }
        let whole = if row0 > 0 { item0 + 1 } else { item0 };
        if whole < n {
            let mut shape = p.shape.clone();
            shape[0] = n - whole;
            let rest = PixelTensor { shape, data: p.data[whole * per..].to_vec() };
            parts.push(self.features_cached(&rest, tower)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Runs the decoder on ready-made embeddings `[B, L, H]` (see [`VideoLlava::merge_embeddings`])
    /// and returns f32 logits of the last position `[B, V]` (`last_only`) or of all `[B, L, V]`.
    pub fn forward_embeddings(
        &self,
        embeds: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor> {
        let out = self.language_model.forward(embeds, position_ids, attention_mask, cache, false)?;
        let l = out.last_hidden.dim(1)?;
        if last_only {
            let last = out.last_hidden.narrow(1, l - 1, 1)?.squeeze(1)?;
            Ok(self.language_model.lm_head(&last)?.to_dtype(DType::F32)?)
        } else {
            Ok(self.language_model.lm_head(&out.last_hidden)?.to_dtype(DType::F32)?)
        }
    }
}

/// `cumsum(mask) - 1` per row, padded positions set to 1, shifted by `past` cached positions.
pub fn default_position_ids(mask: &Tensor, past: usize) -> Result<Tensor> {
    let rows = mask.to_vec2::<u32>()?;
    let (b, l) = (rows.len(), rows.first().map(Vec::len).unwrap_or(0));
    let mut out = Vec::with_capacity(b * l);
    for row in rows {
        let mut count = 0u32;
        for m in row {
            count += m;
            out.push(if m == 0 { 1 } else { past as u32 + count - 1 });
        }
    }
    Ok(Tensor::from_vec(out, (b, l), mask.device())?)
}

/// Mean cross-entropy of `logits[:, :-1]` (f32 `[B, L, V]`) against `labels[:, 1:]`, ignoring -100.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<f32> {
    let (b, l, v) = logits.dims3()?;
    if labels.dims2()? != (b, l) {
        return Err(Error::Input(format!("labels {:?} must match input_ids [{b}, {l}]", labels.dims())));
    }
    if l < 2 {
        return Err(Error::Input("a loss needs at least two positions".into()));
    }
    let labels = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, l - 1)?.to_dtype(DType::F32)?, D::Minus1)?;
    let logp = logp.reshape((b * (l - 1), v))?;
    let mut picks = Vec::new();
    let mut rows = Vec::new();
    for (bi, row) in labels.iter().enumerate() {
        for t in 0..l - 1 {
            let target = row[t + 1];
            if target == -100 {
                continue;
            }
            if target < 0 || target as usize >= v {
                return Err(Error::Input(format!("label {target} is outside the vocabulary of {v} tokens")));
            }
            rows.push((bi * (l - 1) + t) as u32);
            picks.push(target as u32);
        }
    }
    if rows.is_empty() {
        return Ok(f32::NAN);
    }
    let n = rows.len();
    let dev = logits.device();
    let selected = logp.index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
    let chosen = selected.gather(&Tensor::from_vec(picks, (n, 1), dev)?, 1)?;
    let total = chosen.sum_all()?.to_scalar::<f32>()?;
    Ok(-total / n as f32)
}
