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

use crate::query::Table;

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
    let reader = IndexReader::open(&args.dir)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        reader.sql(&args.query, &mut |columns, row| {
            let obj: serde_json::Map<String, Value> = columns.iter().cloned().zip(row).collect();
            serde_json::to_writer(&mut out, &obj)
                .and_then(|()| out.write_all(b"\n").map_err(serde_json::Error::io))
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
        table.print(&mut out)?;
    }
    out.flush().context("cannot write to stdout")
}

fn cell(v: Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => s,
        v => v.to_string(),
    }
}
