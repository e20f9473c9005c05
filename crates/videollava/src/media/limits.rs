//! Bounds on what a media input may cost, checked from headers before any pixel buffer is
//! allocated and again while decoding (a file may lie in its header).
//!
//! The CLI and the server share these checks: the library's `decode_*` functions use
//! [`MediaLimits::default`], the server builds its own from its command line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Limits on one image or video.
#[derive(Debug, Clone)]
pub struct MediaLimits {
    /// Largest width or height of an image or video frame, in pixels.
    pub max_side: usize,
    /// Most pixels (width times height) of an image or video frame.
    pub max_pixels: u64,
    /// Largest ratio of the longer side to the shorter one. Resizing keeps the aspect ratio, so a
    /// 16384x1 image would become 224 x 3.6M pixels; such images are refused before decoding.
    pub max_aspect_ratio: f64,
    /// Most frames decoded from a video stream (counted while decoding, not read from the header).
    pub max_video_frames: u64,
    /// Longest video, in seconds of presentation time (checked while decoding as well).
    pub max_video_seconds: f64,
    /// Most scans of a progressive JPEG (each scan costs a pass over the whole image).
    pub max_jpeg_scans: u32,
    /// Asked, from the header and before decoding, for the pixels the decoded result will hold
    /// (all kept frames of a video); the server bounds what all requests hold together with it.
    pub budget: Budget,
}

/// Admits `pixels`, or refuses with a reason.
type Admit = dyn Fn(u64) -> std::result::Result<(), String> + Send + Sync;

/// A hook that admits (or refuses, with a reason) the pixels a decoder is about to hold.
#[derive(Clone, Default)]
pub struct Budget(Option<Arc<Admit>>);

impl Budget {
    pub fn new(f: impl Fn(u64) -> std::result::Result<(), String> + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    fn reserve(&self, pixels: u64) -> std::result::Result<(), String> {
        match &self.0 {
            Some(f) => f(pixels),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Budget(hook)" } else { "Budget(none)" })
    }
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            max_side: 16384,
            max_pixels: 8192 * 8192,
            max_aspect_ratio: 200.0,
            max_video_frames: 36_000,
            max_video_seconds: 600.0,
            max_jpeg_scans: 500,
            budget: Budget::default(),
        }
    }
}

impl MediaLimits {
    /// Checks a picture's size from its header: non-zero sides, each at most `max_side`, at most
    /// `max_pixels` in all, and an aspect ratio of at most `max_aspect_ratio`.
    /// `what` names the kind of picture in the message ("PNG image", "video frame").
    pub fn check_size(&self, name: &str, what: &str, width: u64, height: u64) -> Result<()> {
        if width == 0 || height == 0 {
            return Err(Error::media(name, format!("{what} has no pixels ({width}x{height})")));
        }
        let pixels = width.saturating_mul(height);
        if width > self.max_side as u64 || height > self.max_side as u64 || pixels > self.max_pixels {
            return Err(Error::media(
                name,
                format!(
                    "{what} is {width}x{height} = {pixels} pixels, over the limit (at most {} per side and {} \
                     pixels in all)",
                    self.max_side, self.max_pixels
                ),
            ));
        }
        let (long, short) = (width.max(height), width.min(height));
        if long as f64 > short as f64 * self.max_aspect_ratio {
            return Err(Error::media(
                name,
                format!(
                    "{what} is {width}x{height}: its aspect ratio of {:.0}:1 is over the limit of {}:1 (resizing \
                     its shorter side to the model's size would make the longer side enormous)",
                    long as f64 / short as f64,
                    self.max_aspect_ratio
                ),
            ));
        }
        Ok(())
    }
}

impl MediaLimits {
    /// Asks the [`Budget`] for `pixels` about to be held; its refusal becomes a media error.
    pub fn reserve(&self, name: &str, pixels: u64) -> Result<()> {
        self.budget.reserve(pixels).map_err(|m| Error::media(name, m))
    }
}

/// A flag that stops media work early: set when the request it belongs to failed, timed out or
/// lost its client. Decoders check it between packets and rows. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err` naming `name` when cancelled.
    pub fn check(&self, name: &str) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::media(name, "decoding cancelled (the request failed, timed out or its client left)"))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_checks() {
        let l = MediaLimits::default();
        assert!(l.check_size("x", "image", 224, 224).is_ok());
        assert!(l.check_size("x", "image", 8192, 8192).is_ok());
        let e = l.check_size("x", "PNG image", 16384, 1).unwrap_err().to_string();
        assert!(e.contains("aspect ratio") && e.contains("16384x1"), "{e}");
        let e = l.check_size("x", "PNG image", 16385, 16385).unwrap_err().to_string();
        assert!(e.contains("over the limit"), "{e}");
        let e = l.check_size("x", "video frame", 2_000_000, 1).unwrap_err().to_string();
        assert!(e.contains("2000000x1"), "{e}");
        assert!(l.check_size("x", "image", 0, 5).is_err());
        let c = Cancel::new();
        assert!(c.check("a").is_ok());
        c.clone().cancel();
        assert!(c.check("a").unwrap_err().to_string().contains("cancelled"));
    }
}
