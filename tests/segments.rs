//! Segment files: format, rotation, retention, crash recovery, damage and
//! follow mode, through the public API and real files.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};
use spillway::sinks::segment::reader::{ReadItem, SegmentReader};
use spillway::sinks::segment::{list_segments, SegmentConfig, SegmentSink, Stream};
use spillway::{BatchConfig, Damage, Engine, FieldValue, FrameReader, Level, LogRecord, Policy};

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

// Catches records lost, repeated or reordered where one prefix's batches
// switch between the two forms a log record can take on its way to the
// segment writer: `tracing` events reach it as captured (no `LogRecord`
// built), records given to `Engine::submit_log` as built records. Every
// switch closes the batch; the stream must still read back in order, with
// each line complete.
#[test]
fn captured_and_built_log_records_keep_their_order() {
    use tracing_subscriber::layer::SubscriberExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, guard) = Engine::builder(BatchConfig::default())
        .sink(Box::new(
            SegmentSink::open(dir.path(), SegmentConfig::default()).expect("open"),
        ))
        .build()
        .expect("engine");
    let subscriber = tracing_subscriber::registry().with(spillway::SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..300_u64 {
            if i % 7 == 3 || i % 11 == 0 {
                let mut rec = log(i, Level::INFO);
                rec.target = Cow::Borrowed("mixed::t");
                engine.submit_log(rec, false).expect("submit");
            } else {
                tracing::info!(target: "mixed::t", id = i, "row written {i}");
            }
        }
    });
    engine.flush().expect("flush");
    drop(guard);
    let lines = read_all(dir.path());
    let ids: Vec<u64> = lines
        .iter()
        .filter(|l| l["target"] == "mixed::t")
        .map(|l| {
            assert_eq!(
                l["message"],
                format!("row written {}", l["fields"]["id"]),
                "{l}"
            );
            l["fields"]["id"].as_u64().expect("id")
        })
        .collect();
    assert_eq!(ids, (0..300).collect::<Vec<_>>());
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

/// The `payload.id` of every event line, in reading order, and the damage
/// reported; `reader` must not follow.
fn event_ids_and_damage(reader: SegmentReader) -> (Vec<u64>, Vec<Damage>) {
    let mut ids = Vec::new();
    let mut damage = Vec::new();
    for item in reader {
        match item.expect("read") {
            ReadItem::Frame(f) => ids.extend(f.lines.iter().filter_map(|l| event_id(l))),
            ReadItem::Damage(d) => damage.push(d),
        }
    }
    (ids, damage)
}

fn event_id(line: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(line).expect("line is JSON");
    match v["kind"].as_str() {
        Some("event") => v["payload"]["id"].as_u64(),
        _ => None,
    }
}

const CRASH_CHILD_ENV: &str = "SPILLWAY_TEST_SEGMENTS_CRASH_CHILD";

/// Child mode of the kill test: floods an engine with a segment sink,
/// announcing on stdout `P n` before publishing ids below n and `F n` once
/// `flush()` has returned for them. Runs until killed.
fn crash_child(dir: &Path) -> ! {
    let sink = SegmentSink::open(dir, SegmentConfig::default()).expect("child: open sink");
    let (engine, _guard) = Engine::builder(batch_config())
        .sink(Box::new(sink))
        .build()
        .expect("child: engine");
    let mut next = 0u64;
    loop {
        let end = next + 500;
        println!("P {end}");
        for i in next..end {
            engine
                .publish("test:crash:item", json!({ "id": i }))
                .expect("child: publish");
            if i % 10 == 0 {
                engine
                    .submit_log(log(i, Level::INFO), false)
                    .expect("child: log");
            }
        }
        engine.flush().expect("child: flush");
        println!("F {end}");
        next = end;
    }
}

// Catches flushed records lost by kill -9, records that were never
// published appearing (garbage read as records), duplicates, and recovery
// that reports (or cuts) anything but the torn tail.
#[test]
fn kill_9_mid_flood_keeps_every_flushed_record() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) {
        crash_child(Path::new(&dir));
    }
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "segments::kill_9_mid_flood_keeps_every_flushed_record",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut published, mut flushed) = (0u64, 0u64);
    let mut note = |line: &str| {
        if let Some(n) = line.strip_prefix("P ").and_then(|n| n.parse().ok()) {
            published = n;
        } else if let Some(n) = line.strip_prefix("F ").and_then(|n| n.parse().ok()) {
            flushed = n;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut progress = 0;
    while progress < 20_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                note(&line);
                progress = line
                    .strip_prefix("F ")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(progress);
            }
            Err(e) => {
                let _ = child.kill();
                panic!("child made no progress ({e:?}) after {progress} flushed records");
            }
        }
    }
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap child");
    lines.join().expect("stdout reader");
    for line in rx.try_iter() {
        note(&line);
    }
    assert!(flushed >= 20_000 && published >= flushed);

    let sink = SegmentSink::open(dir.path(), SegmentConfig::default()).expect("reopen");
    for d in sink.recovered() {
        let stream = Stream::of_file(&d.path).expect("segment file");
        let files = spillway::sinks::segment::list_stream(dir.path(), stream).expect("list");
        let len = std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0);
        assert!(
            files.last() == Some(&d.path) || !d.path.exists(),
            "damage outside the newest file: {d}"
        );
        assert_eq!(d.offset, len, "the cut is at the new end: {d}");
    }
    drop(sink);
    let (ids, damage) = event_ids_and_damage(SegmentReader::open(dir.path()).expect("reader"));
    assert!(damage.is_empty(), "damage after recovery: {damage:?}");
    let mut seen = HashSet::new();
    for id in &ids {
        assert!(
            *id < published,
            "id {id} was never published (< {published})"
        );
        assert!(seen.insert(*id), "id {id} appears twice");
    }
    let missing: Vec<u64> = (0..flushed).filter(|i| !seen.contains(i)).take(5).collect();
    assert!(missing.is_empty(), "flushed but lost: {missing:?}...");
}

/// A data dir whose events stream holds one file of many small frames
/// (ids 0..n); returns the file.
fn many_frames(dir: &Path, n: u64) -> std::path::PathBuf {
    let config = SegmentConfig {
        max_frame_bytes: 1500,
        ..SegmentConfig::default()
    };
    let sink = SegmentSink::open(dir, config).expect("open sink");
    let (engine, guard) = Engine::builder(batch_config())
        .sink(Box::new(sink))
        .build()
        .expect("engine");
    for i in 0..n {
        engine
            .publish("test:users:created", json!({ "id": i }))
            .expect("publish");
    }
    drop(guard);
    let files = spillway::sinks::segment::list_stream(dir, Stream::Events).expect("list");
    assert_eq!(files.len(), 1);
    files[0].clone()
}

// Catches a damaged frame that stops the reader (records after it lost),
// goes unreported, or is reported without file and offset.
#[test]
fn a_flipped_byte_in_a_middle_frame_costs_only_that_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = many_frames(dir.path(), 400);
    let mut reader = FrameReader::open(&file, 0).expect("frame reader");
    let frames: Vec<_> = std::iter::from_fn(|| reader.next_frame())
        .map(|f| f.expect("clean frame"))
        .collect();
    assert!(frames.len() >= 5, "{} frames", frames.len());
    let bad = &frames[frames.len() / 2];
    let lost: HashSet<u64> = bad.lines.iter().filter_map(|l| event_id(l)).collect();
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[((bad.offset + bad.end) / 2) as usize] ^= 0x10;
    std::fs::write(&file, &bytes).expect("write");

    let (ids, damage) = event_ids_and_damage(SegmentReader::open(dir.path()).expect("reader"));
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!((&damage[0].path, damage[0].offset), (&file, bad.offset));
    assert!(
        damage[0]
            .to_string()
            .starts_with(&format!("{} at byte {}: ", file.display(), bad.offset)),
        "{}",
        damage[0]
    );
    let expected: Vec<u64> = (0..400).filter(|i| !lost.contains(i)).collect();
    assert_eq!(ids, expected);
}

/// Polls `reader` until `done(ids)` or the deadline; returns the event ids
/// seen and the damage reported.
fn follow_until(
    mut reader: SegmentReader,
    done: impl Fn(&[u64]) -> bool,
) -> (Vec<u64>, Vec<Damage>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mut ids, mut damage) = (Vec::new(), Vec::new());
    while !done(&ids) && std::time::Instant::now() < deadline {
        match reader.poll().expect("poll") {
            Some(ReadItem::Frame(f)) => ids.extend(f.lines.iter().filter_map(|l| event_id(l))),
            Some(ReadItem::Damage(d)) => damage.push(d),
            None => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
    (ids, damage)
}

// Catches a follower that misses records written after it started, stops
// at a rotation, or reports the writer's in-progress frames as damage.
#[test]
fn follow_mode_sees_appended_records_across_rotations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SegmentConfig {
        max_frame_bytes: 1000,
        rotate_bytes: 3000,
        ..SegmentConfig::default()
    };
    let sink = SegmentSink::open(dir.path(), config).expect("open sink");
    let (engine, guard) = Engine::builder(batch_config())
        .sink(Box::new(sink))
        .build()
        .expect("engine");
    let reader = SegmentReader::open(dir.path())
        .expect("reader")
        .follow(true);
    let n = 1000u64;
    let follower = std::thread::spawn(move || follow_until(reader, |ids| ids.len() as u64 >= n));
    for round in 0..20 {
        for i in round * 50..(round + 1) * 50 {
            engine
                .publish("test:users:created", json!({ "id": i }))
                .expect("publish");
        }
        engine.flush().expect("flush");
    }
    let (ids, damage) = follower.join().expect("follower");
    drop(guard);
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(ids, (0..n).collect::<Vec<_>>());
    let files = spillway::sinks::segment::list_stream(dir.path(), Stream::Events).expect("list");
    assert!(files.len() >= 3, "no rotation happened: {files:?}");
}

// Catches a follower that errors, reports damage, or goes backwards when
// retention deletes files under it.
#[test]
fn a_follower_copes_with_retention_deleting_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SegmentConfig {
        max_frame_bytes: 800,
        rotate_bytes: 1600,
        retain_bytes: 4000,
        ..SegmentConfig::default()
    };
    let sink = SegmentSink::open(dir.path(), config).expect("open sink");
    let (engine, guard) = Engine::builder(batch_config())
        .sink(Box::new(sink))
        .build()
        .expect("engine");
    let n = 3000u64;
    for i in 0..n / 2 {
        engine
            .publish("test:users:created", json!({ "id": i }))
            .expect("publish");
    }
    engine.flush().expect("flush");
    let reader = SegmentReader::open(dir.path())
        .expect("reader")
        .follow(true)
        .poll_interval(std::time::Duration::from_millis(1));
    let follower =
        std::thread::spawn(move || follow_until(reader, |ids| ids.last() == Some(&(n - 1))));
    for i in n / 2..n {
        engine
            .publish("test:users:created", json!({ "id": i }))
            .expect("publish");
        if i % 100 == 0 {
            engine.flush().expect("flush");
        }
    }
    engine.flush().expect("flush");
    let (ids, damage) = follower.join().expect("follower");
    drop(guard);
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(ids.last(), Some(&(n - 1)), "the newest record was reached");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids go forward only");
    assert!(ids.len() < n as usize, "retention deleted nothing");
}

// Property test: catches panics, endless loops and garbage lines on any
// input. Thousands of inputs: random bytes, and real segments with flipped
// bytes, truncations, insertions and splices, read from random offsets.
// Every line returned must be a JSON object that the original file holds.
#[test]
fn the_reader_survives_arbitrary_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base_dir = dir.path().join("base");
    let file = many_frames(&base_dir, 150);
    let base = std::fs::read(&file).expect("read base");
    let known: HashSet<String> = {
        let mut r = FrameReader::open(&file, 0).expect("reader");
        std::iter::from_fn(|| r.next_frame())
            .flat_map(|f| f.expect("clean").lines)
            .collect()
    };
    let seed = std::env::var("SPILLWAY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_5E65);
    let mut rng = fastrand::Rng::with_seed(seed);
    let case_dir = dir.path().join("case");
    let case_stream = Stream::Events.dir(&case_dir);
    std::fs::create_dir_all(&case_stream).expect("mkdir");
    let path = case_stream.join(file.file_name().expect("name"));
    for case in 0..3000 {
        let bytes = mutate(&mut rng, &base, case);
        std::fs::write(&path, &bytes).expect("write case");
        let len = bytes.len() as u64;
        let start = if rng.bool() { 0 } else { rng.u64(0..=len) };
        let context = format!("seed {seed} case {case} start {start}");
        let mut reader = FrameReader::open(&path, start).expect("open case");
        let mut last_end = start;
        for step in 0.. {
            assert!(step < 10_000, "no progress: {context}");
            match reader.next_frame() {
                None => break,
                Some(Ok(f)) => {
                    assert!(f.offset >= last_end && f.end <= len, "{context}");
                    last_end = f.end;
                    for l in &f.lines {
                        assert!(known.contains(l), "garbage line {l:?}: {context}");
                    }
                }
                Some(Err(d)) => {
                    assert!(d.offset >= last_end && d.offset < len, "{d}: {context}");
                    last_end = d.offset;
                }
            }
        }
        for item in SegmentReader::open(&case_dir)
            .expect("dir reader")
            .take(10_000)
        {
            if let ReadItem::Frame(f) = item.expect("dir read") {
                assert!(f.lines.iter().all(|l| known.contains(l)), "{context}");
            }
        }
    }
}

fn mutate(rng: &mut fastrand::Rng, base: &[u8], case: usize) -> Vec<u8> {
    let mut b = base.to_vec();
    match case % 6 {
        0 => return (0..rng.usize(0..4096)).map(|_| rng.u8(..)).collect(),
        1 => {
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..b.len());
                b[i] ^= 1 << rng.u8(0..8);
            }
        }
        2 => b.truncate(rng.usize(..=b.len())),
        3 => {
            let at = rng.usize(..=b.len());
            let junk: Vec<u8> = (0..rng.usize(1..300)).map(|_| rng.u8(..)).collect();
            b.splice(at..at, junk);
        }
        4 => {
            // Splice pieces of the file together at random points.
            let mut out = Vec::new();
            for _ in 0..rng.usize(1..6) {
                let s = rng.usize(..b.len());
                let e = rng.usize(s..=b.len());
                out.extend_from_slice(&b[s..e]);
            }
            b = out;
        }
        _ => {
            // Magic numbers sprinkled over the file.
            for _ in 0..rng.usize(1..6) {
                let i = rng.usize(..b.len().saturating_sub(4).max(1));
                let end = (i + 4).min(b.len());
                b[i..end].copy_from_slice(&[0x28, 0xB5, 0x2F, 0xFD][..end - i]);
            }
        }
    }
    b
}

/// Captures the segment encoding of every batch, for the measurement.
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl spillway::Sink for Capture {
    fn write_batch(&mut self, batch: &spillway::Batch) -> spillway::Result<()> {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        spillway::sinks::segment::encode::encode_batch(batch, &mut out);
        Ok(())
    }
    fn flush(&mut self) -> spillway::Result<()> {
        Ok(())
    }
}

/// Realistic JSON log lines (several modules, typed fields, a span, numbers
/// that vary), encoded exactly as the segment writer encodes them.
fn realistic_log_lines(n: u64) -> Vec<u8> {
    use std::sync::Arc;
    let out = Arc::new(std::sync::Mutex::new(Vec::new()));
    let config = BatchConfig::builder()
        .memory_budget(256 << 20)
        .build()
        .expect("config");
    let (engine, guard) = Engine::builder(config)
        .sink(Box::new(Capture(out.clone())))
        .build()
        .expect("engine");
    let mut rng = fastrand::Rng::with_seed(7);
    let targets = ["myapp::db", "myapp::indexer", "myapp::http", "myapp::gpu"];
    let tables = ["users", "sessions", "files", "chunks"];
    let span = Arc::new(spillway::SpanRecord {
        name: Cow::Borrowed("request"),
        fields: vec![(Cow::Borrowed("id"), FieldValue::Str("7f3a9c21".into()))],
    });
    for i in 0..n {
        let t = rng.usize(..targets.len());
        let (message, fields) = match t {
            0 => (
                format!("row written {}", rng.u64(..1_000_000)),
                vec![
                    (
                        Cow::Borrowed("user_id"),
                        FieldValue::U64(rng.u64(..100_000)),
                    ),
                    (
                        Cow::Borrowed("table"),
                        FieldValue::Str(tables[rng.usize(..4)].into()),
                    ),
                    (Cow::Borrowed("op"), FieldValue::Str("insert".into())),
                ],
            ),
            1 => (
                format!(
                    "indexed src/module_{}/file_{}.rs",
                    rng.u32(..50),
                    rng.u32(..2000)
                ),
                vec![
                    (Cow::Borrowed("bytes"), FieldValue::U64(rng.u64(..200_000))),
                    (
                        Cow::Borrowed("elapsed_ms"),
                        FieldValue::F64(rng.f64() * 20.0),
                    ),
                ],
            ),
            2 => (
                format!("GET /api/users/{} 200", rng.u32(..100_000)),
                vec![(
                    Cow::Borrowed("latency_us"),
                    FieldValue::U64(rng.u64(100..50_000)),
                )],
            ),
            _ => (
                "sample taken".to_string(),
                vec![
                    (Cow::Borrowed("gpu"), FieldValue::U64(0)),
                    (
                        Cow::Borrowed("util_percent"),
                        FieldValue::F64(rng.f64() * 100.0),
                    ),
                ],
            ),
        };
        let rec = LogRecord {
            ts_ns: spillway::now_ns(),
            level: if i % 50 == 0 {
                Level::DEBUG
            } else {
                Level::INFO
            },
            target: Cow::Borrowed(targets[t]),
            module_path: Some(Cow::Borrowed(targets[t])),
            file: Some(Cow::Borrowed("src/lib.rs")),
            line: Some(100 + t as u32),
            message,
            fields,
            spans: vec![span.clone()],
        };
        engine.submit_log(rec, false).expect("log");
    }
    drop(guard);
    let buf = out.lock().unwrap_or_else(|e| e.into_inner()).clone();
    buf
}

// Measurement, not a check: zstd level 1 vs 3 and frame sizes on realistic
// log lines. Run with
// `cargo test --release --test integration segments::measure_compression -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run with --release --ignored --nocapture"]
fn measure_compression() {
    use std::time::Instant;
    let text = realistic_log_lines(400_000);
    let mb = text.len() as f64 / 1e6;
    let count = text.iter().filter(|b| **b == b'\n').count();
    println!(
        "{count} lines, {mb:.1} MB, {:.0} bytes/line",
        text.len() as f64 / count as f64
    );
    for level in [1, 3] {
        for frame in [16 << 10, 64 << 10, 256 << 10, 1 << 20] {
            let mut c = zstd::bulk::Compressor::new(level).expect("zstd");
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .expect("checksum");
            let mut out = Vec::new();
            let mut written = 0usize;
            let t = Instant::now();
            let mut rest = &text[..];
            while !rest.is_empty() {
                let cut = if rest.len() <= frame {
                    rest.len()
                } else {
                    rest[..frame]
                        .iter()
                        .rposition(|b| *b == b'\n')
                        .map_or(rest.len(), |i| i + 1)
                };
                out.clear();
                out.reserve(zstd::zstd_safe::compress_bound(cut));
                c.compress_to_buffer(&rest[..cut], &mut out)
                    .expect("compress");
                written += out.len();
                rest = &rest[cut..];
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "level {level} frame {:>5} KiB: ratio {:5.2}x, {:6.0} MB/s in",
                frame >> 10,
                text.len() as f64 / written as f64,
                mb / secs
            );
        }
    }
    // Reading back: FrameReader (decompress, verify, split, validate JSON).
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("logs-measure-000001.zst");
    let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .expect("checksum");
    let mut whole = Vec::new();
    let mut rest = &text[..];
    while !rest.is_empty() {
        let cut = rest[..rest.len().min(256 << 10)]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        whole.extend(c.compress(&rest[..cut]).expect("compress"));
        rest = &rest[cut..];
    }
    std::fs::write(&path, &whole).expect("write");
    let t = Instant::now();
    let mut r = FrameReader::open(&path, 0).expect("reader");
    let lines: usize = std::iter::from_fn(|| r.next_frame())
        .map(|f| f.expect("frame").lines.len())
        .sum();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "FrameReader: {lines} lines, {:.0} MB/s of JSON lines, {:.2} M lines/s",
        mb / secs,
        lines as f64 / secs / 1e6
    );
    // End to end: bus events through an engine, with the segment sink and,
    // as the peer in the same run, without any sink.
    let n = 1_000_000u64;
    let flood = |engine: &Engine| {
        let t = Instant::now();
        for i in 0..n {
            engine
                .publish("data:users:created", json!({ "id": i, "table": "users" }))
                .expect("publish");
        }
        engine.flush().expect("flush");
        t.elapsed().as_secs_f64()
    };
    let (engine, guard) = Engine::builder(BatchConfig::default())
        .build()
        .expect("engine");
    let bare = flood(&engine);
    drop(guard);
    let data = tempfile::tempdir().expect("tempdir");
    let sink = SegmentSink::open(data.path(), SegmentConfig::default()).expect("sink");
    let (engine, guard) = Engine::builder(BatchConfig::default())
        .sink(Box::new(sink))
        .build()
        .expect("engine");
    let secs = flood(&engine);
    drop(guard);
    let bytes: u64 = list_segments(data.path())
        .expect("list")
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "Engine + SegmentSink: {:.2} M events/s ({:.2}x the engine without sinks: {:.2} M/s), \
         {:.1} bytes/event on disk",
        n as f64 / secs / 1e6,
        bare / secs,
        n as f64 / bare / 1e6,
        bytes as f64 / n as f64
    );
}

/// `spillway tail`, compiled into this test binary from the CLI's source.
#[path = "../cli/tail.rs"]
mod tail;

/// Parses `spillway tail` arguments as the CLI does.
fn tail_args(argv: &[&str]) -> tail::TailArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        tail: tail::TailArgs,
    }
    use clap::Parser;
    let argv = std::iter::once("tail").chain(argv.iter().copied());
    Cli::try_parse_from(argv).expect("valid arguments").tail
}

/// Runs `spillway tail` without colour; returns (stdout, stderr).
fn run_tail(argv: &[&str]) -> (String, String) {
    let args = tail_args(argv);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    tail::run_with(&args, &mut out, &mut err, false).expect("tail runs");
    (
        String::from_utf8(out).expect("utf-8 stdout"),
        String::from_utf8(err).expect("utf-8 stderr"),
    )
}

/// A data dir with 3 events, an INFO log with a span and fields, and a WARN log.
fn tail_fixture(dir: &Path) {
    let sink = SegmentSink::open(dir, SegmentConfig::default()).expect("open sink");
    let (engine, guard) = Engine::builder(batch_config())
        .sink(Box::new(sink))
        .build()
        .expect("engine");
    for i in 0..3 {
        engine
            .publish("test:users:created", json!({ "id": i }))
            .expect("publish");
    }
    let mut info = log(7, Level::INFO);
    info.message = "row written".into();
    info.fields
        .push((Cow::Borrowed("table"), FieldValue::Str("users".into())));
    info.spans.push(std::sync::Arc::new(spillway::SpanRecord {
        name: Cow::Borrowed("request"),
        fields: vec![(Cow::Borrowed("rid"), FieldValue::Str("7f3a".into()))],
    }));
    engine.submit_log(info, false).expect("log");
    let mut warn = log(8, Level::WARN);
    warn.message = "disk almost full".into();
    engine.submit_log(warn, true).expect("log");
    drop(guard);
}

// Catches a human format that drifts from tracing's fmt layer (level column,
// spans, target, typed fields) or events printed without name and payload.
#[test]
fn tail_prints_logs_like_the_fmt_layer_and_events_with_their_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    tail_fixture(dir.path());
    let (out, err) = run_tail(&[dir.path().to_str().expect("utf-8 path")]);
    assert_eq!(err, "");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    let info = lines
        .iter()
        .find(|l| l.contains("row written"))
        .expect("info line");
    let (ts, rest) = info.split_once(' ').expect("timestamp");
    assert_eq!(ts.len(), "2026-12-03T16:20:01.123456Z".len(), "{info}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{info}");
    assert_eq!(
        rest,
        r#" INFO request{rid="7f3a"}: myapp::db: row written id=7 table="users""#
    );
    assert!(lines
        .iter()
        .any(|l| l.ends_with(" WARN myapp::db: disk almost full id=8")));
    assert!(lines
        .iter()
        .any(|l| l.ends_with(r#" EVENT test:users:created {"id":1}"#)));
}

// Catches filters that let the wrong records through (or none at all).
#[test]
fn tail_filters_by_level_prefix_grep_and_since() {
    let dir = tempfile::tempdir().expect("tempdir");
    tail_fixture(dir.path());
    let d = dir.path().to_str().expect("utf-8 path");
    let (out, _) = run_tail(&[d, "--level", "warn"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("disk almost full"));
    let (out, _) = run_tail(&[d, "--prefix", "test:*"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.lines().all(|l| l.contains("EVENT test:users:created")));
    let (out, _) = run_tail(&[d, "--prefix", "log:*", "--grep", "table=\"users\""]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (out, _) = run_tail(&[d, "--since", "1h"]);
    assert_eq!(out.lines().count(), 5, "{out}");
    let (out, _) = run_tail(&[d, "--since", "2200-01-01T00:00:00Z"]);
    assert_eq!(out, "");
}

// Catches --json printing anything but the stored lines.
#[test]
fn tail_json_prints_the_stored_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    tail_fixture(dir.path());
    let (out, _) = run_tail(&[dir.path().to_str().expect("utf-8 path"), "--json"]);
    let stored: Vec<String> = read_all(dir.path()).iter().map(Value::to_string).collect();
    let printed: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON").to_string())
        .collect();
    assert_eq!(printed, stored);
}

// Catches damage that is swallowed silently or that stops the output.
#[test]
fn tail_reports_damage_on_stderr_and_prints_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = many_frames(dir.path(), 400);
    let mut bytes = std::fs::read(&file).expect("read");
    let mut r = FrameReader::open(&file, 0).expect("reader");
    let second = r
        .next_frame()
        .and_then(|_| r.next_frame())
        .expect("two frames");
    let second = second.expect("clean");
    bytes[(second.offset + 8) as usize] ^= 0xFF;
    std::fs::write(&file, &bytes).expect("write");
    let (out, err) = run_tail(&[file.to_str().expect("utf-8 path")]);
    assert!(
        err.contains(&format!("{} at byte {}", file.display(), second.offset)),
        "{err}"
    );
    assert_eq!(out.lines().count(), 400 - second.lines.len());
}

// Catches an unreadable path being treated as "no records" (exit 0).
#[test]
fn tail_of_a_missing_path_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let args = tail_args(&[missing.to_str().expect("utf-8 path")]);
    let err = tail::run(&args).expect_err("missing path").to_string();
    assert!(err.contains("nope"), "{err}");
}

// Catches time and level parsing that accepts garbage or gets units wrong
// (these helpers are shared with `spillway query`).
#[test]
fn since_and_level_parse_durations_times_and_names() {
    let now = spillway::now_ns();
    let ten_min = tail::parse_since("10m").expect("10m");
    assert!((ten_min - (now - 600_000_000_000)).abs() < 5_000_000_000);
    let two_h = tail::parse_since("2h").expect("2h");
    assert!((two_h - (now - 7_200_000_000_000)).abs() < 5_000_000_000);
    assert_eq!(
        tail::parse_since("2026-12-03T16:20:01.5Z").expect("rfc3339"),
        1_796_314_801_500_000_000
    );
    assert_eq!(
        tail::parse_since("2026-12-03T17:20:01+01:00").expect("offset"),
        1_796_314_801_000_000_000
    );
    for bad in ["", "10x", "m", "yesterday", "99999999999999999d"] {
        assert!(tail::parse_since(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(tail::parse_level("WARN").expect("warn"), Level::WARN);
    assert_eq!(tail::parse_level("warning").expect("warning"), Level::WARN);
    assert_eq!(tail::parse_level("trace").expect("trace"), Level::TRACE);
    let err = tail::parse_level("loud")
        .expect_err("bad level")
        .to_string();
    assert!(err.contains("loud"), "{err}");
    let args = tail_args(&["-f", "--level", "error", "--since", "30s", "--json", "d"]);
    assert!(args.follow && args.json);
    assert_eq!(args.level, Some(Level::ERROR));
    assert_eq!(args.path.as_deref(), Some(Path::new("d")));
}

// Catches a stray file in a stream folder (an operator's backup) wedging the
// writer: new segment names had to sort after it, and none could.
#[test]
fn a_stray_file_in_a_stream_folder_does_not_stop_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("segments").join("events");
    std::fs::create_dir_all(&events).unwrap();
    std::fs::write(events.join("events-backup.zst"), b"not ours").unwrap();
    std::fs::write(
        events.join("events-\u{20ac}\u{20ac}abT000000.000000000Z-000001.zst"),
        b"x",
    )
    .unwrap();
    let sink = SegmentSink::open(dir.path(), SegmentConfig::default()).unwrap();
    let (engine, guard) = Engine::builder(BatchConfig::default())
        .sink(Box::new(sink))
        .build()
        .unwrap();
    engine
        .publish("data:users:created", json!({ "id": 7 }))
        .unwrap();
    engine.flush().unwrap();
    assert_eq!(engine.stats().sink_errors, 0);
    drop(guard);
    let ours: Vec<_> = list_segments(dir.path())
        .unwrap()
        .into_iter()
        .filter(|p| {
            !p.to_string_lossy().contains("backup") && !p.to_string_lossy().contains('\u{20ac}')
        })
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
}

// Catches two writers on one data directory: the second would cut the first
// one's live file as a "torn tail" on open. It must be refused, by name.
#[test]
fn a_second_writer_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = SegmentSink::open(dir.path(), SegmentConfig::default()).unwrap();
    let err = SegmentSink::open(dir.path(), SegmentConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("in use") && err.contains(&dir.path().display().to_string()),
        "{err}"
    );
    drop(first);
    SegmentSink::open(dir.path(), SegmentConfig::default())
        .expect("free again once the first is gone");
}
