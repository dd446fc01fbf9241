//! `spillway query DIR`: records from the SQLite index, filtered.
//!
//! Prints the newest `--limit` matching records, oldest first, as an aligned
//! table, or as JSON Lines in the segment format with `--json`. The
//! [`Table`] here is shared by `sql` and `stats`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use spillway::sinks::index::{IndexReader, Order, Query, QueryRecord, RecordBody};

use super::tail::{parse_level, parse_since};

/// Arguments of `spillway query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// The data directory (holds `segments/` and `index.db`).
    #[arg(default_value = "./spillway-data")]
    pub dir: PathBuf,
    /// Only records at or after this time: an age (30s, 10m, 2h) or RFC 3339.
    #[arg(long)]
    pub since: Option<String>,
    /// Only records before this time: an age (30s, 10m, 2h) or RFC 3339.
    #[arg(long)]
    pub until: Option<String>,
    /// Only logs at this level or more severe: trace, debug, info, warn, error.
    #[arg(long)]
    pub level: Option<String>,
    /// Only records whose prefix or name matches: `data:*`,
    /// `sentinel:*:status`, `log:myapp::*` (a module and those below it), or
    /// exactly `log:myapp::db`.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only records whose message, name, fields or payload contain this text
    /// (case-sensitive).
    #[arg(long)]
    pub grep: Option<String>,
    /// Only records whose field (or payload key) KEY equals VALUE; repeatable.
    /// VALUE is compared as JSON when it is JSON (`42`, `true`), else as text.
    #[arg(long = "field", value_name = "KEY=VALUE", value_parser = parse_field)]
    pub fields: Vec<(String, String)>,
    /// At most this many records, the newest; 0 for all.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print JSON Lines (the segment format) instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_field(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// Runs `spillway query`.
pub fn run(args: &QueryArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    run_with(args, &mut out, &mut std::io::stderr())?;
    out.flush().context("cannot write to stdout")
}

/// Runs `spillway query`, writing records to `out` and notes to `err`.
pub fn run_with(args: &QueryArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let query = Query {
        since: args.since.as_deref().map(parse_since).transpose()?,
        until: args.until.as_deref().map(parse_since).transpose()?,
        min_level: args.level.as_deref().map(parse_level).transpose()?,
        prefix: args.prefix.clone(),
        text: args.grep.clone(),
        fields: args.fields.clone(),
        limit: (args.limit > 0).then_some(args.limit),
        order: Order::Desc,
    };
    let reader = IndexReader::open(&args.dir)?;
    let mut records = reader.query(&query)?;
    records.reverse(); // the newest N, printed oldest first
    if let Ok(lag) = reader.lag() {
        if lag.bytes > 0 {
            writeln!(
                err,
                "note: the index is {} bytes ({} files) behind the segments; a running \
                 service catches up, else run `spillway reindex {}`",
                lag.bytes,
                lag.segments,
                args.dir.display()
            )?;
        }
    }
    if args.json {
        for r in &records {
            serde_json::to_writer(&mut *out, r)?;
            out.write_all(b"\n")?;
        }
    } else {
        let mut table = Table::new(["TIME", "LEVEL", "PREFIX", "NAME", "MESSAGE"]);
        for r in &records {
            table.row(row(r));
        }
        table.print(out)?;
    }
    Ok(())
}

/// The table cells of a record: logs show their message and fields, events
/// their kind and payload.
fn row(r: &QueryRecord) -> Vec<String> {
    match &r.body {
        RecordBody::Log {
            target,
            level,
            message,
            fields,
            ..
        } => {
            let mut text = message.clone();
            if let Some(map) = fields.as_object() {
                for (k, v) in map {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        v => v.to_string(),
                    };
                    text.push_str(&format!(" {k}={v}"));
                }
            }
            vec![
                r.ts.clone(),
                level.clone(),
                r.prefix.clone(),
                target.clone(),
                text,
            ]
        }
        RecordBody::Event { name, payload } => vec![
            r.ts.clone(),
            r.kind.to_uppercase(),
            r.prefix.clone(),
            name.clone(),
            payload.to_string(),
        ],
    }
}

/// A plain aligned text table, for the query, sql and stats commands.
/// Rows of cells printed with each column padded to its widest cell; the
/// last column is not padded. Control characters in cells are escaped so a
/// row stays on one line.
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with this header row.
    pub(crate) fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table {
            rows: vec![header.into_iter().map(Into::into).collect()],
        }
    }

    /// Appends a row.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| one_line(&c)).collect());
    }

    /// Writes the table.
    pub(crate) fn print(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad + 2));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| match c {
            '\n' => "\\n".to_string(),
            '\t' => "\\t".to_string(),
            '\r' => "\\r".to_string(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches misaligned columns, and cells with newlines breaking rows.
    #[test]
    fn columns_align_and_cells_stay_on_one_line() {
        let mut t = Table::new(["A", "BB", "C"]);
        t.row(vec!["xyz".into(), "é".into(), "multi\nline".into()]);
        t.row(vec!["1".into(), "22".into(), "".into()]);
        let mut out = Vec::new();
        t.print(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A    BB  C\nxyz  é   multi\\nline\n1    22\n"
        );
    }

    // Catches `--field` values with `=` being cut, and keys left empty.
    #[test]
    fn field_arguments_split_at_the_first_equals() {
        assert_eq!(parse_field("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_field("a="), Ok(("a".into(), String::new())));
        assert!(parse_field("=b").is_err());
        assert!(parse_field("ab").is_err());
    }
}
