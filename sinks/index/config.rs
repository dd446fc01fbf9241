//! The `[index]` table of the configuration file.
//!
//! ```
//! use spillway::sinks::index::IndexConfig;
//! let config: IndexConfig = toml::from_str("poll_interval_ms = 100\nrows_per_transaction = 2000").unwrap();
//! assert_eq!(config.rows_per_transaction, 2000);
//! assert_eq!(config.busy_timeout, IndexConfig::default().busy_timeout);
//! config.validate().unwrap();
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default time the background indexer waits between looks at the segments
/// when it has caught up: 200 ms (a record is queryable ~0.2 s after its
/// frame reaches disk).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Default number of rows per SQLite transaction: 5000. Larger transactions
/// amortise the commit; beyond a few thousand rows the gain is small
/// and a writer holds the lock longer.
pub const DEFAULT_ROWS_PER_TRANSACTION: usize = 5000;
/// Default time a connection waits for a lock held by another one before it
/// reports `database is locked`: 5 s.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default ceiling of the background indexer's back-off after a failure: 10 s.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Default time dropping the indexer's handle waits for the thread to stop: 2 s.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Default SQLite page cache per connection: 16 MiB (index pages of the
/// recent past stay in memory, so appends never read from disk).
pub const DEFAULT_CACHE_BYTES: u64 = 16 << 20;

/// How the SQLite index follows the segments (`[index]` in the config file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// How long the background indexer sleeps between looks at the segment
    /// files once it has caught up, in milliseconds.
    #[serde(
        rename = "poll_interval_ms",
        with = "crate::layer::config::millis",
        default = "default_poll_interval"
    )]
    pub poll_interval: Duration,
    /// The most rows inserted in one transaction (whole frames are never
    /// split, so a transaction may hold one frame more).
    #[serde(default = "default_rows_per_transaction")]
    pub rows_per_transaction: usize,
    /// How long to wait for another connection's lock before giving up on
    /// this attempt (the indexer then backs off and retries), in milliseconds.
    #[serde(
        rename = "busy_timeout_ms",
        with = "crate::layer::config::millis",
        default = "default_busy_timeout"
    )]
    pub busy_timeout: Duration,
    /// The longest pause between retries after the index could not be
    /// written (locked, unwritable, corrupt), in milliseconds.
    #[serde(
        rename = "max_backoff_ms",
        with = "crate::layer::config::millis",
        default = "default_max_backoff"
    )]
    pub max_backoff: Duration,
    /// How long stopping the indexer waits for its current transaction, in
    /// milliseconds. Work not committed by then is redone on the next start.
    #[serde(
        rename = "stop_timeout_ms",
        with = "crate::layer::config::millis",
        default = "default_stop_timeout"
    )]
    pub stop_timeout: Duration,
    /// SQLite page cache of the indexer's connection, in bytes.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
}

fn default_poll_interval() -> Duration {
    DEFAULT_POLL_INTERVAL
}
fn default_rows_per_transaction() -> usize {
    DEFAULT_ROWS_PER_TRANSACTION
}
fn default_busy_timeout() -> Duration {
    DEFAULT_BUSY_TIMEOUT
}
fn default_max_backoff() -> Duration {
    DEFAULT_MAX_BACKOFF
}
fn default_stop_timeout() -> Duration {
    DEFAULT_STOP_TIMEOUT
}
fn default_cache_bytes() -> u64 {
    DEFAULT_CACHE_BYTES
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            poll_interval: DEFAULT_POLL_INTERVAL,
            rows_per_transaction: DEFAULT_ROWS_PER_TRANSACTION,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            max_backoff: DEFAULT_MAX_BACKOFF,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

impl IndexConfig {
    /// Checks the values; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: &str| Err(Error::config(format!("index.{key}"), reason));
        if self.rows_per_transaction == 0 {
            return bad("rows_per_transaction", "must be at least 1");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval_ms", "must be at least 1");
        }
        if self.max_backoff.is_zero() {
            return bad("max_backoff_ms", "must be at least 1");
        }
        if self.busy_timeout > Duration::from_millis(i32::MAX as u64) {
            return bad("busy_timeout_ms", "must fit in 31 bits (about 24 days)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches a TOML key that silently does nothing (typo accepted) or a
    // default that drifts from its documented constant.
    #[test]
    fn toml_keys_defaults_and_unknown_keys() {
        let empty: IndexConfig = toml::from_str("").unwrap();
        assert_eq!(empty, IndexConfig::default());
        let c: IndexConfig = toml::from_str(
            "poll_interval_ms = 50\nrows_per_transaction = 10\nbusy_timeout_ms = 7\n\
             max_backoff_ms = 9\nstop_timeout_ms = 11\ncache_bytes = 1024",
        )
        .unwrap();
        assert_eq!(c.poll_interval, Duration::from_millis(50));
        assert_eq!(c.rows_per_transaction, 10);
        assert_eq!(c.busy_timeout, Duration::from_millis(7));
        assert_eq!(c.max_backoff, Duration::from_millis(9));
        assert_eq!(c.stop_timeout, Duration::from_millis(11));
        assert_eq!(c.cache_bytes, 1024);
        let err = toml::from_str::<IndexConfig>("rows_per_txn = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rows_per_txn"), "{err}");
    }

    // Catches a zero that would make the indexer spin or never commit.
    #[test]
    fn validate_names_the_bad_key() {
        let c = IndexConfig {
            rows_per_transaction: 0,
            ..IndexConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("index.rows_per_transaction"), "{err}");
        let c = IndexConfig {
            poll_interval: Duration::ZERO,
            ..IndexConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("poll_interval_ms"));
    }
}
