//! The bus adapter: [`BatchingBus`] wraps the service's own bus.
//!
//! Publishers call [`BatchingBus::publish`] as they called their bus before.
//! Passthrough names (chat, presence, status, health) reach subscribers at
//! once; everything else is coalesced by prefix, delivered to batch-aware
//! subscribers in one [`BatchAwareSubscriber::on_batch`] call per batch, and
//! republished on the inner bus as one `<prefix>:batch` event.
//!
//! ```
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//! use spillway::{BatchConfig, BatchingBus, BatchAwareSubscriber, BusEvent, Engine, MessageBus};
//!
//! struct Count(AtomicUsize);
//! impl BatchAwareSubscriber for Count {
//!     fn on_event(&self, _e: &BusEvent) { self.0.fetch_add(1, Ordering::Relaxed); }
//! }
//!
//! let (engine, _guard) = Engine::builder(BatchConfig::default()).build().unwrap();
//! let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
//! let count = Arc::new(Count(AtomicUsize::new(0)));
//! bus.subscribe("data:*", count.clone()).unwrap();
//! for id in 0..250 {
//!     bus.publish("data:users:created", serde_json::json!({ "id": id })).unwrap();
//! }
//! bus.flush().unwrap();
//! assert_eq!(count.0.load(Ordering::Relaxed), 250);
//! ```

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::Result;
use crate::layer::engine::{Engine, Shared, Stats, SubEntry};
use crate::layer::name::Pattern;
use crate::layer::record::{now_ns, Batch, BusEvent, Records};

/// A subscriber that can take events one at a time or a batch at once.
///
/// Override [`on_batch`](Self::on_batch) when a batch can be handled in one
/// go (one SQL transaction, one IPC frame). A panic in either method is
/// caught and counted; other subscribers keep receiving.
pub trait BatchAwareSubscriber: Send + Sync + 'static {
    /// One event (passthrough events, and batches by default).
    fn on_event(&self, event: &BusEvent);
    /// The events of one batch that match this subscriber's pattern, in order.
    fn on_batch(&self, events: &[BusEvent]) {
        for e in events {
            self.on_event(e);
        }
    }
}

/// The bus that [`BatchingBus`] wraps. The service's own bus implements it
/// in a few lines; [`MessageBus`] is an embedded one.
pub trait InnerBus: Send + Sync + 'static {
    /// Delivers one event (a passthrough event or a `<prefix>:batch`).
    fn publish(&self, event: BusEvent);
    /// Whether anyone listens to `name`; `false` skips building the event.
    fn wants(&self, _name: &str) -> bool {
        true
    }
}

/// Identifies a subscription, for unsubscribing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

type SubList = Arc<Vec<(u64, Pattern, Arc<dyn BatchAwareSubscriber>)>>;

/// An embedded bus with glob-pattern subscriptions; events are delivered
/// synchronously, on the publishing thread, to every matching subscriber.
#[derive(Default)]
pub struct MessageBus {
    subs: RwLock<SubList>,
    next_id: AtomicU64,
    panics: AtomicU64,
}

impl MessageBus {
    /// An empty bus.
    pub fn new() -> MessageBus {
        MessageBus::default()
    }

    /// Subscribes `sub` to the names matching `pattern`.
    pub fn subscribe(
        &self,
        pattern: &str,
        sub: Arc<dyn BatchAwareSubscriber>,
    ) -> Result<SubscriptionId> {
        let pattern = Pattern::parse(pattern)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut subs = self.subs.write().unwrap_or_else(|e| e.into_inner());
        let mut list = (**subs).clone();
        list.push((id, pattern, sub));
        *subs = Arc::new(list);
        Ok(SubscriptionId(id))
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        let mut subs = self.subs.write().unwrap_or_else(|e| e.into_inner());
        let list: Vec<_> = subs.iter().filter(|s| s.0 != id.0).cloned().collect();
        let removed = list.len() != subs.len();
        *subs = Arc::new(list);
        removed
    }

    /// Subscriber calls that panicked (each was caught).
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> SubList {
        self.subs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl InnerBus for MessageBus {
    fn publish(&self, event: BusEvent) {
        for (_, pattern, sub) in self.snapshot().iter() {
            if pattern.matches(&event.name)
                && catch_unwind(AssertUnwindSafe(|| sub.on_event(&event))).is_err()
            {
                self.panics.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    fn wants(&self, name: &str) -> bool {
        self.snapshot().iter().any(|(_, p, _)| p.matches(name))
    }
}

/// The user's `BatchingBus`: publish as before, receive batches.
#[derive(Clone)]
pub struct BatchingBus {
    engine: Engine,
}

impl BatchingBus {
    /// Wraps `inner`: passthrough events and `<prefix>:batch` events are
    /// published there. One inner bus per engine; a second call replaces it.
    pub fn new(engine: &Engine, inner: Arc<dyn InnerBus>) -> BatchingBus {
        engine.set_inner(inner);
        BatchingBus {
            engine: engine.clone(),
        }
    }

    /// Publishes one event: the only call a publisher needs. The payload is
    /// a [`serde_json::Value`] or an `Arc<Value>` (see [`Payload`](crate::Payload)).
    pub fn publish(&self, name: impl AsRef<str>, payload: impl Into<crate::Payload>) -> Result<()> {
        self.engine.publish(name, payload)
    }

    /// Subscribes to names matching `pattern`: per batch, one `on_batch` call
    /// with exactly the matching events, in order; passthrough events one by
    /// one through `on_event`.
    pub fn subscribe(
        &self,
        pattern: &str,
        sub: Arc<dyn BatchAwareSubscriber>,
    ) -> Result<SubscriptionId> {
        self.engine.add_subscriber(pattern, sub).map(SubscriptionId)
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.engine.remove_subscriber(id.0)
    }

    /// A subscription as a bounded async stream of batches. When the reader
    /// falls more than `capacity` batches behind, newer batches are dropped
    /// and the next [`BatchStream::recv`] reports how many events were lost.
    pub fn subscribe_stream(&self, pattern: &str, capacity: usize) -> Result<BatchStream> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let lagged = Arc::new(AtomicU64::new(0));
        let sub = Arc::new(StreamSub {
            tx,
            lagged: lagged.clone(),
        });
        let id = self.subscribe(pattern, sub)?;
        Ok(BatchStream {
            rx,
            lagged,
            bus: self.clone(),
            id,
        })
    }

    /// See [`Engine::flush`].
    pub fn flush(&self) -> Result<()> {
        self.engine.flush()
    }

    /// See [`Engine::flush_async`].
    pub async fn flush_async(&self) -> Result<()> {
        self.engine.flush_async().await
    }

    /// See [`Engine::stats`].
    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }

    /// The engine behind this bus.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Events lost because a [`BatchStream`] reader fell behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged(pub u64);

impl std::fmt::Display for Lagged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream lagged: {} events dropped", self.0)
    }
}

impl std::error::Error for Lagged {}

struct StreamSub {
    tx: tokio::sync::mpsc::Sender<Vec<BusEvent>>,
    lagged: Arc<AtomicU64>,
}

impl StreamSub {
    fn send(&self, events: Vec<BusEvent>) {
        let n = events.len() as u64;
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = self.tx.try_send(events) {
            self.lagged.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl BatchAwareSubscriber for StreamSub {
    fn on_event(&self, event: &BusEvent) {
        self.send(vec![event.clone()]);
    }
    fn on_batch(&self, events: &[BusEvent]) {
        self.send(events.to_vec());
    }
}

/// A bounded async stream of batches; see [`BatchingBus::subscribe_stream`].
/// Dropping it unsubscribes.
pub struct BatchStream {
    rx: tokio::sync::mpsc::Receiver<Vec<BusEvent>>,
    lagged: Arc<AtomicU64>,
    bus: BatchingBus,
    id: SubscriptionId,
}

impl BatchStream {
    /// The next batch, or `Err(Lagged(n))` once after `n` events were lost.
    /// `None` when the engine has shut down.
    pub async fn recv(&mut self) -> Option<Result<Vec<BusEvent>, Lagged>> {
        let lost = self.lagged.swap(0, Ordering::Relaxed);
        if lost > 0 {
            return Some(Err(Lagged(lost)));
        }
        self.rx.recv().await.map(Ok)
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.bus.unsubscribe(self.id);
    }
}

/// Delivers a closed batch to subscribers and republishes it on the inner bus.
pub(crate) fn dispatch_batch(shared: &Shared, batch: &Batch) {
    let Records::Events(events) = &batch.records else {
        return;
    };
    let subs = shared
        .subs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let inner = shared
        .inner
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let name = batch.batch_name();
    if batch.summary.is_some() {
        // Summarized: the window is one event, never one per sample.
        let ev = BusEvent {
            name,
            payload: Arc::new(batch.to_payload()),
            ts_ns: now_ns(),
        };
        dispatch_event_to(shared, &subs, inner.as_deref(), &ev);
        return;
    }
    for s in subs.iter() {
        let matched = matching(events, &s.pattern);
        if !matched.is_empty()
            && catch_unwind(AssertUnwindSafe(|| s.sub.on_batch(&matched))).is_err()
        {
            shared.subscriber_panicked("subscriber", s.pattern.as_str());
        }
    }
    if let Some(inner) = inner {
        if inner.wants(&name) {
            let ev = BusEvent {
                name,
                payload: Arc::new(batch.to_payload()),
                ts_ns: now_ns(),
            };
            if catch_unwind(AssertUnwindSafe(|| inner.publish(ev))).is_err() {
                shared.subscriber_panicked("inner bus", "");
            }
        }
    }
}

/// Delivers one passthrough event.
pub(crate) fn dispatch_event(shared: &Shared, ev: &BusEvent) {
    let subs = shared
        .subs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let inner = shared
        .inner
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    dispatch_event_to(shared, &subs, inner.as_deref(), ev);
}

fn dispatch_event_to(
    shared: &Shared,
    subs: &[Arc<SubEntry>],
    inner: Option<&dyn InnerBus>,
    ev: &BusEvent,
) {
    for s in subs {
        if s.pattern.matches(&ev.name)
            && catch_unwind(AssertUnwindSafe(|| s.sub.on_event(ev))).is_err()
        {
            shared.subscriber_panicked("subscriber", s.pattern.as_str());
        }
    }
    if let Some(inner) = inner {
        if inner.wants(&ev.name)
            && catch_unwind(AssertUnwindSafe(|| inner.publish(ev.clone()))).is_err()
        {
            shared.subscriber_panicked("inner bus", "");
        }
    }
}

/// The events matching `pattern`: borrowed when all do (the common case),
/// copied (name and payload pointer only) otherwise.
fn matching<'a>(events: &'a [BusEvent], pattern: &Pattern) -> Cow<'a, [BusEvent]> {
    let mut last: Option<(&str, bool)> = None;
    let mut hit = |name: &'a str| -> bool {
        match last {
            Some((n, r)) if n == name => r,
            _ => {
                let r = pattern.matches(name);
                last = Some((name, r));
                r
            }
        }
    };
    let first_miss = events.iter().position(|e| !hit(&e.name));
    match first_miss {
        None => Cow::Borrowed(events),
        Some(i) => Cow::Owned(
            events[..i]
                .iter()
                .chain(events[i + 1..].iter().filter(|e| hit(&e.name)))
                .cloned()
                .collect(),
        ),
    }
}
