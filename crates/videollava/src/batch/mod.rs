//! Offline batch runs: a manifest of questions in, one result line per question out.
//!
//! The pieces a front end (the `videollava batch` command, the Python binding) needs to run a
//! manifest reliably, independent of how it drives the model:
//! - [`manifest`]: JSON Lines or CSV rows (`id`, `prompt`, `image`, `video`, per-row options);
//! - [`shard`]: a stable share of the rows by a hash of `id` (FNV-1a 64, mod N), so N machines
//!   run one manifest without coordination;
//! - [`results`]: the results file, appended and flushed row by row, and read back on a rerun
//!   to skip the ids already done.

pub mod manifest;
pub mod results;
pub mod shard;

pub use manifest::{read_manifest, BadRow, Manifest, Row, RowOptions};
pub use results::ResultsFile;
pub use shard::Shard;
