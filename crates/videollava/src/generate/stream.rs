//! Incremental detokenization for streaming.
//!
//! Each step decodes all generated ids (skipping special tokens) and releases only text that is
//! final: never part of a run of byte-fallback tokens (`<0xNN>`, decoded together as one UTF-8
//! sequence, so earlier bytes can change meaning when more arrive), and never text that could be
//! the start of a stop string. The concatenated
//! deltas equal the final text.

use crate::error::Result;
use crate::processor::tokenizer::TextTokenizer;

#[derive(Debug, Clone)]
pub struct TextStream {
    stop_strings: Vec<String>,
    /// Text released so far.
    released: String,
}

impl TextStream {
    pub fn new(stop_strings: Vec<String>) -> Self {
        Self { stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(), released: String::new() }
    }

    /// The text released so far (the final text once the sequence ended).
    pub fn text(&self) -> &str {
        &self.released
    }

    /// Position of the earliest stop string in `text`, if any.
    fn find_stop(&self, text: &str) -> Option<usize> {
        self.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// Length of the longest suffix of `text` that is a proper prefix of a stop string.
    fn held_back(&self, text: &str) -> usize {
        let mut best = 0;
        for s in &self.stop_strings {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && text.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }

    fn release_up_to(&mut self, full: &str, end: usize) -> String {
        if end >= self.released.len() && full.is_char_boundary(end) && full[..end].starts_with(self.released.as_str()) {
            let delta = full[self.released.len()..end].to_string();
            self.released = full[..end].to_string();
            delta
        } else {
            String::new()
        }
    }

    /// After a new token: returns the newly final text and whether a stop string was hit.
    pub fn push(&mut self, tokenizer: &TextTokenizer, generated: &[u32]) -> Result<(String, bool)> {
        let full = tokenizer.decode(generated, true)?;
        if let Some(pos) = self.find_stop(&full) {
            return Ok((self.release_up_to(&full, pos), true));
        }
        // A run of byte-fallback tokens is decoded as one UTF-8 sequence: its text is only final
        // once a regular token closes the run.
        if full.ends_with('\u{FFFD}') || generated.last().is_some_and(|&t| tokenizer.is_byte_token(t)) {
            return Ok((String::new(), false));
        }
        let end = full.len() - self.held_back(&full);
        Ok((self.release_up_to(&full, end), false))
    }

    /// At the end of the sequence: releases everything left (cut before a stop string).
    pub fn finish(&mut self, tokenizer: &TextTokenizer, generated: &[u32]) -> Result<String> {
        let full = tokenizer.decode(generated, true)?;
        let end = self.find_stop(&full).unwrap_or(full.len());
        let delta = self.release_up_to(&full, end);
        if self.released != full[..end] {
            // The decoded text changed under us (should not happen); the final text wins.
            self.released = full[..end].to_string();
        }
        Ok(delta)
    }
}
