//! Chat templates: turning a conversation into the prompt string the model expects, exactly as
//! transformers' `processor.apply_chat_template(conversation, add_generation_prompt=True,
//! tokenize=False)` renders it (reference-spec §4).
//!
//! Templates are Jinja, rendered with `minijinja` configured the way transformers configures
//! jinja2 (`_compile_jinja_template`): `trim_blocks`, `lstrip_blocks`, no trailing newline kept,
//! loop controls (`break` / `continue`), Python string/dict methods (`.upper()`, `.strip()`,
//! `.items()`, ...), a `tojson` filter that writes what Python's `json.dumps` writes, and the
//! globals `raise_exception(message)` and `strftime_now(format)`. transformers' `{% generation %}`
//! / `{% endgeneration %}` tags only mark assistant text for a token mask; they are rewritten to a
//! no-op block (keeping their whitespace control) before parsing.
//!
//! The template sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and
//! `tools` / `documents` set to none. When the checkpoint has no template, the built-in
//! [`DEFAULT_CHAT_TEMPLATE`] (Video-LLaVA's, reconstructed) is rendered by the same engine.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The built-in template, used when a checkpoint ships none.
///
/// The hub's `LanguageBind/Video-LLaVA-7B-hf` `chat_template.json` (669 bytes) could not be read
/// here; this is transformers' `chat_vicuna` template (from
/// `convert_llava_next_video_weights_to_hf.py`) with the `<video>` loop the llava-hf video
/// checkpoints add. Saved as `chat_template.json` with `json.dumps(indent=2)` it is exactly 669
/// bytes (670 with the newline transformers' `save_pretrained` appends), and it renders `USER: <video>\nWhy is this video funny? ASSISTANT:`, as transformers'
/// LLaVA-NeXT-Video tests expect of that family. Per message: the role in upper case plus `": "`
/// (a system message writes its first text item instead), then `<image>\n` per image, `<video>\n`
/// per video, then every text item followed by a space; `add_generation_prompt` appends
/// `ASSISTANT:`. Nothing (no `</s>`) is written between turns.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}\
{% if message['role'] == 'system' %}\
{{ message['content'][0]['text'] }}\
{% else %}\
{{ message['role'].upper() + ': '}}\
{% endif %}\
{# Render all images first #}\
{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}\
{{ '<image>\n' }}\
{% endfor %}\
{# Render all video then #}\
{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}\
{{ '<video>\n' }}\
{% endfor %}\
{# Render all text next #}\
{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}\
{{ content['text'] + ' '}}\
{% endfor %}\
{% endfor %}\
{% if add_generation_prompt %}\
{{ 'ASSISTANT:' }}\
{% endif %}";

/// One item of a message's content. Serialises as transformers expects:
/// `{"type": "text", "text": ...}`, `{"type": "image"}`, `{"type": "video"}`.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    Text(String),
    Image,
    Video,
}

impl Serialize for ContentPart {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ContentPart::Text(text) => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("type", "text")?;
                map.serialize_entry("text", text)?;
                map.end()
            }
            ContentPart::Image => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("type", "image")?;
                map.end()
            }
            ContentPart::Video => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("type", "video")?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for ContentPart {
    /// Reads `{"type": "text", "text": ...}`, `{"type": "image", ...}` or `{"type": "video", ...}`;
    /// other keys (`url`, `path`, ...) are ignored.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(rename = "type")]
            kind: String,
            text: Option<String>,
        }
        let raw = Raw::deserialize(deserializer)?;
        match raw.kind.as_str() {
            "text" => raw.text.map(ContentPart::Text).ok_or_else(|| de::Error::missing_field("text")),
            "image" => Ok(ContentPart::Image),
            "video" => Ok(ContentPart::Video),
            other => Err(de::Error::unknown_variant(other, &["text", "image", "video"])),
        }
    }
}

/// One turn of a conversation: `{"role": ..., "content": [parts]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: Vec<ContentPart>) -> Self {
        ChatMessage { role: role.into(), content }
    }

    /// A user turn: `images` image parts, then `videos` video parts, then `text`.
    pub fn user(text: impl Into<String>, images: usize, videos: usize) -> Self {
        let mut content = Vec::with_capacity(images + videos + 1);
        content.extend(std::iter::repeat_n(ContentPart::Image, images));
        content.extend(std::iter::repeat_n(ContentPart::Video, videos));
        content.push(ContentPart::Text(text.into()));
        ChatMessage::new("user", content)
    }

    /// An assistant turn holding one text part.
    pub fn assistant(text: impl Into<String>) -> Self {
        ChatMessage::new("assistant", vec![ContentPart::Text(text.into())])
    }

    /// A system turn holding one text part.
    pub fn system(text: impl Into<String>) -> Self {
        ChatMessage::new("system", vec![ContentPart::Text(text.into())])
    }
}

/// Renders `messages` with the checkpoint's Jinja `template` (transformers semantics), or with
/// [`DEFAULT_CHAT_TEMPLATE`] when the checkpoint has none.
pub fn apply_chat_template(
    template: Option<&str>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let messages = Value::from(minijinja::value::Serde(messages));
    render(template.unwrap_or(DEFAULT_CHAT_TEMPLATE), messages, add_generation_prompt, bos_token, eos_token)
}

/// Like [`apply_chat_template`], for a conversation given as JSON text in transformers' own form
/// (a list of `{"role", "content"}` objects, where `content` may be a plain string or a list of
/// parts, and messages or parts may carry extra keys). Object key order is kept, as Python keeps it.
pub fn apply_chat_template_json(
    template: Option<&str>,
    messages_json: &str,
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut de = serde_json::Deserializer::from_str(messages_json);
    let messages = OrderedValue::deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| Error::Input(format!("chat messages: invalid JSON: {e}")))?
        .0;
    if messages.kind() != ValueKind::Seq {
        return Err(Error::Input(format!("chat messages: expected a JSON list of messages, got {}", messages.kind())));
    }
    render(template.unwrap_or(DEFAULT_CHAT_TEMPLATE), messages, add_generation_prompt, bos_token, eos_token)
}

/// The single-question prompt the CLI uses: one user turn holding `images` images, then `videos`
/// videos, then `question`, with the generation prompt. With the built-in template this is
/// `USER: <video>\n{question} ASSISTANT:` (one `<image>\n` per image, one `<video>\n` per video,
/// images first).
pub fn question_prompt(
    template: Option<&str>,
    question: &str,
    images: usize,
    videos: usize,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let message = ChatMessage::user(question, images, videos);
    apply_chat_template(template, std::slice::from_ref(&message), true, bos_token, eos_token)
}

/// Marks an error raised by the template's own `raise_exception(...)`.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

fn render(
    template: &str,
    messages: Value,
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let source = strip_generation_tags(template);
    let env = environment()?;
    let compiled = env.template_from_named_str("chat_template", &source).map_err(template_error)?;
    let ctx = Value::from_pairs([
        ("messages", messages),
        ("add_generation_prompt", Value::from(add_generation_prompt)),
        ("bos_token", Value::from(bos_token)),
        ("eos_token", Value::from(eos_token)),
        ("tools", Value::from(())),
        ("documents", Value::from(())),
    ]);
    compiled.render(ctx).map_err(template_error)
}

fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .map_err(|e| Error::Input(format!("chat template: {e}")))?;
    env.set_syntax(syntax);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    // jinja2 prints `str(value)`: True / None / [1, 'a'] / {'k': 2.0}, not minijinja's forms.
    env.set_formatter(|out, _state, value| {
        let text = py_str(value);
        out.write_str(&text).map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write output"))
    });
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", |message: Value| -> std::result::Result<Value, minijinja::Error> {
        let message = match message.as_str() {
            Some(s) => s.to_string(),
            None => message.to_string(),
        };
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedByTemplate(message)))
    });
    env.add_function("strftime_now", |format: &str| strftime_now(format));
    Ok(env)
}

fn template_error(e: minijinja::Error) -> Error {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cur {
        if let Some(raised) = err.downcast_ref::<RaisedByTemplate>() {
            return Error::Input(format!("chat template raised an exception: {raised}"));
        }
        cur = err.source();
    }
    let mut msg = format!("chat template: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    Error::Input(msg.replace('\n', " "))
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags (which minijinja does
/// not know) to `{% if true %}` / `{% endif %}`, keeping their `-` / `+` whitespace control, so
/// `trim_blocks` / `lstrip_blocks` treat them as jinja2 treats the originals.
fn strip_generation_tags(source: &str) -> std::borrow::Cow<'_, str> {
    if !source.contains("generation") {
        return std::borrow::Cow::Borrowed(source);
    }
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut last = 0;
    let mut i = 0;
    while let Some(off) = source[i..].find("{%") {
        let start = i + off;
        let mut j = start + 2;
        let left = match bytes.get(j) {
            Some(b'-') | Some(b'+') => {
                j += 1;
                &source[j - 1..j]
            }
            _ => "",
        };
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        let word_start = j;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
            j += 1;
        }
        let word = &source[word_start..j];
        let replacement = match word {
            "generation" => "if true",
            "endgeneration" => "endif",
            _ => {
                i = start + 2;
                continue;
            }
        };
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        let right = match bytes.get(j) {
            Some(b'-') | Some(b'+') => {
                j += 1;
                &source[j - 1..j]
            }
            _ => "",
        };
        if !source[j..].starts_with("%}") {
            i = start + 2;
            continue;
        }
        j += 2;
        out.push_str(&source[last..start]);
        let _ = write!(out, "{{%{left} {replacement} {right}%}}");
        last = j;
        i = j;
    }
    out.push_str(&source[last..]);
    std::borrow::Cow::Owned(out)
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, positional arguments in that order. No HTML escaping.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let mut opts = [Value::from(false), Value::from(()), Value::from(()), Value::from(false)];
    if args.len() > opts.len() {
        return Err(minijinja::Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments"));
    }
    for (slot, arg) in opts.iter_mut().zip(args.iter()) {
        *slot = arg.clone();
    }
    for (k, name) in ["ensure_ascii", "indent", "separators", "sort_keys"].iter().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            opts[k] = v;
        }
    }
    kwargs.assert_all_used()?;
    let ensure_ascii = opts[0].is_true();
    let indent: Option<String> = match opts[1].kind() {
        ValueKind::None | ValueKind::Undefined => None,
        ValueKind::String => Some(opts[1].as_str().unwrap_or("").to_string()),
        ValueKind::Number => Some(" ".repeat(opts[1].as_i64().unwrap_or(0).max(0) as usize)),
        _ => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or str")),
    };
    let (item_sep, key_sep) = match opts[2].kind() {
        ValueKind::None | ValueKind::Undefined => {
            (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string())
        }
        _ => {
            let a = opts[2].get_item_by_index(0)?;
            let b = opts[2].get_item_by_index(1)?;
            (a.as_str().unwrap_or(",").to_string(), b.as_str().unwrap_or(":").to_string())
        }
    };
    let dumper = PyJson { ensure_ascii, indent, item_sep, key_sep, sort_keys: opts[3].is_true() };
    let mut out = String::new();
    dumper.write(&mut out, value, 0)?;
    Ok(out)
}

struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, depth: usize) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&py_number(v)),
            ValueKind::String => self.write_str(out, v.as_str().unwrap_or("")),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    let key = match key.kind() {
                        ValueKind::String => key.as_str().unwrap_or("").to_string(),
                        ValueKind::None => "null".to_string(),
                        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
                        ValueKind::Number => py_number(&key),
                        other => {
                            return Err(minijinja::Error::new(
                                ErrorKind::InvalidOperation,
                                format!("tojson: keys must be str, int, float, bool or None, not {other}"),
                            ))
                        }
                    };
                    entries.push((key, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (n, (key, item)) in entries.iter().enumerate() {
                    if n > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: object of kind {other} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `str(value)`, which jinja2 prints for `{{ value }}`.
fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => v.as_str().unwrap_or("").to_string(),
        _ => py_repr(v),
    }
}

/// Python's `repr(value)` for the values a template can hold.
fn py_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => py_number(v),
        ValueKind::String => py_str_repr(v.as_str().unwrap_or("")),
        ValueKind::Seq | ValueKind::Iterable => match v.try_iter() {
            Ok(items) => format!("[{}]", items.map(|i| py_repr(&i)).collect::<Vec<_>>().join(", ")),
            Err(_) => v.to_string(),
        },
        ValueKind::Map => match v.try_iter() {
            Ok(keys) => {
                let entries: Vec<String> = keys
                    .map(|k| {
                        let item = v.get_item(&k).unwrap_or_default();
                        format!("{}: {}", py_repr(&k), py_repr(&item))
                    })
                    .collect();
                format!("{{{}}}", entries.join(", "))
            }
            Err(_) => v.to_string(),
        },
        _ => v.to_string(),
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`.
fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A number as Python's `json.dumps` writes it (`repr` for floats).
fn py_number(v: &Value) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    let f = match f64::try_from(v.clone()) {
        Ok(f) => f,
        Err(_) => return v.to_string(),
    };
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Shortest round-trip digits, laid out as Python's repr does: scientific when the decimal
    // exponent is < -4 or >= 16.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    }
}

/// `strftime_now(format)`: the current time formatted with Python `strftime` codes. transformers
/// uses local time; this uses UTC (the usual local time of servers and containers).
fn strftime_now(format: &str) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(format, secs)
}

fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(code) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match code {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'B' => write!(out, "{}", MONTHS[(month - 1) as usize]),
            'b' | 'h' => write!(out, "{}", &MONTHS[(month - 1) as usize][..3]),
            'A' => write!(out, "{}", DAYS[weekday]),
            'a' => write!(out, "{}", &DAYS[weekday][..3]),
            'w' => write!(out, "{}", (weekday + 1) % 7),
            'u' => write!(out, "{}", weekday + 1),
            'j' => write!(out, "{yday:03}"),
            'f' => write!(out, "000000"),
            'z' => write!(out, "+0000"),
            'Z' => write!(out, "UTC"),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            'D' => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'R' => write!(out, "{hour:02}:{minute:02}"),
            'n' => writeln!(out),
            't' => write!(out, "\t"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// A minijinja value deserialised from JSON with object keys kept in document order.
struct OrderedValue(Value);

impl<'de> Deserialize<'de> for OrderedValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(OrderedValueVisitor)
    }
}

struct OrderedValueVisitor;

impl<'de> Visitor<'de> for OrderedValueVisitor {
    type Value = OrderedValue;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<OrderedValue, E> {
        Ok(OrderedValue(Value::from(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<OrderedValue, E> {
        Ok(OrderedValue(Value::from(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<OrderedValue, E> {
        Ok(OrderedValue(Value::from(v)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<OrderedValue, E> {
        Ok(OrderedValue(Value::from(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<OrderedValue, E> {
        Ok(OrderedValue(Value::from(v)))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<OrderedValue, E> {
        Ok(OrderedValue(Value::from(v)))
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<OrderedValue, E> {
        Ok(OrderedValue(Value::from(())))
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<OrderedValue, E> {
        Ok(OrderedValue(Value::from(())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<OrderedValue, A::Error> {
        let mut items = Vec::new();
        while let Some(OrderedValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(OrderedValue(Value::from(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<OrderedValue, A::Error> {
        let mut entries: Vec<(String, Value)> = Vec::new();
        while let Some((k, OrderedValue(v))) = map.next_entry::<String, OrderedValue>()? {
            // Python keeps the last value of a repeated key at the first key's place.
            if let Some(slot) = entries.iter_mut().find(|(key, _)| *key == k) {
                slot.1 = v;
            } else {
                entries.push((k, v));
            }
        }
        Ok(OrderedValue(Value::from_pairs(entries)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_are_rewritten_keeping_whitespace_control() {
        assert_eq!(
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{%+generation%}"),
            "a{% if true %}b{%- endif -%}c{%+ if true %}"
        );
        assert_eq!(strip_generation_tags("{% if generation %}x{% endif %}"), "{% if generation %}x{% endif %}");
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (2.5, "2.5"),
            (1e16, "1e+16"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456.789, "123456.789"),
        ] {
            assert_eq!(py_number(&Value::from(f)), s);
        }
    }

    #[test]
    fn strftime_known_date() {
        // 2024-02-29T13:05:09Z, a Thursday.
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %I%p %%", 1_709_211_909),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 01PM %"
        );
    }
}
