//! Reading the index: filtered queries, read-only SQL, and statistics.
//!
//! User input reaches SQL only as bound parameters; the SQL text is built
//! from fixed fragments. How each filter is evaluated:
//!
//! - `since`/`until`: a range on `records_by_ts` (since inclusive, until
//!   exclusive).
//! - `min_level`: one sub-query per level at or above it, each an ordered
//!   range on the `(level, ts_ns)` index, merged with `UNION ALL`: the newest
//!   100 WARN+ records cost a few index probes however many INFO records
//!   surround them. Records that are not logs have no level and never match.
//! - `prefix`: a [`Pattern`] (`*` one segment, trailing `*` the rest) matched
//!   against the record's prefix or its name (event name or log target). A
//!   pattern without `*` (or a text that is not a pattern because of Rust's
//!   `::`, like `log:myapp::db`) is an exact comparison in SQL. With `*`, SQL applies
//!   a coarse `GLOB` (where `*` may span `:`) and the exact match is done in
//!   Rust with [`Pattern::matches`], fetching further pages until `limit`
//!   records match.
//! - `text`: case-sensitive substring of the message, name, fields or
//!   payload (`instr`, so no wildcard characters to escape). There is no FTS
//!   table: maintaining one would cost more than the row insert itself.
//! - `fields`: `key=value` equality on the JSON of `fields` (logs) or
//!   `payload` (events). The value is compared as JSON: `42` matches the
//!   number 42 and the string "42"; `true` the boolean; anything that is not
//!   JSON is a string. The key is one literal key (dots are not paths).
//!
//! ```
//! use spillway::sinks::index::{Index, Query};
//! use spillway::Level;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let index = Index::open(dir.path())?;
//! let q = Query {
//!     min_level: Some(Level::WARN),
//!     prefix: Some("log:myapp:*".into()),
//!     fields: vec![("user_id".into(), "42".into())],
//!     ..Query::default()
//! };
//! assert!(index.query(&q)?.is_empty());
//! # Ok::<(), spillway::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, Row};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::layer::name::Pattern;
use crate::layer::record::{rfc3339, Level};
use crate::sinks::index::config::DEFAULT_BUSY_TIMEOUT;
use crate::sinks::index::indexer::{lag, with_suffix, Lag};
use crate::sinks::index::line::{level_name, level_number};
use crate::sinks::index::schema::{self, sql_err, INDEX_FILE};
use crate::sinks::segment::list_segments;

/// The default number of records a query returns: 100.
pub const DEFAULT_QUERY_LIMIT: usize = 100;

/// Which records come first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first (the default: "the latest 100").
    #[default]
    Desc,
}

/// A filtered query over the indexed records. Every filter is optional;
/// all given filters must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// Only records at or after this time (ns since the epoch).
    pub since: Option<i64>,
    /// Only records before this time (ns since the epoch).
    pub until: Option<i64>,
    /// Only logs at this level or more severe.
    pub min_level: Option<Level>,
    /// Only records whose prefix or name matches this [`Pattern`] (`*` one
    /// segment, trailing `*` the rest: `data:*`, `sentinel:*:status`,
    /// `log:myapp:*`). Text that is not a valid pattern but has no `*`, like
    /// a log prefix `log:myapp::db` or a target `myapp::db` (Rust's `::`
    /// makes an empty segment), is compared exactly.
    pub prefix: Option<String>,
    /// Only records whose message, name, fields or payload contain this text.
    pub text: Option<String>,
    /// Only records with these `key = value` fields (or payload keys).
    pub fields: Vec<(String, String)>,
    /// At most this many records (`None`: all).
    pub limit: Option<usize>,
    /// Newest or oldest first.
    pub order: Order,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            since: None,
            until: None,
            min_level: None,
            prefix: None,
            text: None,
            fields: Vec::new(),
            limit: Some(DEFAULT_QUERY_LIMIT),
            order: Order::Desc,
        }
    }
}

/// One record, serialised exactly like its line in the segment files.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueryRecord {
    /// RFC 3339 with nanoseconds.
    pub ts: String,
    pub ts_ns: i64,
    /// `log`, `event`, `sample` or `summary`.
    pub kind: String,
    /// The engine's batch number.
    pub batch: u64,
    pub prefix: String,
    /// What depends on the kind.
    #[serde(flatten)]
    pub body: RecordBody,
}

/// The kind-specific part of a [`QueryRecord`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RecordBody {
    /// A log record.
    Log {
        target: String,
        level: String,
        module: Option<String>,
        file: Option<String>,
        line: Option<i64>,
        message: String,
        fields: Value,
        spans: Value,
    },
    /// An event, sample or summary.
    Event { name: String, payload: Value },
}

/// What [`IndexReader::sql`] calls for each row: the column names and the
/// row's values.
pub type OnRow<'a> = dyn FnMut(&[String], Vec<Value>) -> Result<()> + 'a;

/// A read-only view of `DIR/index.db`, for the CLI and other processes.
pub struct IndexReader {
    conn: Connection,
    data_dir: PathBuf,
    db_path: PathBuf,
}

impl std::fmt::Debug for IndexReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexReader")
            .field("db_path", &self.db_path)
            .finish()
    }
}

impl IndexReader {
    /// Opens `DIR/index.db` read-only (`SQLITE_OPEN_READ_ONLY` and
    /// `PRAGMA query_only`). A missing index, or one from a newer spillway,
    /// is an error that says so.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<IndexReader> {
        let data_dir = data_dir.as_ref().to_path_buf();
        let db_path = data_dir.join(INDEX_FILE);
        let conn = schema::open_ro(&db_path, DEFAULT_BUSY_TIMEOUT)?;
        Ok(IndexReader {
            conn,
            data_dir,
            db_path,
        })
    }

    /// Records matching `q`.
    pub fn query(&self, q: &Query) -> Result<Vec<QueryRecord>> {
        run_query(&self.conn, &self.db_path, q)
    }

    /// Counters per prefix, disk use, lag and time span.
    pub fn stats(&self) -> Result<IndexStats> {
        stats(&self.conn, &self.db_path, &self.data_dir)
    }

    /// How far the index is behind the segment files.
    pub fn lag(&self) -> Result<Lag> {
        lag(&self.conn, &self.data_dir)
    }

    /// Runs one read-only SQL statement, calling `on_row` with the column
    /// names and each row (as JSON values: integers, reals, text; blobs as
    /// `x'..'` hex text). A statement that would write is refused before it
    /// runs; the connection is read-only as well.
    pub fn sql(&self, sql: &str, on_row: &mut OnRow<'_>) -> Result<Vec<String>> {
        let path = &self.db_path;
        let mut stmt = self.conn.prepare(sql).map_err(|e| match e {
            rusqlite::Error::MultipleStatement => Error::Other(
                "spillway sql runs one statement at a time; remove everything after the first `;`"
                    .into(),
            ),
            e => sql_err("cannot prepare the query on", path)(e),
        })?;
        if !stmt.readonly() {
            return Err(Error::Other(format!(
                "spillway sql is read-only: refusing a statement that would modify {}",
                path.display()
            )));
        }
        let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
        let n = columns.len();
        let mut rows = stmt
            .query([])
            .map_err(sql_err("cannot run the query on", path))?;
        while let Some(row) = rows
            .next()
            .map_err(sql_err("cannot run the query on", path))?
        {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                let v = row
                    .get_ref(i)
                    .map_err(sql_err("cannot read a row from", path))?;
                values.push(match v {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::from(i),
                    ValueRef::Real(f) => Value::from(f),
                    ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => {
                        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                        Value::String(format!("x'{hex}'"))
                    }
                });
            }
            on_row(&columns, values)?;
        }
        Ok(columns)
    }
}

/// Counters of one prefix, from the `batches` table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PrefixIndexStats {
    /// Records (drop notices and summary lines not counted).
    pub records: u64,
    /// Batches.
    pub batches: u64,
    /// Records dropped, summed from the drop notices.
    pub dropped: u64,
    /// Earliest record (ns since the epoch).
    pub first_ts_ns: i64,
    /// Latest record (ns since the epoch).
    pub last_ts_ns: i64,
}

/// What `spillway stats` prints.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IndexStats {
    /// Per prefix.
    pub prefixes: BTreeMap<String, PrefixIndexStats>,
    /// Rows in the index (every segment line).
    pub records: u64,
    /// Batches.
    pub batches: u64,
    /// Records dropped, all prefixes.
    pub dropped: u64,
    /// Damaged frames skipped while indexing.
    pub damaged_frames: u64,
    /// How far the index is behind the segments.
    pub lag: Lag,
    /// Segment files on disk.
    pub segment_files: u64,
    /// Bytes of segment files on disk.
    pub segment_bytes: u64,
    /// Bytes of the index (`index.db` with its `-wal` and `-shm`).
    pub index_bytes: u64,
    /// Uncompressed bytes of the indexed lines / their compressed bytes.
    pub compression_ratio: Option<f64>,
    /// Earliest record (ns since the epoch).
    pub first_ts_ns: Option<i64>,
    /// Latest record (ns since the epoch).
    pub last_ts_ns: Option<i64>,
}

pub(crate) fn stats(conn: &Connection, db_path: &Path, data_dir: &Path) -> Result<IndexStats> {
    let err = || sql_err("cannot read statistics from", db_path);
    let mut s = IndexStats::default();
    {
        let mut stmt = conn
            .prepare(
                // A batch whose lines straddle a rotation has a row per segment.
                "SELECT prefix, sum(records), count(DISTINCT batch), sum(dropped), min(first_ts_ns), \
                 max(last_ts_ns) FROM batches GROUP BY prefix",
            )
            .map_err(err())?;
        let mut rows = stmt.query([]).map_err(err())?;
        while let Some(r) = rows.next().map_err(err())? {
            let p = PrefixIndexStats {
                records: r.get::<_, i64>(1).map_err(err())?.max(0) as u64,
                batches: r.get::<_, i64>(2).map_err(err())?.max(0) as u64,
                dropped: r.get::<_, i64>(3).map_err(err())?.max(0) as u64,
                first_ts_ns: r.get(4).map_err(err())?,
                last_ts_ns: r.get(5).map_err(err())?,
            };
            s.batches += p.batches;
            s.dropped += p.dropped;
            s.prefixes.insert(r.get(0).map_err(err())?, p);
        }
    }
    let (records, raw, compressed, damaged, first, last): (
        i64,
        i64,
        i64,
        i64,
        Option<i64>,
        Option<i64>,
    ) = conn
        .query_row(
            "SELECT coalesce(sum(records), 0), coalesce(sum(raw_bytes), 0), \
             coalesce(sum(checkpoint), 0), coalesce(sum(damaged), 0), min(first_ts_ns), \
             max(last_ts_ns) FROM segments",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .map_err(err())?;
    s.records = records.max(0) as u64;
    s.damaged_frames = damaged.max(0) as u64;
    s.compression_ratio = (compressed > 0).then(|| raw as f64 / compressed as f64);
    s.first_ts_ns = first;
    s.last_ts_ns = last;
    s.lag = lag(conn, data_dir)?;
    for file in list_segments(data_dir)? {
        if let Ok(m) = std::fs::metadata(&file) {
            s.segment_files += 1;
            s.segment_bytes += m.len();
        }
    }
    s.index_bytes = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(with_suffix(db_path, suffix)).ok())
        .map(|m| m.len())
        .sum();
    Ok(s)
}

/// The columns every query selects, in the order [`read_record`] expects.
const COLUMNS: &str = "r.id AS id, r.ts_ns AS ts_ns, r.kind, r.level, r.prefix, r.name, \
     r.message, r.module, r.file, r.line, r.fields, r.spans, r.payload, \
     (SELECT b.batch FROM batches b WHERE b.id = r.batch_id)";

/// Builds the WHERE clause of a query: SQL text from fixed fragments,
/// values only as parameters.
struct Filter {
    sql: String,
    params: Vec<SqlValue>,
}

impl Filter {
    fn and(&mut self, fragment: &str, params: impl IntoIterator<Item = SqlValue>) {
        self.sql.push_str(" AND ");
        self.sql.push_str(fragment);
        self.params.extend(params);
    }
}

/// `$."key"`: the JSON path of one literal key.
fn json_path(key: &str) -> Result<String> {
    if key.is_empty() || key.contains('"') || key.chars().any(char::is_control) {
        return Err(Error::Other(format!(
            "cannot filter on field {key:?}: a field key must be non-empty, without `\"` or control characters"
        )));
    }
    Ok(format!("$.\"{key}\""))
}

/// The JSON texts a field value matches: itself if it is JSON (`42`,
/// `true`, `"x"`), and always as a JSON string.
fn json_candidates(value: &str) -> (String, String) {
    let as_string = Value::String(value.to_owned()).to_string();
    let as_json = match serde_json::from_str::<Value>(value) {
        Ok(v) if !v.is_object() && !v.is_array() => v.to_string(),
        _ => as_string.clone(),
    };
    (as_json, as_string)
}

/// Escapes `*`, `?` and `[` for GLOB.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '*' => out.push_str("[*]"),
            '?' => out.push_str("[?]"),
            '[' => out.push_str("[[]"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn run_query(conn: &Connection, db_path: &Path, q: &Query) -> Result<Vec<QueryRecord>> {
    let mut f = Filter {
        sql: String::from("1"),
        params: Vec::new(),
    };
    if let Some(since) = q.since {
        f.and("r.ts_ns >= ?", [SqlValue::Integer(since)]);
    }
    if let Some(until) = q.until {
        f.and("r.ts_ns < ?", [SqlValue::Integer(until)]);
    }
    let mut post_filter = None;
    let pattern = match q.prefix.as_deref() {
        None => None,
        Some(text) => match Pattern::parse(text) {
            Ok(p) => Some(p),
            Err(_) if !text.is_empty() && !text.contains('*') => None,
            Err(e) => return Err(e),
        },
    };
    if let Some(text) = q.prefix.as_deref() {
        if let Some(p) = pattern
            .as_ref()
            .filter(|_| text.split(':').any(|seg| seg == "*"))
        {
            let glob = text
                .split(':')
                .map(|seg| {
                    if seg == "*" {
                        "*".to_string()
                    } else {
                        glob_escape(seg)
                    }
                })
                .collect::<Vec<_>>()
                .join(":");
            f.and(
                "(r.prefix GLOB ? OR r.name GLOB ?)",
                [SqlValue::Text(glob.clone()), SqlValue::Text(glob)],
            );
            post_filter = Some(p);
        } else {
            f.and(
                "(r.prefix = ? OR r.name = ?)",
                [SqlValue::Text(text.into()), SqlValue::Text(text.into())],
            );
        }
    }
    if let Some(text) = &q.text {
        f.and(
            "(instr(r.message, ?) > 0 OR instr(r.name, ?) > 0 OR instr(r.fields, ?) > 0 \
             OR instr(r.payload, ?) > 0)",
            std::iter::repeat_n(SqlValue::Text(text.clone()), 4),
        );
    }
    for (key, value) in &q.fields {
        let path = json_path(key)?;
        let (a, b) = json_candidates(value);
        f.and(
            "((r.fields -> ?) IN (?, ?) OR (r.payload -> ?) IN (?, ?))",
            [
                SqlValue::Text(path.clone()),
                SqlValue::Text(a.clone()),
                SqlValue::Text(b.clone()),
                SqlValue::Text(path),
                SqlValue::Text(a),
                SqlValue::Text(b),
            ],
        );
    }
    let levels: Vec<i64> = match q.min_level {
        None => Vec::new(),
        Some(l) => {
            let min = level_number(l.as_str()).unwrap_or(1) as i64;
            (min..=5).collect()
        }
    };

    let (dir, cmp) = match q.order {
        Order::Desc => ("DESC", "<"),
        Order::Asc => ("ASC", ">"),
    };
    // With a post-filter, read pages until `limit` records match.
    let page = match (post_filter, q.limit) {
        (None, limit) => limit,
        (Some(_), Some(limit)) => Some(limit.max(1).saturating_mul(4).max(256)),
        (Some(_), None) => Some(4096),
    };
    let mut out = Vec::new();
    let mut after: Option<(i64, i64)> = None;
    loop {
        let mut page_filter = Filter {
            sql: f.sql.clone(),
            params: f.params.clone(),
        };
        if let Some((ts, id)) = after {
            let bound = if cmp == "<" { "<=" } else { ">=" };
            page_filter.and(
                &format!("r.ts_ns {bound} ? AND (r.ts_ns {cmp} ? OR r.id {cmp} ?)"),
                [
                    SqlValue::Integer(ts),
                    SqlValue::Integer(ts),
                    SqlValue::Integer(id),
                ],
            );
        }
        let limit_sql = if page.is_some() { " LIMIT ?" } else { "" };
        let mut params: Vec<SqlValue> = Vec::new();
        let sql = if levels.is_empty() {
            params.extend(page_filter.params.iter().cloned());
            params.extend(page.map(|n| SqlValue::Integer(n as i64)));
            format!(
                "SELECT {COLUMNS} FROM records r WHERE {} ORDER BY r.ts_ns {dir}, r.id {dir}{limit_sql}",
                page_filter.sql
            )
        } else {
            let mut parts = Vec::new();
            for level in &levels {
                params.push(SqlValue::Integer(*level));
                params.extend(page_filter.params.iter().cloned());
                params.extend(page.map(|n| SqlValue::Integer(n as i64)));
                parts.push(format!(
                    "SELECT * FROM (SELECT {COLUMNS} FROM records r WHERE r.level = ? AND {} \
                     ORDER BY r.ts_ns {dir}, r.id {dir}{limit_sql})",
                    page_filter.sql
                ));
            }
            params.extend(page.map(|n| SqlValue::Integer(n as i64)));
            format!(
                "{} ORDER BY ts_ns {dir}, id {dir}{limit_sql}",
                parts.join(" UNION ALL ")
            )
        };
        let err = || sql_err("cannot query", db_path);
        let mut stmt = conn.prepare_cached(&sql).map_err(err())?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(err())?;
        let mut fetched = 0usize;
        while let Some(row) = rows.next().map_err(err())? {
            fetched += 1;
            let (id, rec) = read_record(row).map_err(err())?;
            after = Some((rec.ts_ns, id));
            let keep = post_filter.is_none_or(|p| {
                p.matches(&rec.prefix)
                    || p.matches(match &rec.body {
                        RecordBody::Log { target, .. } => target,
                        RecordBody::Event { name, .. } => name,
                    })
            });
            if keep {
                out.push(rec);
                if q.limit.is_some_and(|l| out.len() >= l) {
                    return Ok(out);
                }
            }
        }
        let page_was_full = page.is_some_and(|n| fetched >= n);
        if post_filter.is_none() || !page_was_full {
            return Ok(out);
        }
    }
}

fn parse_json(text: Option<String>) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn read_record(r: &Row<'_>) -> rusqlite::Result<(i64, QueryRecord)> {
    let id: i64 = r.get(0)?;
    let ts_ns: i64 = r.get(1)?;
    let kind: String = r.get(2)?;
    let level: Option<i64> = r.get(3)?;
    let prefix: String = r.get(4)?;
    let name: String = r.get(5)?;
    let body = if kind == "log" {
        RecordBody::Log {
            target: name,
            level: level.and_then(level_name).unwrap_or("").to_string(),
            module: r.get(7)?,
            file: r.get(8)?,
            line: r.get(9)?,
            message: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
            fields: match parse_json(r.get(10)?) {
                Value::Null => Value::Object(Default::default()),
                v => v,
            },
            spans: match parse_json(r.get(11)?) {
                Value::Null => Value::Array(Vec::new()),
                v => v,
            },
        }
    } else {
        RecordBody::Event {
            name,
            payload: parse_json(r.get(12)?),
        }
    };
    let batch: Option<i64> = r.get(13)?;
    Ok((
        id,
        QueryRecord {
            ts: rfc3339(ts_ns),
            ts_ns,
            kind,
            batch: batch.unwrap_or(0).max(0) as u64,
            prefix,
            body,
        },
    ))
}
