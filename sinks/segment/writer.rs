//! The segment writer: a [`Sink`] that appends batches to zstd segment files.
//!
//! Batches are encoded to JSON Lines into a per-stream buffer. A frame is
//! compressed and written (one `write(2)`) when the buffer reaches
//! `max_frame_bytes`, when its oldest batch has waited `max_frame_delay`
//! (checked on [`Sink::tick`]), or on [`Sink::flush`] (which the engine calls
//! for urgent batches and for `Engine::flush`). With
//! [`Durability::Fsync`] every frame is followed by `fsync`.
//!
//! Compression runs on a thread of its own (`spillway-zstd`), one frame
//! ahead: while a full frame is compressed the sink goes on encoding the
//! next batches, and writes the compressed frame before it hands over the
//! next one (or on the next tick, or flush). Files are only ever written
//! from the sink's thread, in order. Under a flood this puts the two
//! costliest steps, encoding and compressing, on two cores.
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

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant, SystemTime};

use zstd::zstd_safe;

use crate::error::{Error, Result};
use crate::layer::engine::Sink;
use crate::layer::record::{now_ns, Batch};
use crate::sinks::segment::config::{Durability, SegmentConfig};
use crate::sinks::segment::encode::Encoder;
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
    encoder: Encoder,
    zstd: Compression,
    next_seq: u32,
    last_retention: Instant,
    recovered: Vec<Damage>,
    /// Held for the sink's life: one writer per data directory.
    _lock: File,
}

/// The lock file that makes a data directory single-writer.
const LOCK_FILE: &str = ".writer.lock";

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
        // Two writers would cut each other's live files on open: refuse the second.
        let lock_path = data_dir.join(SEGMENTS_DIR).join(LOCK_FILE);
        let mut options = OpenOptions::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let lock = options
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io("cannot open the writer lock", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Other(format!(
                    "data directory {} is in use: another writer holds {}",
                    data_dir.display(),
                    lock_path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io("cannot lock", &lock_path, e))
            }
        }
        let mut compressor = zstd::bulk::Compressor::new(config.compression_level)
            .map_err(|e| Error::Other(format!("cannot start zstd compressor: {e}")))?;
        compressor
            .set_parameter(zstd_safe::CParameter::ChecksumFlag(true))
            .map_err(|e| Error::Other(format!("cannot enable zstd checksums: {e}")))?;
        let zstd = Compression::start(compressor)?;
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
            encoder: Encoder::default(),
            zstd,
            next_seq: 0,
            last_retention: Instant::now(),
            recovered: Vec::new(),
            _lock: lock,
        };
        for w in sink.streams.iter_mut() {
            let files = list_stream(&sink.data_dir, w.stream)?;
            for f in &files {
                let seq = f.file_name().and_then(|n| n.to_str()).and_then(segment_seq);
                next_seq = next_seq.max(seq.map_or(0, |s| s.saturating_add(1)));
            }
            // The newest of our own files: a stray file in the folder (say
            // `events-backup.zst`) must not decide what sorts last.
            let ours = files
                .iter()
                .rev()
                .find(|f| file_ts(f.file_name().and_then(|n| n.to_str())).is_some());
            if let Some(newest) = ours {
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
    /// `all` (and then waits until they are written), otherwise only while
    /// a full `max_frame_bytes` is waiting (the last frames may still be in
    /// compression when this returns).
    fn emit(&mut self, i: usize, all: bool) -> Result<()> {
        let max = self.config.max_frame_bytes;
        let mut pending = std::mem::take(&mut self.streams[i].pending);
        let mut done = 0;
        let mut result = Ok(());
        loop {
            let rest = &pending[done..];
            if rest.is_empty() || (!all && rest.len() < max) {
                break;
            }
            let cut = frame_cut(rest, max);
            let frame = if done == 0 && rest.len() - cut <= cut {
                // The usual case: the frame leaves in the pending buffer
                // itself, and only the short rest after it is copied.
                let mut next = self.zstd.buffer();
                next.extend_from_slice(&rest[cut..]);
                let mut frame = std::mem::replace(&mut pending, next);
                frame.truncate(cut);
                frame
            } else {
                let mut frame = self.zstd.buffer();
                frame.extend_from_slice(&rest[..cut]);
                done += cut;
                frame
            };
            // Lines that cannot be written are dropped, all of them (the
            // engine counts the error): keeping them would grow memory
            // without bound on a full disk.
            if let Err(e) = self.submit(i, frame) {
                result = Err(e);
                done = pending.len();
                break;
            }
        }
        if all {
            result = result.and(self.finish());
        }
        pending.drain(..done);
        let w = &mut self.streams[i];
        w.pending = pending;
        if w.pending.is_empty() {
            w.pending_since = None;
        }
        result
    }

    /// Hands a frame of stream `i` to the compression thread, first writing
    /// the oldest frame in compression if `FRAMES_IN_FLIGHT` already are.
    fn submit(&mut self, i: usize, frame: Vec<u8>) -> Result<()> {
        let mut written = Ok(());
        while self.zstd.inflight.len() >= FRAMES_IN_FLIGHT {
            written = written.and(self.finish_one());
        }
        let out = self.zstd.compressed.pop().unwrap_or_default();
        if self.zstd.jobs.send((frame, out)).is_err() {
            return written.and(Err(Error::Other(
                "the zstd compression thread is gone".into(),
            )));
        }
        self.zstd.inflight.push_back(i);
        written
    }

    /// Waits for the oldest frame in compression and writes it.
    fn finish_one(&mut self) -> Result<()> {
        let Some(i) = self.zstd.inflight.pop_front() else {
            return Ok(());
        };
        match self.zstd.done.recv() {
            Ok(done) => self.write_done(i, done),
            Err(_) => {
                self.zstd.inflight.clear();
                Err(Error::Other("the zstd compression thread is gone".into()))
            }
        }
    }

    /// Waits for every frame in compression and writes them, in order.
    fn finish(&mut self) -> Result<()> {
        let mut result = Ok(());
        while !self.zstd.inflight.is_empty() {
            result = result.and(self.finish_one());
        }
        result
    }

    /// Writes the frames whose compression is done; does not wait.
    fn poll(&mut self) -> Result<()> {
        let mut result = Ok(());
        while let Some(&i) = self.zstd.inflight.front() {
            match self.zstd.done.try_recv() {
                Ok(done) => {
                    self.zstd.inflight.pop_front();
                    result = result.and(self.write_done(i, done));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.zstd.inflight.clear();
                    return result.and(Err(Error::Other(
                        "the zstd compression thread is gone".into(),
                    )));
                }
            }
        }
        result
    }

    fn write_done(&mut self, i: usize, (frame, out): Done) -> Result<()> {
        self.zstd.recycle(frame);
        let result = match &out {
            Ok(compressed) => self.write_frame(i, compressed),
            Err(e) => Err(Error::Other(format!("zstd compression failed: {e}"))),
        };
        if let Ok(buf) = out {
            self.zstd.compressed.push(buf);
        }
        result
    }

    /// Appends one compressed frame to stream `i`'s file (creating it, and
    /// rotating after it, as needed).
    fn write_frame(&mut self, i: usize, compressed: &[u8]) -> Result<()> {
        if self.streams[i].file.is_none() {
            let seg = self.create_file(i)?;
            self.streams[i].file = Some(seg);
        }
        let fsync = self.config.durability == Durability::Fsync;
        let Some(seg) = self.streams[i].file.as_mut() else {
            return Ok(());
        };
        if let Err(e) = seg.file.write_all(compressed) {
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
        seg.len += compressed.len() as u64;
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
        result.and(self.finish())
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
        self.encoder.encode(batch, &mut w.pending);
        w.pending_since.get_or_insert_with(Instant::now);
        let result = self.emit(i, false);
        result.and(self.poll())
    }

    fn flush(&mut self) -> Result<()> {
        self.flush_all()
    }

    fn reads_captured_logs(&self, _: crate::layer::engine::sealed::Token) -> bool {
        true
    }

    fn tick(&mut self, now: Instant) -> Result<()> {
        // The frame in compression is written now, whatever else is due.
        let mut result = self.finish();
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

/// A compressed frame (or why it is not), with the frame's text buffer back.
type Done = (Vec<u8>, std::result::Result<Vec<u8>, String>);

/// How many frames may wait for or be in compression at once. The sink
/// thread goes on encoding (and so releases the engine's budget) while the
/// compression thread works through them; with one frame ahead, a burst
/// stalled the whole pipeline behind zstd. Each costs up to two
/// `max_frame_bytes` buffers.
const FRAMES_IN_FLIGHT: usize = 4;

/// The compression thread and the frames handed to it, oldest first.
struct Compression {
    jobs: SyncSender<(Vec<u8>, Vec<u8>)>,
    done: Receiver<Done>,
    /// The stream of each frame handed over and not yet written, in order.
    inflight: VecDeque<usize>,
    /// Buffers passed back and forth, reused.
    frames: Vec<Vec<u8>>,
    compressed: Vec<Vec<u8>>,
}

impl Compression {
    fn start(mut c: zstd::bulk::Compressor<'static>) -> Result<Compression> {
        let (jobs, job_rx) = mpsc::sync_channel::<(Vec<u8>, Vec<u8>)>(FRAMES_IN_FLIGHT);
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("spillway-zstd".into())
            .spawn(move || {
                for (frame, mut out) in job_rx {
                    out.clear();
                    out.reserve(zstd_safe::compress_bound(frame.len()));
                    let r = c
                        .compress_to_buffer(&frame, &mut out)
                        .map(|_| out)
                        .map_err(|e| e.to_string());
                    if done_tx.send((frame, r)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Other(format!("cannot start the zstd thread: {e}")))?;
        Ok(Compression {
            jobs,
            done,
            inflight: VecDeque::with_capacity(FRAMES_IN_FLIGHT),
            frames: Vec::new(),
            compressed: Vec::new(),
        })
    }

    /// An empty text buffer, reused when one is free.
    fn buffer(&mut self) -> Vec<u8> {
        self.frames.pop().unwrap_or_default()
    }

    /// Keeps a written frame's text buffer for the next one.
    fn recycle(&mut self, mut frame: Vec<u8>) {
        if self.frames.len() <= FRAMES_IN_FLIGHT {
            frame.clear();
            self.frames.push(frame);
        }
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
    if !ts.is_ascii() {
        return None;
    }
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
    if len == 0 {
        // Created by a process that died before its first frame: nothing
        // lost, but an empty file is not a valid zstd stream for every tool.
        fs::remove_file(path).map_err(|e| Error::io("cannot remove empty segment", path, e))?;
        return Ok(None);
    }
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
    use std::io::Write;

    use super::*;
    use crate::sinks::segment::config::{DEFAULT_MAX_FRAME_DELAY, DEFAULT_ROTATE_AGE};
    use crate::sinks::segment::reader::SegmentReader;
    use crate::sinks::segment::test_support::event_batch;

    fn config() -> SegmentConfig {
        SegmentConfig {
            max_frame_bytes: 1 << 20,
            retain_bytes: 0,
            retain_age: Duration::ZERO,
            ..SegmentConfig::default()
        }
    }

    fn event_files(dir: &Path) -> Vec<PathBuf> {
        list_stream(dir, Stream::Events).expect("list")
    }

    /// The `id` of every record under `dir`, in reading order; panics on damage.
    fn ids(dir: &Path) -> Vec<u64> {
        let mut out = Vec::new();
        for item in SegmentReader::open(dir).expect("reader") {
            let frame = item.expect("read").into_frame().expect("no damage");
            for l in frame.lines {
                let v: serde_json::Value = serde_json::from_str(&l).expect("json");
                out.push(v["payload"]["id"].as_u64().expect("id"));
            }
        }
        out
    }

    // Catches batches that sit in memory past max_frame_delay (kill -9 would
    // lose more than promised), or that are written before it without need.
    #[test]
    fn a_frame_is_written_when_its_delay_has_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sink = SegmentSink::open(dir.path(), config()).expect("open");
        sink.write_batch(&event_batch(1, 0, 3)).expect("write");
        let t0 = Instant::now();
        sink.tick(t0).expect("tick");
        assert!(ids(dir.path()).is_empty(), "written before its delay");
        sink.tick(t0 + DEFAULT_MAX_FRAME_DELAY).expect("tick");
        assert_eq!(ids(dir.path()), [0, 1, 2]);
    }

    // Catches a frame left in the compression thread: when a batch fills its
    // frames exactly (here every line is a frame of its own) nothing is left
    // pending, and the last frame must still reach the file at the next tick.
    #[test]
    fn the_frame_in_compression_is_written_at_the_next_tick() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = SegmentConfig {
            max_frame_bytes: 1,
            ..config()
        };
        let mut sink = SegmentSink::open(dir.path(), cfg).expect("open");
        sink.write_batch(&event_batch(1, 0, 20)).expect("write");
        sink.tick(Instant::now()).expect("tick");
        assert_eq!(ids(dir.path()), (0..20).collect::<Vec<_>>());
    }

    // Catches frames written out of order or lost while several wait for
    // the compression thread, and lines cut, lost or repeated when a frame
    // leaves in the pending buffer itself and only the rest is copied: two
    // streams, frames far smaller than a batch and never a tick in between.
    #[test]
    fn frames_in_flight_reach_each_stream_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = SegmentConfig {
            max_frame_bytes: 300,
            ..config()
        };
        let mut sink = SegmentSink::open(dir.path(), cfg).expect("open");
        let mut first = 0;
        for b in 0..40 {
            let n = 1 + b % 7;
            let mut batch = event_batch(b, first, n);
            if b % 3 == 0 {
                batch.kind = crate::layer::record::RecordKind::Sample;
            }
            sink.write_batch(&batch).expect("write");
            first += n;
        }
        sink.flush().expect("flush");
        let mut all = Vec::new();
        for stream in [Stream::Events, Stream::Telemetry] {
            let mut got = Vec::new();
            for file in list_stream(dir.path(), stream).expect("list") {
                for item in SegmentReader::open(&file).expect("reader") {
                    let frame = item.expect("read").into_frame().expect("no damage");
                    for l in frame.lines {
                        let v: serde_json::Value = serde_json::from_str(&l).expect("json");
                        let kind = if stream == Stream::Events {
                            "event"
                        } else {
                            "sample"
                        };
                        assert_eq!(v["kind"], kind, "a frame in the wrong stream's file");
                        got.push(v["payload"]["id"].as_u64().expect("id"));
                    }
                }
            }
            assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
            all.extend(got);
        }
        all.sort_unstable();
        assert_eq!(all, (0..first).collect::<Vec<_>>(), "lost or repeated");
    }

    // Catches a frame cap that is ignored (frames would grow without bound
    // and a crash would lose all of them).
    #[test]
    fn a_full_frame_is_written_at_once_in_whole_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = SegmentConfig {
            max_frame_bytes: 1000,
            ..config()
        };
        let mut sink = SegmentSink::open(dir.path(), cfg).expect("open");
        sink.write_batch(&event_batch(1, 0, 50)).expect("write");
        let mut reader = FrameReader::open(&event_files(dir.path())[0], 0).expect("reader");
        let frames: Vec<_> = std::iter::from_fn(|| reader.next_frame())
            .map(|f| f.expect("frame"))
            .collect();
        assert!(frames.len() >= 5, "{} frames", frames.len());
        sink.flush().expect("flush");
        assert_eq!(ids(dir.path()), (0..50).collect::<Vec<_>>());
    }

    // Catches rotation by size not happening (one file grows forever) or
    // splitting records across files.
    #[test]
    fn files_rotate_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = SegmentConfig {
            rotate_bytes: 2000,
            ..config()
        };
        let mut sink = SegmentSink::open(dir.path(), cfg).expect("open");
        for b in 0..20 {
            sink.write_batch(&event_batch(b, b * 10, 10))
                .expect("write");
            sink.flush().expect("flush");
        }
        let files = event_files(dir.path());
        assert!(files.len() >= 3, "{files:?}");
        for f in &files[..files.len() - 1] {
            let len = fs::metadata(f).expect("stat").len();
            assert!(len >= 2000, "sealed before its size: {len}");
        }
        assert_eq!(ids(dir.path()), (0..200).collect::<Vec<_>>());
    }

    // Catches rotation by age not happening (the clock is injected through
    // `tick`, so no sleeping).
    #[test]
    fn files_rotate_by_age() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sink = SegmentSink::open(dir.path(), config()).expect("open");
        sink.write_batch(&event_batch(1, 0, 5)).expect("write");
        sink.flush().expect("flush");
        let now = Instant::now();
        sink.tick(now).expect("tick");
        sink.write_batch(&event_batch(2, 5, 5)).expect("write");
        sink.flush().expect("flush");
        assert_eq!(event_files(dir.path()).len(), 1, "rotated too early");
        sink.tick(now + DEFAULT_ROTATE_AGE).expect("tick");
        sink.write_batch(&event_batch(3, 10, 5)).expect("write");
        sink.flush().expect("flush");
        assert_eq!(event_files(dir.path()).len(), 2);
        assert_eq!(ids(dir.path()), (0..15).collect::<Vec<_>>());
    }

    // Catches retention that deletes the newest data instead of the oldest,
    // that never runs, or that deletes the file being written.
    #[test]
    fn retention_by_size_deletes_the_oldest_files_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = SegmentConfig {
            rotate_bytes: 1500,
            retain_bytes: 5000,
            ..config()
        };
        let mut sink = SegmentSink::open(dir.path(), cfg).expect("open");
        for b in 0..40 {
            sink.write_batch(&event_batch(b, b * 10, 10))
                .expect("write");
            sink.flush().expect("flush");
        }
        // Retention runs at each rotation, when no file is open: the sealed
        // files stay within the limit; the file being written comes on top.
        let current = sink.current_files();
        let sealed: u64 = event_files(dir.path())
            .iter()
            .filter(|f| !current.contains(f))
            .map(|f| fs::metadata(f).expect("stat").len())
            .sum();
        assert!(sealed <= 5000, "{sealed} bytes kept");
        let kept = ids(dir.path());
        let first = kept[0];
        assert!(first > 0, "nothing was deleted");
        assert_eq!(kept, (first..400).collect::<Vec<_>>(), "a suffix is kept");
        assert!(current.iter().all(|f| f.exists()));
    }

    // Catches age-based retention that never runs, or that deletes the file
    // being written even when its last write is old.
    #[test]
    fn retention_by_age_deletes_old_sealed_files_but_not_the_current_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = SegmentConfig {
            retain_age: Duration::from_secs(3600),
            ..config()
        };
        let mut sink = SegmentSink::open(dir.path(), cfg).expect("open");
        for b in 0..3 {
            sink.write_batch(&event_batch(b, b * 10, 10))
                .expect("write");
            sink.flush().expect("flush");
            sink.tick(Instant::now() + DEFAULT_ROTATE_AGE)
                .expect("rotate");
        }
        sink.write_batch(&event_batch(3, 30, 10)).expect("write");
        sink.flush().expect("flush");
        let files = event_files(dir.path());
        assert_eq!(files.len(), 4, "{files:?}");
        let old = SystemTime::now() - Duration::from_secs(7200);
        for f in [&files[0], &files[3]] {
            let file = OpenOptions::new().write(true).open(f).expect("open");
            file.set_modified(old).expect("set mtime");
        }
        sink.tick(Instant::now() + RETENTION_INTERVAL)
            .expect("tick");
        let left = event_files(dir.path());
        assert_eq!(left, files[1..].to_vec(), "only the old sealed file goes");
        assert_eq!(ids(dir.path()), (10..40).collect::<Vec<_>>());
    }

    /// Writes two batches as two frames and returns the file and its length.
    fn two_frames(dir: &Path) -> (PathBuf, u64) {
        let mut sink = SegmentSink::open(dir, config()).expect("open");
        sink.write_batch(&event_batch(1, 0, 5)).expect("write");
        sink.flush().expect("flush");
        sink.write_batch(&event_batch(2, 5, 5)).expect("write");
        sink.flush().expect("flush");
        drop(sink);
        let file = event_files(dir).pop().expect("file");
        let len = fs::metadata(&file).expect("stat").len();
        (file, len)
    }

    // Catches a torn tail left in place (readers would report it forever, and
    // new frames appended after it would be unreadable to plain zstd).
    #[test]
    fn open_cuts_an_incomplete_trailing_frame_and_starts_a_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, len) = two_frames(dir.path());
        let mut extra = Vec::new();
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        c.set_parameter(zstd_safe::CParameter::ChecksumFlag(true))
            .expect("checksum");
        let frame = c.compress(&[b'{'; 4000]).expect("compress");
        extra.extend_from_slice(&frame[..frame.len() / 2]);
        OpenOptions::new()
            .append(true)
            .open(&file)
            .and_then(|mut f| f.write_all(&extra))
            .expect("append torn frame");

        let mut sink = SegmentSink::open(dir.path(), config()).expect("reopen");
        let rec = sink.recovered().to_vec();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!((rec[0].path.clone(), rec[0].offset), (file.clone(), len));
        assert_eq!(fs::metadata(&file).expect("stat").len(), len);
        sink.write_batch(&event_batch(3, 10, 5)).expect("write");
        sink.flush().expect("flush");
        assert_eq!(
            event_files(dir.path()).len(),
            2,
            "new frames go to a new file"
        );
        assert_eq!(ids(dir.path()), (0..15).collect::<Vec<_>>());
    }

    // Catches a last frame with a bad checksum being kept (it is the torn
    // tail of a crash that wrote the length but not all the data).
    #[test]
    fn open_cuts_a_last_frame_that_fails_its_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, len) = two_frames(dir.path());
        let mut bytes = fs::read(&file).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&file, &bytes).expect("write");
        let first_end = FrameReader::open(&file, 0)
            .expect("reader")
            .next_frame()
            .expect("frame")
            .expect("valid")
            .end;
        assert!(first_end < len);

        let sink = SegmentSink::open(dir.path(), config()).expect("reopen");
        assert_eq!(sink.recovered().len(), 1);
        assert_eq!(sink.recovered()[0].offset, first_end);
        assert_eq!(fs::metadata(&file).expect("stat").len(), first_end);
        assert_eq!(ids(dir.path()), (0..5).collect::<Vec<_>>());
    }

    // Catches a file holding only a torn frame being kept as an empty or
    // unreadable segment.
    #[test]
    fn open_removes_a_file_that_holds_only_a_torn_frame() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, _) = two_frames(dir.path());
        let torn = dir.path().join("segments/events").join(segment_file_name(
            Stream::Events,
            now_ns() + 1_000_000_000,
            999,
        ));
        let bytes = fs::read(&file).expect("read");
        fs::write(&torn, &bytes[..bytes.len() / 3]).expect("write");
        let sink = SegmentSink::open(dir.path(), config()).expect("reopen");
        assert_eq!(sink.recovered().len(), 1);
        assert!(!torn.exists());
        assert!(file.exists());
    }

    // Catches an empty file (a crash between create and first write) being
    // left for tools that refuse empty zstd input.
    #[test]
    fn open_removes_an_empty_newest_file_without_reporting_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, _) = two_frames(dir.path());
        let empty = file.with_file_name(segment_file_name(
            Stream::Events,
            now_ns() + 1_000_000_000,
            998,
        ));
        fs::write(&empty, b"").expect("create empty");
        let sink = SegmentSink::open(dir.path(), config()).expect("reopen");
        assert!(sink.recovered().is_empty());
        assert!(!empty.exists() && file.exists());
    }

    // Catches a frame with a bad checksum in the middle being "repaired" by
    // cutting good frames after it (recovery must only cut the tail).
    #[test]
    fn open_leaves_damage_in_the_middle_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, len) = two_frames(dir.path());
        let mut bytes = fs::read(&file).expect("read");
        bytes[10] ^= 0xFF;
        fs::write(&file, &bytes).expect("write");
        let sink = SegmentSink::open(dir.path(), config()).expect("reopen");
        assert!(sink.recovered().is_empty(), "{:?}", sink.recovered());
        assert_eq!(fs::metadata(&file).expect("stat").len(), len);
    }

    // Measurement, not a check: the sink thread's own cost per event. Run with
    // `cargo test --release --lib measure_sink_write -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement; run with --release --ignored --nocapture"]
    fn measure_sink_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sink = SegmentSink::open(dir.path(), config()).expect("open");
        let batches: Vec<Batch> = (0..10_000).map(|b| event_batch(b, b * 100, 100)).collect();
        let t = Instant::now();
        for b in &batches {
            sink.write_batch(b).expect("write");
        }
        sink.flush().expect("flush");
        let secs = t.elapsed().as_secs_f64();
        println!(
            "SegmentSink::write_batch: {:.2} M events/s ({:.0} ns/event)",
            1e6 / secs / 1e6,
            secs * 1e9 / 1e6
        );
    }

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
