//! Generation: prefill (visual features computed once), then token by token with a KV cache,
//! sampling, stopping and streaming.
//!
//! A batch of prompts (left-padded by the processor) decodes together; rows that finish are
//! dropped from the batch (and from the KV cache) so they stop costing compute. Greedy ids equal
//! transformers' `generate(do_sample=False)`; log-probabilities are `log_softmax` of the model's
//! raw logits in f32.

pub mod sampling;
pub mod stream;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::llama::KvCache;
use crate::model::VideoLlava;
use crate::processor::tokenizer::TextTokenizer;
use crate::processor::{PixelTensor, ProcessorOutput};
pub use sampling::SamplingParams;
use sampling::{choose_token, log_softmax, top_k_of, Rng};
use stream::TextStream;

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop when the generated text contains one of these (the text is cut before it).
    pub stop_strings: Vec<String>,
    /// Token ids that end a sequence (the checkpoint's EOS).
    pub eos_token_ids: Vec<u32>,
    /// Keep going past EOS until `max_new_tokens`.
    pub ignore_eos: bool,
    /// How many most likely alternatives to report per token (0 = none).
    pub top_logprobs: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingParams::default(),
            stop_strings: Vec::new(),
            eos_token_ids: vec![2],
            ignore_eos: false,
            top_logprobs: 0,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_new_tokens` or the end of the model's context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated token, as it is produced (for streaming).
#[derive(Debug, Clone)]
pub struct TokenEvent<'a> {
    /// Row of the batch (prompt index).
    pub row: usize,
    pub token_id: u32,
    pub logprob: f32,
    /// Text that became final with this token (may be empty: an incomplete UTF-8 character, or
    /// text held back because it may start a stop string).
    pub text_delta: &'a str,
}

/// The result for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedSequence {
    /// Generated ids (an EOS that ended the sequence included, as transformers returns it).
    pub token_ids: Vec<u32>,
    /// Text of the generated ids without special tokens, cut before a stop string.
    pub text: String,
    /// Log-probability of each generated token.
    pub logprobs: Vec<f32>,
    /// The `top_logprobs` most likely alternatives at each step.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
}

/// Wall-clock time of each stage, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateTimings {
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Decode steps run (forward passes after prefill).
    pub decode_steps: usize,
}

fn to_tensor(t: &PixelTensor, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(&t.data, t.shape.as_slice(), device)?)
}

struct Row {
    index: usize,
    seen: Vec<u32>,
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
    next_position: u32,
    rng: Rng,
    stream: TextStream,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
}

/// Generates for every prompt of `inputs`; `on_token` sees each token as it is chosen.
pub fn generate(
    model: &VideoLlava,
    tokenizer: &TextTokenizer,
    inputs: &ProcessorOutput,
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(TokenEvent),
) -> Result<(Vec<GeneratedSequence>, GenerateTimings)> {
    let mut cache = KvCache::default();
    generate_continuing(model, tokenizer, inputs, options, &mut cache, on_token)
}

/// Like [`generate`], but `inputs` continue the sequences already held by `cache` (a chat
/// session's earlier turns; an empty cache starts afresh). Positions continue after the cached
/// real tokens. On return the cache holds everything but the last chosen token of each row, which
/// the next continuation must feed first.
pub fn generate_continuing(
    model: &VideoLlava,
    tokenizer: &TextTokenizer,
    inputs: &ProcessorOutput,
    options: &GenerateOptions,
    cache: &mut KvCache,
    on_token: &mut dyn FnMut(TokenEvent),
) -> Result<(Vec<GeneratedSequence>, GenerateTimings)> {
    options.sampling.validate().map_err(Error::Input)?;
    if options.max_new_tokens == 0 {
        return Err(Error::Input("max_new_tokens must be at least 1".into()));
    }
    let device = model.device.clone();
    let (b, l) = (inputs.batch_size, inputs.seq_len);
    let max_ctx = model.config.text_config.max_position_embeddings;
    let mut timings = GenerateTimings::default();

    let ids_u32: Vec<u32> = inputs.input_ids.iter().map(|&t| t as u32).collect();
    let mask_u32: Vec<u32> = inputs.attention_mask.iter().map(|&t| t as u32).collect();
    let ids = Tensor::from_vec(ids_u32.clone(), (b, l), &device)?;
    let mask = Tensor::from_vec(mask_u32.clone(), (b, l), &device)?;

    let past_real = cache.real_tokens_per_row()?;
    if !cache.is_empty() && past_real.len() != b {
        return Err(Error::Input(format!("the cache holds {} sequences but {b} prompts were given", past_real.len())));
    }
    let mut rows: Vec<Row> = (0..b)
        .map(|i| {
            let row_ids = &ids_u32[i * l..(i + 1) * l];
            let row_mask = &mask_u32[i * l..(i + 1) * l];
            let prompt_tokens = row_mask.iter().filter(|&&m| m != 0).count() + past_real.get(i).copied().unwrap_or(0);
            Row {
                index: i,
                seen: row_ids.iter().zip(row_mask).filter(|(_, &m)| m != 0).map(|(&t, _)| t).collect(),
                generated: Vec::new(),
                logprobs: Vec::new(),
                top: Vec::new(),
                next_position: prompt_tokens as u32,
                rng: Rng::new(options.sampling.seed.wrapping_add(i as u64)),
                stream: TextStream::new(options.stop_strings.clone()),
                finish: None,
                prompt_tokens,
            }
        })
        .collect();
    if let Some(r) = rows.iter().find(|r| r.prompt_tokens > max_ctx) {
        return Err(Error::Input(format!(
            "prompt #{} has {} tokens, more than the model's context of {max_ctx} (max_position_embeddings)",
            r.index + 1,
            r.prompt_tokens
        )));
    }

    // Prefill: visual features once, then the whole prompt.
    let t0 = Instant::now();
    let image_features = inputs.pixel_values_images.as_ref().map(|p| model.image_features(&to_tensor(p, &device)?)).transpose()?;
    let video_features = inputs.pixel_values_videos.as_ref().map(|p| model.video_features(&to_tensor(p, &device)?)).transpose()?;
    timings.vision_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let embeds = model.merge_embeddings(&ids, image_features.as_ref(), video_features.as_ref())?;
    drop((image_features, video_features));
    let positions = position_ids_after(&mask_u32, b, l, &past_real, &device)?;
    let mut logits = model.forward_embeddings(&embeds, &mask, &positions, Some(&mut *cache), true)?;
    drop(embeds);
    timings.prefill_ms = t1.elapsed().as_secs_f64() * 1e3;

    let t2 = Instant::now();
    let mut active: Vec<usize> = (0..b).collect();
    loop {
        let logits_rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (slot, &ri) in active.iter().enumerate() {
            let row = &mut rows[ri];
            let raw = &logits_rows[slot];
            let token = choose_token(raw, &row.seen, &options.sampling, &mut row.rng);
            let lp = log_softmax(raw);
            row.logprobs.push(lp[token as usize]);
            if options.top_logprobs > 0 {
                row.top.push(top_k_of(&lp, options.top_logprobs));
            }
            row.generated.push(token);
            row.seen.push(token);
            row.next_position += 1;
            let is_eos = options.eos_token_ids.contains(&token) && !options.ignore_eos;
            let (delta, stopped) = if is_eos {
                (row.stream.finish(tokenizer, &row.generated[..row.generated.len() - 1])?, false)
            } else {
                row.stream.push(tokenizer, &row.generated)?
            };
            on_token(TokenEvent { row: row.index, token_id: token, logprob: lp[token as usize], text_delta: &delta });
            if is_eos || stopped {
                row.finish = Some(FinishReason::Stop);
            } else if row.generated.len() >= options.max_new_tokens || row.next_position as usize >= max_ctx {
                let rest = row.stream.finish(tokenizer, &row.generated)?;
                if !rest.is_empty() {
                    on_token(TokenEvent { row: row.index, token_id: token, logprob: f32::NAN, text_delta: &rest });
                }
                row.finish = Some(FinishReason::Length);
            }
        }
        let keep: Vec<usize> = (0..active.len()).filter(|&s| rows[active[s]].finish.is_none()).collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            cache.retain_rows(&keep)?;
            active = keep.iter().map(|&s| active[s]).collect();
        }
        let n = active.len();
        let next: Vec<u32> = active.iter().map(|&ri| *rows[ri].generated.last().unwrap_or(&0)).collect();
        let pos: Vec<u32> = active.iter().map(|&ri| rows[ri].next_position - 1).collect();
        let next = Tensor::from_vec(next, (n, 1), &device)?;
        let embeds = model.merge_embeddings(&next, None, None)?;
        let step_mask = Tensor::ones((n, 1), DType::U32, &device)?;
        let pos = Tensor::from_vec(pos, (n, 1), &device)?;
        logits = model.forward_embeddings(&embeds, &step_mask, &pos, Some(&mut *cache), true)?;
        timings.decode_steps += 1;
    }
    timings.decode_ms = t2.elapsed().as_secs_f64() * 1e3;

    let results = rows
        .into_iter()
        .map(|r| GeneratedSequence {
            text: r.stream.text().to_string(),
            token_ids: r.generated,
            logprobs: r.logprobs,
            top_logprobs: r.top,
            finish_reason: r.finish.unwrap_or(FinishReason::Length),
            prompt_tokens: r.prompt_tokens,
        })
        .collect();
    Ok((results, timings))
}

/// Position ids `[B, L]`: `cumsum(mask) - 1` after `past[b]` real cached tokens, pads at 1.
fn position_ids_after(mask: &[u32], b: usize, l: usize, past: &[usize], device: &Device) -> Result<Tensor> {
    let mut out = Vec::with_capacity(b * l);
    for row in 0..b {
        let mut count = past.get(row).copied().unwrap_or(0) as u32;
        for &m in &mask[row * l..(row + 1) * l] {
            count += m;
            out.push(if m == 0 { 1 } else { count - 1 });
        }
    }
    Ok(Tensor::from_vec(out, (b, l), device)?)
}
