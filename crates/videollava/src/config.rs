//! The checkpoint's JSON files, read as transformers writes them.
//!
//! `config.json` nests sparse `text_config` / `vision_config` objects that hold only the values that
//! differ from the class defaults; every omitted field is filled here with the default of
//! transformers' `CLIPVisionConfig`, `LlamaConfig` or `MistralConfig` (reference-spec §1). Both the
//! 4.x spelling (`rope_theta`, `rope_scaling`, `torch_dtype`) and the 5.x one (`rope_parameters`,
//! `dtype`) are accepted. Every error names the file and the dotted field path.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

mod preprocessor;
pub use preprocessor::{ImageProcessorConfig, SizeDict, VideoProcessorConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};

/// Reads a JSON object from `path`, with errors that name the file.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| Error::config(path, "", format!("not valid JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(Error::config(path, "", format!("expected a JSON object, found {}", kind(&other)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Typed, path-aware access to one JSON object of a config file.
pub(crate) struct Fields<'a> {
    file: &'a Path,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(file: &'a Path, prefix: &str, map: &'a Map<String, Value>) -> Self {
        Self { file, prefix: prefix.to_string(), map }
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(self.file, self.path(key), message)
    }

    /// The value, treating an explicit `null` as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        self.opt_usize(key).map(|v| v.unwrap_or(default))
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, found {v}"))),
        }
    }

    pub(crate) fn positive_or(&self, key: &str, default: usize) -> Result<usize> {
        let v = self.usize_or(key, default)?;
        if v == 0 {
            return Err(self.err(key, "must be greater than 0"));
        }
        Ok(v)
    }

    pub(crate) fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| self.err(key, format!("expected an integer, found {v}"))),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        self.opt_str(key).map(|v| v.unwrap_or(default))
    }

    /// A token id field that may be an integer or a list of integers (`eos_token_id`).
    pub(crate) fn token_ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let bad = |v: &Value| self.err(key, format!("expected a token id or a list of token ids, found {v}"));
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(i)))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).map(|n| Some(vec![n])).ok_or_else(|| bad(v)),
        }
    }

    pub(crate) fn opt_object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(key, format!("expected an object, found {}", kind(v)))),
        }
    }

    pub(crate) fn child(&self, key: &str, map: &'a Map<String, Value>) -> Fields<'a> {
        Fields { file: self.file, prefix: self.path(key), map }
    }
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

/// Which visual tokens the image path keeps (`vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelectStrategy {
    /// Drop the CLS token: (H/p)(W/p) tokens per image.
    Default,
    /// Keep the CLS token: (H/p)(W/p) + 1 tokens per image.
    Full,
}

impl FeatureSelectStrategy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "default" => Some(Self::Default),
            "full" => Some(Self::Full),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Full => "full",
        }
    }
}

/// `CLIPVisionConfig`, with transformers' defaults for omitted fields.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    /// The ViT-L/14 tower `VideoLlavaConfig` builds when `vision_config` is absent altogether.
    pub fn video_llava_default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 768,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }

    /// Reads a (sparse) `vision_config` object; omitted fields take `CLIPVisionConfig` defaults.
    fn from_fields(f: &Fields) -> Result<Self> {
        if let Some(t) = f.opt_str("model_type")? {
            if t != "clip_vision_model" {
                return Err(f.err("model_type", format!("unsupported vision tower `{t}` (expected clip_vision_model)")));
            }
        }
        let cfg = Self {
            hidden_size: f.positive_or("hidden_size", 768)?,
            intermediate_size: f.positive_or("intermediate_size", 3072)?,
            projection_dim: f.usize_or("projection_dim", 512)?,
            num_hidden_layers: f.positive_or("num_hidden_layers", 12)?,
            num_attention_heads: f.positive_or("num_attention_heads", 12)?,
            num_channels: f.positive_or("num_channels", 3)?,
            image_size: f.positive_or("image_size", 224)?,
            patch_size: f.positive_or("patch_size", 32)?,
            hidden_act: f.str_or("hidden_act", "quick_gelu")?.to_string(),
            layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
        };
        if cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(f.err(
                "num_attention_heads",
                format!("hidden_size {} is not divisible by {} heads", cfg.hidden_size, cfg.num_attention_heads),
            ));
        }
        if cfg.patch_size > cfg.image_size {
            return Err(f.err("patch_size", format!("{} is larger than image_size {}", cfg.patch_size, cfg.image_size)));
        }
        if !matches!(cfg.hidden_act.as_str(), "quick_gelu" | "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu") {
            return Err(f.err("hidden_act", format!("unsupported activation `{}`", cfg.hidden_act)));
        }
        if cfg.num_channels != 3 {
            return Err(f.err("num_channels", format!("{} channels: only RGB (3) is supported", cfg.num_channels)));
        }
        Ok(cfg)
    }

    /// Patches per side of the square input.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// The decoder family of `text_config.model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextModelType {
    Llama,
    Mistral,
}

/// RoPE frequency scaling (`rope_scaling` in 4.x, `rope_parameters` in 5.x).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3 frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// NTK-aware base scaling ("dynamic" in transformers).
    Dynamic { factor: f64 },
}

/// The language model's config (`LlamaConfig` / `MistralConfig` with their defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub model_type: TextModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Mistral's sliding attention window (None for Llama, or when the config sets null).
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl TextConfig {
    /// `LlamaConfig()`: what `VideoLlavaConfig` builds when `text_config` is absent.
    pub fn llama_default() -> Self {
        let map = Map::new();
        Self::from_fields(&Fields::new(Path::new("config.json"), "text_config", &map)).expect("the defaults are valid")
    }

    fn from_fields(f: &Fields) -> Result<Self> {
        let model_type = match f.str_or("model_type", "llama")? {
            "llama" => TextModelType::Llama,
            "mistral" => TextModelType::Mistral,
            other => {
                return Err(
                    f.err("model_type", format!("unsupported language model `{other}` (supported: llama, mistral)"))
                )
            }
        };
        let mistral = model_type == TextModelType::Mistral;
        let hidden_size = f.positive_or("hidden_size", 4096)?;
        let num_attention_heads = f.positive_or("num_attention_heads", 32)?;
        let num_key_value_heads =
            f.positive_or("num_key_value_heads", if mistral { 8 } else { num_attention_heads })?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) if d > 0 => d,
            Some(_) => return Err(f.err("head_dim", "must be greater than 0")),
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(f.err(
                        "num_attention_heads",
                        format!("hidden_size {hidden_size} is not divisible by {num_attention_heads} heads"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!(
                    "{num_attention_heads} attention heads are not a multiple of {num_key_value_heads} key/value heads"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(f.err("head_dim", format!("{head_dim} is odd: rotary embeddings need an even head size")));
        }
        let hidden_act = f.str_or("hidden_act", "silu")?.to_string();
        if !matches!(hidden_act.as_str(), "silu" | "swish" | "gelu" | "gelu_pytorch_tanh" | "relu") {
            return Err(f.err("hidden_act", format!("unsupported activation `{hidden_act}`")));
        }

        // RoPE: 4.x writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`.
        let (rope_theta, rope_scaling) = match f.opt_object("rope_parameters")? {
            Some(params) => {
                let p = f.child("rope_parameters", params);
                (p.f64_or("rope_theta", f.f64_or("rope_theta", 10000.0)?)?, parse_rope_scaling(&p)?)
            }
            None => {
                let theta = f.f64_or("rope_theta", 10000.0)?;
                let scaling = match f.opt_object("rope_scaling")? {
                    Some(s) => parse_rope_scaling(&f.child("rope_scaling", s))?,
                    None => RopeScaling::None,
                };
                (theta, scaling)
            }
        };
        if rope_theta <= 0.0 {
            return Err(f.err("rope_theta", "must be positive"));
        }

        let sliding_window = if mistral {
            if f.map.contains_key("sliding_window") {
                f.opt_usize("sliding_window")?
            } else {
                Some(4096)
            }
        } else {
            None
        };

        Ok(Self {
            model_type,
            vocab_size: f.positive_or("vocab_size", 32000)?,
            hidden_size,
            intermediate_size: f.positive_or("intermediate_size", if mistral { 14336 } else { 11008 })?,
            num_hidden_layers: f.positive_or("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            max_position_embeddings: f
                .positive_or("max_position_embeddings", if mistral { 4096 * 32 } else { 2048 })?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            attention_bias: f.bool_or("attention_bias", false)?,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            sliding_window,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            bos_token_id: f.token_ids("bos_token_id")?.map(|v| v.first().copied()).unwrap_or(Some(1)),
            eos_token_ids: f.token_ids("eos_token_id")?.unwrap_or_else(|| vec![2]),
            pad_token_id: f.token_ids("pad_token_id")?.and_then(|v| v.first().copied()),
        })
    }
}

fn parse_rope_scaling(f: &Fields) -> Result<RopeScaling> {
    let ty = match f.opt_str("rope_type")? {
        Some(t) => t,
        None => f.str_or("type", "default")?,
    };
    let factor = || -> Result<f64> {
        let v = f.f64_or("factor", f64::NAN)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(f.err("factor", "a positive scaling factor is required"));
        }
        Ok(v)
    };
    Ok(match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: f.f64_or("low_freq_factor", 1.0)?,
            high_freq_factor: f.f64_or("high_freq_factor", 4.0)?,
            original_max_position_embeddings: f.positive_or("original_max_position_embeddings", 8192)?,
        },
        other => {
            return Err(f.err(
                "rope_type",
                format!("unsupported RoPE scaling `{other}` (supported: default, linear, dynamic, llama3)"),
            ))
        }
    })
}

/// `vision_feature_layer`: one hidden-state index or several concatenated along the feature axis.
/// Negative indices count from the end of the `num_hidden_layers + 1` hidden states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureLayers(pub Vec<i64>);

impl FeatureLayers {
    /// The indices resolved against `num_layers + 1` hidden states (0 = after `pre_layrnorm`).
    pub fn resolved(&self, num_layers: usize) -> Vec<usize> {
        let n = num_layers as i64 + 1;
        self.0.iter().map(|&i| if i < 0 { (n + i) as usize } else { i as usize }).collect()
    }
}

/// `VideoLlavaConfig`: the whole `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoLlavaConfig {
    pub vision_config: VisionConfig,
    pub text_config: TextConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub projector_hidden_act: String,
    pub vision_feature_select_strategy: FeatureSelectStrategy,
    pub vision_feature_layer: FeatureLayers,
    pub multimodal_projector_bias: bool,
    pub image_seq_length: usize,
    pub video_seq_length: usize,
    pub ignore_index: i64,
    /// Top-level `pad_token_id` (32002 on the hub checkpoint).
    pub pad_token_id: Option<u32>,
    /// The dtype the weights were saved in (`torch_dtype` in 4.x, `dtype` in 5.x), if stated.
    pub dtype: Option<String>,
}

impl VideoLlavaConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let map = read_json_object(path)?;
        Self::from_map(path, &map)
    }

    /// Parses an already-read `config.json` object; `path` is only used in errors.
    pub fn from_map(path: &Path, map: &Map<String, Value>) -> Result<Self> {
        let f = Fields::new(path, "", map);
        if let Some(t) = f.opt_str("model_type")? {
            if t != "video_llava" {
                return Err(
                    f.err("model_type", format!("`{t}` is not a Video-LLaVA checkpoint (expected video_llava)"))
                );
            }
        }
        let vision_config = match f.opt_object("vision_config")? {
            Some(m) => VisionConfig::from_fields(&f.child("vision_config", m))?,
            None => VisionConfig::video_llava_default(),
        };
        let text_config = match f.opt_object("text_config")? {
            Some(m) => TextConfig::from_fields(&f.child("text_config", m))?,
            None => TextConfig::llama_default(),
        };
        let id = |keys: &[&str], default: u32| -> Result<u32> {
            for k in keys {
                if let Some(v) = f.opt_usize(k)? {
                    return u32::try_from(v).map_err(|_| f.err(k, "token id out of range"));
                }
            }
            Ok(default)
        };
        let image_token_id = id(&["image_token_index", "image_token_id"], 32000)?;
        let video_token_id = id(&["video_token_index", "video_token_id"], 32001)?;
        if image_token_id == video_token_id {
            return Err(f.err("video_token_index", format!("equals image_token_index ({image_token_id})")));
        }
        let strategy_name = f.str_or("vision_feature_select_strategy", "default")?;
        let vision_feature_select_strategy = FeatureSelectStrategy::parse(strategy_name).ok_or_else(|| {
            f.err(
                "vision_feature_select_strategy",
                format!("unexpected select feature strategy `{strategy_name}` (expected default or full)"),
            )
        })?;

        let layers = match f.get("vision_feature_layer") {
            None => vec![-2],
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| f.err("vision_feature_layer", format!("expected integers, found {v}")))
                })
                .collect::<Result<Vec<_>>>()?,
            Some(v) => vec![v
                .as_i64()
                .ok_or_else(|| f.err("vision_feature_layer", format!("expected an integer or a list, found {v}")))?],
        };
        let n_states = vision_config.num_hidden_layers as i64 + 1;
        for &l in &layers {
            if l >= n_states || l < -n_states {
                return Err(f.err(
                    "vision_feature_layer",
                    format!("layer {l} is out of range for a tower with {n_states} hidden states"),
                ));
            }
        }

        let projector_hidden_act = f.str_or("projector_hidden_act", "gelu")?.to_string();
        if !matches!(
            projector_hidden_act.as_str(),
            "gelu" | "gelu_pytorch_tanh" | "gelu_new" | "quick_gelu" | "relu" | "silu"
        ) {
            return Err(f.err("projector_hidden_act", format!("unsupported activation `{projector_hidden_act}`")));
        }

        let dtype = match f.opt_str("dtype")? {
            Some(d) => Some(d.to_string()),
            None => f.opt_str("torch_dtype")?.map(str::to_string),
        };

        Ok(Self {
            vision_config,
            text_config,
            image_token_id,
            video_token_id,
            projector_hidden_act,
            vision_feature_select_strategy,
            vision_feature_layer: FeatureLayers(layers),
            multimodal_projector_bias: f.bool_or("multimodal_projector_bias", true)?,
            image_seq_length: f.usize_or("image_seq_length", 256)?,
            video_seq_length: f.usize_or("video_seq_length", 2056)?,
            ignore_index: f.opt_i64("ignore_index")?.unwrap_or(-100),
            pad_token_id: f.token_ids("pad_token_id")?.and_then(|v| v.first().copied()),
            dtype,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// processor_config.json, generation_config.json
// ---------------------------------------------------------------------------------------------

/// `processor_config.json` (optional): what the processor needs to expand placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    pub patch_size: usize,
    pub vision_feature_select_strategy: FeatureSelectStrategy,
    pub num_additional_image_tokens: usize,
    pub image_token: String,
    pub video_token: String,
}

impl ProcessorConfig {
    /// The values the processor takes when the checkpoint has no `processor_config.json` (the hub
    /// checkpoint has none): patch size from the vision config, strategy from the model config.
    pub fn from_model_config(config: &VideoLlavaConfig) -> Self {
        Self {
            patch_size: config.vision_config.patch_size,
            vision_feature_select_strategy: config.vision_feature_select_strategy,
            num_additional_image_tokens: 1,
            image_token: "<image>".into(),
            video_token: "<video>".into(),
        }
    }

    /// Reads `processor_config.json`, falling back to the model config for absent fields.
    pub fn from_file(path: &Path, config: &VideoLlavaConfig) -> Result<Self> {
        Self::from_map(path, &read_json_object(path)?, config)
    }

    /// Reads the top-level keys of `processor_config.json` (5.x's nested `image_processor` and
    /// `video_processor` objects are read by [`CheckpointConfig::from_dir`]).
    fn from_map(path: &Path, map: &Map<String, Value>, config: &VideoLlavaConfig) -> Result<Self> {
        let f = Fields::new(path, "", map);
        let base = Self::from_model_config(config);
        let strategy = match f.opt_str("vision_feature_select_strategy")? {
            None => base.vision_feature_select_strategy,
            Some(s) => FeatureSelectStrategy::parse(s).ok_or_else(|| {
                f.err("vision_feature_select_strategy", format!("unexpected strategy `{s}` (expected default or full)"))
            })?,
        };
        Ok(Self {
            patch_size: f.positive_or("patch_size", base.patch_size)?,
            vision_feature_select_strategy: strategy,
            num_additional_image_tokens: f.usize_or("num_additional_image_tokens", 1)?,
            image_token: f.str_or("image_token", "<image>")?.to_string(),
            video_token: f.str_or("video_token", "<video>")?.to_string(),
        })
    }
}

/// `generation_config.json`: the checkpoint's decoding defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Total length limit (prompt + new tokens); transformers' default is 20.
    pub max_length: usize,
    pub max_new_tokens: Option<usize>,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub min_p: Option<f64>,
    pub repetition_penalty: f64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: None,
            max_length: 20,
            max_new_tokens: None,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: None,
            repetition_penalty: 1.0,
        }
    }
}

impl GenerationConfig {
    /// Derived from the model config, as transformers does when the file is missing.
    pub fn from_model_config(config: &VideoLlavaConfig) -> Self {
        Self {
            bos_token_id: config.text_config.bos_token_id,
            eos_token_ids: config.text_config.eos_token_ids.clone(),
            pad_token_id: config.pad_token_id.or(config.text_config.pad_token_id),
            ..Self::default()
        }
    }

    pub fn from_file(path: &Path, config: &VideoLlavaConfig) -> Result<Self> {
        let map = read_json_object(path)?;
        let f = Fields::new(path, "", &map);
        let base = Self::from_model_config(config);
        let d = Self::default();
        let top_p = f.f64_or("top_p", d.top_p)?;
        if !(0.0..=1.0).contains(&top_p) {
            return Err(f.err("top_p", format!("{top_p} is outside [0, 1]")));
        }
        let temperature = f.f64_or("temperature", d.temperature)?;
        if temperature < 0.0 {
            return Err(f.err("temperature", "must not be negative"));
        }
        Ok(Self {
            bos_token_id: f.token_ids("bos_token_id")?.and_then(|v| v.first().copied()).or(base.bos_token_id),
            eos_token_ids: f.token_ids("eos_token_id")?.unwrap_or(base.eos_token_ids),
            pad_token_id: f.token_ids("pad_token_id")?.and_then(|v| v.first().copied()).or(base.pad_token_id),
            max_length: f.usize_or("max_length", d.max_length)?,
            max_new_tokens: f.opt_usize("max_new_tokens")?,
            do_sample: f.bool_or("do_sample", d.do_sample)?,
            temperature,
            top_k: f.usize_or("top_k", d.top_k)?,
            top_p,
            min_p: match f.get("min_p") {
                None => None,
                Some(_) => Some(f.f64_or("min_p", 0.0)?),
            },
            repetition_penalty: f.f64_or("repetition_penalty", d.repetition_penalty)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The checkpoint directory
// ---------------------------------------------------------------------------------------------

/// Every configuration file of a checkpoint directory, parsed.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub dir: PathBuf,
    pub model: VideoLlavaConfig,
    pub processor: ProcessorConfig,
    pub image_processor: ImageProcessorConfig,
    pub video_processor: VideoProcessorConfig,
    pub generation: GenerationConfig,
}

impl CheckpointConfig {
    /// Reads `config.json`, the processor files and `generation_config.json` from `dir`, in the
    /// layout of any transformers version: 4.x writes `preprocessor_config.json` (plus an optional
    /// `processor_config.json` and, from 4.52, `video_preprocessor_config.json`); 5.x writes one
    /// `processor_config.json` that nests `image_processor` and `video_processor`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint directory not found"),
            ));
        }
        let model = VideoLlavaConfig::from_file(&dir.join("config.json"))?;
        let processor_path = dir.join("processor_config.json");
        let mut processor_map = if processor_path.exists() { Some(read_json_object(&processor_path)?) } else { None };
        let processor = match &processor_map {
            Some(map) => ProcessorConfig::from_map(&processor_path, map, &model)?,
            None => ProcessorConfig::from_model_config(&model),
        };
        let mut nested = |key: &str| -> Result<Option<Value>> {
            match processor_map.as_mut().and_then(|m| m.remove(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(v @ Value::Object(_)) => Ok(Some(v)),
                Some(v) => Err(Error::config(&processor_path, key, format!("expected an object, found {}", kind(&v)))),
            }
        };
        let nested_image = nested("image_processor")?;
        let nested_video = nested("video_processor")?;
        let pre_path = dir.join("preprocessor_config.json");
        let image_processor = match nested_image {
            // transformers' order: the nested object when there is one, else the 4.x file.
            Some(v) => preprocessor::from_json_value(&processor_path, "image_processor", v)?,
            None if pre_path.exists() => read_image_processor_config(&pre_path)?,
            None => {
                return Err(Error::config(
                    &pre_path,
                    "",
                    "missing: the checkpoint has neither preprocessor_config.json (transformers 4.x) nor an \
                     `image_processor` object in processor_config.json (transformers 5.x)",
                ))
            }
        };
        let video_path = dir.join("video_preprocessor_config.json");
        let video_processor = match nested_video {
            Some(v) => preprocessor::from_json_value(&processor_path, "video_processor", v)?,
            None if video_path.exists() => {
                preprocessor::from_json_value(&video_path, "", Value::Object(read_json_object(&video_path)?))?
            }
            None => VideoProcessorConfig::from_image_processor(&image_processor),
        };
        if video_processor.num_frames == Some(0) {
            let file = if video_path.exists() { &video_path } else { &processor_path };
            return Err(Error::config(file, "num_frames", "must be greater than 0"));
        }
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.exists() {
            GenerationConfig::from_file(&gen_path, &model)?
        } else {
            GenerationConfig::from_model_config(&model)
        };
        Ok(Self { dir: dir.to_path_buf(), model, processor, image_processor, video_processor, generation })
    }
}

/// Reads `preprocessor_config.json` into the image processor's config; errors name the field.
pub fn read_image_processor_config(path: &Path) -> Result<ImageProcessorConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        Error::config(path, field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<VideoLlavaConfig> {
        let v: Value = serde_json::from_str(json).unwrap();
        VideoLlavaConfig::from_map(Path::new("config.json"), v.as_object().unwrap())
    }

    /// The hub checkpoint's config.json as 4.x writes it (sparse nested configs).
    const HUB_4X: &str = r#"{
      "architectures": ["VideoLlavaForConditionalGeneration"], "ignore_index": -100,
      "image_token_index": 32000, "model_type": "video_llava", "pad_token_id": 32002,
      "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "max_position_embeddings": 4096,
        "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05, "torch_dtype": "float16",
        "vocab_size": 32064},
      "torch_dtype": "bfloat16", "transformers_version": "4.41.0.dev0", "video_token_index": 32001,
      "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    }"#;

    #[test]
    fn hub_config_fills_llama_and_clip_defaults() {
        let c = parse(HUB_4X).unwrap();
        let t = &c.text_config;
        assert_eq!(t.model_type, TextModelType::Llama);
        assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers), (4096, 11008, 32));
        assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim), (32, 32, 128));
        assert_eq!(t.vocab_size, 32064);
        assert_eq!(t.rms_norm_eps, 1e-5);
        assert_eq!(t.rope_theta, 10000.0);
        assert_eq!(t.rope_scaling, RopeScaling::None);
        assert_eq!(t.max_position_embeddings, 4096);
        assert_eq!(t.sliding_window, None);
        let v = &c.vision_config;
        assert_eq!((v.image_size, v.patch_size, v.hidden_act.as_str()), (224, 14, "quick_gelu"));
        assert_eq!(v.layer_norm_eps, 1e-5);
        assert_eq!(c.vision_feature_layer.resolved(24), vec![23]);
        assert_eq!(c.pad_token_id, Some(32002));
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!((c.image_seq_length, c.video_seq_length), (256, 2056));
    }

    #[test]
    fn transformers_5_spelling() {
        let c = parse(
            r#"{"model_type": "video_llava", "dtype": "bfloat16", "image_token_id": 32000, "video_token_id": 32001,
            "vision_feature_layer": [-2, -5],
            "text_config": {"model_type": "mistral", "vocab_size": 32064,
               "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
            "vision_config": {"model_type": "clip_vision_model", "patch_size": 14, "hidden_size": 1024,
               "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}}"#,
        )
        .unwrap();
        let t = &c.text_config;
        assert_eq!(t.model_type, TextModelType::Mistral);
        assert_eq!((t.num_key_value_heads, t.intermediate_size), (8, 14336));
        assert_eq!(t.sliding_window, Some(4096));
        assert_eq!(t.rope_theta, 1e6);
        assert_eq!(t.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.vision_feature_layer.resolved(24), vec![23, 20]);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn empty_config_is_the_video_llava_default() {
        let c = parse("{}").unwrap();
        assert_eq!(c.vision_config, VisionConfig::video_llava_default());
        assert_eq!(c.text_config, TextConfig::llama_default());
        assert_eq!(c.text_config.max_position_embeddings, 2048);
        assert_eq!(c.vision_feature_select_strategy, FeatureSelectStrategy::Default);
    }

    #[test]
    fn clip_defaults_apply_to_a_sparse_vision_config() {
        let c = parse(r#"{"vision_config": {"hidden_size": 64, "num_attention_heads": 4}}"#).unwrap();
        assert_eq!(c.vision_config.patch_size, 32);
        assert_eq!(c.vision_config.num_hidden_layers, 12);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"text_config": {"hidden_size": "big"}}"#, "text_config.hidden_size"),
            (
                r#"{"text_config": {"num_attention_heads": 32, "num_key_value_heads": 5}}"#,
                "text_config.num_key_value_heads",
            ),
            (r#"{"vision_feature_select_strategy": "cls"}"#, "vision_feature_select_strategy"),
            (r#"{"vision_feature_layer": 30}"#, "vision_feature_layer"),
            (r#"{"text_config": {"model_type": "gpt2"}}"#, "text_config.model_type"),
            (
                r#"{"text_config": {"rope_scaling": {"type": "yarn", "factor": 4}}}"#,
                "text_config.rope_scaling.rope_type",
            ),
            (
                r#"{"vision_config": {"hidden_size": 100, "num_attention_heads": 16}}"#,
                "vision_config.num_attention_heads",
            ),
            (r#"{"image_token_index": 32001}"#, "video_token_index"),
            (r#"{"model_type": "llava"}"#, "model_type"),
        ];
        for (json, field) in cases {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.starts_with("config.json: field `"), "{err}");
            assert!(err.contains(&format!("`{field}`")), "{json} -> {err}");
        }
    }
}
