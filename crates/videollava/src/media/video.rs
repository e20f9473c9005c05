//! Video files to clips: decode a file with FFmpeg (through `ffmpeg-next`), pick `num_frames` frames
//! and convert them to 8-bit RGB exactly as the Python reference does.
//!
//! The reference is PyAV: `container.decode(video=0)` yields every frame of the stream in
//! presentation order as the decoder emits it (decoder flushed at the end), the stream's frame count
//! comes from the container header (`stream.frames`) or, when the header says 0 (webm, mkv) or is
//! wrong, from counting the decoded frames; the chosen frames become RGB with
//! `frame.to_ndarray(format="rgb24")`, an `sws_scale` of the same size with `SWS_BILINEAR` using the
//! frame's own colour matrix (`colorspace`) and range (`color_range`, full for `yuvj*` formats).
//! [`decode_video_file`] reproduces those pixels byte for byte for 8-bit 4:2:0 frames of even
//! height (every common H.264/VP9/MJPEG video, odd widths included), 4:2:2, 4:4:4, grey, palette
//! and RGB frames (verified against PyAV 18.1 / FFmpeg 8.0 with Debian's FFmpeg 5.1).
//!
//! Known deviation: 4:2:0 frames of odd height and high-bit-depth 4:2:0 frames (`yuv420p10le`)
//! take swscale's generic path, whose vertical chroma interpolation differs between FFmpeg 5.1
//! and 8.0; measured up to ~80 levels apart at sharp colour edges (not corrected here).
//!
//! Output conventions: every [`RgbImage`] is HWC u8 (`[height, width, 3]`, R, G, B), the frame's
//! display size after the decoder's cropping; no resizing happens here.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek};
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Once};

use ff::format::Pixel;
use ff::software::scaling::{Context as Scaler, Flags};
use ffmpeg_next as ff;

use crate::error::{Error, Result};
use crate::media::{Cancel, MediaLimits, RgbImage, Video};

/// How the frames of a clip are chosen among the `total` decoded frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrameSampling {
    /// `np.arange(0, total, total / N).astype(int)`: evenly spaced, starting at frame 0, never the
    /// last frame (unless the video is short). The Hugging Face Video-LLaVA recipe; the default.
    #[default]
    Uniform,
    /// `np.linspace(0, total - 1, N).astype(int)`: evenly spaced including the first and the last
    /// frame. The original Video-LLaVA repository (decord).
    Linspace,
}

impl FromStr for FrameSampling {
    type Err = Error;

    /// Parses `"uniform"` or `"linspace"` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uniform" => Ok(Self::Uniform),
            "linspace" => Ok(Self::Linspace),
            _ => Err(Error::Input(format!(
                "unknown frame sampling `{s}`: expected `uniform` (np.arange, the default) or `linspace`"
            ))),
        }
    }
}

impl std::fmt::Display for FrameSampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Uniform => "uniform",
            Self::Linspace => "linspace",
        })
    }
}

/// How to turn a video file into a clip.
#[derive(Debug, Clone)]
pub struct VideoOptions {
    /// Frames per clip (Video-LLaVA uses 8). Must be at least 1.
    pub num_frames: usize,
    /// Which frames to keep.
    pub sampling: FrameSampling,
}

impl Default for VideoOptions {
    fn default() -> Self {
        Self { num_frames: 8, sampling: FrameSampling::Uniform }
    }
}

/// Indices of the frames to keep among `total` decoded frames: always exactly `num_frames` entries,
/// non-decreasing, each `< total`. When `total < num_frames` indices repeat.
///
/// Computed in f64 exactly as numpy does, so results equal
/// `np.arange(0, total, total / num_frames).astype(int)[:num_frames]` (uniform) and
/// `np.linspace(0, total - 1, num_frames).astype(int)` (linspace).
///
/// Errors when `total == 0` or `num_frames == 0`.
pub fn sample_indices(total: usize, num_frames: usize, sampling: FrameSampling) -> Result<Vec<usize>> {
    if total == 0 {
        return Err(Error::Input("cannot sample frames from a video with 0 frames".into()));
    }
    if num_frames == 0 {
        return Err(Error::Input("num_frames must be at least 1".into()));
    }
    let indices = match sampling {
        FrameSampling::Uniform => {
            // numpy: step = total / N; arange has ceil(total / step) >= N values i * step (start 0);
            // astype(int) truncates. Only the first N are kept.
            let step = total as f64 / num_frames as f64;
            (0..num_frames).map(|i| (i as f64 * step) as usize).collect()
        }
        FrameSampling::Linspace => {
            if num_frames == 1 {
                vec![0]
            } else {
                // numpy: step = (stop - start) / (num - 1); y = i * step (or i / div * delta when
                // step == 0, i.e. all zeros); the last value is set to `stop` exactly.
                let stop = (total - 1) as f64;
                let step = stop / (num_frames - 1) as f64;
                let mut v: Vec<usize> = (0..num_frames).map(|i| (i as f64 * step) as usize).collect();
                v[num_frames - 1] = total - 1;
                v
            }
        }
    };
    Ok(indices)
}

/// Containers FFmpeg may open (demuxer names; a name matches any alias of a demuxer). Every
/// demuxer that opens other inputs (HLS/DASH playlists, `concat`, image sequences, `tee`, ...)
/// is absent, and nested opens are refused anyway ([`PROTOCOL_WHITELIST`]).
const FORMAT_WHITELIST: &str =
    "mov,matroska,webm,avi,gif,mpegts,flv,ogg,h264,hevc,m4v,mpegvideo,yuv4mpegpipe,ivf,mjpeg,asf,mpeg";
/// Protocols FFmpeg may open while demuxing: none (the bytes come through our own reader).
const PROTOCOL_WHITELIST: &str = "none";
const SUPPORTED_CONTAINERS: &str =
    "MP4/MOV, Matroska/WebM, AVI, GIF, MPEG-TS/PS, FLV, Ogg, IVF, Y4M, raw H.264/HEVC/MPEG-4";

/// Where the bytes of a video come from. FFmpeg reads them through a custom I/O context: it is
/// never given a file name or URL, so it cannot be steered into opening anything else.
#[derive(Clone)]
enum Source {
    File(PathBuf),
    Bytes(Arc<[u8]>),
}

trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

impl Source {
    fn reader(&self) -> Result<Box<dyn ReadSeek>> {
        match self {
            Source::File(p) => {
                std::fs::File::open(p).map(|f| Box::new(f) as Box<dyn ReadSeek>).map_err(|e| Error::io(p, e))
            }
            Source::Bytes(b) => Ok(Box::new(Cursor::new(b.clone()))),
        }
    }

    fn head(&self) -> Vec<u8> {
        match self {
            Source::Bytes(b) => b[..b.len().min(64)].to_vec(),
            Source::File(p) => {
                let mut head = Vec::new();
                if let Ok(f) = std::fs::File::open(p) {
                    let _ = f.take(64).read_to_end(&mut head);
                }
                head
            }
        }
    }
}

/// Decodes a video file and returns `options.num_frames` frames chosen by `options.sampling`.
///
/// * Frames are counted in the order the decoder emits them (presentation order, B-frames
///   reordered, decoder flushed at end of stream), from the best video stream.
/// * `total_frames` is the container's frame count when it agrees with the number of frames
///   actually decoded, else the decoded count (webm/mkv headers say 0). `frame_indices` are
///   [`sample_indices`]`(total_frames, num_frames, sampling)`.
/// * Each frame is `[height, width, 3]` u8 RGB, byte-identical to PyAV's
///   `frame.to_ndarray(format="rgb24")`.
///
/// Only the chosen frames are converted to RGB and only they are kept in memory. When the header
/// count is missing the stream is demuxed once (cheap) to count packets; if the decoded count
/// still disagrees, the file is decoded a second time with indices from the real count.
///
/// [`MediaLimits::default`] applies: frame size and aspect ratio (header and every frame), frame
/// count and duration (enforced while demuxing and decoding, whatever the header says).
///
/// Errors (one line naming the file): missing/unreadable file, not a supported container (HLS
/// playlists, concat lists, image sequences are refused), truncated container, no video stream,
/// unsupported codec, decoding failure, zero decodable frames, over a limit, `num_frames == 0`.
pub fn decode_video_file(path: &Path, options: &VideoOptions) -> Result<Video> {
    decode_video_file_with(path, options, &MediaLimits::default(), &Cancel::new())
}

/// [`decode_video_file`] with explicit limits and a cancellation flag.
pub fn decode_video_file_with(
    path: &Path,
    options: &VideoOptions,
    limits: &MediaLimits,
    cancel: &Cancel,
) -> Result<Video> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::media(path.display().to_string(), "not a regular file"));
    }
    decode(&Source::File(path.to_path_buf()), &path.display().to_string(), options, limits, cancel)
}

/// [`decode_video_file`] for bytes in memory; `source_name` names the input in errors. The same
/// bytes decoded again with the same options and limits come from [`super::recent`] (no decode).
pub fn decode_video_bytes(
    bytes: Arc<[u8]>,
    source_name: &str,
    options: &VideoOptions,
    limits: &MediaLimits,
    cancel: &Cancel,
) -> Result<Video> {
    if bytes.is_empty() {
        return Err(Error::media(source_name, "the file is empty (0 bytes), not a video"));
    }
    let key = recent_key(&bytes, options, limits);
    if let Some(video) = super::recent::get(&key) {
        cancel.check(source_name)?;
        let pixels = video.frames.iter().map(|f| (f.width * f.height) as u64).sum();
        limits.reserve(source_name, pixels)?;
        return Ok(Video::clone(&video));
    }
    let video = decode(&Source::Bytes(bytes), source_name, options, limits, cancel)?;
    super::recent::put(key, &video);
    Ok(video)
}

/// Whether [`decode_video_bytes`] of `bytes` with `options` under `limits` would take the video
/// from memory ([`super::recent`]) instead of decoding it.
pub fn decoded_bytes_are_kept(bytes: &[u8], options: &VideoOptions, limits: &MediaLimits) -> bool {
    super::recent::holds(&recent_key(bytes, options, limits))
}

fn recent_key(bytes: &[u8], options: &VideoOptions, limits: &MediaLimits) -> [u8; 32] {
    super::recent::key(bytes, &[options.num_frames as u64, options.sampling as u64], limits)
}

fn decode(source: &Source, name: &str, options: &VideoOptions, limits: &MediaLimits, cancel: &Cancel) -> Result<Video> {
    if options.num_frames == 0 {
        return Err(Error::media(name, "num_frames must be at least 1"));
    }
    init_ffmpeg();
    refuse_playlists(&source.head(), name)?;

    let (mut input, stream_index) = open_video(source, name, limits, cancel)?;
    // The kept frames, at the header's size (each decoded frame is checked against the limits).
    // SAFETY: `codecpar` of a stream of an open input is a valid AVCodecParameters; plain fields.
    let (w, h) = input
        .stream(stream_index)
        .map(|s| unsafe {
            let par = &*s.parameters().as_ptr();
            (par.width.max(0) as u64, par.height.max(0) as u64)
        })
        .unwrap_or((0, 0));
    let mut reserved = Reserved { per_frame: w.saturating_mul(h), frames: options.num_frames as u64 };
    limits.reserve(name, reserved.frames.saturating_mul(reserved.per_frame))?;
    let header_frames = input.stream(stream_index).map(|s| usize::try_from(s.frames()).unwrap_or(0)).unwrap_or(0);
    let frame_rate = input.stream(stream_index).and_then(|s| {
        let r = s.avg_frame_rate();
        (r.numerator() > 0 && r.denominator() > 0).then(|| f64::from(r.numerator()) / f64::from(r.denominator()))
    });
    let duration = (input.duration() > 0).then(|| input.duration() as f64 / f64::from(ff::ffi::AV_TIME_BASE));
    if header_frames as u64 > limits.max_video_frames {
        return Err(too_many_frames(name, limits, Some(header_frames)));
    }
    // Our guess of the frame count: the header, or else the number of packets of the stream (one
    // frame per packet for nearly every codec), counted by a demux-only pass (bounded).
    let guess = if header_frames > 0 {
        header_frames
    } else {
        let mut clock = Clock::new(&input, stream_index);
        let mut packets = 0u64;
        for (s, packet) in input.packets() {
            if s.index() != stream_index {
                continue;
            }
            cancel.check(name)?;
            packets += 1;
            if packets > limits.max_video_frames {
                return Err(too_many_frames(name, limits, None));
            }
            clock.check(packet.pts().or(packet.dts()), name, limits)?;
        }
        (input, _) = open_video(source, name, limits, cancel)?;
        packets as usize
    };

    let (total, frames) = if guess > 0 {
        let indices = sample_indices(guess, options.num_frames, options.sampling)?;
        let pass = decode_pass(input, stream_index, name, &indices, limits, cancel, &mut reserved)?;
        if pass.decoded == guess {
            (guess, pass.frames)
        } else {
            rerun(source, name, options, pass.decoded, limits, cancel, &mut reserved)?
        }
    } else {
        let pass = decode_pass(input, stream_index, name, &[], limits, cancel, &mut reserved)?;
        rerun(source, name, options, pass.decoded, limits, cancel, &mut reserved)?
    };
    let frame_indices = sample_indices(total, options.num_frames, options.sampling)?;
    Ok(Video { frames, frame_indices, total_frames: total, frame_rate, duration })
}

fn too_many_frames(name: &str, limits: &MediaLimits, claimed: Option<usize>) -> Error {
    match claimed {
        Some(n) => Error::media(name, format!("video has {n} frames, over the limit of {}", limits.max_video_frames)),
        None => Error::media(name, format!("video has more than {} frames (the limit)", limits.max_video_frames)),
    }
}

/// Clear errors for text files FFmpeg would follow (its demuxers for them are not allowed anyway).
fn refuse_playlists(head: &[u8], name: &str) -> Result<()> {
    let text = String::from_utf8_lossy(head);
    let t = text.trim_start_matches('\u{feff}').trim_start();
    let kind = if t.starts_with("#EXTM3U") || t.starts_with("#EXT-X-") {
        Some("an HLS playlist (.m3u8)")
    } else if t.starts_with("ffconcat") {
        Some("an FFmpeg concat list")
    } else if t.starts_with("<?xml") || t.starts_with("<MPD") || t.starts_with("<smil") {
        Some("an XML manifest (DASH/SMIL)")
    } else if t.starts_with("[playlist]") || t.starts_with("#EXTINF") {
        Some("a playlist")
    } else {
        None
    };
    match kind {
        Some(k) => Err(Error::media(
            name,
            format!(
                "{k} is not a video: playlists and lists that name other files are refused (send the video itself)"
            ),
        )),
        None => Ok(()),
    }
}

/// Presentation-time bound of a stream: refuses timestamps past `max_video_seconds` after the first.
struct Clock {
    time_base: f64,
    start: Option<i64>,
}

impl Clock {
    fn new(input: &ff::format::context::Input, index: usize) -> Self {
        let tb = input.stream(index).map(|s| s.time_base()).unwrap_or(ff::Rational(0, 1));
        let time_base =
            if tb.denominator() != 0 { f64::from(tb.numerator()) / f64::from(tb.denominator()) } else { 0.0 };
        Self { time_base, start: None }
    }

    fn check(&mut self, ts: Option<i64>, name: &str, limits: &MediaLimits) -> Result<()> {
        let Some(ts) = ts else { return Ok(()) };
        let start = *self.start.get_or_insert(ts);
        let seconds = (ts.saturating_sub(start)) as f64 * self.time_base;
        if seconds > limits.max_video_seconds {
            return Err(Error::media(
                name,
                format!("video lasts more than {} s (the limit): a frame at {seconds:.1} s", limits.max_video_seconds),
            ));
        }
        Ok(())
    }
}

/// Second pass once the real frame count is known.
fn rerun(
    source: &Source,
    name: &str,
    options: &VideoOptions,
    decoded: usize,
    limits: &MediaLimits,
    cancel: &Cancel,
    reserved: &mut Reserved,
) -> Result<(usize, Vec<RgbImage>)> {
    if decoded == 0 {
        return Err(Error::media(name, "the video stream has no decodable frames"));
    }
    let indices = sample_indices(decoded, options.num_frames, options.sampling)?;
    let (input, stream_index) = open_video(source, name, limits, cancel)?;
    let pass = decode_pass(input, stream_index, name, &indices, limits, cancel, reserved)?;
    if pass.decoded != decoded {
        return Err(Error::media(
            name,
            format!("decoded {} frames on the second pass but {decoded} on the first", pass.decoded),
        ));
    }
    Ok((decoded, pass.frames))
}

fn init_ffmpeg() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Registers nothing on FFmpeg >= 4 but keeps older builds working. FFmpeg's own log is
        // silenced: every failure reaches the caller as one error naming the file.
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Quiet);
    });
}

/// Opens the container through a custom I/O context over `source` (only allowed demuxers, no
/// nested opens), checks its duration and finds its best video stream, whose frame size is
/// checked against `limits` when the header gives it.
fn open_video(
    source: &Source,
    name: &str,
    limits: &MediaLimits,
    cancel: &Cancel,
) -> Result<(ff::format::context::Input, usize)> {
    let io = ff::format::context::StreamIo::from_read_seek(source.reader()?)
        .map_err(|e| Error::media(name, format!("cannot set up reading: {e}")))?;
    let mut dict = ff::Dictionary::new();
    dict.set("format_whitelist", FORMAT_WHITELIST);
    dict.set("protocol_whitelist", PROTOCOL_WHITELIST);
    // Bounded probing: FFmpeg reads at most this much to find the streams.
    dict.set("probesize", "33554432");
    dict.set("analyzeduration", "30000000");
    let flag = cancel.clone();
    let input = ff::format::input_from_stream_with_interrupt(io, None, Some(dict), move || flag.is_cancelled())
        .map_err(|e| match e {
            ff::Error::Exit => {
                Error::media(name, "decoding cancelled (the request failed, timed out or its client left)")
            }
            ff::Error::InvalidData | ff::Error::Other { errno: ff::util::error::EINVAL } => Error::media(
                name,
                format!(
                    "not a supported video container ({SUPPORTED_CONTAINERS}; playlists, concat lists and image \
                     sequences are refused): {e}"
                ),
            ),
            e => Error::media(name, format!("cannot open as a media file: {e}")),
        })?;
    let duration = input.duration();
    if duration > 0 {
        let seconds = duration as f64 / f64::from(ff::ffi::AV_TIME_BASE);
        if seconds > limits.max_video_seconds {
            return Err(Error::media(
                name,
                format!("video lasts {seconds:.1} s, over the limit of {} s", limits.max_video_seconds),
            ));
        }
    }
    let stream = input.streams().best(ff::media::Type::Video).ok_or_else(|| Error::media(name, "no video stream"))?;
    let index = stream.index();
    // SAFETY: `codecpar` of a stream of an open input is a valid AVCodecParameters; plain fields.
    let (w, h) = unsafe {
        let par = &*stream.parameters().as_ptr();
        (par.width, par.height)
    };
    if w > 0 && h > 0 {
        limits.check_size(name, "video frame", w as u64, h as u64)?;
    }
    Ok((input, index))
}

/// Pixels asked of the budget for the kept frames: `frames` frames of `per_frame` pixels. Grows
/// when a decoded frame is larger than the header said.
struct Reserved {
    per_frame: u64,
    frames: u64,
}

struct Pass {
    /// Frames the decoder produced.
    decoded: usize,
    /// RGB frames for the requested indices, in request order (empty when none were requested or
    /// some index was never reached).
    frames: Vec<RgbImage>,
}

/// Decodes the whole stream `index` of a freshly opened `input`, converting only the frames whose
/// index is in `wanted`. Stops with an error past `limits` (frame count, presentation time, frame
/// size) or when `cancel` is set.
fn decode_pass(
    mut input: ff::format::context::Input,
    index: usize,
    name: &str,
    wanted: &[usize],
    limits: &MediaLimits,
    cancel: &Cancel,
    reserved: &mut Reserved,
) -> Result<Pass> {
    let params = input.stream(index).ok_or_else(|| Error::media(name, "no video stream"))?.parameters();
    let mut clock = Clock::new(&input, index);
    let mut ctx = ff::codec::context::Context::from_parameters(params)
        .map_err(|e| Error::media(name, format!("cannot set up the decoder: {e}")))?;
    // Frame threading: output is bit-identical to single-threaded decoding (FFmpeg guarantees it
    // for its frame-threaded decoders); 0 lets FFmpeg pick the thread count.
    ctx.set_threading(ff::codec::threading::Config {
        kind: ff::codec::threading::Type::Frame,
        count: 0,
        ..Default::default()
    });
    // FFmpeg checks its `max_pixels` against the *coded* size (rounded up to whole macroblocks:
    // a 48x36 H.264 frame is coded as 48x48), so it gets twice our limit plus one 256x256 block
    // of slack; every decoded frame is then checked against the exact limit.
    let ffmpeg_max = limits.max_pixels.saturating_mul(2).saturating_add(1 << 16).min(i64::MAX as u64) as i64;
    // SAFETY: `ctx` owns a valid AVCodecContext not yet opened; `max_pixels` makes the decoder
    // refuse to allocate frames over the limit whatever the bitstream says.
    unsafe {
        (*ctx.as_mut_ptr()).max_pixels = ffmpeg_max;
    }
    let codec_id = ctx.id();
    let mut decoder = ctx.decoder().video().map_err(|e| match e {
        ff::Error::DecoderNotFound if codec_id == ff::codec::Id::None => {
            Error::media(name, "unknown video codec: no decoder available")
        }
        ff::Error::DecoderNotFound => {
            Error::media(name, format!("unsupported video codec {codec_id:?}: no decoder available"))
        }
        e => Error::media(name, format!("cannot open the {codec_id:?} decoder: {e}")),
    })?;

    // Which requested positions each frame index fills.
    let mut targets: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (pos, &i) in wanted.iter().enumerate() {
        targets.entry(i).or_default().push(pos);
    }
    let mut out: Vec<Option<RgbImage>> = vec![None; wanted.len()];
    let mut converter = Converter::default();
    let mut decoded = 0usize;
    let mut frame = ff::frame::Video::empty();

    let mut drain = |decoder: &mut ff::decoder::Video, decoded: &mut usize| -> Result<()> {
        loop {
            match decoder.receive_frame(&mut frame) {
                Ok(()) => {
                    if *decoded as u64 >= limits.max_video_frames {
                        return Err(too_many_frames(name, limits, None));
                    }
                    clock.check(frame.timestamp(), name, limits)?;
                    limits.check_size(name, "video frame", u64::from(frame.width()), u64::from(frame.height()))?;
                    if let Some(positions) = targets.get(decoded) {
                        let pixels = u64::from(frame.width()) * u64::from(frame.height());
                        if pixels > reserved.per_frame {
                            limits.reserve(name, (pixels - reserved.per_frame).saturating_mul(reserved.frames))?;
                            reserved.per_frame = pixels;
                        }
                        let rgb = converter.convert(&frame, name)?;
                        for &p in positions {
                            out[p] = Some(rgb.clone());
                        }
                    }
                    *decoded += 1;
                }
                Err(ff::Error::Eof) => return Ok(()),
                Err(ff::Error::Other { errno }) if errno == ff::util::error::EAGAIN => return Ok(()),
                Err(e) => return Err(Error::media(name, format!("decoding frame {decoded} failed: {e}"))),
            }
        }
    };

    for (stream, packet) in input.packets() {
        if stream.index() != index {
            continue;
        }
        cancel.check(name)?;
        decoder
            .send_packet(&packet)
            .map_err(|e| Error::media(name, format!("decoding failed after {decoded} frames: {e}")))?;
        drain(&mut decoder, &mut decoded)?;
    }
    cancel.check(name)?;
    decoder.send_eof().map_err(|e| Error::media(name, format!("flushing the decoder failed: {e}")))?;
    drain(&mut decoder, &mut decoded)?;

    let frames = if !wanted.is_empty() && out.iter().all(Option::is_some) {
        out.into_iter().flatten().collect()
    } else {
        Vec::new()
    };
    Ok(Pass { decoded, frames })
}

/// Source properties a scaler is set up for: (format, width, height, colorspace, full range).
type ScalerKey = (Pixel, u32, u32, c_int, bool);

/// YUV (or palette, or RGB) frames to packed RGB24 with the conversion PyAV 18 performs.
#[derive(Default)]
struct Converter {
    scaler: Option<(Scaler, ScalerKey)>,
    rgb: Option<ff::frame::Video>,
}

impl Converter {
    fn convert(&mut self, frame: &ff::frame::Video, name: &str) -> Result<RgbImage> {
        let (format, width, height) = (frame.format(), frame.width(), frame.height());
        if format == Pixel::None || width == 0 || height == 0 {
            return Err(Error::media(name, "decoder produced a frame without pixel format or size"));
        }
        // SAFETY: `frame` wraps a valid decoded AVFrame; reading two plain enum fields.
        let (colorspace, full_range) = unsafe {
            let raw = &*frame.as_ptr();
            (raw.colorspace as c_int, raw.color_range == ff::ffi::AVColorRange::AVCOL_RANGE_JPEG)
        };
        let full_range = full_range
            || matches!(
                format,
                Pixel::YUVJ420P | Pixel::YUVJ422P | Pixel::YUVJ444P | Pixel::YUVJ440P | Pixel::YUVJ411P
            );
        let key = (format, width, height, colorspace, full_range);
        if self.scaler.as_ref().map(|(_, k)| *k != key).unwrap_or(true) {
            let mut scaler = Scaler::get(format, width, height, Pixel::RGB24, width, height, Flags::BILINEAR)
                .map_err(|e| Error::media(name, format!("no RGB conversion from {format:?}: {e}")))?;
            // SAFETY: the scaler pointer is valid for the life of `scaler`; sws_getCoefficients
            // returns a pointer to a static table (any index is accepted and mapped to the default).
            // This mirrors what FFmpeg's sws_scale_frame does with the frame's colour properties:
            // source matrix = the frame's colorspace, source range = its color_range, RGB output
            // full range.
            unsafe {
                let src_table = ff::ffi::sws_getCoefficients(colorspace);
                let dst_table = ff::ffi::sws_getCoefficients(ff::ffi::SWS_CS_DEFAULT as c_int);
                ff::ffi::sws_setColorspaceDetails(
                    scaler.as_mut_ptr(),
                    src_table,
                    full_range as c_int,
                    dst_table,
                    1,
                    0,
                    1 << 16,
                    1 << 16,
                );
            }
            self.scaler = Some((scaler, key));
            self.rgb = None;
        }
        let (scaler, _) = self.scaler.as_mut().expect("set above");
        let rgb = self.rgb.get_or_insert_with(ff::frame::Video::empty);
        scaler.run(frame, rgb).map_err(|e| Error::media(name, format!("RGB conversion failed: {e}")))?;
        let (w, h) = (width as usize, height as usize);
        let stride = rgb.stride(0);
        let src = rgb.data(0);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            data.extend_from_slice(&src[y * stride..y * stride + w * 3]);
        }
        RgbImage::new(w, h, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sampling() {
        assert_eq!("uniform".parse::<FrameSampling>().unwrap(), FrameSampling::Uniform);
        assert_eq!("Linspace".parse::<FrameSampling>().unwrap(), FrameSampling::Linspace);
        let err = "random".parse::<FrameSampling>().unwrap_err().to_string();
        assert!(err.contains("random") && err.contains("uniform") && err.contains("linspace"), "{err}");
        assert_eq!(FrameSampling::default(), FrameSampling::Uniform);
        assert_eq!(VideoOptions::default().num_frames, 8);
    }

    fn y4m(width: usize, height: usize, frames: usize, fps: &str) -> Arc<[u8]> {
        let mut v = format!("YUV4MPEG2 W{width} H{height} F{fps} Ip A1:1 C420jpeg\n").into_bytes();
        for _ in 0..frames {
            v.extend_from_slice(b"FRAME\n");
            v.extend(std::iter::repeat_n(128u8, width * height + 2 * width.div_ceil(2) * height.div_ceil(2)));
        }
        Arc::from(v)
    }

    fn decode_y4m(bytes: Arc<[u8]>, limits: &MediaLimits) -> Result<Video> {
        decode_video_bytes(bytes, "clip", &VideoOptions::default(), limits, &Cancel::new())
    }

    #[test]
    fn limits_hold_while_decoding() {
        let limits = MediaLimits { max_video_frames: 100, max_video_seconds: 10.0, ..MediaLimits::default() };
        let v = decode_y4m(y4m(4, 4, 100, "25:1"), &limits).unwrap();
        assert_eq!((v.total_frames, v.frames.len()), (100, 8));
        let e = decode_y4m(y4m(4, 4, 101, "25:1"), &limits).unwrap_err().to_string();
        assert!(e.contains("more than 100 frames"), "{e}");
        let e = decode_y4m(y4m(4, 4, 3, "1:10"), &limits).unwrap_err().to_string();
        assert!(e.contains("lasts 30.0 s, over the limit of 10 s"), "{e}");
        // Timestamps are checked while demuxing and decoding, whatever the header says.
        let mut clock = Clock { time_base: 0.001, start: None };
        assert!(clock.check(Some(5_000), "clip", &limits).is_ok());
        assert!(clock.check(None, "clip", &limits).is_ok());
        assert!(clock.check(Some(15_000), "clip", &limits).is_ok());
        let e = clock.check(Some(15_001), "clip", &limits).unwrap_err().to_string();
        assert!(e.contains("lasts more than 10 s"), "{e}");
        let e = decode_y4m(y4m(2_000_000, 1, 1, "25:1"), &limits).unwrap_err().to_string();
        assert!(e.contains("2000000x1"), "{e}");
        let cancel = Cancel::new();
        cancel.cancel();
        let e = decode_video_bytes(y4m(4, 4, 5, "25:1"), "clip", &VideoOptions::default(), &limits, &cancel)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cancelled"), "{e}");
        // The budget hook sees the kept frames' pixels before decoding: 8 frames of 4x4.
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let limits = MediaLimits {
            budget: crate::media::limits::Budget::new(move |n| {
                s2.lock().unwrap().push(n);
                if n > 1000 {
                    Err("too many".into())
                } else {
                    Ok(())
                }
            }),
            ..MediaLimits::default()
        };
        decode_y4m(y4m(4, 4, 5, "25:1"), &limits).unwrap();
        assert_eq!(*seen.lock().unwrap(), [8 * 16]);
        let e = decode_y4m(y4m(16, 16, 5, "25:1"), &limits).unwrap_err().to_string();
        assert!(e.contains("too many"), "{e}");
    }

    /// Playlists are refused by the sniffing, and FFmpeg refuses them too (format whitelist, no
    /// nested opens) when the sniffing is bypassed.
    #[test]
    fn playlists_never_open_other_files() {
        let dir = std::env::temp_dir().join(format!("videollava-playlist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let real = dir.join("real.y4m");
        std::fs::write(&real, &*y4m(4, 4, 3, "25:1")).unwrap();
        let lists = [
            format!("#EXTM3U\n#EXTINF:1.0,\nfile://{}\n#EXT-X-ENDLIST\n", real.display()),
            format!("ffconcat version 1.0\nfile '{}'\n", real.display()),
        ];
        for list in &lists {
            let bytes: Arc<[u8]> = Arc::from(list.as_bytes().to_vec());
            let e = decode_y4m(bytes.clone(), &MediaLimits::default()).unwrap_err().to_string();
            assert!(e.contains("refused"), "{e}");
            init_ffmpeg();
            let e = open_video(&Source::Bytes(bytes), "list", &MediaLimits::default(), &Cancel::new())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a supported video container"), "{e}");
        }
        // Image sequences by pattern need a file name; FFmpeg never gets one.
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sample_indices_basic() {
        // np.arange(0, 100, 100 / 8).astype(int) and np.linspace(0, 99, 8).astype(int)
        assert_eq!(sample_indices(100, 8, FrameSampling::Uniform).unwrap(), [0, 12, 25, 37, 50, 62, 75, 87]);
        assert_eq!(sample_indices(100, 8, FrameSampling::Linspace).unwrap(), [0, 14, 28, 42, 56, 70, 84, 99]);
        // np.arange(0, 5, 5 / 8).astype(int) and np.linspace(0, 4, 8).astype(int)
        assert_eq!(sample_indices(5, 8, FrameSampling::Uniform).unwrap(), [0, 0, 1, 1, 2, 3, 3, 4]);
        assert_eq!(sample_indices(5, 8, FrameSampling::Linspace).unwrap(), [0, 0, 1, 1, 2, 2, 3, 4]);
        assert_eq!(sample_indices(1, 8, FrameSampling::Linspace).unwrap(), [0; 8]);
        assert_eq!(sample_indices(7, 1, FrameSampling::Linspace).unwrap(), [0]);
        assert!(sample_indices(0, 8, FrameSampling::Uniform).is_err());
        assert!(sample_indices(10, 0, FrameSampling::Uniform).is_err());
    }
}
