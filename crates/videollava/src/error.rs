//! Error types of the library. Every error names what it is about (a file, a field, an input)
//! and reads well as a single line.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration file is malformed or inconsistent. `field` is a dotted path such as
    /// `text_config.hidden_size`, or empty when the whole file is at fault.
    #[error("{}: {}{message}", file.display(), if field.is_empty() { String::new() } else { format!("field `{field}`: ") })]
    Config { file: PathBuf, field: String, message: String },

    /// A media input (image or video) could not be decoded or is unusable.
    /// `source_name` is the path, or a description such as `image #2` for in-memory input.
    #[error("{source_name}: {message}")]
    Media { source_name: String, message: String },

    /// The prompts and media do not fit together (placeholder counts, sizes, lengths).
    #[error("{0}")]
    Input(String),

    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Weights are missing or malformed, or a model computation is inconsistent.
    #[error("{0}")]
    Model(String),

    /// Writing an output file (a batch results file) failed.
    #[error("{}: {message}", path.display())]
    Output { path: PathBuf, message: String },

    /// The caller withdrew the request (its [`crate::media::Cancel`] was set, e.g. a stream's
    /// reader went away) before it finished.
    #[error("{0}")]
    Cancelled(String),

    /// The tensor library failed (its error kept as the source).
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    /// Shorthand for [`Error::Media`].
    pub fn media(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Media { source_name: source_name.into(), message: message.into() }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(file: impl Into<PathBuf>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { file: file.into(), field: field.into(), message: message.into() }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
