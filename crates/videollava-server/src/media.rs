//! Media references of a request (`image_url` / `video_url`) to decoded pictures, within limits:
//! `data:` URIs (base64), `http(s)` URLs fetched with a size and time limit from public addresses
//! only (checked after DNS resolution, and the checked address is the one connected to), and
//! local paths under the allowed directory.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use videollava::media::video::{decode_video_file, VideoOptions};
use videollava::media::{RgbImage, Video};

use crate::error::ApiError;
use crate::Limits;

/// What a media part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Video,
}

impl MediaKind {
    fn param(self) -> &'static str {
        match self {
            MediaKind::Image => "image_url",
            MediaKind::Video => "video_url",
        }
    }
}

/// Where the server may read media from.
#[derive(Debug, Clone)]
pub struct MediaPolicy {
    pub allowed_media_dir: Option<PathBuf>,
    pub allow_private_media_urls: bool,
    pub limits: Limits,
}

/// Bytes of a media item, in memory or as a file to read.
enum Source {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// Short form of a URL for messages and logs (data URIs cut).
pub fn describe(url: &str) -> String {
    if url.starts_with("data:") {
        let head: String = url.chars().take(40).collect();
        format!("{head}... ({} bytes)", url.len())
    } else if url.chars().count() > 200 {
        format!("{}...", url.chars().take(200).collect::<String>())
    } else {
        url.to_string()
    }
}

/// Decodes an image reference. Blocking: run in `spawn_blocking`.
pub fn load_image(url: &str, policy: &MediaPolicy) -> Result<RgbImage, ApiError> {
    let name = describe(url);
    let bytes = match locate(url, MediaKind::Image, policy)? {
        Source::Bytes(b) => b,
        Source::File(p) => read_limited(&p, policy.limits.max_media_bytes)?,
    };
    let image = videollava::media::image::decode_image_bytes(&bytes, &name)
        .map_err(|e| ApiError::bad_param("image_url", format!("invalid image: {e}")))?;
    let pixels = image.width as u64 * image.height as u64;
    if pixels > policy.limits.max_pixels {
        return Err(ApiError::bad_param(
            "image_url",
            format!(
                "image {name} is {}x{} = {pixels} pixels, over the limit of {}",
                image.width, image.height, policy.limits.max_pixels
            ),
        ));
    }
    Ok(image)
}

/// Decodes a video reference (written to a temporary file first when it is not a local file).
/// Blocking: run in `spawn_blocking`.
pub fn load_video(url: &str, policy: &MediaPolicy) -> Result<Video, ApiError> {
    load_video_with(url, policy, &VideoOptions::default())
}

/// [`load_video`] with a frame choice of its own (`videollava batch` rows set `num_frames`).
pub fn load_video_with(url: &str, policy: &MediaPolicy, options: &VideoOptions) -> Result<Video, ApiError> {
    let name = describe(url);
    let (path, _guard) = match locate(url, MediaKind::Video, policy)? {
        Source::File(p) => (p, None),
        Source::Bytes(b) => {
            let tmp =
                TempFile::write(&b).map_err(|e| ApiError::internal(format!("cannot write a temporary file: {e}")))?;
            (tmp.path.clone(), Some(tmp))
        }
    };
    probe_video(&path, &name, &policy.limits)?;
    let video = decode_video_file(&path, options).map_err(|e| {
        ApiError::bad_param("video_url", format!("invalid video {name}: {}", strip_path(&e.to_string(), &path)))
    })?;
    if video.total_frames as u64 > policy.limits.max_video_frames {
        return Err(ApiError::bad_param(
            "video_url",
            format!(
                "video {name} has {} frames, over the limit of {}",
                video.total_frames, policy.limits.max_video_frames
            ),
        ));
    }
    if let Some(f) = video.frames.first() {
        let pixels = f.width as u64 * f.height as u64;
        if pixels > policy.limits.max_pixels {
            return Err(ApiError::bad_param(
                "video_url",
                format!("video frames of {name} have {pixels} pixels, over the limit"),
            ));
        }
    }
    Ok(video)
}

/// Temporary file paths must not leak into client-facing messages.
fn strip_path(message: &str, path: &Path) -> String {
    message.replace(&path.display().to_string(), "video")
}

/// Refuses videos that are too long or too large before decoding them (container header).
fn probe_video(path: &Path, name: &str, limits: &Limits) -> Result<(), ApiError> {
    use ffmpeg_next as ff;
    let bad = |m: String| ApiError::bad_param("video_url", m);
    let _ = ff::init();
    ff::util::log::set_level(ff::util::log::Level::Quiet);
    let ictx =
        ff::format::input(&path).map_err(|e| bad(format!("invalid video {name}: not a readable media file ({e})")))?;
    let duration = ictx.duration();
    if duration > 0 {
        let seconds = duration as f64 / f64::from(ff::ffi::AV_TIME_BASE);
        if seconds > limits.max_video_seconds {
            return Err(bad(format!(
                "video {name} lasts {seconds:.1} s, over the limit of {} s",
                limits.max_video_seconds
            )));
        }
    }
    let stream = ictx
        .streams()
        .best(ff::media::Type::Video)
        .ok_or_else(|| bad(format!("invalid video {name}: no video stream")))?;
    let frames = stream.frames();
    if frames > 0 && frames as u64 > limits.max_video_frames {
        return Err(bad(format!("video {name} has {frames} frames, over the limit of {}", limits.max_video_frames)));
    }
    if let Ok(ctx) = ff::codec::context::Context::from_parameters(stream.parameters()) {
        if let Ok(dec) = ctx.decoder().video() {
            let pixels = dec.width() as u64 * dec.height() as u64;
            if pixels > limits.max_pixels {
                return Err(bad(format!(
                    "video {name} is {}x{} = {pixels} pixels per frame, over the limit of {}",
                    dec.width(),
                    dec.height(),
                    limits.max_pixels
                )));
            }
        }
    }
    Ok(())
}

fn locate(url: &str, kind: MediaKind, policy: &MediaPolicy) -> Result<Source, ApiError> {
    let param = kind.param();
    let url = url.trim();
    if url.is_empty() {
        return Err(ApiError::bad_param(param, "empty media url"));
    }
    if let Some(rest) = url.strip_prefix("data:") {
        return decode_data_uri(rest, kind, policy.limits.max_media_bytes).map(Source::Bytes);
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return fetch(url, kind, policy).map(Source::Bytes);
    }
    if lower.starts_with("file:") {
        let parsed = url::Url::parse(url).map_err(|e| ApiError::bad_param(param, format!("invalid file URL: {e}")))?;
        let path = parsed
            .to_file_path()
            .map_err(|_| ApiError::bad_param(param, "invalid file URL (needs an absolute local path)"))?;
        return local(&path, kind, policy).map(Source::File);
    }
    if let Ok(parsed) = url::Url::parse(url) {
        if parsed.scheme().len() > 1 {
            return Err(ApiError::bad_param(
                param,
                format!("unsupported URL scheme `{}` (use http, https, data or a local path)", parsed.scheme()),
            ));
        }
    }
    local(Path::new(url), kind, policy).map(Source::File)
}

fn decode_data_uri(rest: &str, kind: MediaKind, max_bytes: u64) -> Result<Vec<u8>, ApiError> {
    let param = kind.param();
    let (meta, data) = rest.split_once(',').ok_or_else(|| ApiError::bad_param(param, "invalid data URI: no `,`"))?;
    if !meta.split(';').any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(ApiError::bad_param(param, "data URIs must be base64 (`data:<type>;base64,...`)"));
    }
    let approx = (data.len() as u64 / 4) * 3;
    if approx > max_bytes + 3 {
        return Err(ApiError::too_large(format!(
            "media item of about {approx} bytes is over the limit of {max_bytes} bytes"
        ))
        .with_param(param));
    }
    let cleaned: String;
    let data = if data.bytes().any(|b| b.is_ascii_whitespace()) {
        cleaned = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        cleaned.as_str()
    } else {
        data
    };
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut last = None;
    for e in engines {
        match e.decode(data) {
            Ok(b) => {
                if b.len() as u64 > max_bytes {
                    return Err(ApiError::too_large(format!(
                        "media item of {} bytes is over the limit of {max_bytes} bytes",
                        b.len()
                    ))
                    .with_param(param));
                }
                return Ok(b);
            }
            Err(err) => last = Some(err),
        }
    }
    Err(ApiError::bad_param(
        param,
        format!("invalid base64 in data URI: {}", last.map(|e| e.to_string()).unwrap_or_default()),
    ))
}

/// A local path: must resolve (symlinks followed) to a regular file under the allowed directory.
fn local(path: &Path, kind: MediaKind, policy: &MediaPolicy) -> Result<PathBuf, ApiError> {
    let param = kind.param();
    let Some(root) = &policy.allowed_media_dir else {
        return Err(ApiError::forbidden(
            "local media paths are disabled on this server (start it with --allowed-media-dir)",
        )
        .with_param(param));
    };
    let root = root.canonicalize().map_err(|e| ApiError::internal(format!("allowed media directory: {e}")))?;
    let joined = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
    let canonical = match joined.canonicalize() {
        Ok(c) => c,
        Err(_) => {
            // Do not reveal whether a path outside the directory exists.
            return Err(if lexically_inside(&joined, &root) {
                ApiError::bad_param(param, format!("media file `{}` not found", path.display()))
            } else {
                ApiError::forbidden(format!("media path `{}` is outside the allowed directory", path.display()))
                    .with_param(param)
            });
        }
    };
    if !canonical.starts_with(&root) {
        return Err(ApiError::forbidden(format!("media path `{}` is outside the allowed directory", path.display()))
            .with_param(param));
    }
    let meta = std::fs::metadata(&canonical)
        .map_err(|e| ApiError::bad_param(param, format!("media file `{}`: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(ApiError::bad_param(param, format!("media path `{}` is not a regular file", path.display())));
    }
    if meta.len() > policy.limits.max_media_bytes {
        return Err(ApiError::too_large(format!(
            "media file `{}` has {} bytes, over the limit of {}",
            path.display(),
            meta.len(),
            policy.limits.max_media_bytes
        ))
        .with_param(param));
    }
    Ok(canonical)
}

fn lexically_inside(path: &Path, root: &Path) -> bool {
    use std::path::Component;
    let mut depth: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                depth.pop();
            }
            Component::CurDir => {}
            other => depth.push(other),
        }
    }
    let p: PathBuf = depth.iter().collect();
    p.starts_with(root)
}

fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, ApiError> {
    let f = std::fs::File::open(path).map_err(|e| ApiError::bad_request(format!("cannot read media file: {e}")))?;
    let mut out = Vec::new();
    f.take(max + 1).read_to_end(&mut out).map_err(|e| ApiError::bad_request(format!("cannot read media file: {e}")))?;
    if out.len() as u64 > max {
        return Err(ApiError::too_large(format!("media file is over the limit of {max} bytes")));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Remote fetch

/// Whether `ip` is an address remote media may not be fetched from (unless allowed): loopback,
/// private, shared (CGNAT), link-local, unspecified, multicast, broadcast, reserved and
/// documentation ranges, and IPv6 forms embedding such IPv4 addresses.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 shared address space
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xFE) == 18) // 198.18.0.0/15 benchmarking
        || o[0] >= 240 // reserved
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    // IPv4-compatible (deprecated) ::a.b.c.d
    if s[..6].iter().all(|&x| x == 0) && !ip.is_loopback() && !ip.is_unspecified() {
        return forbidden_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    }
    // NAT64 64:ff9b::/96
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|&x| x == 0) {
        return forbidden_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    }
    // 6to4 2002::/16 embeds an IPv4 address
    if s[0] == 0x2002 {
        return forbidden_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x100 && s[1..4].iter().all(|&x| x == 0)) // discard 100::/64
}

/// The refusal carried through ureq's error.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Resolves with the system resolver, then refuses the whole host when any of its addresses is
/// forbidden. ureq connects only to the addresses returned here, so a second DNS answer cannot
/// swap in another address (DNS rebinding). Redirect targets pass through here too.
#[derive(Debug)]
struct CheckedResolver {
    allow_private: bool,
}

impl ureq::unversioned::resolver::Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            other => {
                return Err(ureq::Error::Other(Box::new(Refused(format!(
                    "scheme {other:?} is not allowed (http or https only)"
                )))))
            }
        }
        let addrs = ureq::unversioned::resolver::DefaultResolver::default().resolve(uri, config, timeout)?;
        if !self.allow_private {
            if let Some(bad) = addrs.iter().find(|a| is_forbidden_ip(a.ip())) {
                return Err(ureq::Error::Other(Box::new(Refused(format!(
                    "host `{}` resolves to {}, a loopback, private, link-local or otherwise non-public address; \
                     such URLs are refused (the server's --allow-private-media-urls allows them)",
                    uri.host().unwrap_or(""),
                    bad.ip()
                )))));
            }
        }
        Ok(addrs)
    }
}

static FETCHES: AtomicU64 = AtomicU64::new(0);

fn fetch(url: &str, kind: MediaKind, policy: &MediaPolicy) -> Result<Vec<u8>, ApiError> {
    let param = kind.param();
    let name = describe(url);
    let parsed = url::Url::parse(url).map_err(|e| ApiError::bad_param(param, format!("invalid URL {name}: {e}")))?;
    if parsed.host_str().is_none_or(|h| h.is_empty()) {
        return Err(ApiError::bad_param(param, format!("invalid URL {name}: no host")));
    }
    let limits = &policy.limits;
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(limits.fetch_timeout))
        .timeout_connect(Some(limits.fetch_timeout.min(Duration::from_secs(10))))
        .http_status_as_error(false)
        .max_redirects(5)
        .proxy(None)
        .user_agent(concat!("videollava-server/", env!("CARGO_PKG_VERSION")))
        .build();
    let agent = ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        CheckedResolver { allow_private: policy.allow_private_media_urls },
    );
    let n = FETCHES.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(fetch = n, url = %name, "fetching media");
    let mut resp = agent.get(parsed.as_str()).call().map_err(|e| fetch_error(e, &name, param, limits))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(ApiError::bad_param(param, format!("fetching {name} returned HTTP {}", status.as_u16())));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(limits.max_media_bytes)
        .read_to_vec()
        .map_err(|e| fetch_error(e, &name, param, limits))?;
    Ok(body)
}

fn fetch_error(e: ureq::Error, name: &str, param: &str, limits: &Limits) -> ApiError {
    match e {
        ureq::Error::Other(inner) => match inner.downcast_ref::<Refused>() {
            Some(r) => {
                ApiError::bad_param(param, format!("refused to fetch {name}: {r}")).with_code("media_url_forbidden")
            }
            None => ApiError::bad_param(param, format!("cannot fetch {name}: {inner}")),
        },
        ureq::Error::BodyExceedsLimit(_) => {
            ApiError::too_large(format!("media at {name} is over the limit of {} bytes", limits.max_media_bytes))
                .with_param(param)
        }
        ureq::Error::Timeout(_) => ApiError::bad_param(
            param,
            format!("fetching {name} took longer than {} s", limits.fetch_timeout.as_secs_f64()),
        ),
        other => ApiError::bad_param(param, format!("cannot fetch {name}: {other}")),
    }
}

/// A temporary file removed on drop.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn write(bytes: &[u8]) -> std::io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "videollava-media-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        std::io::Write::write_all(&mut f, bytes)?;
        Ok(Self { path })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(is_forbidden_ip(a.parse().unwrap()), "{a} should be refused");
        }
        for a in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!is_forbidden_ip(a.parse().unwrap()), "{a} should be allowed");
        }
    }

    #[test]
    fn data_uris() {
        assert_eq!(decode_data_uri("image/png;base64,aGVsbG8=", MediaKind::Image, 100).unwrap(), b"hello");
        assert_eq!(decode_data_uri("image/png;base64,aGVsbG8", MediaKind::Image, 100).unwrap(), b"hello");
        assert_eq!(decode_data_uri("image/png,hello", MediaKind::Image, 100).unwrap_err().status.as_u16(), 400);
        assert_eq!(decode_data_uri("image/png;base64,aGVsbG8=", MediaKind::Image, 3).unwrap_err().status.as_u16(), 413);
        assert_eq!(decode_data_uri("image/png;base64,!!!", MediaKind::Image, 100).unwrap_err().status.as_u16(), 400);
    }
}
