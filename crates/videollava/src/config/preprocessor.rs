//! The image and video processor settings of a checkpoint: `preprocessor_config.json` (4.x),
//! `video_preprocessor_config.json` (4.5x), or the `image_processor` / `video_processor` objects
//! nested in `processor_config.json` (5.x, which writes no `preprocessor_config.json`).

/// The OpenAI CLIP mean (`OPENAI_CLIP_MEAN`), the default `image_mean`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// The OpenAI CLIP standard deviation (`OPENAI_CLIP_STD`), the default `image_std`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// A transformers size dictionary. `preprocessor_config.json` may hold a dict, a bare integer
/// or a `[height, width]` list; they are converted as `get_size_dict` does (a bare integer means
/// `{shortest_edge: n}` for `size` and `{height: n, width: n}` for `crop_size`).
/// The set of keys present must be one of transformers' `VALID_SIZE_DICT_KEYS`
/// (checked by [`crate::processor::image_processor::ImageProcessor::new`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeDict {
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub shortest_edge: Option<usize>,
    #[serde(default)]
    pub longest_edge: Option<usize>,
    #[serde(default)]
    pub max_height: Option<usize>,
    #[serde(default)]
    pub max_width: Option<usize>,
}

impl SizeDict {
    /// `{shortest_edge: n}`.
    pub fn shortest_edge(n: usize) -> Self {
        Self { shortest_edge: Some(n), ..Self::default() }
    }

    /// `{height, width}`.
    pub fn height_width(height: usize, width: usize) -> Self {
        Self { height: Some(height), width: Some(width), ..Self::default() }
    }

    /// `is_valid_size_dict`: the keys present form one of the allowed sets.
    pub(crate) fn is_valid(&self) -> bool {
        let keys = [
            self.height.is_some(),
            self.width.is_some(),
            self.shortest_edge.is_some(),
            self.longest_edge.is_some(),
            self.max_height.is_some(),
            self.max_width.is_some(),
        ];
        matches!(
            keys,
            [true, true, false, false, false, false]
                | [false, false, true, false, false, false]
                | [false, false, true, true, false, false]
                | [false, false, false, true, false, false]
                | [false, false, false, false, true, true]
        )
    }

    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (name, v) in [
            ("height", self.height),
            ("width", self.width),
            ("shortest_edge", self.shortest_edge),
            ("longest_edge", self.longest_edge),
            ("max_height", self.max_height),
            ("max_width", self.max_width),
        ] {
            if let Some(v) = v {
                parts.push(format!("{name}: {v}"));
            }
        }
        format!("{{{}}}", parts.join(", "))
    }
}

/// Mirror of `preprocessor_config.json` for `VideoLlavaImageProcessor`, as transformers writes it.
/// Absent fields take transformers' defaults; unknown fields (`image_processor_type`,
/// `processor_class`, ...) are ignored. A JSON `null` for `size`, `crop_size`, `image_mean` or
/// `image_std` also means the default (transformers' `x if x is not None else default`), and a
/// `null` flag counts as false (Python's `None` is falsy).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "default_true", deserialize_with = "de_flag")]
    pub do_resize: bool,
    #[serde(default = "default_size", deserialize_with = "de_size")]
    pub size: SizeDict,
    /// A `PIL.Image.Resampling` code (0 NEAREST, 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING).
    #[serde(default = "default_resample")]
    pub resample: i64,
    #[serde(default = "default_true", deserialize_with = "de_flag")]
    pub do_center_crop: bool,
    #[serde(default = "default_crop_size", deserialize_with = "de_crop_size")]
    pub crop_size: SizeDict,
    #[serde(default = "default_true", deserialize_with = "de_flag")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale_factor")]
    pub rescale_factor: f64,
    #[serde(default = "default_true", deserialize_with = "de_flag")]
    pub do_normalize: bool,
    /// Per-channel mean (R, G, B); a single number in the JSON applies to all channels.
    #[serde(default = "default_mean", deserialize_with = "de_mean")]
    pub image_mean: Vec<f64>,
    /// Per-channel standard deviation (R, G, B); a single number applies to all channels.
    #[serde(default = "default_std", deserialize_with = "de_std")]
    pub image_std: Vec<f64>,
    /// Only affects PIL images in other modes in transformers; [`RgbImage`] input is already RGB.
    #[serde(default = "default_true", deserialize_with = "de_flag")]
    pub do_convert_rgb: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: default_size(),
            resample: default_resample(),
            do_center_crop: true,
            crop_size: default_crop_size(),
            do_rescale: true,
            rescale_factor: default_rescale_factor(),
            do_normalize: true,
            image_mean: default_mean(),
            image_std: default_std(),
            do_convert_rgb: true,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_size() -> SizeDict {
    SizeDict::shortest_edge(224)
}
fn default_resample() -> i64 {
    3
}
fn default_crop_size() -> SizeDict {
    SizeDict::height_width(224, 224)
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> Vec<f64> {
    OPENAI_CLIP_MEAN.to_vec()
}
fn default_std() -> Vec<f64> {
    OPENAI_CLIP_STD.to_vec()
}

fn de_flag<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    use serde::Deserialize;
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(usize),
    List(Vec<usize>),
    Dict(SizeDict),
}

fn convert_size<E: serde::de::Error>(
    raw: Option<RawSize>,
    default_to_square: bool,
    default: SizeDict,
) -> std::result::Result<SizeDict, E> {
    Ok(match raw {
        None => default,
        Some(RawSize::Dict(d)) => d,
        Some(RawSize::Int(n)) if default_to_square => SizeDict::height_width(n, n),
        Some(RawSize::Int(n)) => SizeDict::shortest_edge(n),
        Some(RawSize::List(l)) if l.len() == 2 => SizeDict::height_width(l[0], l[1]),
        Some(RawSize::List(l)) => {
            return Err(E::custom(format!("a size list must be [height, width], got {} values", l.len())))
        }
    })
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<SizeDict, D::Error> {
    use serde::Deserialize;
    convert_size(Option::<RawSize>::deserialize(d)?, false, default_size())
}

fn de_crop_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<SizeDict, D::Error> {
    use serde::Deserialize;
    convert_size(Option::<RawSize>::deserialize(d)?, true, default_crop_size())
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum RawChannels {
    One(f64),
    Many(Vec<f64>),
}

fn convert_channels(raw: Option<RawChannels>, default: Vec<f64>) -> Vec<f64> {
    match raw {
        None => default,
        Some(RawChannels::One(v)) => vec![v; 3],
        Some(RawChannels::Many(v)) => v,
    }
}

fn de_mean<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    use serde::Deserialize;
    Ok(convert_channels(Option::<RawChannels>::deserialize(d)?, default_mean()))
}

fn de_std<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    use serde::Deserialize;
    Ok(convert_channels(Option::<RawChannels>::deserialize(d)?, default_std()))
}

/// transformers' `VideoLlavaVideoProcessor` settings (`video_processor` in a 5.x
/// `processor_config.json`, or 4.5x's `video_preprocessor_config.json`): the per-frame steps,
/// read like [`ImageProcessorConfig`], plus the frame choice of 5.x. A checkpoint without either
/// (4.x, the hub's) processes frames with its image processor settings.
///
/// Frames are always pixel-processed by the Pillow path (reference-spec, "The oracle"); 5.x's
/// torchvision path differs by up to ~0.015 after normalisation.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct VideoProcessorConfig {
    /// Resize, crop, rescale and normalise of each frame.
    #[serde(flatten)]
    pub frame: ImageProcessorConfig,
    /// 5.x: the processor picks `num_frames` of the frames it is given
    /// (`arange(0, total, total / num_frames)`, our `uniform` sampling). False in transformers'
    /// class defaults, for backward compatibility.
    #[serde(default, deserialize_with = "de_flag")]
    pub do_sample_frames: bool,
    #[serde(default)]
    pub num_frames: Option<usize>,
    /// Frames per second to sample (5.x, exclusive with `num_frames`). Not honoured: frame
    /// choice by duration needs the container's timing; see [`Self::default_num_frames`].
    #[serde(default)]
    pub fps: Option<f64>,
}

impl VideoProcessorConfig {
    /// Frames per video the checkpoint asks for: `num_frames` when `do_sample_frames` is set,
    /// else `None` (the caller's choice; the project's default is 8).
    pub fn default_num_frames(&self) -> Option<usize> {
        if self.do_sample_frames {
            self.num_frames
        } else {
            None
        }
    }

    /// The settings transformers uses when a checkpoint has no video processor config: the image
    /// processor's, with no frame sampling.
    pub fn from_image_processor(image: &ImageProcessorConfig) -> Self {
        Self { frame: image.clone(), ..Self::default() }
    }
}

/// Reads a processor config (`preprocessor_config.json` or a nested object of
/// `processor_config.json`) from a JSON value; errors name `file` and the dotted field path,
/// under `prefix` when the object is nested.
pub(crate) fn from_json_value<T: serde::de::DeserializeOwned>(
    file: &std::path::Path,
    prefix: &str,
    value: serde_json::Value,
) -> crate::error::Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = match (prefix.is_empty(), field == ".") {
            (true, true) => String::new(),
            (true, false) => field,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix}.{field}"),
        };
        crate::error::Error::config(file, field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn video_processor_options_of_5x() {
        let v: VideoProcessorConfig = serde_json::from_str(
            r#"{"do_sample_frames": true, "num_frames": 4, "size": {"shortest_edge": 32}, "crop_size": 28,
                "video_processor_type": "VideoLlavaVideoProcessor", "return_metadata": false}"#,
        )
        .unwrap();
        assert_eq!(v.default_num_frames(), Some(4));
        assert_eq!(v.frame.size, SizeDict::shortest_edge(32));
        assert_eq!(v.frame.crop_size, SizeDict::height_width(28, 28));
        assert_eq!(v.frame.image_mean, OPENAI_CLIP_MEAN.to_vec());
        let off: VideoProcessorConfig = serde_json::from_str(r#"{"num_frames": 4, "do_sample_frames": null}"#).unwrap();
        assert_eq!(off.default_num_frames(), None);
    }

    #[test]
    fn nested_errors_name_the_nested_field() {
        let value = serde_json::json!({"size": {"short": 3}});
        let err = from_json_value::<ImageProcessorConfig>(
            std::path::Path::new("processor_config.json"),
            "image_processor",
            value,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("processor_config.json") && err.contains("image_processor.size"), "{err}");
    }
}
