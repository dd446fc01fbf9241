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
//! Strings are escaped by `serde_json`, so control characters and quotes in
//! messages or names can never break a line.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::layer::record::{rfc3339, Batch, BusEvent, FieldValue, LogRecord, Records, SpanRecord};

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
    let ctx = Ctx {
        batch: batch.id,
        prefix: &batch.prefix,
    };
    let mut ts = TsText::default();
    if let Some(notice) = batch.drop_notice() {
        let ts = ts.format(notice.ts_ns);
        ctx.write(
            out,
            &LogLine {
                ctx: &ctx,
                ts,
                rec: &notice,
            },
        );
    }
    match &batch.records {
        Records::Logs(logs) => {
            for rec in logs {
                let ts = ts.format(rec.ts_ns);
                ctx.write(out, &LogLine { ctx: &ctx, ts, rec });
            }
        }
        Records::Events(events) => {
            let kind = batch.kind.as_str();
            for ev in events {
                let ts = ts.format(ev.ts_ns);
                ctx.write(
                    out,
                    &EventLine {
                        ctx: &ctx,
                        ts,
                        kind,
                        ev,
                    },
                );
            }
        }
    }
    if batch.summary.is_some() {
        let payload = batch.to_payload();
        ctx.write(
            out,
            &SummaryLine {
                ctx: &ctx,
                ts: ts.format(batch.last_ts_ns),
                ts_ns: batch.last_ts_ns,
                name: batch.batch_name(),
                payload: &payload,
            },
        );
    }
}

/// RFC 3339 text of timestamps, reusing the date and time of day while the
/// second stays the same (records of a batch mostly share it): formatting
/// the full date for every line was a tenth of the writer's time.
#[derive(Default)]
struct TsText {
    secs: Option<i64>,
    text: String,
}

impl TsText {
    fn format(&mut self, ts_ns: i64) -> &str {
        let secs = ts_ns.div_euclid(1_000_000_000);
        let mut nanos = ts_ns.rem_euclid(1_000_000_000);
        if self.secs != Some(secs) {
            self.secs = Some(secs);
            self.text = rfc3339(ts_ns);
            return &self.text;
        }
        // `rfc3339` ends in `.nnnnnnnnnZ`: replace the nine digits.
        let prefix = self.text.len().saturating_sub(10);
        self.text.truncate(prefix);
        let mut digits = [b'0'; 9];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (nanos % 10) as u8;
            nanos /= 10;
        }
        self.text.extend(digits.iter().map(|d| char::from(*d)));
        self.text.push('Z');
        &self.text
    }
}

struct Ctx<'a> {
    batch: u64,
    prefix: &'a str,
}

impl Ctx<'_> {
    fn write<T: Serialize>(&self, out: &mut Vec<u8>, line: &T) {
        let start = out.len();
        // Serializing our own types into a Vec only fails on a map key that is
        // not a string, which these types never produce; if it ever did, the
        // partial line is removed rather than left to corrupt the stream.
        if serde_json::to_writer(&mut *out, line).is_ok() {
            out.push(b'\n');
        } else {
            out.truncate(start);
        }
    }
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::*;
    use crate::layer::record::{Level, RecordKind};
    use crate::sinks::segment::test_support::event_batch;

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

    // Catches the timestamp cache printing a stale second or wrong digits.
    #[test]
    fn cached_timestamps_match_rfc3339() {
        let mut t = TsText::default();
        for ns in [
            1_796_314_801_123_456_789,
            1_796_314_801_000_000_001,
            1_796_314_801_999_999_999,
            1_796_314_802_000_000_000,
            0,
            -1,
        ] {
            assert_eq!(t.format(ns), rfc3339(ns));
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
}
