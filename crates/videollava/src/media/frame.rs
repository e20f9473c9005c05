//! Decoded pictures: the common currency between decoders and the processor.

use crate::error::{Error, Result};

/// An 8-bit RGB picture, row-major HWC: `data[(y * width + x) * 3 + c]`, `c` in R, G, B.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// Wraps HWC u8 data; fails when the length is not `width * height * 3` or a side is zero.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::Input(format!("image of size {width}x{height} has no pixels")));
        }
        if data.len() != width * height * 3 {
            return Err(Error::Input(format!(
                "image buffer holds {} bytes, expected {}x{}x3 = {}",
                data.len(),
                width,
                height,
                width * height * 3
            )));
        }
        Ok(Self { width, height, data })
    }
}

/// A clip: the frames chosen from a video, in order, all of one size.
#[derive(Clone, Debug, PartialEq)]
pub struct Video {
    pub frames: Vec<RgbImage>,
    /// Indices of the chosen frames in the decoded stream (empty for caller-supplied frames).
    pub frame_indices: Vec<usize>,
    /// Number of frames in the stream that the indices refer to (0 for caller-supplied frames).
    pub total_frames: usize,
    /// The stream's average frame rate (frames per second) as the container states it, when it
    /// does: frame `i` shows at about `i / frame_rate` seconds.
    pub frame_rate: Option<f64>,
    /// The container's duration in seconds, when it states one.
    pub duration: Option<f64>,
}

impl Video {
    /// Wraps caller-decoded frames (HWC u8); they must be non-empty and of one size.
    pub fn from_frames(frames: Vec<RgbImage>) -> Result<Self> {
        let Some(first) = frames.first() else {
            return Err(Error::Input("a video needs at least one frame".into()));
        };
        let (w, h) = (first.width, first.height);
        if let Some((i, f)) = frames.iter().enumerate().find(|(_, f)| f.width != w || f.height != h) {
            return Err(Error::Input(format!(
                "video frame {i} is {}x{}, frame 0 is {w}x{h}: frames must share one size",
                f.width, f.height
            )));
        }
        Ok(Self { frames, frame_indices: Vec::new(), total_frames: 0, frame_rate: None, duration: None })
    }
}
