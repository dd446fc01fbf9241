//! What flows through the engine: bus events, log records, and the batches
//! they are released in.

use std::borrow::Cow;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::layer::budget::Reservation;

/// Nanoseconds since the Unix epoch, now.
///
/// Read from the CPU's invariant time-stamp counter where there is one (a few
/// nanoseconds, against ~50 for `clock_gettime` in a VM), anchored to the
/// system clock and re-anchored about once a second by every running engine,
/// so it follows NTP adjustments. Elsewhere it is the system clock itself.
pub fn now_ns() -> i64 {
    let c = wall_clock();
    c.wall0
        + c.clock.delta_as_nanos(c.raw0, c.clock.raw()) as i64
        + c.adjust.load(Ordering::Relaxed)
}

struct WallClock {
    clock: quanta::Clock,
    raw0: u64,
    wall0: i64,
    /// Correction from the counter's reading to the system clock, in ns.
    adjust: AtomicI64,
}

fn system_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn wall_clock() -> &'static WallClock {
    static CLOCK: OnceLock<WallClock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let clock = quanta::Clock::new();
        let raw0 = clock.raw();
        WallClock {
            clock,
            raw0,
            wall0: system_now_ns(),
            adjust: AtomicI64::new(0),
        }
    })
}

/// Re-anchors [`now_ns`] to the system clock (the engine calls it about once a second).
pub(crate) fn resync_clock() {
    let c = wall_clock();
    let counted = c.wall0 + c.clock.delta_as_nanos(c.raw0, c.clock.raw()) as i64;
    c.adjust.store(system_now_ns() - counted, Ordering::Relaxed);
}

/// One bus event: a colon-separated name and a JSON payload shared behind an
/// `Arc`, so fanning it out to subscribers never deep-copies it.
#[derive(Clone, Debug, PartialEq)]
pub struct BusEvent {
    /// `data:users:created`
    pub name: String,
    /// The payload, shared.
    pub payload: Arc<Value>,
    /// When it was published, in nanoseconds since the Unix epoch.
    pub ts_ns: i64,
}

impl BusEvent {
    /// An event stamped with the current time.
    pub fn new(name: impl Into<String>, payload: impl Into<Arc<Value>>) -> BusEvent {
        BusEvent {
            name: name.into(),
            payload: payload.into(),
            ts_ns: now_ns(),
        }
    }
}

/// A payload handed to `publish`: a JSON value, owned or already shared.
///
/// Publishing an owned [`Value`] moves it into the pipeline as it is; the
/// `Arc` that subscribers share is made later, off the publishing thread, so
/// a publish costs the caller no allocation of spillway's own.
#[derive(Clone, Debug, PartialEq)]
pub struct Payload(PayloadInner);

#[derive(Clone, Debug, PartialEq)]
enum PayloadInner {
    Owned(Value),
    Shared(Arc<Value>),
}

impl Payload {
    /// The value.
    pub fn value(&self) -> &Value {
        match &self.0 {
            PayloadInner::Owned(v) => v,
            PayloadInner::Shared(v) => v,
        }
    }

    /// The value behind an `Arc` (allocated here if it was owned).
    pub fn into_arc(self) -> Arc<Value> {
        match self.0 {
            PayloadInner::Owned(v) => Arc::new(v),
            PayloadInner::Shared(v) => v,
        }
    }

    /// Makes the payload shared, and returns a handle to it.
    pub(crate) fn share(&mut self) -> Arc<Value> {
        let arc = match std::mem::replace(&mut self.0, PayloadInner::Owned(Value::Null)) {
            PayloadInner::Owned(v) => Arc::new(v),
            PayloadInner::Shared(v) => v,
        };
        self.0 = PayloadInner::Shared(arc.clone());
        arc
    }
}

impl Payload {
    /// Puts the value in `slot`, reusing its allocation when nothing else
    /// holds it.
    pub(crate) fn store(self, slot: &mut Arc<Value>) {
        match self.0 {
            PayloadInner::Owned(v) => match Arc::get_mut(slot) {
                Some(place) => *place = v,
                None => *slot = Arc::new(v),
            },
            PayloadInner::Shared(v) => *slot = v,
        }
    }
}

impl From<Value> for Payload {
    fn from(v: Value) -> Payload {
        Payload(PayloadInner::Owned(v))
    }
}

impl From<Arc<Value>> for Payload {
    fn from(v: Arc<Value>) -> Payload {
        Payload(PayloadInner::Shared(v))
    }
}

impl From<&Arc<Value>> for Payload {
    fn from(v: &Arc<Value>) -> Payload {
        Payload(PayloadInner::Shared(v.clone()))
    }
}

impl From<Box<Value>> for Payload {
    fn from(v: Box<Value>) -> Payload {
        Payload(PayloadInner::Owned(*v))
    }
}

/// What a record is: a log line, a bus event, or a telemetry sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    /// A `tracing` (or `log`) event.
    Log,
    /// A bus publish.
    Event,
    /// A telemetry sample.
    Sample,
}

impl RecordKind {
    /// `"log"`, `"event"` or `"sample"`, as written in segments.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Log => "log",
            RecordKind::Event => "event",
            RecordKind::Sample => "sample",
        }
    }
}

/// A typed field value: integers stay integers.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    /// A signed integer.
    I64(i64),
    /// An unsigned integer.
    U64(u64),
    /// A float.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A string, or a value recorded with `Debug` (its `{:?}` text).
    Str(String),
}

impl FieldValue {
    /// The value as JSON (non-finite floats become strings).
    pub fn to_json(&self) -> Value {
        match self {
            FieldValue::I64(v) => Value::from(*v),
            FieldValue::U64(v) => Value::from(*v),
            FieldValue::F64(v) if v.is_finite() => Value::from(*v),
            FieldValue::F64(v) => Value::String(v.to_string()),
            FieldValue::Bool(v) => Value::Bool(*v),
            FieldValue::Str(v) => Value::String(v.clone()),
        }
    }
}

/// The name and fields of a span enclosing a log record.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    /// The span's name.
    pub name: Cow<'static, str>,
    /// Its fields, as last recorded.
    pub fields: Vec<(Cow<'static, str>, FieldValue)>,
}

/// Severity of a log record, most severe first.
pub use tracing_core::Level;

/// One captured log event.
#[derive(Clone, Debug, PartialEq)]
pub struct LogRecord {
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: i64,
    /// Severity.
    pub level: Level,
    /// The event's target (its module path unless set): the key is `log:<target>`.
    pub target: Cow<'static, str>,
    /// The module the event was emitted in.
    pub module_path: Option<Cow<'static, str>>,
    /// Source file.
    pub file: Option<Cow<'static, str>>,
    /// Source line.
    pub line: Option<u32>,
    /// The formatted message.
    pub message: String,
    /// The event's other fields, typed, in the order they were written.
    pub fields: Vec<(Cow<'static, str>, FieldValue)>,
    /// Enclosing spans, outermost first.
    pub spans: Vec<Arc<SpanRecord>>,
}

impl LogRecord {
    /// The batching key of a log record: `log:<target>`.
    pub fn key(&self) -> String {
        format!("log:{}", self.target)
    }
}

/// Reads the first byte of every string `records` point to, so that their
/// cache misses are all in flight at once rather than met one after the
/// other as each record is read or overwritten. Records travel between
/// threads and their strings are scattered over the heap: the segment
/// writer spent most of its time waiting for them.
pub(crate) fn touch_logs(records: &[LogRecord]) {
    let mut x = 0u8;
    let first = |s: &str| s.as_bytes().first().copied().unwrap_or(0);
    for r in records {
        x ^= first(&r.message);
        for (_, v) in &r.fields {
            if let FieldValue::Str(s) = v {
                x ^= first(s);
            }
        }
    }
    std::hint::black_box(x);
}

/// The records of one batch. A batch holds one kind only.
#[derive(Debug)]
pub enum Records {
    /// Bus events or telemetry samples.
    Events(Vec<BusEvent>),
    /// Log records.
    Logs(Vec<LogRecord>),
}

impl Records {
    /// Number of records.
    pub fn len(&self) -> usize {
        match self {
            Records::Events(v) => v.len(),
            Records::Logs(v) => v.len(),
        }
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A closed batch: the records of one prefix, in order, released together.
#[derive(Debug)]
pub struct Batch {
    /// Increasing in close order; it starts at the engine's start time in
    /// microseconds since the epoch, so ids stay unique across restarts.
    pub id: u64,
    /// The batching key, e.g. `data:users` or `log:myapp::indexer`.
    pub prefix: Arc<str>,
    /// Log, Event or Sample.
    pub kind: RecordKind,
    /// The records, in the order they were accepted.
    pub records: Records,
    /// Records of this prefix dropped since the previous batch.
    pub dropped: u64,
    /// When the first of those drops happened (ns since the epoch).
    pub dropped_since_ns: Option<i64>,
    /// Timestamp of the first record.
    pub first_ts_ns: i64,
    /// Timestamp of the last record.
    pub last_ts_ns: i64,
    /// Whether sinks should write it.
    pub persist: bool,
    /// Holds a WARN or ERROR log: sinks write it through at once.
    pub urgent: bool,
    /// The policy's reducer output, for summarized policies.
    pub summary: Option<Arc<Value>>,
    /// A log batch's events in captured form, when every sink of the engine
    /// reads that form (then `records` is empty). See `CapturedLogs`.
    pub(crate) captured: Option<crate::layer::capture::CapturedLogs>,
    pub(crate) _reservation: Reservation,
}

impl Batch {
    /// The name this batch is republished under: `<prefix>:batch`.
    pub fn batch_name(&self) -> String {
        format!("{}:batch", self.prefix)
    }

    /// The in-stream record that reports this batch's drops, if any:
    /// "N records dropped on PREFIX since T". Sinks write it before the records.
    pub fn drop_notice(&self) -> Option<LogRecord> {
        if self.dropped == 0 {
            return None;
        }
        let since = self.dropped_since_ns.unwrap_or(self.first_ts_ns);
        Some(LogRecord {
            ts_ns: self.first_ts_ns,
            level: Level::WARN,
            target: Cow::Borrowed("spillway"),
            module_path: None,
            file: None,
            line: None,
            message: format!(
                "{} records dropped on {} since {}",
                self.dropped,
                self.prefix,
                crate::layer::record::rfc3339(since)
            ),
            fields: vec![
                (Cow::Borrowed("dropped"), FieldValue::U64(self.dropped)),
                (
                    Cow::Borrowed("prefix"),
                    FieldValue::Str(self.prefix.to_string()),
                ),
                (Cow::Borrowed("since_ns"), FieldValue::I64(since)),
            ],
            spans: Vec::new(),
        })
    }

    /// The payload of the `<prefix>:batch` event:
    /// `{count, dropped, first_ts, last_ts, events: [{name, payload}]}`,
    /// or the summary for summarized policies.
    pub fn to_payload(&self) -> Value {
        let mut obj = serde_json::Map::new();
        obj.insert("count".into(), self.records.len().into());
        obj.insert("dropped".into(), self.dropped.into());
        obj.insert("first_ts".into(), rfc3339(self.first_ts_ns).into());
        obj.insert("last_ts".into(), rfc3339(self.last_ts_ns).into());
        if let Some(summary) = &self.summary {
            obj.insert("summary".into(), (**summary).clone());
        } else if let Records::Events(events) = &self.records {
            let list = events
                .iter()
                .map(|e| {
                    let mut o = serde_json::Map::new();
                    o.insert("name".into(), e.name.clone().into());
                    o.insert("payload".into(), (*e.payload).clone());
                    Value::Object(o)
                })
                .collect();
            obj.insert("events".into(), Value::Array(list));
        }
        Value::Object(obj)
    }
}

/// Formats nanoseconds since the epoch as RFC 3339 UTC with nanoseconds.
pub fn rfc3339(ts_ns: i64) -> String {
    let secs = ts_ns.div_euclid(1_000_000_000);
    let nanos = ts_ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

// Howard Hinnant's days-to-civil algorithm: exact for the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A rough size of a JSON value in bytes, for batch and budget accounting.
pub(crate) fn estimate_value(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) => 8,
        Value::Number(_) => 16,
        Value::String(s) => 24 + s.len(),
        Value::Array(a) => 24 + a.iter().map(estimate_value).sum::<usize>(),
        Value::Object(o) => {
            48 + o
                .iter()
                .map(|(k, v)| 32 + k.len() + estimate_value(v))
                .sum::<usize>()
        }
    }
}

/// A rough size of a log record in bytes.
pub(crate) fn estimate_log(r: &LogRecord) -> usize {
    let fields: usize = r
        .fields
        .iter()
        .map(|(k, v)| {
            40 + k.len()
                + match v {
                    FieldValue::Str(s) => s.len(),
                    _ => 0,
                }
        })
        .sum();
    std::mem::size_of::<LogRecord>() + r.message.len() + fields + 16 * r.spans.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches the fast clock drifting from (or being offset against) the
    // system clock: the two must agree to well within a millisecond.
    #[test]
    fn now_ns_follows_the_system_clock() {
        for _ in 0..3 {
            resync_clock();
            let before = system_now_ns();
            let ours = now_ns();
            let after = system_now_ns();
            assert!(
                ours >= before - 1_000_000 && ours <= after + 1_000_000,
                "{before} <= {ours} <= {after} (±1 ms)"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    // Catches a broken calendar conversion (leap years, epoch, nanosecond padding).
    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339(1_796_299_199_999_999_999),
            "2026-12-03T11:59:59.999999999Z"
        );
    }
}
