//! The publisher's hot path.
//!
//! Each publishing thread owns a slot per engine: a mutex-guarded chunk that
//! only the engine thread ever contends for. Records are appended there and
//! handed to the engine a chunk at a time, so the per-record cost is a hash
//! lookup of the name (cached per thread), a budget check against per-thread
//! credit, and a push. The engine sweeps the slots on its own clock, so a
//! record never waits in a half-full chunk for longer than the sweep interval.
//!
//! Nothing is allocated per record on this path: an event's name travels as
//! an index into its chunk's name table and an owned payload as the value
//! itself, a captured log event as ranges into its chunk's arena; chunks are
//! recycled. The engine builds the `BusEvent`s and `LogRecord`s that batches
//! carry, on its own thread, reusing delivered ones. (With glibc's malloc, a
//! thread that only allocates while other threads free what it allocated
//! pays on every call; that was most of the hot path before.)

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tracing_core::Metadata;

use crate::error::{Error, Result};
use crate::layer::capture::{Arena, Parts, ARENA_TEXT_LIMIT};
use crate::layer::config::OnFull;
use crate::layer::engine::{CtlMsg, Shared};
use crate::layer::name::{prefix_of, validate_name};
use crate::layer::record::{
    estimate_log, estimate_value, BusEvent, LogRecord, Payload, RecordKind,
};

/// Entries a thread accumulates before handing a chunk to the engine.
pub(crate) const CHUNK: usize = 256;
/// Routes a thread caches before the cache is cleared (bounds memory when names carry ids).
const ROUTE_CACHE_MAX: usize = 4096;

pub(crate) const F_PASSTHROUGH: u8 = 1;
pub(crate) const F_EVICT: u8 = 2;
pub(crate) const F_URGENT: u8 = 4;

/// One accepted record on its way to the engine.
pub(crate) enum Entry {
    /// A bus event or sample; the engine builds its `BusEvent` (see the
    /// module docs for why).
    Event {
        /// Index of the name in its chunk's `names`.
        name: u16,
        payload: Payload,
        ts_ns: i64,
        kind: RecordKind,
        policy: u16,
        size: u32,
        flags: u8,
    },
    /// A log record built by its submitter (`Engine::submit_log`, records
    /// from the `log` crate).
    Log {
        rec: Box<LogRecord>,
        policy: u16,
        size: u32,
        flags: u8,
    },
    /// A tracing event captured by the layer into its chunk's arena; the
    /// engine builds its `LogRecord`.
    Captured {
        meta: &'static Metadata<'static>,
        ts_ns: i64,
        parts: Parts,
        /// Keep file, line and module path.
        location: bool,
        policy: u16,
        size: u32,
        flags: u8,
    },
}

/// A run of entries from one thread, with the names its events refer to
/// (each distinct name once per chunk, shared with the thread's route cache).
#[derive(Default)]
pub(crate) struct Chunk {
    pub(crate) entries: Vec<Entry>,
    pub(crate) names: Vec<Arc<str>>,
    /// The captured log events' text, fields and spans.
    pub(crate) arena: Arena,
}

impl Chunk {
    /// A chunk of one entry (the control-channel path).
    fn single(entry: Entry, name: Option<&str>) -> Chunk {
        Chunk {
            entries: vec![entry],
            names: name.map(Arc::from).into_iter().collect(),
            arena: Arena::default(),
        }
    }

    /// An empty chunk with room for CHUNK entries (its arena is sized at
    /// its first log event).
    fn fresh() -> Chunk {
        Chunk {
            entries: Vec::with_capacity(CHUNK),
            ..Chunk::default()
        }
    }

    /// Empties the chunk for reuse, keeping its buffers.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.names.clear();
        self.arena.clear();
    }

    /// Whether its buffers are the kind worth keeping for reuse.
    pub(crate) fn reusable(&self) -> bool {
        self.entries.capacity() >= CHUNK && !self.arena.oversized()
    }

    fn is_full(&self) -> bool {
        self.entries.len() >= CHUNK || self.arena.text.len() >= ARENA_TEXT_LIMIT
    }
}

#[derive(Default)]
pub(crate) struct SlotInner {
    pub(crate) cur: Chunk,
    pub(crate) full: Vec<Chunk>,
    /// Emptied chunks the engine hands back, so a publisher does not
    /// allocate fresh buffers every CHUNK records.
    pub(crate) spare: Vec<Chunk>,
    /// Bumped whenever `cur` is handed on: a route's cached index into
    /// `cur.names` holds only for the generation it was taken in.
    generation: u64,
    /// Set by the engine's final sweep: nothing pushed after it would be seen.
    pub(crate) closed: bool,
}

/// Spare chunks a slot keeps at most.
pub(crate) const SPARE_CHUNKS: usize = 4;

impl SlotInner {
    /// Takes the current chunk (the engine's sweep, or a publisher when it is full).
    pub(crate) fn take_cur(&mut self, refill: bool) -> Chunk {
        self.generation += 1;
        let next = if refill {
            self.spare.pop().unwrap_or_else(Chunk::fresh)
        } else {
            Chunk::default()
        };
        std::mem::replace(&mut self.cur, next)
    }

    /// The index of `route`'s name in the current chunk, adding it once.
    fn name_index(&mut self, route: &mut Route) -> u16 {
        if route.name_generation != self.generation {
            route.name_generation = self.generation;
            route.name_index = self.cur.names.len() as u16;
            self.cur.names.push(route.name.clone());
        }
        route.name_index
    }
}

#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) inner: Mutex<SlotInner>,
    pub(crate) dead: AtomicBool,
}

/// What a publisher needs to know about a name, resolved once per thread.
#[derive(Clone)]
pub(crate) struct Route {
    /// The name (or log target) this route was resolved for.
    name: Arc<str>,
    /// Where `name` sits in the slot's current chunk: valid while the
    /// slot's generation equals `name_generation`.
    name_generation: u64,
    name_index: u16,
    policy: u16,
    passthrough: bool,
    persist: bool,
    on_full: OnFull,
    block_timeout: Duration,
    /// Bytes of this route's prefix held in the engine: added by publishers,
    /// given back when its batch is dropped. Wrapping: it may dip below zero
    /// for a moment, while a publisher still holds bytes in `pending`.
    share: Arc<AtomicUsize>,
    /// Bytes this thread accepted on this route but has not yet added to
    /// `share` (added at least every credit block, so the hot path does not
    /// bounce the shared counter between cores).
    pending: usize,
}

impl Route {
    fn flush_pending(&mut self) {
        if self.pending > 0 {
            self.share.fetch_add(self.pending, Ordering::Relaxed);
            self.pending = 0;
        }
    }
}

/// The bytes a prefix holds, from its wrapping counter.
fn held(share: &AtomicUsize) -> usize {
    (share.load(Ordering::Relaxed) as isize).max(0) as usize
}

/// A small, fast hasher for the per-thread route caches (FxHash).
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        for &b in chunks.remainder() {
            self.add(b as u64);
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A thread's cache of resolved routes: one hash lookup per record.
#[derive(Default)]
struct RouteCache {
    index: FxMap<Arc<str>, usize>,
    list: Vec<Route>,
    /// The last `&'static` log target looked up (its address and length)
    /// and its index in `list`: a thread logging in a loop repeats its
    /// target, and comparing two words is cheaper than hashing it. Only
    /// static text may be known by its address (other text can be freed
    /// and its memory reused for different text).
    last_static: Option<(usize, usize, usize)>,
}

impl RouteCache {
    fn insert(&mut self, route: Route) -> &mut Route {
        if self.list.len() >= ROUTE_CACHE_MAX {
            self.flush_pending();
            self.index.clear();
            self.list.clear();
            self.last_static = None;
        }
        self.index.insert(route.name.clone(), self.list.len());
        self.list.push(route);
        let last = self.list.len() - 1;
        &mut self.list[last]
    }

    fn flush_pending(&mut self) {
        self.list.iter_mut().for_each(Route::flush_pending);
    }
}

struct Local {
    engine_id: u64,
    shared: Weak<Shared>,
    slot: Arc<Slot>,
    routes: RouteCache,
    log_routes: RouteCache,
    credit: usize,
}

impl Drop for Local {
    fn drop(&mut self) {
        self.routes.flush_pending();
        self.log_routes.flush_pending();
        self.slot.dead.store(true, Ordering::Release);
        if let Some(shared) = self.shared.upgrade() {
            shared.budget.release(self.credit);
            shared.wake();
        }
    }
}

thread_local! {
    static LOCALS: RefCell<Vec<Local>> = const { RefCell::new(Vec::new()) };
}

impl Shared {
    /// Resolves the route of `key`; `name` is what the route cache files it under.
    fn route(&self, key: &str, name: &str) -> Route {
        let policy = self.config.policy_index(key);
        let p = self.config.policy_at(policy);
        let depth = p.prefix_depth.unwrap_or(self.config.prefix_depth);
        Route {
            name: Arc::from(name),
            name_generation: u64::MAX,
            name_index: 0,
            policy: policy as u16,
            passthrough: p.passthrough,
            persist: p.persist,
            on_full: p.on_full,
            block_timeout: p.block_timeout,
            share: self.share_for(prefix_of(key, depth)),
            pending: 0,
        }
    }

    pub(crate) fn prefix_depth_of(&self, policy: u16) -> usize {
        self.config
            .policy_at(policy as usize)
            .prefix_depth
            .unwrap_or(self.config.prefix_depth)
    }

    /// Accepts a bus event or sample. Returns once it is queued (or counted as dropped).
    pub(crate) fn submit_event(
        self: &Arc<Self>,
        name: &str,
        payload: Payload,
        ts_ns: i64,
        kind: RecordKind,
    ) -> Result<()> {
        self.submit(
            payload,
            |local, payload| self.push_event(local, name, payload, ts_ns, kind),
            |payload| self.submit_event_slow(name, payload, ts_ns, kind),
        )
    }

    /// Hands `item` to `fast` with this thread's slot; when the thread-local
    /// state is out of reach (re-entered from inside the hot path, or during
    /// thread teardown), to `slow`, which goes through the control channel.
    fn submit<T>(
        self: &Arc<Self>,
        item: T,
        fast: impl FnOnce(&mut Local, T) -> Result<()>,
        slow: impl FnOnce(T) -> Result<()>,
    ) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        let mut item = Some(item);
        let res = LOCALS.try_with(|cell| {
            let Ok(mut locals) = cell.try_borrow_mut() else {
                return None;
            };
            let item = item.take()?;
            Some(fast(local_for(&mut locals, self), item))
        });
        match (res, item.take()) {
            (Ok(Some(r)), _) => r,
            (_, Some(item)) => slow(item),
            (_, None) => Ok(()),
        }
    }

    fn push_event(
        &self,
        local: &mut Local,
        name: &str,
        mut payload: Payload,
        ts_ns: i64,
        kind: RecordKind,
    ) -> Result<()> {
        let Local {
            routes,
            credit,
            slot,
            ..
        } = local;
        let route = match routes.index.get(name) {
            Some(&i) => &mut routes.list[i],
            None => {
                validate_name(name)?;
                routes.insert(self.route(name, name))
            }
        };
        let mut size = name.len() + estimate_value(payload.value()) + 64;
        let mut flags = 0;
        let admitted = if route.passthrough {
            flags |= F_PASSTHROUGH;
            self.deliver_passthrough(
                &passthrough_event(name, &mut payload, ts_ns),
                size,
                route.policy,
                kind,
            );
            if route.persist {
                // Delivered already: never block the publisher to persist it.
                self.admit_passthrough(credit, size, route)
            } else {
                // Nothing to keep: the entry only carries the count.
                size = 0;
                Some(0)
            }
        } else {
            self.admit(credit, size, route, false)
        };
        match admitted {
            Some(extra) => flags |= extra,
            None => {
                let depth = self.prefix_depth_of(route.policy);
                self.count_drop(prefix_of(name, depth), route.policy, kind, ts_ns);
                return Ok(());
            }
        }
        let policy = route.policy;
        let pushed = self.push_entry(slot, |inner| Entry::Event {
            name: inner.name_index(route),
            payload,
            ts_ns,
            kind,
            policy,
            size: size as u32,
            flags,
        });
        if !pushed {
            self.give_back(&route.share, size);
            return Err(Error::ShutDown);
        }
        Ok(())
    }

    /// Budget for persisting a passthrough event: the overdraft if need be,
    /// and never a wait (the event has been delivered).
    fn admit_passthrough(&self, credit: &mut usize, size: usize, route: &mut Route) -> Option<u8> {
        if *credit >= size {
            *credit -= size;
            route.pending += size;
            return Some(0);
        }
        route.share.fetch_add(size, Ordering::Relaxed);
        if self.budget.try_acquire(size, true) {
            Some(0)
        } else {
            route.share.fetch_sub(size, Ordering::Relaxed);
            None
        }
    }

    /// Gives back what a record that was not queued had taken.
    fn give_back(&self, share: &AtomicUsize, size: usize) {
        share.fetch_sub(size, Ordering::Relaxed);
        self.budget.release(size);
    }

    /// Accepts a log record. `urgent` closes its batch at the next sweep.
    pub(crate) fn submit_log(self: &Arc<Self>, rec: Box<LogRecord>, urgent: bool) -> Result<()> {
        self.submit(
            rec,
            |local, rec| self.push_log(local, rec, urgent),
            |rec| self.submit_log_slow(rec, urgent),
        )
    }

    fn submit_log_slow(&self, rec: Box<LogRecord>, urgent: bool) -> Result<()> {
        let route = self.route(&rec.key(), &rec.target);
        let size = estimate_log(&rec);
        route.share.fetch_add(size, Ordering::Relaxed);
        if !self.budget.try_acquire(size, urgent) {
            route.share.fetch_sub(size, Ordering::Relaxed);
            self.count_log_drop(&rec.target, route.policy, rec.ts_ns);
            return Ok(());
        }
        let entry = Entry::Log {
            rec,
            policy: route.policy,
            size: size as u32,
            flags: if urgent { F_URGENT } else { 0 },
        };
        if self
            .send_ctl(CtlMsg::Entries(Chunk::single(entry, None)))
            .is_some()
        {
            self.give_back(&route.share, size);
            return Err(Error::ShutDown);
        }
        Ok(())
    }

    fn push_log(&self, local: &mut Local, rec: Box<LogRecord>, urgent: bool) -> Result<()> {
        let target = rec.target.clone();
        let (ts_ns, size) = (rec.ts_ns, estimate_log(&rec));
        self.push_log_entry(
            local,
            (&target, false),
            ts_ns,
            size,
            urgent,
            |_, policy, flags| Entry::Log {
                rec,
                policy,
                size: size as u32,
                flags,
            },
        )
    }

    /// The fast path of log records and captured events: the route of
    /// `target`, budget for `size` bytes, and the entry `make` builds in the
    /// slot (given the policy and flags). The target comes with whether it
    /// is `&'static` text (a call site's), whose route may be found by address.
    fn push_log_entry(
        &self,
        local: &mut Local,
        (target, is_static): (&str, bool),
        ts_ns: i64,
        size: usize,
        urgent: bool,
        make: impl FnOnce(&mut SlotInner, u16, u8) -> Entry,
    ) -> Result<()> {
        let Local {
            log_routes,
            credit,
            slot,
            ..
        } = local;
        let addr = (target.as_ptr() as usize, target.len());
        let i = match log_routes.last_static {
            Some((p, l, i)) if is_static && (p, l) == addr => i,
            _ => {
                let i = match log_routes.index.get(target) {
                    Some(&i) => i,
                    None => {
                        log_routes.insert(self.route(&format!("log:{target}"), target));
                        log_routes.list.len() - 1
                    }
                };
                if is_static {
                    log_routes.last_static = Some((addr.0, addr.1, i));
                }
                i
            }
        };
        let route = &mut log_routes.list[i];
        let mut flags = if urgent { F_URGENT } else { 0 };
        match self.admit(credit, size, route, urgent) {
            Some(extra) => flags |= extra,
            None => {
                self.count_log_drop(target, route.policy, ts_ns);
                return Ok(());
            }
        }
        let policy = route.policy;
        if !self.push_entry(slot, |inner| make(inner, policy, flags)) {
            self.give_back(&route.share, size);
            return Err(Error::ShutDown);
        }
        Ok(())
    }

    /// Counts a log record of `target` refused for lack of memory.
    fn count_log_drop(&self, target: &str, policy: u16, ts_ns: i64) {
        let key = format!("log:{target}");
        let prefix = prefix_of(&key, self.prefix_depth_of(policy));
        self.count_drop(prefix, policy, RecordKind::Log, ts_ns);
    }

    /// Accepts a tracing event captured into `arena` (at `parts`): copied
    /// into the thread's chunk, or built into a record when the thread's
    /// slot is out of reach.
    pub(crate) fn submit_captured(
        self: &Arc<Self>,
        meta: &'static Metadata<'static>,
        ts_ns: i64,
        arena: &mut Arena,
        parts: &Parts,
        location: bool,
        urgent: bool,
    ) -> Result<()> {
        let size = arena.estimate(parts);
        self.submit(
            arena,
            |local, arena| {
                self.push_log_entry(
                    local,
                    (meta.target(), true),
                    ts_ns,
                    size,
                    urgent,
                    |inner, policy, flags| Entry::Captured {
                        meta,
                        ts_ns,
                        parts: inner.cur.arena.append(arena, parts),
                        location,
                        policy,
                        size: size as u32,
                        flags,
                    },
                )
            },
            |arena| {
                let rec = crate::layer::tracing_layer::captured_record(
                    meta, ts_ns, arena, parts, location,
                );
                self.submit_log_slow(Box::new(rec), urgent)
            },
        )
    }

    /// Takes budget for `size` bytes. `None` means the record is dropped;
    /// `Some(flags)` carries F_EVICT when the engine must make room.
    ///
    /// Fairness: once the budget is three-quarters spent, a prefix holding
    /// more than half of it is treated as full, so one flooding prefix (a
    /// DEBUG storm from one module) cannot starve the others.
    fn admit(
        &self,
        credit: &mut usize,
        size: usize,
        route: &mut Route,
        priority: bool,
    ) -> Option<u8> {
        // Counted by the publisher, so that fairness is judged on what has
        // been queued, not on what the engine has got round to ingesting.
        if *credit >= size {
            *credit -= size;
            route.pending += size;
            if route.pending >= self.budget.credit_block() {
                route.flush_pending();
            }
            return Some(0);
        }
        // Slow path, once per credit block: check fairness and take more budget.
        route.pending += size;
        route.flush_pending();
        let mine = held(&route.share);
        if priority || self.budget.fair(mine) {
            let block = self.budget.credit_block();
            if size < block && self.budget.try_acquire(block, false) {
                *credit += block - size;
                return Some(0);
            }
            if self.budget.try_acquire(size, false) {
                return Some(0);
            }
            if priority && self.budget.try_acquire(size, true) {
                return Some(0);
            }
        }
        let deadline = Instant::now() + route.block_timeout;
        let share = &route.share;
        let admitted = match route.on_full {
            OnFull::DropNewest => None,
            OnFull::Block => self
                .budget
                .acquire_until(size, deadline, false, || held(share))
                .then_some(0),
            // Overdraw, and let the engine evict this prefix's oldest records to
            // pay it back; wait (up to block_timeout) while it catches up.
            OnFull::DropOldest => self
                .budget
                .acquire_until(size, deadline, true, || 0)
                .then_some(F_EVICT),
        };
        if admitted.is_none() {
            route.share.fetch_sub(size, Ordering::Relaxed);
        }
        admitted
    }

    /// Queues the entry `make` builds (under the slot's lock, so that it can
    /// refer to the current chunk's names and arena); `false` once the
    /// engine has made its final sweep (the caller gives the budget back).
    fn push_entry(&self, slot: &Slot, make: impl FnOnce(&mut SlotInner) -> Entry) -> bool {
        let mut inner = slot.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.closed {
            return false;
        }
        let was_empty = inner.cur.entries.is_empty();
        if was_empty && inner.cur.entries.capacity() == 0 {
            inner.cur = inner.spare.pop().unwrap_or_else(Chunk::fresh);
        }
        let entry = make(&mut inner);
        inner.cur.entries.push(entry);
        let full = inner.cur.is_full();
        if full {
            let chunk = inner.take_cur(true);
            inner.full.push(chunk);
        }
        drop(inner);
        if full {
            if !self.chunk_ready.swap(true, Ordering::AcqRel) {
                self.wake();
            }
        } else if was_empty
            && self.idle.load(Ordering::SeqCst)
            && self.idle.swap(false, Ordering::SeqCst)
        {
            self.wake();
        }
        true
    }

    fn submit_event_slow(
        &self,
        name: &str,
        mut payload: Payload,
        ts_ns: i64,
        kind: RecordKind,
    ) -> Result<()> {
        validate_name(name)?;
        let route = self.route(name, name);
        let size = name.len() + estimate_value(payload.value()) + 64;
        let mut flags = 0;
        if route.passthrough {
            flags |= F_PASSTHROUGH;
            self.deliver_passthrough(
                &passthrough_event(name, &mut payload, ts_ns),
                size,
                route.policy,
                kind,
            );
        }
        route.share.fetch_add(size, Ordering::Relaxed);
        if !self.budget.try_acquire(size, route.passthrough) {
            route.share.fetch_sub(size, Ordering::Relaxed);
            let depth = self.prefix_depth_of(route.policy);
            self.count_drop(prefix_of(name, depth), route.policy, kind, ts_ns);
            return Ok(());
        }
        let entry = Entry::Event {
            name: 0,
            payload,
            ts_ns,
            kind,
            policy: route.policy,
            size: size as u32,
            flags,
        };
        if self
            .send_ctl(CtlMsg::Entries(Chunk::single(entry, Some(name))))
            .is_some()
        {
            self.give_back(&route.share, size);
            return Err(Error::ShutDown);
        }
        Ok(())
    }
}

/// The event a passthrough publish delivers at once (its payload is shared
/// with the entry that persists it).
fn passthrough_event(name: &str, payload: &mut Payload, ts_ns: i64) -> BusEvent {
    BusEvent {
        name: name.to_owned(),
        payload: payload.share(),
        ts_ns,
    }
}

fn local_for<'a>(locals: &'a mut Vec<Local>, shared: &Arc<Shared>) -> &'a mut Local {
    if let Some(i) = locals.iter().position(|l| l.engine_id == shared.id) {
        return &mut locals[i];
    }
    // Forget engines that are gone before registering with a new one.
    locals.retain(|l| l.shared.strong_count() > 0);
    let slot = Arc::new(Slot::default());
    shared
        .slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(slot.clone());
    locals.push(Local {
        engine_id: shared.id,
        shared: Arc::downgrade(shared),
        slot,
        routes: RouteCache::default(),
        log_routes: RouteCache::default(),
        credit: 0,
    });
    let last = locals.len() - 1;
    &mut locals[last]
}
