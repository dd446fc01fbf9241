//! The SQLite index of the segment files: `DIR/index.db`.
//!
//! The segments are the source of truth; the index is built from them and
//! can always be rebuilt ([`reindex`], `spillway reindex DIR`). An
//! [`Indexer`] thread follows the segment files like `tail -f` and inserts
//! every line as a row of `records`, storing its checkpoint (segment, byte
//! offset) in the same transaction as the rows, so each record is indexed
//! exactly once across crashes. A locked, unwritable or corrupt `index.db`
//! never stops the service: the indexer reports it, backs off and retries
//! (a corrupt file is moved aside and rebuilt).
//!
//! The database is plain SQLite (WAL): `sqlite3 DIR/index.db` reads it, the
//! `logs` and `events` views show records as `spillway tail` does, and the
//! JSON columns work with `json_extract`:
//!
//! ```sql
//! SELECT ts, level, target, message FROM logs WHERE level_num >= 4 ORDER BY ts_ns DESC LIMIT 20;
//! SELECT json_extract(payload, '$.id') FROM events WHERE name = 'data:users:created';
//! ```
//!
//! In code:
//!
//! ```
//! use spillway::sinks::index::{Index, Query};
//! use spillway::sinks::segment::{SegmentConfig, SegmentSink};
//! use spillway::{BatchConfig, Engine, Level};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let sink = SegmentSink::open(dir.path(), SegmentConfig::default())?;
//! let (engine, guard) = Engine::builder(BatchConfig::default()).sink(Box::new(sink)).build()?;
//! engine.publish("data:users:created", serde_json::json!({"id": 42}))?;
//! drop(guard); // flushes the segments
//!
//! let mut index = Index::open(dir.path())?;
//! index.catch_up()?;
//! let found = index.query(&Query { fields: vec![("id".into(), "42".into())], ..Query::default() })?;
//! assert_eq!(found.len(), 1);
//! assert_eq!(serde_json::to_value(&found[0])?["name"], "data:users:created");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[doc(hidden)]
pub mod bench;
mod config;
mod indexer;
mod line;
mod query;
mod schema;
mod worker;

pub use config::{
    IndexConfig, DEFAULT_BUSY_TIMEOUT, DEFAULT_CACHE_BYTES, DEFAULT_MAX_BACKOFF,
    DEFAULT_POLL_INTERVAL, DEFAULT_ROWS_PER_TRANSACTION, DEFAULT_STOP_TIMEOUT,
};
pub use indexer::{reindex, Index, IndexProgress, Lag};
pub use query::{
    IndexReader, IndexStats, OnRow, Order, PrefixIndexStats, Query, QueryRecord, RecordBody,
    DEFAULT_QUERY_LIMIT,
};
pub use schema::{INDEX_FILE, SCHEMA_VERSION};
pub use worker::{Indexer, IndexerHandle, IndexerStatus};
