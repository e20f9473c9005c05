//! Where a checkpoint comes from: the `--model` argument is either a local checkpoint directory or
//! a Hugging Face hub id (`org/name`, optionally `org/name@revision`).
//!
//! A hub id is resolved to a snapshot directory of the Hugging Face cache
//! (`<cache>/models--org--name/snapshots/<commit>/`), laid out exactly as `huggingface_hub` and the
//! `hf-hub` crate lay it out, so a cache filled by Python is reused and the other way round:
//!
//! ```text
//! <cache>/models--org--name/refs/main                 the 40-hex commit `main` points at
//! <cache>/models--org--name/snapshots/<commit>/<file> the files (usually symlinks into blobs/)
//! <cache>/models--org--name/blobs/<etag>              the content
//! ```
//!
//! Offline ([`HubOptions::offline`]), only the cache is read. Online, the hub is asked which
//! commit the revision points at and which files exist, the missing files of that commit are
//! downloaded with [`hf_hub::api::sync`], and `refs/<revision>` is updated. When the hub cannot be
//! reached at all (no network, server error), a checkpoint that is complete in the cache is used,
//! as `huggingface_hub` does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The checkpoint used when `--model` is not given.
pub const DEFAULT_MODEL: &str = "LanguageBind/Video-LLaVA-7B-hf";

/// Files a checkpoint must have (besides its weights).
pub const REQUIRED_FILES: &[&str] =
    &["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"];

/// Files used when present; a checkpoint without them is fine.
pub const OPTIONAL_FILES: &[&str] = &[
    "processor_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
];

/// The sharded weights' index; every shard it lists is part of the checkpoint.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Unsharded weights, used when there is no index.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// How hub ids are resolved: the cache, network use and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache directory (the one holding `models--org--name` folders).
    pub cache_dir: PathBuf,
    /// Read only the cache, never the network.
    pub offline: bool,
    /// Access token for gated or private models.
    pub token: Option<String>,
    /// Show download progress bars (on stderr).
    pub progress: bool,
    /// The hub's base URL; `None` is `https://huggingface.co`.
    pub endpoint: Option<String>,
}

impl HubOptions {
    /// Options with the given cache directory: online, no token, progress bars, default endpoint.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self { cache_dir: cache_dir.into(), offline: false, token: None, progress: true, endpoint: None }
    }

    /// Options from the environment, with `huggingface_hub`'s variables and precedence:
    ///
    /// - cache directory: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    ///   `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`;
    /// - offline: `HF_HUB_OFFLINE` set to `1`, `true`, `yes` or `on` (any case; see
    ///   [`parse_bool_env`]);
    /// - token: `HF_TOKEN` when set and not empty, else the file `HF_TOKEN_PATH`, else the file
    ///   `$HF_HOME/token` (`HF_HOME` defaulting to `$XDG_CACHE_HOME/huggingface`, else
    ///   `~/.cache/huggingface`); the file's content is trimmed, an empty file is no token;
    /// - progress bars: on unless `HF_HUB_DISABLE_PROGRESS_BARS` is truthy;
    /// - endpoint: `HF_ENDPOINT` when set and not empty.
    pub fn from_env() -> Self {
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        Self::from_vars(|name| std::env::var(name).ok(), home)
    }

    /// [`HubOptions::from_env`] with the variables given by `var` and the home directory given
    /// explicitly, so the precedence can be tested without touching the process environment.
    /// Reads the token file when no token variable is set.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let hf_home = match var("HF_HOME") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let xdg = var("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| home.map(|h| h.join(".cache")))
                    .unwrap_or_else(|| PathBuf::from(".cache"));
                xdg.join("huggingface")
            }
        };
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).or_else(|| {
            let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
            read_token_file(&path)
        });
        Self {
            cache_dir,
            offline: parse_bool_env(var("HF_HUB_OFFLINE").as_deref()),
            token,
            progress: !parse_bool_env(var("HF_HUB_DISABLE_PROGRESS_BARS").as_deref()),
            endpoint: var("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()),
        }
    }
}

/// Reads a token file: its trimmed content, `None` when it is missing or empty.
fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// Whether a boolean environment variable's value is true: `1`, `true`, `yes` or `on`, in any case
/// and with surrounding spaces ignored, as `huggingface_hub` reads them. Unset or anything else is
/// false.
pub fn parse_bool_env(value: Option<&str>) -> bool {
    matches!(value.map(|v| v.trim().to_ascii_lowercase()).as_deref(), Some("1" | "true" | "yes" | "on"))
}

/// A hub model id with its revision (a branch, tag or commit hash; `main` when not given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelId {
    /// `org/name`.
    pub repo_id: String,
    /// `main`, a branch or tag name, or a commit hash.
    pub revision: String,
}

impl ModelId {
    /// Parses `org/name` or `org/name@revision`; `None` when `spec` is not such an id.
    ///
    /// Both parts of `org/name` are 1 to 96 characters from `A-Z a-z 0-9 - _ .`, neither starting
    /// nor ending with `-` or `.`, and without `--` or `..` (the hub's rules). A revision is
    /// anything without whitespace, `\`, or `.`/`..` path components.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo_id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (spec, "main"),
        };
        let (org, name) = repo_id.split_once('/')?;
        if !valid_id_part(org) || !valid_id_part(name) || !valid_revision(revision) {
            return None;
        }
        Some(Self { repo_id: repo_id.to_string(), revision: revision.to_string() })
    }

    /// The spec as the user writes it: `org/name`, or `org/name@revision` when not `main`.
    pub fn display(&self) -> String {
        if self.revision == "main" {
            self.repo_id.clone()
        } else {
            format!("{}@{}", self.repo_id, self.revision)
        }
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }
}

fn valid_id_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 96
        && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !part.starts_with(['-', '.'])
        && !part.ends_with(['-', '.'])
        && !part.contains("--")
        && !part.contains("..")
}

fn valid_revision(revision: &str) -> bool {
    !revision.is_empty()
        && !revision.chars().any(|c| c.is_whitespace() || c == '\\')
        && revision.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolves the `--model` argument to a checkpoint directory.
///
/// An existing local directory is returned as is (its files are checked when it is loaded). A hub
/// id (`org/name` or `org/name@revision`) is resolved to its snapshot directory in
/// `options.cache_dir`, which then holds every required file, the weights (the index and all its
/// shards, or `model.safetensors`) and those optional files the model has: read from the cache
/// only when `options.offline`, downloaded where missing otherwise. Anything else is an error
/// saying the directory does not exist.
pub fn resolve_model(spec: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::Input(format!("model `{spec}` is a file, not a checkpoint directory")));
    }
    let Some(id) = ModelId::parse(spec) else {
        return Err(Error::Input(format!(
            "model directory `{spec}` does not exist (nor is it a hub id such as `{DEFAULT_MODEL}`)"
        )));
    };
    if options.offline {
        resolve_cached(&id, &options.cache_dir).map_err(|miss| {
            let cache = options.cache_dir.display();
            Error::Input(match miss {
                CacheMiss::Absent => format!(
                    "model `{}` is neither a local directory nor in the local cache {cache} (HF_HUB_OFFLINE is set)",
                    id.display()
                ),
                miss => format!(
                    "model `{}` is not in the local cache {cache} (HF_HUB_OFFLINE is set): {miss}",
                    id.display()
                ),
            })
        })
    } else {
        resolve_online(&id, options)
    }
}

/// Why a model is not (fully) in the cache; displays as the tail of a one-line message.
#[derive(Debug)]
enum CacheMiss {
    /// The cache has no folder for the model.
    Absent,
    /// Neither `refs/<revision>` nor `snapshots/<revision>` exists.
    Revision(String),
    /// These files of the snapshot are missing (dangling symlinks count as missing).
    Files(Vec<String>),
    /// The weights index could not be read.
    Error(Error),
}

impl std::fmt::Display for CacheMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheMiss::Absent => write!(f, "it was never downloaded"),
            CacheMiss::Revision(rev) => write!(f, "no snapshot for revision `{rev}`"),
            CacheMiss::Files(files) => write!(f, "missing {}", files.join(", ")),
            CacheMiss::Error(e) => write!(f, "{e}"),
        }
    }
}

/// The model's folder in the cache: `<cache>/models--org--name`.
fn repo_folder(cache_dir: &Path, id: &ModelId) -> PathBuf {
    cache_dir.join(id.repo().folder_name())
}

/// The snapshot directory of `id` in the cache, when every file of the checkpoint is there.
///
/// The revision is looked up in `refs/<revision>` (a branch or tag, as written by both
/// `huggingface_hub` and `hf-hub`); a commit hash may also name `snapshots/<hash>` directly.
fn resolve_cached(id: &ModelId, cache_dir: &Path) -> std::result::Result<PathBuf, CacheMiss> {
    let folder = repo_folder(cache_dir, id);
    if !folder.is_dir() {
        return Err(CacheMiss::Absent);
    }
    let ref_path = folder.join("refs").join(&id.revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(text) if !text.trim().is_empty() => text.trim().to_string(),
        _ => id.revision.clone(),
    };
    let cache_repo = Cache::new(cache_dir.to_path_buf()).repo(id.repo());
    let snapshot = cache_repo.pointer_path(&commit);
    if !valid_revision(&commit) || !snapshot.is_dir() {
        return Err(CacheMiss::Revision(id.revision.clone()));
    }
    let mut missing: Vec<String> =
        REQUIRED_FILES.iter().filter(|f| !snapshot.join(f).exists()).map(|f| f.to_string()).collect();
    let index = snapshot.join(WEIGHTS_INDEX_FILE);
    if index.exists() {
        let shards = weight_shards(&index).map_err(CacheMiss::Error)?;
        missing.extend(shards.into_iter().filter(|s| !snapshot.join(s).exists()));
    } else if !snapshot.join(WEIGHTS_FILE).exists() {
        missing.push(format!("{WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE})"));
    }
    if missing.is_empty() {
        Ok(snapshot)
    } else {
        Err(CacheMiss::Files(missing))
    }
}

/// The shard files listed in a `model.safetensors.index.json` (the values of `weight_map`),
/// sorted and without repeats.
pub fn weight_shards(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(index_path, "", e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index_path, "weight_map", "missing or not an object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .filter(|f| valid_relative_file(f))
            .ok_or_else(|| Error::config(index_path, format!("weight_map.{tensor}"), "not a file name"))?;
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(Error::config(index_path, "weight_map", "lists no shard"));
    }
    Ok(shards.into_iter().collect())
}

/// A plain relative file name inside a repository (no `..`, no absolute path).
fn valid_relative_file(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && name.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
}

/// The HTTP status of a failed hub request, when the server answered at all.
fn http_status(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(inner) => {
            let text = inner.to_string();
            text.strip_prefix("http status: ").and_then(|code| code.trim().parse().ok())
        }
        ApiError::TooManyRetries(inner) => http_status(inner),
        _ => None,
    }
}

/// `ApiError`'s message on one line.
fn one_line(e: &ApiError) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Resolves `id` with the hub: pins the revision to a commit, downloads the missing files of that
/// commit into the cache, and points `refs/<revision>` at it.
fn resolve_online(id: &ModelId, options: &HubOptions) -> Result<PathBuf> {
    let model = id.display();
    let cache = Cache::new(options.cache_dir.clone());
    let mut builder = ApiBuilder::from_cache(cache.clone())
        .with_token(options.token.clone())
        .with_progress(options.progress)
        .with_user_agent("videollava", env!("CARGO_PKG_VERSION"));
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    let api = builder
        .build()
        .map_err(|e| Error::Input(format!("model `{model}`: cannot set up the hub client: {}", one_line(&e))))?;

    let info = match api.repo(id.repo()).info() {
        Ok(info) => info,
        Err(e) => {
            let status = http_status(&e);
            // Unreachable hub or server error: a complete cached copy will do.
            if status.is_none_or(|s| s >= 500) {
                return resolve_cached(id, &options.cache_dir).map_err(|miss| {
                    Error::Input(format!(
                        "model `{model}`: cannot reach the hub ({}), and it is not in the local cache {}: {miss}",
                        one_line(&e),
                        options.cache_dir.display()
                    ))
                });
            }
            let hint = match status {
                Some(401 | 403 | 404) if options.token.is_none() => {
                    " (check the id and revision; a gated or private model needs HF_TOKEN)"
                }
                Some(401 | 403 | 404) => " (check the id, the revision and that the token has access)",
                _ => "",
            };
            return Err(Error::Input(format!("model `{model}`: the hub refused it: {}{hint}", one_line(&e))));
        }
    };
    let commit = info.sha.trim().to_string();
    if !is_commit_hash(&commit) {
        return Err(Error::Input(format!("model `{model}`: the hub answered an invalid commit `{commit}`")));
    }
    let on_hub: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();

    // Every file is fetched at the pinned commit so they all land in one snapshot directory.
    let pinned_repo = Repo::with_revision(id.repo_id.clone(), RepoType::Model, commit.clone());
    let pinned = api.repo(pinned_repo.clone());
    let snapshot = cache.repo(pinned_repo).pointer_path(&commit);
    // Downloads `file` unless the snapshot has it; `Ok(None)` when an optional file is not served.
    let fetch = |file: &str, optional: bool| -> Result<Option<PathBuf>> {
        let local = snapshot.join(file);
        if local.exists() {
            return Ok(Some(local));
        }
        let path = match pinned.download(file) {
            Ok(path) => path,
            Err(e) if optional && http_status(&e) == Some(404) => return Ok(None),
            Err(e) => {
                return Err(Error::Input(format!("model `{model}`: downloading {file} failed: {}", one_line(&e))))
            }
        };
        if path != local {
            return Err(Error::Input(format!(
                "model `{model}`: {file} was stored at {} instead of the snapshot {} (the hub served another commit)",
                path.display(),
                snapshot.display()
            )));
        }
        Ok(Some(path))
    };

    for file in REQUIRED_FILES {
        if !on_hub.contains(file) {
            return Err(Error::Input(format!(
                "model `{model}` has no {file} on the hub (commit {commit}): is it a Video-LLaVA checkpoint in transformers format?"
            )));
        }
        fetch(file, false)?;
    }
    if on_hub.contains(WEIGHTS_INDEX_FILE) {
        let index = snapshot.join(WEIGHTS_INDEX_FILE);
        fetch(WEIGHTS_INDEX_FILE, false)?;
        for shard in weight_shards(&index)? {
            if !on_hub.contains(shard.as_str()) {
                return Err(Error::Input(format!(
                    "model `{model}`: shard {shard} listed in {WEIGHTS_INDEX_FILE} is not on the hub (commit {commit})"
                )));
            }
            fetch(&shard, false)?;
        }
    } else if on_hub.contains(WEIGHTS_FILE) {
        fetch(WEIGHTS_FILE, false)?;
    } else {
        return Err(Error::Input(format!(
            "model `{model}` has no safetensors weights on the hub ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}, commit {commit})"
        )));
    }
    for file in OPTIONAL_FILES {
        if on_hub.contains(file) {
            fetch(file, true)?;
        }
    }

    if id.revision != commit {
        cache
            .repo(id.repo())
            .create_ref(&commit)
            .map_err(|e| Error::io(repo_folder(&options.cache_dir, id).join("refs").join(&id.revision), e))?;
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids() {
        let id = ModelId::parse("LanguageBind/Video-LLaVA-7B-hf").unwrap();
        assert_eq!(id.repo_id, "LanguageBind/Video-LLaVA-7B-hf");
        assert_eq!(id.revision, "main");
        let id = ModelId::parse("org/name@refs/pr/3").unwrap();
        assert_eq!(id.revision, "refs/pr/3");
        assert_eq!(id.display(), "org/name@refs/pr/3");
        for bad in [
            "name",
            "/abs/path",
            "a/b/c",
            "./x",
            "org/",
            "org/na me",
            "org/name@",
            "o--x/n",
            "org/.hidden",
            "org/name@../x",
        ] {
            assert!(ModelId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn env_precedence() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let home = Some(PathBuf::from("/nonexistent-home"));
        let o = HubOptions::from_vars(vars(&[]), home.clone());
        assert_eq!(o.cache_dir, PathBuf::from("/nonexistent-home/.cache/huggingface/hub"));
        assert!(!o.offline && o.progress && o.token.is_none() && o.endpoint.is_none());
        let o = HubOptions::from_vars(vars(&[("HF_HOME", "/h"), ("XDG_CACHE_HOME", "/x")]), home.clone());
        assert_eq!(o.cache_dir, PathBuf::from("/h/hub"));
        let o = HubOptions::from_vars(vars(&[("XDG_CACHE_HOME", "/x")]), home.clone());
        assert_eq!(o.cache_dir, PathBuf::from("/x/huggingface/hub"));
        let o = HubOptions::from_vars(
            vars(&[
                ("HF_HUB_CACHE", "/c"),
                ("HF_HOME", "/h"),
                ("HF_HUB_OFFLINE", "Yes"),
                ("HF_TOKEN", "hf_x"),
                ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                ("HF_ENDPOINT", "http://mirror/"),
            ]),
            home,
        );
        assert_eq!(o.cache_dir, PathBuf::from("/c"));
        assert!(o.offline && !o.progress);
        assert_eq!(o.token.as_deref(), Some("hf_x"));
        assert_eq!(o.endpoint.as_deref(), Some("http://mirror"));
    }
}
