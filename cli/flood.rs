//! The start-up flood that made the user's machine unhealthy, replayable over
//! spillway or over the per-event bus it replaced (the peer).
//!
//! A code indexer publishes one event per file as fast as it can, an ORM one
//! per row, a chat a message every 5 ms, and a health check is sent every
//! 10 ms and answered by a passthrough subscriber. Some subscribers are slow
//! (they pay a fixed cost per call, like writing an IPC frame).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spillway::{now_ns, BatchAwareSubscriber, BatchingBus, BusEvent, Pattern};

/// A bus the flood can run over.
pub trait FloodBus: Send + Sync {
    fn publish(&self, name: &str, payload: Value);
    fn subscribe(&self, pattern: &str, sub: Arc<dyn BatchAwareSubscriber>);
    /// Waits until everything published has been delivered (or lost).
    fn settle(&self);
    /// Events that never reached a subscriber (dropped, lagged).
    fn lost(&self) -> u64;
    /// Dispatches the bus had to make, where it clones every event to every
    /// subscriber whatever its pattern, counting those a lagging subscriber
    /// lost (`None`: only its matching callback calls).
    fn clones_delivered(&self) -> Option<u64> {
        None
    }
}

impl FloodBus for BatchingBus {
    fn publish(&self, name: &str, payload: Value) {
        // Names here are valid constants; a refusal would be a bug in the demo.
        if let Err(e) = BatchingBus::publish(self, name, payload) {
            eprintln!("publish {name}: {e}");
        }
    }
    fn subscribe(&self, pattern: &str, sub: Arc<dyn BatchAwareSubscriber>) {
        if let Err(e) = BatchingBus::subscribe(self, pattern, sub) {
            eprintln!("subscribe {pattern}: {e}");
        }
    }
    fn settle(&self) {
        if let Err(e) = self.flush() {
            eprintln!("flush: {e}");
        }
    }
    fn lost(&self) -> u64 {
        self.stats().total.dropped
    }
}

/// The user's bus before spillway: one `tokio::sync::broadcast` send per
/// event (capacity 1024), one receiver thread and one dispatch per subscriber
/// per event.
pub struct PeerBus {
    tx: tokio::sync::broadcast::Sender<BusEvent>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    lagged: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

/// Tells the peer's receiver threads to exit.
const CLOSE: &str = "peer:close";

/// The peer's channel capacity, as in the user's MessageBus.
pub const PEER_CAPACITY: usize = 1024;

impl PeerBus {
    pub fn new() -> PeerBus {
        let (tx, _) = tokio::sync::broadcast::channel(PEER_CAPACITY);
        PeerBus {
            tx,
            threads: Mutex::new(Vec::new()),
            lagged: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sends one event; the caller's whole cost on the peer.
    pub fn send(&self, ev: BusEvent) {
        let _ = self.tx.send(ev);
    }

    /// Stops the receiver threads and joins them.
    pub fn close(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        if threads.is_empty() {
            return;
        }
        // Retry until every receiver has seen the close marker (a lagging one may skip it).
        let deadline = Instant::now() + Duration::from_secs(30);
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            let _ = self.tx.send(BusEvent::new(CLOSE, Value::Null));
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for PeerBus {
    fn drop(&mut self) {
        self.close();
    }
}

impl FloodBus for PeerBus {
    fn publish(&self, name: &str, payload: Value) {
        self.send(BusEvent::new(name, payload));
    }
    fn subscribe(&self, pattern: &str, sub: Arc<dyn BatchAwareSubscriber>) {
        let Ok(pattern) = Pattern::parse(pattern) else {
            eprintln!("bad pattern {pattern}");
            return;
        };
        let mut rx = self.tx.subscribe();
        let lagged = self.lagged.clone();
        let received = self.received.clone();
        let t = std::thread::spawn(move || loop {
            use tokio::sync::broadcast::error::RecvError;
            match rx.blocking_recv() {
                Ok(ev) if ev.name == CLOSE => return,
                Ok(ev) => {
                    received.fetch_add(1, Ordering::Relaxed);
                    if pattern.matches(&ev.name) {
                        sub.on_event(&ev);
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    lagged.fetch_add(n, Ordering::Relaxed);
                    received.fetch_add(n, Ordering::Relaxed);
                }
                Err(RecvError::Closed) => return,
            }
        });
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
    }
    fn settle(&self) {
        // Queued values are those not yet seen (or skipped) by every receiver.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.tx.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    fn lost(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }
    fn clones_delivered(&self) -> Option<u64> {
        // Every event is cloned to every receiver; those lost to lag were
        // still sent to it (and would have been dispatched had it kept up).
        Some(self.received.load(Ordering::Relaxed))
    }
}

/// Counts calls and events; spins `cost` per call, like a subscriber that
/// writes one IPC frame per call.
pub struct Worker {
    pub calls: AtomicU64,
    pub events: AtomicU64,
    cost: Duration,
}

impl Worker {
    pub fn new(cost: Duration) -> Arc<Worker> {
        Arc::new(Worker {
            calls: AtomicU64::new(0),
            events: AtomicU64::new(0),
            cost,
        })
    }
    fn work(&self) {
        if !self.cost.is_zero() {
            let t = Instant::now();
            while t.elapsed() < self.cost {
                std::hint::spin_loop();
            }
        }
    }
}

impl BatchAwareSubscriber for Worker {
    fn on_event(&self, _e: &BusEvent) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
        self.work();
    }
    fn on_batch(&self, events: &[BusEvent]) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.work();
    }
}

/// Answers health checks: records the time from publish to delivery.
#[derive(Default)]
pub struct Health {
    pub latencies_ns: Mutex<Vec<i64>>,
}

impl BatchAwareSubscriber for Health {
    fn on_event(&self, e: &BusEvent) {
        let lat = now_ns() - e.ts_ns;
        self.latencies_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(lat);
    }
}

/// How big the flood is.
#[derive(Clone, Debug)]
pub struct FloodSpec {
    /// Files the code indexer announces (`data:code_index:created`).
    pub files: usize,
    /// ORM rows (`data:<table>:<op>`).
    pub rows: usize,
    /// Keep health checks and chat going at least this long.
    pub min_duration: Duration,
}

/// What happened.
#[derive(Clone, Debug, Default)]
pub struct FloodReport {
    pub published: u64,
    /// Events handed to subscriber callbacks (summed over subscribers).
    pub delivered: u64,
    /// Subscriber callback invocations.
    pub calls: u64,
    /// Per-subscriber dispatches: callback calls, or for a bus that clones
    /// every event to every subscriber's queue, those deliveries.
    pub dispatches: u64,
    pub lost: u64,
    pub health_sent: u64,
    pub health_answered: u64,
    pub health_p50_us: f64,
    pub health_p99_us: f64,
    pub health_max_us: f64,
    pub elapsed: Duration,
}

impl FloodReport {
    /// Events delivered per subscriber call.
    pub fn reduction(&self) -> f64 {
        self.delivered as f64 / self.calls.max(1) as f64
    }
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs the flood over `bus` and reports.
pub fn run(bus: Arc<dyn FloodBus>, spec: &FloodSpec) -> FloodReport {
    let workers = [
        ("data:*", Worker::new(Duration::from_micros(5))), // UI bridge: one IPC frame per call
        ("data:code_index:*", Worker::new(Duration::from_micros(2))), // search index updater
        ("data:users:*", Worker::new(Duration::ZERO)),     // cache invalidation
        ("chat:*", Worker::new(Duration::ZERO)),           // chat UI
    ];
    for (p, w) in &workers {
        bus.subscribe(p, w.clone());
    }
    let health = Arc::new(Health::default());
    bus.subscribe("health:*", health.clone());

    let start = Instant::now();
    let published = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    type Publisher = Box<dyn FnOnce(&dyn FloodBus) -> u64 + Send>;
    let spawn_pub = |f: Publisher| {
        let bus = bus.clone();
        let published = published.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let n = f(&*bus);
            published.fetch_add(n, Ordering::Relaxed);
            done.fetch_add(1, Ordering::Relaxed);
        })
    };
    let files = spec.files;
    let indexer = spawn_pub(Box::new(move |bus| {
        for i in 0..files {
            bus.publish(
                "data:code_index:created",
                json!({ "path": format!("src/module_{}/file_{i}.rs", i % 97), "bytes": i * 31 }),
            );
        }
        files as u64
    }));
    let rows = spec.rows;
    let orm = spawn_pub(Box::new(move |bus| {
        const TABLES: [&str; 4] = ["users", "projects", "messages", "sessions"];
        const OPS: [&str; 3] = ["created", "updated", "deleted"];
        for i in 0..rows {
            let table = TABLES[i % TABLES.len()];
            let op = OPS[(i / TABLES.len()) % OPS.len()];
            bus.publish(
                &format!("data:{table}:{op}"),
                json!({ "id": i, "table": table }),
            );
        }
        rows as u64
    }));
    let min = spec.min_duration;
    let mut health_sent = 0u64;
    let mut tick = 0u64;
    let mut next = Instant::now();
    while done.load(Ordering::Relaxed) < 2 || start.elapsed() < min {
        bus.publish("health:ping", json!({ "seq": tick }));
        health_sent += 1;
        if tick.is_multiple_of(2) {
            bus.publish(
                "chat:message",
                json!({ "text": "still there?", "seq": tick }),
            );
            published.fetch_add(1, Ordering::Relaxed);
        }
        published.fetch_add(1, Ordering::Relaxed);
        tick += 1;
        next += Duration::from_millis(10);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    let _ = indexer.join();
    let _ = orm.join();
    bus.settle();
    let elapsed = start.elapsed();
    let mut lat = health
        .latencies_ns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    lat.sort_unstable();
    let (mut delivered, mut calls) = (0, 0);
    for (_, w) in &workers {
        delivered += w.events.load(Ordering::Relaxed);
        calls += w.calls.load(Ordering::Relaxed);
    }
    let calls = calls + lat.len() as u64;
    FloodReport {
        published: published.load(Ordering::Relaxed),
        delivered: delivered + lat.len() as u64,
        calls,
        dispatches: bus.clones_delivered().unwrap_or(calls).max(calls),
        lost: bus.lost(),
        health_sent,
        health_answered: lat.len() as u64,
        health_p50_us: percentile(&lat, 0.50),
        health_p99_us: percentile(&lat, 0.99),
        health_max_us: lat.last().map_or(f64::NAN, |&x| x as f64 / 1000.0),
        elapsed,
    }
}
