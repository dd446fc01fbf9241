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
//! and index inserts stay appends. It holds one frame per stream in memory
//! and commits every [`IndexConfig::rows_per_transaction`] rows, so memory
//! does not grow with the backlog.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::sinks::index::config::IndexConfig;
use crate::sinks::index::line::{parse_line, Line};
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
    pub(crate) fn open_file(data_dir: &Path, db_path: &Path, config: &IndexConfig) -> Result<Index> {
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
    pub fn catch_up_with(&mut self, on_commit: &mut dyn FnMut(&IndexProgress)) -> Result<IndexProgress> {
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

        // Work queues, one per stream, in file-name order.
        let mut streams: Vec<StreamQueue> = Vec::new();
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
            if size <= checkpoint {
                continue;
            }
            let stream = stream_of(&path);
            let pending = Pending {
                rel,
                path,
                seg_id: seg.map(|s| s.id),
                checkpoint,
                size,
            };
            match streams.iter_mut().find(|s| s.name == stream) {
                Some(s) => s.queue.push_back(pending),
                None => streams.push(StreamQueue {
                    name: stream,
                    queue: VecDeque::from([pending]),
                    cur: None,
                    last_ts: i64::MIN,
                }),
            }
        }

        let limit = self.config.rows_per_transaction;
        while streams.iter().any(StreamQueue::has_work) {
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                break;
            }
            let db_path = self.db_path.clone();
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err("cannot begin a transaction on", &db_path))?;
            let mut batch = BatchWriter::default();
            let mut rows = 0;
            while rows < limit {
                let Some(si) = pick_stream(&streams) else {
                    break;
                };
                let st = &mut streams[si];
                if st.cur.is_none() {
                    let Some(mut p) = st.queue.pop_front() else {
                        continue;
                    };
                    let reader = match FrameReader::open(&p.path, p.checkpoint) {
                        Ok(r) => r,
                        // Deleted under us: the next pass removes its rows.
                        Err(Error::Io { source, .. })
                            if source.kind() == std::io::ErrorKind::NotFound =>
                        {
                            continue
                        }
                        Err(e) => return Err(e),
                    };
                    if p.seg_id.is_none() {
                        p.seg_id = Some(ensure_segment(&tx, &db_path, &p)?);
                    }
                    st.cur = Some(Cursor {
                        pending: p,
                        reader,
                        delta: SegDelta::default(),
                    });
                }
                let Some(cur) = st.cur.as_mut() else {
                    continue;
                };
                match cur.reader.next_frame() {
                    None => {
                        // Nothing complete beyond here (yet): done with this file.
                        batch.flush(&tx, &db_path)?;
                        write_delta(&tx, &db_path, cur)?;
                        st.cur = None;
                    }
                    Some(Err(damage)) => {
                        // The reader has resynchronised past the damage: the
                        // checkpoint moves with it, so it is counted once.
                        cur.pending.checkpoint = cur.reader.offset();
                        cur.delta.dirty = true;
                        cur.delta.damaged += 1;
                        progress.damaged_frames += 1;
                        progress.problem(damage.to_string());
                    }
                    Some(Ok(frame)) => {
                        let seg_id = cur.pending.seg_id.unwrap_or_default();
                        for text in &frame.lines {
                            cur.delta.raw_bytes += text.len() as u64 + 1;
                            let line = match parse_line(text) {
                                Ok(l) => l,
                                Err(reason) => {
                                    progress.bad_lines += 1;
                                    progress.problem(format!(
                                        "{} frame at byte {}: line not indexed: {reason}",
                                        frame.path.display(),
                                        frame.offset
                                    ));
                                    continue;
                                }
                            };
                            let batch_id = batch.batch_id(&tx, &db_path, seg_id, &line)?;
                            let id = insert_record(&tx, &db_path, &line, batch_id, seg_id, frame.offset)?;
                            cur.delta.record(line.ts_ns, id);
                            st.last_ts = st.last_ts.max(line.ts_ns);
                            rows += 1;
                            progress.records += 1;
                        }
                        cur.pending.checkpoint = frame.end;
                        cur.delta.dirty = true;
                        progress.frames += 1;
                        progress.bytes += frame.end.saturating_sub(frame.offset);
                    }
                }
            }
            batch.flush(&tx, &db_path)?;
            for st in &mut streams {
                if let Some(cur) = st.cur.as_mut() {
                    write_delta(&tx, &db_path, cur)?;
                }
            }
            tx.commit()
                .map_err(sql_err("cannot commit to", &db_path))?;
            progress.transactions += 1;
            on_commit(&progress);
        }
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
        let rel = file.strip_prefix(data_dir).unwrap_or(&file).to_string_lossy();
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
    fs::rename(&tmp, &target).map_err(|e| Error::io("cannot move the rebuilt index to", &target, e))?;
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
    let mode: rusqlite::Result<String> = conn.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0));
    match mode {
        Ok(m) if m.eq_ignore_ascii_case("delete") => Ok(()),
        Ok(_) => Err(in_use(target)),
        Err(e) => {
            let err = sql_err("cannot check", target)(e);
            if schema::is_corrupt(&err) {
                Ok(())
            } else if matches!(&err, Error::Sqlite { source, .. }
                if matches!(source.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)))
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

fn ensure_segment(tx: &Transaction<'_>, path: &Path, p: &Pending) -> Result<i64> {
    let stream = stream_of(&p.path);
    tx.query_row(
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

struct Pending {
    rel: String,
    path: PathBuf,
    seg_id: Option<i64>,
    checkpoint: u64,
    size: u64,
}

struct Cursor {
    pending: Pending,
    reader: FrameReader,
    delta: SegDelta,
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

struct StreamQueue {
    name: String,
    queue: VecDeque<Pending>,
    cur: Option<Cursor>,
    /// Newest timestamp indexed from this stream in this pass.
    last_ts: i64,
}

impl StreamQueue {
    fn has_work(&self) -> bool {
        self.cur.is_some() || !self.queue.is_empty()
    }
}

/// The stream furthest behind in time, so rows arrive in timestamp order.
fn pick_stream(streams: &[StreamQueue]) -> Option<usize> {
    streams
        .iter()
        .enumerate()
        .filter(|(_, s)| s.has_work())
        .min_by_key(|(_, s)| s.last_ts)
        .map(|(i, _)| i)
}

/// Writes a cursor's checkpoint and counters into its `segments` row.
fn write_delta(tx: &Transaction<'_>, path: &Path, cur: &mut Cursor) -> Result<()> {
    let d = std::mem::take(&mut cur.delta);
    if !d.dirty && d.damaged == 0 {
        return Ok(());
    }
    let p = &cur.pending;
    let mut stmt = tx
        .prepare_cached(
            "UPDATE segments SET checkpoint = ?1, bytes = max(bytes, ?2), \
             raw_bytes = raw_bytes + ?3, records = records + ?4, damaged = damaged + ?5, \
             first_ts_ns = min(coalesce(first_ts_ns, ?6), coalesce(?6, first_ts_ns)), \
             last_ts_ns = max(coalesce(last_ts_ns, ?7), coalesce(?7, last_ts_ns)), \
             min_record_id = coalesce(min_record_id, ?8), \
             max_record_id = coalesce(?9, max_record_id) \
             WHERE id = ?10",
        )
        .map_err(sql_err("cannot update segments in", path))?;
    stmt.execute(params![
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
    .map_err(sql_err("cannot update segments in", path))?;
    Ok(())
}

fn insert_record(
    tx: &Transaction<'_>,
    path: &Path,
    l: &Line<'_>,
    batch_id: i64,
    seg_id: i64,
    frame_offset: u64,
) -> Result<i64> {
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO records (ts_ns, kind, level, prefix, name, message, module, file, line, \
             fields, spans, payload, batch_id, segment_id, frame_offset) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )
        .map_err(sql_err("cannot insert into", path))?;
    stmt.execute(params![
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
    .map_err(sql_err("cannot insert into", path))?;
    Ok(tx.last_insert_rowid())
}

/// Keeps the `batches` row of the batch being indexed; a batch's lines are
/// consecutive, so one row is open at a time.
#[derive(Default)]
struct BatchWriter {
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

impl BatchWriter {
    /// The `batches.id` for `line`, counting it in its batch.
    fn batch_id(&mut self, tx: &Transaction<'_>, path: &Path, seg_id: i64, l: &Line<'_>) -> Result<i64> {
        let same = self
            .open
            .as_ref()
            .is_some_and(|b| b.seg_id == seg_id && b.batch == l.batch && b.prefix == *l.prefix);
        if !same {
            self.flush(tx, path)?;
            let id = tx
                .prepare_cached(
                    "INSERT INTO batches (segment_id, batch, prefix, kind, first_ts_ns, last_ts_ns) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5) \
                     ON CONFLICT (segment_id, batch, prefix) DO UPDATE SET kind = kind RETURNING id",
                )
                .and_then(|mut s| {
                    s.query_row(
                        params![seg_id, l.batch as i64, &*l.prefix, &*l.kind, l.ts_ns],
                        |r| r.get(0),
                    )
                })
                .map_err(sql_err("cannot insert into", path))?;
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

    fn flush(&mut self, tx: &Transaction<'_>, path: &Path) -> Result<()> {
        let Some(b) = self.open.take() else {
            return Ok(());
        };
        tx.prepare_cached(
            "UPDATE batches SET records = records + ?1, dropped = dropped + ?2, \
             first_ts_ns = min(first_ts_ns, ?3), last_ts_ns = max(last_ts_ns, ?4), \
             kind = coalesce(?5, kind) WHERE id = ?6",
        )
        .and_then(|mut s| {
            s.execute(params![
                b.records as i64,
                b.dropped as i64,
                b.first_ts,
                b.last_ts,
                b.kind,
                b.id
            ])
        })
        .map_err(sql_err("cannot update batches in", path))?;
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
