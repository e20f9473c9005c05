//! Cancelling a generation (an abandoned stream): once its [`Cancel`] is set, no further decode
//! step runs and the call fails with [`Error::Cancelled`].

use crate::common::fixtures_dir;
use candle_core::Device;
use videollava::engine::{DTypeChoice, Engine};
use videollava::generate::GenerateOptions;
use videollava::media::Cancel;
use videollava::Error;

const MAX_NEW: usize = 40;

/// Tokens seen by `on_token` when the flag is set at token `cancel_at` (never when `None`), and
/// the call's outcome.
fn run(engine: &Engine, cancel_at: Option<usize>) -> (usize, videollava::Result<usize>) {
    let prompt = engine.prompt_for("Tell me a joke about rabbits.", 0, 0).unwrap();
    let options = GenerateOptions { max_new_tokens: MAX_NEW, ignore_eos: true, ..engine.default_options() };
    let cancel = Cancel::new();
    if cancel_at == Some(0) {
        cancel.cancel();
    }
    let mut seen = 0;
    let out = engine.generate_cancellable(&[prompt.as_str()], &[], &[], &options, &cancel, &mut |_| {
        seen += 1;
        if cancel_at == Some(seen) {
            cancel.cancel();
        }
    });
    (seen, out.map(|(seqs, _)| seqs[0].token_ids.len()))
}

#[test]
fn a_cancelled_generation_stops_before_its_next_decode_step() {
    let engine =
        Engine::load(&fixtures_dir().join("checkpoints").join("model-llama"), DTypeChoice::F32, &Device::Cpu).unwrap();
    // Not cancelled: all the tokens asked for.
    let (seen, out) = run(&engine, None);
    assert_eq!((seen, out.unwrap()), (MAX_NEW, MAX_NEW));
    // Cancelled at the third token: nothing after it.
    let (seen, out) = run(&engine, Some(3));
    assert_eq!(seen, 3);
    assert!(matches!(out, Err(Error::Cancelled(_))), "{out:?}");
    // Cancelled before it starts: no prefill, no token.
    let (seen, out) = run(&engine, Some(0));
    assert_eq!(seen, 0);
    assert!(matches!(out, Err(Error::Cancelled(_))), "{out:?}");
}
