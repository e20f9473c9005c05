//! A prompt as a user writes it -> the prompt the model reads.
//!
//! The model card and the transformers docs write prompts already in the chat format
//! (`USER: <video>\nWhy is this video funny? ASSISTANT:`), while a plain question ("Why is this
//! video funny?") needs wrapping. [`prompt_for`] tells them apart, so that the CLI (`generate`,
//! `chat`, `batch`), the Python binding and any other front end give the same answer as
//! transformers for both spellings: a text that already holds the template's user and assistant
//! turns is used verbatim; anything else is wrapped in one user turn.
//!
//! The turn markers are learnt from the checkpoint's own template ([`TurnMarkers::of_template`]),
//! not hard-coded, so a ChatML or `[INST]` template is recognised the same way.

use super::chat::{apply_chat_template, question_prompt, ChatMessage};
use crate::error::Result;

/// Stands in for the question when the template is probed; private-use characters that no
/// template writes itself.
const PROBE: &str = "\u{E000}probe\u{E001}";

/// The text that opens a user turn and the text that opens the assistant's answer, as the
/// template writes them (`USER:` and `ASSISTANT:` for Video-LLaVA's template;
/// `<|im_start|>user` and `<|im_start|>assistant` for ChatML; `[INST]` and `[/INST]` for Llama 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnMarkers {
    pub user: String,
    pub assistant: String,
}

impl TurnMarkers {
    /// Renders one user turn holding a probe question with the generation prompt, and takes the
    /// last word before the question (the user marker, after the BOS token and any system text)
    /// and the last word after it (the assistant marker). `None` when the template cannot be
    /// rendered or places no word on either side of the question: then every prompt is wrapped.
    pub fn of_template(template: Option<&str>, bos_token: &str, eos_token: &str) -> Option<Self> {
        let probe = ChatMessage::user(PROBE, 0, 0);
        let rendered = apply_chat_template(template, std::slice::from_ref(&probe), true, bos_token, eos_token).ok()?;
        let at = rendered.find(PROBE)?;
        let before = &rendered[..at];
        let before = if bos_token.is_empty() { before } else { before.rsplit(bos_token).next().unwrap_or(before) };
        let user = before.split_whitespace().next_back()?.to_string();
        let assistant = rendered[at + PROBE.len()..].split_whitespace().next_back()?.to_string();
        Some(Self { user, assistant })
    }

    /// Whether `text` already holds a user turn followed by an assistant turn.
    pub fn matches(&self, text: &str) -> bool {
        text.find(&self.user).is_some_and(|i| text[i + self.user.len()..].contains(&self.assistant))
    }
}

/// The prompt for `text`: verbatim when it already holds the template's turns (see
/// [`TurnMarkers::matches`]), otherwise [`question_prompt`] with `images` `<image>` and `videos`
/// `<video>` placeholders. A verbatim prompt must carry its own placeholders.
pub fn prompt_for(
    template: Option<&str>,
    text: &str,
    images: usize,
    videos: usize,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    if is_chat_formatted(template, text, bos_token, eos_token) {
        return Ok(text.to_string());
    }
    question_prompt(template, text, images, videos, bos_token, eos_token)
}

/// Whether `text` is already in the chat format of `template` (the built-in one when `None`).
pub fn is_chat_formatted(template: Option<&str>, text: &str, bos_token: &str, eos_token: &str) -> bool {
    TurnMarkers::of_template(template, bos_token, eos_token).is_some_and(|m| m.matches(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for p in m.content %}\
        {% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}\
        {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    const INST: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] \
        {% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %} [/INST]\
        {% else %}{{ m.content[0].text }}{{ eos_token }}{% endif %}{% endfor %}";
    const SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
        {% for m in messages %}{{ m.role.upper() }}: {% for p in m.content %}{% if p.type == 'text' %}\
        {{ p.text }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";

    #[test]
    fn markers_are_learnt_from_the_template() {
        let m = |t| TurnMarkers::of_template(t, "<s>", "</s>").unwrap();
        let pair = |u: &str, a: &str| TurnMarkers { user: u.into(), assistant: a.into() };
        assert_eq!(m(None), pair("USER:", "ASSISTANT:"));
        assert_eq!(m(Some(CHATML)), pair("<|im_start|>user", "<|im_start|>assistant"));
        assert_eq!(m(Some(INST)), pair("[INST]", "[/INST]"));
        assert_eq!(m(Some(SYSTEM)), pair("USER:", "ASSISTANT:"));
        // The question first, or nothing after it: no markers, every prompt is wrapped.
        assert_eq!(TurnMarkers::of_template(Some("{{ messages[0].content[0].text }}"), "<s>", "</s>"), None);
    }

    #[test]
    fn the_docs_prompt_is_verbatim_and_a_question_is_wrapped() {
        let docs = "USER: <video>\nWhy is this video funny? ASSISTANT:";
        assert_eq!(prompt_for(None, docs, 0, 1, "<s>", "</s>").unwrap(), docs);
        assert_eq!(prompt_for(None, "Why is this video funny?", 0, 1, "<s>", "</s>").unwrap(), docs);
        // Multi-turn and BOS-led prompts are formatted too.
        for text in [
            "USER: <image>\nWhat is this? ASSISTANT: A car.</s>USER: <video>\nAnd this? ASSISTANT:",
            "<s>USER: Hi ASSISTANT:",
            "  USER: <video>\nWhy? ASSISTANT: Because",
        ] {
            assert!(is_chat_formatted(None, text, "<s>", "</s>"), "{text:?}");
        }
        // Mentions of one marker only, or in the wrong order, are questions.
        for text in [
            "What does USER: mean in a log?",
            "Who is the ASSISTANT: here?",
            "ASSISTANT: then USER: in that order?",
            "<video>\nWhy is this video funny?",
            "user: <video>\nlower case is not the template's ASSISTANT",
        ] {
            assert!(!is_chat_formatted(None, text, "<s>", "</s>"), "{text:?}");
        }
        assert_eq!(prompt_for(None, "<video>\nWhy?", 0, 0, "<s>", "</s>").unwrap(), "USER: <video>\nWhy? ASSISTANT:");
    }

    #[test]
    fn other_templates_use_their_own_markers() {
        let chatml = "<|im_start|>user\n<video>\nWhy?<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(prompt_for(Some(CHATML), chatml, 0, 1, "<s>", "</s>").unwrap(), chatml);
        // The Video-LLaVA spelling is a plain question under ChatML.
        let docs = "USER: <video>\nWhy? ASSISTANT:";
        assert!(!is_chat_formatted(Some(CHATML), docs, "<s>", "</s>"));
        assert!(is_chat_formatted(Some(INST), "<s>[INST] <video>\nWhy? [/INST]", "<s>", "</s>"));
    }
}
