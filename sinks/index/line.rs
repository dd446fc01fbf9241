//! Splits one segment line (a JSON object) into the columns of `records`.
//!
//! The JSON values that are stored as JSON text (`fields`, `spans`,
//! `payload`) are taken as the exact slices of the line, instead of being
//! parsed into a `Value` and serialised again: that round trip would cost
//! more than the SQLite insert. The scanner checks structure only; lines
//! come from [`FrameReader`](crate::sinks::segment::reader::FrameReader),
//! which has already checked that each is a valid JSON object, so the slices
//! are valid JSON. Scalars go through `serde_json`, so escapes are decoded
//! exactly as the writer encoded them.

use std::borrow::Cow;
use std::ops::Range;

/// The columns of one record, borrowed from its line where possible.
#[derive(Debug, PartialEq)]
pub(crate) struct Line<'a> {
    pub ts_ns: i64,
    pub kind: Cow<'a, str>,
    pub batch: u64,
    pub prefix: Cow<'a, str>,
    /// The event name, or the log target.
    pub name: Cow<'a, str>,
    /// 1 TRACE .. 5 ERROR, for logs.
    pub level: Option<u8>,
    pub module: Option<Cow<'a, str>>,
    pub file: Option<Cow<'a, str>>,
    pub line: Option<i64>,
    pub message: Option<Cow<'a, str>>,
    pub fields: Option<&'a str>,
    pub spans: Option<&'a str>,
    pub payload: Option<&'a str>,
}

/// A parsed line that owns its text, so it can cross threads: columns are
/// byte ranges of the text, or owned where escapes had to be decoded.
pub(crate) struct OwnedLine {
    text: String,
    ts_ns: i64,
    batch: u64,
    level: Option<u8>,
    line: Option<i64>,
    kind: Col,
    prefix: Col,
    name: Col,
    module: Option<Col>,
    file: Option<Col>,
    message: Option<Col>,
    fields: Option<Range<usize>>,
    spans: Option<Range<usize>>,
    payload: Option<Range<usize>>,
}

enum Col {
    Span(Range<usize>),
    Owned(Box<str>),
}

/// The byte range of `sub` in `text`, if it is a slice of it.
fn range_in(text: &str, sub: &str) -> Option<Range<usize>> {
    let start = (sub.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    let end = start + sub.len();
    (end <= text.len()).then_some(start..end)
}

impl Col {
    fn new(text: &str, c: Cow<'_, str>) -> Col {
        match c {
            Cow::Borrowed(s) => match range_in(text, s) {
                Some(r) => Col::Span(r),
                None => Col::Owned(s.into()),
            },
            Cow::Owned(s) => Col::Owned(s.into_boxed_str()),
        }
    }

    fn get<'a>(&'a self, text: &'a str) -> Cow<'a, str> {
        match self {
            Col::Span(r) => Cow::Borrowed(text.get(r.clone()).unwrap_or_default()),
            Col::Owned(s) => Cow::Borrowed(s),
        }
    }
}

impl OwnedLine {
    /// Parses `text`; the error says why it cannot be indexed.
    pub(crate) fn parse(text: String) -> Result<OwnedLine, String> {
        let l = parse_line(&text)?;
        let raw = |s: Option<&str>| s.and_then(|s| range_in(&text, s));
        let cols = OwnedLine {
            ts_ns: l.ts_ns,
            batch: l.batch,
            level: l.level,
            line: l.line,
            kind: Col::new(&text, l.kind),
            prefix: Col::new(&text, l.prefix),
            name: Col::new(&text, l.name),
            module: l.module.map(|c| Col::new(&text, c)),
            file: l.file.map(|c| Col::new(&text, c)),
            message: l.message.map(|c| Col::new(&text, c)),
            fields: raw(l.fields),
            spans: raw(l.spans),
            payload: raw(l.payload),
            text: String::new(),
        };
        Ok(OwnedLine { text, ..cols })
    }

    /// The columns, borrowed.
    pub(crate) fn line(&self) -> Line<'_> {
        let t = self.text.as_str();
        let raw = |r: &Option<Range<usize>>| r.clone().and_then(|r| t.get(r));
        Line {
            ts_ns: self.ts_ns,
            kind: self.kind.get(t),
            batch: self.batch,
            prefix: self.prefix.get(t),
            name: self.name.get(t),
            level: self.level,
            module: self.module.as_ref().map(|c| c.get(t)),
            file: self.file.as_ref().map(|c| c.get(t)),
            line: self.line,
            message: self.message.as_ref().map(|c| c.get(t)),
            fields: raw(&self.fields),
            spans: raw(&self.spans),
            payload: raw(&self.payload),
        }
    }
}

/// The number stored in `records.level` for a level name (case-insensitive).
pub(crate) fn level_number(name: &str) -> Option<u8> {
    const NAMES: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u8 + 1)
}

/// The level name for a number stored in `records.level`.
pub(crate) fn level_name(n: i64) -> Option<&'static str> {
    ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
        .get(usize::try_from(n.checked_sub(1)?).ok()?)
        .copied()
}

/// Parses one line; the error says why it cannot be indexed.
pub(crate) fn parse_line(line: &str) -> Result<Line<'_>, String> {
    let b = line.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return Err("not a JSON object".into());
    }
    i = skip_ws(b, i + 1);
    let mut ts_ns = None;
    let mut ts_text = None;
    let mut kind = None;
    let mut batch = 0;
    let mut prefix = None;
    let mut name = None;
    let mut target = None;
    let mut level = None;
    let mut module = None;
    let mut file = None;
    let mut line_no = None;
    let mut message = None;
    let mut fields = None;
    let mut spans = None;
    let mut payload = None;
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return Err(format!("expected a key at byte {i}"));
            }
            let key_end = string_end(b, i)?;
            let key = string_value(&line[i..key_end])?;
            i = skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return Err(format!("expected `:` at byte {i}"));
            }
            i = skip_ws(b, i + 1);
            let end = value_end(b, i)?;
            let raw = &line[i..end];
            match &*key {
                "ts_ns" => ts_ns = Some(int(raw, "ts_ns")?),
                "ts" => ts_text = Some(raw),
                "kind" => kind = Some(string_value(raw)?),
                "batch" => batch = opt(raw, |r| uint(r, "batch"))?.unwrap_or(0),
                "prefix" => prefix = Some(string_value(raw)?),
                "name" => name = opt(raw, string_value)?,
                "target" => target = opt(raw, string_value)?,
                "level" => level = opt(raw, string_value)?,
                "module" => module = opt(raw, string_value)?,
                "file" => file = opt(raw, string_value)?,
                "line" => line_no = opt(raw, |r| int(r, "line"))?,
                "message" => message = opt(raw, string_value)?,
                "fields" => fields = (raw != "null").then_some(raw),
                "spans" => spans = (raw != "null").then_some(raw),
                "payload" => payload = (raw != "null").then_some(raw),
                _ => {}
            }
            i = skip_ws(b, end);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Err(format!("expected `,` or `}}` at byte {i}")),
            }
        }
    }
    if skip_ws(b, i) != b.len() {
        return Err(format!("trailing characters at byte {i}"));
    }
    let ts_ns = match (ts_ns, ts_text) {
        (Some(ts), _) => ts,
        (None, Some(raw)) => ts_from_text(raw)?,
        (None, None) => return Err("no `ts_ns` or `ts`".into()),
    };
    let kind = kind.ok_or("no `kind`")?;
    let prefix = prefix.ok_or("no `prefix`")?;
    let name = name.or(target).unwrap_or_else(|| prefix.clone());
    let level = match level {
        Some(text) => Some(level_number(&text).ok_or_else(|| format!("unknown level {text:?}"))?),
        None => None,
    };
    Ok(Line {
        ts_ns,
        kind,
        batch,
        prefix,
        name,
        level,
        module,
        file,
        line: line_no,
        message,
        fields,
        spans,
        payload,
    })
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `b[start]` is `"`; returns the index just past the closing quote.
fn string_end(b: &[u8], start: usize) -> Result<usize, String> {
    let mut i = start + 1;
    while let Some(&c) = b.get(i) {
        match c {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("unterminated string at byte {start}"))
}

/// Returns the index just past the JSON value that starts at `start`
/// (structure only; the caller validates what it keeps).
fn value_end(b: &[u8], start: usize) -> Result<usize, String> {
    match b.get(start) {
        None => Err(format!("missing value at byte {start}")),
        Some(b'"') => string_end(b, start),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut i = start;
            while let Some(&c) = b.get(i) {
                match c {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            Err(format!("unterminated value at byte {start}"))
        }
        Some(_) => {
            let mut i = start;
            while let Some(&c) = b.get(i) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            Ok(i)
        }
    }
}

/// `None` for JSON `null`, else `f(raw)`.
fn opt<'a, T>(
    raw: &'a str,
    f: impl FnOnce(&'a str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if raw == "null" {
        Ok(None)
    } else {
        f(raw).map(Some)
    }
}

/// A JSON string, borrowed when it has no escapes.
fn string_value(raw: &str) -> Result<Cow<'_, str>, String> {
    let inner = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .ok_or_else(|| format!("expected a string, found {}", clip(raw)))?;
    if inner.bytes().any(|c| c == b'\\' || c < 0x20) {
        serde_json::from_str::<String>(raw)
            .map(Cow::Owned)
            .map_err(|e| format!("bad string {}: {e}", clip(raw)))
    } else {
        Ok(Cow::Borrowed(inner))
    }
}

fn int(raw: &str, what: &str) -> Result<i64, String> {
    raw.parse()
        .map_err(|_| format!("`{what}` is not an integer: {}", clip(raw)))
}

fn uint(raw: &str, what: &str) -> Result<u64, String> {
    raw.parse()
        .map_err(|_| format!("`{what}` is not an unsigned integer: {}", clip(raw)))
}

/// `ts` as an integer of nanoseconds or an RFC 3339 string.
fn ts_from_text(raw: &str) -> Result<i64, String> {
    if let Ok(n) = raw.parse::<i64>() {
        return Ok(n);
    }
    let text = string_value(raw)?;
    let t = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("bad `ts` {}: {e}", clip(raw)))?;
    i64::try_from(t.unix_timestamp_nanos()).map_err(|_| format!("`ts` out of range: {}", clip(raw)))
}

fn clip(raw: &str) -> String {
    let mut end = raw.len().min(40);
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    if end < raw.len() {
        format!("{}...", &raw[..end])
    } else {
        raw.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const LOG: &str = r#"{"ts":"2026-12-03T16:20:01.123456789Z","ts_ns":1796314801123456789,"kind":"log","batch":7,"prefix":"log:myapp::db","target":"myapp::db","level":"INFO","module":"myapp::db","file":"src/db.rs","line":42,"message":"row \"written\"\n","fields":{"user_id":42,"s":"a,}b"},"spans":[{"name":"req","fields":{"id":"a1"}}]}"#;

    // Catches a column taken from the wrong key, an escape decoded wrongly,
    // or a JSON slice cut at a `}` inside a string.
    #[test]
    fn log_line_columns() {
        let l = parse_line(LOG).unwrap();
        assert_eq!(l.ts_ns, 1_796_314_801_123_456_789);
        assert_eq!((&*l.kind, l.batch, &*l.prefix), ("log", 7, "log:myapp::db"));
        assert_eq!(
            (&*l.name, l.level, l.line),
            ("myapp::db", Some(3), Some(42))
        );
        assert_eq!(l.module.as_deref(), Some("myapp::db"));
        assert_eq!(l.file.as_deref(), Some("src/db.rs"));
        assert_eq!(l.message.as_deref(), Some("row \"written\"\n"));
        assert_eq!(l.fields, Some(r#"{"user_id":42,"s":"a,}b"}"#));
        assert_eq!(l.spans, Some(r#"[{"name":"req","fields":{"id":"a1"}}]"#));
        assert_eq!(l.payload, None);
    }

    // Catches events losing their name/payload, and nulls read as text.
    #[test]
    fn event_line_and_nulls() {
        let line = r#"{ "ts" : 5 , "kind":"event","batch":1,"prefix":"data:users","name":"data:users:created","payload":[1,{"a":"]"}],"module":null}"#;
        let l = parse_line(line).unwrap();
        assert_eq!(l.ts_ns, 5);
        assert_eq!(&*l.name, "data:users:created");
        assert_eq!(l.payload, Some(r#"[1,{"a":"]"}]"#));
        assert_eq!((l.module, l.level), (None, None));
        let l = parse_line(r#"{"ts":"1970-01-01T00:00:01.5Z","kind":"sample","prefix":"gpu"}"#)
            .unwrap();
        assert_eq!((l.ts_ns, &*l.name), (1_500_000_000, "gpu"));
    }

    // Catches malformed lines being indexed (or panicking) instead of being
    // reported: each case must be an error.
    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "",
            "[]",
            "{",
            r#"{"ts_ns":1,"kind":"log"}"#,
            r#"{"ts_ns":"x","kind":"log","prefix":"p"}"#,
            r#"{"ts_ns":1,"kind":"log","prefix":"p","fields":{"a":"}}"#,
            r#"{"ts_ns":1,"kind":"log","prefix":"p","level":"LOUD"}"#,
            r#"{"ts_ns":1,"kind":"log","prefix":"p"} x"#,
            r#"{"ts_ns":1,"kind":"log","prefix":"p"#,
            r#"{"ts_ns":1 "kind":"log"}"#,
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
    }

    // Catches a scanner that disagrees with serde_json on real-world shapes:
    // random objects with nested strings, escapes and unicode round-trip.
    #[test]
    fn random_objects_agree_with_serde_json() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let fields = random_value(&mut rng, 3);
            let payload = random_value(&mut rng, 3);
            let msg: String = (0..rng.usize(0..12))
                .map(|_| {
                    rng.choice(['a', '"', '\\', '}', ']', ',', 'é', '\n', '\u{1}', ' '])
                        .unwrap()
                })
                .collect();
            let v = json!({"ts_ns": rng.i64(..), "kind": "log", "batch": rng.u64(..),
                "prefix": msg.clone(), "message": msg, "fields": fields, "payload": payload});
            let text = if rng.bool() {
                serde_json::to_string(&v).unwrap()
            } else {
                serde_json::to_string_pretty(&v).unwrap()
            };
            let l = parse_line(&text).unwrap();
            assert_eq!(l.message.as_deref(), v["message"].as_str());
            assert_eq!(&*l.prefix, v["prefix"].as_str().unwrap());
            assert_eq!(l.ts_ns, v["ts_ns"].as_i64().unwrap());
            // JSON null is stored as SQL NULL.
            let back =
                |raw: Option<&str>| raw.map_or(Value::Null, |r| serde_json::from_str(r).unwrap());
            assert_eq!(back(l.fields), v["fields"]);
            assert_eq!(back(l.payload), v["payload"]);
        }
    }

    // Catches a panic (slicing, arithmetic) on arbitrary bytes.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(11);
        let alphabet = br#"{}[]":,\ ae1-.nulltrue"#;
        for _ in 0..20_000 {
            let mut s: Vec<u8> = LOG.as_bytes().to_vec();
            for _ in 0..rng.usize(1..6) {
                let at = rng.usize(..s.len());
                match rng.u8(0..3) {
                    0 => s[at] = alphabet[rng.usize(..alphabet.len())],
                    1 => s.truncate(at),
                    _ => {
                        s.remove(at);
                    }
                }
                if s.is_empty() {
                    break;
                }
            }
            if let Ok(text) = std::str::from_utf8(&s) {
                let _ = parse_line(text);
            }
        }
    }

    fn random_value(rng: &mut fastrand::Rng, depth: u32) -> Value {
        match rng.u8(0..if depth == 0 { 4 } else { 6 }) {
            0 => Value::Null,
            1 => json!(rng.i64(..)),
            // Exactly representable, so the comparison tests the scanner, not float printing.
            2 => json!(f64::from(rng.i32(..)) / 4.0),
            3 => Value::String(
                (0..rng.usize(0..6))
                    .map(|_| rng.choice(['x', '"', '\\', '{', 'ü']).unwrap())
                    .collect(),
            ),
            4 => Value::Array(
                (0..rng.usize(0..3))
                    .map(|_| random_value(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.usize(0..3))
                    .map(|i| (format!("k{i}\"}}"), random_value(rng, depth - 1)))
                    .collect(),
            ),
        }
    }

    // Catches an owned line whose columns point at the wrong bytes after
    // the text moved (escaped columns are decoded copies).
    #[test]
    fn owned_line_gives_the_same_columns() {
        let text = LOG.replace("\"target\":\"myapp::db\"", "\"target\":\"my\\u0061pp\"");
        let want = parse_line(&text).unwrap();
        assert_eq!(&*want.name, "myapp");
        let owned = OwnedLine::parse(text.clone()).unwrap();
        let moved = [owned];
        assert_eq!(moved[0].line(), want);
        assert!(OwnedLine::parse("[]".into()).is_err());
    }

    // Catches a level order that breaks `level >= WARN` range queries.
    #[test]
    fn levels_are_ordered_by_severity() {
        let n: Vec<_> = ["trace", "DEBUG", "Info", "WARN", "ERROR"]
            .iter()
            .map(|s| level_number(s).unwrap())
            .collect();
        assert_eq!(n, [1, 2, 3, 4, 5]);
        assert_eq!(level_name(4), Some("WARN"));
        assert_eq!(level_name(0), None);
        assert_eq!(level_name(6), None);
    }
}
