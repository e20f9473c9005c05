//! The text tokenizer, loaded from a checkpoint's tokenizer files as transformers'
//! `LlamaTokenizerFast` (or any `PreTrainedTokenizerFast`) loads them.
//!
//! `tokenizer.json` is required. `tokenizer_config.json`, `special_tokens_map.json`,
//! `added_tokens.json` and `chat_template.json` / `chat_template.jinja` are read when present.
//! For Llama tokenizers transformers rebuilds the post-processor from `add_bos_token` /
//! `add_eos_token` at load time; we do the same so ids match.

use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::{read_json_object, Fields};
use crate::error::{Error, Result};

/// Which side padding goes on in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingSide {
    Left,
    Right,
}

/// A tokenizer with the special-token facts transformers keeps beside `tokenizer.json`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub padding_side: PaddingSide,
    pub clean_up_tokenization_spaces: bool,
    pub model_max_length: Option<usize>,
    /// The Jinja chat template, from `chat_template.jinja`, `chat_template.json` or
    /// `tokenizer_config.json` (in that order of precedence).
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("pad_token_id", &self.pad_token_id)
            .field("padding_side", &self.padding_side)
            .finish()
    }
}

/// A special token entry as `tokenizer_config.json` / `special_tokens_map.json` write it:
/// a plain string or an `AddedToken` object with `content`.
fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(m) => m.get("content").and_then(Value::as_str),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads the tokenizer files of checkpoint directory `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        if !json_path.exists() {
            let hint = if dir.join("tokenizer.model").exists() {
                " (only a SentencePiece tokenizer.model is present; convert it with transformers' \
                 `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`)"
            } else {
                ""
            };
            return Err(Error::io(
                &json_path,
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("tokenizer file not found{hint}")),
            ));
        }
        let mut inner = Tokenizer::from_file(&json_path)
            .map_err(|e| Error::config(&json_path, "", format!("cannot load tokenizer: {e}")))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() { read_json_object(&cfg_path)? } else { Map::new() };
        let map_path = dir.join("special_tokens_map.json");
        let special_map = if map_path.exists() { read_json_object(&map_path)? } else { Map::new() };
        let f = Fields::new(&cfg_path, "", &cfg);

        // Tokens listed in added_tokens.json / added_tokens_decoder that tokenizer.json lacks.
        let added_path = dir.join("added_tokens.json");
        let mut extra: Vec<(String, u32)> = Vec::new();
        if added_path.exists() {
            let added = read_json_object(&added_path)?;
            for (content, id) in &added {
                let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| {
                    Error::config(&added_path, content.as_str(), format!("expected a token id, found {id}"))
                })?;
                extra.push((content.clone(), id));
            }
        }
        if let Some(decoder) = f.opt_object("added_tokens_decoder")? {
            for (id, tok) in decoder {
                let Some(content) = token_content(tok) else {
                    return Err(Error::config(&cfg_path, format!("added_tokens_decoder.{id}"), "missing `content`"));
                };
                let id: u32 = id.parse().map_err(|_| {
                    Error::config(&cfg_path, format!("added_tokens_decoder.{id}"), "key is not a token id")
                })?;
                extra.push((content.to_string(), id));
            }
        }
        let mut to_add = Vec::new();
        for (content, id) in &extra {
            match inner.token_to_id(content) {
                Some(existing) if existing == *id => {}
                Some(existing) => {
                    return Err(Error::config(
                        &json_path,
                        content.as_str(),
                        format!("token has id {existing} here but {id} in the tokenizer config files"),
                    ))
                }
                None => {
                    if *id as usize != inner.get_vocab_size(true) + to_add.len() {
                        return Err(Error::config(
                            &added_path,
                            content.as_str(),
                            format!(
                                "added token id {id} does not follow the vocabulary of {} tokens",
                                inner.get_vocab_size(true)
                            ),
                        ));
                    }
                    to_add.push(AddedToken::from(content.clone(), true).normalized(false));
                }
            }
        }
        if !to_add.is_empty() {
            inner
                .add_special_tokens(to_add)
                .map_err(|e| Error::config(&json_path, "", format!("cannot add special tokens: {e}")))?;
        }

        // Special tokens: tokenizer_config.json first, special_tokens_map.json as fallback.
        let lookup = |key: &str| -> Result<Option<u32>> {
            let v = cfg.get(key).filter(|v| !v.is_null()).or_else(|| special_map.get(key).filter(|v| !v.is_null()));
            match v {
                None => Ok(None),
                Some(v) => {
                    let content = token_content(v)
                        .ok_or_else(|| Error::config(&cfg_path, key, format!("expected a token string, found {v}")))?;
                    inner.token_to_id(content).map(Some).ok_or_else(|| {
                        Error::config(
                            &cfg_path,
                            key,
                            format!("token `{content}` is not in the vocabulary of tokenizer.json"),
                        )
                    })
                }
            }
        };
        let bos_token_id = lookup("bos_token")?;
        let eos_token_id = lookup("eos_token")?;
        let pad_token_id = lookup("pad_token")?;
        let unk_token_id = lookup("unk_token")?;

        // transformers' LlamaTokenizerFast.update_post_processor(): BOS/EOS from the flags.
        let class = f.str_or("tokenizer_class", "")?;
        if class.starts_with("Llama") || class.starts_with("CodeLlama") {
            let add_bos = f.bool_or("add_bos_token", true)?;
            let add_eos = f.bool_or("add_eos_token", false)?;
            let mut specials = Vec::new();
            let mut single = String::new();
            let mut pair_tail = String::new();
            let name = |id: Option<u32>, what: &str| -> Result<(String, u32)> {
                let id = id.ok_or_else(|| {
                    Error::config(&cfg_path, what, format!("add_{what} is set but no {what} is defined"))
                })?;
                Ok((inner.id_to_token(id).unwrap_or_default(), id))
            };
            if add_bos {
                let (bos, id) = name(bos_token_id, "bos_token")?;
                single.push_str(&format!("{bos}:0 "));
                pair_tail.push_str(&format!(" {bos}:1"));
                specials.push((bos, id));
            }
            single.push_str("$A:0");
            pair_tail.push_str(" $B:1");
            if add_eos {
                let (eos, id) = name(eos_token_id, "eos_token")?;
                single.push_str(&format!(" {eos}:0"));
                pair_tail.push_str(&format!(" {eos}:1"));
                specials.push((eos, id));
            }
            let pair = format!("{single}{pair_tail}");
            let template = TemplateProcessing::builder()
                .try_single(single.as_str())
                .and_then(|b| b.try_pair(pair.as_str()))
                .map_err(|e| Error::Tokenizer(format!("post-processor template: {e}")))?
                .special_tokens(specials)
                .build()
                .map_err(|e| Error::Tokenizer(format!("post-processor template: {e}")))?;
            inner.with_post_processor(Some(template));
        }

        let padding_side = match f.str_or("padding_side", "right")? {
            "left" => PaddingSide::Left,
            "right" => PaddingSide::Right,
            other => {
                return Err(Error::config(&cfg_path, "padding_side", format!("`{other}` is neither left nor right")))
            }
        };
        // transformers writes 1e30 (VERY_LARGE_INTEGER) when there is no limit.
        let model_max_length = match cfg.get("model_max_length").and_then(Value::as_f64) {
            Some(v) if v > 0.0 && v < 1e15 => Some(v as usize),
            _ => None,
        };

        let mut chat_template = match f.opt_str("chat_template") {
            Ok(t) => t.map(str::to_string),
            // A list of named templates: take "default".
            Err(_) => cfg.get("chat_template").and_then(Value::as_array).and_then(|list| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string)
            }),
        };
        let ct_json = dir.join("chat_template.json");
        if ct_json.exists() {
            let m = read_json_object(&ct_json)?;
            chat_template = Some(
                Fields::new(&ct_json, "", &m)
                    .opt_str("chat_template")?
                    .map(str::to_string)
                    .ok_or_else(|| Error::config(&ct_json, "chat_template", "missing"))?,
            );
        }
        let ct_jinja = dir.join("chat_template.jinja");
        if ct_jinja.exists() {
            chat_template = Some(std::fs::read_to_string(&ct_jinja).map_err(|e| Error::io(&ct_jinja, e))?);
        }

        Ok(Self {
            inner,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            unk_token_id,
            padding_side,
            clean_up_tokenization_spaces: f.bool_or("clean_up_tokenization_spaces", false)?,
            model_max_length,
            chat_template,
        })
    }

    /// The id of `token` if it is in the vocabulary (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of special token `id` (`<s>`, `</s>`), or "" when there is none: what chat
    /// templates receive as `bos_token` / `eos_token`.
    pub fn token_name(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.inner.id_to_token(i)).unwrap_or_default()
    }

    /// Whether `id` is a byte-fallback token such as `<0x0A>`.
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, with the special tokens (BOS) the tokenizer adds.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, as transformers' `decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(if self.clean_up_tokenization_spaces { clean_up_tokenization(&text) } else { text })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_matches_transformers_rules() {
        assert_eq!(
            clean_up_tokenization("Hello , world . I do n't know ! Is it ?"),
            "Hello, world. I don't know! Is it?"
        );
        assert_eq!(clean_up_tokenization("it 's they 're I 've I 'm"), "it's they're I've I'm");
    }
}
