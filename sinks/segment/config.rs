//! The `[segments]` table of the configuration file.
//!
//! ```
//! use spillway::sinks::segment::{Durability, SegmentConfig};
//! use std::time::Duration;
//!
//! let c: SegmentConfig = toml::from_str(r#"
//!     durability = "fsync"
//!     rotate_bytes = 16777216
//!     retain_age_secs = 86400
//! "#).unwrap();
//! assert_eq!(c.durability, Durability::Fsync);
//! assert_eq!(c.rotate_bytes, 16 << 20);
//! assert_eq!(c.retain_age, Duration::from_secs(86400));
//! assert_eq!(c.max_frame_delay, SegmentConfig::default().max_frame_delay);
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default zstd level: 1.
///
/// Measured on this project's shared 2-core machine on 400 000 realistic
/// log lines as the writer encodes them (347 bytes a line; four modules,
/// typed fields, a span), in 256 KiB frames with checksums:
///
/// | level | ratio | compression speed (input) |
/// |---|---|---|
/// | 1 | 14.6x | 690-950 MB/s |
/// | 3 | 13.1x | 510-680 MB/s |
///
/// Level 3 is slower and, on these lines, no smaller, so level 1 it is.
/// Measure your own lines with `cargo test --release --test integration
/// segments::measure_compression -- --ignored --nocapture`.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
/// Default uncompressed size at which a frame is closed and written: 256 KiB.
///
/// Frames compress independently (a reader can start at any frame), so
/// small frames cost ratio. Level 1, same lines as above: 16 KiB frames
/// 10.5x, 64 KiB 13.9x, 256 KiB 14.6x, 1 MiB 14.6x. 256 KiB is where the
/// gain stops; in a flood (hundreds of MB/s of lines) it fills in about a
/// millisecond, so under load the size bound, not the delay, closes frames.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 << 10;
/// Default longest time a batch waits in memory before its frame is written:
/// 100 ms.
///
/// This bounds what `kill -9` can lose beyond the engine's own batch window,
/// and how far a follower (`spillway tail -f`, the SQLite indexer) lags.
/// Urgent batches (holding WARN/ERROR logs) and `flush()` do not wait. A
/// quiet service gets small frames (worse ratio), but then there is little
/// to store; a busy one fills `max_frame_bytes` long before the delay.
pub const DEFAULT_MAX_FRAME_DELAY: Duration = Duration::from_millis(100);
/// Default size at which a segment file is sealed and a new one started: 64 MiB.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 << 20;
/// Default age at which a segment file is sealed and a new one started: 1 hour.
pub const DEFAULT_ROTATE_AGE: Duration = Duration::from_secs(3600);
/// Default total size of all segment files kept: 1 GiB (oldest deleted first).
pub const DEFAULT_RETAIN_BYTES: u64 = 1 << 30;
/// Default age after which a sealed segment file is deleted: 7 days (by the
/// time of its last write).
pub const DEFAULT_RETAIN_AGE: Duration = Duration::from_secs(7 * 86_400);

/// When a written frame is considered safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// One `write(2)` per frame, no `fsync`: survives a crash of the process
    /// (`kill -9`, panic), not a crash of the machine. The default.
    Buffered,
    /// `fsync` after every frame (and on the directory when a file is
    /// created): survives power loss, at the cost of one disk flush per frame.
    Fsync,
}

/// How segment files are written, rotated and retained (the `[segments]`
/// table). Every key is optional.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// zstd compression level, 1 (fastest) to 19. Default 1.
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
    /// A frame is written once this many uncompressed bytes of JSON lines are
    /// waiting. Default 256 KiB.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// A frame is written at the latest this long after its first batch
    /// arrived (`max_frame_delay_ms`). Default 100 ms.
    #[serde(
        rename = "max_frame_delay_ms",
        with = "crate::layer::config::millis",
        default = "default_max_frame_delay"
    )]
    pub max_frame_delay: Duration,
    /// `"buffered"` (default: a `write` per frame) or `"fsync"` (an `fsync`
    /// per frame).
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Seal the current file and start a new one at this size. Default 64 MiB.
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: u64,
    /// Seal the current file and start a new one at this age
    /// (`rotate_age_secs`). Default 3600.
    #[serde(
        rename = "rotate_age_secs",
        with = "crate::layer::config::secs",
        default = "default_rotate_age"
    )]
    pub rotate_age: Duration,
    /// Delete the oldest sealed files while all segments together exceed this
    /// size; 0 keeps everything. Default 1 GiB.
    #[serde(default = "default_retain_bytes")]
    pub retain_bytes: u64,
    /// Delete sealed files last written longer ago than this
    /// (`retain_age_secs`); 0 keeps them forever. Default 7 days.
    #[serde(
        rename = "retain_age_secs",
        with = "crate::layer::config::secs",
        default = "default_retain_age"
    )]
    pub retain_age: Duration,
}

fn default_compression_level() -> i32 {
    DEFAULT_COMPRESSION_LEVEL
}
fn default_max_frame_bytes() -> usize {
    DEFAULT_MAX_FRAME_BYTES
}
fn default_max_frame_delay() -> Duration {
    DEFAULT_MAX_FRAME_DELAY
}
fn default_durability() -> Durability {
    Durability::Buffered
}
fn default_rotate_bytes() -> u64 {
    DEFAULT_ROTATE_BYTES
}
fn default_rotate_age() -> Duration {
    DEFAULT_ROTATE_AGE
}
fn default_retain_bytes() -> u64 {
    DEFAULT_RETAIN_BYTES
}
fn default_retain_age() -> Duration {
    DEFAULT_RETAIN_AGE
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_frame_delay: DEFAULT_MAX_FRAME_DELAY,
            durability: Durability::Buffered,
            rotate_bytes: DEFAULT_ROTATE_BYTES,
            rotate_age: DEFAULT_ROTATE_AGE,
            retain_bytes: DEFAULT_RETAIN_BYTES,
            retain_age: DEFAULT_RETAIN_AGE,
        }
    }
}

impl SegmentConfig {
    /// Checks ranges; the error names the key as written in TOML.
    pub fn validate(&self) -> Result<()> {
        let range = zstd::compression_level_range();
        if !range.contains(&self.compression_level) || self.compression_level < 1 {
            return Err(Error::config(
                "segments.compression_level",
                format!(
                    "{} is out of range (1 to {})",
                    self.compression_level,
                    range.end()
                ),
            ));
        }
        if self.max_frame_bytes == 0 {
            return Err(Error::config(
                "segments.max_frame_bytes",
                "must be at least 1",
            ));
        }
        if self.rotate_bytes == 0 {
            return Err(Error::config("segments.rotate_bytes", "must be at least 1"));
        }
        if self.rotate_age.is_zero() {
            return Err(Error::config(
                "segments.rotate_age_secs",
                "must be at least 1 second",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches a misspelled key being silently ignored (the user thinks
    // retention is on, and the disk fills).
    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = toml::from_str::<SegmentConfig>("retain_days = 3")
            .expect_err("unknown key must fail")
            .to_string();
        assert!(err.contains("retain_days"), "{err}");
    }

    // Catches defaults in serde that drift from `Default` (two sources of truth).
    #[test]
    fn an_empty_table_equals_default() {
        let c: SegmentConfig = toml::from_str("").expect("empty table");
        assert_eq!(c, SegmentConfig::default());
        let round: SegmentConfig =
            toml::from_str(&toml::to_string(&c).expect("serialize")).expect("parse back");
        assert_eq!(round, c);
    }

    // Catches an out-of-range level reaching zstd (which would clamp it silently).
    #[test]
    fn validate_names_the_bad_key() {
        let c = SegmentConfig {
            compression_level: 99,
            ..SegmentConfig::default()
        };
        let err = c.validate().expect_err("level 99").to_string();
        assert!(err.contains("segments.compression_level"), "{err}");
        let c = SegmentConfig {
            rotate_bytes: 0,
            ..SegmentConfig::default()
        };
        assert!(c.validate().is_err());
        assert!(SegmentConfig::default().validate().is_ok());
    }
}
