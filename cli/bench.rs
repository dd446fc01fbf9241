//! `spillway bench`: spillway beside its peers, measured in the same run.
//! Absolute figures depend on the machine; the ratios are the result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use spillway::{BatchConfig, BatchingBus, BusEvent, Engine, MessageBus};

use crate::flood::{self, FloodBus, FloodSpec, PeerBus, Worker};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A smaller run that finishes in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Run only the scenario groups whose name contains this text
    /// (groups: bus-publish, bus-flood, logs, index, telemetry).
    #[arg(long)]
    pub only: Option<String>,
    /// Internal: the child process of the peak-RSS scenario.
    #[arg(long, hide = true, value_name = "EVENTS")]
    pub rss_burst_child: Option<u64>,
}

impl BenchArgs {
    fn wants(&self, group: &str) -> bool {
        self.only.as_deref().is_none_or(|o| group.contains(o))
    }
}

/// One line of the results table.
struct Row {
    scenario: String,
    spillway: String,
    peer: String,
    ratio: String,
    target: &'static str,
}

fn row(scenario: impl Into<String>, s: String, p: String, ratio: f64, target: &'static str) -> Row {
    Row {
        scenario: scenario.into(),
        spillway: s,
        peer: p,
        ratio: format!("{ratio:.3}"),
        target,
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(events) = args.rss_burst_child {
        return crate::bench_logs::rss_burst_child(events);
    }
    let n: u64 = if args.quick { 500_000 } else { 2_000_000 };
    let mut rows = Vec::new();
    if args.wants("bus-publish") {
        eprintln!("bench: bus caller cost and throughput ({n} events)...");
        bus_publish(n, &mut rows);
    }
    if args.wants("bus-flood") {
        eprintln!("bench: start-up flood, spillway and the per-event bus...");
        bus_flood(args.quick, &mut rows)?;
    }
    if args.wants("logs") {
        let (events, burst) = if args.quick {
            (500_000, 2_000_000)
        } else {
            (2_000_000, 10_000_000)
        };
        eprintln!("bench: tracing layer and segments beside JSON fmt + non_blocking ({events} events, burst {burst})...");
        logs(events, burst, &mut rows)?;
    }
    if args.wants("index") {
        eprintln!("bench: SQLite indexing beside raw rusqlite inserts, and query latency...");
        for (what, ours, peer) in spillway::sinks::index::bench::run(args.quick)? {
            rows.push(row(what, fmt_num(ours), fmt_num(peer), ours / peer, ""));
        }
    }
    if args.wants("telemetry") {
        let secs = if args.quick { 5 } else { 30 };
        eprintln!("bench: telemetry sampler for {secs} s at the default rate...");
        telemetry(Duration::from_secs(secs), &mut rows)?;
    }
    println!(
        "allocator: {} (the peer runs in the same process, on the same allocator)",
        if cfg!(feature = "jemalloc") {
            "jemalloc"
        } else {
            "system (glibc malloc)"
        }
    );
    print_table(&rows);
    Ok(())
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

/// The sampler at its defaults (a scripted GPU, as this machine has none,
/// and the real host source): its cost, and the bus events it causes.
fn telemetry(run_for: Duration, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use spillway::telemetry::{FakeGpu, HostSource, Telemetry, TelemetryConfig};
    let (engine, guard) = Engine::builder(BatchConfig::default()).build()?;
    let inner = Arc::new(MessageBus::new());
    let windows = Worker::new(Duration::ZERO);
    inner.subscribe("gpu:batch", windows.clone())?;
    inner.subscribe("sys:batch", windows.clone())?;
    let _bus = BatchingBus::new(&engine, inner);
    let mut t = Telemetry::start_with(
        &engine,
        TelemetryConfig::default(),
        Some(Box::new(FakeGpu::demo(1))),
        Some(HostSource::new()),
    )?;
    std::thread::sleep(run_for);
    t.stop(Duration::from_secs(2));
    engine.flush()?;
    drop(guard);
    let cost = t.cost();
    let minutes = cost.elapsed.as_secs_f64() / 60.0;
    let events = windows.events.load(std::sync::atomic::Ordering::Relaxed) as f64;
    rows.push(row(
        "sampler cost per sample (fake GPU + real host), us",
        format!("{:.1}", cost.per_sample().as_secs_f64() * 1e6),
        "-".into(),
        f64::NAN,
        "",
    ));
    rows.push(row(
        "sampler CPU share of one core at 250 ms, %",
        format!("{:.3}", cost.cpu_share() * 100.0),
        "-".into(),
        f64::NAN,
        "< 1 %",
    ));
    rows.push(row(
        "telemetry bus events per minute (peer: one per sample)",
        format!("{:.0}", events / minutes),
        format!("{:.0}", cost.samples as f64 / minutes),
        events / cost.samples.max(1) as f64,
        "one per window",
    ));
    Ok(())
}

fn logs(events: u64, burst: u64, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let f = crate::bench_logs::run(events, burst)?;
    rows.push(row(
        "info! caller cost (wall), ns/event",
        format!("{:.0}", f.ours.caller_ns),
        format!("{:.0}", f.peer.caller_ns),
        f.ours.caller_ns / f.peer.caller_ns,
        "ratio <= 0.15",
    ));
    rows.push(row(
        "info! caller cost (thread CPU), ns/event",
        format!("{:.0}", f.ours.caller_cpu_ns),
        format!("{:.0}", f.peer.caller_cpu_ns),
        f.ours.caller_cpu_ns / f.peer.caller_cpu_ns,
        "",
    ));
    rows.push(row(
        "end to end into zstd segments vs plain file, k records/s",
        format!("{:.0}", f.ours_segments.end_to_end_per_s / 1e3),
        format!("{:.0}", f.peer.end_to_end_per_s / 1e3),
        f.ours_segments.end_to_end_per_s / f.peer.end_to_end_per_s,
        ">= 4x",
    ));
    rows.push(row(
        "records dropped in the log scenarios",
        f.dropped.to_string(),
        "0".into(),
        f64::NAN,
        "counted",
    ));
    rows.push(row(
        "compression ratio, demo log mix",
        format!("{:.1}x", f.compression),
        "1x (plain)".into(),
        f.compression,
        ">= 8x",
    ));
    match f.rss {
        Some((mib, dropped, written)) => rows.push(row(
            format!("peak RSS above baseline, {burst} events into segments, MiB"),
            format!("{mib:.1} ({written} written, {dropped} dropped)"),
            "-".into(),
            f64::NAN,
            "<= 64 MiB",
        )),
        None => eprintln!("bench: the peak-RSS child did not report"),
    }
    Ok(())
}

/// Rounds per contestant in the publish scenarios; the best counts (the
/// others were slowed by whatever else the 2-core machine was doing).
const PUBLISH_ROUNDS: usize = 3;

fn best_of(rounds: impl Iterator<Item = PublishResult>) -> PublishResult {
    rounds.fold(
        PublishResult {
            caller_ns: f64::INFINITY,
            caller_cpu_ns: f64::INFINITY,
            events_per_s: 0.0,
        },
        |b, r| PublishResult {
            caller_ns: b.caller_ns.min(r.caller_ns),
            caller_cpu_ns: b.caller_cpu_ns.min(r.caller_cpu_ns),
            events_per_s: b.events_per_s.max(r.events_per_s),
        },
    )
}

fn bus_publish(n: u64, rows: &mut Vec<Row>) {
    for threads in [1, 2] {
        let (mut ours, mut peers) = (Vec::new(), Vec::new());
        for _ in 0..PUBLISH_ROUNDS {
            ours.push(spillway_publish(n, threads));
            peers.push(peer_publish(n, threads));
        }
        let s = best_of(ours.into_iter());
        let p = best_of(peers.into_iter());
        rows.push(row(
            format!(
                "publish caller cost, {threads} thread(s), ns/event (best of {PUBLISH_ROUNDS})"
            ),
            format!("{:.0}", s.caller_ns),
            format!("{:.0}", p.caller_ns),
            s.caller_ns / p.caller_ns,
            if threads == 1 { "<= 150 ns" } else { "" },
        ));
        rows.push(row(
            "  the same, caller thread CPU time, ns/event",
            format!("{:.0}", s.caller_cpu_ns),
            format!("{:.0}", p.caller_cpu_ns),
            s.caller_cpu_ns / p.caller_cpu_ns,
            "",
        ));
        if threads == 1 {
            rows.push(row(
                "throughput to a counting subscriber, M events/s",
                format!("{:.2}", s.events_per_s / 1e6),
                format!("{:.2}", p.events_per_s / 1e6),
                s.events_per_s / p.events_per_s,
                ">= 5 M/s",
            ));
        }
    }
}

fn bus_flood(quick: bool, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let spec = FloodSpec {
        files: if quick { 60_000 } else { 150_000 },
        rows: if quick { 20_000 } else { 50_000 },
        min_duration: Duration::from_secs(if quick { 1 } else { 3 }),
    };
    let (engine, guard) = Engine::builder(BatchConfig::default()).build()?;
    let sbus: Arc<dyn FloodBus> = Arc::new(BatchingBus::new(&engine, Arc::new(MessageBus::new())));
    let s = flood::run(sbus, &spec);
    drop(guard);
    let peer = Arc::new(PeerBus::new());
    let p = flood::run(peer.clone(), &spec);
    peer.close();
    rows.push(row(
        "subscriber dispatches under the flood (default data:* policy)",
        s.dispatches.to_string(),
        p.dispatches.to_string(),
        p.dispatches as f64 / s.dispatches.max(1) as f64,
        ">= 100x fewer (ratio = peer/spillway)",
    ));
    rows.push(row(
        "  of which matching-callback calls",
        s.calls.to_string(),
        p.calls.to_string(),
        p.calls as f64 / s.calls.max(1) as f64,
        "(peer/spillway)",
    ));
    rows.push(row(
        "events dropped under the flood (spillway: counted; peer: lagged)",
        s.lost.to_string(),
        p.lost.to_string(),
        f64::NAN,
        "none silently",
    ));
    rows.push(row(
        "health-check latency p99 under the flood, us",
        format!("{:.0}", s.health_p99_us),
        format!("{:.0}", p.health_p99_us),
        s.health_p99_us / p.health_p99_us,
        "<= 1000 us",
    ));
    rows.push(row(
        "health-check latency max under the flood, us",
        format!("{:.0}", s.health_max_us),
        format!("{:.0}", p.health_max_us),
        s.health_max_us / p.health_max_us,
        "",
    ));
    Ok(())
}

fn print_table(rows: &[Row]) {
    let head = ["scenario", "spillway", "peer", "ratio", "target"];
    let cols: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| vec![&*r.scenario, &*r.spillway, &*r.peer, &*r.ratio, r.target])
        .collect();
    let width: Vec<usize> = (0..head.len())
        .map(|i| {
            cols.iter()
                .map(|c| c[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(&head);
    let sep: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", sep.join("-|-"));
    for c in &cols {
        line(c);
    }
}

struct PublishResult {
    /// Caller wall time per event.
    caller_ns: f64,
    /// Caller thread CPU time per event (not inflated when the OS runs
    /// another thread on the caller's core).
    caller_cpu_ns: f64,
    events_per_s: f64,
}

/// Runs `publish(i)` for `per` values of `i` on each of `threads` threads;
/// returns the mean wall and CPU time per event per thread.
fn timed_publishers(
    threads: u64,
    per: u64,
    name: &str,
    publish: impl Fn(u64) + Clone + Send + 'static,
) -> (f64, f64) {
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let publish = publish.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let (t, cpu) = (Instant::now(), crate::bench_logs::thread_cpu_ns());
                    for i in 0..per {
                        publish(i);
                    }
                    let cpu = cpu
                        .zip(crate::bench_logs::thread_cpu_ns())
                        .map_or(f64::NAN, |(a, b)| b.saturating_sub(a) as f64);
                    (t.elapsed().as_nanos() as f64, cpu)
                })
        })
        .collect();
    let times: Vec<(f64, f64)> = handles
        .into_iter()
        .filter_map(|h| h.ok()?.join().ok())
        .collect();
    let k = times.len().max(1) as f64 * per as f64;
    (
        times.iter().map(|t| t.0).sum::<f64>() / k,
        times.iter().map(|t| t.1).sum::<f64>() / k,
    )
}

/// Times `n` publishes on a batched prefix split over `threads` threads.
/// Caller cost is per event, per thread; throughput is to the last delivery.
fn spillway_publish(n: u64, threads: u64) -> PublishResult {
    let config = BatchConfig::builder()
        .policy(
            "bench:*",
            spillway::Policy::batch(Duration::from_millis(50), 1000),
        )
        .build()
        .expect("static bench config");
    let Ok((engine, guard)) = Engine::builder(config).build() else {
        return PublishResult {
            caller_ns: f64::NAN,
            caller_cpu_ns: f64::NAN,
            events_per_s: f64::NAN,
        };
    };
    let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
    let counter = Worker::new(Duration::ZERO);
    let _ = bus.subscribe("bench:*", counter.clone());
    let start = Instant::now();
    let b = bus.clone();
    let (caller_ns, caller_cpu_ns) =
        timed_publishers(threads, n / threads, "pub-spillway", move |i| {
            let _ = b.publish("bench:users:created", Value::from(i));
        });
    let _ = bus.flush();
    let total = start.elapsed();
    drop(guard);
    let delivered = counter.events.load(std::sync::atomic::Ordering::Relaxed);
    PublishResult {
        caller_ns,
        caller_cpu_ns,
        events_per_s: delivered as f64 / total.as_secs_f64(),
    }
}

/// The same through the per-event bus: one broadcast send per event.
fn peer_publish(n: u64, threads: u64) -> PublishResult {
    let peer = Arc::new(PeerBus::new());
    let counter = Worker::new(Duration::ZERO);
    peer.subscribe("bench:*", counter.clone());
    let start = Instant::now();
    let p = peer.clone();
    let (caller_ns, caller_cpu_ns) = timed_publishers(threads, n / threads, "pub-peer", move |i| {
        p.send(BusEvent::new("bench:users:created", Value::from(i)));
    });
    peer.settle();
    let total = start.elapsed();
    peer.close();
    let delivered = counter.events.load(std::sync::atomic::Ordering::Relaxed);
    PublishResult {
        caller_ns,
        caller_cpu_ns,
        events_per_s: delivered as f64 / total.as_secs_f64(),
    }
}
