//! `spillway stats DIR`: what the index holds, per prefix, and disk use.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use spillway::rfc3339;
use spillway::sinks::index::{IndexReader, IndexStats};

use super::query::Table;

/// Arguments of `spillway stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// The data directory (holds `segments/` and `index.db`).
    #[arg(default_value = "./spillway-data")]
    pub dir: PathBuf,
    /// Print the statistics as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `spillway stats`.
pub fn run(args: &StatsArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    run_with(args, &mut out)?;
    out.flush().context("cannot write to stdout")
}

/// Runs `spillway stats`, writing to `out`.
pub fn run_with(args: &StatsArgs, out: &mut dyn Write) -> Result<()> {
    let stats = IndexReader::open(&args.dir)?.stats()?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &stats)?;
        writeln!(out)?;
    } else {
        write_text(out, &stats)?;
    }
    Ok(())
}

fn write_text(out: &mut dyn Write, s: &IndexStats) -> std::io::Result<()> {
    writeln!(
        out,
        "records      {} in {} batches, {} dropped, {} damaged frames skipped",
        s.records, s.batches, s.dropped, s.damaged_frames
    )?;
    match (s.first_ts_ns, s.last_ts_ns) {
        (Some(a), Some(b)) => writeln!(
            out,
            "time span    {} .. {} ({})",
            rfc3339(a),
            rfc3339(b),
            duration((b - a).max(0))
        )?,
        _ => writeln!(out, "time span    (empty)")?,
    }
    writeln!(
        out,
        "segments     {} files, {}{}",
        s.segment_files,
        bytes(s.segment_bytes),
        s.compression_ratio
            .map(|r| format!(", compression {r:.1}x"))
            .unwrap_or_default()
    )?;
    writeln!(out, "index        {}", bytes(s.index_bytes))?;
    writeln!(
        out,
        "index lag    {} in {} files",
        bytes(s.lag.bytes),
        s.lag.segments
    )?;
    writeln!(out)?;
    let mut table = Table::new(["PREFIX", "RECORDS", "BATCHES", "DROPPED", "FIRST", "LAST"]);
    for (prefix, p) in &s.prefixes {
        table.row(vec![
            prefix.clone(),
            p.records.to_string(),
            p.batches.to_string(),
            p.dropped.to_string(),
            rfc3339(p.first_ts_ns),
            rfc3339(p.last_ts_ns),
        ]);
    }
    table.print(out)
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn duration(ns: i64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{:.3}s", ns as f64 / 1e9),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s / 60) % 60),
        _ => format!("{}d {}h", s / 86400, (s / 3600) % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches unit boundaries printed wrong (1024 B as "1024 B", etc.).
    #[test]
    fn human_sizes_and_durations() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(duration(1_500_000_000), "1.500s");
        assert_eq!(duration(61 * 1_000_000_000), "1m 1s");
        assert_eq!(
            duration(3 * 86_400 * 1_000_000_000 + 7_200_000_000_000),
            "3d 2h"
        );
    }
}
