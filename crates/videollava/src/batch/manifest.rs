//! The manifest of a batch run: one question per row, as JSON Lines or CSV.
//!
//! A row has `id` (a string or a number), `prompt`, optionally `image` and/or `video` (a path or
//! an http(s) URL; a JSON row may give a list), and optional generation options that override the
//! run's defaults: `max_new_tokens`, `temperature`, `top_k`, `top_p`, `min_p`,
//! `repetition_penalty`, `seed`, `stop` (a string or, in JSON, a list), `ignore_eos`,
//! `top_logprobs`, `num_frames`, `frame_sampling`, `raw_prompt`. A CSV file has a header line
//! naming these columns; an empty cell means absent.
//!
//! A row that cannot be used (not JSON, an unknown field, no prompt, a bad value) becomes a
//! [`BadRow`], reported in the results like a failed row, and never stops the run. A row without
//! an `id` is named `line-N` (N: its 1-based line in the file). Later rows that repeat an earlier
//! id are listed in [`Manifest::duplicates`] and not run.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::generate::GenerateOptions;
use crate::media::video::{FrameSampling, VideoOptions};

/// Most frames a row may ask for (each frame is decoded and goes through the vision tower).
pub const MAX_NUM_FRAMES: usize = 256;
/// Most images plus videos in one row.
pub const MAX_MEDIA_PER_ROW: usize = 16;

/// Per-row overrides of the run's generation and frame options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowOptions {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Vec<String>>,
    pub ignore_eos: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub num_frames: Option<usize>,
    pub frame_sampling: Option<FrameSampling>,
    /// Pass the prompt verbatim (its own `<image>` / `<video>` placeholders).
    pub raw_prompt: Option<bool>,
}

impl RowOptions {
    /// `base` with this row's overrides.
    pub fn generate_options(&self, base: &GenerateOptions) -> GenerateOptions {
        let mut o = base.clone();
        let s = &mut o.sampling;
        if let Some(v) = self.max_new_tokens {
            o.max_new_tokens = v;
        }
        if let Some(v) = self.temperature {
            s.temperature = v;
        }
        if let Some(v) = self.top_k {
            s.top_k = v;
        }
        if let Some(v) = self.top_p {
            s.top_p = v;
        }
        if let Some(v) = self.min_p {
            s.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            s.repetition_penalty = v;
        }
        if let Some(v) = self.seed {
            s.seed = v;
        }
        if let Some(v) = &self.stop {
            o.stop_strings = v.clone();
        }
        if let Some(v) = self.ignore_eos {
            o.ignore_eos = v;
        }
        if let Some(v) = self.top_logprobs {
            o.top_logprobs = v;
        }
        o
    }

    /// `base` with this row's frame options.
    pub fn video_options(&self, base: &VideoOptions) -> VideoOptions {
        VideoOptions {
            num_frames: self.num_frames.unwrap_or(base.num_frames),
            sampling: self.frame_sampling.unwrap_or(base.sampling),
        }
    }
}

/// One question of the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    /// 0-based position among the manifest's data rows.
    pub index: usize,
    pub prompt: String,
    /// Image paths or URLs, in placeholder order.
    pub images: Vec<String>,
    /// Video paths or URLs, in placeholder order.
    pub videos: Vec<String>,
    pub options: RowOptions,
}

/// A row that cannot be run; it is reported under `id` with `message`.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    pub id: String,
    pub index: usize,
    pub message: String,
}

/// A manifest read from a file.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    /// Data rows in file order, usable or not.
    pub rows: Vec<std::result::Result<Row, BadRow>>,
    /// `(id, index)` of rows that repeat an earlier id: not run.
    pub duplicates: Vec<(String, usize)>,
}

/// A string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A row as written; unknown fields are refused so that a misspelt option is not silently ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRow {
    /// Read from the object before (it names the row in errors); listed so it is not unknown.
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<Value>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    image: Option<OneOrMany>,
    #[serde(default)]
    video: Option<OneOrMany>,
    #[serde(default)]
    max_new_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    min_p: Option<f64>,
    #[serde(default)]
    repetition_penalty: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    num_frames: Option<usize>,
    #[serde(default)]
    frame_sampling: Option<String>,
    #[serde(default)]
    raw_prompt: Option<bool>,
}

/// Columns whose CSV cells are numbers or booleans (all others are text).
const NUMERIC: &[&str] = &[
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seed",
    "top_logprobs",
    "num_frames",
];
const BOOLEAN: &[&str] = &["ignore_eos", "raw_prompt"];

/// The default id of a row without one.
fn line_id(line: usize) -> String {
    format!("line-{line}")
}

/// Turns one parsed row object into a [`Row`]; `line` is its 1-based line in the file.
fn row_from_object(object: Map<String, Value>, index: usize, line: usize) -> std::result::Result<Row, BadRow> {
    // The id first, so that every later error is reported under it.
    let id = match object.get("id") {
        None | Some(Value::Null) => line_id(line),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(BadRow {
                id: line_id(line),
                index,
                message: format!("line {line}: `id` must be a non-empty string or a number, found {other}"),
            })
        }
    };
    let bad = |message: String| BadRow { id: id.clone(), index, message: format!("line {line}: {message}") };
    let raw: RawRow = serde_path_to_error::deserialize(Value::Object(object)).map_err(|e| {
        let field = e.path().to_string();
        if field == "." {
            bad(e.into_inner().to_string())
        } else {
            bad(format!("field `{field}`: {}", e.into_inner()))
        }
    })?;
    let prompt =
        raw.prompt.filter(|p| !p.trim().is_empty()).ok_or_else(|| bad("`prompt` is missing or empty".into()))?;
    let images = raw.image.map(OneOrMany::into_vec).unwrap_or_default();
    let videos = raw.video.map(OneOrMany::into_vec).unwrap_or_default();
    if images.len() + videos.len() > MAX_MEDIA_PER_ROW {
        return Err(bad(format!(
            "{} images and videos, more than the limit of {MAX_MEDIA_PER_ROW} per row",
            images.len() + videos.len()
        )));
    }
    if let Some(n) = raw.num_frames {
        if n == 0 || n > MAX_NUM_FRAMES {
            return Err(bad(format!("`num_frames` {n} is outside 1..={MAX_NUM_FRAMES}")));
        }
    }
    if raw.max_new_tokens == Some(0) {
        return Err(bad("`max_new_tokens` must be at least 1".into()));
    }
    let frame_sampling = match raw.frame_sampling {
        None => None,
        Some(s) => Some(s.parse::<FrameSampling>().map_err(|e| bad(format!("`frame_sampling`: {e}")))?),
    };
    Ok(Row {
        id,
        index,
        prompt,
        images,
        videos,
        options: RowOptions {
            max_new_tokens: raw.max_new_tokens,
            temperature: raw.temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
            min_p: raw.min_p,
            repetition_penalty: raw.repetition_penalty,
            seed: raw.seed,
            stop: raw.stop.map(OneOrMany::into_vec),
            ignore_eos: raw.ignore_eos,
            top_logprobs: raw.top_logprobs,
            num_frames: raw.num_frames,
            frame_sampling,
            raw_prompt: raw.raw_prompt,
        },
    })
}

/// Reads a manifest: CSV when the file name ends in `.csv`, JSON Lines otherwise.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let is_csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let rows = if is_csv {
        parse_csv(&text).map_err(|m| Error::Input(format!("{}: {m}", path.display())))?
    } else {
        parse_jsonl(&text)
    };
    let mut seen = HashSet::new();
    let mut manifest = Manifest::default();
    for row in rows {
        let (id, index) = match &row {
            Ok(r) => (r.id.clone(), r.index),
            Err(b) => (b.id.clone(), b.index),
        };
        if seen.insert(id.clone()) {
            manifest.rows.push(row);
        } else {
            manifest.duplicates.push((id, index));
        }
    }
    Ok(manifest)
}

/// JSON Lines: one object per non-blank line.
pub fn parse_jsonl(text: &str) -> Vec<std::result::Result<Row, BadRow>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let index = rows.len();
        let row = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => row_from_object(map, index, i + 1),
            Ok(other) => Err(BadRow {
                id: line_id(i + 1),
                index,
                message: format!("line {}: expected a JSON object, found {}", i + 1, short(&other.to_string())),
            }),
            Err(e) => {
                Err(BadRow { id: line_id(i + 1), index, message: format!("line {}: not valid JSON: {e}", i + 1) })
            }
        };
        rows.push(row);
    }
    rows
}

fn short(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s.to_string()
    }
}

/// CSV (RFC 4180: `,` separated, `"` quoted with `""` for a quote, quoted cells may hold
/// newlines) with a header line. Errors only when the header itself is unusable.
pub fn parse_csv(text: &str) -> std::result::Result<Vec<std::result::Result<Row, BadRow>>, String> {
    let records = csv_records(text);
    let mut it = records.into_iter();
    let Some((_, header)) = it.next() else { return Ok(Vec::new()) };
    let header: Vec<String> = header.iter().map(|h| h.trim().trim_start_matches('\u{feff}').to_string()).collect();
    if !header.iter().any(|h| h == "prompt") {
        return Err(format!("the CSV header {header:?} has no `prompt` column"));
    }
    let mut rows = Vec::new();
    for (line, cells) in it {
        if cells.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        let index = rows.len();
        if cells.len() > header.len() {
            rows.push(Err(BadRow {
                id: line_id(line),
                index,
                message: format!("line {line}: {} cells but the header has {} columns", cells.len(), header.len()),
            }));
            continue;
        }
        let mut map = Map::new();
        let mut error = None;
        for (name, cell) in header.iter().zip(cells) {
            if cell.is_empty() {
                continue;
            }
            let value = if NUMERIC.contains(&name.as_str()) {
                match serde_json::from_str::<Value>(cell.trim()) {
                    Ok(v @ Value::Number(_)) => v,
                    _ => {
                        error.get_or_insert(format!("column `{name}`: `{cell}` is not a number"));
                        continue;
                    }
                }
            } else if BOOLEAN.contains(&name.as_str()) {
                match cell.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => Value::Bool(true),
                    "false" | "0" | "no" => Value::Bool(false),
                    _ => {
                        error.get_or_insert(format!("column `{name}`: `{cell}` is not true or false"));
                        continue;
                    }
                }
            } else {
                Value::String(cell)
            };
            map.insert(name.clone(), value);
        }
        rows.push(match error {
            None => row_from_object(map, index, line),
            Some(message) => {
                let id = map.get("id").and_then(Value::as_str).map_or_else(|| line_id(line), str::to_string);
                Err(BadRow { id, index, message: format!("line {line}: {message}") })
            }
        });
    }
    Ok(rows)
}

/// Splits CSV text into records, each with the 1-based line it starts on.
fn csv_records(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut line = 1;
    let mut start = 1;
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => {
                if c == '\n' {
                    line += 1;
                }
                cell.push(c);
            }
            (false, '"') if cell.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut cell)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut cell));
                records.push((start, std::mem::take(&mut record)));
                line += 1;
                start = line;
                any = false;
            }
            (false, c) => cell.push(c),
        }
    }
    if any {
        record.push(cell);
        records.push((start, record));
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_rows_and_bad_rows() {
        let text = r#"{"id": "a", "prompt": "Why?", "video": "v.mp4", "max_new_tokens": 5, "stop": ["x", "y"]}
{"id": 7, "prompt": "What?", "image": ["a.png", "b.png"], "num_frames": 4, "frame_sampling": "linspace"}

not json
{"prompt": "no id"}
{"id": "b", "prompt": "typo", "max_tokens": 3}
{"id": "c"}
{"id": "d", "prompt": "many frames", "num_frames": 100000}
[1, 2]
{"id": ["x"], "prompt": "bad id"}
{"id": "e", "prompt": "q", "temperature": "hot"}
"#;
        let rows = parse_jsonl(text);
        assert_eq!(rows.len(), 10);
        let a = rows[0].as_ref().unwrap();
        assert_eq!((a.id.as_str(), a.index, a.videos.as_slice()), ("a", 0, &["v.mp4".to_string()][..]));
        assert_eq!(a.options.max_new_tokens, Some(5));
        assert_eq!(a.options.stop, Some(vec!["x".into(), "y".into()]));
        let b = rows[1].as_ref().unwrap();
        assert_eq!((b.id.as_str(), b.images.len(), b.options.num_frames), ("7", 2, Some(4)));
        assert_eq!(b.options.frame_sampling, Some(FrameSampling::Linspace));
        let err = |i: usize| rows[i].as_ref().unwrap_err().clone();
        assert_eq!(err(2).id, "line-4");
        assert!(err(2).message.contains("not valid JSON"), "{:?}", err(2));
        assert_eq!(rows[3].as_ref().unwrap().id, "line-5", "a row without id is named by its line");
        assert!(err(4).message.contains("max_tokens"), "{:?}", err(4));
        assert_eq!(err(4).id, "b");
        assert!(err(5).message.contains("`prompt` is missing"), "{:?}", err(5));
        assert!(err(6).message.contains("num_frames"), "{:?}", err(6));
        assert!(err(7).message.contains("expected a JSON object"), "{:?}", err(7));
        assert!(err(8).message.contains("`id`"), "{:?}", err(8));
        assert!(err(9).message.contains("temperature"), "{:?}", err(9));
    }

    #[test]
    fn a_row_without_id_is_named_by_its_line() {
        let rows = parse_jsonl("\n{\"prompt\": \"hi\"}\n");
        assert_eq!(rows[0].as_ref().unwrap().id, "line-2");
    }

    #[test]
    fn csv_rows_with_quotes_and_types() {
        let text = "id,prompt,video,max_new_tokens,ignore_eos,stop\r\n\
                    q1,\"Why, really?\",v.mp4,4,true,\n\
                    q2,\"He said \"\"hi\"\"\nthen left\",,,,END\n\
                    q3,x,,many,,\n";
        let rows = parse_csv(text).unwrap();
        assert_eq!(rows.len(), 3);
        let q1 = rows[0].as_ref().unwrap();
        assert_eq!(q1.prompt, "Why, really?");
        assert_eq!(q1.videos, vec!["v.mp4".to_string()]);
        assert_eq!(
            (q1.options.max_new_tokens, q1.options.ignore_eos, q1.options.stop.clone()),
            (Some(4), Some(true), None)
        );
        let q2 = rows[1].as_ref().unwrap();
        assert_eq!(q2.prompt, "He said \"hi\"\nthen left");
        assert_eq!(q2.options.stop, Some(vec!["END".to_string()]));
        let q3 = rows[2].as_ref().unwrap_err();
        assert_eq!(q3.id, "q3");
        assert!(q3.message.contains("line 5") && q3.message.contains("max_new_tokens"), "{q3:?}");
        assert!(parse_csv("id,question\n1,x\n").is_err(), "a header without prompt is refused");
    }

    #[test]
    fn options_override_the_defaults() {
        let rows = parse_jsonl(r#"{"id": 1, "prompt": "p", "temperature": 0.5, "seed": 9, "num_frames": 4}"#);
        let row = rows[0].as_ref().unwrap();
        let base = GenerateOptions { max_new_tokens: 7, ..Default::default() };
        let o = row.options.generate_options(&base);
        assert_eq!((o.max_new_tokens, o.sampling.temperature, o.sampling.seed), (7, 0.5, 9));
        let v = row.options.video_options(&VideoOptions::default());
        assert_eq!((v.num_frames, v.sampling), (4, FrameSampling::Uniform));
    }
}
