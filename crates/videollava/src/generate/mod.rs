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
use crate::media::Cancel;
use crate::model::llama::KvCache;
use crate::model::VideoLlava;
use crate::processor::tokenizer::TextTokenizer;
use crate::processor::ProcessorOutput;
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

impl GenerateOptions {
    /// Checks the options every generation path accepts (sampling parameters in range, at least
    /// one new token).
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate().map_err(Error::Input)?;
        if self.max_new_tokens == 0 {
            return Err(Error::Input("max_new_tokens must be at least 1".into()));
        }
        Ok(())
    }
}

/// Refuses a prompt of `tokens` tokens (`which`: how to name it) that does not fit the model's
/// context of `max_ctx` positions.
pub fn check_context(which: &str, tokens: usize, max_ctx: usize) -> Result<()> {
    if tokens > max_ctx {
        return Err(Error::Input(format!(
            "{which} has {tokens} tokens, more than the model's context of {max_ctx} (max_position_embeddings)"
        )));
    }
    Ok(())
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

/// One sequence being generated: what it has produced and how to continue it.
#[derive(Debug, Clone)]
pub struct SequenceState {
    /// Row of the caller's batch (prompt index).
    pub index: usize,
    seen: Vec<u32>,
    pub generated: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top: Vec<Vec<(u32, f32)>>,
    /// Position id of the next token to feed after the last chosen one.
    pub next_position: u32,
    rng: Rng,
    stream: TextStream,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: usize,
}

/// What one step produced for a sequence.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub token_id: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    /// Newly final text (possibly empty).
    pub text_delta: String,
}

impl SequenceState {
    /// A sequence whose prompt (real tokens `prompt`) has been prefilled.
    pub fn new(index: usize, prompt: Vec<u32>, options: &GenerateOptions) -> Self {
        let prompt_tokens = prompt.len();
        Self {
            index,
            seen: prompt,
            generated: Vec::new(),
            logprobs: Vec::new(),
            top: Vec::new(),
            next_position: prompt_tokens as u32,
            rng: Rng::new(options.sampling.seed.wrapping_add(index as u64)),
            stream: TextStream::new(options.stop_strings.clone()),
            finish: None,
            prompt_tokens,
        }
    }

    /// Chooses the next token from raw f32 `logits` `[V]`, updates text and stop state.
    pub fn step(
        &mut self,
        logits: &[f32],
        options: &GenerateOptions,
        tokenizer: &TextTokenizer,
        max_ctx: usize,
    ) -> Result<StepOutput> {
        let token = choose_token(logits, &self.seen, &options.sampling, &mut self.rng);
        let lp = log_softmax(logits);
        let top = if options.top_logprobs > 0 { top_k_of(&lp, options.top_logprobs) } else { Vec::new() };
        self.logprobs.push(lp[token as usize]);
        if options.top_logprobs > 0 {
            self.top.push(top.clone());
        }
        self.generated.push(token);
        self.seen.push(token);
        self.next_position += 1;
        let is_eos = options.eos_token_ids.contains(&token) && !options.ignore_eos;
        let (mut delta, stopped) = if is_eos {
            (self.stream.finish(tokenizer, &self.generated[..self.generated.len() - 1])?, false)
        } else {
            self.stream.push(tokenizer, &self.generated)?
        };
        if is_eos || stopped {
            self.finish = Some(FinishReason::Stop);
        } else if self.generated.len() >= options.max_new_tokens || self.next_position as usize >= max_ctx {
            delta.push_str(&self.stream.finish(tokenizer, &self.generated)?);
            self.finish = Some(FinishReason::Length);
        }
        Ok(StepOutput { token_id: token, logprob: lp[token as usize], top_logprobs: top, text_delta: delta })
    }

    /// The last chosen token (to feed at `next_position - 1`).
    pub fn last_token(&self) -> u32 {
        self.generated.last().copied().unwrap_or(0)
    }

    /// The finished result.
    pub fn into_result(self) -> GeneratedSequence {
        GeneratedSequence {
            text: self.stream.text().to_string(),
            token_ids: self.generated,
            logprobs: self.logprobs,
            top_logprobs: self.top,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            prompt_tokens: self.prompt_tokens,
        }
    }
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
    generate_cancellable(model, tokenizer, inputs, options, cache, &Cancel::new(), on_token)
}

/// Like [`generate_continuing`], but gives up with [`Error::Cancelled`] once `cancel` is set:
/// it is checked before the prefill and before every decode step, so an abandoned generation
/// costs at most one more forward pass. The cache is then left mid-generation (discard it).
pub fn generate_cancellable(
    model: &VideoLlava,
    tokenizer: &TextTokenizer,
    inputs: &ProcessorOutput,
    options: &GenerateOptions,
    cache: &mut KvCache,
    cancel: &Cancel,
    on_token: &mut dyn FnMut(TokenEvent),
) -> Result<(Vec<GeneratedSequence>, GenerateTimings)> {
    let cancelled = || Error::Cancelled("generation cancelled (its caller went away)".into());
    options.validate()?;
    let device = model.device.clone();
    let (b, l) = (inputs.batch_size, inputs.seq_len);
    let max_ctx = model.config.text_config.max_position_embeddings;
    let mut timings = GenerateTimings::default();

    let ids_u32: Vec<u32> = inputs.input_ids.iter().map(|&t| t as u32).collect();
    let mask_u32: Vec<u32> = inputs.attention_mask.iter().map(|&t| t as u32).collect();

    let past_real = cache.real_tokens_per_row()?;
    if !cache.is_empty() && past_real.len() != b {
        return Err(Error::Input(format!("the cache holds {} sequences but {b} prompts were given", past_real.len())));
    }
    let mut rows: Vec<SequenceState> = (0..b)
        .map(|i| {
            let row_ids = &ids_u32[i * l..(i + 1) * l];
            let row_mask = &mask_u32[i * l..(i + 1) * l];
            let prompt: Vec<u32> = row_ids.iter().zip(row_mask).filter(|(_, &m)| m != 0).map(|(&t, _)| t).collect();
            let mut row = SequenceState::new(i, prompt, options);
            row.prompt_tokens += past_real.get(i).copied().unwrap_or(0);
            row.next_position = row.prompt_tokens as u32;
            row
        })
        .collect();
    for r in &rows {
        check_context(&format!("prompt #{}", r.index + 1), r.prompt_tokens, max_ctx)?;
    }

    if cancel.is_cancelled() {
        return Err(cancelled());
    }
    // Prefill: visual features once, then the whole prompt.
    let positions = position_ids_after(&mask_u32, b, l, &past_real, &device)?;
    let (logits, vision_ms, prefill_ms) = model.prefill(inputs, &positions, cache)?;
    timings.vision_ms = vision_ms;
    timings.prefill_ms = prefill_ms;

    let t2 = Instant::now();
    let mut active: Vec<usize> = (0..b).collect();
    let mut logits_rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    loop {
        for (slot, &ri) in active.iter().enumerate() {
            let row = &mut rows[ri];
            let out = row.step(&logits_rows[slot], options, tokenizer, max_ctx)?;
            on_token(TokenEvent {
                row: row.index,
                token_id: out.token_id,
                logprob: out.logprob,
                text_delta: &out.text_delta,
            });
        }
        let keep: Vec<usize> = (0..active.len()).filter(|&s| rows[active[s]].finish.is_none()).collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() != active.len() {
            cache.retain_rows(&keep)?;
            active = keep.iter().map(|&s| active[s]).collect();
        }
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let running: Vec<&SequenceState> = active.iter().map(|&ri| &rows[ri]).collect();
        logits_rows = decode_logits(model, &running, cache)?;
        timings.decode_steps += 1;
    }
    timings.decode_ms = t2.elapsed().as_secs_f64() * 1e3;

    let results = rows.into_iter().map(SequenceState::into_result).collect();
    Ok((results, timings))
}

/// The decode step every generation path runs (the CLI's [`generate`] and the server's
/// scheduler): the last chosen token of each running sequence (row `i` of `cache`) goes through
/// the decoder at its next position. Returns raw f32 logits `[rows.len()][V]`; the caller chooses
/// the tokens with [`SequenceState::step`].
pub fn decode_logits(model: &VideoLlava, rows: &[&SequenceState], cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
    let device = model.device.clone();
    let n = rows.len();
    let next: Vec<u32> = rows.iter().map(|r| r.last_token()).collect();
    let pos: Vec<u32> = rows.iter().map(|r| r.next_position - 1).collect();
    let embeds = model.merge_embeddings(&Tensor::from_vec(next, (n, 1), &device)?, None, None)?;
    let mask = Tensor::ones((n, 1), DType::U32, &device)?;
    let pos = Tensor::from_vec(pos, (n, 1), &device)?;
    let logits = model.forward_embeddings(&embeds, &mask, &pos, Some(cache), true)?;
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
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
