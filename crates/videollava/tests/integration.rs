//! Every integration test of the library in one test binary: one link of the library instead of
//! one per file keeps `cargo test` within CI's disk and time. Each module is one area, as data
//! flows: media decoding, processor parity, model parity, generation, scheduling, hub resolution.
//! Run one area with `cargo test -p videollava --test integration model_parity::`.

mod common;

mod chat_template;
mod checkpoint_5x;
mod fuzz;
mod generate_cancel;
mod generate_parity;
mod hub_cache;
mod image_decode;
mod image_processor_parity;
mod model_behaviour;
mod model_parity;
mod prefix_cache;
mod processor_parity;
mod scheduler;
mod streaming;
mod video_decode;
