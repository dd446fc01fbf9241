//! The segment writer: a [`Sink`] that appends batches to zstd segment files.
//!
//! Batches are encoded to JSON Lines into a per-stream buffer. A frame is
//! compressed and written (one `write(2)`) when the buffer reaches
//! `max_frame_bytes`, when its oldest batch has waited `max_frame_delay`
//! (checked on [`Sink::tick`]), or on [`Sink::flush`] (which the engine calls
//! for urgent batches and for `Engine::flush`). With
//! [`Durability::Fsync`] every frame is followed by `fsync`.
//!
//! Files are sealed at `rotate_bytes` or `rotate_age`; the next frame starts
//! a new file. After every rotation, and every [`RETENTION_INTERVAL`], the
//! oldest sealed files are deleted while all segments together exceed
//! `retain_bytes`, and sealed files last written longer than `retain_age`
//! ago are deleted. A file being written is never deleted.
//!
//! On open, the newest file of each stream is scanned: a torn trailing frame
//! (incomplete, or failing its checksum, at the very end) left by a crash is
//! cut off with `set_len`, keeping every complete frame before it, and the
//! cut is reported by [`SegmentSink::recovered`]. New frames always go to a
//! new file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use zstd::zstd_safe;

use crate::error::{Error, Result};
use crate::layer::engine::Sink;
use crate::layer::record::{now_ns, Batch};
use crate::sinks::segment::config::{Durability, SegmentConfig};
use crate::sinks::segment::encode::encode_batch;
use crate::sinks::segment::reader::{Damage, FrameReader};
use crate::sinks::segment::{
    create_dir_private, list_segments, list_stream, segment_file_name, segment_seq, Stream,
    SEGMENTS_DIR,
};

/// How often the writer checks retention when no rotation happens: 10 s.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(10);

/// Writes persisted batches to `DIR/segments/<stream>/*.zst`.
///
/// See the [module docs](crate::sinks::segment) for an example.
pub struct SegmentSink {
    data_dir: PathBuf,
    config: SegmentConfig,
    streams: [StreamWriter; 3],
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
    next_seq: u32,
    last_retention: Instant,
    recovered: Vec<Damage>,
}

impl std::fmt::Debug for SegmentSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentSink")
            .field("data_dir", &self.data_dir)
            .field("config", &self.config)
            .field("recovered", &self.recovered)
            .finish()
    }
}

struct StreamWriter {
    stream: Stream,
    dir: PathBuf,
    /// Encoded lines waiting for their frame.
    pending: Vec<u8>,
    /// When the oldest pending batch arrived.
    pending_since: Option<Instant>,
    file: Option<OpenSegment>,
    /// The newest file name in this stream; new names must sort after it.
    last_name: Option<String>,
}

struct OpenSegment {
    path: PathBuf,
    file: File,
    len: u64,
    opened: Instant,
}

impl SegmentSink {
    /// Opens (creating it if needed, owner-only) the data directory
    /// `data_dir`, repairs a torn tail left by a crash in each stream's
    /// newest file, and applies retention. Nothing is created in the
    /// stream folders until the first frame is written.
    pub fn open(data_dir: impl AsRef<Path>, config: SegmentConfig) -> Result<SegmentSink> {
        config.validate()?;
        let data_dir = data_dir.as_ref().to_path_buf();
        create_dir_private(&data_dir.join(SEGMENTS_DIR))?;
        let mut compressor = zstd::bulk::Compressor::new(config.compression_level)
            .map_err(|e| Error::Other(format!("cannot start zstd compressor: {e}")))?;
        compressor
            .set_parameter(zstd_safe::CParameter::ChecksumFlag(true))
            .map_err(|e| Error::Other(format!("cannot enable zstd checksums: {e}")))?;
        let mut recovered = Vec::new();
        let mut next_seq = 0;
        let streams = Stream::ALL.map(|stream| StreamWriter {
            stream,
            dir: stream.dir(&data_dir),
            pending: Vec::new(),
            pending_since: None,
            file: None,
            last_name: None,
        });
        let mut sink = SegmentSink {
            data_dir,
            config,
            streams,
            compressor,
            compressed: Vec::new(),
            next_seq: 0,
            last_retention: Instant::now(),
            recovered: Vec::new(),
        };
        for w in sink.streams.iter_mut() {
            let files = list_stream(&sink.data_dir, w.stream)?;
            for f in &files {
                let seq = f.file_name().and_then(|n| n.to_str()).and_then(segment_seq);
                next_seq = next_seq.max(seq.map_or(0, |s| s + 1));
            }
            if let Some(newest) = files.last() {
                if let Some(d) = repair_tail(newest, sink.config.durability)? {
                    recovered.push(d);
                }
                w.last_name = newest
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_owned);
            }
        }
        sink.next_seq = next_seq;
        sink.recovered = recovered;
        sink.enforce_retention()?;
        Ok(sink)
    }

    /// What was cut off on open: one entry per stream whose newest file
    /// ended in a torn frame (file, offset of the cut, what was there).
    pub fn recovered(&self) -> &[Damage] {
        &self.recovered
    }

    /// The data directory (the one containing `segments/`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file each stream is writing now, if any.
    pub fn current_files(&self) -> Vec<PathBuf> {
        self.streams
            .iter()
            .filter_map(|w| w.file.as_ref().map(|f| f.path.clone()))
            .collect()
    }

    /// Writes the pending lines of stream `i` as frames: all of them when
    /// `all`, otherwise only while a full `max_frame_bytes` is waiting.
    fn emit(&mut self, i: usize, all: bool) -> Result<()> {
        let max = self.config.max_frame_bytes;
        let mut done = 0;
        let mut result = Ok(());
        loop {
            let rest = &self.streams[i].pending[done..];
            if rest.is_empty() || (!all && rest.len() < max) {
                break;
            }
            let cut = frame_cut(rest, max);
            let frame = self.streams[i].pending[done..done + cut].to_vec();
            done += cut;
            // A frame that cannot be written is dropped (the engine counts
            // the error); keeping it would grow memory on a full disk.
            if let Err(e) = self.write_frame(i, &frame) {
                result = Err(e);
                break;
            }
        }
        let w = &mut self.streams[i];
        w.pending.drain(..done);
        if w.pending.is_empty() {
            w.pending_since = None;
        }
        result
    }

    fn write_frame(&mut self, i: usize, data: &[u8]) -> Result<()> {
        self.compressed.clear();
        self.compressed
            .reserve(zstd_safe::compress_bound(data.len()));
        self.compressor
            .compress_to_buffer(data, &mut self.compressed)
            .map_err(|e| Error::Other(format!("zstd compression failed: {e}")))?;
        if self.streams[i].file.is_none() {
            let seg = self.create_file(i)?;
            self.streams[i].file = Some(seg);
        }
        let fsync = self.config.durability == Durability::Fsync;
        let Some(seg) = self.streams[i].file.as_mut() else {
            return Ok(());
        };
        if let Err(e) = seg.file.write_all(&self.compressed) {
            // Cut a partial write so the file stays a clean run of frames;
            // if even that fails, seal the file and start a new one.
            if seg.file.set_len(seg.len).is_err() {
                self.streams[i].file = None;
            }
            let path = self.streams[i]
                .file
                .as_ref()
                .map_or_else(|| self.streams[i].dir.clone(), |s| s.path.clone());
            return Err(Error::io("cannot write segment", path, e));
        }
        seg.len += self.compressed.len() as u64;
        if fsync {
            seg.file
                .sync_data()
                .map_err(|e| Error::io("cannot fsync segment", &seg.path, e))?;
        }
        if seg.len >= self.config.rotate_bytes {
            self.streams[i].file = None;
            self.enforce_retention()?;
        }
        Ok(())
    }

    /// Creates the next file of stream `i`, owner-only, with a name that
    /// sorts after every existing one.
    fn create_file(&mut self, i: usize) -> Result<OpenSegment> {
        let fsync = self.config.durability == Durability::Fsync;
        let w = &mut self.streams[i];
        create_dir_private(&w.dir)?;
        let mut ts = now_ns();
        for _ in 0..1000 {
            let name = segment_file_name(w.stream, ts, self.next_seq);
            self.next_seq = (self.next_seq + 1) % 1_000_000;
            if w.last_name.as_ref().is_some_and(|last| name <= *last) {
                // The clock went back (or a name collided): move past the last name.
                ts = ts.max(file_ts(w.last_name.as_deref()).unwrap_or(ts)) + 1;
                continue;
            }
            let path = w.dir.join(&name);
            let mut opts = OpenOptions::new();
            opts.append(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            match opts.open(&path) {
                Ok(file) => {
                    if fsync {
                        // Make the new directory entry durable too.
                        File::open(&w.dir)
                            .and_then(|d| d.sync_all())
                            .map_err(|e| Error::io("cannot fsync directory", &w.dir, e))?;
                    }
                    w.last_name = Some(name);
                    return Ok(OpenSegment {
                        path,
                        file,
                        len: 0,
                        opened: Instant::now(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("cannot create segment", path, e)),
            }
        }
        Err(Error::Other(format!(
            "cannot find a free segment file name in {}",
            w.dir.display()
        )))
    }

    /// Deletes sealed files beyond the retention limits, oldest first.
    fn enforce_retention(&mut self) -> Result<()> {
        self.last_retention = Instant::now();
        let (max_bytes, max_age) = (self.config.retain_bytes, self.config.retain_age);
        if max_bytes == 0 && max_age.is_zero() {
            return Ok(());
        }
        let open: Vec<PathBuf> = self.current_files();
        let mut files = Vec::new();
        for path in list_segments(&self.data_dir)? {
            // Gone already (another reader's retention, or a user): skip it.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let key = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split_once('-'))
                .map(|(_, rest)| rest.to_owned())
                .unwrap_or_default();
            files.push((key, path, meta.len(), meta.modified().ok()));
        }
        // Oldest first across streams: names are `<stream>-<time>-<seq>`.
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.2).sum();
        let now = SystemTime::now();
        let mut result = Ok(());
        for (_, path, len, modified) in files {
            if open.contains(&path) {
                continue;
            }
            let expired = !max_age.is_zero()
                && modified
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age > max_age);
            let over = max_bytes > 0 && total > max_bytes;
            if !(expired || over) {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => total -= len,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= len,
                Err(e) => {
                    if result.is_ok() {
                        result = Err(Error::io("cannot delete old segment", &path, e));
                    }
                }
            }
        }
        result
    }

    fn flush_all(&mut self) -> Result<()> {
        let mut result = Ok(());
        for i in 0..self.streams.len() {
            if let Err(e) = self.emit(i, true) {
                result = result.and(Err(e));
            }
        }
        result
    }
}

impl Sink for SegmentSink {
    fn write_batch(&mut self, batch: &Batch) -> Result<()> {
        if !batch.persist {
            return Ok(());
        }
        let i = Stream::ALL
            .iter()
            .position(|s| *s == Stream::of(batch.kind))
            .unwrap_or(0);
        let w = &mut self.streams[i];
        encode_batch(batch, &mut w.pending);
        w.pending_since.get_or_insert_with(Instant::now);
        self.emit(i, false)
    }

    fn flush(&mut self) -> Result<()> {
        self.flush_all()
    }

    fn tick(&mut self, now: Instant) -> Result<()> {
        let mut result = Ok(());
        let mut rotated = false;
        for i in 0..self.streams.len() {
            let w = &mut self.streams[i];
            let old = w
                .file
                .as_ref()
                .is_some_and(|f| now.saturating_duration_since(f.opened) >= self.config.rotate_age);
            if old {
                // Sealed by age: the next frame starts a new file.
                w.file = None;
                rotated = true;
            }
            let due = w
                .pending_since
                .is_some_and(|t| now.saturating_duration_since(t) >= self.config.max_frame_delay);
            if due {
                if let Err(e) = self.emit(i, true) {
                    result = result.and(Err(e));
                }
            }
        }
        if rotated || now.saturating_duration_since(self.last_retention) >= RETENTION_INTERVAL {
            if let Err(e) = self.enforce_retention() {
                result = result.and(Err(e));
            }
        }
        result
    }
}

impl Drop for SegmentSink {
    fn drop(&mut self) {
        // Best effort: the engine flushes before dropping its sinks; this
        // covers a sink used on its own. An error here has nowhere to go.
        let _ = self.flush_all();
    }
}

/// Where to end the next frame in `rest`: after the last whole line that
/// fits in `max` bytes, or after the first line if even that is longer.
fn frame_cut(rest: &[u8], max: usize) -> usize {
    if rest.len() <= max {
        return rest.len();
    }
    match rest[..max].iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None => rest[max..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(rest.len(), |i| max + i + 1),
    }
}

/// The creation time in a segment file name, in ns since the epoch.
fn file_ts(name: Option<&str>) -> Option<i64> {
    // <stream>-YYYYMMDDTHHMMSS.nnnnnnnnnZ-<seq>.zst
    let ts = name?.split('-').nth(1)?;
    let (date, rest) = ts.split_once('T')?;
    let (hms, nanos) = rest.strip_suffix('Z')?.split_once('.')?;
    if date.len() != 8 || hms.len() != 6 || nanos.len() != 9 {
        return None;
    }
    let num = |s: &str| s.parse::<i64>().ok();
    let month = time::Month::try_from(num(&date[4..6])? as u8).ok()?;
    let date =
        time::Date::from_calendar_date(num(&date[..4])? as i32, month, num(&date[6..])? as u8)
            .ok()?;
    let dt = date
        .with_hms_nano(
            num(&hms[..2])? as u8,
            num(&hms[2..4])? as u8,
            num(&hms[4..])? as u8,
            num(nanos)? as u32,
        )
        .ok()?
        .assume_utc();
    i64::try_from(dt.unix_timestamp_nanos()).ok()
}

/// Scans `path` and cuts off everything after its last complete, valid
/// frame. Returns what was cut, if anything.
fn repair_tail(path: &Path, durability: Durability) -> Result<Option<Damage>> {
    let mut reader = FrameReader::open(path, 0)?;
    let mut good_end = 0;
    let mut first_bad: Option<Damage> = None;
    while let Some(r) = reader.next_frame() {
        match r {
            Ok(frame) => {
                good_end = frame.end;
                first_bad = None;
            }
            Err(d) => {
                first_bad.get_or_insert(d);
            }
        }
    }
    let len = reader.file_len()?;
    drop(reader);
    if len <= good_end {
        return Ok(None);
    }
    let what = match first_bad {
        Some(d) => d.reason,
        None => "incomplete frame".to_owned(),
    };
    let cut = len - good_end;
    if good_end == 0 {
        fs::remove_file(path).map_err(|e| Error::io("cannot remove torn segment", path, e))?;
    } else {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io("cannot open torn segment", path, e))?;
        file.set_len(good_end)
            .map_err(|e| Error::io("cannot cut torn segment", path, e))?;
        if durability == Durability::Fsync {
            file.sync_all()
                .map_err(|e| Error::io("cannot fsync segment", path, e))?;
        }
    }
    Ok(Some(Damage {
        path: path.to_path_buf(),
        offset: good_end,
        reason: if good_end == 0 {
            format!("removed a segment holding only a torn frame ({cut} bytes: {what})")
        } else {
            format!("cut {cut} bytes of torn frame at the end ({what})")
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches frames split inside a line (a reader would see half a JSON object).
    #[test]
    fn frames_are_cut_after_whole_lines() {
        assert_eq!(frame_cut(b"ab\ncd\n", 100), 6);
        assert_eq!(frame_cut(b"ab\ncd\nef\n", 7), 6);
        assert_eq!(frame_cut(b"abcdefgh\nij\n", 4), 9, "one long line");
        assert_eq!(frame_cut(b"abcdefgh", 4), 8);
    }

    // Catches a name parser that disagrees with the name writer (new files
    // could then sort before old ones after a clock step back).
    #[test]
    fn file_names_round_trip_their_time() {
        let ts = 1_796_314_801_123_456_789;
        let name = segment_file_name(Stream::Events, ts, 3);
        assert_eq!(file_ts(Some(&name)), Some(ts));
        assert_eq!(file_ts(Some("events-garbage-000001.zst")), None);
    }
}
