//! Answer a question about a video, printing the answer as it streams:
//! `cargo run --release --example ask_video -- <MODEL_DIR|HUB_ID> <VIDEO> "Why is this video funny?"`.
use std::io::Write;
use std::path::Path;

use videollava::media::video::{decode_video_file, VideoOptions};
use videollava::{Engine, GenerateOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, video, question] = &args[..] else { return Err("usage: ask_video <MODEL> <VIDEO> <QUESTION>".into()) };
    let engine = Engine::builder(model.as_str()).load()?;
    let prompt = engine.question_prompt(question, 0, 1)?;
    let video = decode_video_file(Path::new(video), &VideoOptions::default())?;
    let options = GenerateOptions { max_new_tokens: 100, ..engine.default_options() };
    engine.generate(&[&prompt], &[], &[video], &options, &mut |token| {
        print!("{}", token.text_delta);
        let _ = std::io::stdout().flush();
    })?;
    println!();
    Ok(())
}
