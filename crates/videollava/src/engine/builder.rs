//! Loading a checkpoint with the options a caller chooses: [`EngineBuilder`].

use std::path::PathBuf;

use candle_core::Device;

use super::{DTypeChoice, Engine};
use crate::error::{Error, Result};
use crate::hub::{resolve_model, HubOptions};
use crate::model::video_llava::DEFAULT_PREFILL_CHUNK;
use crate::model::{KvCacheFormat, QuantCache, QuantFormat};

/// Options for loading an [`Engine`]; start from [`Engine::builder`].
///
/// ```no_run
/// use videollava::{DTypeChoice, Engine, QuantFormat};
/// let engine = Engine::builder("LanguageBind/Video-LLaVA-7B-hf")
///     .dtype(DTypeChoice::BF16)
///     .quantize(Some(QuantFormat::Q4K))
///     .threads(4)
///     .load()?;
/// # Ok::<(), videollava::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    model: String,
    dtype: DTypeChoice,
    quantize: Option<QuantFormat>,
    quant_cache: QuantCache,
    mmap: bool,
    threads: Option<usize>,
    feature_cache_bytes: usize,
    kv_cache: KvCacheFormat,
    prefill_chunk: usize,
    hub: Option<HubOptions>,
    device: Device,
}

impl EngineBuilder {
    /// `model`: a checkpoint directory, or a Hugging Face hub id (`org/name[@revision]`).
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            dtype: DTypeChoice::Auto,
            quantize: None,
            quant_cache: QuantCache::Default,
            mmap: true,
            threads: None,
            feature_cache_bytes: 256 << 20,
            kv_cache: KvCacheFormat::Model,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            hub: None,
            device: Device::Cpu,
        }
    }

    /// Compute dtype (default: the checkpoint's).
    pub fn dtype(mut self, dtype: DTypeChoice) -> Self {
        self.dtype = dtype;
        self
    }

    /// 8-bit or 4-bit weights for the language model's linear layers (default: none).
    pub fn quantize(mut self, format: Option<QuantFormat>) -> Self {
        self.quantize = format;
        self
    }

    /// Where quantized weights are saved and read back (default: the user cache directory).
    pub fn quantized_cache(mut self, cache: QuantCache) -> Self {
        self.quant_cache = cache;
        self
    }

    /// Read BF16 weights in place from the memory-mapped files (default) or copy them.
    pub fn mmap(mut self, mmap: bool) -> Self {
        self.mmap = mmap;
        self
    }

    /// CPU threads of the kernels (default: all cores). Takes effect for the whole process and
    /// only before the first computation.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads.max(1));
        self
    }

    /// Bytes of projected visual features kept by pixel content (default 256 MiB; 0: off).
    pub fn feature_cache_bytes(mut self, bytes: usize) -> Self {
        self.feature_cache_bytes = bytes;
        self
    }

    /// How the decoder keeps keys and values (default: the compute dtype).
    pub fn kv_cache(mut self, format: KvCacheFormat) -> Self {
        self.kv_cache = format;
        self
    }

    /// Prompt positions run through the decoder at a time (default 512; 0: all at once).
    pub fn prefill_chunk(mut self, positions: usize) -> Self {
        self.prefill_chunk = positions;
        self
    }

    /// How hub ids are resolved (default: from the environment, `HF_HOME` etc.).
    pub fn hub_options(mut self, hub: HubOptions) -> Self {
        self.hub = Some(hub);
        self
    }

    /// The device tensors live on (default: the CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The checkpoint directory `model` names (downloading a hub id if needed).
    pub fn resolve(&self) -> Result<PathBuf> {
        let hub = self.hub.clone().unwrap_or_else(HubOptions::from_env);
        resolve_model(&self.model, &hub)
    }

    /// Resolves and loads the checkpoint.
    pub fn load(self) -> Result<Engine> {
        if let Some(n) = self.threads {
            // candle's CPU kernels read the variable before their first use; ours run on rayon's
            // global pool, which can be sized once per process.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        }
        let dir = self.resolve()?;
        if !dir.is_dir() {
            return Err(Error::Input(format!("{}: not a checkpoint directory", dir.display())));
        }
        let mut engine =
            Engine::load_quantized(&dir, self.dtype, self.quantize, self.quant_cache, self.mmap, &self.device)?;
        engine.model().set_feature_cache_capacity(self.feature_cache_bytes);
        engine.model_mut().set_kv_cache_format(self.kv_cache);
        engine.model_mut().set_prefill_chunk(self.prefill_chunk);
        Ok(engine)
    }
}
