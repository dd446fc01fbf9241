//! `spillway tail`: print the records stored in segment files, like `tail`
//! (and, with `-f`, like `tail -f`).
//!
//! Reads a data directory (all streams: logs, then events, then telemetry,
//! each in file order), one stream folder, or one segment file. Log records
//! are printed the way `tracing`'s fmt layer prints them:
//!
//! ```text
//! 2026-12-03T16:20:01.123456Z  INFO request{id="7f3a"}: myapp::db: row written user_id=42 table="users"
//! 2026-12-03T16:20:01.123470Z EVENT data:users:created {"id":42}
//! ```
//!
//! Damaged data is reported on stderr with its file and byte offset, and
//! skipped. [`parse_since`] and [`parse_level`] are shared with `query`.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::Value;
use spillway::sinks::segment::reader::{ReadItem, SegmentReader, DEFAULT_POLL_INTERVAL};
use spillway::{Level, Pattern};

/// The data directory read when no path is given.
pub const DEFAULT_DATA_DIR: &str = "./spillway-data";

/// Print stored records, optionally following new ones.
#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// A data directory (the one containing `segments/`), a stream folder
    /// (`DIR/segments/logs`) or a segment file [default: ./spillway-data].
    pub path: Option<PathBuf>,
    /// Keep waiting for new records and new segment files, like `tail -f`
    /// (given a single file, follow that file only).
    #[arg(short, long)]
    pub follow: bool,
    /// Only log records at this level or more severe: trace, debug, info,
    /// warn or error (events and samples are then left out).
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    pub level: Option<Level>,
    /// Only records whose prefix or name matches this glob over
    /// colon-separated segments (`data:*`, `sentinel:*:status`, `log:myapp`).
    #[arg(long, value_name = "PATTERN")]
    pub prefix: Option<String>,
    /// Only records since then: a duration ago (`30s`, `10m`, `2h`, `1d`)
    /// or an RFC 3339 time (`2026-12-03T16:20:00Z`).
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<i64>,
    /// Only records whose printed text contains this (message, target or
    /// name, fields, payload).
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// Print the stored JSON lines as they are.
    #[arg(long)]
    pub json: bool,
}

/// Runs `spillway tail`: records to stdout (coloured when it is a
/// terminal), damage reports to stderr. Ends at the end of the data unless
/// following. An unreadable path or a bad option is an error.
pub fn run(args: &TailArgs) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let color = stdout.is_terminal();
    let mut out = io::BufWriter::new(stdout.lock());
    match run_with(args, &mut out, &mut io::stderr(), color) {
        // The reader went away (`spillway tail | head`): not an error.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// [`run`] with the output streams and colouring given.
pub fn run_with(
    args: &TailArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    color: bool,
) -> anyhow::Result<()> {
    let path = args
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let filter = Filter::new(args)?;
    let mut reader = SegmentReader::open(&path)?.follow(args.follow);
    if let Some(since) = args.since {
        let t = UNIX_EPOCH + Duration::from_nanos(u64::try_from(since).unwrap_or(0));
        reader = reader.modified_since(t);
    }
    loop {
        match reader.poll()? {
            Some(ReadItem::Frame(frame)) => {
                for line in &frame.lines {
                    if let Some(text) = filter.render(line, args.json, color) {
                        out.write_all(text.as_bytes())?;
                        out.write_all(b"\n")?;
                    }
                }
            }
            Some(ReadItem::Damage(d)) => {
                out.flush()?;
                writeln!(err, "spillway tail: skipped damaged data: {d}")?;
            }
            None => {
                out.flush()?;
                if !args.follow {
                    return Ok(());
                }
                std::thread::sleep(DEFAULT_POLL_INTERVAL);
            }
        }
    }
}

/// Parses a minimum level: `trace`, `debug`, `info`, `warn` (or
/// `warning`) or `error`, in any case.
pub fn parse_level(text: &str) -> anyhow::Result<Level> {
    Ok(match text.trim().to_ascii_lowercase().as_str() {
        "trace" => Level::TRACE,
        "debug" => Level::DEBUG,
        "info" => Level::INFO,
        "warn" | "warning" => Level::WARN,
        "error" => Level::ERROR,
        _ => bail!("invalid level {text:?}: expected trace, debug, info, warn or error"),
    })
}

/// Parses a point in time into nanoseconds since the Unix epoch: a
/// duration before now (`500ms`, `30s`, `10m`, `2h`, `1d`) or an RFC 3339
/// time (`2026-12-03T16:20:00Z`, `2026-12-03T17:20:00.5+01:00`).
pub fn parse_since(text: &str) -> anyhow::Result<i64> {
    let text = text.trim();
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(unit_at);
    let ns_per_unit: Option<i64> = match unit {
        "ms" => Some(1_000_000),
        "s" => Some(1_000_000_000),
        "m" => Some(60_000_000_000),
        "h" => Some(3_600_000_000_000),
        "d" => Some(86_400_000_000_000),
        _ => None,
    };
    if let (Some(per), Ok(n)) = (ns_per_unit, num.parse::<i64>()) {
        let ago = n
            .checked_mul(per)
            .with_context(|| format!("duration {text:?} is too long"))?;
        return Ok(spillway::now_ns().saturating_sub(ago));
    }
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            anyhow::anyhow!(
                "invalid time {text:?}: expected a duration ago (30s, 10m, 2h, 1d) \
                 or an RFC 3339 time (2026-12-03T16:20:00Z)"
            )
        })?;
    i64::try_from(t.unix_timestamp_nanos())
        .with_context(|| format!("time {text:?} is out of range"))
}

/// Which records to print, and how.
struct Filter {
    level: Option<Level>,
    pattern: Option<Pattern>,
    since: Option<i64>,
    grep: Option<String>,
}

impl Filter {
    fn new(args: &TailArgs) -> anyhow::Result<Filter> {
        let pattern = match &args.prefix {
            Some(p) => Some(Pattern::parse(p).context("invalid --prefix")?),
            None => None,
        };
        Ok(Filter {
            level: args.level,
            pattern,
            since: args.since,
            grep: args.grep.clone(),
        })
    }

    /// The text to print for `line`, or `None` when it is filtered out.
    fn render(&self, line: &str, json: bool, color: bool) -> Option<String> {
        let v: Value = serde_json::from_str(line).ok()?;
        let kind = str_of(&v, "kind");
        if let (Some(since), Some(ts)) = (self.since, v["ts_ns"].as_i64()) {
            if ts < since {
                return None;
            }
        }
        if let Some(min) = self.level {
            let level = parse_level(str_of(&v, "level")).ok()?;
            if kind != "log" || level > min {
                return None;
            }
        }
        if let Some(p) = &self.pattern {
            let target = format!("log:{}", str_of(&v, "target"));
            let hit = p.matches(str_of(&v, "prefix"))
                || p.matches(str_of(&v, "name"))
                || (kind == "log" && p.matches(&target));
            if !hit {
                return None;
            }
        }
        if let Some(g) = &self.grep {
            if !format_record(&v, false).contains(g.as_str()) {
                return None;
            }
        }
        Some(if json {
            line.to_owned()
        } else {
            format_record(&v, color)
        })
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

const RESET: &str = "\x1b[0m";
const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";

/// Wraps `text` in an ANSI style when colouring.
fn paint(out: &mut String, color: bool, style: &str, text: &str) {
    if color {
        out.push_str(style);
        out.push_str(text);
        out.push_str(RESET);
    } else {
        out.push_str(text);
    }
}

/// One record as `tracing`'s fmt layer would print it.
fn format_record(v: &Value, color: bool) -> String {
    let mut out = String::with_capacity(160);
    let ts = v["ts_ns"]
        .as_i64()
        .map(|ns| {
            // RFC 3339 with microseconds, as the fmt layer prints.
            let full = spillway::rfc3339(ns);
            format!("{}Z", &full[..full.len().saturating_sub(4)])
        })
        .unwrap_or_else(|| str_of(v, "ts").to_owned());
    paint(&mut out, color, DIM, &ts);
    out.push(' ');
    let kind = str_of(v, "kind");
    if kind == "log" {
        let level = str_of(v, "level");
        let style = match level {
            "TRACE" => "\x1b[35m",
            "DEBUG" => "\x1b[34m",
            "INFO" => "\x1b[32m",
            "WARN" => "\x1b[33m",
            _ => "\x1b[31m",
        };
        paint(&mut out, color, style, &format!("{level:>5}"));
        out.push(' ');
        for span in v["spans"].as_array().into_iter().flatten() {
            paint(&mut out, color, BOLD, str_of(span, "name"));
            let fields = span["fields"].as_object();
            if fields.is_some_and(|f| !f.is_empty()) {
                paint(&mut out, color, BOLD, "{");
                let mut first = true;
                for (k, val) in fields.into_iter().flatten() {
                    if !first {
                        out.push(' ');
                    }
                    first = false;
                    push_field(&mut out, k, val);
                }
                paint(&mut out, color, BOLD, "}");
            }
            out.push(':');
            out.push(' ');
        }
        paint(&mut out, color, DIM, &format!("{}:", str_of(v, "target")));
        out.push(' ');
        out.push_str(str_of(v, "message"));
        for (k, val) in v["fields"].as_object().into_iter().flatten() {
            out.push(' ');
            push_field(&mut out, k, val);
        }
    } else {
        let label = kind.to_ascii_uppercase();
        paint(&mut out, color, "\x1b[36m", &format!("{label:>5}"));
        out.push(' ');
        out.push_str(str_of(v, "name"));
        out.push(' ');
        out.push_str(&v["payload"].to_string());
    }
    out
}

/// `key=value`: strings quoted (as the fmt layer prints `&str` fields),
/// everything else as JSON.
fn push_field(out: &mut String, key: &str, val: &Value) {
    out.push_str(key);
    out.push('=');
    out.push_str(&val.to_string());
}
