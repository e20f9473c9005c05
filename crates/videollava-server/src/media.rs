//! Media references of a request (`image_url` / `video_url`) to decoded pictures, within limits:
//! `data:` URIs (base64), `http(s)` URLs fetched with a size and time limit from public addresses
//! only (checked after DNS resolution, and the checked address is the one connected to), and
//! local paths under the allowed directory.
//!
//! Decoding happens in the `videollava::media` decoders, which check every size, frame count and
//! duration against [`MediaLimits`] from headers and while decoding, and read only the bytes they
//! are given (FFmpeg never opens a file or URL itself). Work runs on a bounded pool of media
//! workers ([`acquire_worker`]), stops when its request's [`Cancel`] flag is set, and what all
//! requests hold (remote bytes being fetched, decoded pixels) is bounded across requests.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use videollava::media::limits::Budget;
use videollava::media::video::{decode_video_bytes, decode_video_file_with, VideoOptions};
use videollava::media::{Cancel, MediaLimits, RgbImage, Video};

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

/// Bytes of a media item, in memory (with the share of the remote-bytes bound it holds, if
/// fetched) or as a file to read.
enum Source {
    Bytes(Vec<u8>, Option<Held>),
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

// ---------------------------------------------------------------------------------------------
// Bounds shared by all requests

/// A counter of something held by all requests together, with a ceiling.
pub struct Pool {
    held: AtomicU64,
    what: &'static str,
}

impl Pool {
    const fn new(what: &'static str) -> Self {
        Self { held: AtomicU64::new(0), what }
    }

    /// Takes `n` if the total stays within `max`.
    fn take(&'static self, n: u64, max: u64) -> Result<Held, String> {
        let mut cur = self.held.load(Ordering::SeqCst);
        loop {
            let next = cur.saturating_add(n);
            if next > max {
                return Err(format!(
                    "the server holds too much {} for other requests right now ({cur} of {max}); retry later",
                    self.what
                ));
            }
            match self.held.compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(Held { pool: self, n }),
                Err(c) => cur = c,
            }
        }
    }

    /// Currently held (for tests and metrics).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }
}

/// A share of a [`Pool`], given back on drop.
pub struct Held {
    pool: &'static Pool,
    n: u64,
}

impl Held {
    fn grow(&mut self, n: u64, max: u64) -> Result<(), String> {
        let more = self.pool.take(n, max)?;
        self.n += more.n;
        std::mem::forget(more);
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pool.held.fetch_sub(self.n, Ordering::SeqCst);
    }
}

/// Bytes of remote media being fetched or waiting to be decoded, all requests together.
pub static REMOTE_BYTES: Pool = Pool::new("remote media bytes");
/// Decoded pixels held by requests (from their decoding until their response ends).
pub static DECODED_PIXELS: Pool = Pool::new("decoded media pixels");

/// The media worker pool: as many permits as the machine has cores (at least 2), or
/// `limits.media_workers` when set.
fn workers(limits: &Limits) -> &'static Arc<tokio::sync::Semaphore> {
    static POOL: OnceLock<Arc<tokio::sync::Semaphore>> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = if limits.media_workers > 0 {
            limits.media_workers
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2)
        };
        Arc::new(tokio::sync::Semaphore::new(n))
    })
}

/// Waits for a media worker.
pub async fn acquire_worker(limits: &Limits) -> tokio::sync::OwnedSemaphorePermit {
    workers(limits).clone().acquire_owned().await.expect("the media worker pool is never closed")
}

/// The decoded pixels one request holds; released when dropped (when its response ends).
#[derive(Default, Clone)]
pub struct RequestPixels(Arc<std::sync::Mutex<Vec<Held>>>);

/// The decoder limits of a request: the server's limits, with the decoded pixels it holds
/// counted in `pixels` against the server-wide [`DECODED_PIXELS`] bound.
fn media_limits(limits: &Limits, pixels: &RequestPixels) -> MediaLimits {
    let (per_request, total) = (limits.max_request_pixels, limits.max_decoded_pixels);
    let holder = pixels.clone();
    MediaLimits {
        max_side: limits.max_side,
        max_pixels: limits.max_pixels,
        max_aspect_ratio: limits.max_aspect_ratio,
        max_video_frames: limits.max_video_frames,
        max_video_seconds: limits.max_video_seconds,
        max_jpeg_scans: limits.max_jpeg_scans,
        budget: Budget::new(move |n| {
            let mut held = holder.0.lock().unwrap_or_else(|p| p.into_inner());
            let mine: u64 = held.iter().map(|h| h.n).sum();
            if mine.saturating_add(n) > per_request {
                return Err(format!(
                    "the request's media would hold {} decoded pixels, over the limit of {per_request} per request",
                    mine.saturating_add(n)
                ));
            }
            held.push(DECODED_PIXELS.take(n, total)?);
            Ok(())
        }),
    }
}

fn media_error(kind: MediaKind, what: &str, e: videollava::Error) -> ApiError {
    let msg = e.to_string();
    let mut err = ApiError::bad_param(kind.param(), format!("invalid {what}: {msg}"));
    if msg.contains("retry later") {
        err = ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "server_error", msg).with_code("media_busy");
    }
    err
}

/// Decodes an image reference. Blocking: run it on a media worker.
pub fn load_image(
    url: &str,
    policy: &MediaPolicy,
    cancel: &Cancel,
    pixels: &RequestPixels,
) -> Result<RgbImage, ApiError> {
    let name = describe(url);
    let bytes = match locate(url, MediaKind::Image, policy, cancel)? {
        Source::Bytes(b, _held) => b,
        Source::File(p) => read_limited(&p, policy.limits.max_media_bytes)?,
    };
    cancel.check(&name).map_err(|e| media_error(MediaKind::Image, "image", e))?;
    videollava::media::image::decode_image_bytes_with(&bytes, &name, &media_limits(&policy.limits, pixels))
        .map_err(|e| media_error(MediaKind::Image, "image", e))
}

/// Decodes a video reference from memory (FFmpeg reads only these bytes), 8 frames. Blocking:
/// run it on a media worker.
pub fn load_video(url: &str, policy: &MediaPolicy, cancel: &Cancel, pixels: &RequestPixels) -> Result<Video, ApiError> {
    load_video_with(url, policy, cancel, pixels, &VideoOptions::default())
}

/// [`load_video`] with the caller's frame count and sampling (a request's `num_frames`, the
/// frame preview, `videollava batch` rows). The decoded pixels count against the request's
/// budget, so more frames are allowed only for smaller ones.
pub fn load_video_with(
    url: &str,
    policy: &MediaPolicy,
    cancel: &Cancel,
    pixels: &RequestPixels,
    options: &VideoOptions,
) -> Result<Video, ApiError> {
    let name = describe(url);
    let limits = media_limits(&policy.limits, pixels);
    match locate(url, MediaKind::Video, policy, cancel)? {
        // Errors name the file as the client wrote it, not the server's resolved path.
        Source::File(p) => decode_video_file_with(&p, options, &limits, cancel).map_err(|e| {
            let message = e.to_string().replace(&p.display().to_string(), &name);
            media_error(MediaKind::Video, "video", videollava::Error::Input(message))
        }),
        Source::Bytes(b, _held) => decode_video_bytes(Arc::from(b), &name, options, &limits, cancel)
            .map_err(|e| media_error(MediaKind::Video, "video", e)),
    }
}

/// The placeholder tokens a request's media will take, known before decoding when the
/// processor's output size is fixed.
pub fn media_tokens(
    images: usize,
    videos: usize,
    num_frames: usize,
    image_tokens: usize,
    video_tokens_per_frame: usize,
) -> u64 {
    images as u64 * image_tokens as u64 + videos as u64 * num_frames as u64 * video_tokens_per_frame as u64
}

fn locate(url: &str, kind: MediaKind, policy: &MediaPolicy, cancel: &Cancel) -> Result<Source, ApiError> {
    let param = kind.param();
    let url = url.trim();
    if url.is_empty() {
        return Err(ApiError::bad_param(param, "empty media url"));
    }
    if let Some(rest) = url.strip_prefix("data:") {
        return decode_data_uri(rest, kind, policy.limits.max_media_bytes).map(|b| Source::Bytes(b, None));
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return fetch(url, kind, policy, cancel).map(|(b, held)| Source::Bytes(b, Some(held)));
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

/// Removes temporary media files left by older versions of the server that crashed (they wrote
/// `videollava-media-<pid>-...` files; this version keeps media in memory and writes none), when
/// the process that wrote them is gone.
pub fn remove_stale_temp_files() {
    if !Path::new("/proc/self").exists() {
        return; // no way to tell a live writer from a dead one
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("videollava-media-") else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// [`decode_data_uri`] for the request-parsing fuzz test.
#[cfg(test)]
pub(crate) fn decode_data_uri_for_tests(rest: &str, max_bytes: u64) -> Result<Vec<u8>, ApiError> {
    decode_data_uri(rest, MediaKind::Image, max_bytes)
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
    // IPv4-translated (SIIT) ::ffff:0:a.b.c.d
    if s[..4].iter().all(|&x| x == 0) && s[4] == 0xffff && s[5] == 0 {
        return forbidden_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
    }
    // 6to4 2002::/16 embeds an IPv4 address
    if s[0] == 0x2002 {
        return forbidden_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    // Local-use NAT64 64:ff9b:1::/48 (RFC 8215) and Teredo 2001::/32: the IPv4 address they
    // reach is not checkable here (network-specific, or obfuscated), so they are refused.
    if (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) || (s[0] == 0x2001 && s[1] == 0) {
        return true;
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

fn fetch(url: &str, kind: MediaKind, policy: &MediaPolicy, cancel: &Cancel) -> Result<(Vec<u8>, Held), ApiError> {
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
    // Read in chunks: each one is counted against the server-wide bound on remote bytes, and
    // the fetch stops when the request is cancelled.
    let busy = |m: String| {
        ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "server_error", m).with_code("media_busy")
    };
    let mut held = REMOTE_BYTES.take(0, limits.max_remote_bytes).map_err(busy)?;
    let mut reader = resp.body_mut().with_config().limit(limits.max_media_bytes).reader();
    let mut body = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        if cancel.is_cancelled() {
            return Err(ApiError::bad_param(param, format!("fetching {name} was cancelled")));
        }
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(match e.into_inner().and_then(|i| i.downcast::<ureq::Error>().ok()) {
                    Some(u) => fetch_error(*u, &name, param, limits),
                    None => ApiError::bad_param(param, format!("cannot fetch {name}: the body could not be read")),
                })
            }
        };
        held.grow(n as u64, limits.max_remote_bytes).map_err(busy)?;
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((body, held))
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
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::808:808",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::127.0.0.1",
        ] {
            assert!(is_forbidden_ip(a.parse().unwrap()), "{a} should be refused");
        }
        for a in
            ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
        {
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
