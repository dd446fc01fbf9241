//! SpillwayLayer: what the engine receives for tracing and `log` events.
//!
//! Each test installs its subscriber with `with_default` (thread-local), builds
//! its own engine with a capturing sink, and asserts on the batches the sink
//! was handed.

use std::borrow::Cow;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use spillway::{
    prefix_of, Batch, BatchConfig, Engine, FieldValue, Guard, Level, LogConfig, LogRecord, Policy,
    Records, Sink, SpillwayLayer,
};
use tracing::Dispatch;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer};

/// One batch as the sink saw it.
#[derive(Clone, Debug)]
struct Seen {
    prefix: String,
    urgent: bool,
    records: Vec<LogRecord>,
}

type SeenLog = Arc<Mutex<Vec<Seen>>>;

/// A sink that keeps the log batches it is handed; optionally runs a hook per batch.
struct CaptureSink {
    seen: SeenLog,
    on_write: Option<Box<dyn FnMut() + Send>>,
}

impl Sink for CaptureSink {
    fn write_batch(&mut self, batch: &Batch) -> spillway::Result<()> {
        if let Records::Logs(logs) = &batch.records {
            self.seen.lock().unwrap().push(Seen {
                prefix: batch.prefix.to_string(),
                urgent: batch.urgent,
                records: logs.clone(),
            });
        }
        if let Some(hook) = &mut self.on_write {
            hook();
        }
        Ok(())
    }
    fn flush(&mut self) -> spillway::Result<()> {
        Ok(())
    }
}

fn engine_with(config: BatchConfig) -> (Engine, Guard, SeenLog) {
    let seen = SeenLog::default();
    let sink = CaptureSink {
        seen: seen.clone(),
        on_write: None,
    };
    let (engine, guard) = Engine::builder(config)
        .sink(Box::new(sink))
        .build()
        .unwrap();
    (engine, guard, seen)
}

fn engine() -> (Engine, Guard, SeenLog) {
    engine_with(BatchConfig::default())
}

/// Every record the sink received, in batch order.
fn records(seen: &SeenLog) -> Vec<LogRecord> {
    seen.lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.records.clone())
        .collect()
}

fn with_target<'a>(records: &'a [LogRecord], target: &str) -> Vec<&'a LogRecord> {
    records.iter().filter(|r| r.target == target).collect()
}

fn field<'a>(fields: &'a [(Cow<'static, str>, FieldValue)], name: &str) -> Option<&'a FieldValue> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// Polls until `pred` holds on the captured batches, up to a generous deadline.
fn wait_for(seen: &SeenLog, pred: impl Fn(&[Seen]) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if pred(&seen.lock().unwrap()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// An `io::Write` into a shared buffer, for the fmt layer.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// Catches typed fields flattened to strings (or the reverse), a message kept
// as a field or formatted wrong, and lost metadata (level, target, location, time).
#[test]
fn fields_keep_their_types_and_metadata() {
    let (engine, _guard, seen) = engine();
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    let before = spillway::now_ns();
    let line = tracing::subscriber::with_default(subscriber, || {
        let line = line!() + 1;
        tracing::info!(target: "t::types", i = -3_i64, u = 7_u64, f = 1.5_f64, b = true, s = "text", d = ?vec![1, 2], disp = %"shown", "row {} of {}", 4, 10);
        line
    });
    let after = spillway::now_ns();
    engine.flush().unwrap();
    let all = records(&seen);
    let [r] = with_target(&all, "t::types")[..] else {
        panic!("expected one record, got {all:?}");
    };
    assert_eq!(r.message, "row 4 of 10");
    assert_eq!(r.level, Level::INFO);
    assert_eq!(r.module_path.as_deref(), Some(module_path!()));
    assert_eq!(r.file.as_deref(), Some(file!()));
    assert_eq!(r.line, Some(line));
    assert!(
        before <= r.ts_ns && r.ts_ns <= after,
        "{} not in [{before}, {after}]",
        r.ts_ns
    );
    let want = vec![
        (Cow::Borrowed("i"), FieldValue::I64(-3)),
        (Cow::Borrowed("u"), FieldValue::U64(7)),
        (Cow::Borrowed("f"), FieldValue::F64(1.5)),
        (Cow::Borrowed("b"), FieldValue::Bool(true)),
        (Cow::Borrowed("s"), FieldValue::Str("text".into())),
        (Cow::Borrowed("d"), FieldValue::Str("[1, 2]".into())),
        (Cow::Borrowed("disp"), FieldValue::Str("shown".into())),
    ];
    assert_eq!(r.fields, want);
    assert!(r.spans.is_empty());
}

// Catches spans attached innermost first, span fields re-captured per event
// instead of kept per span, a later `span.record` not reaching later events,
// and an update that leaks into records captured before it (no copy-on-write).
#[test]
fn spans_attach_outermost_first_and_see_later_records() {
    let (engine, _guard, seen) = engine();
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || {
        let request = tracing::info_span!("request", id = 1_u64, pending = tracing::field::Empty);
        let _r = request.enter();
        let query = tracing::info_span!("query", table = "users");
        let _q = query.enter();
        tracing::info!(target: "t::spans", "first");
        request.record("pending", 5_i64);
        request.record("id", 2_u64);
        tracing::info!(target: "t::spans", "second");
        drop(_q);
        drop(_r);
        tracing::info!(target: "t::spans", parent: &request, "explicit parent");
        tracing::info!(target: "t::spans", parent: None, "root");
    });
    engine.flush().unwrap();
    let all = records(&seen);
    let got = with_target(&all, "t::spans");
    assert_eq!(got.len(), 4, "{got:?}");
    let names = |r: &LogRecord| {
        r.spans
            .iter()
            .map(|s| s.name.to_string())
            .collect::<Vec<_>>()
    };

    assert_eq!(got[0].message, "first");
    assert_eq!(names(got[0]), ["request", "query"]);
    assert_eq!(
        got[0].spans[0].fields,
        vec![(Cow::Borrowed("id"), FieldValue::U64(1))]
    );
    assert_eq!(
        got[0].spans[1].fields,
        vec![(Cow::Borrowed("table"), FieldValue::Str("users".into()))]
    );

    assert_eq!(got[1].message, "second");
    assert_eq!(names(got[1]), ["request", "query"]);
    assert_eq!(
        got[1].spans[0].fields,
        vec![
            (Cow::Borrowed("id"), FieldValue::U64(2)),
            (Cow::Borrowed("pending"), FieldValue::I64(5)),
        ]
    );
    // The inner span did not change: the second event shares its capture.
    assert!(Arc::ptr_eq(&got[0].spans[1], &got[1].spans[1]));

    assert_eq!(names(got[2]), ["request"]);
    assert_eq!(
        field(&got[2].spans[0].fields, "pending"),
        Some(&FieldValue::I64(5))
    );
    assert!(got[3].spans.is_empty());
}

// Catches `spans = false` / `include_location = false` being ignored.
#[test]
fn spans_and_location_can_be_left_out() {
    let (engine, _guard, seen) = engine();
    let config: LogConfig = toml::from_str("spans = false\ninclude_location = false").unwrap();
    let layer = SpillwayLayer::builder(&engine).config(config).build();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("outer", x = 1_u64);
        let _e = span.enter();
        tracing::info!(target: "t::bare", y = 2_u64, "bare");
    });
    engine.flush().unwrap();
    let all = records(&seen);
    let [r] = with_target(&all, "t::bare")[..] else {
        panic!("expected one record, got {all:?}");
    };
    assert!(r.spans.is_empty());
    assert_eq!((&r.module_path, &r.file, r.line), (&None, &None, None));
    assert_eq!(field(&r.fields, "y"), Some(&FieldValue::U64(2)));
}

// Catches the layer bypassing a registry-wide EnvFilter, or breaking the fmt
// layer beside it.
#[test]
fn composes_with_env_filter_and_fmt_layer() {
    let (engine, _guard, seen) = engine();
    let out = Buf::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::registry()
        .with(EnvFilter::new("keep=info"))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        )
        .with(SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || {
        tracing::info!(target: "keep", "kept info");
        tracing::debug!(target: "keep", "filtered debug");
        tracing::warn!(target: "other", "filtered target");
    });
    engine.flush().unwrap();
    let messages: Vec<String> = records(&seen).into_iter().map(|r| r.message).collect();
    assert_eq!(messages, ["kept info"]);
    let text = out.text();
    assert!(text.contains("kept info"), "{text}");
    assert!(!text.contains("filtered"), "{text}");
}

// Catches a per-layer filter on SpillwayLayer being ignored (or leaking into
// the fmt layer's view), and span capture breaking under per-layer filtering.
#[test]
fn composes_with_a_per_layer_filter() {
    let (engine, _guard, seen) = engine();
    let out = Buf::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        )
        .with(SpillwayLayer::new(&engine).with_filter(EnvFilter::new("keep=info")));
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!(target: "keep", "job", n = 3_u64);
        let _e = span.enter();
        tracing::info!(target: "keep", "kept");
        tracing::debug!(target: "keep", "debug for fmt only");
        tracing::info!(target: "elsewhere", "info for fmt only");
    });
    engine.flush().unwrap();
    let all = records(&seen);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].message, "kept");
    assert_eq!(all[0].spans.len(), 1);
    assert_eq!(all[0].spans[0].name, "job");
    assert_eq!(
        field(&all[0].spans[0].fields, "n"),
        Some(&FieldValue::U64(3))
    );
    let text = out.text();
    assert!(
        text.contains("debug for fmt only") && text.contains("info for fmt only"),
        "{text}"
    );
}

/// Installs tracing-log's global `log` logger once per process.
fn install_log_tracer() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing_log::LogTracer::init().expect("no other `log` logger is installed");
    });
}

// Catches `log` records arriving with target "log" (tracing-log's callsite)
// instead of their own, with the `log.*` bookkeeping fields leaking into the
// record, or without their file/line/module.
#[test]
fn log_crate_records_keep_their_target_and_location() {
    install_log_tracer();
    let (engine, _guard, seen) = engine();
    let subscriber = tracing_subscriber::registry()
        .with(EnvFilter::new("legacy=info"))
        .with(SpillwayLayer::new(&engine));
    let line = tracing::subscriber::with_default(subscriber, || {
        let line = line!() + 1;
        tracing_log::log::warn!(target: "legacy::db", "pool exhausted after {} tries", 3);
        tracing_log::log::info!(target: "unrelated::mod", "filtered by target");
        line
    });
    engine.flush().unwrap();
    let all = records(&seen);
    assert!(with_target(&all, "log").is_empty(), "{all:?}");
    assert!(with_target(&all, "unrelated::mod").is_empty(), "{all:?}");
    let [r] = with_target(&all, "legacy::db")[..] else {
        panic!("expected one record for legacy::db, got {all:?}");
    };
    assert_eq!(r.message, "pool exhausted after 3 tries");
    assert_eq!(r.level, Level::WARN);
    assert_eq!(r.module_path.as_deref(), Some(module_path!()));
    assert_eq!(r.file.as_deref(), Some(file!()));
    assert_eq!(r.line, Some(line));
    assert!(r.fields.is_empty(), "{:?}", r.fields);
    let batches = seen.lock().unwrap();
    let b = batches
        .iter()
        .find(|b| b.records.iter().any(|r| r.target == "legacy::db"))
        .unwrap();
    assert_eq!(
        b.prefix,
        prefix_of("log:legacy::db", BatchConfig::default().prefix_depth)
    );
}

// Catches records of different modules sharing a batch, or batched under a
// key not derived from their own target.
#[test]
fn targets_route_to_their_own_batches() {
    let (engine, _guard, seen) = engine();
    let depth = engine.config().prefix_depth;
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..5_u64 {
            tracing::info!(target: "a::x", i, "a");
            tracing::info!(target: "b::y", i, "b");
        }
    });
    engine.flush().unwrap();
    let batches = seen.lock().unwrap().clone();
    let mut counts = std::collections::BTreeMap::new();
    for b in &batches {
        let target = b.records[0].target.to_string();
        assert!(
            b.records.iter().all(|r| r.target == target),
            "mixed batch {b:?}"
        );
        assert_eq!(b.prefix, prefix_of(&format!("log:{target}"), depth));
        *counts.entry(target).or_insert(0) += b.records.len();
    }
    assert_eq!(counts.get("a::x"), Some(&5));
    assert_eq!(counts.get("b::y"), Some(&5));
    let prefixes: std::collections::BTreeSet<_> = batches.iter().map(|b| &b.prefix).collect();
    assert_eq!(prefixes.len(), 2, "{prefixes:?}");
    // Per-module records in order.
    let a: Vec<_> = with_target(&records(&seen), "a::x")
        .iter()
        .map(|r| field(&r.fields, "i").cloned())
        .collect();
    assert_eq!(
        a,
        (0..5).map(|i| Some(FieldValue::U64(i))).collect::<Vec<_>>()
    );
}

// Catches the arena capture mixing up events: each thread's events are
// copied into its chunk's shared text buffer while the engine takes partial
// chunks away, so a stale offset would pair one event's message with another's
// string field, cut a string, or lose and reorder records. Strings of varying
// length (some long enough to fill a chunk's text early) and spans included.
#[test]
fn captured_events_keep_their_own_text_across_threads_and_chunks() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 20_000;
    let cfg = BatchConfig::builder()
        .memory_budget(256 << 20)
        .policy(
            "log:*",
            Policy::batch(Duration::from_millis(5), 500).block_timeout(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let (engine, _guard, seen) = engine_with(cfg);
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(SpillwayLayer::new(&engine)));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let dispatch = dispatch.clone();
            std::thread::spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    let span = tracing::info_span!("worker", t);
                    let _e = span.enter();
                    for i in 0..PER_THREAD {
                        let text = "x".repeat(((i * 7919 + t) % 97) as usize * (1 + (i % 500 == 0) as usize * 400));
                        tracing::info!(target: "stress::mod", t, i, text = text.as_str(), odd = i % 2 == 1, "event {t}/{i} {}", text.len());
                    }
                })
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    engine.flush().unwrap();
    let all = records(&seen);
    assert_eq!(all.len() as u64, THREADS * PER_THREAD);
    let mut next = vec![0u64; THREADS as usize];
    for r in &all {
        let Some(FieldValue::U64(t)) = field(&r.fields, "t").cloned() else {
            panic!("no t in {r:?}")
        };
        let Some(FieldValue::U64(i)) = field(&r.fields, "i").cloned() else {
            panic!("no i in {r:?}")
        };
        let Some(FieldValue::Str(text)) = field(&r.fields, "text").cloned() else {
            panic!("no text in {r:?}")
        };
        let want = ((i * 7919 + t) % 97) as usize * (1 + (i % 500 == 0) as usize * 400);
        assert_eq!(text, "x".repeat(want), "text of {t}/{i}");
        assert_eq!(r.message, format!("event {t}/{i} {want}"));
        assert_eq!(field(&r.fields, "odd"), Some(&FieldValue::Bool(i % 2 == 1)));
        assert_eq!(r.spans.len(), 1);
        assert_eq!(
            r.spans[0].fields,
            vec![(Cow::Borrowed("t"), FieldValue::U64(t))]
        );
        assert_eq!(i, next[t as usize], "thread {t}: out of order or missing");
        next[t as usize] += 1;
    }
}

// Catches a batch that starts in a reused vector carrying records that are
// not its own: the engine overwrites delivered records where they stand, so a
// batch of 3 that starts in a delivered batch of 10 must hand on exactly its
// 3 records, with their own text.
#[test]
fn a_batch_started_in_a_reused_vector_carries_only_its_own_records() {
    let cfg = BatchConfig::builder()
        .policy(
            "log:reuse::warm",
            Policy::batch(Duration::from_secs(3600), 10),
        )
        .build()
        .unwrap();
    let (engine, _guard, seen) = engine_with(cfg);
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..100_u64 {
            tracing::info!(target: "reuse::warm", i, extra = "x", "warm {i}");
        }
        engine.flush().unwrap();
        for i in 0..3_u64 {
            tracing::info!(target: "reuse::cold", i, "cold {i}");
        }
        engine.flush().unwrap();
    });
    let cold: Vec<LogRecord> = records(&seen)
        .into_iter()
        .filter(|r| r.target == "reuse::cold" || r.message.starts_with("cold"))
        .collect();
    let messages: Vec<&str> = cold.iter().map(|r| r.message.as_str()).collect();
    assert_eq!(messages, ["cold 0", "cold 1", "cold 2"]);
    for (i, r) in cold.iter().enumerate() {
        assert_eq!(
            r.fields,
            vec![(Cow::Borrowed("i"), FieldValue::U64(i as u64))]
        );
        assert_eq!(r.target, "reuse::cold");
    }
    assert_eq!(records(&seen).len(), 103);
}

// Catches drop_oldest on log records keeping the old ones, breaking their
// order, mixing their text, or losing count, over two floods (the second
// runs on records the engine reuses from the first).
#[test]
fn drop_oldest_logs_keep_the_newest_in_order_and_count_the_rest() {
    let cfg = BatchConfig::builder()
        .memory_budget(64 << 10)
        .policy(
            "log:*",
            Policy::batch(Duration::from_secs(3600), 1_000_000)
                .on_full(spillway::OnFull::DropOldest)
                .block_timeout(Duration::from_secs(10)),
        )
        .build()
        .unwrap();
    let (engine, _guard, seen) = engine_with(cfg);
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || {
        for round in 0..2_u64 {
            for i in 0..3000_u64 {
                let pad = "p".repeat((i % 50) as usize);
                tracing::info!(target: "evict::mod", round, i, pad = pad.as_str(), "event {round}/{i}");
            }
            engine.flush().unwrap();
        }
    });
    let stats = engine.stats();
    let dropped = stats.prefixes["log:evict::mod"].dropped;
    assert!(dropped > 0, "a 64 KiB budget cannot hold 3000 records");
    let all = records(&seen);
    assert_eq!(
        all.len() as u64 + dropped,
        6000,
        "every record kept or counted"
    );
    let mut last = None;
    for r in &all {
        let (Some(FieldValue::U64(round)), Some(FieldValue::U64(i))) = (
            field(&r.fields, "round").cloned(),
            field(&r.fields, "i").cloned(),
        ) else {
            panic!("fields missing in {r:?}")
        };
        assert_eq!(
            r.message,
            format!("event {round}/{i}"),
            "stale or mixed record"
        );
        assert_eq!(
            field(&r.fields, "pad"),
            Some(&FieldValue::Str("p".repeat((i % 50) as usize)))
        );
        assert!(last < Some((round, i)), "order broken at {round}/{i}");
        last = Some((round, i));
    }
    assert_eq!(last, Some((1, 2999)), "the newest record survives");
}

// Catches a log policy not applying to its module's records (or applying to
// another module's): `log:a::*` closes at 3 records, other logs use the default.
// The two call sites take turns, so a publisher's memory of the last target's
// route must not carry over to the other.
#[test]
fn a_log_policy_batches_its_module() {
    let hour = Duration::from_secs(3600);
    let config = BatchConfig::builder()
        .policy("log:a::*", Policy::batch(hour, 3))
        .default_policy(Policy::batch(hour, 1000))
        .build()
        .unwrap();
    let (engine, _guard, seen) = engine_with(config);
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..10_u64 {
            tracing::info!(target: "a::x", i, "a");
            tracing::info!(target: "b::y", i, "b");
        }
    });
    engine.flush().unwrap();
    let batches = seen.lock().unwrap().clone();
    let sizes = |t: &str| -> Vec<usize> {
        batches
            .iter()
            .filter(|b| b.records[0].target == t)
            .map(|b| b.records.len())
            .collect()
    };
    assert_eq!(sizes("a::x"), [3, 3, 3, 1]);
    assert_eq!(sizes("b::y"), [10]);
}

// Catches WARN not being urgent (an off-by-one in the level comparison) and
// urgent batches waiting for the policy interval: with a 1-hour interval and
// no flush, only the urgent batch may arrive, and it must arrive.
#[test]
fn warn_closes_its_batch_without_waiting_for_the_interval() {
    let hour = Duration::from_secs(3600);
    let config = BatchConfig::builder()
        .builtin_rules(false)
        .default_policy(Policy::batch(hour, 10_000))
        .build()
        .unwrap();
    let (engine, _guard, seen) = engine_with(config);
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || {
        tracing::info!(target: "quiet::x", "routine");
        tracing::info!(target: "loud::x", "before the warning");
        tracing::warn!(target: "loud::x", "disk almost full");
    });
    assert!(
        wait_for(&seen, |b| !b.is_empty()),
        "the WARN batch did not arrive without a flush"
    );
    {
        let batches = seen.lock().unwrap();
        assert_eq!(batches.len(), 1, "{batches:?}");
        let b = &batches[0];
        assert!(b.urgent);
        let msgs: Vec<_> = b.records.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(msgs, ["before the warning", "disk almost full"]);
    }
    engine.flush().unwrap();
    let batches = seen.lock().unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[1].records[0].target, "quiet::x");
    assert!(!batches[1].urgent);
}

// Catches `urgent_level` being ignored: with it at ERROR, a WARN waits for its
// interval while an ERROR closes its batch at once.
#[test]
fn urgent_level_is_configurable() {
    let hour = Duration::from_secs(3600);
    let config = BatchConfig::builder()
        .builtin_rules(false)
        .default_policy(Policy::batch(hour, 10_000))
        .build()
        .unwrap();
    let (engine, _guard, seen) = engine_with(config);
    let layer = SpillwayLayer::builder(&engine)
        .urgent_level(Level::ERROR)
        .build();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        tracing::warn!(target: "w::x", "only a warning");
        tracing::error!(target: "e::x", "an error");
    });
    assert!(
        wait_for(&seen, |b| !b.is_empty()),
        "the ERROR batch did not arrive without a flush"
    );
    let batches = seen.lock().unwrap();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0].records[0].target, "e::x");
    assert!(batches[0].urgent);
}

/// A value whose `Debug` logs: through tracing (which tracing-core itself
/// drops while the dispatcher is busy with the outer event) and straight into
/// the engine (which re-enters the engine while the layer is capturing).
struct Noisy(Engine, &'static str);

impl std::fmt::Debug for Noisy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        tracing::info!(target: "t::inner", "formatting {}", self.1);
        let record = LogRecord {
            ts_ns: spillway::now_ns(),
            level: Level::ERROR,
            target: Cow::Borrowed("t::direct"),
            module_path: None,
            file: None,
            line: None,
            message: format!("formatting {}", self.1),
            fields: Vec::new(),
            spans: Vec::new(),
        };
        self.0
            .submit_log(record, true)
            .map_err(|_| std::fmt::Error)?;
        f.write_str("noisy")
    }
}

// Catches a deadlock (or a RefCell panic) when something logs while the layer
// is capturing an event or a span: from an event field, a new span's field,
// and a `span.record` on the span the event is then emitted in.
#[test]
fn reentrant_logging_neither_deadlocks_nor_gets_lost() {
    let (engine, _guard, seen) = engine();
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(SpillwayLayer::new(&engine)));
    let (tx, rx) = std::sync::mpsc::channel();
    let e = engine.clone();
    std::thread::spawn(move || {
        tracing::dispatcher::with_default(&dispatch, || {
            let span =
                tracing::info_span!("s", v = ?Noisy(e.clone(), "span"), w = tracing::field::Empty);
            let _e = span.enter();
            span.record("w", tracing::field::debug(Noisy(e.clone(), "record")));
            tracing::info!(target: "t::outer", v = ?Noisy(e.clone(), "event"), "outer");
        });
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("re-entrant logging deadlocked (or the thread panicked)");
    engine.flush().unwrap();
    let all = records(&seen);
    let mut direct: Vec<_> = with_target(&all, "t::direct")
        .iter()
        .map(|r| r.message.clone())
        .collect();
    direct.sort();
    assert_eq!(
        direct,
        ["formatting event", "formatting record", "formatting span"]
    );
    let [outer] = with_target(&all, "t::outer")[..] else {
        panic!("expected the outer record, got {all:?}");
    };
    assert_eq!(
        field(&outer.fields, "v"),
        Some(&FieldValue::Str("noisy".into()))
    );
    assert_eq!(outer.spans[0].name, "s");
    assert_eq!(
        outer.spans[0].fields,
        vec![
            (Cow::Borrowed("v"), FieldValue::Str("noisy".into())),
            (Cow::Borrowed("w"), FieldValue::Str("noisy".into())),
        ]
    );
}

// Catches a feedback loop: a sink that logs through the same subscriber while
// writing would have its own records written back to it, batch after batch.
#[test]
fn events_from_the_sink_thread_are_not_fed_back() {
    let seen = SeenLog::default();
    let dispatch: Arc<OnceLock<Dispatch>> = Arc::default();
    let emitted = Arc::new(AtomicUsize::new(0));
    let (d, n) = (dispatch.clone(), emitted.clone());
    let sink = CaptureSink {
        seen: seen.clone(),
        on_write: Some(Box::new(move || {
            if let Some(d) = d.get() {
                tracing::dispatcher::with_default(d, || {
                    tracing::warn!(target: "t::sinkdiag", "wrote a batch");
                });
                n.fetch_add(1, Ordering::SeqCst);
            }
        })),
    };
    let (engine, _guard) = Engine::builder(BatchConfig::default())
        .sink(Box::new(sink))
        .build()
        .unwrap();
    let _ = dispatch.set(Dispatch::new(
        tracing_subscriber::registry().with(SpillwayLayer::new(&engine)),
    ));
    tracing::dispatcher::with_default(dispatch.get().unwrap(), || {
        tracing::info!(target: "t::app", "application record");
    });
    // The first flush writes the app batch (the sink logs); the second would
    // write whatever that logging fed back.
    engine.flush().unwrap();
    engine.flush().unwrap();
    assert!(emitted.load(Ordering::SeqCst) >= 1, "the sink never logged");
    let all = records(&seen);
    assert_eq!(with_target(&all, "t::app").len(), 1);
    assert!(with_target(&all, "t::sinkdiag").is_empty(), "{all:?}");
}

// Catches a panic (e.g. an unwrapped submit error) when events keep coming
// after the engine was shut down.
#[test]
fn events_after_shutdown_are_ignored() {
    let (engine, guard, _seen) = engine();
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    drop(guard);
    tracing::subscriber::with_default(subscriber, || {
        tracing::error!(target: "t::late", "after shutdown");
    });
    assert_eq!(engine.stats().total.accepted, 0);
}
