//! `spillway demo`: replays the start-up flood that kept the user's machine
//! from ever reporting healthy, through spillway, and says what happened.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use spillway::telemetry::{FakeGpu, HostSource};
use spillway::{
    list_segments, BatchAwareSubscriber, BusEvent, Config, FrameReader, MessageBus, Spillway,
};
use tracing_subscriber::prelude::*;

use crate::flood::{self, FloodSpec};

/// Counts the telemetry windows republished on the bus and keeps the last status.
#[derive(Default)]
struct Windows {
    count: AtomicU64,
    status: std::sync::Mutex<String>,
}

impl BatchAwareSubscriber for Windows {
    fn on_event(&self, e: &BusEvent) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if e.name == "gpu:batch" {
            if let Some(s) = e.payload["summary"]["status"].as_str() {
                *self.status.lock().unwrap_or_else(|p| p.into_inner()) = s.to_string();
            }
        }
    }
}

/// Modules of the replayed service logging at every level while the flood runs.
/// With `dispatch`, the threads log through it; otherwise through the global subscriber.
pub(crate) fn start_logging_modules(
    stop: Arc<AtomicBool>,
    dispatch: Option<tracing::Dispatch>,
) -> Vec<std::thread::JoinHandle<u64>> {
    let module = |f: fn(u64)| {
        let stop = stop.clone();
        let dispatch = dispatch.clone();
        std::thread::spawn(move || {
            let run = || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    f(n);
                    n += 1;
                    if n % 64 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                n
            };
            match dispatch {
                Some(d) => tracing::dispatcher::with_default(&d, run),
                None => run(),
            }
        })
    };
    vec![
        module(|n| {
            let span = tracing::info_span!(target: "myapp::indexer", "index_file", file = n);
            let _e = span.enter();
            tracing::debug!(target: "myapp::indexer", bytes = n * 31, lang = "rust", "parsed file");
            if n % 1000 == 999 {
                tracing::warn!(target: "myapp::indexer", skipped = 1u64, "file too large, skipped");
            }
        }),
        module(|n| {
            tracing::info!(target: "myapp::orm", table = "users", row_id = n, op = "insert", "row written {n}");
            if n % 5000 == 4999 {
                tracing::error!(target: "myapp::orm", table = "sessions", "constraint violation on row {n}");
            }
        }),
        module(|n| {
            if n % 16 == 0 {
                tracing::info!(target: "myapp::health", seq = n, ok = true, "health check answered");
            }
            tracing::trace!(target: "myapp::ipc", frame = n, "ipc frame sent");
        }),
    ]
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Events the flood publishes (3/4 code-index files, 1/4 ORM rows).
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Keep health checks and chat going at least this many seconds.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Data directory (created if missing).
    #[arg(long, default_value = "spillway-data")]
    pub dir: PathBuf,
    /// Configuration file (TOML); defaults apply to everything it leaves out.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Sample a scripted GPU instead of NVML (for machines without an NVIDIA GPU).
    #[arg(long)]
    pub fake_gpu: bool,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let mut spillway =
        Spillway::open_with(&args.dir, config).context("opening the data directory")?;
    let engine = spillway.engine().clone();
    // The service's logs go through spillway (a global subscriber: this is the process's own).
    let _ = tracing_subscriber::registry()
        .with(spillway.layer())
        .try_init();
    let inner = Arc::new(MessageBus::new());
    let windows = Arc::new(Windows::default());
    inner.subscribe("gpu:batch", windows.clone())?;
    inner.subscribe("sys:batch", windows.clone())?;
    let bus = Arc::new(spillway.bus(inner));
    if args.fake_gpu {
        spillway.start_telemetry_with(Some(Box::new(FakeGpu::demo(1))), Some(HostSource::new()))?;
    } else {
        spillway.start_telemetry()?;
    }
    let stop_logs = Arc::new(AtomicBool::new(false));
    let loggers = start_logging_modules(stop_logs.clone(), None);
    let spec = FloodSpec {
        files: args.events * 3 / 4,
        rows: args.events - args.events * 3 / 4,
        min_duration: Duration::from_secs_f64(args.seconds.max(0.0)),
    };
    println!(
        "spillway demo: a code indexer announces {} files and an ORM writes {} rows as fast as they can,\n\
         while chat runs every 20 ms and a health check is sent every 10 ms (passthrough).",
        spec.files, spec.rows
    );
    let r = flood::run(bus.clone(), &spec);
    stop_logs.store(true, Ordering::Relaxed);
    let logged: u64 = loggers.into_iter().filter_map(|h| h.join().ok()).sum();
    let gpu_status = spillway
        .telemetry()
        .map(|t| t.status().to_string())
        .unwrap_or_default();
    spillway.flush()?;
    let stats = engine.stats();
    // Index what was written, so the example queries below see all of it.
    let index_start = std::time::Instant::now();
    let indexed = spillway.flush_and_index(Duration::from_secs(120));
    let index_secs = index_start.elapsed().as_secs_f64();
    drop(spillway);
    println!();
    println!("  events published       {:>12}", r.published);
    println!("  batches closed         {:>12}", stats.total.batches);
    println!(
        "  subscriber calls       {:>12}   (a per-event bus makes one per event per subscriber: {})",
        r.calls, r.delivered
    );
    println!("  dispatch reduction     {:>11.1}x", r.reduction());
    println!(
        "  health checks          {:>12}   answered {}/{}, latency p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        "",
        r.health_answered,
        r.health_sent,
        r.health_p50_us,
        r.health_p99_us,
        r.health_max_us
    );
    println!(
        "  log calls              {:>12}   (debug/info/warn/error/trace from 4 modules)",
        logged
    );
    println!(
        "  telemetry windows      {:>12}   (one gpu:batch + sys:batch per window; GPU: {})",
        windows.count.load(Ordering::Relaxed),
        gpu_status
    );
    println!("  dropped                {:>12}", stats.total.dropped);
    println!(
        "  elapsed                {:>11.2}s",
        r.elapsed.as_secs_f64()
    );
    let disk = segment_totals(&args.dir)?;
    println!(
        "  segment files          {:>12}   ({} records, {:.1} MB of JSON Lines in {:.2} MB of zstd: {:.1}x)",
        disk.files,
        disk.records,
        disk.raw_bytes as f64 / 1e6,
        disk.zst_bytes as f64 / 1e6,
        disk.raw_bytes as f64 / disk.zst_bytes.max(1) as f64
    );
    if disk.damaged > 0 {
        println!("  damaged frames         {:>12}", disk.damaged);
    }
    match indexed {
        Ok(()) => println!(
            "  indexed in SQLite      {:>12}   (index.db caught up {:.2}s after the flood)",
            "", index_secs
        ),
        Err(e) => println!("  indexed in SQLite      not caught up: {e}"),
    }
    println!("  data directory         {}", args.dir.display());
    let dir = args.dir.display();
    println!();
    println!("$ spillway query {dir} --level warn --limit 3");
    crate::query::run(&crate::query::QueryArgs {
        dir: args.dir.clone(),
        since: None,
        until: None,
        level: Some("warn".into()),
        prefix: None,
        grep: None,
        fields: Vec::new(),
        limit: 3,
        json: false,
    })?;
    let sql = "SELECT prefix, count(*) AS records FROM records GROUP BY prefix ORDER BY records DESC LIMIT 5";
    println!();
    println!("$ spillway sql {dir} \"{sql}\"");
    crate::sql::run(&crate::sql::SqlArgs {
        dir: args.dir.clone(),
        query: sql.into(),
        json: false,
    })?;
    println!();
    println!("Look at them:");
    println!("  spillway tail {dir} --level warn");
    println!("  spillway tail {dir} --prefix 'data:*' --json | head");
    println!("  spillway query {dir} --prefix 'log:myapp::*' --field table=users --limit 5");
    println!("  spillway stats {dir}");
    println!("  zstdcat {dir}/segments/logs/*.zst | head");
    println!(
        "  sqlite3 {dir}/index.db \"SELECT json_extract(fields, '$.row_id') FROM logs LIMIT 3\""
    );
    Ok(())
}

/// What the segment files hold, read back through the frame reader.
#[derive(Default)]
pub(crate) struct SegmentTotals {
    pub files: usize,
    pub records: u64,
    pub raw_bytes: u64,
    pub zst_bytes: u64,
    pub damaged: u64,
}

pub(crate) fn segment_totals(dir: &std::path::Path) -> anyhow::Result<SegmentTotals> {
    let mut t = SegmentTotals::default();
    for path in list_segments(dir)? {
        t.files += 1;
        t.zst_bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut reader = FrameReader::open(&path, 0)?;
        while let Some(frame) = reader.next_frame() {
            match frame {
                Ok(f) => {
                    t.records += f.lines.len() as u64;
                    t.raw_bytes += f.lines.iter().map(|l| l.len() as u64 + 1).sum::<u64>();
                }
                Err(_) => t.damaged += 1,
            }
        }
    }
    Ok(t)
}
