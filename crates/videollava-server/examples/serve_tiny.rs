//! Serves a checkpoint directory (default: the tiny test checkpoint) without the CLI:
//! `cargo run -p videollava-server --example serve_tiny -- [MODEL_DIR] [PORT]`.

use std::path::PathBuf;

use videollava::engine::{DTypeChoice, Engine, Scheduler, SchedulerConfig};
use videollava_server::{serve, ServerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../videollava/tests/fixtures/checkpoints/model-llama")
    });
    let port = args.next().and_then(|p| p.parse().ok()).unwrap_or(8000);
    let engine = Engine::load(&dir, DTypeChoice::F32, &candle_core::Device::Cpu)?;
    let scheduler = Scheduler::start(engine, SchedulerConfig::default());
    serve(ServerConfig { port, ..ServerConfig::default() }, scheduler).await
}
