//! Port of Hugging Face transformers' `VideoLlavaImageProcessor` (PIL path, transformers 4.57,
//! identical to 4.46.3 for images) for 8-bit RGB input.
//!
//! Per image, in this order (each step only when its `do_*` flag is set):
//! 1. **Resize** with Pillow's `Image.resize` on `u8` data ([`resize`]): with
//!    `size = {shortest_edge: s}` the shorter side becomes `s` and the longer side
//!    `int(s * long / short)` (Python float division, truncated); with `{height, width}` the
//!    image is resized to exactly that. The result is still `u8`.
//! 2. **Center crop** to `crop_size` (`top = (h - ch) // 2`, `left = (w - cw) // 2`); a side that is
//!    smaller than the crop is zero-padded, the image placed at `ceil((crop - side) / 2)`.
//! 3. **Rescale**: `(x as f64 * rescale_factor) as f32`.
//! 4. **Normalize** in `f32`: `(x - mean as f32) / std as f32`. When rescale was skipped the `u8`
//!    values are first converted to `f32` (as numpy's `astype(np.float32)`).
//! 5. Transpose HWC → CHW.
//!
//! Output: [`ProcessedImage`], `f32` in CHW layout. With both rescale and normalize off the values
//! are the `u8` pixels converted to `f32` (transformers would return a `uint8` array with the
//! same values).
//!
//! Known divergence: transformers infers the channel axis from the array shape and treats an
//! image whose height is 1 or 3 pixels as channels-first, which scrambles it; here the input is
//! always HWC, whatever its height.

use crate::error::{Error, Result};
use crate::media::RgbImage;
use crate::processor::resize::{resize, Resample};

/// Most pixels the resize step may produce (2^25, 96 MiB of RGB). Resizing keeps the aspect
/// ratio, so a very thin image (16384x1 resized to a 224 shortest edge is 224 x 3.7M) would
/// otherwise cost gigabytes and seconds; such images are refused with a message saying why.
pub const MAX_RESIZED_PIXELS: usize = 1 << 25;

pub use crate::config::{ImageProcessorConfig, SizeDict, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};

/// How the resize step sizes its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResizeRule {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

/// A preprocessed image: `f32`, channels-first, `data[c * height * width + y * width + x]`
/// with `c` in R, G, B.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// `VideoLlavaImageProcessor` for one image at a time (video frames go through it one by one).
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    config: ImageProcessorConfig,
    resize_rule: Option<ResizeRule>,
    filter: Resample,
    crop: Option<(usize, usize)>,
    mean: [f32; 3],
    std: [f32; 3],
}

impl ImageProcessor {
    /// Checks the configuration: size dictionaries with a valid key set (and usable by the steps
    /// that are on), sizes > 0, a known resample code, 3 mean and 3 std values, no zero std.
    /// Errors are [`Error::Input`] with a message naming the field; callers that read a file may
    /// rewrap them as [`Error::Config`].
    pub fn new(config: ImageProcessorConfig) -> Result<Self> {
        let bad = |field: &str, msg: String| Error::Input(format!("image processor config: `{field}`: {msg}"));
        for (field, s) in [("size", &config.size), ("crop_size", &config.crop_size)] {
            if !s.is_valid() {
                return Err(bad(
                    field,
                    format!(
                        "{} must have one of the key sets {{height, width}}, {{shortest_edge}}, \
                         {{shortest_edge, longest_edge}}, {{longest_edge}}, {{max_height, max_width}}",
                        s.describe()
                    ),
                ));
            }
        }
        let resize_rule = if config.do_resize {
            let s = &config.size;
            // `longest_edge` next to `shortest_edge` is ignored by VideoLlavaImageProcessor.resize.
            let rule = match (s.shortest_edge, s.height, s.width) {
                (Some(e), _, _) => ResizeRule::ShortestEdge(e),
                (None, Some(height), Some(width)) => ResizeRule::Exact { height, width },
                _ => {
                    return Err(bad(
                        "size",
                        format!("{} must contain either 'shortest_edge' or 'height' and 'width'", s.describe()),
                    ))
                }
            };
            match rule {
                ResizeRule::ShortestEdge(0) => return Err(bad("size", "shortest_edge must be > 0".into())),
                ResizeRule::Exact { height, width } if height == 0 || width == 0 => {
                    return Err(bad("size", "height and width must be > 0".into()))
                }
                _ => {}
            }
            Some(rule)
        } else {
            None
        };
        let filter = Resample::from_pil_code(config.resample).ok_or_else(|| {
            bad(
                "resample",
                format!(
                    "unsupported filter code {} (0 NEAREST, 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING)",
                    config.resample
                ),
            )
        })?;
        let crop = if config.do_center_crop {
            match (config.crop_size.height, config.crop_size.width) {
                (Some(h), Some(w)) if h > 0 && w > 0 => Some((h, w)),
                (Some(_), Some(_)) => return Err(bad("crop_size", "height and width must be > 0".into())),
                _ => {
                    return Err(bad(
                        "crop_size",
                        format!("{} must have keys 'height' and 'width'", config.crop_size.describe()),
                    ))
                }
            }
        } else {
            None
        };
        if config.do_rescale && !config.rescale_factor.is_finite() {
            return Err(bad("rescale_factor", format!("must be a finite number, got {}", config.rescale_factor)));
        }
        let mut mean = [0f32; 3];
        let mut std = [0f32; 3];
        if config.do_normalize {
            for (field, values, out) in
                [("image_mean", &config.image_mean, &mut mean), ("image_std", &config.image_std, &mut std)]
            {
                if values.len() != 3 {
                    return Err(bad(field, format!("must have 3 elements (one per channel), got {}", values.len())));
                }
                for (o, &v) in out.iter_mut().zip(values.iter()) {
                    // numpy: `np.array(mean, dtype=np.float32)`: round to nearest f32.
                    *o = v as f32;
                }
            }
            if std.iter().any(|&s| s == 0.0 || !s.is_finite()) || mean.iter().any(|m| !m.is_finite()) {
                return Err(bad("image_std", format!("must be finite and non-zero, got {:?}", config.image_std)));
            }
        }
        Ok(Self { config, resize_rule, filter, crop, mean, std })
    }

    /// The configuration this processor was built from.
    pub fn config(&self) -> &ImageProcessorConfig {
        &self.config
    }

    /// Size `(height, width)` after the resize step (the input size when resizing is off), as
    /// `get_resize_output_image_size` computes it.
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.resize_rule {
            None => (height, width),
            Some(ResizeRule::Exact { height, width }) => (height, width),
            Some(ResizeRule::ShortestEdge(size)) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                // Python: `int(size * long / short)`, integer product then float true division.
                let new_long = ((size as u128 * long as u128) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, size)
                } else {
                    (size, new_long)
                }
            }
        }
    }

    /// [`resized_size`](Self::resized_size), refused when the result has more than
    /// [`MAX_RESIZED_PIXELS`] (an extreme aspect ratio) or a zero side.
    pub fn checked_resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let (h, w) = self.resized_size(height, width);
        if h == 0 || w == 0 || h.saturating_mul(w) > MAX_RESIZED_PIXELS {
            return Err(Error::Input(format!(
                "image of {width}x{height} pixels would be resized to {w}x{h}: its aspect ratio is too extreme \
                 (the resize keeps it, and at most {MAX_RESIZED_PIXELS} pixels are allowed after resizing)"
            )));
        }
        Ok((h, w))
    }

    /// Output `(height, width)` when it does not depend on the input (center crop, or an exact
    /// resize without crop): what every image becomes, known before decoding any.
    pub fn fixed_output_size(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize_rule) {
            (Some(hw), _) => Some(hw),
            (None, Some(ResizeRule::Exact { height, width })) => Some((height, width)),
            _ => None,
        }
    }

    /// Final `(height, width)` of [`preprocess`](Self::preprocess) for an input of this size.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.crop {
            Some(hw) => hw,
            None => self.resized_size(height, width),
        }
    }

    /// Runs the processor on one HWC `u8` RGB image; returns CHW `f32`.
    pub fn preprocess(&self, image: &RgbImage) -> Result<ProcessedImage> {
        if image.width == 0 || image.height == 0 || image.data.len() != image.width * image.height * 3 {
            return Err(Error::Input(format!(
                "image of size {}x{} with {} bytes is not a valid RGB image",
                image.width,
                image.height,
                image.data.len()
            )));
        }
        // 1. Resize (u8).
        let resized;
        let img: &RgbImage = if self.resize_rule.is_some() {
            let (h, w) = self.checked_resized_size(image.height, image.width)?;
            resized = resize(image, w, h, self.filter);
            &resized
        } else {
            image
        };
        let (in_h, in_w) = (img.height, img.width);

        // 2. Center crop (u8, zero padding); expressed as a source offset per axis.
        let (out_h, out_w, place_y, place_x) = match self.crop {
            None => (in_h, in_w, Placement::identity(), Placement::identity()),
            Some((ch, cw)) => (ch, cw, Placement::new(in_h, ch), Placement::new(in_w, cw)),
        };

        // 3 + 4 + 5: per-value lookup table (u8 -> f32 per channel), then CHW layout.
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, t) in table.iter_mut().enumerate() {
                *t = self.value(v as u8, c);
            }
        }
        let plane = out_h * out_w;
        let mut data = vec![0f32; 3 * plane];
        for y in 0..out_h {
            let sy = place_y.source(y);
            for x in 0..out_w {
                let px = match (sy, place_x.source(x)) {
                    (Some(sy), Some(sx)) => {
                        let i = (sy * in_w + sx) * 3;
                        [img.data[i], img.data[i + 1], img.data[i + 2]]
                    }
                    _ => [0, 0, 0],
                };
                for c in 0..3 {
                    data[c * plane + y * out_w + x] = lut[c][px[c] as usize];
                }
            }
        }
        Ok(ProcessedImage { height: out_h, width: out_w, data })
    }

    /// Rescale and normalize of one `u8` value of channel `c`, with transformers' dtypes.
    fn value(&self, v: u8, c: usize) -> f32 {
        let x = if self.config.do_rescale {
            // `image.astype(np.float64) * scale`, then `.astype(np.float32)`.
            (v as f64 * self.config.rescale_factor) as f32
        } else {
            // `normalize` casts non-float images with `astype(np.float32)`; without normalize
            // the values stay u8, which f32 holds exactly.
            v as f32
        };
        if self.config.do_normalize {
            (x - self.mean[c]) / self.std[c]
        } else {
            x
        }
    }
}

/// Where output index `i` of a center-cropped axis reads from: source `i + offset` when it lies in
/// `0..len`, zero padding otherwise.
#[derive(Debug, Clone, Copy)]
struct Placement {
    offset: isize,
    len: usize,
}

impl Placement {
    fn identity() -> Self {
        Self { offset: 0, len: usize::MAX }
    }

    /// transformers `center_crop` along one axis of length `len` to `crop`: a floor offset when
    /// cropping, the image placed at `ceil((crop - len) / 2)` when padding.
    fn new(len: usize, crop: usize) -> Self {
        let offset = if crop <= len { ((len - crop) / 2) as isize } else { -(((crop - len).div_ceil(2)) as isize) };
        Self { offset, len }
    }

    fn source(&self, i: usize) -> Option<usize> {
        let s = i as isize + self.offset;
        (s >= 0 && (s as usize) < self.len).then_some(s as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> ImageProcessorConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_and_size_forms() {
        let c = cfg(r#"{"image_processor_type": "VideoLlavaImageProcessor"}"#);
        assert_eq!(c.size, SizeDict::shortest_edge(224));
        assert_eq!(c.crop_size, SizeDict::height_width(224, 224));
        assert_eq!(c.resample, 3);
        assert_eq!(c.image_mean, OPENAI_CLIP_MEAN.to_vec());
        assert_eq!(c.rescale_factor, 1.0 / 255.0);
        let c = cfg(r#"{"size": 32, "crop_size": 28, "image_mean": 0.5, "image_std": [1, 2, 3]}"#);
        assert_eq!(c.size, SizeDict::shortest_edge(32));
        assert_eq!(c.crop_size, SizeDict::height_width(28, 28));
        assert_eq!(c.image_mean, vec![0.5; 3]);
        assert_eq!(c.image_std, vec![1.0, 2.0, 3.0]);
        let c = cfg(r#"{"size": [40, 60], "crop_size": null}"#);
        assert_eq!(c.size, SizeDict::height_width(40, 60));
        assert_eq!(c.crop_size, SizeDict::height_width(224, 224));
        assert!(serde_json::from_str::<ImageProcessorConfig>(r#"{"size": {"short": 3}}"#).is_err());
    }

    #[test]
    fn validation() {
        assert!(ImageProcessor::new(cfg("{}")).is_ok());
        for bad in [
            r#"{"resample": 7}"#,
            r#"{"size": {"height": 3}}"#,
            r#"{"size": {"longest_edge": 3}}"#,
            r#"{"size": 0}"#,
            r#"{"crop_size": {"shortest_edge": 3}}"#,
            r#"{"image_mean": [0.5, 0.5]}"#,
            r#"{"image_std": [0.5, 0.0, 0.5]}"#,
        ] {
            assert!(ImageProcessor::new(cfg(bad)).is_err(), "{bad}");
        }
        // Unused settings are not checked beyond their key set, as in transformers.
        assert!(ImageProcessor::new(cfg(r#"{"do_resize": false, "size": {"longest_edge": 3}}"#)).is_ok());
    }

    #[test]
    fn output_sizes() {
        let p = ImageProcessor::new(cfg(r#"{"do_center_crop": false}"#)).unwrap();
        assert_eq!(p.output_size(480, 640), (224, 298));
        assert_eq!(p.output_size(720, 1280), (224, 398));
        assert_eq!(p.output_size(517, 333), (347, 224));
        let p = ImageProcessor::new(cfg("{}")).unwrap();
        assert_eq!(p.output_size(10, 5000), (224, 224));
    }

    #[test]
    fn crop_pads_with_zeros_centred() {
        let p = ImageProcessor::new(cfg(
            r#"{"do_resize": false, "crop_size": {"height": 4, "width": 2}, "do_rescale": false, "do_normalize": false}"#,
        ))
        .unwrap();
        // 1 row x 3 columns -> 4 x 2: rows padded top 2 (ceil(3/2)), columns cropped from offset 0.
        let im = RgbImage { width: 3, height: 1, data: vec![1, 2, 3, 4, 5, 6, 7, 8, 9] };
        let out = p.preprocess(&im).unwrap();
        assert_eq!((out.height, out.width), (4, 2));
        assert_eq!(&out.data[0..8], &[0., 0., 0., 0., 1., 4., 0., 0.]);
    }
}
