//! Describe an image in a few lines of the library:
//! `cargo run --release --example describe_image -- <MODEL_DIR|HUB_ID> <IMAGE>`.
use std::path::Path;

use videollava::media::image::decode_image_file;
use videollava::Engine;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image] = &args[..] else { return Err("usage: describe_image <MODEL> <IMAGE>".into()) };
    let engine = Engine::builder(model.as_str()).load()?;
    let prompt = engine.question_prompt("Describe this image.", 1, 0)?;
    let image = decode_image_file(Path::new(image))?;
    let (answers, _timings) = engine.generate(&[&prompt], &[image], &[], &engine.default_options(), &mut |_| {})?;
    println!("{}", answers[0].text);
    Ok(())
}
