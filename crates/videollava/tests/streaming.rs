//! Streaming text: deltas never split a UTF-8 character spelled by byte-fallback tokens, hold back
//! possible stop strings, and concatenate to the final text.

use crate::common::fixtures_dir;
use videollava::generate::stream::TextStream;
use videollava::processor::tokenizer::TextTokenizer;

fn stream_all(tok: &TextTokenizer, ids: &[u32], stops: &[&str]) -> (Vec<String>, String, bool) {
    let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
    let mut deltas = Vec::new();
    for n in 1..=ids.len() {
        let (d, stopped) = s.push(tok, &ids[..n]).unwrap();
        deltas.push(d);
        if stopped {
            return (deltas, s.text().to_string(), true);
        }
    }
    deltas.push(s.finish(tok, ids).unwrap());
    (deltas, s.text().to_string(), false)
}

#[test]
fn byte_fallback_characters_arrive_whole() {
    let tok = TextTokenizer::from_dir(&fixtures_dir().join("checkpoints/tiny-llama")).unwrap();
    let text = "Emoji 🎉🍿 then 日本語 and ünïcödé, ok";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.iter().filter(|&&t| tok.is_byte_token(t)).count() >= 8, "the text must use byte-fallback tokens");
    let (deltas, final_text, stopped) = stream_all(&tok, &ids, &[]);
    assert!(!stopped);
    assert_eq!(final_text, tok.decode(&ids, true).unwrap());
    assert_eq!(deltas.concat(), final_text);
    for d in &deltas {
        assert!(!d.contains('\u{FFFD}'), "delta {d:?} splits a character");
    }
}

#[test]
fn stop_strings_cut_the_text_and_are_never_streamed() {
    let tok = TextTokenizer::from_dir(&fixtures_dir().join("checkpoints/tiny-llama")).unwrap();
    let ids = tok.encode("The rabbit is running. USER: next question", false).unwrap();
    let (deltas, final_text, stopped) = stream_all(&tok, &ids, &["USER:"]);
    assert!(stopped);
    assert_eq!(final_text, "The rabbit is running. ");
    assert_eq!(deltas.concat(), final_text);
    assert!(!deltas.concat().contains("USER"));
}
