//! The coalescing engine.
//!
//! One engine thread owns an accumulator per prefix (and policy). It sweeps
//! the publishers' slots, appends records to their accumulators, and closes a
//! batch on `max_count`, `max_bytes` or `max_interval` from the batch's first
//! record, whichever comes first, on its own clock. Closed batches go to two
//! more threads: the sink thread (segments, SQLite) and the dispatch thread
//! (batch-aware subscribers and the inner bus). Passthrough events have a
//! fourth thread to themselves, so a flood elsewhere never delays them.
//! Closed batches travel a group per engine round, and once delivered their
//! records come back to the engine thread, which reuses them for new batches
//! (see `Recycler`). No lock is held while user code runs, and no async
//! runtime is needed.
//!
//! ```
//! use spillway::{BatchConfig, Engine};
//! let (engine, _guard) = Engine::builder(BatchConfig::default()).build().unwrap();
//! engine.publish("data:users:created", serde_json::json!({"id": 1})).unwrap();
//! engine.flush().unwrap();
//! assert_eq!(engine.stats().prefixes["data:users"].accepted, 1);
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::layer::budget::{Budget, Reservation};
use crate::layer::bus::{BatchAwareSubscriber, InnerBus};
use crate::layer::capture::CapturedLogs;
use crate::layer::config::{BatchConfig, OnFull};
use crate::layer::intake::{
    Chunk, Entry, FxMap, Slot, F_EVICT, F_PASSTHROUGH, F_URGENT, SPARE_CHUNKS,
};
use crate::layer::name::{prefix_of, Pattern};
use crate::layer::record::{
    estimate_log, estimate_value, now_ns, resync_clock, touch_logs, Batch, BusEvent, FieldValue,
    LogRecord, Payload, RecordKind, Records,
};
use crate::layer::summary::{StatsReducer, Summarizer};
use crate::layer::tracing_layer::{captured_record, fill_record};

/// How long the engine lets records collect in publishers' slots before it
/// sweeps them, while records are flowing: 1 ms.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(1);
/// Prefixes the per-prefix stats keep before quiet ones are folded together.
pub const MAX_STATS_PREFIXES: usize = 4096;
/// The stats entry that quiet prefixes are folded into past [`MAX_STATS_PREFIXES`].
pub const PRUNED_PREFIXES: &str = "(pruned quiet prefixes)";
/// Passthrough events waiting for delivery before new ones are dropped (and counted).
pub const PASSTHROUGH_QUEUE: usize = 65_536;

/// Emptied record vectors the engine keeps for reuse (per kind), and the
/// largest it keeps.
const SPARE_RECORD_VECS: usize = 16;
const SPARE_RECORDS_MAX_LEN: usize = 1024;
/// Delivered records the engine keeps for reuse while idle, per kind.
const POOL_IDLE: usize = 2048;
/// Captured-log batch buffers the engine keeps for reuse while idle.
const CAPTURED_IDLE: usize = 16;
/// During a flood the pools may hold records weighing up to this fraction
/// of the memory budget each. A record is only made new when the pool has
/// none, so the pool never holds more than were queued at once, which the
/// budget bounds: the whole budget is the right cap. An eighth made the pool
/// overflow and run dry in turns under a flood (records freed, then made
/// again), a tenth of the engine's time in malloc and free.
const POOL_BUDGET_SHARE: usize = 1;
/// Default deadline for [`Engine::flush`]: 30 s.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Where closed batches are written (segments, SQLite, ...). Runs on the
/// engine's sink thread, one batch at a time, in close order.
pub trait Sink: Send + 'static {
    /// Writes one batch. An error is counted and reported; the batch is not retried.
    fn write_batch(&mut self, batch: &Batch) -> Result<()>;
    /// Makes everything written so far durable to the sink's own standard.
    fn flush(&mut self) -> Result<()>;
    /// Called at least every 50 ms, so a sink can flush on its own delay.
    fn tick(&mut self, _now: Instant) -> Result<()> {
        Ok(())
    }
    /// Whether this sink reads log batches in the form spillway captures
    /// them, without [`LogRecord`]s (spillway's segment writer does). The
    /// token keeps it to spillway's own sinks: any other sink always gets
    /// its batches' records built.
    #[doc(hidden)]
    fn reads_captured_logs(&self, _: sealed::Token) -> bool {
        false
    }
}

/// Keeps [`Sink::reads_captured_logs`] to this crate's sinks: the type is
/// public but cannot be named outside the crate.
pub(crate) mod sealed {
    /// Only spillway can make one.
    #[derive(Debug)]
    pub struct Token;
}

/// Counters for one prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PrefixStats {
    /// Records taken into a batch.
    pub accepted: u64,
    /// Batches closed.
    pub batches: u64,
    /// Records dropped because the memory budget was spent (or the passthrough queue was full).
    pub dropped: u64,
    /// Events delivered on the passthrough path.
    pub passthrough: u64,
    /// The most records ever waiting in one open batch.
    pub max_queue: usize,
}

impl PrefixStats {
    fn add(&mut self, o: &PrefixStats) {
        self.accepted += o.accepted;
        self.batches += o.batches;
        self.dropped += o.dropped;
        self.passthrough += o.passthrough;
        self.max_queue = self.max_queue.max(o.max_queue);
    }
}

/// A snapshot of the engine's counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Per prefix.
    pub prefixes: BTreeMap<String, PrefixStats>,
    /// Summed over prefixes (`max_queue` is the maximum).
    pub total: PrefixStats,
    /// Bytes of the memory budget in use now.
    pub queued_bytes: usize,
    /// The memory budget.
    pub memory_budget: usize,
    /// Subscriber calls that panicked (each was caught).
    pub subscriber_panics: u64,
    /// Sink writes or flushes that failed.
    pub sink_errors: u64,
    /// The last sink error, for the operator.
    pub last_sink_error: Option<String>,
}

/// Counts down to zero; waitable from threads and from async code.
pub(crate) struct Completion {
    remaining: Mutex<usize>,
    cv: Condvar,
    notify: tokio::sync::Notify,
}

impl Completion {
    pub(crate) fn new(n: usize) -> Arc<Completion> {
        Arc::new(Completion {
            remaining: Mutex::new(n),
            cv: Condvar::new(),
            notify: tokio::sync::Notify::new(),
        })
    }
    pub(crate) fn done(&self) {
        let mut r = self.remaining.lock().unwrap_or_else(|e| e.into_inner());
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.cv.notify_all();
            self.notify.notify_waiters();
        }
    }
    fn is_done(&self) -> bool {
        *self.remaining.lock().unwrap_or_else(|e| e.into_inner()) == 0
    }
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut r = self.remaining.lock().unwrap_or_else(|e| e.into_inner());
        while *r > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            r = self
                .cv
                .wait_timeout(r, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
    pub(crate) async fn wait_async(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) enum CtlMsg {
    Entries(Chunk),
    Flush(Arc<Completion>),
    Stats(mpsc::Sender<Stats>),
    Stop(Arc<Completion>),
}

enum OutMsg {
    Batches(Vec<Arc<Batch>>),
    Barrier(Arc<Completion>),
    Stop(Arc<Completion>),
}

enum PtMsg {
    Event(BusEvent, usize),
    Barrier(Arc<Completion>),
    Stop(Arc<Completion>),
}

pub(crate) struct SubEntry {
    pub(crate) id: u64,
    pub(crate) pattern: Pattern,
    pub(crate) sub: Arc<dyn BatchAwareSubscriber>,
}

/// The accumulator a dropped record would have joined: (prefix, policy, kind).
type DropKey = (Box<str>, u16, RecordKind);

/// State shared by the handle, the publishers and the engine's threads.
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) config: BatchConfig,
    pub(crate) budget: Arc<Budget>,
    pub(crate) slots: Mutex<Vec<Arc<Slot>>>,
    pub(crate) idle: AtomicBool,
    pub(crate) chunk_ready: AtomicBool,
    pub(crate) closed: AtomicBool,
    engine_thread: OnceLock<Thread>,
    ctl: Mutex<Sender<CtlMsg>>,
    pt_tx: Mutex<Sender<PtMsg>>,
    pt_pending: AtomicUsize,
    pt_bytes: AtomicUsize,
    drops: Mutex<HashMap<DropKey, (u64, i64)>>,
    shares: Mutex<HashMap<Box<str>, Arc<AtomicUsize>>>,
    pub(crate) subs: RwLock<Arc<Vec<Arc<SubEntry>>>>,
    pub(crate) next_sub_id: AtomicU64,
    pub(crate) inner: RwLock<Option<Arc<dyn InnerBus>>>,
    subscriber_panics: AtomicU64,
    sink_errors: AtomicU64,
    last_sink_error: Mutex<Option<String>>,
    final_stats: Mutex<Option<Stats>>,
}

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

impl Shared {
    pub(crate) fn wake(&self) {
        if let Some(t) = self.engine_thread.get() {
            t.unpark();
        }
    }

    /// Sends to the engine thread; returns the message if the engine is gone.
    pub(crate) fn send_ctl(&self, msg: CtlMsg) -> Option<CtlMsg> {
        let sent = self.ctl.lock().unwrap_or_else(|e| e.into_inner()).send(msg);
        self.wake();
        sent.err().map(|e| e.0)
    }

    /// The byte counter of `prefix`, shared by publishers and the engine.
    pub(crate) fn share_for(&self, prefix: &str) -> Arc<AtomicUsize> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        match shares.get(prefix) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(AtomicUsize::new(0));
                shares.insert(prefix.into(), s.clone());
                s
            }
        }
    }

    /// Counts a record refused for lack of memory, against the accumulator
    /// (prefix, policy, kind) it would have joined.
    pub(crate) fn count_drop(&self, prefix: &str, policy: u16, kind: RecordKind, ts_ns: i64) {
        let mut drops = self.drops.lock().unwrap_or_else(|e| e.into_inner());
        let d = drops
            .entry((prefix.into(), policy, kind))
            .or_insert((0, ts_ns));
        d.0 += 1;
    }

    /// Hands a passthrough event to its delivery thread. The queue is bounded
    /// in events and in bytes (a quarter of the memory budget); past either,
    /// the delivery is dropped and counted.
    pub(crate) fn deliver_passthrough(
        &self,
        ev: &BusEvent,
        size: usize,
        policy: u16,
        kind: RecordKind,
    ) {
        let queued = self.pt_pending.fetch_add(1, Ordering::AcqRel);
        let bytes = self.pt_bytes.fetch_add(size, Ordering::AcqRel);
        if queued >= PASSTHROUGH_QUEUE || bytes + size > self.config.memory_budget / 4 {
            self.pt_pending.fetch_sub(1, Ordering::AcqRel);
            self.pt_bytes.fetch_sub(size, Ordering::AcqRel);
            let depth = self.prefix_depth_of(policy);
            self.count_drop(prefix_of(&ev.name, depth), policy, kind, ev.ts_ns);
            return;
        }
        let _ = self
            .pt_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(PtMsg::Event(ev.clone(), size));
    }

    pub(crate) fn subscriber_panicked(&self, who: &str, pattern: &str) {
        let n = self.subscriber_panics.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            eprintln!("spillway: {who} for pattern {pattern:?} panicked ({n} subscriber panics so far); the others keep receiving");
        }
    }

    fn sink_failed(&self, err: &Error) {
        let n = self.sink_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let msg = err.to_string();
        if n.is_power_of_two() {
            eprintln!("spillway: sink error ({n} so far): {msg}");
        }
        *self
            .last_sink_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(msg);
    }
}

/// Builds an [`Engine`] with its sinks and reducers.
pub struct EngineBuilder {
    config: BatchConfig,
    sinks: Vec<Box<dyn Sink>>,
    summarizers: HashMap<String, Arc<dyn Summarizer>>,
}

impl EngineBuilder {
    /// Adds a sink; batches of persisted policies are written to every sink.
    pub fn sink(mut self, sink: Box<dyn Sink>) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Registers a reducer that policies can name in `summarize`.
    pub fn summarizer(mut self, name: impl Into<String>, s: Arc<dyn Summarizer>) -> Self {
        self.summarizers.insert(name.into(), s);
        self
    }

    /// Checks that every reducer the policies name exists, starts the
    /// engine's threads, and returns the handle and its guard.
    pub fn build(self) -> Result<(Engine, Guard)> {
        let c = &self.config;
        let named = c
            .rules
            .iter()
            .map(|(p, pol)| (p.to_string(), pol))
            .chain(std::iter::once(("default".to_string(), &c.default_policy)));
        for (pattern, pol) in named {
            if let Some(name) = &pol.summarize {
                if !self.summarizers.contains_key(name) {
                    return Err(Error::config(
                        format!("policy[{pattern}].summarize"),
                        format!("no reducer named {name:?} is registered"),
                    ));
                }
            }
        }
        let (ctl_tx, ctl_rx) = mpsc::channel();
        let (pt_tx, pt_rx) = mpsc::channel();
        let (sink_tx, sink_rx) = mpsc::channel();
        let (disp_tx, disp_rx) = mpsc::channel();
        let (spent_tx, spent_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            id: NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed),
            budget: Budget::new(self.config.memory_budget),
            config: self.config,
            slots: Mutex::new(Vec::new()),
            idle: AtomicBool::new(false),
            chunk_ready: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            engine_thread: OnceLock::new(),
            ctl: Mutex::new(ctl_tx),
            pt_tx: Mutex::new(pt_tx),
            pt_pending: AtomicUsize::new(0),
            pt_bytes: AtomicUsize::new(0),
            drops: Mutex::new(HashMap::new()),
            shares: Mutex::new(HashMap::new()),
            subs: RwLock::new(Arc::new(Vec::new())),
            next_sub_id: AtomicU64::new(1),
            inner: RwLock::new(None),
            subscriber_panics: AtomicU64::new(0),
            sink_errors: AtomicU64::new(0),
            last_sink_error: Mutex::new(None),
            final_stats: Mutex::new(None),
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(|e| Error::Other(format!("cannot start thread {name}: {e}")))
        };
        let has_sinks = !self.sinks.is_empty();
        let captured_logs =
            has_sinks && (self.sinks.iter()).all(|s| s.reads_captured_logs(sealed::Token));
        let s = shared.clone();
        let sinks = self.sinks;
        let spent = spent_tx.clone();
        spawn(
            "spillway-sink",
            Box::new(move || sink_loop(s, sinks, sink_rx, spent)),
        )?;
        let s = shared.clone();
        spawn(
            "spillway-dispatch",
            Box::new(move || dispatch_loop(s, disp_rx, spent_tx)),
        )?;
        let s = shared.clone();
        spawn(
            "spillway-passthrough",
            Box::new(move || passthrough_loop(s, pt_rx)),
        )?;
        let s = shared.clone();
        let summarizers = self.summarizers;
        let pool_limit = shared.config.memory_budget / POOL_BUDGET_SHARE;
        let handle = spawn(
            "spillway-engine",
            Box::new(move || {
                let mut st = EngineState {
                    shared: s,
                    accs: Accs::default(),
                    heap: BinaryHeap::new(),
                    stats: FxMap::default(),
                    // Microseconds since the epoch: ids stay unique across restarts.
                    next_batch_id: (now_ns() / 1000).max(1) as u64,
                    out: Outbox {
                        sink_tx: has_sinks.then_some(sink_tx),
                        disp_tx,
                        to_sink: Vec::new(),
                        to_dispatch: Vec::new(),
                        spare: Vec::new(),
                    },
                    summarizers,
                    key_buf: String::new(),
                    spent: spent_rx,
                    recycler: Recycler::new(pool_limit),
                    captured_logs,
                    urgent: Vec::new(),
                    last_prune: Instant::now(),
                    last_resync: Instant::now(),
                };
                st.run(ctl_rx);
            }),
        )?;
        let _ = shared.engine_thread.set(handle.thread().clone());
        let engine = Engine { shared };
        Ok((engine.clone(), Guard { engine }))
    }
}

/// A handle to the pipeline. Cheap to clone; every clone feeds the same engine.
#[derive(Clone)]
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl Engine {
    /// A builder for an engine with this configuration and the built-in `"stats"` reducer.
    pub fn builder(config: BatchConfig) -> EngineBuilder {
        let mut summarizers: HashMap<String, Arc<dyn Summarizer>> = HashMap::new();
        summarizers.insert("stats".into(), Arc::new(StatsReducer));
        EngineBuilder {
            config,
            sinks: Vec::new(),
            summarizers,
        }
    }

    /// The configuration this engine runs with.
    pub fn config(&self) -> &BatchConfig {
        &self.shared.config
    }

    /// Publishes a bus event. Passthrough names are delivered at once; the rest
    /// are batched by prefix. Fails only on an invalid name or after shutdown;
    /// a record refused for lack of memory is counted as dropped, not an error.
    ///
    /// The payload may be a [`serde_json::Value`] (moved in as it is) or an
    /// `Arc<Value>` already shared; see [`Payload`].
    pub fn publish(&self, name: impl AsRef<str>, payload: impl Into<Payload>) -> Result<()> {
        self.shared
            .submit_event(name.as_ref(), payload.into(), now_ns(), RecordKind::Event)
    }

    /// Publishes a prepared event (keeps its timestamp).
    pub fn publish_event(&self, event: BusEvent) -> Result<()> {
        self.shared.submit_event(
            &event.name,
            event.payload.into(),
            event.ts_ns,
            RecordKind::Event,
        )
    }

    /// Publishes a telemetry sample (batched like an event, marked `sample`).
    pub fn publish_sample(&self, name: impl AsRef<str>, payload: impl Into<Payload>) -> Result<()> {
        self.shared
            .submit_event(name.as_ref(), payload.into(), now_ns(), RecordKind::Sample)
    }

    /// Submits a log record under the key `log:<target>`. `urgent` records
    /// (WARN and ERROR by default in the tracing layer) close their batch at
    /// the next sweep and may use the budget's reserve.
    /// Takes the record boxed (or builds the box): it then moves through the
    /// pipeline as a pointer.
    pub fn submit_log(&self, record: impl Into<Box<LogRecord>>, urgent: bool) -> Result<()> {
        self.shared.submit_log(record.into(), urgent)
    }

    /// Waits until everything accepted before this call has been handed to
    /// the sinks (and flushed by them) and to subscribers, up to 30 s.
    pub fn flush(&self) -> Result<()> {
        self.flush_timeout(DEFAULT_FLUSH_TIMEOUT)
    }

    /// [`Engine::flush`] with a deadline.
    pub fn flush_timeout(&self, timeout: Duration) -> Result<()> {
        let Some(c) = self.start_flush() else {
            return Ok(());
        };
        if c.wait(timeout) {
            Ok(())
        } else {
            Err(Error::FlushTimeout(timeout))
        }
    }

    /// [`Engine::flush`] for async code: awaits without blocking the runtime.
    /// It has no deadline of its own (a stuck subscriber keeps it waiting):
    /// wrap it in `tokio::time::timeout` where that matters.
    pub async fn flush_async(&self) -> Result<()> {
        if let Some(c) = self.start_flush() {
            c.wait_async().await;
        }
        Ok(())
    }

    fn start_flush(&self) -> Option<Arc<Completion>> {
        if self.shared.closed.load(Ordering::Acquire) {
            return None;
        }
        let c = Completion::new(3);
        if self.shared.send_ctl(CtlMsg::Flush(c.clone())).is_some() {
            // Shut down meanwhile: its final flush has already run.
            return None;
        }
        Some(c)
    }

    /// Installs a panic hook (chained before the existing one) that flushes
    /// this engine with `timeout`, so the last records before a crash reach
    /// the sinks. A panic on one of the engine's own threads skips the flush.
    pub fn flush_on_panic(&self, timeout: Duration) {
        let weak = Arc::downgrade(&self.shared);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("spillway-"));
            if let (false, Some(shared)) = (ours, weak.upgrade()) {
                let _ = Engine { shared }.flush_timeout(timeout);
            }
            previous(info);
        }));
    }

    /// A snapshot of the counters (exact for everything flushed).
    pub fn stats(&self) -> Stats {
        let (tx, rx) = mpsc::channel();
        if !self.shared.closed.load(Ordering::Acquire)
            && self.shared.send_ctl(CtlMsg::Stats(tx)).is_none()
        {
            if let Ok(s) = rx.recv_timeout(Duration::from_secs(5)) {
                return s;
            }
        }
        let fin = self
            .shared
            .final_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        fin.clone().unwrap_or_default()
    }

    /// Flushes (up to `timeout`) and stops the engine's threads. Idempotent.
    /// A thread stuck in a subscriber is left behind rather than waited for.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let flushed = self.flush_timeout(timeout);
        self.shared.closed.store(true, Ordering::Release);
        let stop = Completion::new(4);
        if self.shared.send_ctl(CtlMsg::Stop(stop.clone())).is_some() {
            return flushed;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        stop.wait(left);
        flushed
    }

    pub(crate) fn add_subscriber(
        &self,
        pattern: &str,
        sub: Arc<dyn BatchAwareSubscriber>,
    ) -> Result<u64> {
        let pattern = Pattern::parse(pattern)?;
        let id = self.shared.next_sub_id.fetch_add(1, Ordering::Relaxed);
        let mut subs = self.shared.subs.write().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = subs.iter().cloned().collect();
        list.push(Arc::new(SubEntry { id, pattern, sub }));
        *subs = Arc::new(list);
        Ok(id)
    }

    pub(crate) fn remove_subscriber(&self, id: u64) -> bool {
        let mut subs = self.shared.subs.write().unwrap_or_else(|e| e.into_inner());
        let before = subs.len();
        let list: Vec<_> = subs.iter().filter(|s| s.id != id).cloned().collect();
        let removed = list.len() != before;
        *subs = Arc::new(list);
        removed
    }

    pub(crate) fn set_inner(&self, inner: Arc<dyn InnerBus>) {
        *self.shared.inner.write().unwrap_or_else(|e| e.into_inner()) = Some(inner);
    }
}

/// Flushes and stops the engine when dropped, within the configured
/// `shutdown_timeout`; never hangs, even on a stuck subscriber.
#[must_use = "dropping the guard shuts the pipeline down"]
pub struct Guard {
    engine: Engine,
}

impl Guard {
    /// The engine this guard shuts down.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let timeout = self.engine.shared.config.shutdown_timeout;
        if let Err(e) = self.engine.shutdown(timeout) {
            eprintln!("spillway: shutdown: {e}");
        }
    }
}

struct Acc {
    prefix: Arc<str>,
    share: Arc<AtomicUsize>,
    policy: u16,
    kind: RecordKind,
    events: Vec<BusEvent>,
    /// The batch's log records: the first `live_logs`; any after them are
    /// delivered records waiting to be overwritten in place (see `Recycler`).
    logs: Vec<LogRecord>,
    live_logs: usize,
    /// The batch's log events in captured form, when its sinks read that
    /// form (then `logs` holds no live record).
    captured: Option<CapturedLogs>,
    bytes: usize,
    first_ts: i64,
    last_ts: i64,
    dropped: u64,
    dropped_since: Option<i64>,
    generation: u64,
    urgent: bool,
    /// When the current batch opened (for pruning quiet accumulators).
    last_active: Instant,
    /// Counters not yet folded into the engine's per-prefix stats (folded at
    /// each close, so the per-record path touches no shared map).
    pending: PrefixStats,
}

impl Acc {
    fn new(prefix: Arc<str>, share: Arc<AtomicUsize>, policy: u16, kind: RecordKind) -> Acc {
        Acc {
            prefix,
            share,
            policy,
            kind,
            events: Vec::new(),
            logs: Vec::new(),
            live_logs: 0,
            captured: None,
            bytes: 0,
            first_ts: 0,
            last_ts: 0,
            dropped: 0,
            dropped_since: None,
            generation: 0,
            urgent: false,
            last_active: Instant::now(),
            pending: PrefixStats::default(),
        }
    }

    fn len(&self) -> usize {
        self.events.len() + self.live_logs + self.captured.as_ref().map_or(0, |c| c.len())
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: std::cmp::Reverse<Instant>,
    prefix: Arc<str>,
    policy: u16,
    kind: RecordKind,
    generation: u64,
}

struct EngineState {
    shared: Arc<Shared>,
    accs: Accs,
    heap: BinaryHeap<Due>,
    stats: FxMap<Arc<str>, PrefixStats>,
    next_batch_id: u64,
    out: Outbox,
    summarizers: HashMap<String, Arc<dyn Summarizer>>,
    key_buf: String,
    /// Delivered batches, handed back to be reused or freed here (see `retire`).
    spent: Receiver<Vec<Arc<Batch>>>,
    /// Delivered records and their vectors, for reuse.
    recycler: Recycler,
    /// Every sink reads log batches in captured form (`CapturedLogs`).
    captured_logs: bool,
    urgent: Vec<(Box<str>, u16, RecordKind)>,
    last_prune: Instant,
    last_resync: Instant,
}

impl EngineState {
    fn run(&mut self, ctl: Receiver<CtlMsg>) {
        loop {
            let mut stop = None;
            let mut flushes = Vec::new();
            let mut stats_requests = Vec::new();
            while let Ok(msg) = ctl.try_recv() {
                match msg {
                    CtlMsg::Entries(chunk) => {
                        self.ingest_chunk(chunk);
                    }
                    CtlMsg::Flush(c) => flushes.push(c),
                    CtlMsg::Stats(tx) => stats_requests.push(tx),
                    CtlMsg::Stop(c) => stop = Some(c),
                }
            }
            self.shared.chunk_ready.store(false, Ordering::Release);
            self.reclaim();
            let got = self.sweep();
            self.merge_drops();
            // Answered after the sweep, so a caller sees what it published before asking.
            for tx in stats_requests {
                let _ = tx.send(self.snapshot());
            }
            self.close_urgent();
            self.close_due(Instant::now());
            if !flushes.is_empty() || stop.is_some() {
                self.close_all();
                for c in flushes {
                    self.barrier(c);
                }
            }
            if let Some(c) = stop {
                self.stop(c);
                return;
            }
            if self.last_prune.elapsed() > Duration::from_secs(30) {
                self.prune();
            }
            if self.last_resync.elapsed() > Duration::from_secs(1) {
                self.last_resync = Instant::now();
                resync_clock();
            }
            self.out.send();
            self.sleep(got);
        }
    }

    /// Takes back the records of delivered batches (they were allocated on
    /// this thread), to reuse or free here.
    fn reclaim(&mut self) {
        while let Ok(mut group) = self.spent.try_recv() {
            for batch in group.drain(..) {
                // The last holder of a batch takes its records; the other
                // (a batch goes to both the sink and dispatch threads) only
                // lets go of it.
                if let Ok(mut batch) = Arc::try_unwrap(batch) {
                    let records =
                        std::mem::replace(&mut batch.records, Records::Events(Vec::new()));
                    self.recycler.take(records, batch.captured.take());
                }
            }
            self.out.keep_group(group);
        }
    }

    fn sleep(&mut self, got_records: bool) {
        if got_records {
            std::thread::park_timeout(SWEEP_INTERVAL);
            return;
        }
        // Nothing arrived: the flood (if any) is over.
        self.recycler.trim();
        // Sleep until the next deadline, and let publishers wake us.
        self.shared.idle.store(true, Ordering::SeqCst);
        if self.sweep() {
            self.shared.idle.store(false, Ordering::SeqCst);
            return;
        }
        // At most a second, so the clock is re-anchored and quiet
        // accumulators are pruned even when no batch is due for hours.
        let now = Instant::now();
        let until = self
            .heap
            .peek()
            .map_or(now + Duration::from_secs(1), |d| d.at.0)
            .min(now + Duration::from_secs(1));
        if until > now {
            std::thread::park_timeout(until - now);
        }
        self.shared.idle.store(false, Ordering::SeqCst);
    }

    /// Takes everything the publishers queued. Returns whether anything was there.
    fn sweep(&mut self) -> bool {
        self.sweep_slots(false)
    }

    /// Takes everything queued in the slots; with `close`, marks each slot
    /// closed under its lock (the final sweep: later pushes are refused).
    fn sweep_slots(&mut self, close: bool) -> bool {
        let slots: Vec<Arc<Slot>> = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut got = false;
        let mut dead = false;
        for slot in &slots {
            let (full, cur) = {
                let mut inner = slot.inner.lock().unwrap_or_else(|e| e.into_inner());
                inner.closed |= close;
                if inner.cur.entries.is_empty() && inner.full.is_empty() {
                    dead |= slot.dead.load(Ordering::Acquire);
                    continue;
                }
                (std::mem::take(&mut inner.full), inner.take_cur(false))
            };
            got = true;
            let mut spare = Vec::new();
            for chunk in full.into_iter().chain([cur]) {
                let chunk = self.ingest_chunk(chunk);
                if chunk.reusable() && spare.len() < SPARE_CHUNKS {
                    spare.push(chunk);
                }
            }
            if !spare.is_empty() {
                let mut inner = slot.inner.lock().unwrap_or_else(|e| e.into_inner());
                let room = SPARE_CHUNKS.saturating_sub(inner.spare.len());
                inner.spare.extend(spare.into_iter().take(room));
            }
        }
        if dead {
            self.shared
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| {
                    !(s.dead.load(Ordering::Acquire) && {
                        let i = s.inner.lock().unwrap_or_else(|e| e.into_inner());
                        i.cur.entries.is_empty() && i.full.is_empty()
                    })
                });
        }
        got
    }

    /// Ingests a chunk's entries in order; returns it emptied, for reuse.
    fn ingest_chunk(&mut self, mut chunk: Chunk) -> Chunk {
        let mut entries = std::mem::take(&mut chunk.entries);
        for e in entries.drain(..) {
            self.ingest(e, &chunk);
        }
        chunk.clear();
        chunk.entries = entries;
        chunk
    }

    fn ingest(&mut self, entry: Entry, chunk: &Chunk) {
        let (policy_idx, kind, size, flags) = match &entry {
            Entry::Event {
                kind,
                policy,
                size,
                flags,
                ..
            } => (*policy, *kind, *size as usize, *flags),
            Entry::Log {
                policy,
                size,
                flags,
                ..
            }
            | Entry::Captured {
                policy,
                size,
                flags,
                ..
            } => (*policy, RecordKind::Log, *size as usize, *flags),
        };
        let policy = self.shared.config.policy_at(policy_idx as usize);
        let depth = policy
            .prefix_depth
            .unwrap_or(self.shared.config.prefix_depth);
        let (max_count, max_bytes, max_interval, persist) = (
            policy.max_count,
            policy.max_bytes,
            policy.max_interval,
            policy.persist,
        );
        let passthrough = flags & F_PASSTHROUGH != 0;
        let mut key = std::mem::take(&mut self.key_buf);
        key.clear();
        let name: &str = match &entry {
            Entry::Event { name, .. } => chunk.names.get(*name as usize).map_or("", |n| n),
            Entry::Log { rec, .. } => {
                key.push_str("log:");
                key.push_str(&rec.target);
                ""
            }
            Entry::Captured { meta, .. } => {
                key.push_str("log:");
                key.push_str(meta.target());
                ""
            }
        };
        let prefix: &str = match &entry {
            Entry::Event { .. } => prefix_of(name, depth),
            Entry::Log { .. } | Entry::Captured { .. } => prefix_of(&key, depth),
        };
        if passthrough && !persist {
            // Delivered already; nothing to keep.
            stat_mut(&mut self.stats, prefix).passthrough += 1;
            self.shared
                .share_for(prefix)
                .fetch_sub(size, Ordering::Relaxed);
            self.shared.budget.release(size);
            self.key_buf = key;
            return;
        }
        let accs = self.accs.slot(prefix);
        let idx = acc_index(accs, &self.shared, prefix, policy_idx, kind);
        self.key_buf = key;
        let acc = &mut accs[idx];
        acc.pending.accepted += 1;
        acc.pending.passthrough += passthrough as u64;
        let mut evicted = 0u64;
        if flags & F_EVICT != 0 {
            // drop_oldest: make room for this record from the oldest ones waiting.
            let mut freed = 0;
            let mut n = 0;
            match kind {
                RecordKind::Log => {
                    while freed < size && n < acc.live_logs {
                        freed += estimate_log(&acc.logs[n]);
                        n += 1;
                    }
                    acc.logs.drain(..n);
                    acc.live_logs -= n;
                }
                _ => {
                    while freed < size && n < acc.events.len() {
                        let e = &acc.events[n];
                        freed += e.name.len() + estimate_value(&e.payload) + 64;
                        n += 1;
                    }
                    acc.events.drain(..n);
                }
            }
            acc.bytes = acc.bytes.saturating_sub(freed);
            acc.share.fetch_sub(freed, Ordering::Relaxed);
            self.shared.budget.release(freed);
            evicted = n as u64;
        }
        let ts = match &entry {
            Entry::Event { ts_ns, .. } | Entry::Captured { ts_ns, .. } => *ts_ns,
            Entry::Log { rec, .. } => rec.ts_ns,
        };
        if evicted > 0 {
            acc.dropped += evicted;
            acc.dropped_since.get_or_insert(ts);
        }
        // A captured event goes into the batch as it is when every sink reads
        // that form, unless the policy needs built records (a reducer, or
        // drop_oldest evicting them). A batch holds one form: a record of
        // the other form closes it first (order is kept across batches).
        let as_captured = self.captured_logs
            && matches!(entry, Entry::Captured { .. })
            && policy.summarize.is_none()
            && policy.on_full != OnFull::DropOldest;
        let other_form = if as_captured {
            acc.live_logs > 0
        } else {
            acc.captured.as_ref().is_some_and(|c| c.len() > 0)
        };
        // A record that would overflow max_bytes closes the batch before it.
        let mut ctx = Ctx {
            shared: &self.shared,
            next_batch_id: &mut self.next_batch_id,
            out: &mut self.out,
            summarizers: &self.summarizers,
            stats: &mut self.stats,
            recycler: &mut self.recycler,
        };
        if acc.len() > 0 && (acc.bytes + size > max_bytes || other_form) {
            ctx.close(acc);
        }
        if acc.len() == 0 {
            acc.first_ts = ts;
            acc.last_active = Instant::now();
            let age = Duration::from_nanos(now_ns().saturating_sub(ts).max(0) as u64);
            let at = Instant::now() + max_interval.saturating_sub(age);
            self.heap.push(Due {
                at: std::cmp::Reverse(at),
                prefix: acc.prefix.clone(),
                policy: policy_idx,
                kind,
                generation: acc.generation,
            });
        }
        acc.last_ts = ts;
        acc.bytes += size;
        match entry {
            Entry::Event { payload, .. } => {
                reuse(&mut acc.events, &mut ctx.recycler.events.spare, max_count);
                let ev = ctx.recycler.event(name, payload, ts);
                acc.events.push(ev)
            }
            Entry::Log { rec, .. } => {
                ctx.recycler.log_vec(&mut acc.logs, max_count);
                match acc.logs.get_mut(acc.live_logs) {
                    Some(stale) => *stale = *rec,
                    None => acc.logs.push(*rec),
                }
                acc.live_logs += 1;
            }
            Entry::Captured {
                meta,
                parts,
                location,
                ..
            } if as_captured => {
                let logs = acc.captured.get_or_insert_with(|| ctx.recycler.captured());
                logs.push(meta, ts, &chunk.arena, &parts, location);
            }
            Entry::Captured {
                meta,
                parts,
                location,
                ..
            } => {
                ctx.recycler.log_vec(&mut acc.logs, max_count);
                let arena = &chunk.arena;
                match acc.logs.get_mut(acc.live_logs) {
                    Some(stale) if poolable(stale) => {
                        fill_record(stale, meta, ts, arena, &parts, location)
                    }
                    Some(stale) => *stale = captured_record(meta, ts, arena, &parts, location),
                    None => ctx.recycler.push_log_record(
                        &mut acc.logs,
                        meta,
                        ts,
                        arena,
                        &parts,
                        location,
                    ),
                }
                acc.live_logs += 1;
            }
        }
        let len = acc.len();
        acc.pending.dropped += evicted;
        acc.pending.max_queue = acc.pending.max_queue.max(len);
        if flags & F_URGENT != 0 && !acc.urgent {
            acc.urgent = true;
            self.urgent
                .push((acc.prefix.as_ref().into(), policy_idx, kind));
        }
        if len >= max_count || acc.bytes >= max_bytes {
            ctx.close(acc);
        }
    }

    fn merge_drops(&mut self) {
        let drops =
            std::mem::take(&mut *self.shared.drops.lock().unwrap_or_else(|e| e.into_inner()));
        for ((prefix, policy, kind), (n, since)) in drops {
            stat_mut(&mut self.stats, &prefix).dropped += n;
            let accs = self.accs.slot(&prefix);
            let idx = acc_index(accs, &self.shared, &prefix, policy, kind);
            let acc = &mut accs[idx];
            acc.dropped += n;
            acc.dropped_since = Some(acc.dropped_since.map_or(since, |s| s.min(since)));
            if acc.len() == 0 {
                // Nothing waiting to carry the count: report it in a batch of its own, now.
                acc.first_ts = since;
                acc.last_ts = now_ns();
                self.heap.push(Due {
                    at: std::cmp::Reverse(Instant::now()),
                    prefix: acc.prefix.clone(),
                    policy: acc.policy,
                    kind: acc.kind,
                    generation: acc.generation,
                });
            }
        }
    }

    fn ctx(&mut self) -> (Ctx<'_>, &mut Accs) {
        (
            Ctx {
                shared: &self.shared,
                next_batch_id: &mut self.next_batch_id,
                out: &mut self.out,
                summarizers: &self.summarizers,
                stats: &mut self.stats,
                recycler: &mut self.recycler,
            },
            &mut self.accs,
        )
    }

    fn close_urgent(&mut self) {
        let urgent = std::mem::take(&mut self.urgent);
        let (mut ctx, accs) = self.ctx();
        for (prefix, policy, kind) in urgent {
            if let Some(acc) = accs
                .get_mut(&prefix)
                .and_then(|v| v.iter_mut().find(|a| a.policy == policy && a.kind == kind))
            {
                ctx.close(acc);
            }
        }
    }

    fn close_due(&mut self, now: Instant) {
        while let Some(top) = self.heap.peek() {
            if top.at.0 > now {
                break;
            }
            let Some(due) = self.heap.pop() else { break };
            let (mut ctx, accs) = self.ctx();
            if let Some(acc) = accs.get_mut(due.prefix.as_ref()).and_then(|v| {
                v.iter_mut()
                    .find(|a| a.policy == due.policy && a.kind == due.kind)
            }) {
                if acc.generation == due.generation {
                    ctx.close(acc);
                }
            }
        }
    }

    fn close_all(&mut self) {
        let (mut ctx, accs) = self.ctx();
        for v in accs.slots.iter_mut() {
            for acc in v.iter_mut() {
                ctx.close(acc);
            }
        }
        self.heap.clear();
    }

    fn barrier(&mut self, c: Arc<Completion>) {
        self.out.send();
        match &self.out.sink_tx {
            Some(tx) => {
                if tx.send(OutMsg::Barrier(c.clone())).is_err() {
                    c.done();
                }
            }
            None => c.done(),
        }
        if self.out.disp_tx.send(OutMsg::Barrier(c.clone())).is_err() {
            c.done();
        }
        let sent = self
            .shared
            .pt_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(PtMsg::Barrier(c.clone()));
        if sent.is_err() {
            c.done();
        }
    }

    fn stop(&mut self, c: Arc<Completion>) {
        // Close every slot under its lock: a publisher that got past the
        // `closed` check pushes nothing after this sweep (it gets ShutDown).
        self.sweep_slots(true);
        self.merge_drops();
        self.close_all();
        // Subscribers (and the senders of async streams) go: streams end.
        *self.shared.subs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Vec::new());
        *self
            .shared
            .final_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(self.snapshot());
        self.out.send();
        match &self.out.sink_tx {
            Some(tx) => {
                if tx.send(OutMsg::Stop(c.clone())).is_err() {
                    c.done();
                }
            }
            None => c.done(),
        }
        if self.out.disp_tx.send(OutMsg::Stop(c.clone())).is_err() {
            c.done();
        }
        let sent = self
            .shared
            .pt_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(PtMsg::Stop(c.clone()));
        if sent.is_err() {
            c.done();
        }
        c.done();
    }

    /// Forgets accumulators that have been empty and quiet for a while, so
    /// prefixes that carry ids (`sentinel:{handle}`) do not grow memory forever.
    fn prune(&mut self) {
        self.last_prune = Instant::now();
        let quiet = Duration::from_secs(60);
        self.accs.retain(|v| {
            v.retain(|a| a.len() > 0 || a.dropped > 0 || a.last_active.elapsed() < quiet);
            !v.is_empty()
        });
        self.shared
            .shares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| Arc::strong_count(s) > 1 || s.load(Ordering::Relaxed) > 0);
        // Per-prefix counters stay while there are at most MAX_STATS_PREFIXES;
        // past that, those of pruned (quiet) prefixes fold into one entry,
        // so names that carry ids (`sentinel:{handle}`) do not grow it forever.
        let accs = &self.accs;
        fold_quiet_stats(&mut self.stats, MAX_STATS_PREFIXES, |p| {
            accs.index.contains_key(p)
        });
        // Threads that published nothing since the last prune give back their
        // spare chunks (a chunk's buffers are tens of KiB).
        let slots = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for slot in slots {
            let mut inner = slot.inner.lock().unwrap_or_else(|e| e.into_inner());
            if inner.cur.entries.is_empty() && inner.full.is_empty() {
                inner.spare.clear();
            }
        }
    }

    fn snapshot(&self) -> Stats {
        let mut s = Stats {
            queued_bytes: self.shared.budget.used(),
            memory_budget: self.shared.config.memory_budget,
            subscriber_panics: self.shared.subscriber_panics.load(Ordering::Relaxed),
            sink_errors: self.shared.sink_errors.load(Ordering::Relaxed),
            last_sink_error: self
                .shared
                .last_sink_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            ..Stats::default()
        };
        let pending = self
            .shared
            .drops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (k, v) in &self.stats {
            s.prefixes.insert(k.to_string(), v.clone());
        }
        for acc in self.accs.slots.iter().flatten() {
            s.prefixes
                .entry(acc.prefix.to_string())
                .or_default()
                .add(&acc.pending);
        }
        for ((k, _, _), (n, _)) in pending {
            s.prefixes.entry(k.to_string()).or_default().dropped += n;
        }
        for v in s.prefixes.values() {
            s.total.add(v);
        }
        s
    }
}

/// Past `max` prefixes, folds the counters of those `live` says are gone
/// into the [`PRUNED_PREFIXES`] entry.
fn fold_quiet_stats(
    stats: &mut FxMap<Arc<str>, PrefixStats>,
    max: usize,
    live: impl Fn(&str) -> bool,
) {
    if stats.len() <= max {
        return;
    }
    let mut folded = PrefixStats::default();
    stats.retain(|prefix, st| {
        let keep = live(prefix) || &**prefix == PRUNED_PREFIXES;
        if !keep {
            folded.add(st);
        }
        keep
    });
    stat_mut(stats, PRUNED_PREFIXES).add(&folded);
}

/// The accumulator for (`policy`, `kind`) among a prefix's, created if missing.
/// The accumulators, by prefix: a map to slots of a vector, so that the slot
/// of the prefix last looked up is known without hashing it again (records
/// mostly arrive in runs of one prefix: a loop logging, a flood of one kind).
#[derive(Default)]
struct Accs {
    index: FxMap<Box<str>, usize>,
    /// A prefix's accumulators, one per policy and kind; free slots are empty.
    slots: Vec<Vec<Acc>>,
    free: Vec<usize>,
    /// The prefix last looked up, and its slot.
    last: Option<(String, usize)>,
}

impl Accs {
    /// The accumulators of `prefix` (an empty slot for a new prefix).
    fn slot(&mut self, prefix: &str) -> &mut Vec<Acc> {
        let i = match &self.last {
            Some((p, i)) if p == prefix => *i,
            _ => {
                let i = match self.index.get(prefix) {
                    Some(&i) => i,
                    None => {
                        let i = self.free.pop().unwrap_or_else(|| {
                            self.slots.push(Vec::new());
                            self.slots.len() - 1
                        });
                        self.index.insert(prefix.into(), i);
                        i
                    }
                };
                let (mut p, _) = self.last.take().unwrap_or_default();
                p.clear();
                p.push_str(prefix);
                self.last = Some((p, i));
                i
            }
        };
        &mut self.slots[i]
    }

    fn get_mut(&mut self, prefix: &str) -> Option<&mut Vec<Acc>> {
        let i = *self.index.get(prefix)?;
        self.slots.get_mut(i)
    }

    /// Keeps the prefixes whose accumulators `keep` says to; the slots of
    /// the others are emptied for reuse.
    fn retain(&mut self, mut keep: impl FnMut(&mut Vec<Acc>) -> bool) {
        let (slots, free) = (&mut self.slots, &mut self.free);
        self.index.retain(|_, i| {
            let kept = keep(&mut slots[*i]);
            if !kept {
                slots[*i] = Vec::new();
                free.push(*i);
            }
            kept
        });
        self.last = None;
    }
}

fn acc_index(
    accs: &mut Vec<Acc>,
    shared: &Shared,
    prefix: &str,
    policy: u16,
    kind: RecordKind,
) -> usize {
    if let Some(i) = accs
        .iter()
        .position(|a| a.policy == policy && a.kind == kind)
    {
        return i;
    }
    accs.push(Acc::new(
        prefix.into(),
        shared.share_for(prefix),
        policy,
        kind,
    ));
    accs.len() - 1
}

fn stat_mut<'a>(stats: &'a mut FxMap<Arc<str>, PrefixStats>, prefix: &str) -> &'a mut PrefixStats {
    if !stats.contains_key(prefix) {
        stats.insert(prefix.into(), PrefixStats::default());
    }
    stats.get_mut(prefix).expect("inserted above")
}

/// Closed batches on their way to the sink and dispatch threads, sent a
/// group at a time (at the end of each engine round, or every
/// `OUTBOX_MAX`): one wake-up of those threads per group rather than per
/// batch, which under a flood of small batches cost more than the batches.
struct Outbox {
    sink_tx: Option<Sender<OutMsg>>,
    disp_tx: Sender<OutMsg>,
    to_sink: Vec<Arc<Batch>>,
    to_dispatch: Vec<Arc<Batch>>,
    /// Group vectors that came back (see `retire`), for the next groups.
    spare: Vec<Vec<Arc<Batch>>>,
}

/// Batches an outbox holds at most before it sends them.
const OUTBOX_MAX: usize = 32;

impl Outbox {
    fn send(&mut self) {
        if !self.to_sink.is_empty() {
            let next = self.spare.pop().unwrap_or_default();
            let batches = std::mem::replace(&mut self.to_sink, next);
            if let Some(tx) = &self.sink_tx {
                let _ = tx.send(OutMsg::Batches(batches));
            }
        }
        if !self.to_dispatch.is_empty() {
            let next = self.spare.pop().unwrap_or_default();
            let batches = std::mem::replace(&mut self.to_dispatch, next);
            let _ = self.disp_tx.send(OutMsg::Batches(batches));
        }
    }

    /// Keeps an emptied group vector for reuse (a few; the rest are freed).
    fn keep_group(&mut self, group: Vec<Arc<Batch>>) {
        if self.spare.len() < 4 && group.capacity() <= 4 * OUTBOX_MAX {
            self.spare.push(group);
        }
    }
}

struct Ctx<'a> {
    shared: &'a Arc<Shared>,
    next_batch_id: &'a mut u64,
    out: &'a mut Outbox,
    summarizers: &'a HashMap<String, Arc<dyn Summarizer>>,
    stats: &'a mut FxMap<Arc<str>, PrefixStats>,
    /// Takes the records of batches that no sink or subscriber takes.
    recycler: &'a mut Recycler,
}

impl Ctx<'_> {
    /// Closes `acc`'s batch (if it has records or drops to report) and sends it on.
    fn close(&mut self, acc: &mut Acc) {
        acc.generation += 1;
        let urgent = std::mem::take(&mut acc.urgent);
        if acc.pending != PrefixStats::default() {
            stat_mut(self.stats, &acc.prefix).add(&std::mem::take(&mut acc.pending));
        }
        if acc.len() == 0 && acc.dropped == 0 {
            return;
        }
        let policy = self.shared.config.policy_at(acc.policy as usize);
        let records = match acc.kind {
            RecordKind::Log => {
                // Records past the live ones were never overwritten: freed here.
                acc.logs.truncate(std::mem::take(&mut acc.live_logs));
                Records::Logs(std::mem::take(&mut acc.logs))
            }
            _ => Records::Events(std::mem::take(&mut acc.events)),
        };
        let captured = acc.captured.take();
        let id = *self.next_batch_id;
        *self.next_batch_id += 1;
        let mut batch = Batch {
            id,
            prefix: acc.prefix.clone(),
            kind: acc.kind,
            records,
            dropped: std::mem::take(&mut acc.dropped),
            dropped_since_ns: acc.dropped_since.take(),
            first_ts_ns: acc.first_ts,
            last_ts_ns: acc.last_ts,
            persist: policy.persist,
            // Written through at once when it holds a record its publisher marked urgent.
            urgent,
            summary: None,
            captured,
            _reservation: Reservation::new(
                &self.shared.budget,
                &acc.share,
                std::mem::take(&mut acc.bytes),
            ),
        };
        if let Some(reducer) = policy
            .summarize
            .as_ref()
            .and_then(|n| self.summarizers.get(n))
        {
            match catch_unwind(AssertUnwindSafe(|| reducer.summarize(&batch))) {
                Ok(v) => batch.summary = Some(Arc::new(v)),
                Err(_) => self
                    .shared
                    .subscriber_panicked("reducer", policy.summarize.as_deref().unwrap_or("")),
            }
        }
        stat_mut(self.stats, &acc.prefix).batches += 1;
        let passthrough = policy.passthrough;
        let to_sinks = batch.persist && self.out.sink_tx.is_some();
        let to_subscribers = !passthrough && batch.kind != RecordKind::Log;
        if !to_sinks && !to_subscribers {
            // Nobody takes it: its records are reused at once.
            let records = std::mem::replace(&mut batch.records, Records::Events(Vec::new()));
            let captured = batch.captured.take();
            drop(batch);
            self.recycler.take(records, captured);
            return;
        }
        batch
            ._reservation
            .set_holders(usize::from(to_sinks) + usize::from(to_subscribers));
        let batch = Arc::new(batch);
        if to_sinks {
            self.out.to_sink.push(batch.clone());
        }
        if to_subscribers {
            self.out.to_dispatch.push(batch);
        }
        if self.out.to_sink.len() >= OUTBOX_MAX || self.out.to_dispatch.len() >= OUTBOX_MAX {
            self.out.send();
        }
    }
}

/// Runs one sink call; an error or a panic is counted and reported, and the
/// sink thread goes on with the next batch.
fn guarded(shared: &Shared, call: impl FnOnce() -> Result<()>) {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => shared.sink_failed(&e),
        Err(_) => shared.sink_failed(&Error::Other("a sink panicked".into())),
    }
}

/// Delivered records, reused by the engine thread that builds new ones:
/// overwritten in place, so that their strings' and payloads' memory is
/// reused instead of freed and allocated again, and their vectors.
#[derive(Default)]
struct Recycler {
    events: Pool<BusEvent>,
    logs: Pool<LogRecord>,
    /// Emptied captured-log buffers, and what they hold allocated.
    captured: Vec<CapturedLogs>,
    captured_bytes: usize,
    limit: usize,
}

/// What a pooled log record weighs, roughly (cheap: no walk over its fields).
fn log_weight(r: &LogRecord) -> usize {
    std::mem::size_of::<LogRecord>()
        + r.message.capacity()
        + r.fields.capacity() * (std::mem::size_of::<(Cow<'static, str>, FieldValue)>() + 16)
        + r.spans.capacity() * 8
}

/// What a pooled event weighs (its payload is emptied when it is pooled).
fn event_weight(e: &BusEvent) -> usize {
    e.name.capacity() + 64
}

impl Recycler {
    fn new(limit: usize) -> Recycler {
        Recycler {
            events: Pool {
                limit,
                ..Pool::default()
            },
            logs: Pool {
                limit,
                ..Pool::default()
            },
            captured: Vec::new(),
            captured_bytes: 0,
            limit,
        }
    }

    /// Empty buffers for a batch's captured log events, reused if any.
    fn captured(&mut self) -> CapturedLogs {
        match self.captured.pop() {
            Some(c) => {
                self.captured_bytes = self.captured_bytes.saturating_sub(c.capacity_bytes());
                c
            }
            None => CapturedLogs::default(),
        }
    }

    /// Takes a batch's records (and captured events) back.
    fn take(&mut self, records: Records, captured: Option<CapturedLogs>) {
        if let Some(mut c) = captured {
            c.clear();
            let bytes = c.capacity_bytes();
            if self.captured_bytes + bytes <= self.limit {
                self.captured_bytes += bytes;
                self.captured.push(c);
            }
        }
        match records {
            Records::Events(mut v) => {
                for e in v.iter_mut() {
                    // Free what the payload held now; keep its allocation if
                    // no subscriber kept a handle to it.
                    if let Some(p) = Arc::get_mut(&mut e.payload) {
                        *p = serde_json::Value::Null;
                    }
                }
                self.events.put(v, event_weight)
            }
            Records::Logs(v) => self.logs.put(v, log_weight),
        }
    }

    /// A bus event, in a pooled one if there is one.
    fn event(&mut self, name: &str, payload: Payload, ts_ns: i64) -> BusEvent {
        match self.events.get(event_weight, |e| e.name.capacity() <= 256) {
            Some(mut ev) => {
                ev.name.clear();
                ev.name.push_str(name);
                ev.ts_ns = ts_ns;
                payload.store(&mut ev.payload);
                ev
            }
            None => BusEvent {
                name: name.to_owned(),
                payload: payload.into_arc(),
                ts_ns,
            },
        }
    }

    /// Gives an accumulator without a vector one: a whole pooled batch, whose
    /// records are overwritten where they stand (moving pooled records, cold
    /// in this core's cache, was a third of the engine's time), else an
    /// empty spare, else room for `expect` records.
    fn log_vec(&mut self, v: &mut Vec<LogRecord>, expect: usize) {
        if v.capacity() != 0 {
            return;
        }
        match self.logs.take_whole() {
            Some(full) => {
                touch_logs(&full);
                *v = full;
            }
            None => reuse(v, &mut self.logs.spare, expect),
        }
    }

    /// Appends to `logs` the record of a captured event: a pooled record,
    /// overwritten where it lands, if there is one.
    fn push_log_record(
        &mut self,
        logs: &mut Vec<LogRecord>,
        meta: &'static tracing_core::Metadata<'static>,
        ts: i64,
        arena: &crate::layer::capture::Arena,
        parts: &crate::layer::capture::Parts,
        location: bool,
    ) {
        match self.logs.get(log_weight, poolable) {
            Some(rec) => {
                logs.push(rec);
                if let Some(rec) = logs.last_mut() {
                    fill_record(rec, meta, ts, arena, parts, location);
                }
            }
            None => logs.push(captured_record(meta, ts, arena, parts, location)),
        }
    }

    /// Shrinks the pools to what an idle engine keeps.
    fn trim(&mut self) {
        self.events.trim(POOL_IDLE);
        self.logs.trim(POOL_IDLE);
        while self.captured.len() > CAPTURED_IDLE {
            if let Some(c) = self.captured.pop() {
                self.captured_bytes = self.captured_bytes.saturating_sub(c.capacity_bytes());
            }
        }
        self.captured.shrink_to_fit();
    }
}

/// Records kept whole, in the vectors their batches came back in, and empty
/// vectors for new batches.
struct Pool<T> {
    /// Whole batches, each with what its records weigh.
    full: Vec<(Vec<T>, usize)>,
    spare: Vec<Vec<T>>,
    /// What the pooled records weigh, and the most they may.
    bytes: usize,
    limit: usize,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            full: Vec::new(),
            spare: Vec::new(),
            bytes: 0,
            limit: 0,
        }
    }
}

impl<T> Pool<T> {
    /// Keeps `v`'s records if they fit under the limit (else frees them).
    fn put(&mut self, v: Vec<T>, weigh: impl Fn(&T) -> usize) {
        let w: usize = v.iter().map(weigh).sum();
        if !v.is_empty() && self.bytes.saturating_add(w) <= self.limit {
            self.bytes += w;
            self.full.push((v, w));
        } else {
            keep_spare(&mut self.spare, v);
        }
    }

    /// A pooled record that passes `usable` (the others are freed).
    fn get(&mut self, weigh: impl Fn(&T) -> usize, usable: impl Fn(&T) -> bool) -> Option<T> {
        loop {
            let (v, vw) = self.full.last_mut()?;
            match v.pop() {
                Some(t) => {
                    let w = weigh(&t);
                    *vw = vw.saturating_sub(w);
                    self.bytes = self.bytes.saturating_sub(w);
                    if usable(&t) {
                        return Some(t);
                    }
                }
                None => {
                    if let Some((v, _)) = self.full.pop() {
                        keep_spare(&mut self.spare, v);
                    }
                }
            }
        }
    }

    /// A whole pooled batch, records and all.
    fn take_whole(&mut self) -> Option<Vec<T>> {
        let (v, w) = self.full.pop()?;
        self.bytes = self.bytes.saturating_sub(w);
        Some(v)
    }

    /// Frees pooled records beyond `keep`.
    fn trim(&mut self, keep: usize) {
        let mut count: usize = self.full.iter().map(|(v, _)| v.len()).sum();
        while count > keep {
            let Some(v) = self.take_whole() else { break };
            count -= v.len();
            keep_spare(&mut self.spare, v);
        }
        self.full.shrink_to_fit();
    }
}

/// Whether a delivered record is worth keeping for reuse (not one that
/// carried an unusually long message or many fields).
fn poolable(r: &LogRecord) -> bool {
    r.message.capacity() <= 512
        && r.fields.capacity() <= 16
        && r.spans.capacity() <= 16
        && r.fields.iter().all(|(_, v)| match v {
            FieldValue::Str(s) => s.capacity() <= 256,
            _ => true,
        })
}

/// Empties `v` (freeing its records here) and keeps it for reuse if there is room.
fn keep_spare<T>(spares: &mut Vec<Vec<T>>, mut v: Vec<T>) {
    v.clear();
    if spares.len() < SPARE_RECORD_VECS && v.capacity() <= SPARE_RECORDS_MAX_LEN {
        spares.push(v);
    }
}

/// Gives `v` a spare vector's capacity when it has none.
/// Without one, reserves room for `expect` records at once (up to 256),
/// rather than growing step by step.
fn reuse<T>(v: &mut Vec<T>, spares: &mut Vec<Vec<T>>, expect: usize) {
    if v.capacity() == 0 {
        match spares.pop() {
            Some(spare) => *v = spare,
            None => v.reserve_exact(expect.clamp(1, 256)),
        }
    }
}

/// Hands a group of delivered batches back to the engine thread, which
/// built them, to be reused or freed there (see `Recycler`): the system
/// allocator (glibc) is cheap when a thread frees what it allocated, and
/// slow when one thread only allocates while others free (a free from
/// another thread waits for the allocating thread's arena lock). Each
/// batch's budget was already released, as soon as the last of these
/// threads was done with it (`Reservation::consumed`). The engine takes
/// them at the start of its next round (within a second, or at once when
/// records arrive).
fn retire(group: Vec<Arc<Batch>>, spent: &Sender<Vec<Arc<Batch>>>) {
    let _ = spent.send(group);
}

fn sink_loop(
    shared: Arc<Shared>,
    mut sinks: Vec<Box<dyn Sink>>,
    rx: Receiver<OutMsg>,
    spent: Sender<Vec<Arc<Batch>>>,
) {
    let tick = Duration::from_millis(50);
    let mut last_tick = Instant::now();
    loop {
        let msg = rx.recv_timeout(tick);
        let now = Instant::now();
        if now.duration_since(last_tick) >= tick {
            last_tick = now;
            for s in sinks.iter_mut() {
                guarded(&shared, || s.tick(now));
            }
        }
        match msg {
            Ok(OutMsg::Batches(batches)) => {
                for b in &batches {
                    for s in sinks.iter_mut() {
                        guarded(&shared, || {
                            s.write_batch(b)?;
                            if b.urgent {
                                s.flush()?;
                            }
                            Ok(())
                        });
                    }
                    b._reservation.consumed();
                }
                retire(batches, &spent);
            }
            Ok(OutMsg::Barrier(c)) => {
                for s in sinks.iter_mut() {
                    guarded(&shared, || s.flush());
                }
                c.done();
            }
            Ok(OutMsg::Stop(c)) => {
                for s in sinks.iter_mut() {
                    guarded(&shared, || s.flush());
                }
                drop(sinks);
                c.done();
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn dispatch_loop(shared: Arc<Shared>, rx: Receiver<OutMsg>, spent: Sender<Vec<Arc<Batch>>>) {
    for msg in rx {
        match msg {
            OutMsg::Batches(batches) => {
                for b in &batches {
                    crate::layer::bus::dispatch_batch(&shared, b);
                    b._reservation.consumed();
                }
                retire(batches, &spent);
            }
            OutMsg::Barrier(c) => c.done(),
            OutMsg::Stop(c) => {
                c.done();
                return;
            }
        }
    }
}

fn passthrough_loop(shared: Arc<Shared>, rx: Receiver<PtMsg>) {
    for msg in rx {
        match msg {
            PtMsg::Event(ev, size) => {
                shared.pt_pending.fetch_sub(1, Ordering::AcqRel);
                shared.pt_bytes.fetch_sub(size, Ordering::AcqRel);
                crate::layer::bus::dispatch_event(&shared, &ev);
            }
            PtMsg::Barrier(c) => c.done(),
            PtMsg::Stop(c) => {
                c.done();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(prefix: &str) -> Acc {
        Acc::new(prefix.into(), Arc::default(), 0, RecordKind::Event)
    }

    // Catches the remembered last prefix outliving a prune: a pruned
    // prefix's slot is reused by the next new prefix, so a stale memory
    // would hand one prefix's accumulators to another (records batched
    // under the wrong prefix), and a reused slot must start empty.
    #[test]
    fn accumulator_slots_follow_their_prefix_through_prunes() {
        let mut accs = Accs::default();
        accs.slot("a").push(acc("a"));
        accs.slot("b").push(acc("b"));
        assert_eq!(accs.slot("a")[0].prefix.as_ref(), "a");
        accs.retain(|v| v[0].prefix.as_ref() != "a");
        assert!(accs.get_mut("a").is_none());
        // "a" comes back at once (the last prefix looked up before the prune).
        assert!(accs.slot("a").is_empty(), "a pruned prefix starts afresh");
        accs.slot("a").push(acc("a2"));
        assert!(accs.slot("c").is_empty(), "c given a's accumulators");
        accs.slot("c").push(acc("c"));
        assert_eq!(accs.slot("a")[0].prefix.as_ref(), "a2");
        assert_eq!(accs.slot("b")[0].prefix.as_ref(), "b");
        assert_eq!(accs.slot("c")[0].prefix.as_ref(), "c");
        assert_eq!(accs.slots.len(), 3, "the freed slot is reused, not left");
    }

    // Catches the pool's weight accounting drifting: it must refuse a batch
    // past its limit, count down as records are taken (one by one or whole
    // batches), skip unusable records, and end at zero, or the pool would
    // either grow past its share of memory or stop taking anything.
    #[test]
    fn pool_weighs_what_it_holds_and_keeps_to_its_limit() {
        let weigh = |s: &String| s.len();
        let mut pool = Pool::<String> {
            limit: 10,
            ..Pool::default()
        };
        pool.put(vec!["aaa".into(), "bb".into()], weigh);
        pool.put(vec!["cccc".into()], weigh);
        assert_eq!(pool.bytes, 9);
        pool.put(vec!["dd".into()], weigh);
        assert_eq!(
            (pool.bytes, pool.full.len()),
            (9, 2),
            "over the limit: refused"
        );
        assert_eq!(pool.get(weigh, |_| true).as_deref(), Some("cccc"));
        assert_eq!(pool.bytes, 5);
        // "bb" is unusable: freed, and its weight with it.
        assert_eq!(pool.get(weigh, |s| s != "bb").as_deref(), Some("aaa"));
        assert_eq!(pool.bytes, 0);
        assert!(pool.get(weigh, |_| true).is_none());
        pool.put(vec!["ee".into(), "f".into()], weigh);
        pool.put(vec!["gg".into()], weigh);
        assert_eq!(pool.take_whole(), Some(vec!["gg".to_string()]));
        assert_eq!(pool.bytes, 3);
        pool.trim(0);
        assert_eq!((pool.bytes, pool.full.len()), (0, 0));
    }

    // Catches per-prefix stats growing without bound when names carry ids,
    // and folding that loses counts or drops live prefixes.
    #[test]
    fn quiet_prefixes_fold_into_one_entry_past_the_limit() {
        let mut stats: FxMap<Arc<str>, PrefixStats> = FxMap::default();
        for i in 0..10 {
            let st = stat_mut(&mut stats, &format!("sentinel:{i}"));
            st.accepted = 3;
            st.batches = 1;
        }
        fold_quiet_stats(&mut stats, 20, |_| false);
        assert_eq!(stats.len(), 10, "under the limit nothing folds");
        fold_quiet_stats(&mut stats, 4, |p| p == "sentinel:7");
        assert_eq!(stats.len(), 2);
        assert_eq!(stats["sentinel:7"].accepted, 3);
        let pruned = &stats[PRUNED_PREFIXES];
        assert_eq!(
            (pruned.accepted, pruned.batches),
            (27, 9),
            "nothing lost in the fold"
        );
        // A second fold adds to the entry instead of folding it into itself.
        stat_mut(&mut stats, "sentinel:99").accepted = 1;
        stat_mut(&mut stats, "sentinel:98").accepted = 1;
        fold_quiet_stats(&mut stats, 2, |p| p == "sentinel:7");
        assert_eq!(stats[PRUNED_PREFIXES].accepted, 29);
    }
}
