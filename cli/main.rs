//! The `spillway` command: run the demo, benchmark, and (as the other parts
//! land) tail, query and inspect a data directory.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_logs;
mod demo;
mod flood;
mod gpu;
mod query;
mod reindex;
mod sql;
mod stats;
mod tail;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "spillway", version, about = "Flood control for busy services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay a start-up flood through spillway and report what happened.
    Demo(demo::DemoArgs),
    /// Measure spillway beside its peers in the same run; prints a table.
    Bench(bench::BenchArgs),
    /// Live GPU and host telemetry, one line per summary window.
    Gpu(gpu::GpuArgs),
    /// Print (and follow) the records in a data directory's segment files.
    Tail(tail::TailArgs),
    /// Query the SQLite index: time range, level, prefix, text, fields.
    Query(query::QueryArgs),
    /// Run SQL on the index, read-only (writes are refused).
    Sql(sql::SqlArgs),
    /// Per-prefix records, batches and drops; index lag, disk use, compression.
    Stats(stats::StatsArgs),
    /// Rebuild index.db from the segment files.
    Reindex(reindex::ReindexArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Gpu(a) => gpu::run(a),
        Command::Tail(a) => tail::run(a),
        Command::Query(a) => query::run(a),
        Command::Sql(a) => sql::run(a),
        Command::Stats(a) => stats::run(a),
        Command::Reindex(a) => reindex::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spillway: {e:#}");
            ExitCode::FAILURE
        }
    }
}
