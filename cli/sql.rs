//! `spillway sql DIR QUERY`: one read-only SQL statement against the index.
//!
//! The index is opened read-only (`SQLITE_OPEN_READ_ONLY` and `PRAGMA
//! query_only`), and a statement that would write is refused before it
//! runs. Tables: `records`, `batches`, `segments`; views `logs`, `events`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;
use spillway::sinks::index::IndexReader;

use super::query::Table;

/// Arguments of `spillway sql`.
#[derive(clap::Args, Debug)]
pub struct SqlArgs {
    /// The data directory (holds `index.db`).
    pub dir: PathBuf,
    /// One SQL statement, e.g. "SELECT ts, level, message FROM logs ORDER BY ts_ns DESC LIMIT 10".
    pub query: String,
    /// Print one JSON object per row instead of a table (rows stream as they come).
    #[arg(long)]
    pub json: bool,
}

/// Runs `spillway sql`.
pub fn run(args: &SqlArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    run_with(args, &mut out)?;
    out.flush().context("cannot write to stdout")
}

/// Runs `spillway sql`, writing rows to `out`.
pub fn run_with(args: &SqlArgs, out: &mut dyn Write) -> Result<()> {
    let reader = IndexReader::open(&args.dir)?;
    if args.json {
        reader.sql(&args.query, &mut |columns, row| {
            object_line(columns, &row, &mut *out)
                .map_err(|e| spillway::Error::Other(format!("cannot write to stdout: {e}")))
        })?;
    } else {
        let mut rows = Vec::new();
        let columns = reader.sql(&args.query, &mut |_, row| {
            rows.push(row);
            Ok(())
        })?;
        let mut table = Table::new(columns);
        for row in rows {
            table.row(row.into_iter().map(cell).collect());
        }
        table.print(out)?;
    }
    Ok(())
}

/// One row as a JSON object on one line, keys in column order.
fn object_line(columns: &[String], row: &[Value], out: &mut dyn Write) -> std::io::Result<()> {
    out.write_all(b"{")?;
    for (i, (k, v)) in columns.iter().zip(row).enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut *out, k)?;
        out.write_all(b":")?;
        serde_json::to_writer(&mut *out, v)?;
    }
    out.write_all(b"}\n")
}

fn cell(v: Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => s,
        v => v.to_string(),
    }
}
