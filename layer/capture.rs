//! Log events captured into reusable buffers.
//!
//! The tracing layer visits an event's fields into a thread's [`Arena`]
//! (text, typed fields, span handles) instead of allocating a [`LogRecord`]
//! per event; the arena is copied into the thread's current chunk, whose
//! buffers are recycled, and the engine thread builds the `LogRecord` that
//! batches and sinks see (or, when every sink reads it, copies the event
//! into its batch's own arena: [`CapturedLogs`]). The publishing thread then
//! allocates nothing per event, which matters with glibc's malloc: a thread
//! that only allocates while other threads free pays for it on every call.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::ops::Range;
use std::sync::Arc;

use tracing_core::field::{Field, Visit};
use tracing_core::Metadata;

use crate::layer::record::{FieldValue, SpanRecord};

/// A field value whose text, if any, lives in the arena's `text`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Val {
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
    Str(u32, u32),
}

/// Buffers for captured events: cleared and refilled, never shrunk below
/// what a typical chunk needs.
#[derive(Default, Debug)]
pub(crate) struct Arena {
    pub(crate) text: String,
    pub(crate) fields: Vec<(&'static str, Val)>,
    pub(crate) spans: Vec<Arc<SpanRecord>>,
}

/// Where one event's parts sit in an arena.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Parts {
    pub(crate) message: Range<u32>,
    pub(crate) fields: Range<u32>,
    pub(crate) spans: Range<u32>,
}

/// Bytes of text past which a chunk is handed on, and the most an idle
/// arena keeps allocated.
pub(crate) const ARENA_TEXT_LIMIT: usize = 32 << 10;

/// What a chunk's arena reserves at its first event.
const CHUNK_TEXT: usize = 8 << 10;
const CHUNK_FIELDS: usize = 512;

fn range(r: &Range<u32>) -> Range<usize> {
    r.start as usize..r.end as usize
}

impl Arena {
    pub(crate) fn clear(&mut self) {
        self.text.clear();
        self.fields.clear();
        self.spans.clear();
    }

    /// Whether the buffers grew past what is worth keeping for reuse.
    pub(crate) fn oversized(&self) -> bool {
        self.text.capacity() > 4 * ARENA_TEXT_LIMIT || self.fields.capacity() > 16 << 10
    }

    /// A string written to `text` (empty for a range out of bounds).
    pub(crate) fn str(&self, r: &Range<u32>) -> &str {
        self.text.get(range(r)).unwrap_or("")
    }

    /// Appends `other`'s event (its `parts`), moving its span handles;
    /// returns where it now sits here.
    pub(crate) fn append(&mut self, other: &mut Arena, parts: &Parts) -> Parts {
        if self.text.capacity() == 0 {
            // A chunk's first event: room for a chunk of typical ones (a short
            // message and a few fields each), rather than growing step by step.
            self.text.reserve(CHUNK_TEXT);
            self.fields.reserve(CHUNK_FIELDS);
        }
        let base = self.text.len() as u32;
        self.text.push_str(&other.text);
        let f0 = self.fields.len() as u32;
        self.fields
            .extend(other.fields.iter().map(|&(name, v)| match v {
                Val::Str(a, b) => (name, Val::Str(a + base, b + base)),
                v => (name, v),
            }));
        let s0 = self.spans.len() as u32;
        self.spans.append(&mut other.spans);
        Parts {
            message: parts.message.start + base..parts.message.end + base,
            fields: f0 + parts.fields.start..f0 + parts.fields.end,
            spans: s0 + parts.spans.start..s0 + parts.spans.end,
        }
    }

    /// The fields in `r`, owned and typed.
    pub(crate) fn field_values(&self, r: &Range<u32>) -> Vec<(Cow<'static, str>, FieldValue)> {
        let mut fields = Vec::new();
        self.fill_fields(&mut fields, r);
        fields
    }

    /// Overwrites `dst` with the fields in `r`, reusing the strings already
    /// there for string values.
    pub(crate) fn fill_fields(
        &self,
        dst: &mut Vec<(Cow<'static, str>, FieldValue)>,
        r: &Range<u32>,
    ) {
        let src = self.fields.get(range(r)).unwrap_or(&[]);
        dst.truncate(src.len());
        dst.reserve_exact(src.len() - dst.len());
        for (i, &(name, v)) in src.iter().enumerate() {
            if let (Val::Str(a, b), Some((n, FieldValue::Str(s)))) = (v, dst.get_mut(i)) {
                *n = Cow::Borrowed(name);
                s.clear();
                s.push_str(self.str(&(a..b)));
                continue;
            }
            let value = match v {
                Val::I64(v) => FieldValue::I64(v),
                Val::U64(v) => FieldValue::U64(v),
                Val::F64(v) => FieldValue::F64(v),
                Val::Bool(v) => FieldValue::Bool(v),
                Val::Str(a, b) => FieldValue::Str(self.str(&(a..b)).to_owned()),
            };
            match dst.get_mut(i) {
                Some(slot) => *slot = (Cow::Borrowed(name), value),
                None => dst.push((Cow::Borrowed(name), value)),
            }
        }
    }

    /// The span handles in `r`.
    pub(crate) fn span_list(&self, r: &Range<u32>) -> &[Arc<SpanRecord>] {
        self.spans.get(range(r)).unwrap_or(&[])
    }

    /// What one event's parts weigh, for the memory budget.
    pub(crate) fn estimate(&self, parts: &Parts) -> usize {
        std::mem::size_of::<crate::layer::record::LogRecord>()
            + (parts.message.end - parts.message.start) as usize
            + self
                .fields
                .get(range(&parts.fields))
                .unwrap_or(&[])
                .iter()
                .map(|(name, v)| {
                    40 + name.len()
                        + match v {
                            Val::Str(a, b) => (b - a) as usize,
                            _ => 0,
                        }
                })
                .sum::<usize>()
            + 16 * (parts.spans.end - parts.spans.start) as usize
    }
}

/// A captured log event kept in a batch's arena (see [`CapturedLogs`]).
#[derive(Clone, Debug)]
pub(crate) struct CapturedLog {
    pub(crate) meta: &'static Metadata<'static>,
    pub(crate) ts_ns: i64,
    pub(crate) parts: Parts,
    /// Whether module, file and line are kept (`LogConfig::location`).
    pub(crate) location: bool,
}

/// A batch's log events as they were captured: their text, fields and span
/// handles in one arena, in order. When every sink of an engine reads this
/// form (spillway's segment writer does), the engine copies each event
/// into it and never builds a [`crate::LogRecord`]: that build, and reading
/// the records' scattered strings back on the sink thread, were half of
/// what a log record cost end to end.
#[derive(Debug, Default)]
pub(crate) struct CapturedLogs {
    pub(crate) arena: Arena,
    pub(crate) events: Vec<CapturedLog>,
}

impl CapturedLogs {
    /// Copies the event at `parts` in `from` (its message, fields and span
    /// handles) to the end of this batch.
    pub(crate) fn push(
        &mut self,
        meta: &'static Metadata<'static>,
        ts_ns: i64,
        from: &Arena,
        parts: &Parts,
        location: bool,
    ) {
        let a = &mut self.arena;
        let copy = |text: &mut String, r: &Range<u32>| {
            let start = text.len() as u32;
            text.push_str(from.str(r));
            start..text.len() as u32
        };
        let message = copy(&mut a.text, &parts.message);
        let f0 = a.fields.len() as u32;
        for &(name, v) in from.fields.get(range(&parts.fields)).unwrap_or(&[]) {
            let v = match v {
                Val::Str(x, y) => {
                    let r = copy(&mut a.text, &(x..y));
                    Val::Str(r.start, r.end)
                }
                v => v,
            };
            a.fields.push((name, v));
        }
        let s0 = a.spans.len() as u32;
        a.spans.extend_from_slice(from.span_list(&parts.spans));
        self.events.push(CapturedLog {
            meta,
            ts_ns,
            parts: Parts {
                message,
                fields: f0..a.fields.len() as u32,
                spans: s0..a.spans.len() as u32,
            },
            location,
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    pub(crate) fn clear(&mut self) {
        self.arena.clear();
        self.events.clear();
    }

    /// What its buffers hold allocated, roughly (for the engine's pool).
    pub(crate) fn capacity_bytes(&self) -> usize {
        self.arena.text.capacity()
            + self.arena.fields.capacity() * std::mem::size_of::<(&str, Val)>()
            + self.arena.spans.capacity() * 8
            + self.events.capacity() * std::mem::size_of::<CapturedLog>()
    }
}

/// Visits fields into an arena: typed values, text appended to `text`; the
/// `message` field (for events) becomes the message instead of a field.
pub(crate) struct ArenaVisitor<'a> {
    arena: &'a mut Arena,
    /// Where the message went; `None` keeps `message` as a plain field (spans).
    message: Option<&'a mut Range<u32>>,
    /// Leave out `log.target`, `log.file`, ...: a `log` record's metadata.
    skip_log_fields: bool,
}

impl<'a> ArenaVisitor<'a> {
    /// A visitor for span fields (`message` is an ordinary field there).
    pub(crate) fn fields(arena: &'a mut Arena) -> Self {
        ArenaVisitor {
            arena,
            message: None,
            skip_log_fields: false,
        }
    }

    /// A visitor for an event: its message goes to `message`.
    pub(crate) fn event(
        arena: &'a mut Arena,
        message: &'a mut Range<u32>,
        skip_log_fields: bool,
    ) -> Self {
        ArenaVisitor {
            arena,
            message: Some(message),
            skip_log_fields,
        }
    }

    /// Writes the message with `write`, if `field` is the message.
    fn message(&mut self, field: &Field, write: impl FnOnce(&mut String)) -> bool {
        if field.name() != "message" {
            return false;
        }
        let Some(m) = self.message.as_deref_mut() else {
            return false;
        };
        let start = self.arena.text.len();
        write(&mut self.arena.text);
        *m = start as u32..self.arena.text.len() as u32;
        true
    }

    fn push(&mut self, field: &Field, value: Val) {
        if self.skip_log_fields && field.name().starts_with("log.") {
            return;
        }
        self.arena.fields.push((field.name(), value));
    }

    fn push_text(&mut self, field: &Field, write: impl FnOnce(&mut String)) {
        if self.skip_log_fields && field.name().starts_with("log.") {
            return;
        }
        let start = self.arena.text.len() as u32;
        write(&mut self.arena.text);
        let end = self.arena.text.len() as u32;
        self.arena.fields.push((field.name(), Val::Str(start, end)));
    }
}

impl Visit for ArenaVisitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        if !self.message(field, |m| {
            let _ = write!(m, "{value}");
        }) {
            self.push(field, Val::I64(value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if !self.message(field, |m| {
            let _ = write!(m, "{value}");
        }) {
            self.push(field, Val::U64(value));
        }
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        match i64::try_from(value) {
            Ok(v) => self.record_i64(field, v),
            Err(_) => self.record_debug(field, &value),
        }
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        match u64::try_from(value) {
            Ok(v) => self.record_u64(field, v),
            Err(_) => self.record_debug(field, &value),
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if !self.message(field, |m| {
            let _ = write!(m, "{value}");
        }) {
            self.push(field, Val::F64(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !self.message(field, |m| {
            let _ = write!(m, "{value}");
        }) {
            self.push(field, Val::Bool(value));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.message(field, |m| m.push_str(value)) {
            self.push_text(field, |t| t.push_str(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.message(field, |m| {
            let _ = write!(m, "{value:?}");
        }) {
            self.push_text(field, |t| {
                let _ = write!(t, "{value:?}");
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches offsets not being rebased when an event is appended after
    // others: the second event's message and string field must read back
    // as written, and its span handles must move with it.
    #[test]
    fn append_rebases_text_fields_and_spans() {
        let mut chunk = Arena::default();
        let mut scratch = Arena::default();
        let span = Arc::new(SpanRecord {
            name: Cow::Borrowed("req"),
            fields: Vec::new(),
        });
        let mut firsts = Vec::new();
        for (msg, table) in [("first", "users"), ("second one", "orders")] {
            scratch.clear();
            scratch.text.push_str(msg);
            let message = 0..msg.len() as u32;
            let a = scratch.text.len() as u32;
            scratch.text.push_str(table);
            scratch
                .fields
                .push(("table", Val::Str(a, scratch.text.len() as u32)));
            scratch.fields.push(("n", Val::U64(7)));
            scratch.spans.push(span.clone());
            let parts = Parts {
                message,
                fields: 0..2,
                spans: 0..1,
            };
            firsts.push(chunk.append(&mut scratch, &parts));
            assert!(scratch.spans.is_empty(), "span handles are moved");
        }
        let p = &firsts[1];
        assert_eq!(chunk.str(&p.message), "second one");
        assert_eq!(
            chunk.field_values(&p.fields),
            vec![
                (Cow::Borrowed("table"), FieldValue::Str("orders".into())),
                (Cow::Borrowed("n"), FieldValue::U64(7)),
            ]
        );
        assert_eq!(chunk.span_list(&p.spans).len(), 1);
        assert_eq!(chunk.str(&firsts[0].message), "first");
        // Out-of-range parts read as empty instead of panicking.
        assert_eq!(chunk.str(&(90..99)), "");
        assert!(chunk.field_values(&(7..9)).is_empty());
    }

    // Catches a reused record keeping stale fields: refilling a field list
    // that held another event's fields (more of them, other types, strings
    // where there are now numbers and the reverse) must give exactly the
    // new event's fields.
    #[test]
    fn fill_fields_over_an_older_list_leaves_nothing_stale() {
        let mut a = Arena::default();
        a.text.push_str("longer string value|xy");
        a.fields = vec![
            ("s", Val::Str(0, 19)),
            ("n", Val::U64(1)),
            ("t", Val::Str(20, 22)),
            ("b", Val::Bool(true)),
        ];
        let mut b = Arena::default();
        b.text.push('q');
        b.fields = vec![
            ("n2", Val::I64(-1)),
            ("s2", Val::Str(0, 1)),
            ("f", Val::F64(0.5)),
        ];
        let mut dst = Vec::new();
        a.fill_fields(&mut dst, &(0..4));
        assert_eq!(dst, a.field_values(&(0..4)));
        b.fill_fields(&mut dst, &(0..3));
        assert_eq!(
            dst,
            vec![
                (Cow::Borrowed("n2"), FieldValue::I64(-1)),
                (Cow::Borrowed("s2"), FieldValue::Str("q".into())),
                (Cow::Borrowed("f"), FieldValue::F64(0.5)),
            ]
        );
        a.fill_fields(&mut dst, &(0..4));
        assert_eq!(dst, a.field_values(&(0..4)));
        b.fill_fields(&mut dst, &(0..0));
        assert!(dst.is_empty());
    }
}
