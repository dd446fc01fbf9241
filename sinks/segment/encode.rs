//! The JSON Lines encoding of a batch (DESIGN.md section 4).
//!
//! One line per record, in this order: the batch's drop notice (a `log`
//! record, target `spillway`, level `WARN`) if it dropped anything, the
//! records themselves, and for a summarized batch one `summary` line. Every
//! line of a batch carries the batch id and the batch's prefix (its batching
//! key), so a reader can regroup them.
//!
//! ```text
//! {"ts":"2026-12-03T16:20:01.123456789Z","ts_ns":1796314801123456789,"kind":"log","batch":7,"prefix":"log:myapp::db","target":"myapp::db","level":"INFO","module":"myapp::db","file":"src/db.rs","line":42,"message":"row written","fields":{"user_id":42},"spans":[{"name":"req","fields":{"id":"a1"}}]}
//! {"ts":"2026-12-03T16:20:01.123456789Z","ts_ns":1796314801123456789,"kind":"event","batch":8,"prefix":"data:users","name":"data:users:created","payload":{"id":42}}
//! ```
//!
//! Strings that need escaping are escaped by `serde_json`, so control
//! characters and quotes in messages or names can never break a line.

use serde_json::Value;

use crate::layer::capture::{Arena, CapturedLog, Val};
use crate::layer::record::{
    rfc3339, touch_logs, Batch, BusEvent, FieldValue, LogRecord, Records, SpanRecord,
};

/// Appends the JSON Lines of `batch` to `out`: the drop notice first (if
/// any), then its records, then the summary line (if the batch was
/// summarized). Every line ends with `\n`.
///
/// ```
/// # use spillway::{BatchConfig, Engine, Sink, Batch, Result};
/// # use std::sync::{Arc, Mutex};
/// # struct Capture(Arc<Mutex<Vec<u8>>>);
/// # impl Sink for Capture {
/// #     fn write_batch(&mut self, b: &Batch) -> Result<()> {
/// #         spillway::sinks::segment::encode::encode_batch(b, &mut self.0.lock().unwrap());
/// #         Ok(())
/// #     }
/// #     fn flush(&mut self) -> Result<()> { Ok(()) }
/// # }
/// # let out = Arc::new(Mutex::new(Vec::new()));
/// let (engine, _guard) = Engine::builder(BatchConfig::default())
///     .sink(Box::new(Capture(out.clone())))
///     .build()?;
/// engine.publish("data:users:created", serde_json::json!({"id": 42}))?;
/// engine.flush()?;
/// let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
/// let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
/// assert_eq!(line["kind"], "event");
/// assert_eq!(line["name"], "data:users:created");
/// assert_eq!(line["payload"]["id"], 42);
/// # Ok::<(), spillway::Error>(())
/// ```
pub fn encode_batch(batch: &Batch, out: &mut Vec<u8>) {
    Encoder::default().encode(batch, out)
}

/// Encodes batch after batch, keeping what can be reused between them
/// (the timestamp text of the current second, buffers): the segment writer
/// holds one.
#[derive(Default)]
pub(crate) struct Encoder {
    ts: TsText,
    kinds: Vec<(&'static str, Vec<u8>)>,
    loc: Vec<u8>,
}

impl Encoder {
    /// Appends the JSON Lines of `batch` to `out`, as [`encode_batch`] does.
    pub(crate) fn encode(&mut self, batch: &Batch, out: &mut Vec<u8>) {
        for (k, text) in self.kinds.iter_mut() {
            *k = "";
            text.clear();
        }
        let mut ctx = Ctx {
            batch: batch.id,
            prefix: &batch.prefix,
            kinds: &mut self.kinds,
            loc_key: None,
            loc: &mut self.loc,
        };
        encode_records(&mut ctx, &mut self.ts, batch, out);
    }
}

fn encode_records(ctx: &mut Ctx<'_>, ts: &mut TsText, batch: &Batch, out: &mut Vec<u8>) {
    if let Some(notice) = batch.drop_notice() {
        ctx.log_line(out, ts.format(notice.ts_ns), &notice);
    }
    if let Some(c) = &batch.captured {
        for e in &c.events {
            ctx.captured_line(out, ts.format(e.ts_ns), &c.arena, e);
        }
    }
    match &batch.records {
        Records::Logs(logs) => {
            for chunk in logs.chunks(32) {
                touch_logs(chunk);
                for rec in chunk {
                    ctx.log_line(out, ts.format(rec.ts_ns), rec);
                }
            }
        }
        Records::Events(events) => {
            let kind = batch.kind.as_str();
            for ev in events {
                ctx.event_line(out, ts.format(ev.ts_ns), kind, ev);
            }
        }
    }
    if batch.summary.is_some() {
        let payload = batch.to_payload();
        let ts = ts.format(batch.last_ts_ns);
        ctx.summary_line(out, ts, &batch.batch_name(), &payload);
    }
}

/// The start of a line, `{"ts":"<RFC 3339>","ts_ns":<ns>`, reusing the
/// date and time of day while the second stays the same (records of a
/// batch mostly share it): only the nine digits of nanoseconds change, and
/// they are the same digits in both fields. Formatting the full date for
/// every line was a tenth of the writer's time, the number another few
/// percent.
#[derive(Default)]
struct TsText {
    secs: Option<i64>,
    line: Vec<u8>,
    /// Where the nanosecond digits sit in `line`: in `ts`, and in `ts_ns`.
    digits: [usize; 2],
}

impl TsText {
    fn format(&mut self, ts_ns: i64) -> &[u8] {
        let secs = ts_ns.div_euclid(1_000_000_000);
        let mut nanos = ts_ns.rem_euclid(1_000_000_000);
        // Before 1970-01-01T00:00:01 `ts_ns` has no nine trailing digits of
        // its own to replace: written whole each time.
        if self.secs != Some(secs) || secs <= 0 {
            self.secs = Some(secs);
            let text = rfc3339(ts_ns);
            self.line.clear();
            self.line.extend_from_slice(b"{\"ts\":\"");
            self.line.extend_from_slice(text.as_bytes());
            // `rfc3339` ends in `.nnnnnnnnnZ`.
            self.digits[0] = self.line.len().saturating_sub(10);
            self.line.extend_from_slice(b"\",\"ts_ns\":");
            self.line
                .extend_from_slice(itoa::Buffer::new().format(ts_ns).as_bytes());
            self.digits[1] = self.line.len().saturating_sub(9);
            return &self.line;
        }
        let mut digits = [b'0'; 9];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (nanos % 10) as u8;
            nanos /= 10;
        }
        for at in self.digits {
            if let Some(place) = self.line.get_mut(at..at + 9) {
                place.copy_from_slice(&digits);
            }
        }
        &self.line
    }
}

/// What the lines of one batch share, encoded once.
struct Ctx<'a> {
    batch: u64,
    prefix: &'a str,
    /// `,"kind":"…","batch":N,"prefix":"…"` per kind of line.
    kinds: &'a mut Vec<(&'static str, Vec<u8>)>,
    /// The last log record's target, level and location (string addresses
    /// and lengths: within one batch every record is alive, so equal
    /// addresses mean equal text), and their encoding in `loc`. Records of
    /// a batch mostly come from a few call sites.
    loc_key: Option<LocKey>,
    loc: &'a mut Vec<u8>,
}

/// Where a log line comes from.
#[derive(Clone, Copy)]
struct Loc<'a> {
    level: crate::layer::record::Level,
    target: &'a str,
    module: Option<&'a str>,
    file: Option<&'a str>,
    line: Option<u32>,
}

type LocKey = (
    [(usize, usize); 3],
    Option<u32>,
    crate::layer::record::Level,
);

/// Address and length of an optional string.
fn addr(s: Option<&str>) -> (usize, usize) {
    s.map_or((0, usize::MAX), |s| (s.as_ptr() as usize, s.len()))
}

/// JSON text, written by hand: the keys are constants, numbers go through
/// `itoa`, and strings are copied as they are unless they need escaping
/// (then `serde_json` escapes them). Serializing each record through
/// `serde_json`'s map serializer was a third of the segment writer's time.
/// A test holds it byte-identical to `serde_json`'s output.
struct Json<'o>(&'o mut Vec<u8>);

/// Whether `s` holds a byte JSON must escape (a control character, `"` or
/// `\\`), tested eight bytes at a time. The word tests can only err towards
/// `true`, which sends the string to `serde_json`'s escaper: still correct.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let mut words = s.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let x = u64::from_le_bytes(b);
        // Bytes below 0x20, and bytes equal to `"` or `\\`.
        if x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0
            || has_zero(x ^ (ONES * b'"' as u64))
            || has_zero(x ^ (ONES * b'\\' as u64))
        {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

impl Json<'_> {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    fn str(&mut self, s: &str) {
        if !needs_escape(s.as_bytes()) {
            self.0.reserve(s.len() + 2);
            self.0.push(b'"');
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(b'"');
        } else {
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *self.0, s);
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.raw("null"),
        }
    }

    fn u64(&mut self, v: u64) {
        self.raw(itoa::Buffer::new().format(v));
    }

    fn i64(&mut self, v: i64) {
        self.raw(itoa::Buffer::new().format(v));
    }

    fn value(&mut self, v: &Value) {
        // A `Value` always serializes (its map keys are strings).
        let _ = serde_json::to_writer(&mut *self.0, v);
    }

    /// Typed fields as a JSON object: integers stay integers.
    fn fields(&mut self, fields: &[(std::borrow::Cow<'static, str>, FieldValue)]) {
        self.0.push(b'{');
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                self.0.push(b',');
            }
            self.str(k);
            self.0.push(b':');
            match v {
                FieldValue::I64(v) => self.i64(*v),
                FieldValue::U64(v) => self.u64(*v),
                FieldValue::F64(v) if v.is_finite() => {
                    let _ = serde_json::to_writer(&mut *self.0, v);
                }
                // JSON has no NaN or infinity: keep them readable as text.
                FieldValue::F64(v) => self.str(&v.to_string()),
                FieldValue::Bool(v) => self.raw(if *v { "true" } else { "false" }),
                FieldValue::Str(v) => self.str(v),
            }
        }
        self.0.push(b'}');
    }

    /// Captured fields as a JSON object, exactly as [`Json::fields`] writes
    /// the fields built from them.
    fn captured_fields(&mut self, arena: &Arena, r: &std::ops::Range<u32>) {
        self.0.push(b'{');
        let fields = arena
            .fields
            .get(r.start as usize..r.end as usize)
            .unwrap_or(&[]);
        for (i, &(k, v)) in fields.iter().enumerate() {
            if i > 0 {
                self.0.push(b',');
            }
            self.str(k);
            self.0.push(b':');
            match v {
                Val::I64(v) => self.i64(v),
                Val::U64(v) => self.u64(v),
                Val::F64(v) if v.is_finite() => {
                    let _ = serde_json::to_writer(&mut *self.0, &v);
                }
                Val::F64(v) => self.str(&v.to_string()),
                Val::Bool(v) => self.raw(if v { "true" } else { "false" }),
                Val::Str(a, b) => self.str(arena.str(&(a..b))),
            }
        }
        self.0.push(b'}');
    }

    fn spans(&mut self, spans: &[std::sync::Arc<SpanRecord>]) {
        self.0.push(b'[');
        for (i, span) in spans.iter().enumerate() {
            if i > 0 {
                self.0.push(b',');
            }
            self.raw("{\"name\":");
            self.str(&span.name);
            self.raw(",\"fields\":");
            self.fields(&span.fields);
            self.0.push(b'}');
        }
        self.0.push(b']');
    }
}

impl Ctx<'_> {
    /// `{"ts":"…","ts_ns":N,"kind":"…","batch":N,"prefix":"…"`: a line's
    /// start (`ts` is its first two fields, from [`TsText`]).
    fn head(&mut self, out: &mut Vec<u8>, ts: &[u8], kind: &'static str) {
        out.extend_from_slice(ts);
        if !self.kinds.iter().any(|(k, _)| *k == kind) {
            let slot = match self.kinds.iter().position(|(k, _)| k.is_empty()) {
                Some(i) => i,
                None => {
                    self.kinds.push(("", Vec::new()));
                    self.kinds.len() - 1
                }
            };
            let (k, text) = &mut self.kinds[slot];
            *k = kind;
            let mut t = Json(text);
            t.raw(",\"kind\":");
            t.str(kind);
            t.raw(",\"batch\":");
            t.u64(self.batch);
            t.raw(",\"prefix\":");
            t.str(self.prefix);
        }
        if let Some((_, text)) = self.kinds.iter().find(|(k, _)| *k == kind) {
            out.extend_from_slice(text);
        }
    }

    /// A log line's start, up to its message: head, target, level and
    /// location (the last call site's encoding reused).
    fn log_start(&mut self, out: &mut Vec<u8>, ts: &[u8], at: Loc<'_>) {
        self.head(out, ts, "log");
        let key = (
            [addr(Some(at.target)), addr(at.module), addr(at.file)],
            at.line,
            at.level,
        );
        if self.loc_key != Some(key) {
            self.loc.clear();
            let mut j = Json(self.loc);
            j.raw(",\"target\":");
            j.str(at.target);
            j.raw(",\"level\":");
            j.str(at.level.as_str());
            j.raw(",\"module\":");
            j.opt_str(at.module);
            j.raw(",\"file\":");
            j.opt_str(at.file);
            j.raw(",\"line\":");
            match at.line {
                Some(l) => j.u64(l.into()),
                None => j.raw("null"),
            }
            self.loc_key = Some(key);
        }
        out.extend_from_slice(self.loc);
    }

    fn log_line(&mut self, out: &mut Vec<u8>, ts: &[u8], r: &LogRecord) {
        let at = Loc {
            level: r.level,
            target: &r.target,
            module: r.module_path.as_deref(),
            file: r.file.as_deref(),
            line: r.line,
        };
        self.log_start(out, ts, at);
        let mut j = Json(out);
        j.raw(",\"message\":");
        j.str(&r.message);
        j.raw(",\"fields\":");
        j.fields(&r.fields);
        j.raw(",\"spans\":");
        j.spans(&r.spans);
        j.raw("}\n");
    }

    /// The line of a captured event: the same bytes [`Ctx::log_line`]
    /// writes for the record built from it (a test holds them equal).
    fn captured_line(&mut self, out: &mut Vec<u8>, ts: &[u8], arena: &Arena, e: &CapturedLog) {
        let (m, keep) = (e.meta, e.location);
        let at = Loc {
            level: *m.level(),
            target: m.target(),
            module: m.module_path().filter(|_| keep),
            file: m.file().filter(|_| keep),
            line: m.line().filter(|_| keep),
        };
        self.log_start(out, ts, at);
        let mut j = Json(out);
        j.raw(",\"message\":");
        j.str(arena.str(&e.parts.message));
        j.raw(",\"fields\":");
        j.captured_fields(arena, &e.parts.fields);
        j.raw(",\"spans\":");
        j.spans(arena.span_list(&e.parts.spans));
        j.raw("}\n");
    }

    fn event_line(&mut self, out: &mut Vec<u8>, ts: &[u8], kind: &'static str, e: &BusEvent) {
        self.head(out, ts, kind);
        let mut j = Json(out);
        j.raw(",\"name\":");
        j.str(&e.name);
        j.raw(",\"payload\":");
        j.value(&e.payload);
        j.raw("}\n");
    }

    fn summary_line(&mut self, out: &mut Vec<u8>, ts: &[u8], name: &str, payload: &Value) {
        self.head(out, ts, "summary");
        let mut j = Json(out);
        j.raw(",\"name\":");
        j.str(name);
        j.raw(",\"payload\":");
        j.value(payload);
        j.raw("}\n");
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::*;
    use crate::layer::record::{Level, RecordKind};
    use crate::sinks::segment::test_support::event_batch;

    /// The `serde_json` encoding the hand-written one replaced: the reference
    /// it must match byte for byte.
    mod reference {
        use super::*;
        use serde::ser::{SerializeMap, SerializeSeq};
        use serde::{Serialize, Serializer};

        struct Ctx<'a> {
            batch: u64,
            prefix: &'a str,
        }

        struct LogLine<'a> {
            ctx: &'a Ctx<'a>,
            ts: &'a str,
            rec: &'a LogRecord,
        }

        impl Serialize for LogLine<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let r = self.rec;
                let mut m = s.serialize_map(Some(14))?;
                m.serialize_entry("ts", self.ts)?;
                m.serialize_entry("ts_ns", &r.ts_ns)?;
                m.serialize_entry("kind", "log")?;
                m.serialize_entry("batch", &self.ctx.batch)?;
                m.serialize_entry("prefix", self.ctx.prefix)?;
                m.serialize_entry("target", r.target.as_ref())?;
                m.serialize_entry("level", r.level.as_str())?;
                m.serialize_entry("module", &r.module_path.as_deref())?;
                m.serialize_entry("file", &r.file.as_deref())?;
                m.serialize_entry("line", &r.line)?;
                m.serialize_entry("message", &r.message)?;
                m.serialize_entry("fields", &Fields(&r.fields))?;
                m.serialize_entry("spans", &Spans(&r.spans))?;
                m.end()
            }
        }

        struct EventLine<'a> {
            ctx: &'a Ctx<'a>,
            ts: &'a str,
            kind: &'static str,
            ev: &'a BusEvent,
        }

        impl Serialize for EventLine<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let e = self.ev;
                let mut m = s.serialize_map(Some(7))?;
                m.serialize_entry("ts", self.ts)?;
                m.serialize_entry("ts_ns", &e.ts_ns)?;
                m.serialize_entry("kind", self.kind)?;
                m.serialize_entry("batch", &self.ctx.batch)?;
                m.serialize_entry("prefix", self.ctx.prefix)?;
                m.serialize_entry("name", &e.name)?;
                m.serialize_entry("payload", &*e.payload)?;
                m.end()
            }
        }

        struct SummaryLine<'a> {
            ctx: &'a Ctx<'a>,
            ts: &'a str,
            ts_ns: i64,
            name: String,
            payload: &'a Value,
        }

        impl Serialize for SummaryLine<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(7))?;
                m.serialize_entry("ts", self.ts)?;
                m.serialize_entry("ts_ns", &self.ts_ns)?;
                m.serialize_entry("kind", "summary")?;
                m.serialize_entry("batch", &self.ctx.batch)?;
                m.serialize_entry("prefix", self.ctx.prefix)?;
                m.serialize_entry("name", &self.name)?;
                m.serialize_entry("payload", self.payload)?;
                m.end()
            }
        }

        /// Typed fields as a JSON object: integers stay integers.
        struct Fields<'a>(&'a [(std::borrow::Cow<'static, str>, FieldValue)]);

        impl Serialize for Fields<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for (k, v) in self.0 {
                    m.serialize_key(k.as_ref())?;
                    match v {
                        FieldValue::I64(v) => m.serialize_value(v)?,
                        FieldValue::U64(v) => m.serialize_value(v)?,
                        FieldValue::F64(v) if v.is_finite() => m.serialize_value(v)?,
                        // JSON has no NaN or infinity: keep them readable as text.
                        FieldValue::F64(v) => m.serialize_value(&v.to_string())?,
                        FieldValue::Bool(v) => m.serialize_value(v)?,
                        FieldValue::Str(v) => m.serialize_value(v)?,
                    }
                }
                m.end()
            }
        }

        struct Spans<'a>(&'a [std::sync::Arc<SpanRecord>]);

        impl Serialize for Spans<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for span in self.0 {
                    seq.serialize_element(&SpanLine(span))?;
                }
                seq.end()
            }
        }

        struct SpanLine<'a>(&'a SpanRecord);

        impl Serialize for SpanLine<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("name", self.0.name.as_ref())?;
                m.serialize_entry("fields", &Fields(&self.0.fields))?;
                m.end()
            }
        }

        fn write<T: Serialize>(out: &mut Vec<u8>, line: &T) {
            serde_json::to_writer(&mut *out, line).expect("serializable");
            out.push(b'\n');
        }

        /// `encode_batch` as it was, through `serde_json`'s serializer.
        pub(super) fn encode_batch(batch: &Batch, out: &mut Vec<u8>) {
            let ctx = Ctx {
                batch: batch.id,
                prefix: &batch.prefix,
            };
            if let Some(notice) = batch.drop_notice() {
                let ts = rfc3339(notice.ts_ns);
                write(
                    out,
                    &LogLine {
                        ctx: &ctx,
                        ts: &ts,
                        rec: &notice,
                    },
                );
            }
            match &batch.records {
                Records::Logs(logs) => {
                    for rec in logs {
                        let ts = rfc3339(rec.ts_ns);
                        write(
                            out,
                            &LogLine {
                                ctx: &ctx,
                                ts: &ts,
                                rec,
                            },
                        );
                    }
                }
                Records::Events(events) => {
                    for ev in events {
                        let ts = rfc3339(ev.ts_ns);
                        let kind = batch.kind.as_str();
                        write(
                            out,
                            &EventLine {
                                ctx: &ctx,
                                ts: &ts,
                                kind,
                                ev,
                            },
                        );
                    }
                }
            }
            if batch.summary.is_some() {
                let payload = batch.to_payload();
                let ts = rfc3339(batch.last_ts_ns);
                write(
                    out,
                    &SummaryLine {
                        ctx: &ctx,
                        ts: &ts,
                        ts_ns: batch.last_ts_ns,
                        name: batch.batch_name(),
                        payload: &payload,
                    },
                );
            }
        }
    }

    fn batch(kind: RecordKind, records: Records) -> Batch {
        let mut b = event_batch(9, 0, 0);
        b.kind = kind;
        b.records = records;
        b.first_ts_ns = 1_000;
        b.last_ts_ns = 2_000;
        b
    }

    fn lines(out: &[u8]) -> Vec<Value> {
        std::str::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is JSON"))
            .collect()
    }

    // Catches a log line that loses typed fields, spans, or escapes badly
    // (a newline in a message must not split the line).
    #[test]
    fn a_log_record_keeps_types_spans_and_escapes() {
        let rec = LogRecord {
            ts_ns: 1_796_314_801_123_456_789,
            level: Level::INFO,
            target: Cow::Borrowed("myapp::db"),
            module_path: Some(Cow::Borrowed("myapp::db")),
            file: Some(Cow::Borrowed("src/db.rs")),
            line: Some(42),
            message: "row \"written\"\nsecond line \u{1}".into(),
            fields: vec![
                (Cow::Borrowed("user_id"), FieldValue::U64(42)),
                (Cow::Borrowed("delta"), FieldValue::I64(-3)),
                (Cow::Borrowed("ratio"), FieldValue::F64(0.5)),
                (Cow::Borrowed("nan"), FieldValue::F64(f64::NAN)),
                (Cow::Borrowed("ok"), FieldValue::Bool(true)),
                (Cow::Borrowed("table"), FieldValue::Str("users".into())),
            ],
            spans: vec![Arc::new(SpanRecord {
                name: Cow::Borrowed("req"),
                fields: vec![(Cow::Borrowed("id"), FieldValue::Str("a1".into()))],
            })],
        };
        let mut b = batch(RecordKind::Log, Records::Logs(vec![rec]));
        b.prefix = Arc::from("log:myapp::db");
        let mut out = Vec::new();
        encode_batch(&b, &mut out);
        let l = lines(&out);
        assert_eq!(l.len(), 1);
        let l = &l[0];
        assert_eq!(l["ts"], "2026-12-03T16:20:01.123456789Z");
        assert_eq!(l["ts_ns"], 1_796_314_801_123_456_789i64);
        assert_eq!(l["kind"], "log");
        assert_eq!(l["batch"], 9);
        assert_eq!(l["prefix"], "log:myapp::db");
        assert_eq!(l["target"], "myapp::db");
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["module"], "myapp::db");
        assert_eq!(l["file"], "src/db.rs");
        assert_eq!(l["line"], 42);
        assert_eq!(l["message"], "row \"written\"\nsecond line \u{1}");
        assert_eq!(
            l["fields"],
            json!({"user_id": 42, "delta": -3, "ratio": 0.5, "nan": "NaN", "ok": true, "table": "users"})
        );
        assert_eq!(l["spans"], json!([{"name": "req", "fields": {"id": "a1"}}]));
    }

    // Catches the timestamp cache printing a stale second or wrong digits,
    // in the RFC 3339 text or in the number (both get the same nine digits).
    #[test]
    fn cached_timestamps_match_rfc3339() {
        let mut t = TsText::default();
        for ns in [
            1_796_314_801_123_456_789,
            1_796_314_801_000_000_001,
            1_796_314_801_999_999_999,
            1_796_314_802_000_000_000,
            1_796_314_802_000_000_450,
            0,
            -1,
            999_999_999,
            1_000_000_000,
            1_000_000_005,
            -1_000_000_001,
        ] {
            let want = format!("{{\"ts\":\"{}\",\"ts_ns\":{ns}", rfc3339(ns));
            assert_eq!(String::from_utf8_lossy(t.format(ns)), want);
        }
    }

    // Catches a drop notice written after the records (or not at all), and a
    // summarized batch without its summary line.
    #[test]
    fn drop_notice_first_then_records_then_summary() {
        let ev = |n: i64| BusEvent {
            name: "gpu:0:util".into(),
            payload: Arc::new(json!({ "n": n })),
            ts_ns: 1_000 + n,
        };
        let mut b = batch(RecordKind::Sample, Records::Events(vec![ev(1), ev(2)]));
        b.prefix = Arc::from("gpu");
        b.dropped = 5;
        b.dropped_since_ns = Some(500);
        b.summary = Some(Arc::new(json!({ "util_percent": { "max": 2 } })));
        let mut out = Vec::new();
        encode_batch(&b, &mut out);
        let l = lines(&out);
        let kinds: Vec<_> = l.iter().map(|v| v["kind"].as_str().unwrap_or("")).collect();
        assert_eq!(kinds, ["log", "sample", "sample", "summary"]);
        assert_eq!(l[0]["target"], "spillway");
        assert_eq!(l[0]["level"], "WARN");
        assert_eq!(
            l[0]["fields"],
            json!({"dropped": 5, "prefix": "gpu", "since_ns": 500})
        );
        assert_eq!(l[0]["module"], Value::Null);
        assert_eq!(l[1]["name"], "gpu:0:util");
        assert_eq!(l[2]["payload"], json!({"n": 2}));
        assert_eq!(l[3]["name"], "gpu:batch");
        assert_eq!(l[3]["ts_ns"], 2_000);
        assert_eq!(l[3]["payload"]["summary"]["util_percent"]["max"], 2);
        assert_eq!(l[3]["payload"]["count"], 2);
    }

    // Catches the hand-written encoder drifting from JSON (or from the
    // format readers already parse): on awkward input (quotes, backslashes,
    // control characters, non-ASCII, missing location, extreme and
    // non-finite numbers, nested spans, drop notices, summaries) it must
    // write exactly what serde_json wrote.
    #[test]
    fn hand_written_lines_match_serde_json_byte_for_byte() {
        let awkward = [
            "",
            "plain",
            "quote \" and back\\slash",
            "new\nline\ttab\r\u{1}\u{1f}\u{7f}",
            "é 漢字 🙂",
            "{\"json\": [1]}",
            // One special character each: every one must take the escaping path.
            "\u{1f}",
            "x\u{10}",
            "\"",
            "\\",
            "\u{0}",
        ];
        let span = |i: usize| {
            Arc::new(SpanRecord {
                name: Cow::Owned(awkward[i % awkward.len()].to_string()),
                fields: vec![
                    (
                        Cow::Borrowed("id"),
                        FieldValue::Str(awkward[(i + 1) % awkward.len()].into()),
                    ),
                    (Cow::Borrowed("n"), FieldValue::I64(i as i64 - 3)),
                ],
            })
        };
        let floats = [
            0.5,
            -0.0,
            1e300,
            1e-300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            3.0,
        ];
        let logs: Vec<LogRecord> = (0..24)
            .map(|i| LogRecord {
                ts_ns: 1_796_314_801_123_456_789 + i as i64 * 999_999_937,
                level: [
                    Level::ERROR,
                    Level::WARN,
                    Level::INFO,
                    Level::DEBUG,
                    Level::TRACE,
                ][i % 5],
                target: Cow::Owned(format!("app::{}", awkward[i % awkward.len()])),
                module_path: (i % 3 != 0).then_some(Cow::Borrowed("app::m")),
                file: (i % 4 != 0).then(|| Cow::Owned(awkward[(i + 2) % awkward.len()].into())),
                line: (i % 2 == 0).then_some(i as u32 * 1000),
                message: awkward[(i + 3) % awkward.len()].repeat(i % 3),
                fields: vec![
                    (
                        Cow::Borrowed("u"),
                        FieldValue::U64(if i == 5 { u64::MAX } else { i as u64 }),
                    ),
                    (
                        Cow::Borrowed("i"),
                        FieldValue::I64(if i == 7 { i64::MIN } else { -(i as i64) }),
                    ),
                    (
                        Cow::Borrowed("f"),
                        FieldValue::F64(floats[i % floats.len()]),
                    ),
                    (Cow::Borrowed("b"), FieldValue::Bool(i % 2 == 1)),
                    (
                        Cow::Owned(awkward[i % awkward.len()].into()),
                        FieldValue::Str(awkward[(i + 4) % awkward.len()].into()),
                    ),
                ][..i % 6]
                    .to_vec(),
                spans: (0..i % 3).map(span).collect(),
            })
            .collect();
        let mut lb = batch(RecordKind::Log, Records::Logs(logs));
        lb.prefix = Arc::from("log:app::\"quoted\"");
        lb.dropped = 3;
        lb.dropped_since_ns = Some(-5);
        let events: Vec<BusEvent> = (0..6)
            .map(|i| BusEvent {
                name: format!("data:{}:x", awkward[i]),
                payload: Arc::new(json!({ "s": awkward[i], "n": i, "f": 0.25, "a": [null, true] })),
                ts_ns: i as i64 - 2,
            })
            .collect();
        let eb = batch(RecordKind::Event, Records::Events(events.clone()));
        let mut sb = batch(RecordKind::Sample, Records::Events(events));
        sb.summary = Some(Arc::new(json!({ "max": 1.5 })));
        // Runs from one call site (the encoder reuses their location text),
        // broken by a different line, level, file or target only.
        let site = |line: u32, level: Level, file: &'static str, target: &'static str| LogRecord {
            ts_ns: 7,
            level,
            target: Cow::Borrowed(target),
            module_path: Some(Cow::Borrowed("app::m")),
            file: Some(Cow::Borrowed(file)),
            line: Some(line),
            message: "m".into(),
            fields: Vec::new(),
            spans: Vec::new(),
        };
        let runs = vec![
            site(1, Level::INFO, "a.rs", "app"),
            site(1, Level::INFO, "a.rs", "app"),
            site(2, Level::INFO, "a.rs", "app"),
            site(2, Level::WARN, "a.rs", "app"),
            site(2, Level::WARN, "b.rs", "app"),
            site(2, Level::WARN, "b.rs", "app::x"),
            site(2, Level::WARN, "b.rs", "app::x"),
        ];
        let rb = batch(RecordKind::Log, Records::Logs(runs));
        for b in [&lb, &rb, &eb, &sb] {
            let (mut ours, mut want) = (Vec::new(), Vec::new());
            encode_batch(b, &mut ours);
            reference::encode_batch(b, &mut want);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&want)
            );
        }
    }

    // Catches the word-at-a-time escape test missing a byte (which would
    // write a raw control character, quote or backslash into a line): every
    // byte value, at every position of a word and of the tail.
    #[test]
    fn needs_escape_finds_every_special_byte_anywhere() {
        for len in [1, 7, 8, 9, 16, 17] {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[pos] = b;
                    let want = b < 0x20 || b == b'"' || b == b'\\';
                    assert_eq!(needs_escape(&s), want, "byte {b:#x} at {pos} of {len}");
                }
            }
        }
        assert!(!needs_escape("é 漢字 🙂 plain text".as_bytes()));
    }

    /// The metadata of one `tracing` call site (the events themselves are
    /// built by hand below): a subscriber that keeps what it is given.
    fn call_site_metadata() -> &'static tracing_core::Metadata<'static> {
        use std::sync::Mutex;
        use tracing_core::span::{Attributes, Id, Record};
        use tracing_core::{Event, Metadata};
        struct Grab(Mutex<Option<&'static Metadata<'static>>>);
        impl tracing_core::Subscriber for Grab {
            fn enabled(&self, _: &Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &Attributes<'_>) -> Id {
                Id::from_u64(1)
            }
            fn record(&self, _: &Id, _: &Record<'_>) {}
            fn record_follows_from(&self, _: &Id, _: &Id) {}
            fn event(&self, e: &Event<'_>) {
                *self.0.lock().unwrap() = Some(e.metadata());
            }
            fn enter(&self, _: &Id) {}
            fn exit(&self, _: &Id) {}
        }
        let grab = Arc::new(Grab(Mutex::new(None)));
        tracing::subscriber::with_default(grab.clone(), || {
            tracing::warn!(target: "myapp::db", "x");
        });
        let meta = grab.0.lock().unwrap().take();
        meta.expect("the event reached the subscriber")
    }

    // Catches the captured form (what the engine hands the segment writer
    // without building records) writing anything but the bytes of the
    // records built from the same events: field types and order, awkward
    // text, non-finite floats, spans, location kept or left out, and events
    // copied out of a shared arena at an offset (their ranges rebased).
    #[test]
    fn captured_events_encode_as_their_records_do() {
        use crate::layer::capture::{Arena, CapturedLogs, Parts, Val};
        use crate::layer::tracing_layer::captured_record;
        let meta = call_site_metadata();
        let span = Arc::new(SpanRecord {
            name: Cow::Borrowed("req"),
            fields: vec![(Cow::Borrowed("id"), FieldValue::Str("a\"1".into()))],
        });
        // A chunk's arena: some other event's text first, then each event's.
        let mut src = Arena::default();
        src.text.push_str("unrelated text before");
        let mut events = Vec::new();
        let text = |src: &mut Arena, t: &str| {
            let a = src.text.len() as u32;
            src.text.push_str(t);
            (a, src.text.len() as u32)
        };
        for (i, message) in ["row written 1", "quote \" back\\ tab\t nl\n \u{1}", ""]
            .iter()
            .enumerate()
        {
            let (m0, m1) = text(&mut src, message);
            let (s0, s1) = text(&mut src, "users");
            let (d0, d1) = text(&mut src, "Some(\"x\")");
            let f0 = src.fields.len() as u32;
            src.fields.extend([
                ("user_id", Val::U64(42 + i as u64)),
                ("delta", Val::I64(-7)),
                ("ratio", Val::F64(0.25)),
                ("nan", Val::F64(f64::NAN)),
                ("inf", Val::F64(f64::NEG_INFINITY)),
                ("ok", Val::Bool(i % 2 == 0)),
                ("table", Val::Str(s0, s1)),
                ("dbg", Val::Str(d0, d1)),
            ]);
            let sp0 = src.spans.len() as u32;
            if i != 1 {
                src.spans.push(span.clone());
            }
            let parts = Parts {
                message: m0..m1,
                fields: f0..src.fields.len() as u32,
                spans: sp0..src.spans.len() as u32,
            };
            events.push((
                1_796_314_801_123_456_789 + i as i64 * 1_000_000_007,
                parts,
                i != 2,
            ));
        }
        let mut captured = CapturedLogs::default();
        let mut records = Vec::new();
        for (ts, parts, location) in &events {
            captured.push(meta, *ts, &src, parts, *location);
            records.push(captured_record(meta, *ts, &src, parts, *location));
        }
        let mut from_captured = batch(RecordKind::Log, Records::Logs(Vec::new()));
        from_captured.captured = Some(captured);
        from_captured.dropped = 3;
        let mut from_records = batch(RecordKind::Log, Records::Logs(records));
        from_records.dropped = 3;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_batch(&from_captured, &mut a);
        encode_batch(&from_records, &mut b);
        assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
        let got = lines(&a);
        assert_eq!(got.len(), 4, "drop notice and three events");
        assert_eq!(got[2]["message"], "quote \" back\\ tab\t nl\n \u{1}");
        assert_eq!(got[1]["fields"]["table"], "users");
        assert_eq!(got[3]["module"], Value::Null, "location left out");
    }
}
