//! `videollava chat`: an interactive session that keeps the KV cache between turns.
//!
//! Each turn feeds the model only the new text (and the media attached to it): the conversation
//! is rendered with the chat template, and the part after what the cache already holds is
//! tokenized without BOS and prefilled on top of the cache.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use videollava::engine::Engine;
use videollava::generate::{generate_continuing, GenerateOptions, SamplingParams};
use videollava::media::image::decode_image_file;
use videollava::media::video::decode_video_file;
use videollava::media::{RgbImage, Video};
use videollava::model::llama::KvCache;
use videollava::processor::chat::{ChatMessage, ContentPart};

use crate::common::{MediaArgs, ModelArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Media attached to the first question (more with /image and /video).
    #[command(flatten)]
    media: MediaArgs,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512, value_name = "N")]
    max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    temperature: f64,
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    top_p: f64,
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// After each answer, print to stderr how many tokens were prefilled and how many came from the cache.
    #[arg(long)]
    stats: bool,
}

struct Session {
    history: Vec<ChatMessage>,
    /// The rendered text the cache corresponds to.
    rendered: String,
    cache: KvCache,
    /// A chosen token not yet in the cache (the last one of the previous answer).
    pending: Option<u32>,
    images: Vec<RgbImage>,
    videos: Vec<Video>,
    /// Turns are fed as the user typed them (a line in the chat format was given).
    verbatim: bool,
}

impl Session {
    fn new() -> Self {
        Self {
            history: Vec::new(),
            rendered: String::new(),
            cache: KvCache::default(),
            pending: None,
            images: Vec::new(),
            videos: Vec::new(),
            verbatim: false,
        }
    }
}

fn render(engine: &Engine, messages: &[ChatMessage], generation_prompt: bool) -> Result<String> {
    let tok = engine.tokenizer();
    let name = |id: Option<u32>| tok.token_name(id);
    Ok(videollava::processor::chat::apply_chat_template(
        tok.chat_template.as_deref(),
        messages,
        generation_prompt,
        &name(tok.bos_token_id),
        &name(tok.eos_token_id),
    )?)
}

/// Runs one user turn; streams the answer to `out`.
/// Token counts of one turn.
struct TurnStats {
    cached: usize,
    prefilled: usize,
    generated: usize,
}

fn turn(
    engine: &Engine,
    s: &mut Session,
    question: &str,
    options: &GenerateOptions,
    out: &mut dyn Write,
) -> Result<TurnStats> {
    let first = s.cache.is_empty();
    // A line already in the chat format (`USER: <video>\nWhy? ASSISTANT:`) is fed verbatim; from
    // then on each turn is fed on its own (a plain question as one rendered user turn), since the
    // history can no longer be rendered as messages.
    s.verbatim = s.verbatim || engine.is_chat_formatted(question);
    let new_text = if s.verbatim {
        engine.prompt_for(question, s.images.len(), s.videos.len())?
    } else {
        let mut content: Vec<ContentPart> = Vec::new();
        content.extend(std::iter::repeat_n(ContentPart::Image, s.images.len()));
        content.extend(std::iter::repeat_n(ContentPart::Video, s.videos.len()));
        content.push(ContentPart::Text(question.to_string()));
        s.history.push(ChatMessage { role: "user".into(), content });
        let full = render(engine, &s.history, true)?;
        if first {
            full
        } else {
            full.strip_prefix(s.rendered.as_str())
                .map(str::to_string)
                .context("the chat template does not extend the previous turns; use /reset")?
        }
    };
    let (images, videos) = (std::mem::take(&mut s.images), std::mem::take(&mut s.videos));
    let mut inputs = if first {
        engine.processor().process(&[new_text.as_str()], &images, &videos)?
    } else {
        engine.processor().process_continuation(&[new_text.as_str()], &images, &videos)?
    };
    if let Some(tok) = s.pending.take() {
        let eos = engine.default_options().eos_token_ids;
        if !eos.contains(&tok) {
            inputs.input_ids.insert(0, tok as i64);
            inputs.attention_mask.insert(0, 1);
            inputs.seq_len += 1;
        }
    }
    let cached = s.cache.len();
    let prefilled = inputs.seq_len;
    let (results, _) =
        generate_continuing(&engine.model(), engine.tokenizer(), &inputs, options, &mut s.cache, &mut |ev| {
            let _ = out.write_all(ev.text_delta.as_bytes());
            let _ = out.flush();
        })?;
    writeln!(out)?;
    let answer = &results[0];
    s.pending = answer.token_ids.last().copied();
    if !s.verbatim {
        s.history.push(ChatMessage { role: "assistant".into(), content: vec![ContentPart::Text(answer.text.clone())] });
        s.rendered = render(engine, &s.history, false)?;
    }
    Ok(TurnStats { cached, prefilled, generated: answer.token_ids.len() })
}

fn attach(s: &mut Session, kind: &str, path: &str, args: &MediaArgs, frames: Option<usize>) -> Result<String> {
    let p = Path::new(path.trim());
    if kind == "image" {
        s.images.push(decode_image_file(p)?);
    } else {
        s.videos.push(decode_video_file(p, &args.video_options(frames))?);
    }
    Ok(format!("attached {kind} {} to the next question", p.display()))
}

pub fn run(args: ChatArgs) -> Result<()> {
    let engine = args.model.load()?;
    let mut options = engine.default_options();
    options.max_new_tokens = args.max_new_tokens;
    options.sampling =
        SamplingParams { temperature: args.temperature, top_p: args.top_p, seed: args.seed, ..Default::default() };
    let mut s = Session::new();
    let (images, videos, _) = args.media.load(engine.processor().num_frames)?;
    s.images = images;
    s.videos = videos;

    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    if interactive {
        eprintln!("videollava chat: /image PATH, /video PATH attach media to the next question; /reset; /quit");
    }
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let result = if line == "/quit" || line == "/exit" {
            break;
        } else if line == "/reset" {
            s = Session::new();
            Ok("conversation reset".to_string())
        } else if let Some(p) = line.strip_prefix("/image ") {
            attach(&mut s, "image", p, &args.media, engine.processor().num_frames)
        } else if let Some(p) = line.strip_prefix("/video ") {
            attach(&mut s, "video", p, &args.media, engine.processor().num_frames)
        } else if line.starts_with('/') {
            Ok(format!("unknown command {line} (use /image PATH, /video PATH, /reset, /quit)"))
        } else {
            turn(&engine, &mut s, line, &options, &mut out).map(|t| {
                if args.stats {
                    format!(
                        "[turn: {} tokens prefilled after {} cached, {} generated]",
                        t.prefilled, t.cached, t.generated
                    )
                } else {
                    String::new()
                }
            })
        };
        match result {
            Ok(msg) if !msg.is_empty() => eprintln!("{msg}"),
            Ok(_) => {}
            // A bad turn (unreadable file, too long) is reported; the session goes on.
            Err(e) => {
                eprintln!("error: {e:#}");
                if s.history.last().is_some_and(|m| m.role == "user") {
                    s.history.pop();
                }
            }
        }
    }
    Ok(())
}
