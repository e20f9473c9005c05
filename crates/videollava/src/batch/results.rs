//! The results file of a batch run: JSON Lines, one object per row, each holding `id`.
//!
//! Every result is written with one `write` of the whole line, straight to the file (no user-space
//! buffer), so a process killed at any moment leaves every finished row on disk and at most one
//! partial last line. Opening the file again for a rerun cuts that partial line off (its row runs
//! again) and returns the ids already present, which the rerun skips.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// An open results file, positioned at its end.
pub struct ResultsFile {
    path: PathBuf,
    file: File,
}

impl ResultsFile {
    /// Opens `path` for appending, creating it if needed. With `resume`, returns the ids already
    /// in it (after cutting off a partial last line); without, empties it first.
    pub fn open(path: &Path, resume: bool) -> Result<(Self, HashSet<String>)> {
        let io = |e| Error::io(path, e);
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(!resume).open(path).map_err(io)?;
        let mut done = HashSet::new();
        if resume {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(io)?;
            let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            if complete < bytes.len() {
                // The process was stopped while writing this line: drop it, its row runs again.
                file.set_len(complete as u64).map_err(io)?;
            }
            for (n, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let id = serde_json::from_slice::<Value>(line).ok().and_then(|v| match v.get("id") {
                    Some(Value::String(s)) => Some(s.clone()),
                    _ => None,
                });
                let id = id.ok_or_else(|| Error::Output {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {} is not a result row (a JSON object with a string `id`): is this the right file?",
                        n + 1
                    ),
                })?;
                done.insert(id);
            }
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok((Self { path: path.to_path_buf(), file }, done))
    }

    /// Appends one result (a JSON object holding `id`) as one line.
    pub fn append(&mut self, result: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(result)
            .map_err(|e| Error::Output { path: self.path.clone(), message: e.to_string() })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_skips_done_ids_and_cuts_a_partial_line() {
        let dir = std::env::temp_dir().join(format!("videollava-results-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.jsonl");
        let (mut f, done) = ResultsFile::open(&path, true).unwrap();
        assert!(done.is_empty());
        f.append(&json!({"id": "a", "text": "x"})).unwrap();
        f.append(&json!({"id": "b", "error": "bad"})).unwrap();
        drop(f);
        // A kill in the middle of a write leaves a partial line.
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(br#"{"id": "c", "te"#).unwrap();
        drop(raw);
        let (mut f, done) = ResultsFile::open(&path, true).unwrap();
        assert_eq!(done, ["a", "b"].iter().map(|s| s.to_string()).collect::<HashSet<String>>());
        f.append(&json!({"id": "c", "text": "z"})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.ends_with("\"id\":\"c\",\"text\":\"z\"}\n") || text.contains(r#""id":"c""#));
        // Without resume the file starts empty.
        let (_, done) = ResultsFile::open(&path, false).unwrap();
        assert!(done.is_empty());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        // Another kind of file is refused.
        std::fs::write(&path, "hello\n").unwrap();
        assert!(ResultsFile::open(&path, true).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
