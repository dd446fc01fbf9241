//! Reading segments back: frame by frame, file by file, and following a live
//! directory.
//!
//! [`FrameReader`] walks the zstd frames of one file from a byte offset. Each
//! frame must carry a content checksum (the writer always sets it); it is
//! decompressed, the checksum verified, and its content split into
//! lines, every one of which must be a JSON object; a frame that fails any of
//! this is reported once as [`Damage`] (file, byte offset, reason) and the
//! reader resynchronises at the next zstd frame that decodes. A trailing
//! frame that is still incomplete is *not* damage: it may be being written,
//! so [`FrameReader::next_frame`] returns `None` and retries it on the next
//! call. This is how `spillway tail -f` and the SQLite indexer tail a live
//! file.
//!
//! [`SegmentReader`] reads a single file, a whole data directory, or one
//! stream's folder, across rotated files, optionally following new frames
//! and new files. With several streams it reads **stream by stream**
//! (logs, then events, then telemetry), each stream in file-name (creation)
//! order; in follow mode, each poll takes the first stream that has a new
//! frame, in that same order. Records are not merged by timestamp.
//!
//! ```
//! use spillway::sinks::segment::reader::{ReadItem, SegmentReader};
//! # let dir = tempfile::tempdir().unwrap();
//! for item in SegmentReader::open(dir.path())? {
//!     match item? {
//!         ReadItem::Frame(frame) => {
//!             for line in &frame.lines {
//!                 println!("{line}");
//!             }
//!         }
//!         ReadItem::Damage(damage) => eprintln!("skipped {damage}"),
//!     }
//! }
//! # Ok::<(), spillway::Error>(())
//! ```

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
use zstd::zstd_safe;

use crate::error::{Error, Result};
use crate::sinks::segment::{list_stream, Stream, SEGMENTS_DIR};

/// The zstd frame magic number, as it appears in a file (0xFD2FB528 little-endian).
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// A frame whose content decompresses to more than this is reported as
/// damage instead of being held in memory: 256 MiB.
pub const MAX_FRAME_CONTENT: usize = 256 << 20;
/// How often a following reader looks for new frames and files: 100 ms.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How much a reader asks the file for at a time.
const READ_CHUNK: usize = 1 << 20;

/// zstd's "source size is wrong" error: the buffer holds only part of a frame.
const SRC_SIZE_WRONG: usize =
    (zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_srcSize_wrong as usize).wrapping_neg();

/// One decoded frame of a segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The segment file.
    pub path: PathBuf,
    /// Byte offset of the frame's first (compressed) byte in the file.
    pub offset: u64,
    /// Byte offset just past the frame: where the next frame starts.
    pub end: u64,
    /// Its JSON lines, without the trailing newline; each is a JSON object.
    pub lines: Vec<String>,
}

/// A part of a segment file that could not be read: reported, then skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// Byte offset where the damaged part starts.
    pub offset: u64,
    /// What is wrong there.
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at byte {}: {}",
            self.path.display(),
            self.offset,
            self.reason
        )
    }
}

impl std::error::Error for Damage {}

/// Reads the zstd frames of one segment file, from a byte offset on.
pub struct FrameReader {
    path: PathBuf,
    file: File,
    /// Bytes of the file starting at offset `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    /// Offset of the next frame.
    pos: u64,
    /// A read error ends the file (after being reported once).
    failed: bool,
    decoder: Decoder<'static>,
    content: Vec<u8>,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("path", &self.path)
            .field("offset", &self.pos)
            .finish()
    }
}

enum Probe {
    /// A whole frame of this many bytes that decodes, with its lines.
    Frame(usize, Vec<String>),
    /// A skippable frame (zstd's user-data frames) of this many bytes.
    Skippable(usize),
    /// The start of a frame whose end is not in the file (yet).
    Incomplete,
    /// Not a readable frame, and why.
    Bad(String),
}

impl FrameReader {
    /// Opens `path` to read frames starting at `start_offset`, which must be
    /// the start of a frame (0, or a [`Frame::end`] from before).
    pub fn open(path: &Path, start_offset: u64) -> Result<FrameReader> {
        let mut file = File::open(path).map_err(|e| Error::io("cannot open segment", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot stat segment", path, e))?
            .len();
        if start_offset > len {
            return Err(Error::Other(format!(
                "cannot read segment {} from byte {start_offset}: the file has only {len} bytes",
                path.display()
            )));
        }
        file.seek(SeekFrom::Start(start_offset))
            .map_err(|e| Error::io("cannot seek in segment", path, e))?;
        let decoder = Decoder::new().map_err(|e| Error::io("cannot start zstd for", path, e))?;
        Ok(FrameReader {
            path: path.to_path_buf(),
            file,
            buf: Vec::new(),
            buf_start: start_offset,
            pos: start_offset,
            failed: false,
            decoder,
            content: Vec::new(),
        })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the next frame starts: the end of the last frame returned, or
    /// where reading resumed after damage.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// The file's current size (also for a file deleted since it was opened).
    pub fn file_len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io("cannot stat segment", &self.path, e))
    }

    /// The next frame, or the damage before it.
    ///
    /// `None` means the end of the data present now: either the end of the
    /// file, or a trailing frame that is incomplete (being written, or torn
    /// by a crash); the position stays at its start, so a later call picks
    /// it up once it is complete. A frame with a bad checksum, garbage, or a
    /// truncated frame followed by more data is returned once as `Damage`,
    /// and reading continues at the next zstd frame that decodes. A read
    /// error is returned once as `Damage`; the file then counts as ended.
    pub fn next_frame(&mut self) -> Option<std::result::Result<Frame, Damage>> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(r) => r,
            Err(e) => {
                self.failed = true;
                Some(Err(self.damage(self.pos, format!("cannot read: {e}"))))
            }
        }
    }

    fn step(&mut self) -> io::Result<Option<std::result::Result<Frame, Damage>>> {
        loop {
            let at = self.pos;
            match self.probe(at)? {
                Probe::Frame(n, lines) => {
                    self.pos = at + n as u64;
                    return Ok(Some(Ok(Frame {
                        path: self.path.clone(),
                        offset: at,
                        end: self.pos,
                        lines,
                    })));
                }
                Probe::Skippable(n) => self.pos = at + n as u64,
                Probe::Incomplete if self.available(at) == 0 => return Ok(None),
                Probe::Incomplete => {
                    // Incomplete at the end of the file: still being written,
                    // unless a whole frame follows it (then it was cut short).
                    return match self.find_frame(at + 1, false, false)? {
                        Some(next) => {
                            self.pos = next;
                            let cut = next - at;
                            Ok(Some(Err(self.damage(
                                at,
                                format!("truncated frame ({cut} bytes skipped)"),
                            ))))
                        }
                        None => Ok(None),
                    };
                }
                Probe::Bad(reason) => {
                    // The position moves past the damage whatever is found, so
                    // the scan may drop what it has passed.
                    let next = match self.find_frame(at + 1, true, true)? {
                        Some(next) => next,
                        None => self.data_end() - partial_magic_suffix(self.tail(at + 1)) as u64,
                    };
                    self.pos = next.max(at + 1);
                    let skipped = self.pos - at;
                    return Ok(Some(Err(
                        self.damage(at, format!("{reason} ({skipped} bytes skipped)"))
                    )));
                }
            }
        }
    }

    fn damage(&self, offset: u64, reason: String) -> Damage {
        Damage {
            path: self.path.clone(),
            offset,
            reason,
        }
    }

    /// End of the bytes read so far.
    fn data_end(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    /// Buffered bytes from `at` on.
    fn tail(&self, at: u64) -> &[u8] {
        let rel = at.saturating_sub(self.buf_start) as usize;
        self.buf.get(rel..).unwrap_or(&[])
    }

    fn available(&self, at: u64) -> usize {
        self.tail(at).len()
    }

    /// Reads more of the file into the buffer, first dropping what lies
    /// before the current position. Returns the number of bytes added (0 at
    /// the end of the file).
    fn fill(&mut self) -> io::Result<usize> {
        let consumed = (self.pos.saturating_sub(self.buf_start) as usize).min(self.buf.len());
        if consumed > 0 {
            self.buf.drain(..consumed);
            self.buf_start += consumed as u64;
        }
        let old = self.buf.len();
        self.buf.reserve(READ_CHUNK);
        // `read_to_end` on a `Take` reads into spare capacity without zeroing
        // it first, and retries on EINTR.
        match (&mut self.file)
            .take(READ_CHUNK as u64)
            .read_to_end(&mut self.buf)
        {
            Ok(n) => Ok(n),
            Err(e) => {
                self.buf.truncate(old);
                Err(e)
            }
        }
    }

    /// What lies at offset `at` (reading more of the file as needed).
    fn probe(&mut self, at: u64) -> io::Result<Probe> {
        loop {
            let rel = (at.saturating_sub(self.buf_start) as usize).min(self.buf.len());
            let data = &self.buf[rel..];
            if data.is_empty() {
                if self.fill()? == 0 {
                    return Ok(Probe::Incomplete);
                }
                continue;
            }
            match zstd_safe::find_frame_compressed_size(data) {
                Ok(n) if n <= data.len() => {
                    let frame = &data[..n];
                    if frame.len() >= 4 && frame[..4] != ZSTD_MAGIC {
                        return Ok(Probe::Skippable(n));
                    }
                    return Ok(
                        match decode_frame(&mut self.decoder, &mut self.content, frame) {
                            Ok(lines) => Probe::Frame(n, lines),
                            Err(reason) => Probe::Bad(reason),
                        },
                    );
                }
                Ok(_) => return Ok(Probe::Bad("inconsistent frame size".into())),
                Err(code) if code == SRC_SIZE_WRONG => {
                    if self.fill()? == 0 {
                        return Ok(Probe::Incomplete);
                    }
                }
                Err(code) => {
                    return Ok(Probe::Bad(format!(
                        "not a zstd frame ({})",
                        zstd_safe::get_error_name(code)
                    )))
                }
            }
        }
    }

    /// The offset of the first zstd frame at or after `from` that decodes,
    /// or (with `incomplete_ok`) that is still incomplete at the end of the
    /// file. With `discard`, bytes the scan has passed are dropped from the
    /// buffer as it goes, so a long damaged region is not held in memory
    /// (only for callers that will not read before the result again).
    fn find_frame(
        &mut self,
        from: u64,
        incomplete_ok: bool,
        discard: bool,
    ) -> io::Result<Option<u64>> {
        let mut search = from;
        loop {
            let found = find_magic(self.tail(search));
            match found {
                Some(i) => {
                    let at = search + i as u64;
                    match self.probe(at)? {
                        Probe::Frame(..) => return Ok(Some(at)),
                        Probe::Incomplete if incomplete_ok => return Ok(Some(at)),
                        _ => search = at + 1,
                    }
                }
                None => {
                    // A magic may straddle the end of what was read so far.
                    let keep = partial_magic_suffix(self.tail(search)) as u64;
                    let next = self.data_end() - keep;
                    if discard {
                        let passed =
                            (next.saturating_sub(self.buf_start) as usize).min(self.buf.len());
                        self.buf.drain(..passed);
                        self.buf_start += passed as u64;
                    }
                    if self.fill()? == 0 {
                        return Ok(None);
                    }
                    search = next.max(search);
                }
            }
        }
    }
}

/// Decompresses one frame (verifying its checksum) and splits it into
/// lines, each of which must be a JSON object.
fn decode_frame(
    decoder: &mut Decoder<'static>,
    out: &mut Vec<u8>,
    frame: &[u8],
) -> std::result::Result<Vec<String>, String> {
    // Frame header descriptor, bit 2: Content_Checksum_flag. Without the
    // checksum, damage inside the frame could decode to plausible garbage.
    if frame.get(4).is_none_or(|fhd| fhd & 0x04 == 0) {
        return Err("frame has no content checksum".into());
    }
    decoder
        .reinit()
        .map_err(|e| format!("zstd reset failed: {e}"))?;
    out.clear();
    let mut input = InBuffer::around(frame);
    loop {
        if out.len() > MAX_FRAME_CONTENT {
            return Err(format!(
                "frame decompresses to more than {MAX_FRAME_CONTENT} bytes"
            ));
        }
        if out.capacity() - out.len() < 64 << 10 {
            out.reserve(out.len().clamp(256 << 10, 16 << 20));
        }
        let before_in = input.pos();
        let before_out = out.len();
        let mut output = OutBuffer::around_pos(&mut *out, before_out);
        let hint = decoder
            .run(&mut input, &mut output)
            .map_err(|e| format!("corrupt frame ({e})"))?;
        let wrote = output.pos() - before_out;
        if hint == 0 {
            break;
        }
        if input.pos() == frame.len() && input.pos() == before_in && wrote == 0 {
            return Err("frame ends early".into());
        }
    }
    split_lines(out)
}

/// Splits decoded frame content into lines; every non-empty line must be
/// UTF-8 and a JSON object, or the whole frame is refused.
fn split_lines(content: &[u8]) -> std::result::Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for (i, raw) in content.split(|b| *b == b'\n').enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line = std::str::from_utf8(raw)
            .map_err(|_| format!("line {} of the frame is not UTF-8", i + 1))?;
        if !line.trim_start().starts_with('{') {
            return Err(format!("line {} of the frame is not a JSON object", i + 1));
        }
        serde_json::from_str::<serde::de::IgnoredAny>(line)
            .map_err(|e| format!("line {} of the frame is not valid JSON ({e})", i + 1))?;
        lines.push(line.to_owned());
    }
    Ok(lines)
}

fn find_magic(data: &[u8]) -> Option<usize> {
    data.windows(4).position(|w| w == ZSTD_MAGIC)
}

/// How many bytes at the end of `data` are the beginning of a magic number
/// (a frame that has only started to be written).
fn partial_magic_suffix(data: &[u8]) -> usize {
    (1..=3)
        .rev()
        .find(|&k| data.len() >= k && data[data.len() - k..] == ZSTD_MAGIC[..k])
        .unwrap_or(0)
}

/// What [`SegmentReader`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadItem {
    /// A frame and its lines.
    Frame(Frame),
    /// A part of a file that was skipped, and why.
    Damage(Damage),
}

impl ReadItem {
    /// The frame, if this is one.
    pub fn into_frame(self) -> Option<Frame> {
        match self {
            ReadItem::Frame(f) => Some(f),
            ReadItem::Damage(_) => None,
        }
    }
}

/// Reads the records of a segment file, a data directory or a stream
/// folder, across rotated files, optionally following new data.
///
/// Iterating yields every frame present (and, when following, every frame
/// written later), with [`ReadItem::Damage`] for each part that could not be
/// read. Files deleted by retention while being followed are skipped
/// quietly.
#[derive(Debug)]
pub struct SegmentReader {
    source: Source,
    follow: bool,
    poll_interval: Duration,
    modified_since: Option<SystemTime>,
}

#[derive(Debug)]
enum Source {
    File {
        reader: FrameReader,
        tail_reported: bool,
    },
    Dir {
        data_dir: PathBuf,
        cursors: Vec<Cursor>,
    },
}

/// Where reading stands in one stream.
#[derive(Debug)]
struct Cursor {
    stream: Stream,
    /// The file being read, or the last one finished.
    name: Option<OsString>,
    reader: Option<FrameReader>,
    tail_reported: bool,
}

impl SegmentReader {
    /// Reads `path`: a segment file; a data directory (the one containing
    /// `segments/`, all streams); the `segments` folder itself; or one
    /// stream's folder (`DIR/segments/logs`).
    pub fn open(path: impl AsRef<Path>) -> Result<SegmentReader> {
        let path = path.as_ref();
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io("cannot read segments at", path, e))?;
        let source = if meta.is_file() {
            Source::File {
                reader: FrameReader::open(path, 0)?,
                tail_reported: false,
            }
        } else {
            let name = path.file_name().and_then(|n| n.to_str());
            let parent = path.parent();
            let stream = Stream::ALL.into_iter().find(|s| Some(s.as_str()) == name);
            let (data_dir, streams) = match (stream, parent) {
                (Some(s), Some(p)) if p.file_name().is_some_and(|n| n == SEGMENTS_DIR) => {
                    (p.parent().unwrap_or(Path::new(".")).to_path_buf(), vec![s])
                }
                _ if name == Some(SEGMENTS_DIR) && !path.join(SEGMENTS_DIR).exists() => (
                    parent.unwrap_or(Path::new(".")).to_path_buf(),
                    Stream::ALL.to_vec(),
                ),
                _ => (path.to_path_buf(), Stream::ALL.to_vec()),
            };
            Source::Dir {
                data_dir,
                cursors: streams
                    .into_iter()
                    .map(|stream| Cursor {
                        stream,
                        name: None,
                        reader: None,
                        tail_reported: false,
                    })
                    .collect(),
            }
        };
        Ok(SegmentReader {
            source,
            follow: false,
            poll_interval: DEFAULT_POLL_INTERVAL,
            modified_since: None,
        })
    }

    /// Keeps waiting for new frames and new files instead of ending.
    pub fn follow(mut self, follow: bool) -> Self {
        self.follow = follow;
        self
    }

    /// How often to look for new data when following (default 100 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Only these streams (when reading a directory).
    pub fn streams(mut self, streams: &[Stream]) -> Self {
        if let Source::Dir { cursors, .. } = &mut self.source {
            cursors.retain(|c| streams.contains(&c.stream));
        }
        self
    }

    /// Skips sealed files last written before `t`: they hold no record newer
    /// than `t` (the file being written is always read).
    pub fn modified_since(mut self, t: SystemTime) -> Self {
        self.modified_since = Some(t);
        self
    }

    /// The next item available now, without waiting; `Ok(None)` when there
    /// is nothing more at the moment.
    pub fn poll(&mut self) -> Result<Option<ReadItem>> {
        let follow = self.follow;
        match &mut self.source {
            Source::File {
                reader,
                tail_reported,
            } => match reader.next_frame() {
                Some(r) => Ok(Some(item(r))),
                None => Ok(incomplete_tail(reader, follow, tail_reported)?),
            },
            Source::Dir { data_dir, cursors } => {
                for c in cursors.iter_mut() {
                    if let Some(item) = c.poll(data_dir, follow, self.modified_since)? {
                        return Ok(Some(item));
                    }
                }
                Ok(None)
            }
        }
    }
}

impl Iterator for SegmentReader {
    type Item = Result<ReadItem>;

    /// Without `follow`, ends after the data present; with it, waits
    /// (polling) for more and never ends.
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.poll() {
                Ok(Some(item)) => return Some(Ok(item)),
                Ok(None) if !self.follow => return None,
                Ok(None) => std::thread::sleep(self.poll_interval),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

fn item(r: std::result::Result<Frame, Damage>) -> ReadItem {
    match r {
        Ok(f) => ReadItem::Frame(f),
        Err(d) => ReadItem::Damage(d),
    }
}

/// At the end of the data of the newest file: when not following, an
/// incomplete trailing frame is reported once (it is torn, or being written
/// right now); when following, it is waited for.
fn incomplete_tail(
    reader: &FrameReader,
    follow: bool,
    reported: &mut bool,
) -> Result<Option<ReadItem>> {
    if follow || *reported {
        return Ok(None);
    }
    let left = reader.file_len()?.saturating_sub(reader.offset());
    if left == 0 {
        return Ok(None);
    }
    *reported = true;
    Ok(Some(ReadItem::Damage(Damage {
        path: reader.path().to_path_buf(),
        offset: reader.offset(),
        reason: format!(
            "incomplete frame at the end ({left} bytes): torn by a crash, or still being written"
        ),
    })))
}

impl Cursor {
    fn poll(
        &mut self,
        data_dir: &Path,
        follow: bool,
        modified_since: Option<SystemTime>,
    ) -> Result<Option<ReadItem>> {
        loop {
            if self.reader.is_none() && !self.open_next(data_dir, modified_since)? {
                return Ok(None);
            }
            let Some(reader) = self.reader.as_mut() else {
                return Ok(None);
            };
            if let Some(r) = reader.next_frame() {
                return Ok(Some(item(r)));
            }
            if !has_newer(data_dir, self.stream, self.name.as_ref())? {
                return incomplete_tail(reader, follow, &mut self.tail_reported);
            }
            // A newer file exists, so this one is sealed: the writer finished
            // it before creating the next. Look once more, to not race the
            // last frame written just before the rotation.
            if let Some(r) = reader.next_frame() {
                return Ok(Some(item(r)));
            }
            let left = reader.file_len()?.saturating_sub(reader.offset());
            let at = reader.offset();
            let path = reader.path().to_path_buf();
            self.reader = None;
            self.tail_reported = false;
            if left > 0 {
                return Ok(Some(ReadItem::Damage(Damage {
                    path,
                    offset: at,
                    reason: format!(
                        "truncated frame at the end of a sealed segment ({left} bytes skipped)"
                    ),
                })));
            }
        }
    }

    /// Opens the first file after the current one; false when there is none.
    fn open_next(&mut self, data_dir: &Path, modified_since: Option<SystemTime>) -> Result<bool> {
        let files = list_stream(data_dir, self.stream)?;
        let newest = files.last().cloned();
        for path in files {
            let Some(name) = path.file_name().map(|n| n.to_os_string()) else {
                continue;
            };
            if self.name.as_ref().is_some_and(|done| name <= *done) {
                continue;
            }
            self.name = Some(name);
            if let (Some(t), false) = (modified_since, Some(&path) == newest.as_ref()) {
                let old = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|m| m < t);
                if old {
                    continue;
                }
            }
            match FrameReader::open(&path, 0) {
                Ok(r) => {
                    self.reader = Some(r);
                    return Ok(true);
                }
                // Deleted by retention since the listing: go on to the next.
                Err(Error::Io { cause, .. }) if cause.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

/// Whether `stream` has a file newer than `name` (so `name` is sealed).
fn has_newer(data_dir: &Path, stream: Stream, name: Option<&OsString>) -> Result<bool> {
    let files = list_stream(data_dir, stream)?;
    Ok(match (name, files.last().and_then(|p| p.file_name())) {
        (Some(current), Some(last)) => last > current.as_os_str(),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn frame(lines: &[&str]) -> Vec<u8> {
        let mut text = String::new();
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        let mut c = zstd::bulk::Compressor::new(1).expect("compressor");
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .expect("checksum");
        c.compress(text.as_bytes()).expect("compress")
    }

    fn write(dir: &Path, parts: &[&[u8]]) -> PathBuf {
        let path = dir.join("logs-x-000001.zst");
        let mut f = File::create(&path).expect("create");
        for p in parts {
            f.write_all(p).expect("write");
        }
        path
    }

    fn all(r: &mut FrameReader) -> Vec<std::result::Result<Frame, Damage>> {
        std::iter::from_fn(|| r.next_frame()).collect()
    }

    // Catches the scan past damage holding the whole damaged region in
    // memory (a multi-GB file with a long run of garbage would be read whole).
    #[test]
    fn a_long_damaged_region_is_skipped_without_buffering_it_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = frame(&[r#"{"n":1}"#]);
        let b = frame(&[r#"{"n":2}"#]);
        let garbage = vec![0x5a_u8; 8 * READ_CHUNK];
        let path = write(dir.path(), &[&a, &garbage, &b]);
        let mut r = FrameReader::open(&path, 0).expect("open");
        let got = all(&mut r);
        assert_eq!(got.len(), 3, "frame, damage, frame");
        assert!(got[1].is_err());
        assert_eq!(got[2].as_ref().expect("last frame").lines, [r#"{"n":2}"#]);
        assert!(
            r.buf.capacity() <= 3 * READ_CHUNK,
            "buffer grew to {} bytes for an {} byte damaged region",
            r.buf.capacity(),
            garbage.len()
        );
    }

    // Catches a reader that loses frames or misreports their offsets (the
    // indexer's checkpoint depends on `end`).
    #[test]
    fn reads_frames_with_offsets_and_resumes_from_an_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = frame(&[r#"{"n":1}"#, r#"{"n":2}"#]);
        let b = frame(&[r#"{"n":3}"#]);
        let path = write(dir.path(), &[&a, &b]);
        let mut r = FrameReader::open(&path, 0).expect("open");
        let got = all(&mut r);
        assert_eq!(got.len(), 2);
        let f0 = got[0].as_ref().expect("frame 0");
        let f1 = got[1].as_ref().expect("frame 1");
        assert_eq!((f0.offset, f0.end), (0, a.len() as u64));
        assert_eq!(f0.lines, [r#"{"n":1}"#, r#"{"n":2}"#]);
        assert_eq!(
            (f1.offset, f1.end),
            (a.len() as u64, (a.len() + b.len()) as u64)
        );
        let mut r = FrameReader::open(&path, f0.end).expect("open at end of frame 0");
        let again = all(&mut r);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].as_ref().expect("frame").lines, [r#"{"n":3}"#]);
    }

    // Catches a growing file's last frame reported as damage (follow mode
    // and the indexer would skip records that were merely not written yet).
    #[test]
    fn an_incomplete_trailing_frame_waits_and_is_read_once_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = frame(&[r#"{"n":1}"#]);
        let b = frame(&[r#"{"n":2}"#, r#"{"n":3}"#]);
        let half = b.len() / 2;
        let path = write(dir.path(), &[&a, &b[..half]]);
        let mut r = FrameReader::open(&path, 0).expect("open");
        assert!(matches!(r.next_frame(), Some(Ok(_))));
        assert!(r.next_frame().is_none(), "incomplete frame is not damage");
        assert_eq!(r.offset(), a.len() as u64, "position stays at its start");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("reopen");
        f.write_all(&b[half..]).expect("append rest");
        let got = r.next_frame().expect("now complete").expect("valid");
        assert_eq!(got.lines.len(), 2);
        assert!(r.next_frame().is_none());
    }

    // Catches damage that hides the frames after it, or that goes unreported.
    #[test]
    fn a_bad_checksum_is_reported_once_and_reading_resumes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = frame(&[r#"{"n":1}"#]);
        let mut b = frame(&[r#"{"n":2}"#]);
        let c = frame(&[r#"{"n":3}"#]);
        let last = b.len() - 1;
        b[last] ^= 0x55; // the checksum's last byte
        let path = write(dir.path(), &[&a, &b, &c]);
        let got = all(&mut FrameReader::open(&path, 0).expect("open"));
        assert_eq!(got.len(), 3, "{got:?}");
        let d = got[1].as_ref().expect_err("damage");
        assert_eq!(d.offset, a.len() as u64);
        assert!(d
            .to_string()
            .starts_with(&format!("{} at byte {}: ", path.display(), a.len())));
        assert_eq!(got[2].as_ref().expect("frame c").lines, [r#"{"n":3}"#]);
    }

    // Catches a truncated frame in the middle being mistaken for a growing tail
    // (the reader would stop there forever).
    #[test]
    fn a_truncated_frame_followed_by_more_is_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = frame(&[r#"{"n":1}"#; 50]);
        let b = frame(&[r#"{"n":2}"#]);
        let path = write(dir.path(), &[&a[..a.len() - 7], &b]);
        let got = all(&mut FrameReader::open(&path, 0).expect("open"));
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_ref().expect_err("damage").offset, 0);
        assert_eq!(got[1].as_ref().expect("b").lines, [r#"{"n":2}"#]);
    }

    // Catches garbage lines reaching the caller from a frame that decodes
    // (e.g. someone compressed a text file into the segment folder), and
    // one bad region being reported more than once.
    #[test]
    fn a_frame_of_non_json_lines_is_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = frame(&["not json"]);
        let b = frame(&[r#"{"n":2}"#]);
        let c = frame(&[r#"{"n":3}"#]);
        let path = write(dir.path(), &[&a, &b, b"\0\0\0garbage", &c]);
        let got = all(&mut FrameReader::open(&path, 0).expect("open"));
        assert_eq!(got.len(), 4, "{got:?}");
        let d = got[0].as_ref().expect_err("bad lines");
        assert!(d.reason.contains("JSON object"), "{d}");
        assert_eq!(got[1].as_ref().expect("b").lines, [r#"{"n":2}"#]);
        let d = got[2].as_ref().expect_err("garbage");
        assert_eq!(d.offset, (a.len() + b.len()) as u64);
        assert!(d.reason.contains("(10 bytes skipped)"), "{d}");
        assert_eq!(got[3].as_ref().expect("c").lines, [r#"{"n":3}"#]);
    }

    // Catches frames without a checksum being trusted: damage inside them
    // could decode to plausible but wrong records.
    #[test]
    fn a_frame_without_a_checksum_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = zstd::bulk::compress(b"{\"n\":1}\n", 1).expect("compress");
        let b = frame(&[r#"{"n":2}"#]);
        let path = write(dir.path(), &[&plain, &b]);
        let got = all(&mut FrameReader::open(&path, 0).expect("open"));
        assert_eq!(got.len(), 2, "{got:?}");
        let d = got[0].as_ref().expect_err("no checksum");
        assert!(d.reason.contains("no content checksum"), "{d}");
        assert_eq!(got[1].as_ref().expect("b").lines, [r#"{"n":2}"#]);
    }

    // Catches garbage at the very end being waited for as if it were a frame.
    #[test]
    fn trailing_garbage_is_damage_but_a_partial_magic_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = frame(&[r#"{"n":1}"#]);
        let path = write(dir.path(), &[&a, b"xyz", &ZSTD_MAGIC[..2]]);
        let mut r = FrameReader::open(&path, 0).expect("open");
        assert!(matches!(r.next_frame(), Some(Ok(_))));
        let d = r.next_frame().expect("garbage").expect_err("damage");
        assert_eq!(d.offset, a.len() as u64);
        assert!(r.next_frame().is_none());
        assert_eq!(r.offset(), a.len() as u64 + 3, "kept the partial magic");
    }
}
