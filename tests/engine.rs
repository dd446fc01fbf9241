//! The engine and the bus adapter, through the public API, with real threads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spillway::{
    BatchAwareSubscriber, BatchConfig, BatchingBus, BusEvent, Engine, Lagged, MessageBus, OnFull,
    Policy,
};

/// Records every call: batches as they arrive, events one by one.
#[derive(Default)]
struct Collector {
    batches: Mutex<Vec<Vec<BusEvent>>>,
    events: Mutex<Vec<BusEvent>>,
}

impl BatchAwareSubscriber for Collector {
    fn on_event(&self, e: &BusEvent) {
        self.events.lock().unwrap().push(e.clone());
    }
    fn on_batch(&self, events: &[BusEvent]) {
        self.batches.lock().unwrap().push(events.to_vec());
    }
}

impl Collector {
    fn batch_count(&self) -> usize {
        self.batches.lock().unwrap().len()
    }
    fn batched_events(&self) -> usize {
        self.batches.lock().unwrap().iter().map(Vec::len).sum()
    }
}

/// Polls `cond` until it holds; fails the test after a generous deadline.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A subscriber that blocks in `on_batch` until released.
struct Gate {
    open: Mutex<bool>,
    cv: std::sync::Condvar,
    entered: AtomicUsize,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            open: Mutex::new(false),
            cv: std::sync::Condvar::new(),
            entered: AtomicUsize::new(0),
        })
    }
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl BatchAwareSubscriber for Gate {
    fn on_event(&self, _e: &BusEvent) {}
    fn on_batch(&self, _events: &[BusEvent]) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }
}

fn config(policy: Policy) -> BatchConfig {
    BatchConfig::builder()
        .policy("t:*", policy)
        .build()
        .unwrap()
}

fn bus(config: BatchConfig) -> (BatchingBus, spillway::Guard, Arc<MessageBus>) {
    let (engine, guard) = Engine::builder(config).build().unwrap();
    let inner = Arc::new(MessageBus::new());
    (BatchingBus::new(&engine, inner.clone()), guard, inner)
}

// Catches a batch that does not close at max_count (or closes early).
#[test]
fn batch_closes_at_max_count() {
    let (bus, _g, _) = bus(config(Policy::batch(Duration::from_secs(3600), 10)));
    let c = Arc::new(Collector::default());
    bus.subscribe("t:*", c.clone()).unwrap();
    for i in 0..25 {
        bus.publish("t:a:x", json!({ "i": i })).unwrap();
    }
    wait_for("two full batches", || c.batch_count() == 2);
    assert!(c.batches.lock().unwrap().iter().all(|b| b.len() == 10));
    bus.flush().unwrap();
    let sizes: Vec<usize> = c.batches.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![10, 10, 5], "flush closes the partial batch");
}

// Catches max_bytes being ignored: big payloads must split batches by size.
#[test]
fn batch_closes_at_max_bytes() {
    let policy = Policy::batch(Duration::from_secs(3600), 1_000_000).max_bytes(10_000);
    let (bus, _g, _) = bus(config(policy));
    let c = Arc::new(Collector::default());
    bus.subscribe("t:*", c.clone()).unwrap();
    let blob = "x".repeat(1000);
    for i in 0..40 {
        bus.publish("t:a:x", json!({ "i": i, "blob": blob }))
            .unwrap();
    }
    wait_for("size-closed batches", || c.batch_count() >= 3);
    for b in c.batches.lock().unwrap().iter() {
        assert!(
            b.len() <= 10,
            "a batch of {} ~1 KB events exceeds max_bytes 10 KB",
            b.len()
        );
    }
}

// Catches a timer that only fires when new events arrive: a quiet prefix must
// flush on its own, without flush() and without more traffic.
#[test]
fn quiet_prefix_is_flushed_by_the_engine_timer() {
    let (bus, _g, _) = bus(config(Policy::batch(Duration::from_millis(30), 1000)));
    let c = Arc::new(Collector::default());
    bus.subscribe("t:*", c.clone()).unwrap();
    for i in 0..3 {
        bus.publish("t:quiet:x", json!({ "i": i })).unwrap();
    }
    wait_for("the interval to close the batch", || c.batch_count() == 1);
    assert_eq!(c.batched_events(), 3);
}

// Catches lost, duplicated or reordered events under concurrency, wrong pattern
// filtering inside a batch, and batches over max_count.
#[test]
fn many_threads_every_event_once_per_matching_subscriber_in_order() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 100_000;
    const PREFIXES: usize = 50;
    const MAX_COUNT: usize = 100;
    let cfg = BatchConfig::builder()
        .memory_budget(256 << 20)
        .policy(
            "t:*",
            Policy::batch(Duration::from_millis(20), MAX_COUNT)
                .block_timeout(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let (bus, _g, _) = bus(cfg);
    let all = Arc::new(Collector::default());
    let one_prefix = Arc::new(Collector::default());
    let one_thread = Arc::new(Collector::default());
    let chat = Arc::new(Collector::default());
    bus.subscribe("t:*", all.clone()).unwrap();
    bus.subscribe("t:7:*", one_prefix.clone()).unwrap();
    bus.subscribe("t:*:3", one_thread.clone()).unwrap();
    bus.subscribe("chat:*", chat.clone()).unwrap();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                for seq in 0..PER_THREAD {
                    let p = (seq * 7 + t) % PREFIXES;
                    bus.publish(format!("t:{p}:{t}"), json!({ "t": t, "seq": seq }))
                        .unwrap();
                    if seq % 1000 == 0 {
                        bus.publish("chat:message", json!({ "t": t, "seq": seq }))
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    bus.flush().unwrap();
    let stats = bus.stats();
    assert_eq!(
        stats.total.dropped, 0,
        "nothing may be dropped with a 60 s block timeout"
    );

    let total = THREADS * PER_THREAD;
    assert_eq!(all.batched_events(), total);
    let batches = all.batches.lock().unwrap();
    assert!(batches
        .iter()
        .all(|b| b.len() <= MAX_COUNT && !b.is_empty()));
    // Per (prefix, thread): sequence numbers strictly increase; every one seen once.
    let mut last: HashMap<(usize, usize), i64> = HashMap::new();
    let mut seen = vec![0u8; total];
    for b in batches.iter() {
        let prefix = &b[0].name[..b[0].name.rfind(':').unwrap()];
        for e in b {
            assert!(
                e.name.starts_with(prefix),
                "batch mixes prefixes: {} in {prefix}",
                e.name
            );
            let t = e.payload["t"].as_u64().unwrap() as usize;
            let seq = e.payload["seq"].as_u64().unwrap() as usize;
            let p = (seq * 7 + t) % PREFIXES;
            // Names travel apart from payloads (an index into a per-chunk
            // name table): a stale index would pair this payload with the
            // wrong name.
            assert_eq!(e.name, format!("t:{p}:{t}"), "name and payload mismatched");
            let prev = last.insert((p, t), seq as i64).unwrap_or(-1);
            assert!(
                seq as i64 > prev,
                "order broken on prefix {p} thread {t}: {seq} after {prev}"
            );
            seen[t * PER_THREAD + seq] += 1;
        }
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "some event missing or duplicated"
    );
    drop(batches);

    let want_prefix7 = (0..THREADS)
        .flat_map(|t| (0..PER_THREAD).map(move |s| (s * 7 + t) % PREFIXES))
        .filter(|&p| p == 7)
        .count();
    assert_eq!(one_prefix.batched_events(), want_prefix7);
    assert!(one_prefix
        .batches
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .all(|e| e.name.starts_with("t:7:")));
    assert_eq!(one_thread.batched_events(), PER_THREAD);
    assert!(one_thread
        .batches
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .all(|e| e.name.ends_with(":3")));
    // Passthrough: one on_event per chat message, none batched.
    assert_eq!(
        chat.events.lock().unwrap().len(),
        THREADS * PER_THREAD / 1000
    );
    assert_eq!(chat.batch_count(), 0);
    assert_eq!(
        stats.prefixes["chat:message"].passthrough,
        (THREADS * PER_THREAD / 1000) as u64
    );
}

// Catches a deep copy (or a re-wrap) of a payload the publisher already
// shares: subscribers must get the very same `Arc`, for batched and for
// passthrough events; an owned `Value` arrives equal.
#[test]
fn shared_payloads_reach_subscribers_as_the_same_arc() {
    let (bus, _g, _) = bus(config(Policy::batch(Duration::from_secs(60), 2)));
    let batched = Arc::new(Collector::default());
    let chat = Arc::new(Collector::default());
    bus.subscribe("t:*", batched.clone()).unwrap();
    bus.subscribe("chat:*", chat.clone()).unwrap();
    let shared = Arc::new(json!({ "rows": [1, 2, 3] }));
    bus.publish("t:a:created", shared.clone()).unwrap();
    bus.publish("t:a:created", json!({ "owned": true }))
        .unwrap();
    bus.publish("chat:message", &shared).unwrap();
    bus.flush().unwrap();
    let batches = batched.batches.lock().unwrap();
    assert_eq!(batches.len(), 1);
    assert!(Arc::ptr_eq(&batches[0][0].payload, &shared));
    assert_eq!(*batches[0][1].payload, json!({ "owned": true }));
    drop(batches);
    wait_for("the passthrough delivery", || {
        chat.events.lock().unwrap().len() == 1
    });
    assert!(Arc::ptr_eq(
        &chat.events.lock().unwrap()[0].payload,
        &shared
    ));
}

// Catches passthrough sharing a queue or thread with batches: a stuck batch
// subscriber must not delay a chat message.
#[test]
fn passthrough_is_delivered_while_a_slow_subscriber_holds_up_batches() {
    let (bus, guard, _) = bus(config(Policy::batch(Duration::from_millis(5), 10)));
    let gate = Gate::new();
    bus.subscribe("t:*", gate.clone()).unwrap();
    let chat = Arc::new(Collector::default());
    bus.subscribe("chat:*", chat.clone()).unwrap();
    for i in 0..100 {
        bus.publish("t:slow:x", json!({ "i": i })).unwrap();
    }
    wait_for("the slow subscriber to be stuck", || {
        gate.entered.load(Ordering::SeqCst) > 0
    });
    bus.publish("chat:message", json!({ "text": "hi" }))
        .unwrap();
    wait_for("the chat message", || {
        chat.events.lock().unwrap().len() == 1
    });
    assert_eq!(
        gate.entered.load(Ordering::SeqCst),
        1,
        "still stuck in the first batch"
    );
    gate.release();
    drop(guard);
}

/// Publishes `n` events on `t:full:x` while the dispatch thread is stuck, so
/// nothing is released; returns (bus, gate, guard) for inspection.
fn flood_with_stuck_dispatch(
    policy: Policy,
    n: usize,
) -> (BatchingBus, Arc<Gate>, spillway::Guard) {
    let cfg = BatchConfig::builder()
        .memory_budget(64 << 10)
        .policy("t:*", policy)
        .build()
        .unwrap();
    let (bus, guard, _) = bus(cfg);
    let gate = Gate::new();
    bus.subscribe("t:*", gate.clone()).unwrap();
    // The first batch parks the dispatch thread; everything after it stays queued.
    bus.publish("t:full:x", json!({ "i": -1 })).unwrap();
    bus.engine().flush_timeout(Duration::from_millis(1)).ok();
    wait_for("the dispatch thread to be stuck", || {
        gate.entered.load(Ordering::SeqCst) > 0
    });
    for i in 0..n {
        bus.publish("t:full:x", json!({ "i": i, "pad": "p".repeat(100) }))
            .unwrap();
    }
    (bus, gate, guard)
}

// Catches unbounded memory and silent loss with on_full = drop_newest.
#[test]
fn memory_budget_drop_newest_bounds_memory_and_counts_drops() {
    let policy = Policy::batch(Duration::from_millis(5), 50).on_full(OnFull::DropNewest);
    let (bus, gate, guard) = flood_with_stuck_dispatch(policy, 5000);
    let stats = bus.stats();
    assert!(
        stats.queued_bytes <= stats.memory_budget + stats.memory_budget / 8,
        "queued {} over budget {}",
        stats.queued_bytes,
        stats.memory_budget
    );
    let p = &stats.prefixes["t:full"];
    assert!(
        p.dropped > 0,
        "a 64 KiB budget cannot hold 5000 ~200-byte events"
    );
    assert_eq!(
        p.accepted + p.dropped,
        5001,
        "every event is accepted or counted"
    );
    gate.release();
    drop(guard);
}

// Catches drop_oldest keeping the old records (or losing count of them).
#[test]
fn memory_budget_drop_oldest_keeps_the_newest_and_counts_drops() {
    let policy = Policy::batch(Duration::from_secs(3600), 1_000_000)
        .on_full(OnFull::DropOldest)
        .block_timeout(Duration::from_secs(10));
    let cfg = BatchConfig::builder()
        .memory_budget(64 << 10)
        .policy("t:*", policy)
        .build()
        .unwrap();
    let (bus, guard, _) = bus(cfg);
    let c = Arc::new(Collector::default());
    bus.subscribe("t:*", c.clone()).unwrap();
    for i in 0..5000 {
        bus.publish("t:old:x", json!({ "i": i, "pad": "p".repeat(100) }))
            .unwrap();
    }
    let stats = bus.stats();
    assert!(stats.queued_bytes <= stats.memory_budget + stats.memory_budget / 8);
    bus.flush().unwrap();
    let stats = bus.stats();
    let p = &stats.prefixes["t:old"];
    assert!(p.dropped > 0);
    let kept: Vec<i64> = c
        .batches
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|e| e.payload["i"].as_i64().unwrap())
        .collect();
    assert_eq!(
        kept.len() as u64 + p.dropped,
        5000,
        "every event is kept or counted"
    );
    assert_eq!(*kept.last().unwrap(), 4999, "the newest event survives");
    assert!(
        kept.windows(2).all(|w| w[0] < w[1]),
        "survivors keep their order"
    );
    drop(guard);
}

// Catches a blocked publisher that never resumes, or block that drops without waiting.
#[test]
fn memory_budget_block_waits_for_room_then_drops_at_its_deadline() {
    let policy = Policy::batch(Duration::from_millis(5), 50)
        .on_full(OnFull::Block)
        .block_timeout(Duration::from_millis(5));
    // ~250 events fill 64 KiB; each one after that waits 5 ms, then is dropped.
    let (bus, gate, guard) = flood_with_stuck_dispatch(policy, 400);
    let before = bus.stats().prefixes["t:full"].dropped;
    assert!(
        before > 0,
        "blocked publishers give up at their deadline and count the drop"
    );
    // Once the stuck subscriber lets go, room appears and publishing resumes.
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    {
        let bus = bus.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            // With the gate stuck this would drop after 5 ms; released, it fits.
            let mut accepted_after_release = false;
            for i in 0..1000 {
                bus.publish("t:full:y", json!({ "i": i })).unwrap();
                if done.load(Ordering::SeqCst) {
                    accepted_after_release = true;
                    break;
                }
            }
            tx.send(accepted_after_release).unwrap();
        });
    }
    gate.release();
    done.store(true, Ordering::SeqCst);
    assert!(rx.recv_timeout(Duration::from_secs(30)).unwrap());
    bus.flush().unwrap();
    let stats = bus.stats();
    assert!(stats.queued_bytes <= stats.memory_budget);
    drop(guard);
}

// Catches drops that leave no trace in the stream: the next batch carries the count.
#[test]
fn dropped_count_travels_in_the_next_batch_and_its_notice() {
    #[derive(Default)]
    struct Seen(Mutex<Vec<(u64, Option<String>)>>);
    struct Sink(Arc<Seen>);
    impl spillway::Sink for Sink {
        fn write_batch(&mut self, b: &spillway::Batch) -> spillway::Result<()> {
            let notice = b.drop_notice().map(|n| n.message);
            self.0 .0.lock().unwrap().push((b.dropped, notice));
            Ok(())
        }
        fn flush(&mut self) -> spillway::Result<()> {
            Ok(())
        }
    }
    let seen = Arc::new(Seen::default());
    let cfg = BatchConfig::builder()
        .memory_budget(64 << 10)
        .policy(
            "t:*",
            Policy::batch(Duration::from_millis(5), 50).on_full(OnFull::DropNewest),
        )
        .build()
        .unwrap();
    let (engine, guard) = Engine::builder(cfg)
        .sink(Box::new(Sink(seen.clone())))
        .build()
        .unwrap();
    let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
    let gate = Gate::new();
    bus.subscribe("t:*", gate.clone()).unwrap();
    bus.publish("t:d:x", json!({})).unwrap();
    wait_for("stuck", || gate.entered.load(Ordering::SeqCst) > 0);
    for i in 0..5000 {
        bus.publish("t:d:x", json!({ "i": i, "pad": "p".repeat(100) }))
            .unwrap();
    }
    gate.release();
    bus.flush().unwrap();
    let dropped = bus.stats().prefixes["t:d"].dropped;
    assert!(dropped > 0);
    let seen = seen.0.lock().unwrap();
    let carried: u64 = seen.iter().map(|(d, _)| d).sum();
    assert_eq!(carried, dropped, "the batches carry every drop");
    let notice = seen
        .iter()
        .find_map(|(_, n)| n.clone())
        .expect("a drop notice");
    assert!(notice.contains("records dropped on t:d since"), "{notice}");
    drop(guard);
}

// Catches one panicking subscriber taking the others (or the engine) down.
#[test]
fn a_panicking_subscriber_is_isolated_and_counted() {
    struct Boom;
    impl BatchAwareSubscriber for Boom {
        fn on_event(&self, _e: &BusEvent) {
            panic!("subscriber bug");
        }
    }
    let (bus, _g, _) = bus(config(Policy::batch(Duration::from_millis(5), 10)));
    bus.subscribe("t:*", Arc::new(Boom)).unwrap();
    bus.subscribe("chat:*", Arc::new(Boom)).unwrap();
    let c = Arc::new(Collector::default());
    bus.subscribe("t:*", c.clone()).unwrap();
    bus.subscribe("chat:*", c.clone()).unwrap();
    for i in 0..95 {
        bus.publish("t:p:x", json!({ "i": i })).unwrap();
    }
    bus.publish("chat:message", json!({})).unwrap();
    bus.flush().unwrap();
    assert_eq!(c.batched_events(), 95);
    assert_eq!(c.events.lock().unwrap().len(), 1);
    assert!(
        bus.stats().subscriber_panics >= 11,
        "10 batches + 1 passthrough panicked"
    );
}

// Catches a guard whose drop forgets the open batches.
#[test]
fn dropping_the_guard_flushes() {
    let (bus, guard, _) = bus(config(Policy::batch(Duration::from_secs(3600), 1000)));
    let c = Arc::new(Collector::default());
    bus.subscribe("t:*", c.clone()).unwrap();
    for i in 0..42 {
        bus.publish("t:g:x", json!({ "i": i })).unwrap();
    }
    drop(guard);
    assert_eq!(c.batched_events(), 42);
    assert!(matches!(
        bus.publish("t:g:x", json!({})),
        Err(spillway::Error::ShutDown)
    ));
}

// Catches a shutdown that hangs forever on a stuck subscriber.
#[test]
fn dropping_the_guard_with_a_stuck_subscriber_returns() {
    let cfg = BatchConfig::builder()
        .shutdown_timeout(Duration::from_millis(200))
        .policy("t:*", Policy::batch(Duration::from_millis(1), 1))
        .build()
        .unwrap();
    let (bus, guard, _) = bus(cfg);
    let gate = Gate::new();
    bus.subscribe("t:*", gate.clone()).unwrap();
    bus.publish("t:s:x", json!({})).unwrap();
    wait_for("stuck", || gate.entered.load(Ordering::SeqCst) > 0);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(guard);
        tx.send(()).unwrap();
    });
    let returned = rx.recv_timeout(Duration::from_secs(30));
    gate.release();
    assert!(returned.is_ok(), "guard drop hung on a stuck subscriber");
}

// Catches the republished batch event drifting from the documented shape.
#[test]
fn inner_bus_gets_one_batch_event_with_the_documented_payload() {
    let (bus, _g, inner) = bus(config(Policy::batch(Duration::from_secs(3600), 3)));
    let c = Arc::new(Collector::default());
    inner.subscribe("t:*", c.clone()).unwrap();
    for i in 0..3 {
        bus.publish("t:users:created", json!({ "id": i })).unwrap();
    }
    bus.flush().unwrap();
    let events = c.events.lock().unwrap();
    assert_eq!(events.len(), 1, "one consolidated event, not three");
    assert_eq!(events[0].name, "t:users:batch");
    let p = &*events[0].payload;
    assert_eq!(p["count"], 3);
    assert_eq!(p["dropped"], 0);
    assert!(p["first_ts"].as_str().unwrap().ends_with('Z'));
    assert!(p["last_ts"].is_string());
    assert_eq!(
        p["events"][2],
        json!({"name": "t:users:created", "payload": {"id": 2}})
    );
}

// Catches telemetry reaching the bus once per sample instead of once per window.
#[test]
fn summarized_policy_republishes_one_summary_per_window() {
    let cfg = BatchConfig::builder()
        .policy(
            "gpu:*",
            Policy::batch(Duration::from_secs(3600), 10)
                .summarize("stats")
                .prefix_depth(1),
        )
        .build()
        .unwrap();
    let (bus, _g, inner) = bus(cfg);
    let c = Arc::new(Collector::default());
    inner.subscribe("gpu:*", c.clone()).unwrap();
    for i in 0..10 {
        for dev in 0..2 {
            bus.engine()
                .publish_sample(
                    format!("gpu:{dev}"),
                    json!({ "temp_celsius": 50 + i + dev, "name": "RTX 5090" }),
                )
                .unwrap();
        }
    }
    bus.flush().unwrap();
    let events = c.events.lock().unwrap();
    assert_eq!(events.len(), 2, "20 samples, windows of 10: two summaries");
    assert!(events.iter().all(|e| e.name == "gpu:batch"));
    let s = &events[0].payload["summary"]["series"]["gpu:0"];
    assert_eq!(s["temp_celsius"]["min"], 50.0);
    assert_eq!(s["temp_celsius"]["max"], 54.0);
    assert_eq!(s["temp_celsius"]["mean"], 52.0);
    assert_eq!(s["name"], "RTX 5090");
}

// Catches invalid names being batched under an empty or wildcard key.
#[test]
fn invalid_names_are_refused_with_the_name_quoted() {
    let (bus, _g, _) = bus(BatchConfig::default());
    let err = bus
        .publish("data:::users", Value::Null)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"data:::users\""), "{err}");
    assert!(bus
        .subscribe("data:**", Arc::new(Collector::default()))
        .is_err());
}

// Catches an async stream that loses batches silently, and a flush that blocks the runtime.
#[test]
fn stream_subscription_reports_lag_and_flush_async_works_on_a_current_thread_runtime() {
    let (bus, _g, _) = bus(config(Policy::batch(Duration::from_secs(3600), 1)));
    let mut stream = bus.subscribe_stream("t:*", 2).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..5 {
            bus.publish("t:s:x", json!({ "i": i })).unwrap();
        }
        bus.flush_async().await.unwrap();
        let first = stream.recv().await.unwrap();
        assert_eq!(
            first,
            Err(Lagged(3)),
            "5 one-event batches into a 2-slot stream"
        );
        let a = stream.recv().await.unwrap().unwrap();
        let b = stream.recv().await.unwrap().unwrap();
        assert_eq!(a[0].payload["i"], 0);
        assert_eq!(b[0].payload["i"], 1);
    });
}

// Catches one flooding prefix starving the others of the memory budget (a
// DEBUG storm from one module costing every other module its records).
#[test]
fn a_flooding_prefix_cannot_take_the_whole_budget_from_a_quiet_one() {
    let policy = Policy::batch(Duration::from_millis(5), 50).on_full(OnFull::DropNewest);
    let (bus, gate, guard) = flood_with_stuck_dispatch(policy, 5000);
    for i in 0..20 {
        bus.publish("t:quiet:x", json!({ "i": i, "pad": "p".repeat(100) }))
            .unwrap();
    }
    let stats = bus.stats();
    assert!(
        stats.prefixes["t:full"].dropped > 0,
        "the flood was held back"
    );
    let quiet = &stats.prefixes["t:quiet"];
    assert_eq!(
        (quiet.accepted, quiet.dropped),
        (20, 0),
        "the quiet prefix lost records"
    );
    gate.release();
    drop(guard);
}

// Catches a panic hook that does not flush: records published just before a
// panic must reach the sinks even though nobody calls flush().
#[test]
fn the_panic_hook_flushes_before_the_process_goes_down() {
    struct Count(Arc<AtomicUsize>);
    impl spillway::Sink for Count {
        fn write_batch(&mut self, b: &spillway::Batch) -> spillway::Result<()> {
            self.0.fetch_add(b.records.len(), Ordering::SeqCst);
            Ok(())
        }
        fn flush(&mut self) -> spillway::Result<()> {
            Ok(())
        }
    }
    let written = Arc::new(AtomicUsize::new(0));
    let (engine, _guard) = Engine::builder(config(Policy::batch(Duration::from_secs(3600), 1000)))
        .sink(Box::new(Count(written.clone())))
        .build()
        .unwrap();
    engine.flush_on_panic(Duration::from_secs(10));
    let e = engine.clone();
    let r = std::thread::spawn(move || {
        for i in 0..7 {
            e.publish("t:crash:x", json!({ "i": i })).unwrap();
        }
        panic!("service bug");
    })
    .join();
    assert!(r.is_err());
    assert_eq!(written.load(Ordering::SeqCst), 7);
}

// Catches a panicking sink killing the sink thread: later batches would then
// vanish while flush() still said Ok. The panic must be counted and the sink
// must go on receiving.
#[test]
fn a_panicking_sink_is_counted_and_keeps_receiving() {
    struct Flaky(Arc<AtomicUsize>);
    impl spillway::Sink for Flaky {
        fn write_batch(&mut self, b: &spillway::Batch) -> spillway::Result<()> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("sink bug");
            }
            assert!(!b.records.is_empty());
            Ok(())
        }
        fn flush(&mut self) -> spillway::Result<()> {
            Ok(())
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let (engine, _guard) = Engine::builder(config(Policy::batch(Duration::from_secs(3600), 5)))
        .sink(Box::new(Flaky(calls.clone())))
        .build()
        .unwrap();
    for i in 0..20 {
        engine.publish("t:sink:x", json!({ "i": i })).unwrap();
    }
    engine.flush().unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "all four batches reached the sink"
    );
    let stats = engine.stats();
    assert_eq!(stats.sink_errors, 1);
    assert!(stats.last_sink_error.unwrap().contains("panicked"));
}

// Catches an async stream that never ends after shutdown (a task looping on
// recv() would then hang the service's graceful shutdown).
#[test]
fn stream_subscriptions_end_when_the_engine_shuts_down() {
    let (bus, guard, _) = bus(config(Policy::batch(Duration::from_secs(3600), 1)));
    let mut stream = bus.subscribe_stream("t:*", 8).unwrap();
    bus.publish("t:s:x", json!({})).unwrap();
    drop(guard);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(
            matches!(stream.recv().await, Some(Ok(_))),
            "the flushed batch"
        );
        assert!(stream.recv().await.is_none(), "then the end of the stream");
    });
}
