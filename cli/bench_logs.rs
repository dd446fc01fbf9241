//! The logging scenarios of `spillway bench`: the tracing layer beside
//! tracing-subscriber's JSON fmt layer writing through
//! `tracing_appender::non_blocking` (lossy off) to a file, in the same run.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use spillway::{BatchConfig, Engine, SegmentConfig, SegmentSink, SpillwayLayer};
use tracing_subscriber::prelude::*;

/// Rounds per contestant; the fastest counts (the others were slowed by
/// whatever else the shared machine was doing).
const ROUNDS: usize = 3;

/// The benchmark's event, `n` times: the line from DESIGN.md section 7.
fn emit(n: u64) {
    let table = "users";
    let op = "insert";
    for i in 0..n {
        let user_id = i;
        tracing::info!(target: "data::users", user_id, table, op, "row written {}", i);
    }
}

/// CPU time of the calling thread (Linux `/proc/thread-self/schedstat`).
pub(crate) fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// One timed run.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// Caller wall time per event.
    pub caller_ns: f64,
    /// Caller CPU time per event.
    pub caller_cpu_ns: f64,
    /// Records per second, from the first call until the last record is on disk.
    pub end_to_end_per_s: f64,
}

fn time(events: u64, done: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Round> {
    let (start, cpu) = (Instant::now(), thread_cpu_ns());
    emit(events);
    let caller = start.elapsed();
    let cpu = cpu
        .zip(thread_cpu_ns())
        .map_or(f64::NAN, |(a, b)| b.saturating_sub(a) as f64);
    done()?;
    Ok(Round {
        caller_ns: caller.as_nanos() as f64 / events as f64,
        caller_cpu_ns: cpu / events as f64,
        end_to_end_per_s: events as f64 / start.elapsed().as_secs_f64(),
    })
}

/// SpillwayLayer on the default configuration; with `dir`, into segments.
fn spillway_round(events: u64, dir: Option<&Path>) -> anyhow::Result<(Round, u64)> {
    let mut builder = Engine::builder(BatchConfig::default());
    if let Some(dir) = dir {
        builder = builder.sink(Box::new(SegmentSink::open(dir, SegmentConfig::default())?));
    }
    let (engine, guard) = builder.build()?;
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    let round = tracing::subscriber::with_default(subscriber, || {
        emit((events / 10).min(100_000));
        engine.flush()?;
        time(events, || Ok(engine.flush()?))
    })?;
    let dropped = engine.stats().total.dropped;
    drop(guard);
    Ok((round, dropped))
}

/// The peer: JSON fmt layer + non_blocking (lossy off) to a plain file in `dir`.
fn peer_round(events: u64, dir: &Path) -> anyhow::Result<Round> {
    let path = dir.join("peer.jsonl");
    let file =
        std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let (writer, worker) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(file);
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().json().with_writer(writer));
    let round = tracing::subscriber::with_default(subscriber, || {
        emit((events / 10).min(100_000));
        // Dropping the worker guard waits until every line is written.
        time(events, || {
            drop(worker);
            Ok(())
        })
    })?;
    let _ = std::fs::remove_file(&path);
    Ok(round)
}

fn best(rounds: &[Round]) -> Round {
    let mut b = rounds[0];
    for r in rounds {
        if r.caller_ns < b.caller_ns {
            b.caller_ns = r.caller_ns;
            b.caller_cpu_ns = r.caller_cpu_ns;
        }
        b.end_to_end_per_s = b.end_to_end_per_s.max(r.end_to_end_per_s);
    }
    b
}

/// What the logging scenarios measured.
pub struct LogFigures {
    pub ours: Round,
    pub ours_segments: Round,
    pub peer: Round,
    pub dropped: u64,
    pub compression: f64,
    pub rss: Option<(f64, u64, u64)>,
}

/// Runs the logging scenarios (`events` per round).
pub fn run(events: u64, burst: u64) -> anyhow::Result<LogFigures> {
    let tmp = tempfile::Builder::new()
        .prefix("spillway-bench")
        .tempdir()?;
    let (mut ours, mut segs, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    let mut dropped = 0;
    for i in 0..ROUNDS {
        let (r, d) = spillway_round(events, None)?;
        ours.push(r);
        dropped += d;
        let dir = tmp.path().join(format!("segments-{i}"));
        let (r, d) = spillway_round(events, Some(&dir))?;
        segs.push(r);
        dropped += d;
        let _ = std::fs::remove_dir_all(&dir);
        peer.push(peer_round(events, tmp.path())?);
    }
    Ok(LogFigures {
        ours: best(&ours),
        ours_segments: best(&segs),
        peer: best(&peer),
        dropped,
        compression: demo_mix_compression(tmp.path())?,
        rss: rss_burst(burst).ok(),
    })
}

/// Compression ratio of segments holding the demo's log mix (four modules,
/// every level, spans and typed fields) for one second.
fn demo_mix_compression(tmp: &Path) -> anyhow::Result<f64> {
    let dir = tmp.join("mix");
    let (engine, guard) = Engine::builder(BatchConfig::default())
        .sink(Box::new(SegmentSink::open(&dir, SegmentConfig::default())?))
        .build()?;
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    let dispatch = tracing::Dispatch::new(subscriber);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = crate::demo::start_logging_modules(stop.clone(), Some(dispatch));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    engine.flush()?;
    drop(guard);
    let t = crate::demo::segment_totals(&dir)?;
    Ok(t.raw_bytes as f64 / t.zst_bytes.max(1) as f64)
}

/// Peak RSS above baseline for a burst of `events` through the layer into
/// segments, measured in a child process (so earlier scenarios do not count):
/// (MiB above baseline, records dropped, records written).
fn rss_burst(events: u64) -> anyhow::Result<(f64, u64, u64)> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args(["bench", "--rss-burst-child", &events.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums[..] {
        [base_kib, peak_kib, dropped, written] => Ok((
            (peak_kib.saturating_sub(base_kib)) as f64 / 1024.0,
            dropped,
            written,
        )),
        _ => anyhow::bail!(
            "rss child said {text:?} ({})",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// The child side of [`rss_burst`]: prints `baseline_kib peak_kib dropped written`.
pub fn rss_burst_child(events: u64) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("spillway-rss").tempdir()?;
    let (engine, guard) = Engine::builder(BatchConfig::default())
        .sink(Box::new(SegmentSink::open(
            tmp.path(),
            SegmentConfig::default(),
        )?))
        .build()?;
    let subscriber = tracing_subscriber::registry().with(SpillwayLayer::new(&engine));
    tracing::subscriber::with_default(subscriber, || -> anyhow::Result<()> {
        emit(1000);
        engine.flush()?;
        let base = status_kib("VmRSS:");
        emit(events);
        engine.flush()?;
        let stats = engine.stats();
        println!(
            "{base} {} {} {}",
            status_kib("VmHWM:"),
            stats.total.dropped,
            stats.total.accepted
        );
        Ok(())
    })?;
    drop(guard);
    Ok(())
}
