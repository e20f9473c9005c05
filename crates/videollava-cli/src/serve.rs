//! `videollava serve`: the OpenAI-compatible HTTP server (see the `videollava-server` crate).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use videollava::engine::{Scheduler, SchedulerConfig};
use videollava_server::{Limits, ServerConfig};

use crate::common::{KvBudgetArgs, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    kv_budget: KvBudgetArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Requests may name local media files under this directory (refused otherwise).
    #[arg(long, value_name = "DIR")]
    allowed_media_dir: Option<PathBuf>,
    /// Allow media URLs on loopback, private and link-local addresses.
    #[arg(long)]
    allow_private_media_urls: bool,
    /// Most requests decoded together (continuous batching).
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_batch_size: usize,
    /// Most requests waiting; more get HTTP 429.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_queue: usize,
    /// Model name clients send (default: the checkpoint's name or hub id).
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    max_body_mib: usize,
    /// Largest media item (image or video) in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    max_media_mib: u64,
    /// Time limit of one request, in seconds.
    #[arg(long, default_value_t = 600, value_name = "S")]
    request_timeout: u64,
    /// Do not serve the web page at `/` (the API stays).
    #[arg(long)]
    no_web_ui: bool,
}

pub fn run(args: ServeArgs) -> Result<()> {
    videollava_server::init_logging();
    let engine = args.model.load()?;
    // The weights' pages mapped in while the server starts and waits, not by the first request.
    let model = engine.model().clone();
    std::thread::spawn(move || {
        let t = std::time::Instant::now();
        model.prefault_weights();
        log::debug!("decode weights mapped in: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    });
    let is_hub_id = !std::path::Path::new(&args.model.model).exists();
    let kv_budget_bytes = args.kv_budget.bytes(&engine, &args.model);
    let config = SchedulerConfig { max_batch_size: args.max_batch_size, max_queue: args.max_queue, kv_budget_bytes };
    let scheduler = Scheduler::start(engine, config);
    let config = ServerConfig {
        host: args.host,
        port: args.port,
        allowed_media_dir: args.allowed_media_dir,
        allow_private_media_urls: args.allow_private_media_urls,
        limits: Limits {
            max_body_bytes: args.max_body_mib << 20,
            max_media_bytes: args.max_media_mib << 20,
            request_timeout: Duration::from_secs(args.request_timeout),
            ..Limits::default()
        },
        served_model_name: args.served_model_name.or_else(|| is_hub_id.then(|| args.model.model.clone())),
        model_aliases: vec![args.model.model.clone()],
        web_ui: !args.no_web_ui,
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(videollava_server::serve(config, scheduler))
}
