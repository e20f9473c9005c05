//! Media input: images and videos decoded to 8-bit RGB, and the choice of video frames.
//!
//! - [`image`]: image files decoded to the pixels `PIL.Image.open(f).convert("RGB")` gives;
//! - [`video`]: videos decoded with FFmpeg in stream order, `N` frames picked, converted to RGB
//!   as PyAV's `frame.to_ndarray(format="rgb24")` does.

//! - [`limits`]: the bounds every decoder checks from headers and while decoding;
//! - [`recent`]: videos decoded from memory, kept by the digest of their bytes.

mod frame;
pub mod image;
pub mod limits;
pub mod recent;
pub mod video;

pub use frame::{RgbImage, Video};
pub use limits::{Cancel, MediaLimits};
