//! The indexer: follows the segment files and inserts their lines into
//! `index.db`, exactly once.
//!
//! Each segment has a checkpoint in `segments.checkpoint`: the byte offset
//! just past the last frame whose lines are in `records`. The rows of a frame
//! and the checkpoint that covers it are written in the same transaction, so
//! after a crash (of the indexer, the service or the machine) the index holds
//! every frame up to the checkpoint and none after it, and indexing resumes
//! from there: no line is missing, none is indexed twice.
//!
//! A pass reads the streams (logs, events, telemetry) side by side, always
//! taking the next frame from the stream that is furthest behind in time, so
//! rows arrive in (nearly) timestamp order even when catching up a backlog
//! and index inserts stay appends. Reading (decompressing, splitting lines
//! into columns) runs on a second thread while this one inserts, with at
//! most a few frames in flight between them, and a transaction commits
//! every [`IndexConfig::rows_per_transaction`] rows: memory does not grow
//! with the backlog, which waits on disk.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use rusqlite::{
    params, CachedStatement, Connection, OptionalExtension, Transaction, TransactionBehavior,
};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::sinks::index::config::IndexConfig;
use crate::sinks::index::line::{Line, OwnedLine};
use crate::sinks::index::query::{self, IndexStats, Query, QueryRecord};
use crate::sinks::index::schema::{self, sql_err, INDEX_FILE};
use crate::sinks::segment::list_segments;
use crate::sinks::segment::reader::FrameReader;

/// At most this many problem reports (damaged frames, bad lines) are kept
/// in an [`IndexProgress`]; the counters keep counting.
const MAX_PROBLEMS: usize = 16;

/// What a pass of the indexer did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IndexProgress {
    /// Rows inserted.
    pub records: u64,
    /// Frames indexed.
    pub frames: u64,
    /// Compressed bytes of the frames indexed.
    pub bytes: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Segments whose file was gone (retention) and whose rows were deleted.
    pub segments_removed: u64,
    /// Damaged frames skipped (each reported once, in `problems`).
    pub damaged_frames: u64,
    /// Lines that are not records (not JSON, or missing `kind`/`prefix`/`ts`).
    pub bad_lines: u64,
    /// The first few damaged frames and bad lines, with file and offset.
    pub problems: Vec<String>,
}

impl IndexProgress {
    fn problem(&mut self, text: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(text);
        }
    }
}

/// How far the index is behind the segment files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Lag {
    /// Compressed bytes of segment files beyond their checkpoints.
    pub bytes: u64,
    /// Segment files with bytes beyond their checkpoint.
    pub segments: u64,
}

/// The writable index of one data directory (`DIR/index.db`).
///
/// ```
/// use spillway::sinks::index::{Index, Query};
/// let dir = tempfile::tempdir().unwrap();
/// let mut index = Index::open(dir.path())?;   // creates and migrates index.db
/// let progress = index.catch_up()?;           // indexes what the segments hold
/// assert_eq!(progress.records, 0);
/// assert!(index.query(&Query::default())?.is_empty());
/// # Ok::<(), spillway::Error>(())
/// ```
pub struct Index {
    conn: Connection,
    data_dir: PathBuf,
    db_path: PathBuf,
    config: IndexConfig,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("db_path", &self.db_path)
            .finish()
    }
}

impl Index {
    /// Opens `DIR/index.db` with the default [`IndexConfig`], creating it
    /// and migrating its schema as needed.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<Index> {
        Index::open_with(data_dir, &IndexConfig::default())
    }

    /// Opens `DIR/index.db` with `config`.
    pub fn open_with(data_dir: impl AsRef<Path>, config: &IndexConfig) -> Result<Index> {
        let data_dir = data_dir.as_ref();
        Index::open_file(data_dir, &data_dir.join(INDEX_FILE), config)
    }

    /// Opens the index database at `db_path` for the segments of `data_dir`.
    pub(crate) fn open_file(
        data_dir: &Path,
        db_path: &Path,
        config: &IndexConfig,
    ) -> Result<Index> {
        config.validate()?;
        let conn = schema::open_rw(db_path, config)?;
        Ok(Index {
            conn,
            data_dir: data_dir.to_path_buf(),
            db_path: db_path.to_path_buf(),
            config: config.clone(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db_path
    }

    /// The connection, for benchmarks and tests in this crate.
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// One synchronous pass: indexes everything the segment files hold now,
    /// and deletes the rows of segment files that are gone.
    pub fn catch_up(&mut self) -> Result<IndexProgress> {
        self.pass(None, &mut |_| {})
    }

    /// Like [`Index::catch_up`], calling `on_commit` with the running totals
    /// after each committed transaction (for progress bars).
    pub fn catch_up_with(
        &mut self,
        on_commit: &mut dyn FnMut(&IndexProgress),
    ) -> Result<IndexProgress> {
        self.pass(None, on_commit)
    }

    /// How far the index is behind the segment files now.
    pub fn lag(&self) -> Result<Lag> {
        lag(&self.conn, &self.data_dir)
    }

    /// Records matching `q`; see [`Query`].
    pub fn query(&self, q: &Query) -> Result<Vec<QueryRecord>> {
        query::run_query(&self.conn, &self.db_path, q)
    }

    /// Counters per prefix, disk use, lag and time span.
    pub fn stats(&self) -> Result<IndexStats> {
        query::stats(&self.conn, &self.db_path, &self.data_dir)
    }

    /// A pass that stops between transactions once `stop` is set.
    pub(crate) fn pass(
        &mut self,
        stop: Option<&AtomicBool>,
        on_commit: &mut dyn FnMut(&IndexProgress),
    ) -> Result<IndexProgress> {
        let mut progress = IndexProgress::default();
        let files = list_segments(&self.data_dir)?;
        let known = load_segments(&self.conn, &self.db_path)?;

        // Retention: a file that is gone takes its rows with it.
        let listed: HashSet<String> = files.iter().map(|p| self.rel(p)).collect();
        for (rel, seg) in &known {
            if !listed.contains(rel) {
                self.in_tx(|tx, path| delete_segment(tx, path, seg.id, true))?;
                progress.segments_removed += 1;
            }
        }

        // The files with bytes beyond their checkpoint, in listing order.
        let mut segs = Vec::new();
        for path in files {
            let size = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("cannot stat segment", &path, e)),
            };
            let rel = self.rel(&path);
            let mut seg = known.get(&rel).copied();
            if let Some(s) = seg.filter(|s| size < s.checkpoint) {
                // The file shrank below what was indexed (rewritten, or cut
                // after a power loss): its rows may describe bytes that no
                // longer exist, so index it again from the start.
                self.in_tx(|tx, path| delete_segment(tx, path, s.id, false))?;
                seg = Some(KnownSegment { checkpoint: 0, ..s });
            }
            let checkpoint = seg.map_or(0, |s| s.checkpoint);
            if size > checkpoint {
                segs.push(Pending {
                    rel,
                    path,
                    seg_id: seg.map(|s| s.id),
                    checkpoint,
                    size,
                    delta: SegDelta::default(),
                });
            }
        }
        if segs.is_empty() {
            return Ok(progress);
        }

        // Reading (decompression, line parsing) runs on its own thread while
        // this one inserts; the bounded channel keeps memory flat.
        let work: Vec<(PathBuf, u64)> = segs
            .iter()
            .map(|s| (s.path.clone(), s.checkpoint))
            .collect();
        let (frames_tx, frames_rx) = mpsc::sync_channel(CHANNEL_FRAMES);
        let limit = self.config.rows_per_transaction;
        let conn = &mut self.conn;
        let db_path = self.db_path.as_path();
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("spillway-index-read".into())
                .spawn_scoped(scope, move || read_segments(work, frames_tx))
                .map_err(|e| Error::Other(format!("cannot start the index reader thread: {e}")))?;
            consume(
                conn,
                db_path,
                &mut segs,
                frames_rx,
                limit,
                stop,
                &mut progress,
                on_commit,
            )
        })?;
        Ok(progress)
    }

    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.data_dir)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }

    fn in_tx<T>(&mut self, f: impl FnOnce(&Transaction<'_>, &Path) -> Result<T>) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err("cannot begin a transaction on", &self.db_path))?;
        let out = f(&tx, &self.db_path)?;
        tx.commit()
            .map_err(sql_err("cannot commit to", &self.db_path))?;
        Ok(out)
    }
}

/// Lag of the index behind the segment files, from the checkpoints in `conn`.
pub(crate) fn lag(conn: &Connection, data_dir: &Path) -> Result<Lag> {
    let path = conn.path().map(PathBuf::from).unwrap_or_default();
    let known = load_segments(conn, &path)?;
    let mut lag = Lag::default();
    for file in list_segments(data_dir)? {
        let Ok(meta) = fs::metadata(&file) else {
            continue;
        };
        let rel = file
            .strip_prefix(data_dir)
            .unwrap_or(&file)
            .to_string_lossy();
        let checkpoint = known.get(&*rel).map_or(0, |s| s.checkpoint);
        if meta.len() > checkpoint {
            lag.bytes += meta.len() - checkpoint;
            lag.segments += 1;
        }
    }
    Ok(lag)
}

/// Rebuilds `DIR/index.db` from the segment files: builds a new database
/// next to it, then renames it over the old one. `on_progress(done, total)`
/// is called with compressed bytes after each transaction.
///
/// Refuses while another process has the index open for writing (a running
/// service); stop it first.
pub fn reindex(
    data_dir: impl AsRef<Path>,
    config: &IndexConfig,
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<IndexProgress> {
    let data_dir = data_dir.as_ref();
    let target = data_dir.join(INDEX_FILE);
    let total: u64 = list_segments(data_dir)?
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let tmp = data_dir.join(format!("{INDEX_FILE}.reindex-{}", std::process::id()));
    remove_db_files(&tmp)?;
    let progress = {
        let mut index = Index::open_file(data_dir, &tmp, config)?;
        on_progress(0, total);
        let result = index.catch_up_with(&mut |p| on_progress(p.bytes, total));
        match result {
            Ok(p) => p,
            Err(e) => {
                drop(index);
                let _ = remove_db_files(&tmp);
                return Err(e);
            }
        }
    };
    if let Err(e) = release_old_index(&target, config) {
        let _ = remove_db_files(&tmp);
        return Err(e);
    }
    // Stale -wal/-shm of the old file must not be applied to the new one.
    for suffix in ["-wal", "-shm"] {
        remove_if_exists(&with_suffix(&target, suffix))?;
    }
    fs::rename(&tmp, &target)
        .map_err(|e| Error::io("cannot move the rebuilt index to", &target, e))?;
    Ok(progress)
}

/// Checks that no other process uses the old index, by taking it out of WAL
/// mode (SQLite allows that only to the sole connection). A file that is not
/// a database at all is fine to replace.
fn release_old_index(target: &Path, config: &IndexConfig) -> Result<()> {
    if !target.exists() {
        return Ok(());
    }
    let conn = Connection::open(target).map_err(sql_err("cannot open", target))?;
    conn.busy_timeout(config.busy_timeout.min(std::time::Duration::from_secs(1)))
        .map_err(sql_err("cannot configure", target))?;
    let mode: rusqlite::Result<String> =
        conn.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0));
    match mode {
        Ok(m) if m.eq_ignore_ascii_case("delete") => Ok(()),
        Ok(_) => Err(in_use(target)),
        Err(e) => {
            let err = sql_err("cannot check", target)(e);
            if schema::is_corrupt(&err) {
                Ok(())
            } else if matches!(&err, Error::Sqlite { cause, .. }
                if matches!(cause.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)))
            {
                Err(in_use(target))
            } else {
                Err(err)
            }
        }
    }
}

fn in_use(target: &Path) -> Error {
    Error::Other(format!(
        "{} is in use by another process (a running service?); stop it before reindexing",
        target.display()
    ))
}

pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot remove", path, e)),
    }
}

fn remove_db_files(db: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        remove_if_exists(&with_suffix(db, suffix))?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
struct KnownSegment {
    id: i64,
    checkpoint: u64,
}

fn load_segments(conn: &Connection, path: &Path) -> Result<HashMap<String, KnownSegment>> {
    let mut stmt = conn
        .prepare_cached("SELECT path, id, checkpoint FROM segments")
        .map_err(sql_err("cannot read segments from", path))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                KnownSegment {
                    id: r.get(1)?,
                    checkpoint: r.get::<_, i64>(2)?.max(0) as u64,
                },
            ))
        })
        .map_err(sql_err("cannot read segments from", path))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(sql_err("cannot read segments from", path))
}

/// Deletes the rows of segment `id`; with `forget`, its segment row too,
/// else resets its checkpoint to 0.
fn delete_segment(tx: &Transaction<'_>, path: &Path, id: i64, forget: bool) -> Result<()> {
    let err = sql_err("cannot delete the rows of a removed segment from", path);
    let range: Option<(Option<i64>, Option<i64>)> = tx
        .query_row(
            "SELECT min_record_id, max_record_id FROM segments WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql_err("cannot read segments from", path))?;
    if let Some((Some(lo), Some(hi))) = range {
        // The id range keeps the delete off a full scan without an index on
        // segment_id (rows of other streams interleave, hence the filter).
        tx.execute(
            "DELETE FROM records WHERE id BETWEEN ?1 AND ?2 AND segment_id = ?3",
            params![lo, hi, id],
        )
        .map_err(err)?;
    }
    tx.execute("DELETE FROM batches WHERE segment_id = ?1", [id])
        .map_err(sql_err("cannot delete batches from", path))?;
    let sql = if forget {
        "DELETE FROM segments WHERE id = ?1"
    } else {
        "UPDATE segments SET checkpoint = 0, raw_bytes = 0, records = 0, damaged = 0, \
         first_ts_ns = NULL, last_ts_ns = NULL, min_record_id = NULL, max_record_id = NULL \
         WHERE id = ?1"
    };
    tx.execute(sql, [id])
        .map_err(sql_err("cannot update segments in", path))?;
    Ok(())
}

fn ensure_segment(conn: &Connection, path: &Path, p: &Pending) -> Result<i64> {
    let stream = stream_of(&p.path);
    conn.query_row(
        "INSERT INTO segments (path, stream) VALUES (?1, ?2) \
         ON CONFLICT (path) DO UPDATE SET stream = excluded.stream RETURNING id",
        params![p.rel, stream],
        |r| r.get(0),
    )
    .map_err(sql_err("cannot add a segment to", path))
}

/// `logs`, `events` or `telemetry`: the folder a segment file is in.
fn stream_of(path: &Path) -> String {
    path.parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Frames in flight between the reading thread and the inserting one.
const CHANNEL_FRAMES: usize = 16;

/// A segment file with bytes beyond its checkpoint, and the changes to its
/// `segments` row not yet written.
struct Pending {
    rel: String,
    path: PathBuf,
    seg_id: Option<i64>,
    checkpoint: u64,
    size: u64,
    delta: SegDelta,
}

/// What the reading thread sends, in reading order. `seg` indexes the list
/// of pending segments.
enum Msg {
    /// A frame and its parsed lines.
    Frame {
        seg: usize,
        offset: u64,
        end: u64,
        raw_bytes: u64,
        lines: Vec<std::result::Result<OwnedLine, String>>,
    },
    /// A damaged part, reported by the reader, which resumes at `resume_at`.
    Damage {
        seg: usize,
        resume_at: u64,
        text: String,
    },
    /// No complete frame beyond here (yet).
    Done { seg: usize },
    /// The file could not be read at all.
    Failed(Error),
}

/// The reading thread: frames of every pending segment, always from the
/// stream furthest behind in time, so rows arrive in timestamp order.
fn read_segments(work: Vec<(PathBuf, u64)>, out: mpsc::SyncSender<Msg>) {
    struct StreamQueue {
        name: String,
        queue: VecDeque<(usize, PathBuf, u64)>,
        cur: Option<(usize, FrameReader)>,
        last_ts: i64,
    }
    let mut streams: Vec<StreamQueue> = Vec::new();
    for (seg, (path, checkpoint)) in work.into_iter().enumerate() {
        let name = stream_of(&path);
        let item = (seg, path, checkpoint);
        match streams.iter_mut().find(|s| s.name == name) {
            Some(s) => s.queue.push_back(item),
            None => streams.push(StreamQueue {
                name,
                queue: VecDeque::from([item]),
                cur: None,
                last_ts: i64::MIN,
            }),
        }
    }
    loop {
        let Some(st) = streams
            .iter_mut()
            .filter(|s| s.cur.is_some() || !s.queue.is_empty())
            .min_by_key(|s| s.last_ts)
        else {
            return;
        };
        let (seg, reader) = match &mut st.cur {
            Some((seg, reader)) => (*seg, reader),
            None => {
                let Some((seg, path, checkpoint)) = st.queue.pop_front() else {
                    continue;
                };
                match FrameReader::open(&path, checkpoint) {
                    Ok(r) => {
                        let (seg, reader) = st.cur.insert((seg, r));
                        (*seg, reader)
                    }
                    // Deleted under us: the next pass removes its rows.
                    Err(Error::Io { cause, .. })
                        if cause.kind() == std::io::ErrorKind::NotFound =>
                    {
                        if out.send(Msg::Done { seg }).is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        let _ = out.send(Msg::Failed(e));
                        return;
                    }
                }
            }
        };
        let msg = match reader.next_frame() {
            None => {
                st.cur = None;
                Msg::Done { seg }
            }
            Some(Err(damage)) => Msg::Damage {
                seg,
                resume_at: reader.offset(),
                text: damage.to_string(),
            },
            Some(Ok(frame)) => {
                let raw_bytes = frame.lines.iter().map(|l| l.len() as u64 + 1).sum();
                let lines: Vec<_> = frame.lines.into_iter().map(OwnedLine::parse).collect();
                if let Some(ts) = lines.iter().flatten().map(|l| l.line().ts_ns).max() {
                    st.last_ts = st.last_ts.max(ts);
                }
                Msg::Frame {
                    seg,
                    offset: frame.offset,
                    end: frame.end,
                    raw_bytes,
                    lines,
                }
            }
        };
        if out.send(msg).is_err() {
            return; // the inserting side stopped
        }
    }
}

/// The inserting side of a pass: applies messages in transactions of about
/// `limit` rows, each committing the rows with the checkpoints covering them.
#[allow(clippy::too_many_arguments)]
fn consume(
    conn: &mut Connection,
    db: &Path,
    segs: &mut [Pending],
    rx: mpsc::Receiver<Msg>,
    limit: usize,
    stop: Option<&AtomicBool>,
    progress: &mut IndexProgress,
    on_commit: &mut dyn FnMut(&IndexProgress),
) -> Result<()> {
    let mut next = rx.recv().ok();
    while let Some(first) = next.take() {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Ok(());
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err("cannot begin a transaction on", db))?;
        let mut ended = false;
        {
            let mut w = TxWriter::new(&tx, db)?;
            let mut rows = 0;
            let mut msg = Some(first);
            while let Some(m) = msg.take() {
                rows += w.apply(m, segs, progress)?;
                if rows >= limit {
                    break;
                }
                msg = rx.recv().ok();
                ended = msg.is_none();
            }
            w.finish(segs)?;
        }
        tx.commit().map_err(sql_err("cannot commit to", db))?;
        progress.transactions += 1;
        on_commit(progress);
        if !ended {
            next = rx.recv().ok();
        }
    }
    Ok(())
}

/// Changes to one `segments` row not yet written.
#[derive(Default)]
struct SegDelta {
    dirty: bool,
    records: u64,
    raw_bytes: u64,
    damaged: u64,
    first_ts: Option<i64>,
    last_ts: Option<i64>,
    min_id: Option<i64>,
    max_id: Option<i64>,
}

impl SegDelta {
    fn record(&mut self, ts: i64, id: i64) {
        self.records += 1;
        self.first_ts = Some(self.first_ts.map_or(ts, |t| t.min(ts)));
        self.last_ts = Some(self.last_ts.map_or(ts, |t| t.max(ts)));
        self.min_id = Some(self.min_id.map_or(id, |i| i.min(id)));
        self.max_id = Some(self.max_id.map_or(id, |i| i.max(id)));
    }
}

const INSERT_RECORD: &str =
    "INSERT INTO records (ts_ns, kind, level, prefix, name, message, module, \
     file, line, fields, spans, payload, batch_id, segment_id, frame_offset) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)";
const UPSERT_BATCH: &str =
    "INSERT INTO batches (segment_id, batch, prefix, kind, first_ts_ns, last_ts_ns) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?5) \
     ON CONFLICT (segment_id, batch, prefix) DO UPDATE SET kind = kind RETURNING id";
const UPDATE_BATCH: &str = "UPDATE batches SET records = records + ?1, dropped = dropped + ?2, \
     first_ts_ns = min(first_ts_ns, ?3), last_ts_ns = max(last_ts_ns, ?4), \
     kind = coalesce(?5, kind) WHERE id = ?6";
const UPDATE_SEGMENT: &str = "UPDATE segments SET checkpoint = ?1, bytes = max(bytes, ?2), \
     raw_bytes = raw_bytes + ?3, records = records + ?4, damaged = damaged + ?5, \
     first_ts_ns = min(coalesce(first_ts_ns, ?6), coalesce(?6, first_ts_ns)), \
     last_ts_ns = max(coalesce(last_ts_ns, ?7), coalesce(?7, last_ts_ns)), \
     min_record_id = coalesce(min_record_id, ?8), max_record_id = coalesce(?9, max_record_id) \
     WHERE id = ?10";

/// The statements of one transaction, prepared once for all its rows.
struct TxWriter<'c> {
    conn: &'c Connection,
    db: &'c Path,
    insert: CachedStatement<'c>,
    upsert_batch: CachedStatement<'c>,
    update_batch: CachedStatement<'c>,
    update_segment: CachedStatement<'c>,
    /// The batch being indexed: a batch's lines are consecutive.
    open: Option<OpenBatch>,
}

struct OpenBatch {
    seg_id: i64,
    batch: u64,
    prefix: String,
    id: i64,
    kind: Option<String>,
    records: u64,
    dropped: u64,
    first_ts: i64,
    last_ts: i64,
}

impl<'c> TxWriter<'c> {
    fn new(conn: &'c Connection, db: &'c Path) -> Result<TxWriter<'c>> {
        let prep = |sql| {
            conn.prepare_cached(sql)
                .map_err(sql_err("cannot prepare a statement on", db))
        };
        Ok(TxWriter {
            conn,
            db,
            insert: prep(INSERT_RECORD)?,
            upsert_batch: prep(UPSERT_BATCH)?,
            update_batch: prep(UPDATE_BATCH)?,
            update_segment: prep(UPDATE_SEGMENT)?,
            open: None,
        })
    }

    /// Applies one message; returns the rows inserted.
    fn apply(
        &mut self,
        msg: Msg,
        segs: &mut [Pending],
        progress: &mut IndexProgress,
    ) -> Result<usize> {
        match msg {
            Msg::Failed(e) => Err(e),
            Msg::Done { seg } => {
                self.write_segment(&mut segs[seg])?;
                Ok(0)
            }
            Msg::Damage {
                seg,
                resume_at,
                text,
            } => {
                // The reader resynchronised past the damage: the checkpoint
                // moves with it, so the damage is counted once.
                let p = &mut segs[seg];
                self.segment_id(p)?;
                p.checkpoint = resume_at;
                p.delta.dirty = true;
                p.delta.damaged += 1;
                progress.damaged_frames += 1;
                progress.problem(text);
                Ok(0)
            }
            Msg::Frame {
                seg,
                offset,
                end,
                raw_bytes,
                lines,
            } => {
                let p = &mut segs[seg];
                let seg_id = self.segment_id(p)?;
                let mut rows = 0;
                for line in &lines {
                    let line = match line {
                        Ok(l) => l.line(),
                        Err(reason) => {
                            progress.bad_lines += 1;
                            progress.problem(format!(
                                "{} frame at byte {offset}: line not indexed: {reason}",
                                p.path.display()
                            ));
                            continue;
                        }
                    };
                    let batch_id = self.batch_id(seg_id, &line)?;
                    let id = self.insert(&line, batch_id, seg_id, offset)?;
                    p.delta.record(line.ts_ns, id);
                    rows += 1;
                }
                p.checkpoint = end;
                p.delta.raw_bytes += raw_bytes;
                p.delta.dirty = true;
                progress.records += rows as u64;
                progress.frames += 1;
                progress.bytes += end.saturating_sub(offset);
                Ok(rows)
            }
        }
    }

    /// Writes what is pending: the open batch and every segment's changes.
    fn finish(&mut self, segs: &mut [Pending]) -> Result<()> {
        self.flush_batch()?;
        for p in segs {
            self.write_segment(p)?;
        }
        Ok(())
    }

    fn segment_id(&mut self, p: &mut Pending) -> Result<i64> {
        match p.seg_id {
            Some(id) => Ok(id),
            None => {
                let id = ensure_segment(self.conn, self.db, p)?;
                p.seg_id = Some(id);
                Ok(id)
            }
        }
    }

    fn insert(
        &mut self,
        l: &Line<'_>,
        batch_id: i64,
        seg_id: i64,
        frame_offset: u64,
    ) -> Result<i64> {
        self.insert
            .execute(params![
                l.ts_ns,
                &*l.kind,
                l.level,
                &*l.prefix,
                &*l.name,
                l.message.as_deref(),
                l.module.as_deref(),
                l.file.as_deref(),
                l.line,
                l.fields,
                l.spans,
                l.payload,
                batch_id,
                seg_id,
                frame_offset as i64,
            ])
            .map_err(sql_err("cannot insert into", self.db))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The `batches.id` for `line`, counting it in its batch.
    fn batch_id(&mut self, seg_id: i64, l: &Line<'_>) -> Result<i64> {
        let same = self
            .open
            .as_ref()
            .is_some_and(|b| b.seg_id == seg_id && b.batch == l.batch && b.prefix == *l.prefix);
        if !same {
            self.flush_batch()?;
            let id = self
                .upsert_batch
                .query_row(
                    params![seg_id, l.batch as i64, &*l.prefix, &*l.kind, l.ts_ns],
                    |r| r.get(0),
                )
                .map_err(sql_err("cannot insert into", self.db))?;
            self.open = Some(OpenBatch {
                seg_id,
                batch: l.batch,
                prefix: l.prefix.to_string(),
                id,
                kind: None,
                records: 0,
                dropped: 0,
                first_ts: l.ts_ns,
                last_ts: l.ts_ns,
            });
        }
        let Some(b) = self.open.as_mut() else {
            return Err(Error::Other("internal: no open batch".into()));
        };
        b.first_ts = b.first_ts.min(l.ts_ns);
        b.last_ts = b.last_ts.max(l.ts_ns);
        if let Some(n) = drop_notice_count(l) {
            b.dropped += n;
        } else if l.kind != "summary" {
            b.records += 1;
            if b.kind.is_none() {
                b.kind = Some(l.kind.to_string());
            }
        }
        Ok(b.id)
    }

    fn flush_batch(&mut self) -> Result<()> {
        let Some(b) = self.open.take() else {
            return Ok(());
        };
        self.update_batch
            .execute(params![
                b.records as i64,
                b.dropped as i64,
                b.first_ts,
                b.last_ts,
                b.kind,
                b.id
            ])
            .map_err(sql_err("cannot update batches in", self.db))?;
        Ok(())
    }

    /// Writes a segment's checkpoint and counters into its row.
    fn write_segment(&mut self, p: &mut Pending) -> Result<()> {
        if !p.delta.dirty {
            return Ok(());
        }
        let d = std::mem::take(&mut p.delta);
        self.update_segment
            .execute(params![
                p.checkpoint as i64,
                p.size.max(p.checkpoint) as i64,
                d.raw_bytes as i64,
                d.records as i64,
                d.damaged as i64,
                d.first_ts,
                d.last_ts,
                d.min_id,
                d.max_id,
                p.seg_id,
            ])
            .map_err(sql_err("cannot update segments in", self.db))?;
        Ok(())
    }
}

/// The `dropped` count of a drop notice (a `spillway` WARN log whose fields
/// hold `dropped`), or `None` for every other line.
fn drop_notice_count(l: &Line<'_>) -> Option<u64> {
    if l.kind != "log" || l.name != "spillway" {
        return None;
    }
    let fields = l.fields.filter(|f| f.contains("\"dropped\""))?;
    let v: serde_json::Value = serde_json::from_str(fields).ok()?;
    v.get("dropped")?.as_u64()
}
