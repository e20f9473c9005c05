//! Choosing the next token from one row of logits, as transformers' logits processors do.
//!
//! Order (transformers `_get_logits_processor`): repetition penalty over every token of the
//! sequence so far (prompt included), then, when sampling, temperature -> top-k -> top-p -> min-p,
//! then a draw from the softmax of what is left. Greedy (temperature 0) takes the arg-max after the
//! repetition penalty. Logits are f32 `[V]`.

/// Decoding parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below) means greedy.
    pub temperature: f64,
    /// Keep the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f64,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f64,
    /// transformers' `repetition_penalty` (1 = off).
    pub repetition_penalty: f64,
    /// Seed of the request's random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks ranges; the message names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// A small, fast, seedable random stream (SplitMix64), identical on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each token already in `seen` has its logit
/// divided by `penalty` when positive, multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let p = penalty as f32;
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let t = t as usize;
        if t < logits.len() && !done[t] {
            done[t] = true;
            let v = logits[t];
            logits[t] = if v < 0.0 { v * p } else { v / p };
        }
    }
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax` of `logits` in f64 accumulation, returned as f32.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// The `k` most likely tokens of `logprobs`, most likely first.
pub fn top_k_of(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_by(|&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

/// Applies temperature, top-k, top-p and min-p to `logits` (in place; removed tokens become -inf).
pub fn warp(logits: &mut [f32], params: &SamplingParams) {
    let neg = f32::NEG_INFINITY;
    if params.temperature > 0.0 && params.temperature != 1.0 {
        let t = params.temperature as f32;
        logits.iter_mut().for_each(|x| *x /= t);
    }
    if params.top_k > 0 && params.top_k < logits.len() {
        let mut sorted: Vec<f32> = logits.to_vec();
        let k = params.top_k;
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let threshold = sorted[k - 1];
        logits.iter_mut().filter(|x| **x < threshold).for_each(|x| *x = neg);
    }
    if params.top_p < 1.0 {
        // Ascending sort; drop the low tail whose cumulative probability is <= 1 - top_p,
        // always keeping the most likely token.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
        let probs = softmax(logits);
        let mut cum = 0f32;
        let last = order.len() - 1;
        let mut remove = Vec::new();
        for (rank, &i) in order.iter().enumerate() {
            cum += probs[i];
            if cum <= (1.0 - params.top_p) as f32 && rank != last {
                remove.push(i);
            }
        }
        for i in remove {
            logits[i] = neg;
        }
    }
    if params.min_p > 0.0 {
        let probs = softmax(logits);
        let top = probs.iter().copied().fold(0f32, f32::max);
        let threshold = params.min_p as f32 * top;
        let best = argmax(logits) as usize;
        for (i, p) in probs.iter().enumerate() {
            if *p < threshold && i != best {
                logits[i] = neg;
            }
        }
    }
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Picks the next token from raw `logits` (f32 `[V]`), given the sequence so far `seen`.
pub fn choose_token(logits: &[f32], seen: &[u32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    let mut scores = logits.to_vec();
    apply_repetition_penalty(&mut scores, seen, params.repetition_penalty);
    if params.is_greedy() {
        return argmax(&scores);
    }
    warp(&mut scores, params);
    let probs = softmax(&scores);
    let u = rng.next_f64() as f32;
    let mut cum = 0f32;
    let mut last_ok = argmax(&scores);
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last_ok = i as u32;
            if u < cum {
                return i as u32;
            }
        }
    }
    last_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.5, 2.9, -2.0, 0.0]
    }

    fn sample_many(params: &SamplingParams, n: usize) -> Vec<u32> {
        let mut rng = Rng::new(params.seed);
        (0..n).map(|_| choose_token(&logits(), &[], params, &mut rng)).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        assert_eq!(choose_token(&logits(), &[], &SamplingParams::default(), &mut Rng::new(0)), 1);
    }

    #[test]
    fn same_seed_same_samples_other_seed_other_samples() {
        let p = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        assert_eq!(sample_many(&p, 200), sample_many(&p, 200));
        let q = SamplingParams { seed: 43, ..p.clone() };
        assert_ne!(sample_many(&p, 200), sample_many(&q, 200));
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let p = SamplingParams { temperature: 1.5, top_k: 1, seed: 7, ..Default::default() };
        assert!(sample_many(&p, 300).iter().all(|&t| t == 1));
    }

    #[test]
    fn top_k_limits_the_support() {
        let p = SamplingParams { temperature: 5.0, top_k: 3, seed: 1, ..Default::default() };
        let s = sample_many(&p, 2000);
        assert!(s.iter().all(|t| [1, 2, 5].contains(t)), "{s:?}");
        let unlimited = SamplingParams { top_k: 0, ..p };
        assert!(sample_many(&unlimited, 2000).iter().any(|t| ![1, 2, 5].contains(t)));
    }

    #[test]
    fn top_p_limits_the_support() {
        // probs at T=1: token 1 ~0.34, 5 ~0.31, 2 ~0.21, ... top_p 0.5 keeps {1, 5}.
        let p = SamplingParams { temperature: 1.0, top_p: 0.5, seed: 3, ..Default::default() };
        let s = sample_many(&p, 2000);
        assert!(s.iter().all(|t| [1, 5].contains(t)), "{s:?}");
        assert!(s.contains(&5) && s.contains(&1));
        let off = SamplingParams { top_p: 1.0, ..p };
        assert!(sample_many(&off, 2000).iter().any(|t| ![1, 5].contains(t)));
    }

    #[test]
    fn min_p_limits_the_support() {
        // min_p 0.6 of p(1)=0.34 -> threshold ~0.2: keeps 1, 5, 2.
        let p = SamplingParams { temperature: 1.0, min_p: 0.6, seed: 5, ..Default::default() };
        let s = sample_many(&p, 2000);
        assert!(s.iter().all(|t| [1, 2, 5].contains(t)), "{s:?}");
        let off = SamplingParams { min_p: 0.0, ..p };
        assert!(sample_many(&off, 2000).iter().any(|t| ![1, 2, 5].contains(t)));
    }

    #[test]
    fn temperature_sharpens() {
        let count = |t: f64| {
            let p = SamplingParams { temperature: t, seed: 9, ..Default::default() };
            sample_many(&p, 3000).iter().filter(|&&x| x == 1).count()
        };
        assert!(count(0.2) > count(1.0) + 500, "{} vs {}", count(0.2), count(1.0));
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let p = SamplingParams { repetition_penalty: 1.5, ..Default::default() };
        // 3.0 / 1.5 = 2.0 < 2.9: token 5 wins once token 1 was seen.
        assert_eq!(choose_token(&logits(), &[1], &p, &mut Rng::new(0)), 5);
        assert_eq!(choose_token(&logits(), &[1], &SamplingParams::default(), &mut Rng::new(0)), 1);
        let mut l = vec![-2.0f32, 2.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![-4.0, 1.0]);
    }

    #[test]
    fn log_softmax_and_top_k() {
        let lp = log_softmax(&logits());
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let top = top_k_of(&lp, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 5, 2]);
    }
}
