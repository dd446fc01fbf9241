//! The SQLite index: schema and migrations, exactly-once indexing across a
//! SIGKILL, locked and corrupt databases, reindex, retention, queries, the
//! read-only SQL path and injection-shaped input. Real files, real SQLite,
//! real threads and a real child process.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spillway::sinks::index::{
    reindex, Index, IndexConfig, IndexReader, Indexer, Order, Query, INDEX_FILE, SCHEMA_VERSION,
};
use spillway::sinks::segment::reader::{ReadItem, SegmentReader};
use spillway::sinks::segment::{list_segments, SegmentConfig, SegmentSink};
use spillway::{rfc3339, BatchConfig, BusEvent, Engine, FieldValue, Level, LogRecord, Policy};

const T0: i64 = 1_800_000_000_000_000_000;
const SEC: i64 = 1_000_000_000;

// ---------------------------------------------------------------- helpers

/// Appends one zstd frame (checksum on) per element of `frames` to
/// `DIR/segments/<stream>/<file>`, as the segment writer does.
fn write_frames(dir: &Path, stream: &str, file: &str, frames: &[Vec<Value>]) -> PathBuf {
    let d = dir.join("segments").join(stream);
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join(file);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    for lines in frames {
        let mut raw = Vec::new();
        for l in lines {
            serde_json::to_writer(&mut raw, l).unwrap();
            raw.push(b'\n');
        }
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_checksum(true).unwrap();
        enc.write_all(&raw).unwrap();
        f.write_all(&enc.finish().unwrap()).unwrap();
    }
    path
}

fn log_line(
    ts_ns: i64,
    batch: u64,
    target: &str,
    level: &str,
    message: &str,
    fields: Value,
) -> Value {
    json!({"ts": rfc3339(ts_ns), "ts_ns": ts_ns, "kind": "log", "batch": batch,
        "prefix": format!("log:{target}"), "target": target, "level": level, "module": target,
        "file": "src/x.rs", "line": 7, "message": message, "fields": fields,
        "spans": [{"name": "req", "fields": {"id": "r1"}}]})
}

fn event_line(ts_ns: i64, batch: u64, prefix: &str, name: &str, payload: Value) -> Value {
    json!({"ts": rfc3339(ts_ns), "ts_ns": ts_ns, "kind": "event", "batch": batch,
        "prefix": prefix, "name": name, "payload": payload})
}

/// Every line of every segment under `dir`, parsed.
fn segment_lines(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for item in SegmentReader::open(dir).expect("open reader") {
        if let ReadItem::Frame(f) = item.expect("read") {
            for l in f.lines {
                out.push(serde_json::from_str(&l).expect("line is JSON"));
            }
        }
    }
    out
}

fn count(dir: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(INDEX_FILE)).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn log(i: u64, target: &'static str, level: Level) -> LogRecord {
    LogRecord {
        ts_ns: spillway::now_ns(),
        level,
        target: Cow::Borrowed(target),
        module_path: Some(Cow::Borrowed(target)),
        file: Some(Cow::Borrowed("src/db.rs")),
        line: Some(42),
        message: format!("row written {i}"),
        fields: vec![(Cow::Borrowed("id"), FieldValue::U64(i))],
        spans: Vec::new(),
    }
}

fn engine_with_segments(dir: &Path, config: SegmentConfig) -> (Engine, spillway::Guard) {
    let sink = SegmentSink::open(dir, config).expect("segment sink");
    let batch = BatchConfig::builder()
        .policy("test:*", Policy::batch(Duration::from_millis(10), 100))
        .build()
        .expect("batch config");
    Engine::builder(batch)
        .sink(Box::new(sink))
        .build()
        .expect("engine")
}

/// Publishes `n` events `test:ids:created` with payload `{"id": i}`.
fn publish_ids(engine: &Engine, range: std::ops::Range<u64>) {
    for i in range {
        engine
            .publish("test:ids:created", json!({"id": i, "pad": "x".repeat(40)}))
            .expect("publish");
    }
    engine.flush().expect("flush");
}

/// The rows that must survive a rebuild, in a stable order.
fn dump(dir: &Path) -> Vec<Vec<Value>> {
    let reader = IndexReader::open(dir).unwrap();
    let mut rows = Vec::new();
    reader
        .sql(
            "SELECT r.ts_ns, r.kind, r.level, r.level_name, r.prefix, r.name, r.message, r.module, \
             r.file, r.line, r.fields, r.spans, r.payload, b.batch, s.path, r.frame_offset \
             FROM records r JOIN batches b ON b.id = r.batch_id JOIN segments s ON s.id = r.segment_id \
             ORDER BY s.path, r.frame_offset, r.id",
            &mut |_, row| {
                rows.push(row);
                Ok(())
            },
        )
        .unwrap();
    rows
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- schema

// Catches a schema that is not created on an empty directory, or that a
// second open re-applies (migrations must be idempotent by version).
#[test]
fn migrations_from_empty_create_tables_views_and_version() {
    let dir = tempfile::tempdir().unwrap();
    drop(Index::open(dir.path()).unwrap());
    drop(Index::open(dir.path()).unwrap());
    let conn = rusqlite::Connection::open(dir.path().join(INDEX_FILE)).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version as usize, SCHEMA_VERSION);
    let mut names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    names.retain(|n| !n.starts_with("sqlite_"));
    assert_eq!(names, ["batches", "events", "logs", "records", "segments"]);
}

// Catches an old build opening (and possibly corrupting) an index written
// by a newer one, and an error that does not say which file and versions.
#[test]
fn newer_schema_version_is_refused_naming_file_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    drop(Index::open(dir.path()).unwrap());
    let db = dir.path().join(INDEX_FILE);
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    for err in [
        Index::open(dir.path()).unwrap_err().to_string(),
        IndexReader::open(dir.path()).unwrap_err().to_string(),
    ] {
        assert!(err.contains(&db.display().to_string()), "{err}");
        assert!(err.contains("99"), "{err}");
        assert!(err.contains(&format!("version {SCHEMA_VERSION}")), "{err}");
    }
    // Refused, not downgraded.
    assert_eq!(count(dir.path(), "PRAGMA user_version"), 99);
}

// ---------------------------------------------------------------- indexing

// Catches lost or duplicated lines, and per-prefix counters that disagree
// with the engine, after a demo-sized run (~50k records, logs and events,
// several prefixes, several files per stream).
#[test]
fn demo_run_indexes_every_segment_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = SegmentConfig {
        rotate_bytes: 128 << 10,
        retain_bytes: 0,
        ..SegmentConfig::default()
    };
    let (engine, guard) = engine_with_segments(dir.path(), config);
    let targets = ["myapp::db", "myapp::http", "myapp::indexer"];
    for i in 0..50_000u64 {
        match i % 5 {
            0 | 1 => {
                let level = if i % 97 == 0 {
                    Level::WARN
                } else {
                    Level::INFO
                };
                engine
                    .submit_log(log(i, targets[i as usize % 3], level), false)
                    .expect("log");
            }
            2 => engine
                .publish("data:users:created", json!({"id": i}))
                .expect("pub"),
            3 => engine
                .publish("test:ids:created", json!({"id": i}))
                .expect("pub"),
            _ => engine
                .publish(
                    "code_index:file:created",
                    json!({"path": format!("src/{i}.rs")}),
                )
                .expect("pub"),
        }
    }
    engine.flush().unwrap();
    let engine_stats = engine.stats();
    drop(guard);

    let lines = segment_lines(dir.path());
    let mut index = Index::open(dir.path()).unwrap();
    let progress = index.catch_up().unwrap();
    assert_eq!(progress.records as usize, lines.len());
    assert_eq!((progress.damaged_frames, progress.bad_lines), (0, 0));
    assert!(
        list_segments(dir.path()).unwrap().len() > 3,
        "expected rotated files"
    );
    assert_eq!(
        count(dir.path(), "SELECT count(*) FROM records") as usize,
        lines.len()
    );
    assert_eq!(index.lag().unwrap().bytes, 0);

    let stats = index.stats().unwrap();
    for (prefix, s) in &engine_stats.prefixes {
        let got = stats.prefixes.get(prefix).map_or(0, |p| p.records);
        assert_eq!(got, s.accepted, "records of {prefix}");
        assert_eq!(
            stats.prefixes[prefix].batches, s.batches,
            "batches of {prefix}"
        );
    }
    assert!(
        stats.compression_ratio.unwrap() > 2.0,
        "{:?}",
        stats.compression_ratio
    );
    assert_eq!(stats.lag.bytes, 0);

    // A second pass finds nothing new.
    assert_eq!(index.catch_up().unwrap().records, 0);
}

// Catches a lag that ignores new or partially indexed files.
#[test]
fn lag_counts_unindexed_bytes_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_frames(
        dir.path(),
        "logs",
        "logs-20270101T000000.000000000Z-000001.zst",
        &[vec![log_line(T0, 1, "a", "INFO", "one", json!({}))]],
    );
    let mut index = Index::open(dir.path()).unwrap();
    let size_a = std::fs::metadata(&a).unwrap().len();
    assert_eq!(index.lag().unwrap().bytes, size_a);
    index.catch_up().unwrap();
    assert_eq!(index.lag().unwrap().bytes, 0);
    write_frames(
        dir.path(),
        "logs",
        "logs-20270101T000000.000000000Z-000001.zst",
        &[vec![log_line(T0 + 1, 2, "a", "INFO", "two", json!({}))]],
    );
    let b = write_frames(
        dir.path(),
        "events",
        "events-20270101T000000.000000000Z-000002.zst",
        &[vec![event_line(T0, 3, "data:x", "data:x:y", json!(1))]],
    );
    let lag = index.lag().unwrap();
    assert_eq!(lag.segments, 2);
    assert_eq!(
        lag.bytes,
        std::fs::metadata(&a).unwrap().len() - size_a + std::fs::metadata(&b).unwrap().len()
    );
    index.catch_up().unwrap();
    assert_eq!(index.lag().unwrap(), Default::default());
}

const KILL_CHILD_ENV: &str = "SPILLWAY_INDEX_KILL_CHILD";
const KILL_IDS: u64 = 60_000;

// Catches a checkpoint written outside the transaction of its rows: a real
// child process indexing in small transactions is SIGKILLed three times at
// random points; after a final catch-up every id is present exactly once.
#[test]
fn sigkill_while_indexing_loses_and_duplicates_nothing() {
    if let Ok(dir) = std::env::var(KILL_CHILD_ENV) {
        // Child: index in small transactions, reporting each commit.
        let config = IndexConfig {
            rows_per_transaction: 50,
            ..IndexConfig::default()
        };
        let mut index = Index::open_with(&dir, &config).expect("child open");
        let stdout = std::io::stdout();
        index
            .catch_up_with(&mut |p| {
                let mut out = stdout.lock();
                let _ = writeln!(out, "committed {}", p.records);
                let _ = out.flush();
            })
            .expect("child catch up");
        println!("done");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = SegmentConfig {
        rotate_bytes: 256 << 10,
        retain_bytes: 0,
        ..SegmentConfig::default()
    };
    let (engine, guard) = engine_with_segments(dir.path(), config);
    publish_ids(&engine, 0..KILL_IDS);
    drop(guard);
    let total = segment_lines(dir.path()).len();
    assert_eq!(total as u64, KILL_IDS);

    let mut rng = fastrand::Rng::with_seed(3);
    let mut kills = 0;
    for _round in 0..3 {
        let before = if dir.path().join(INDEX_FILE).exists() {
            count(dir.path(), "SELECT count(*) FROM records") as usize
        } else {
            0
        };
        let stop_after = before + rng.usize(500..6000);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "index::sigkill_while_indexing_loses_and_duplicates_nothing",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(KILL_CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let out = BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            let line = line.unwrap();
            let Some(n) = line.strip_prefix("committed ") else {
                continue;
            };
            if before + n.parse::<usize>().unwrap() >= stop_after {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
                break;
            }
        }
        child.wait().unwrap();
    }
    assert!(kills >= 2, "the child finished before it could be killed");

    let mut index = Index::open(dir.path()).unwrap();
    index.catch_up().unwrap();
    let (rows, distinct, lo, hi): (i64, i64, i64, i64) =
        rusqlite::Connection::open(dir.path().join(INDEX_FILE))
            .unwrap()
            .query_row(
                "SELECT count(*), count(DISTINCT json_extract(payload, '$.id')), \
             min(json_extract(payload, '$.id')), max(json_extract(payload, '$.id')) FROM records",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
    assert_eq!(
        (rows, distinct),
        (KILL_IDS as i64, KILL_IDS as i64),
        "missing or duplicated rows"
    );
    assert_eq!((lo, hi), (0, KILL_IDS as i64 - 1));
    let stats = index.stats().unwrap();
    assert_eq!(stats.prefixes["test:ids"].records, KILL_IDS);
}

// Catches an indexer that dies (or takes the engine down) when another
// connection holds the write lock, and one that does not resume afterwards.
#[test]
fn locked_database_is_reported_and_indexing_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, guard) = engine_with_segments(dir.path(), SegmentConfig::default());
    let config = IndexConfig {
        busy_timeout: Duration::from_millis(50),
        poll_interval: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        ..IndexConfig::default()
    };
    let handle = Indexer::spawn(dir.path(), config).unwrap();
    publish_ids(&engine, 0..100);
    handle.catch_up_now(Duration::from_secs(30)).unwrap();

    let mut locker = rusqlite::Connection::open(dir.path().join(INDEX_FILE)).unwrap();
    let tx = locker
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    publish_ids(&engine, 100..1100);
    let err = handle
        .catch_up_now(Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    assert!(err.contains("locked"), "{err}");
    let status = handle.status();
    assert!(!status.healthy && status.errors >= 1, "{status:?}");
    assert!(
        status.last_error.as_deref().unwrap().contains("index.db"),
        "{status:?}"
    );
    // The segment side kept going.
    publish_ids(&engine, 1100..1200);
    assert_eq!(segment_lines(dir.path()).len(), 1200);

    tx.rollback().unwrap();
    wait_for("the indexer to resume", || {
        handle.catch_up_now(Duration::from_secs(30)).is_ok()
    });
    let status = handle.status();
    assert!(status.healthy, "{status:?}");
    assert_eq!(status.lag.bytes, 0);
    assert_eq!(
        count(
            dir.path(),
            "SELECT count(DISTINCT json_extract(payload, '$.id')) FROM records"
        ),
        1200
    );
    assert_eq!(count(dir.path(), "SELECT count(*) FROM records"), 1200);
    drop(handle);
    drop(guard);
}

// Catches a corrupt index.db stopping indexing for good (or being silently
// overwritten): it is moved aside, kept for inspection, and rebuilt from
// the segments while the engine keeps writing.
#[test]
fn corrupt_index_is_moved_aside_and_rebuilt_from_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, guard) = engine_with_segments(dir.path(), SegmentConfig::default());
    publish_ids(&engine, 0..500);
    {
        let mut index = Index::open(dir.path()).unwrap();
        index.catch_up().unwrap();
    }
    let db = dir.path().join(INDEX_FILE);
    assert!(
        !dir.path().join("index.db-wal").exists()
            || std::fs::metadata(dir.path().join("index.db-wal"))
                .unwrap()
                .len()
                == 0
    );
    let garbage = vec![0xA5u8; 64 << 10];
    std::fs::write(&db, &garbage).unwrap();

    let config = IndexConfig {
        poll_interval: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        ..IndexConfig::default()
    };
    let handle = Indexer::spawn(dir.path(), config).unwrap();
    publish_ids(&engine, 500..1000);
    wait_for("a successful pass", || {
        handle.catch_up_now(Duration::from_secs(30)).is_ok()
    });
    let status = handle.status();
    assert_eq!(status.moved_aside.len(), 1, "{status:?}");
    let aside = &status.moved_aside[0];
    assert!(
        aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("index.db.corrupt-"),
        "{}",
        aside.display()
    );
    assert_eq!(
        std::fs::read(aside).unwrap(),
        garbage,
        "the corrupt file is kept as it was"
    );
    assert!(
        status.errors >= 1 && status.last_error.is_some(),
        "{status:?}"
    );
    assert_eq!(
        count(
            dir.path(),
            "SELECT count(DISTINCT json_extract(payload, '$.id')) FROM records"
        ),
        1000
    );
    assert_eq!(count(dir.path(), "SELECT count(*) FROM records"), 1000);
    drop(handle);
    drop(guard);
}

// Catches a rebuild that differs from incremental indexing (order, batch
// numbers, JSON text), and a rebuild that replaces an index in use.
#[test]
fn reindex_reproduces_the_same_rows_and_refuses_an_index_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, guard) = engine_with_segments(
        dir.path(),
        SegmentConfig {
            rotate_bytes: 64 << 10,
            retain_bytes: 0,
            ..SegmentConfig::default()
        },
    );
    let mut index = Index::open(dir.path()).unwrap();
    for round in 0..4u64 {
        publish_ids(&engine, round * 1000..(round + 1) * 1000);
        for i in 0..200 {
            engine
                .submit_log(log(i, "myapp::db", Level::INFO), false)
                .unwrap();
        }
        engine.flush().unwrap();
        index.catch_up().unwrap();
    }
    drop(guard);
    index.catch_up().unwrap();
    let before = dump(dir.path());
    assert_eq!(before.len(), 4800);

    let err = reindex(dir.path(), &IndexConfig::default(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use"), "{err}");
    drop(index);

    let mut calls = Vec::new();
    let p = reindex(dir.path(), &IndexConfig::default(), &mut |done, total| {
        calls.push((done, total))
    })
    .unwrap();
    assert_eq!(p.records, 4800);
    let (done, total) = *calls.last().unwrap();
    assert_eq!(done, total, "progress ends at the total");
    assert_eq!(dump(dir.path()), before);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("reindex"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// Catches rows that outlive their segment file after retention deletes it.
#[test]
fn retention_removing_a_segment_removes_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_frames(
        dir.path(),
        "events",
        "events-20270101T000000.000000000Z-000001.zst",
        &[(0..10)
            .map(|i| event_line(T0 + i, 1, "data:a", "data:a:x", json!({"id": i})))
            .collect()],
    );
    write_frames(
        dir.path(),
        "events",
        "events-20270101T000001.000000000Z-000002.zst",
        &[(10..15)
            .map(|i| event_line(T0 + i, 2, "data:a", "data:a:x", json!({"id": i})))
            .collect()],
    );
    let mut index = Index::open(dir.path()).unwrap();
    index.catch_up().unwrap();
    assert_eq!(count(dir.path(), "SELECT count(*) FROM records"), 15);
    std::fs::remove_file(&a).unwrap();
    let p = index.catch_up().unwrap();
    assert_eq!(p.segments_removed, 1);
    assert_eq!(count(dir.path(), "SELECT count(*) FROM records"), 5);
    assert_eq!(
        count(
            dir.path(),
            "SELECT min(json_extract(payload, '$.id')) FROM records"
        ),
        10
    );
    assert_eq!(count(dir.path(), "SELECT count(*) FROM segments"), 1);
    assert_eq!(count(dir.path(), "SELECT count(*) FROM batches"), 1);
}

// Catches a damaged frame that stops indexing, is indexed as garbage, or is
// reported again on every pass.
#[test]
fn damaged_frame_is_skipped_once_and_the_rest_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let frames: Vec<Vec<Value>> = (0..3)
        .map(|f| {
            (0..20)
                .map(|i| {
                    event_line(
                        T0 + f * 100 + i,
                        f as u64,
                        "data:a",
                        "data:a:x",
                        json!({"id": f * 100 + i}),
                    )
                })
                .collect()
        })
        .collect();
    let path = write_frames(
        dir.path(),
        "events",
        "events-20270101T000000.000000000Z-000001.zst",
        &frames[..1],
    );
    let first_len = std::fs::metadata(&path).unwrap().len();
    write_frames(
        dir.path(),
        "events",
        "events-20270101T000000.000000000Z-000001.zst",
        &frames[1..],
    );
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[first_len as usize + 20] ^= 0xFF; // inside the second frame
    std::fs::write(&path, &bytes).unwrap();

    let mut index = Index::open(dir.path()).unwrap();
    let p = index.catch_up().unwrap();
    assert_eq!(p.damaged_frames, 1, "{p:?}");
    assert!(
        p.problems[0].contains(&format!("at byte {first_len}")),
        "{:?}",
        p.problems
    );
    assert_eq!(p.records, 40);
    assert_eq!(
        count(
            dir.path(),
            "SELECT count(*) FROM records WHERE json_extract(payload, '$.id') BETWEEN 100 AND 199"
        ),
        0
    );
    assert_eq!(index.catch_up().unwrap().damaged_frames, 0);
    assert_eq!(index.stats().unwrap().damaged_frames, 1);
}

// Catches drop notices counted as records, or their `dropped` lost from stats.
#[test]
fn stats_sum_drop_notices_per_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut notice = log_line(
        T0,
        9,
        "spillway",
        "WARN",
        "5 records dropped on data:users since ...",
        json!({"dropped": 5, "prefix": "data:users", "since_ns": T0}),
    );
    notice["prefix"] = json!("data:users");
    write_frames(
        dir.path(),
        "events",
        "events-20270101T000000.000000000Z-000001.zst",
        &[vec![
            notice,
            event_line(
                T0 + 1,
                9,
                "data:users",
                "data:users:created",
                json!({"id": 1}),
            ),
            event_line(
                T0 + 2,
                9,
                "data:users",
                "data:users:created",
                json!({"id": 2}),
            ),
            event_line(
                T0 + 3,
                10,
                "data:users",
                "data:users:created",
                json!({"id": 3}),
            ),
        ]],
    );
    let mut index = Index::open(dir.path()).unwrap();
    index.catch_up().unwrap();
    let s = index.stats().unwrap();
    let p = &s.prefixes["data:users"];
    assert_eq!((p.records, p.batches, p.dropped), (3, 2, 5));
    assert_eq!((s.records, s.dropped), (4, 5));
    assert_eq!((s.first_ts_ns, s.last_ts_ns), (Some(T0), Some(T0 + 3)));
    assert!(s.index_bytes > 0 && s.segment_bytes > 0 && s.segment_files == 1);
}

// ---------------------------------------------------------------- queries

/// A small known data set with exact timestamps.
fn query_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_frames(
        dir.path(),
        "logs",
        "logs-20270101T000000.000000000Z-000001.zst",
        &[vec![
            log_line(
                T0,
                1,
                "myapp::db",
                "INFO",
                "row written 0",
                json!({"user_id": 42, "table": "users"}),
            ),
            log_line(
                T0 + SEC,
                2,
                "myapp::db",
                "WARN",
                "slow query",
                json!({"user_id": 7, "ms": 250}),
            ),
            log_line(
                T0 + 2 * SEC,
                3,
                "myapp::http",
                "ERROR",
                "request failed: '; DROP TABLE records; --",
                json!({"status": "500", "user_id": "42"}),
            ),
            log_line(
                T0 + 3 * SEC,
                4,
                "myapp::http",
                "DEBUG",
                "debug thing",
                json!({"flag": true}),
            ),
        ]],
    );
    let mut notice = log_line(
        T0 + SEC / 2 - 1,
        9,
        "spillway",
        "WARN",
        "5 records dropped on data:users",
        json!({"dropped": 5, "prefix": "data:users", "since_ns": T0}),
    );
    notice["prefix"] = json!("data:users");
    write_frames(
        dir.path(),
        "events",
        "events-20270101T000000.000000000Z-000002.zst",
        &[vec![
            notice,
            event_line(
                T0 + SEC / 2,
                9,
                "data:users",
                "data:users:created",
                json!({"id": 1, "name": "ann"}),
            ),
            event_line(
                T0 + 3 * SEC / 2,
                10,
                "data:users",
                "data:users:deleted",
                json!({"id": 2}),
            ),
            event_line(
                T0 + 5 * SEC / 2,
                11,
                "sentinel:7",
                "sentinel:7:status",
                json!({"state": "ok"}),
            ),
            event_line(
                T0 + 7 * SEC / 2,
                11,
                "sentinel:7",
                "sentinel:7:x:status",
                json!({"state": "odd"}),
            ),
            event_line(
                T0 + 9 * SEC / 2,
                12,
                "chat:message",
                "chat:message",
                json!({"text": "hello world"}),
            ),
        ]],
    );
    Index::open(dir.path()).unwrap().catch_up().unwrap();
    dir
}

fn names(records: &[spillway::QueryRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| match &r.body {
            spillway::sinks::index::RecordBody::Log { message, .. } => message.clone(),
            spillway::sinks::index::RecordBody::Event { name, .. } => name.clone(),
        })
        .collect()
}

// Catches each filter misapplied: every filter alone, then combined, with
// the exact expected records.
#[test]
fn query_filters_each_select_exactly_their_records() {
    let dir = query_fixture();
    let r = IndexReader::open(dir.path()).unwrap();
    let q = |f: &dyn Fn(&mut Query)| {
        let mut q = Query::default();
        f(&mut q);
        let mut got = names(&r.query(&q).unwrap());
        got.sort();
        got
    };
    let sorted = |v: &[&str]| {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(q(&|_| {}).len(), 10);
    assert_eq!(
        q(&|q| q.since = Some(T0 + 2 * SEC)),
        sorted(&[
            "request failed: '; DROP TABLE records; --",
            "debug thing",
            "sentinel:7:status",
            "sentinel:7:x:status",
            "chat:message"
        ])
    );
    assert_eq!(
        q(&|q| q.until = Some(T0 + SEC)),
        sorted(&[
            "row written 0",
            "5 records dropped on data:users",
            "data:users:created"
        ])
    );
    assert_eq!(
        q(&|q| q.min_level = Some(Level::WARN)),
        sorted(&[
            "slow query",
            "request failed: '; DROP TABLE records; --",
            "5 records dropped on data:users"
        ])
    );
    assert_eq!(
        q(&|q| q.min_level = Some(Level::ERROR)),
        sorted(&["request failed: '; DROP TABLE records; --"])
    );
    assert_eq!(q(&|q| q.min_level = Some(Level::TRACE)).len(), 5);
    let by_prefix = |p: &str| q(&|q| q.prefix = Some(p.into()));
    assert_eq!(
        by_prefix("log:myapp::http"),
        sorted(&["request failed: '; DROP TABLE records; --", "debug thing"])
    );
    assert_eq!(
        by_prefix("myapp::http"),
        by_prefix("log:myapp::http"),
        "a log's target is its name"
    );
    assert_eq!(
        by_prefix("data:*"),
        sorted(&[
            "5 records dropped on data:users",
            "data:users:created",
            "data:users:deleted"
        ])
    );
    assert_eq!(
        by_prefix("data:users:created"),
        sorted(&["data:users:created"])
    );
    assert_eq!(
        by_prefix("sentinel:*:status"),
        sorted(&["sentinel:7:status"]),
        "`*` is one segment"
    );
    assert_eq!(
        by_prefix("sentinel:*"),
        sorted(&["sentinel:7:status", "sentinel:7:x:status"])
    );
    assert_eq!(by_prefix("chat:message"), sorted(&["chat:message"]));
    let grep = |t: &str| q(&|q| q.text = Some(t.into()));
    assert_eq!(grep("hello"), sorted(&["chat:message"]));
    assert_eq!(grep("slow"), sorted(&["slow query"]));
    assert_eq!(
        grep("Slow"),
        Vec::<String>::new(),
        "case-sensitive like grep"
    );
    assert_eq!(grep("x:status"), sorted(&["sentinel:7:x:status"]));
    let field = |k: &str, v: &str| q(&|q| q.fields = vec![(k.into(), v.into())]);
    assert_eq!(
        field("user_id", "42"),
        sorted(&["row written 0", "request failed: '; DROP TABLE records; --"])
    );
    assert_eq!(field("table", "users"), sorted(&["row written 0"]));
    assert_eq!(field("flag", "true"), sorted(&["debug thing"]));
    assert_eq!(
        field("status", "500"),
        sorted(&["request failed: '; DROP TABLE records; --"])
    );
    assert_eq!(field("id", "1"), sorted(&["data:users:created"]));
    assert_eq!(field("name", "ann"), sorted(&["data:users:created"]));
    assert_eq!(field("user_id", "4"), Vec::<String>::new());
    assert_eq!(
        q(&|q| {
            q.min_level = Some(Level::WARN);
            q.prefix = Some("log:myapp::*".into());
        }),
        sorted(&["slow query", "request failed: '; DROP TABLE records; --"]),
        "`log:myapp::*` covers every module of the crate"
    );
    assert_eq!(
        q(&|q| {
            q.min_level = Some(Level::INFO);
            q.since = Some(T0 + 1);
            q.fields = vec![("user_id".into(), "42".into())];
        }),
        sorted(&["request failed: '; DROP TABLE records; --"])
    );
    assert!(Query::default().fields.is_empty());
}

// Catches a wrong order or limit: newest first by default, oldest first on
// request, and the limit applied after ordering.
#[test]
fn query_order_and_limit() {
    let dir = query_fixture();
    let r = IndexReader::open(dir.path()).unwrap();
    let newest = r
        .query(&Query {
            limit: Some(2),
            ..Query::default()
        })
        .unwrap();
    assert_eq!(names(&newest), ["chat:message", "sentinel:7:x:status"]);
    let oldest = r
        .query(&Query {
            limit: Some(2),
            order: Order::Asc,
            ..Query::default()
        })
        .unwrap();
    assert_eq!(
        names(&oldest),
        ["row written 0", "5 records dropped on data:users"]
    );
    let warn = r
        .query(&Query {
            limit: Some(2),
            min_level: Some(Level::WARN),
            ..Query::default()
        })
        .unwrap();
    assert_eq!(
        names(&warn),
        ["request failed: '; DROP TABLE records; --", "slow query"]
    );
    let all = r
        .query(&Query {
            limit: None,
            order: Order::Asc,
            ..Query::default()
        })
        .unwrap();
    let ts: Vec<i64> = all.iter().map(|r| r.ts_ns).collect();
    assert!(
        ts.windows(2).all(|w| w[0] <= w[1]) && ts.len() == 10,
        "{ts:?}"
    );
}

// Catches a glob post-filter that stops at the first page: the one real
// match lies behind more than a page of coarse-GLOB decoys.
#[test]
fn glob_prefix_pages_past_decoys() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = vec![event_line(
        T0,
        1,
        "sentinel:1",
        "sentinel:1:status",
        json!({}),
    )];
    lines.extend((0..1500).map(|i| {
        event_line(
            T0 + 1 + i,
            2,
            "sentinel:1",
            "sentinel:1:deep:status",
            json!({}),
        )
    }));
    write_frames(
        dir.path(),
        "events",
        "events-20270101T000000.000000000Z-000001.zst",
        &[lines],
    );
    let mut index = Index::open(dir.path()).unwrap();
    index.catch_up().unwrap();
    for (level, limit) in [(None, Some(1)), (None, None)] {
        let got = index
            .query(&Query {
                prefix: Some("sentinel:*:status".into()),
                min_level: level,
                limit,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(names(&got), ["sentinel:1:status"]);
    }
}

// Catches a query result that is not shaped like the segment line it came
// from (the CLI's --json promises the same JSON as the segments).
#[test]
fn query_records_serialise_like_their_segment_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, guard) = engine_with_segments(dir.path(), SegmentConfig::default());
    let mut rec = log(1, "myapp::db", Level::WARN);
    rec.spans = vec![std::sync::Arc::new(spillway::SpanRecord {
        name: "req".into(),
        fields: vec![("id".into(), FieldValue::Str("a\"1".into()))],
    })];
    rec.file = None;
    engine.submit_log(rec, true).unwrap();
    engine
        .publish_event(BusEvent::new(
            "data:users:created",
            json!({"id": 42, "tags": ["a", {"b": null}]}),
        ))
        .unwrap();
    engine.flush().unwrap();
    drop(guard);
    let mut lines = segment_lines(dir.path());
    let mut index = Index::open(dir.path()).unwrap();
    index.catch_up().unwrap();
    let mut got: Vec<Value> = index
        .query(&Query::default())
        .unwrap()
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect();
    let key = |v: &Value| v["ts_ns"].as_i64();
    lines.sort_by_key(key);
    got.sort_by_key(key);
    assert_eq!(got, lines);
}

// Catches the level query falling back to a scan of every record (the
// latency target depends on the (level, ts_ns) index).
#[test]
fn level_query_uses_the_level_index() {
    let dir = query_fixture();
    let r = IndexReader::open(dir.path()).unwrap();
    let mut plan = String::new();
    r.sql(
        "EXPLAIN QUERY PLAN SELECT id FROM records r WHERE r.level = 4 AND r.ts_ns >= 0 \
         ORDER BY r.ts_ns DESC, r.id DESC LIMIT 100",
        &mut |_, row| {
            plan.push_str(&row.last().unwrap().to_string());
            Ok(())
        },
    )
    .unwrap();
    assert!(plan.contains("records_by_level_ts"), "{plan}");
    assert!(
        !plan.contains("TEMP B-TREE"),
        "sorted without the index: {plan}"
    );
}

// ---------------------------------------------------------------- sql and injection

// Catches `spillway sql` writing: every kind of write is refused with a
// clear error, and nothing changes.
#[test]
fn sql_refuses_writes() {
    let dir = query_fixture();
    let r = IndexReader::open(dir.path()).unwrap();
    let out = dir.path().join("copy.db");
    for stmt in [
        "DELETE FROM records".to_string(),
        "DROP TABLE records".to_string(),
        "INSERT INTO segments (path, stream) VALUES ('x', 'y')".to_string(),
        "UPDATE records SET message = 'x'".to_string(),
        "CREATE TABLE t (x)".to_string(),
        "WITH a AS (SELECT 1) DELETE FROM records".to_string(),
        "SELECT 1; DROP TABLE records".to_string(),
        "PRAGMA user_version = 5".to_string(),
        format!("VACUUM INTO '{}'", out.display()),
    ] {
        let err = r.sql(&stmt, &mut |_, _| Ok(())).unwrap_err().to_string();
        assert!(
            err.contains("read-only") || err.contains("readonly") || err.contains("one statement"),
            "{stmt}: {err}"
        );
    }
    assert!(!out.exists());
    assert_eq!(count(dir.path(), "SELECT count(*) FROM records"), 10);
    assert_eq!(
        count(dir.path(), "PRAGMA user_version") as usize,
        SCHEMA_VERSION
    );
    let mut rows = Vec::new();
    let cols = r
        .sql(
            "SELECT level, count(*) AS n FROM logs GROUP BY level ORDER BY level",
            &mut |_, row| {
                rows.push(row);
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(cols, ["level", "n"]);
    assert_eq!(rows[0], vec![json!("DEBUG"), json!(1)]);
}

// Catches user text reaching SQL as code: injection-shaped grep, field
// key/value and prefix run as plain data.
#[test]
fn injection_shaped_input_is_harmless() {
    let dir = query_fixture();
    let r = IndexReader::open(dir.path()).unwrap();
    let evil = "'; DROP TABLE records; --";
    let found = r
        .query(&Query {
            text: Some(evil.into()),
            ..Query::default()
        })
        .unwrap();
    assert_eq!(names(&found), ["request failed: '; DROP TABLE records; --"]);
    for q in [
        Query {
            fields: vec![(evil.into(), evil.into())],
            ..Query::default()
        },
        Query {
            fields: vec![("user_id".into(), evil.into())],
            ..Query::default()
        },
        Query {
            prefix: Some(evil.into()),
            ..Query::default()
        },
        Query {
            prefix: Some("a[:*:?%_".into()),
            ..Query::default()
        },
        Query {
            prefix: Some("%".into()),
            ..Query::default()
        },
    ] {
        assert!(r.query(&q).unwrap().is_empty(), "{q:?}");
    }
    let err = r
        .query(&Query {
            prefix: Some("da*ta".into()),
            ..Query::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("da*ta"),
        "an invalid glob is an error quoting it: {err}"
    );
    let err = r
        .query(&Query {
            fields: vec![("a\"b".into(), "1".into())],
            ..Query::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("a\\\"b"), "{err}");
    assert_eq!(count(dir.path(), "SELECT count(*) FROM records"), 10);
}

// ---------------------------------------------------------------- benchmark

/// `cargo test --release --test integration bench_index -- --ignored --nocapture`
/// (`SPILLWAY_BENCH_FULL=1` for 1 M records and a 10 M-row query index).
#[test]
#[ignore = "benchmark"]
fn bench_index() {
    let quick = std::env::var("SPILLWAY_BENCH_FULL").is_err();
    let rows = spillway::sinks::index::bench::run(quick).unwrap();
    let mut seen = BTreeMap::new();
    for (what, ours, peer) in rows {
        println!("{what}: {ours:.3} (vs {peer:.3})");
        seen.insert(what, ours);
    }
    assert!(!seen.is_empty());
}

// ---------------------------------------------------------------- CLI

// The CLI's commands, compiled into this test binary from their sources.
#[allow(dead_code)]
#[path = "../cli/query.rs"]
mod query;
#[allow(dead_code)]
#[path = "../cli/sql.rs"]
mod sql;
#[allow(dead_code)]
#[path = "../cli/stats.rs"]
mod stats;
// `query` reaches `super::tail` as in the binary; tests/segments.rs keeps
// its own private copy of `tail`, hence the second load.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "../cli/tail.rs"]
mod tail;

/// Parses a subcommand's arguments as the CLI does.
fn cli_args<A: clap::Args>(argv: &[&str]) -> A {
    #[derive(clap::Parser)]
    struct Cli<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    use clap::Parser;
    Cli::<A>::try_parse_from(std::iter::once("spillway").chain(argv.iter().copied()))
        .expect("valid arguments")
        .args
}

// Catches `spillway query` flags not reaching the query, `--json` not
// printing the segment format, and a table whose rows are out of order.
#[test]
fn cli_query_prints_json_lines_or_an_ordered_table() {
    let dir = query_fixture();
    let d = dir.path().to_str().unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let args: query::QueryArgs = cli_args(&[d, "--level", "warn", "--since", "10m", "--json"]);
    query::run_with(&args, &mut out, &mut err).unwrap();
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let levels: Vec<&str> = lines.iter().map(|l| l["level"].as_str().unwrap()).collect();
    assert_eq!(levels, ["WARN", "WARN", "ERROR"], "oldest first");
    assert_eq!(lines[1]["message"], "slow query");
    assert_eq!(lines[1]["fields"], json!({"user_id": 7, "ms": 250}));
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));

    let mut out = Vec::new();
    let args: query::QueryArgs =
        cli_args(&[d, "--prefix", "data:*", "--field", "id=2", "--limit", "5"]);
    query::run_with(&args, &mut out, &mut Vec::new()).unwrap();
    let text = String::from_utf8(out).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows[0].starts_with("TIME ") && rows[1].contains("data:users:deleted"),
        "{text}"
    );
    assert_eq!(
        rows[0].find("PREFIX"),
        rows[1].find("data:users "),
        "aligned: {text}"
    );

    let args: query::QueryArgs = cli_args(&[d, "--level", "loud"]);
    let e = query::run_with(&args, &mut Vec::new(), &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("loud"), "{e}");
}

// Catches `spillway sql` writing through the CLI, and rows printed without
// their column names.
#[test]
fn cli_sql_prints_rows_and_refuses_writes() {
    let dir = query_fixture();
    let d = dir.path().to_str().unwrap();
    let mut out = Vec::new();
    let args: sql::SqlArgs = cli_args(&[d, "SELECT name, json_extract(payload, '$.id') AS id FROM events WHERE name LIKE 'data:%' ORDER BY ts_ns", "--json"]);
    sql::run_with(&args, &mut out).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"name\":\"data:users:created\",\"id\":1}\n{\"name\":\"data:users:deleted\",\"id\":2}\n"
    );
    let args: sql::SqlArgs = cli_args(&[d, "DROP TABLE records"]);
    let e = sql::run_with(&args, &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert_eq!(count(dir.path(), "SELECT count(*) FROM records"), 10);
}

// Catches `spillway stats` losing prefixes or the drop count.
#[test]
fn cli_stats_prints_prefixes_and_drops() {
    let dir = query_fixture();
    let d = dir.path().to_str().unwrap();
    let mut out = Vec::new();
    stats::run_with(&cli_args(&[d]), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("5 dropped"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("data:users"))
        .expect(&text);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[1..4],
        ["2", "2", "5"],
        "records, batches, dropped: {text}"
    );
    let mut out = Vec::new();
    stats::run_with(&cli_args(&[d, "--json"]), &mut out).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["prefixes"]["log:myapp::db"]["records"], 2);
    assert_eq!(v["lag"]["bytes"], 0);
}
