//! Durable zstd segments: the source of truth for everything spillway stores.
//!
//! Every persisted batch is encoded as JSON Lines ([`encode`]) and appended to
//! a segment file of its stream, compressed as standard zstd frames with the
//! content checksum on, so `zstd -dc`, `zstdcat` or Python's `zstandard` read
//! them. The layout (DESIGN.md section 4) is
//!
//! ```text
//! DIR/segments/logs/logs-20261203T162001.123456789Z-000001.zst
//! DIR/segments/events/events-20261203T162001.123456789Z-000002.zst
//! DIR/segments/telemetry/telemetry-20261203T162001.123456789Z-000003.zst
//! ```
//!
//! File names sort by creation time within a stream. The writer
//! ([`SegmentSink`]) gathers batches for up to
//! [`SegmentConfig::max_frame_delay`] or [`SegmentConfig::max_frame_bytes`]
//! into one frame, rotates files by size and age, deletes the oldest sealed
//! files beyond the retention limits, and on open cuts off a torn trailing
//! frame left by a crash. The reader ([`reader`]) walks frames, reports
//! damaged ones with file and offset, resynchronises after them, and follows
//! a live directory.
//!
//! ```
//! use spillway::sinks::segment::{list_segments, reader::SegmentReader, SegmentConfig, SegmentSink};
//! use spillway::{BatchConfig, Engine};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let sink = SegmentSink::open(dir.path(), SegmentConfig::default())?;
//! let (engine, guard) = Engine::builder(BatchConfig::default())
//!     .sink(Box::new(sink))
//!     .build()?;
//! engine.publish("data:users:created", serde_json::json!({"id": 42}))?;
//! drop(guard); // flushes and stops
//!
//! assert_eq!(list_segments(dir.path())?.len(), 1);
//! let mut lines = Vec::new();
//! for item in SegmentReader::open(dir.path())? {
//!     lines.extend(item?.into_frame().expect("no damage").lines);
//! }
//! assert!(lines[0].contains(r#""name":"data:users:created""#));
//! # Ok::<(), spillway::Error>(())
//! ```

pub mod config;
pub mod encode;
pub mod reader;
mod writer;

use std::fs;
use std::path::{Path, PathBuf};

pub use config::{Durability, SegmentConfig};
pub use writer::SegmentSink;

use crate::error::{Error, Result};
use crate::layer::record::{rfc3339, RecordKind};

/// The folder under the data directory that holds one sub-folder per stream.
pub const SEGMENTS_DIR: &str = "segments";
/// The file extension of segment files.
pub const SEGMENT_EXT: &str = "zst";

/// A segment stream: each kind of record goes to files of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    /// Log records (`DIR/segments/logs/`).
    Logs,
    /// Bus events (`DIR/segments/events/`).
    Events,
    /// Telemetry samples and their summaries (`DIR/segments/telemetry/`).
    Telemetry,
}

impl Stream {
    /// Every stream, in reading order.
    pub const ALL: [Stream; 3] = [Stream::Logs, Stream::Events, Stream::Telemetry];

    /// `"logs"`, `"events"` or `"telemetry"`: the folder and file-name prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Logs => "logs",
            Stream::Events => "events",
            Stream::Telemetry => "telemetry",
        }
    }

    /// The stream records of this kind are written to.
    pub fn of(kind: RecordKind) -> Stream {
        match kind {
            RecordKind::Log => Stream::Logs,
            RecordKind::Event => Stream::Events,
            RecordKind::Sample => Stream::Telemetry,
        }
    }

    /// `DIR/segments/<stream>`.
    pub fn dir(self, data_dir: &Path) -> PathBuf {
        data_dir.join(SEGMENTS_DIR).join(self.as_str())
    }

    /// The stream a segment file belongs to, from its file name.
    pub fn of_file(path: &Path) -> Option<Stream> {
        let name = path.file_name()?.to_str()?;
        Stream::ALL.into_iter().find(|s| {
            name.strip_prefix(s.as_str())
                .is_some_and(|r| r.starts_with('-'))
        })
    }
}

/// The file name of a segment created at `ts_ns` with sequence number `seq`:
/// `<stream>-<YYYYMMDD>T<HHMMSS>.<nnnnnnnnn>Z-<seq:06>.zst`.
pub(crate) fn segment_file_name(stream: Stream, ts_ns: i64, seq: u32) -> String {
    // rfc3339 gives "YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ"; drop the separators.
    let ts: String = rfc3339(ts_ns)
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!(
        "{}-{ts}-{:06}.{SEGMENT_EXT}",
        stream.as_str(),
        seq % 1_000_000
    )
}

/// The sequence number in a segment file name, if it has one.
pub(crate) fn segment_seq(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(SEGMENT_EXT)?.strip_suffix('.')?;
    stem.rsplit('-').next()?.parse().ok()
}

/// The segment files of one stream, sorted by name (creation time). A
/// stream folder that does not exist has none.
pub fn list_stream(data_dir: &Path, stream: Stream) -> Result<Vec<PathBuf>> {
    let dir = stream.dir(data_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot list segments in", dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list segments in", &dir, e))?;
        let path = entry.path();
        let is_segment = path.extension().is_some_and(|x| x == SEGMENT_EXT)
            && Stream::of_file(&path) == Some(stream);
        // A file deleted between listing and stat is simply gone.
        if is_segment && entry.file_type().is_ok_and(|t| t.is_file()) {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// All segment files under `DIR/segments/*/`: the logs stream first, then
/// events, then telemetry, each sorted by file name (creation time).
/// `data_dir` is the folder that contains `segments/`.
pub fn list_segments(data_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    for stream in Stream::ALL {
        all.extend(list_stream(data_dir, stream)?);
    }
    Ok(all)
}

/// Creates `dir` and its missing parents, owner-only (0700).
pub(crate) fn create_dir_private(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| Error::io("cannot create directory", dir, e))
}

/// Batches for unit tests, built without an engine.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use serde_json::json;

    use crate::layer::budget::{Budget, Reservation};
    use crate::layer::record::{Batch, BusEvent, RecordKind, Records};

    /// An event batch `id` of `n` events `data:users:created` whose payloads
    /// are `{"id": first + i}`.
    pub(crate) fn event_batch(id: u64, first: u64, n: u64) -> Batch {
        let events = (first..first + n)
            .map(|i| BusEvent {
                name: "data:users:created".into(),
                payload: Arc::new(json!({ "id": i, "pad": "x".repeat(40) })),
                ts_ns: 1_000 + i as i64,
            })
            .collect();
        Batch {
            id,
            prefix: Arc::from("data:users"),
            kind: RecordKind::Event,
            records: Records::Events(events),
            dropped: 0,
            dropped_since_ns: None,
            first_ts_ns: 1_000 + first as i64,
            last_ts_ns: 1_000 + (first + n) as i64,
            persist: true,
            urgent: false,
            summary: None,
            captured: None,
            _reservation: Reservation::new(&Budget::new(1 << 20), &Default::default(), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches names that do not sort by time (the reader and retention rely on it).
    #[test]
    fn file_names_sort_by_time_then_sequence() {
        let a = segment_file_name(Stream::Logs, 1_796_314_801_123_456_789, 7);
        assert_eq!(a, "logs-20261203T162001.123456789Z-000007.zst");
        let b = segment_file_name(Stream::Logs, 1_796_314_801_123_456_789, 8);
        let c = segment_file_name(Stream::Logs, 1_796_314_802_000_000_000, 1);
        assert!(a < b && b < c);
        assert_eq!(segment_seq(&a), Some(7));
        assert_eq!(Stream::of_file(Path::new(&a)), Some(Stream::Logs));
        assert_eq!(Stream::of_file(Path::new("logsx-1.zst")), None);
    }

    // Catches a listing that mixes streams, includes strays, or is unordered.
    #[test]
    fn list_segments_orders_streams_then_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (stream, ts) in [
            (Stream::Telemetry, 1),
            (Stream::Events, 2),
            (Stream::Logs, 3),
            (Stream::Logs, 1),
        ] {
            let d = stream.dir(dir.path());
            create_dir_private(&d).expect("mkdir");
            fs::write(d.join(segment_file_name(stream, ts, 0)), b"").expect("write");
        }
        fs::write(Stream::Logs.dir(dir.path()).join("notes.txt"), b"").expect("write");
        let names: Vec<String> = list_segments(dir.path())
            .expect("list")
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                segment_file_name(Stream::Logs, 1, 0),
                segment_file_name(Stream::Logs, 3, 0),
                segment_file_name(Stream::Events, 2, 0),
                segment_file_name(Stream::Telemetry, 1, 0),
            ]
        );
        assert!(list_segments(&dir.path().join("missing"))
            .expect("missing dir is empty")
            .is_empty());
    }
}
