//! Segment files: format, rotation, retention, crash recovery, damage and
//! follow mode, through the public API and real files.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};
use spillway::sinks::segment::reader::{ReadItem, SegmentReader};
use spillway::sinks::segment::{list_segments, SegmentConfig, SegmentSink, Stream};
use spillway::{BatchConfig, Engine, FieldValue, Level, LogRecord, Policy};

/// A batch config where `test:*` batches by 10 ms / 100 events.
fn batch_config() -> BatchConfig {
    BatchConfig::builder()
        .policy(
            "test:*",
            Policy::batch(std::time::Duration::from_millis(10), 100),
        )
        .build()
        .expect("config")
}

fn log(i: u64, level: Level) -> LogRecord {
    LogRecord {
        ts_ns: spillway::now_ns(),
        level,
        target: Cow::Borrowed("myapp::db"),
        module_path: Some(Cow::Borrowed("myapp::db")),
        file: Some(Cow::Borrowed("src/db.rs")),
        line: Some(42),
        message: format!("row written {i}"),
        fields: vec![(Cow::Borrowed("id"), FieldValue::U64(i))],
        spans: Vec::new(),
    }
}

/// Every line of every segment under `dir`, read with the crate's reader;
/// panics on damage.
fn read_all(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for item in SegmentReader::open(dir).expect("open reader") {
        match item.expect("read") {
            ReadItem::Frame(f) => {
                for l in f.lines {
                    out.push(serde_json::from_str(&l).expect("line is JSON"));
                }
            }
            ReadItem::Damage(d) => panic!("unexpected damage: {d}"),
        }
    }
    out
}

/// Decodes a whole file the way `zstd -dc` does: a plain streaming decoder
/// over all its frames.
fn zstd_dc(path: &Path) -> String {
    let file = std::fs::File::open(path).expect("open segment");
    let mut dec = zstd::stream::read::Decoder::new(file).expect("decoder");
    let mut text = String::new();
    dec.read_to_string(&mut text)
        .expect("plain zstd decodes the file");
    text
}

// Catches segments that only our own reader understands (the format promise
// is "any zstd tool reads them"), a stream mix-up, or missing fields.
#[test]
fn segments_decode_with_a_plain_zstd_decoder_and_carry_the_format_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = SegmentSink::open(dir.path(), SegmentConfig::default()).expect("open sink");
    let (engine, guard) = Engine::builder(batch_config())
        .sink(Box::new(sink))
        .build()
        .expect("engine");
    for i in 0..500u64 {
        engine
            .publish("test:users:created", json!({ "id": i }))
            .expect("publish");
        engine.submit_log(log(i, Level::INFO), false).expect("log");
    }
    engine
        .publish_sample("gpu:0:util", json!({ "util_percent": 50 }))
        .expect("sample");
    drop(guard);

    let files = list_segments(dir.path()).expect("list");
    let streams: HashSet<_> = files.iter().filter_map(|p| Stream::of_file(p)).collect();
    assert_eq!(streams.len(), 3, "{files:?}");
    let mut events = 0;
    let mut logs = 0;
    for path in &files {
        let stream = Stream::of_file(path).expect("stream");
        for line in zstd_dc(path).lines() {
            let v: Value = serde_json::from_str(line).expect("JSON line");
            assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
            assert!(v["ts_ns"].as_i64().is_some(), "{v}");
            assert!(v["batch"].as_u64().is_some(), "{v}");
            assert!(v["prefix"].as_str().is_some(), "{v}");
            match (stream, v["kind"].as_str()) {
                (Stream::Events, Some("event")) => {
                    assert_eq!(v["name"], "test:users:created");
                    assert_eq!(v["prefix"], "test:users");
                    assert!(v["payload"]["id"].as_u64().is_some());
                    events += 1;
                }
                (Stream::Logs, Some("log")) => {
                    assert!(
                        v["prefix"]
                            .as_str()
                            .is_some_and(|p| p.starts_with("log:myapp")),
                        "{v}"
                    );
                    assert_eq!(v["target"], "myapp::db");
                    assert_eq!(v["level"], "INFO");
                    assert_eq!(v["file"], "src/db.rs");
                    assert_eq!(v["line"], 42);
                    assert!(v["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("row written")));
                    assert!(v["fields"]["id"].as_u64().is_some());
                    assert!(v["spans"].as_array().is_some());
                    logs += 1;
                }
                (Stream::Telemetry, Some("sample" | "summary")) => {}
                other => panic!("unexpected record {other:?} in {}: {v}", path.display()),
            }
        }
    }
    assert_eq!((events, logs), (500, 500));
    assert_eq!(read_all(dir.path()).len(), zstd_lines(&files));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("segments")), 0o700);
        assert_eq!(mode(&Stream::Logs.dir(dir.path())), 0o700);
        for f in &files {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
    }
}

fn zstd_lines(files: &[std::path::PathBuf]) -> usize {
    files.iter().map(|f| zstd_dc(f).lines().count()).sum()
}
