//! The crate's error type.
//!
//! Every error says what failed and on what: the file, key, pattern or name
//! that was bad is part of the message, so a log line with only the error is
//! enough to act on.

use std::path::PathBuf;

/// `Result` with spillway's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in spillway's library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An event name that cannot be batched: empty, or with an empty segment.
    #[error("invalid event name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A subscription or policy pattern that cannot be parsed.
    #[error("invalid pattern {pattern:?}: {reason}")]
    InvalidPattern {
        pattern: String,
        reason: &'static str,
    },
    /// A configuration value that is out of range or inconsistent.
    #[error("invalid configuration at `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// A configuration file that could not be read or parsed.
    #[error("cannot load configuration from {path}: {reason}")]
    ConfigFile { path: PathBuf, reason: String },
    /// An I/O failure on a named file or directory. The cause is part of the
    /// message (and so not repeated as the error's `source`).
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A SQLite failure on a named database (the cause is part of the message).
    #[error("{action} {path}: {cause}")]
    Sqlite {
        action: &'static str,
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// A flush that did not complete before its deadline.
    #[error("flush did not complete within {0:?} (a subscriber or sink is stuck)")]
    FlushTimeout(std::time::Duration),
    /// The pipeline was shut down; nothing more is accepted.
    #[error("spillway is shut down")]
    ShutDown,
    /// Anything else, with its context.
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
