//! Still-image decoding to exactly the pixels `PIL.Image.open(path).convert("RGB")` gives
//! (Pillow 13), which is what transformers' image processor receives.
//!
//! Formats are recognised from their magic bytes, never from the file name:
//!
//! * **JPEG** through libjpeg-turbo (the `turbojpeg` crate, built from source), as Pillow does:
//!   ISLOW integer IDCT and fancy (triangle) chroma upsampling, the libjpeg defaults Pillow keeps.
//!   Greyscale JPEGs are replicated to three channels. Four-component JPEGs (CMYK, and YCCK which
//!   libjpeg turns into CMYK) are taken as Adobe-inverted, as Pillow always does (raw mode
//!   `CMYK;I`: every sample inverted), then converted with Pillow's `cmyk2rgb`, see [`cmyk_to_rgb`].
//!   libjpeg *warnings* (for example extraneous bytes before a marker) are tolerated as Pillow
//!   tolerates them; a file that ends early is an error (Pillow: "image file is truncated").
//! * **PNG** through the `png` crate with no transformations, then Pillow's unpackers: 1-bit grey
//!   gives 0/255, 2- and 4-bit grey are scaled by 85 and 17, 16-bit colour keeps the high byte,
//!   16-bit grey (Pillow mode `I;16`) is clipped to 255 (not scaled), palette indices outside
//!   `PLTE` give black, and alpha and `tRNS` are dropped without compositing.
//! * **GIF**: first frame only, as Pillow's `P` (or `L`) image: the canvas is the logical screen
//!   (grown if the frame reaches past it), filled with the frame's transparent index when it has
//!   one, else index 0; colours come from the local palette, else the global one (indices outside
//!   the palette give black); with no palette, or a palette that is the identity grey ramp, the
//!   index itself is the grey level (Pillow mode `L`). The transparent index shows its palette
//!   colour, not black.
//! * **WebP** (lossy, lossless, alpha; animated: the first frame) and **BMP** through the `image`
//!   crate; alpha is dropped. 16-bit BMPs are unpacked here with Pillow's truncating widening.
//!
//! EXIF orientation is **not** applied: `Image.open` does not apply it either (that takes an
//! explicit `ImageOps.exif_transpose`), so rotated phone photos come out as stored, as in the
//! Python reference. Embedded ICC profiles are ignored, as `convert("RGB")` ignores them.
//!
//! Sizes are checked against [`MediaLimits`] (sides, pixels, aspect ratio) from the header,
//! before any pixel buffer is allocated; progressive JPEGs have a scan limit; non-interlaced PNGs
//! are decoded row by row (no full-resolution 16-bit buffer).

use std::io::Cursor;
use std::path::Path;

use crate::error::{Error, Result};
use crate::media::{MediaLimits, RgbImage};

const SUPPORTED: &str = "supported formats: JPEG, PNG, GIF, WebP, BMP";

/// Decodes an image file (format from the magic bytes, not the extension) to RGB u8, as Pillow's
/// `Image.open(path).convert("RGB")`. EXIF orientation is not applied (Pillow does not either).
/// Sizes are checked against [`MediaLimits::default`].
pub fn decode_image_file(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image_bytes(&bytes, &path.display().to_string())
}

/// The same for bytes in memory; `source_name` names the input in errors (a path, a URL, "image #2").
pub fn decode_image_bytes(bytes: &[u8], source_name: &str) -> Result<RgbImage> {
    decode_image_bytes_with(bytes, source_name, &MediaLimits::default())
}

/// [`decode_image_bytes`] with explicit limits, checked from the header before decoding.
pub fn decode_image_bytes_with(bytes: &[u8], source_name: &str, limits: &MediaLimits) -> Result<RgbImage> {
    let name = source_name;
    if bytes.is_empty() {
        return Err(Error::media(name, "the file is empty (0 bytes), not an image"));
    }
    match sniff(bytes) {
        Kind::Jpeg => decode_jpeg(bytes, name, limits),
        Kind::Png => decode_png(bytes, name, limits),
        Kind::Gif => decode_gif(bytes, name, limits),
        Kind::WebP => decode_webp(bytes, name, limits),
        Kind::Bmp => decode_bmp(bytes, name, limits),
        Kind::Unsupported(format) => {
            Err(Error::media(name, format!("{format} images are not supported ({SUPPORTED})")))
        }
        Kind::Unknown => {
            Err(Error::media(name, format!("not a recognised image (starts with {}; {SUPPORTED})", hex_prefix(bytes))))
        }
    }
}

enum Kind {
    Jpeg,
    Png,
    Gif,
    WebP,
    Bmp,
    Unsupported(&'static str),
    Unknown,
}

fn sniff(b: &[u8]) -> Kind {
    let starts = |p: &[u8]| b.starts_with(p);
    if starts(&[0xFF, 0xD8, 0xFF]) {
        Kind::Jpeg
    } else if starts(b"\x89PNG\r\n\x1a\n") {
        Kind::Png
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        Kind::Gif
    } else if starts(b"RIFF") && (b.len() < 12 || &b[8..12] == b"WEBP") {
        Kind::WebP
    } else if starts(b"BM") {
        Kind::Bmp
    } else if starts(b"II*\0") || starts(b"MM\0*") || starts(b"II+\0") || starts(b"MM\0+") {
        Kind::Unsupported("TIFF")
    } else if b.len() >= 12 && &b[4..8] == b"ftyp" {
        match &b[8..12] {
            b"avif" | b"avis" => Kind::Unsupported("AVIF"),
            b"heic" | b"heix" | b"hevc" | b"heim" | b"heis" | b"mif1" | b"msf1" => Kind::Unsupported("HEIF/HEIC"),
            b"jp2 " => Kind::Unsupported("JPEG 2000"),
            _ => Kind::Unsupported("MP4/MOV (ISO base media)"),
        }
    } else if starts(b"\0\0\0\x0cjP  ") || starts(&[0xFF, 0x4F, 0xFF, 0x51]) {
        Kind::Unsupported("JPEG 2000")
    } else if starts(&[0xFF, 0x0A]) || starts(b"\0\0\0\x0cJXL ") {
        Kind::Unsupported("JPEG XL")
    } else if starts(b"8BPS") {
        Kind::Unsupported("Photoshop (PSD)")
    } else if starts(b"qoif") {
        Kind::Unsupported("QOI")
    } else if starts(&[0, 0, 1, 0]) || starts(&[0, 0, 2, 0]) {
        Kind::Unsupported("ICO/CUR")
    } else if starts(b"%PDF") {
        Kind::Unsupported("PDF")
    } else if looks_like_svg(b) {
        Kind::Unsupported("SVG")
    } else {
        Kind::Unknown
    }
}

fn looks_like_svg(b: &[u8]) -> bool {
    let head = &b[..b.len().min(1024)];
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let t = text.trim_start_matches('\u{feff}').trim_start();
    (t.starts_with("<?xml") || t.starts_with("<svg") || t.starts_with("<!doctype svg")) && text.contains("<svg")
}

fn hex_prefix(b: &[u8]) -> String {
    let n = b.len().min(8);
    let hex: Vec<String> = b[..n].iter().map(|x| format!("{x:02x}")).collect();
    format!("bytes {}{}", hex.join(" "), if b.len() > n { " ..." } else { "" })
}

fn check_size(limits: &MediaLimits, name: &str, format: &str, width: usize, height: usize) -> Result<()> {
    limits.check_size(name, &format!("{format} image"), width as u64, height as u64)?;
    limits.reserve(name, width as u64 * height as u64)
}

// ------------------------------------------------------------------------------------------ JPEG

fn decode_jpeg(bytes: &[u8], name: &str, limits: &MediaLimits) -> Result<RgbImage> {
    use turbojpeg::raw;

    let mut tj = TjDecompressor::new().ok_or_else(|| Error::media(name, "cannot start the JPEG decoder"))?;
    // Pillow's settings: ISLOW DCT and fancy upsampling (TurboJPEG's defaults; set explicitly), and
    // warnings do not stop decoding (Pillow ignores libjpeg warnings).
    tj.set(raw::TJPARAM_TJPARAM_FASTDCT, 0);
    tj.set(raw::TJPARAM_TJPARAM_FASTUPSAMPLE, 0);
    tj.set(raw::TJPARAM_TJPARAM_STOPONWARNING, 0);
    // A progressive JPEG of many tiny scans costs a pass over the image per scan.
    tj.set(raw::TJPARAM_TJPARAM_SCANLIMIT, limits.max_jpeg_scans.min(i32::MAX as u32) as i32);

    // SAFETY: the handle is valid; the buffer pointer and length come from one slice.
    let rc = unsafe { raw::tj3DecompressHeader(tj.0, bytes.as_ptr(), bytes.len() as _) };
    if rc != 0 {
        let msg = tj.message();
        if msg.contains("Premature end of JPEG file") {
            return Err(Error::media(name, "JPEG file is truncated (it ends inside its header)"));
        }
        if !tj.last_was_warning(&msg) {
            return Err(Error::media(name, format!("invalid JPEG: {msg}")));
        }
    }
    let (w, h) = (tj.get(raw::TJPARAM_TJPARAM_JPEGWIDTH), tj.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT));
    if w <= 0 || h <= 0 {
        return Err(Error::media(name, "invalid JPEG: no frame header (SOF) before the image data"));
    }
    let (w, h) = (w as usize, h as usize);
    check_size(limits, name, "JPEG", w, h)?;
    let precision = tj.get(raw::TJPARAM_TJPARAM_PRECISION);
    if precision != 8 {
        return Err(Error::media(name, format!("{precision}-bit JPEG is not supported (only 8-bit, as in Pillow)")));
    }
    // Pillow picks the mode from the number of components: 1 -> L, 3 -> RGB, 4 -> CMYK.
    let colorspace = tj.get(raw::TJPARAM_TJPARAM_COLORSPACE);
    let (format, channels) = if colorspace == raw::TJCS_TJCS_GRAY as i32 {
        (raw::TJPF_TJPF_GRAY, 1)
    } else if colorspace == raw::TJCS_TJCS_CMYK as i32 || colorspace == raw::TJCS_TJCS_YCCK as i32 {
        (raw::TJPF_TJPF_CMYK, 4)
    } else {
        (raw::TJPF_TJPF_RGB, 3)
    };
    let mut pixels = vec![0u8; w * h * channels];
    // SAFETY: `pixels` holds exactly height rows of `pitch` bytes for this pixel format.
    let rc = unsafe {
        raw::tj3Decompress8(
            tj.0,
            bytes.as_ptr(),
            bytes.len() as _,
            pixels.as_mut_ptr(),
            (w * channels) as _,
            format as _,
        )
    };
    if rc != 0 {
        let msg = tj.message();
        // libjpeg fills the missing part of a truncated file with grey and warns; Pillow raises
        // "image file is truncated" there, so that warning stays an error.
        if msg.contains("Premature end of JPEG file") {
            return Err(Error::media(name, format!("JPEG file is truncated ({msg})")));
        }
        if !tj.last_was_warning(&msg) {
            return Err(Error::media(name, format!("cannot decode JPEG: {msg}")));
        }
    }
    let data = match channels {
        1 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        4 => {
            let mut out = Vec::with_capacity(w * h * 3);
            for px in pixels.chunks_exact(4) {
                // Pillow reads four-component JPEGs as raw mode "CMYK;I" (Adobe inverted).
                out.extend_from_slice(&cmyk_to_rgb([255 - px[0], 255 - px[1], 255 - px[2], 255 - px[3]]));
            }
            out
        }
        _ => pixels,
    };
    RgbImage::new(w, h, data)
}

/// A TurboJPEG 3 decompression handle, used through the raw API so that libjpeg warnings
/// (recoverable; the image is still decoded) can be told apart from errors, and tolerated as
/// Pillow tolerates them. The `turbojpeg` crate's safe API turns every warning into an error.
struct TjDecompressor(turbojpeg::raw::tjhandle);

impl TjDecompressor {
    fn new() -> Option<Self> {
        // SAFETY: plain constructor; a null handle means failure.
        let h = unsafe { turbojpeg::raw::tj3Init(turbojpeg::raw::TJINIT_TJINIT_DECOMPRESS as _) };
        (!h.is_null()).then_some(Self(h))
    }
    fn set(&mut self, param: turbojpeg::raw::TJPARAM, value: i32) {
        // SAFETY: valid handle; these parameters always exist in TurboJPEG 3.
        unsafe { turbojpeg::raw::tj3Set(self.0, param as _, value as _) };
    }
    fn get(&mut self, param: turbojpeg::raw::TJPARAM) -> i32 {
        // SAFETY: valid handle.
        unsafe { turbojpeg::raw::tj3Get(self.0, param as _) as i32 }
    }
    /// Whether the failure that gave `msg` was only a libjpeg warning (decoding went on to the
    /// end). TurboJPEG reports TJERR_WARNING whenever any warning happened, even when a fatal
    /// error followed; the fatal error's text then replaces the warning's, so the text decides.
    fn last_was_warning(&mut self, msg: &str) -> bool {
        // SAFETY: valid handle.
        let code = unsafe { turbojpeg::raw::tj3GetErrorCode(self.0) };
        code == turbojpeg::raw::TJERR_TJERR_WARNING as std::os::raw::c_int && is_libjpeg_warning(msg)
    }
    fn message(&mut self) -> String {
        // SAFETY: TurboJPEG returns a NUL-terminated string it owns, valid until the next call.
        let msg = unsafe { std::ffi::CStr::from_ptr(turbojpeg::raw::tj3GetErrorStr(self.0)) };
        let msg = msg.to_string_lossy();
        // Drop the "tj3Decompress8(): " style prefix of TurboJPEG's own messages.
        msg.rsplit("(): ").next().unwrap_or(&msg).trim().to_string()
    }
}

/// The texts of libjpeg's JWRN_* messages (jerror.h).
fn is_libjpeg_warning(msg: &str) -> bool {
    [
        "Corrupt JPEG data",
        "Warning:",
        "Inconsistent progression sequence",
        "Invalid SOS parameters for sequential JPEG",
        "Premature end of JPEG file",
        "Application transferred too many scanlines",
        "Unknown Adobe color transform code",
    ]
    .iter()
    .any(|p| msg.starts_with(p))
}

impl Drop for TjDecompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { turbojpeg::raw::tj3Destroy(self.0) }
    }
}

/// Pillow's `cmyk2rgb` (`src/libImaging/Convert.c`): `nk = 255 - k`,
/// `out = clip8(nk - MULDIV255(c, nk))` with `MULDIV255(a, b) = ((a*b + 128) >> 8 + a*b + 128) >> 8`.
pub fn cmyk_to_rgb(cmyk: [u8; 4]) -> [u8; 3] {
    let nk = 255 - cmyk[3] as i32;
    let f = |c: u8| -> u8 {
        let tmp = c as i32 * nk + 128;
        let muldiv = ((tmp >> 8) + tmp) >> 8;
        (nk - muldiv).clamp(0, 255) as u8
    };
    [f(cmyk[0]), f(cmyk[1]), f(cmyk[2])]
}

// ------------------------------------------------------------------------------------------- PNG

fn decode_png(bytes: &[u8], name: &str, limits: &MediaLimits) -> Result<RgbImage> {
    let png_err = |e: png::DecodingError| Error::media(name, format!("cannot decode PNG: {}", png_message(e)));
    // The decoder's own allocations (chunks, a row or a frame) stay within the pixel limit.
    let budget = usize::try_from(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20)).unwrap_or(usize::MAX);
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: budget });
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(png_err)?;
    let (w, h) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    check_size(limits, name, "PNG", w, h)?;
    let (color, depth) = (reader.info().color_type, reader.info().bit_depth);
    let palette: Option<Vec<u8>> = reader.info().palette.as_ref().map(|p| p.to_vec());
    let bits = depth as usize;
    let mut data = Vec::with_capacity(w * h * 3);
    if reader.info().interlaced {
        // Adam7 rows come pass by pass: the whole frame is needed (bounded by the limits above).
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| Error::media(name, format!("PNG image of {w}x{h} is too large")))?;
        let mut buf = vec![0u8; size];
        let frame = reader.next_frame(&mut buf).map_err(png_err)?;
        let line = frame.line_size;
        for y in 0..h {
            png_row_to_rgb(&buf[y * line..(y + 1) * line], w, color, depth, bits, palette.as_deref(), &mut data);
        }
    } else {
        // Row by row: no full-resolution buffer of 16-bit samples.
        let mut rows = 0;
        while rows < h {
            let Some(row) = reader.next_row().map_err(png_err)? else { break };
            png_row_to_rgb(row.data(), w, color, depth, bits, palette.as_deref(), &mut data);
            rows += 1;
        }
        if rows < h {
            return Err(Error::media(name, "cannot decode PNG: the file is truncated"));
        }
    }
    RgbImage::new(w, h, data)
}

/// One unfiltered PNG row (`color`/`depth` samples) appended to `data` as RGB, with Pillow's
/// unpackers.
fn png_row_to_rgb(
    row: &[u8],
    w: usize,
    color: png::ColorType,
    depth: png::BitDepth,
    bits: usize,
    palette: Option<&[u8]>,
    data: &mut Vec<u8>,
) {
    use png::{BitDepth, ColorType};
    match (color, depth) {
        (ColorType::Grayscale, BitDepth::Sixteen) => {
            // Pillow mode I;16, convert("RGB") clips each value to 255.
            for x in 0..w {
                let v = u16::from_be_bytes([row[2 * x], row[2 * x + 1]]);
                let g = v.min(255) as u8;
                data.extend_from_slice(&[g, g, g]);
            }
        }
        (ColorType::Grayscale, _) => {
            let scale = match depth {
                BitDepth::One => 255,
                BitDepth::Two => 85,
                BitDepth::Four => 17,
                _ => 1,
            };
            for x in 0..w {
                let g = (sample(row, x, bits) as u32 * scale) as u8;
                data.extend_from_slice(&[g, g, g]);
            }
        }
        (ColorType::Indexed, _) => {
            let pal = palette.unwrap_or(&[]);
            for x in 0..w {
                let i = sample(row, x, bits) as usize;
                data.extend_from_slice(&palette_rgb(pal, i));
            }
        }
        (ColorType::Rgb, BitDepth::Sixteen) => {
            for x in 0..w {
                let p = &row[6 * x..6 * x + 6];
                data.extend_from_slice(&[p[0], p[2], p[4]]);
            }
        }
        (ColorType::Rgb, _) => data.extend_from_slice(&row[..3 * w]),
        (ColorType::GrayscaleAlpha, BitDepth::Sixteen) => {
            for x in 0..w {
                let g = row[4 * x];
                data.extend_from_slice(&[g, g, g]);
            }
        }
        (ColorType::GrayscaleAlpha, _) => {
            for x in 0..w {
                let g = row[2 * x];
                data.extend_from_slice(&[g, g, g]);
            }
        }
        (ColorType::Rgba, BitDepth::Sixteen) => {
            for x in 0..w {
                let p = &row[8 * x..8 * x + 8];
                data.extend_from_slice(&[p[0], p[2], p[4]]);
            }
        }
        (ColorType::Rgba, _) => {
            for x in 0..w {
                data.extend_from_slice(&row[4 * x..4 * x + 3]);
            }
        }
    }
}

fn png_message(e: png::DecodingError) -> String {
    match e {
        png::DecodingError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the file is truncated".to_string()
        }
        other => other.to_string(),
    }
}

/// Sample `x` of a packed row of 1, 2, 4 or 8-bit samples (MSB first).
fn sample(row: &[u8], x: usize, bits: usize) -> u8 {
    match bits {
        8 => row[x],
        1 | 2 | 4 => {
            let per = 8 / bits;
            let byte = row[x / per];
            let shift = 8 - bits * (x % per + 1);
            (byte >> shift) & ((1u16 << bits) - 1) as u8
        }
        _ => unreachable!("sample() is only called for 1, 2, 4 and 8-bit samples"),
    }
}

/// Colour of palette entry `i`; entries past the end of the palette are black, as in Pillow.
fn palette_rgb(pal: &[u8], i: usize) -> [u8; 3] {
    match pal.get(3 * i..3 * i + 3) {
        Some(c) => [c[0], c[1], c[2]],
        None => [0, 0, 0],
    }
}

// ------------------------------------------------------------------------------------------- GIF

fn decode_gif(bytes: &[u8], name: &str, limits: &MediaLimits) -> Result<RgbImage> {
    let gif_err = |e: gif::DecodingError| {
        let msg = match &e {
            gif::DecodingError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                "the file is truncated".to_string()
            }
            _ => e.to_string(),
        };
        Error::media(name, format!("cannot decode GIF: {msg}"))
    };
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    opts.check_frame_consistency(false);
    let memory =
        std::num::NonZeroU64::new(limits.max_pixels.saturating_mul(4).max(1)).unwrap_or(std::num::NonZeroU64::MIN);
    opts.set_memory_limit(gif::MemoryLimit::Bytes(memory));
    // The gif crate refuses frames without any colour table, which Pillow decodes as mode L
    // (index = grey level). Giving such files a global identity grey ramp is equivalent.
    let patched;
    let bytes = if bytes.len() >= 13 && bytes[10] & 0x80 == 0 {
        let mut b = Vec::with_capacity(bytes.len() + 768);
        b.extend_from_slice(&bytes[..13]);
        b[10] |= 0x87;
        b.extend((0..=255u8).flat_map(|i| [i, i, i]));
        b.extend_from_slice(&bytes[13..]);
        patched = b;
        &patched[..]
    } else {
        bytes
    };
    let mut dec = opts.read_info(Cursor::new(bytes)).map_err(gif_err)?;
    let (sw, sh) = (dec.width() as usize, dec.height() as usize);
    let global: Option<Vec<u8>> = dec.global_palette().map(|p| p.to_vec());
    let frame = match dec.next_frame_info().map_err(gif_err)? {
        Some(f) => f,
        None => return Err(Error::media(name, "GIF file holds no image (no frame)")),
    };
    let (fx, fy, fw, fh) = (frame.left as usize, frame.top as usize, frame.width as usize, frame.height as usize);
    // Pillow grows the image when the first frame reaches past the logical screen.
    let (w, h) = (sw.max(fx + fw), sh.max(fy + fh));
    check_size(limits, name, "GIF", w, h)?;
    let transparent = frame.transparent;
    let local: Option<Vec<u8>> = frame.palette.clone();
    let mut indices = vec![0u8; fw * fh];
    dec.read_into_buffer(&mut indices).map_err(gif_err)?;

    // Pillow: canvas filled with the transparent index (frame 0 with transparency) or 0.
    let mut canvas = vec![transparent.unwrap_or(0); w * h];
    for y in 0..fh {
        canvas[(fy + y) * w + fx..(fy + y) * w + fx + fw].copy_from_slice(&indices[y * fw..(y + 1) * fw]);
    }
    let palette = local.or(global).filter(|p| !is_grey_ramp(p));
    let data = match palette {
        Some(pal) => canvas.iter().flat_map(|&i| palette_rgb(&pal, i as usize)).collect(),
        None => canvas.iter().flat_map(|&i| [i, i, i]).collect(),
    };
    RgbImage::new(w, h, data)
}

/// Pillow's `GifImageFile._is_palette_needed` is false for an identity grey ramp: mode L, the
/// index is the grey level (even past the end of the palette).
fn is_grey_ramp(p: &[u8]) -> bool {
    p.chunks(3).enumerate().all(|(i, c)| c.len() == 3 && c.iter().all(|&v| v as usize == i))
}

// ------------------------------------------------------------------------------------ WebP, BMP

fn decode_webp(bytes: &[u8], name: &str, limits: &MediaLimits) -> Result<RgbImage> {
    let dec = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).map_err(|e| image_err(name, "WebP", e))?;
    decode_with_image(dec, name, "WebP", limits)
}

fn decode_bmp(bytes: &[u8], name: &str, limits: &MediaLimits) -> Result<RgbImage> {
    if let Some(img) = decode_bmp16(bytes, name, limits)? {
        return Ok(img);
    }
    let dec = image::codecs::bmp::BmpDecoder::new(Cursor::new(bytes)).map_err(|e| image_err(name, "BMP", e))?;
    decode_with_image(dec, name, "BMP", limits)
}

/// 16-bit BMPs (5-5-5, and 5-6-5 bitfields): the `image` crate rounds when widening the
/// channels, Pillow's `BGR;15` / `BGR;16` unpackers truncate (`v * 255 / 31`), so these are
/// unpacked here. `None` for every other kind of BMP.
fn decode_bmp16(b: &[u8], name: &str, limits: &MediaLimits) -> Result<Option<RgbImage>> {
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| b.get(o..o + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
    let (Some(offset), Some(header_size), Some(bpp), Some(compression)) =
        (u32_at(10), u32_at(14), u16_at(28), u32_at(30))
    else {
        return Ok(None);
    };
    if header_size < 40 || bpp != 16 {
        return Ok(None);
    }
    let green_bits = match (compression, u32_at(54), u32_at(58), u32_at(62)) {
        (0, ..) => 5,
        (3, Some(0x7C00), Some(0x3E0), Some(0x1F)) => 5,
        (3, Some(0xF800), Some(0x7E0), Some(0x1F)) => 6,
        _ => return Ok(None),
    };
    let (Some(w), Some(h)) = (u32_at(18).map(|v| v as i32), u32_at(22).map(|v| v as i32)) else {
        return Ok(None);
    };
    let (width, height) = (w.unsigned_abs() as usize, h.unsigned_abs() as usize);
    check_size(limits, name, "BMP", width, height)?;
    let stride = (width * 2).div_ceil(4) * 4;
    let offset = offset as usize;
    let needed = offset.checked_add(stride * height);
    if needed.is_none_or(|n| n > b.len()) {
        return Err(Error::media(name, "cannot decode BMP: the file is truncated"));
    }
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        let stored = if h < 0 { y } else { height - 1 - y };
        let row = &b[offset + stored * stride..offset + stored * stride + 2 * width];
        for px in row.chunks_exact(2) {
            let v = u16::from_le_bytes([px[0], px[1]]) as u32;
            let (r, g) = if green_bits == 6 {
                (((v >> 11) & 31) * 255 / 31, ((v >> 5) & 63) * 255 / 63)
            } else {
                (((v >> 10) & 31) * 255 / 31, ((v >> 5) & 31) * 255 / 31)
            };
            data.extend_from_slice(&[r as u8, g as u8, ((v & 31) * 255 / 31) as u8]);
        }
    }
    RgbImage::new(width, height, data).map(Some)
}

fn image_err(name: &str, format: &str, e: image::ImageError) -> Error {
    match e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::media(name, format!("cannot decode {format}: the file is truncated"))
        }
        e => Error::media(name, format!("cannot decode {format}: {e}")),
    }
}

fn decode_with_image(
    mut dec: impl image::ImageDecoder,
    name: &str,
    format: &str,
    limits: &MediaLimits,
) -> Result<RgbImage> {
    let (w, h) = dec.dimensions();
    check_size(limits, name, format, w as usize, h as usize)?;
    // The header check above bounds the pixels; this bounds the decoder's own allocations too.
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(w);
    image_limits.max_image_height = Some(h);
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    dec.set_limits(image_limits).map_err(|e| image_err(name, format, e))?;
    let img = image::DynamicImage::from_decoder(dec).map_err(|e| image_err(name, format, e))?;
    // Drops alpha without compositing, as convert("RGB") does.
    let rgb = img.into_rgb8();
    RgbImage::new(w as usize, h as usize, rgb.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images").join(name)).unwrap()
    }

    #[test]
    fn progressive_jpeg_scan_limit() {
        let jpeg = fixture("jpeg_progressive.jpg");
        assert!(decode_image_bytes(&jpeg, "p.jpg").is_ok());
        let limits = MediaLimits { max_jpeg_scans: 2, ..MediaLimits::default() };
        let e = decode_image_bytes_with(&jpeg, "p.jpg", &limits).unwrap_err().to_string();
        assert!(e.contains("p.jpg") && e.contains("scans"), "{e}");
    }

    #[test]
    fn limits_apply_from_the_header_to_every_format() {
        let limits = MediaLimits { max_pixels: 100, ..MediaLimits::default() };
        for name in
            ["jpeg_420.jpg", "png_rgb.png", "png_rgb_adam7.png", "gif_static.gif", "webp_lossy.webp", "bmp_24.bmp"]
        {
            let e = decode_image_bytes_with(&fixture(name), name, &limits).unwrap_err().to_string();
            assert!(e.contains("over the limit"), "{name}: {e}");
        }
        // The budget hook is asked for the pixels before decoding, and its refusal is the error.
        let limits = MediaLimits {
            budget: crate::media::limits::Budget::new(|n| Err(format!("no room for {n} pixels"))),
            ..MediaLimits::default()
        };
        let e = decode_image_bytes_with(&fixture("png_rgb.png"), "x.png", &limits).unwrap_err().to_string();
        assert!(e.contains("no room for"), "{e}");
    }
}
