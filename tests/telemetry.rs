//! Telemetry end to end: a scripted fake GPU (and the real host source)
//! through the sampler thread, the engine, the `"stats"` reducer and the bus.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spillway::telemetry::{
    DeviceInfo, DeviceState, FakeDevice, FakeFrame, FakeGpu, GpuError, GpuSource, GpuStatus,
    HostSource, Metric, Readings, Telemetry, TelemetryConfig, NVML_LIBRARY,
};
use spillway::{
    BatchAwareSubscriber, BatchConfig, BatchingBus, BusEvent, Engine, Guard, MessageBus, Policy,
    RecordKind, Sink,
};

const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Collect(Mutex<Vec<BusEvent>>);

impl BatchAwareSubscriber for Collect {
    fn on_event(&self, e: &BusEvent) {
        self.0.lock().unwrap().push(e.clone());
    }
}

impl Collect {
    fn named(&self, name: &str) -> Vec<Value> {
        let events = self.0.lock().unwrap();
        events
            .iter()
            .filter(|e| e.name == name)
            .map(|e| (*e.payload).clone())
            .collect()
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An engine whose `gpu:*` and `sys:*` windows close on `count` samples
/// (or after a minute), so window contents do not depend on timing.
fn engine_by_count(count: usize) -> (Engine, Guard, Arc<Collect>) {
    let summarized = || {
        Policy::batch(Duration::from_secs(60), count)
            .summarize("stats")
            .prefix_depth(1)
    };
    let config = BatchConfig::builder()
        .policy("gpu:*", summarized())
        .policy("sys:*", summarized())
        .build()
        .expect("config");
    let (engine, guard) = Engine::builder(config).build().expect("engine");
    let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
    let got = Arc::new(Collect::default());
    bus.subscribe("gpu:*", got.clone()).expect("subscribe gpu");
    bus.subscribe("sys:*", got.clone()).expect("subscribe sys");
    (engine, guard, got)
}

fn fast() -> TelemetryConfig {
    TelemetryConfig {
        interval_ms: 5,
        slow_interval_ms: 60_000,
        retry_initial_ms: 1,
        retry_max_ms: 4,
        ..TelemetryConfig::default()
    }
}

fn stats(min: f64, max: f64, mean: f64, last: Value) -> Value {
    json!({"min": min, "max": max, "mean": mean, "last": last})
}

// Catches wrong reducer numbers (min/max/mean/last per metric per device),
// samples of one device leaking into another's entry, an unsupported metric
// showing up (or being asked again), and raw samples reaching the bus.
#[test]
fn window_summary_numbers_from_a_scripted_fake() {
    let frame = |util: f64, mem: f64, temp: f64| {
        FakeFrame::ok([
            (Metric::GpuUtilization, util),
            (Metric::MemoryUsed, mem),
            (Metric::Temperature, temp),
            (Metric::FanSpeed, 40.0),
        ])
    };
    let fake = FakeGpu::new()
        .device(FakeDevice::new(0, "Fake A").frames([
            frame(10.0, 1e9, 50.0),
            frame(20.0, 2e9, 52.0).throttle(["sw_power_cap"]),
            frame(30.0, 3e9, 51.0).throttle(["gpu_idle"]),
            frame(40.0, 4e9, 49.0),
        ]))
        .device(
            FakeDevice::new(1, "Fake B")
                .unsupported(Metric::FanSpeed)
                .frames([
                    frame(50.0, 5e9, 60.0),
                    frame(60.0, 6e9, 61.0),
                    frame(70.0, 7e9, 62.0),
                    frame(80.0, 8e9, 63.0),
                ]),
        );
    // 2 devices x 4 ticks = one window of 8 samples.
    let (engine, _guard, got) = engine_by_count(8);
    let telemetry =
        Telemetry::start_with(&engine, fast(), Some(Box::new(fake.clone())), None).expect("start");
    wait_until("two gpu:batch windows", || {
        got.named("gpu:batch").len() >= 2
    });
    drop(telemetry);

    let first = &got.named("gpu:batch")[0];
    assert_eq!(first["count"], 8);
    let s = &first["summary"];
    assert_eq!(s["samples"], 8);
    assert_eq!(s["status"], "ok");
    assert!(s["window_start"].as_str().is_some() && s["window_end"].as_str().is_some());
    let a = &s["devices"][0];
    let b = &s["devices"][1];
    assert_eq!(
        (a["index"].clone(), b["index"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(a["name"], "Fake A");
    assert_eq!(a["uuid"], "GPU-fake-0000");
    assert_eq!(a["memory_total_bytes"], 80u64 << 30);
    assert_eq!(a["power_limit_watts"], 700.0);
    assert_eq!(a["status"], "ok");
    assert_eq!(a["samples"], 4);
    assert_eq!(
        a["utilization_gpu_percent"],
        stats(10.0, 40.0, 25.0, json!(40))
    );
    assert_eq!(
        a["memory_used_bytes"],
        stats(1e9, 4e9, 2.5e9, json!(4_000_000_000u64))
    );
    assert_eq!(a["temperature_celsius"], stats(49.0, 52.0, 50.5, json!(49)));
    assert_eq!(a["fan_speed_percent"], stats(40.0, 40.0, 40.0, json!(40)));
    // One of four samples had a real throttle reason (gpu_idle is benign).
    assert_eq!(a["throttled_percent"], stats(0.0, 100.0, 25.0, json!(0)));
    assert_eq!(a["throttle_reasons"], json!([]));
    assert_eq!(
        b["utilization_gpu_percent"],
        stats(50.0, 80.0, 65.0, json!(80))
    );
    assert!(b.get("fan_speed_percent").is_none(), "unsupported: {b}");
    assert!(
        a.get("power_avg_watts").is_none(),
        "no energy scripted: {a}"
    );
    assert_eq!(
        fake.asked(1, Metric::FanSpeed),
        1,
        "asked once, then left out"
    );
    assert!(fake.asked(1, Metric::GpuUtilization) >= 8);

    let raw = got
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.name != "gpu:batch")
        .count();
    assert_eq!(raw, 0, "the bus must see windows, never samples");
}

// Catches a lost device not being reported (or stopping the others), and a
// device that answers again staying marked lost.
#[test]
fn device_status_goes_available_lost_available() {
    let ok = FakeFrame::ok([(Metric::GpuUtilization, 7.0)]);
    let fake = FakeGpu::new()
        .device(FakeDevice::new(0, "Flaky").frames([
            ok.clone(),
            ok.clone(),
            FakeFrame::lost("fell off the bus"),
            FakeFrame::lost("fell off the bus"),
            ok.clone(),
        ]))
        .device(FakeDevice::new(1, "Steady").frames([ok]));
    // One tick per window.
    let (engine, _guard, got) = engine_by_count(2);
    let telemetry =
        Telemetry::start_with(&engine, fast(), Some(Box::new(fake.clone())), None).expect("start");
    let flaky_states = || -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for w in got.named("gpu:batch") {
            let st = w["summary"]["devices"][0]["status"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if seen.last() != Some(&st) {
                seen.push(st);
            }
        }
        seen
    };
    wait_until("recovery", || flaky_states().len() >= 3);
    let windows = got.named("gpu:batch");
    assert_eq!(flaky_states()[..3], ["ok", "lost: fell off the bus", "ok"]);
    for w in &windows {
        let devices = &w["summary"]["devices"];
        if devices[0]["status"] != "ok" {
            assert!(devices[0].get("utilization_gpu_percent").is_none());
        }
        assert_eq!(devices[1]["status"], "ok", "the other device goes on");
        assert_eq!(devices[1]["utilization_gpu_percent"]["last"], 7);
    }
    wait_until("handle reports recovery", || {
        telemetry
            .devices()
            .iter()
            .all(|d| d.state == DeviceState::Ok)
    });
    assert_eq!(telemetry.status(), GpuStatus::Ok);
}

// Catches a failed initialisation not being retried, the reason missing from
// the summaries, and a library failure mid-run not leading to re-init.
#[test]
fn gpu_status_goes_unavailable_ok_unavailable_ok() {
    let ok = FakeFrame::ok([(Metric::GpuUtilization, 1.0)]);
    let fake = FakeGpu::new()
        .fail_init(["NVML library not found", "NVML library not found"])
        .device(FakeDevice::new(0, "G").frames([
            ok.clone(),
            FakeFrame::unavailable("driver unloaded"),
            ok,
        ]));
    let (engine, _guard, got) = engine_by_count(1);
    let telemetry =
        Telemetry::start_with(&engine, fast(), Some(Box::new(fake.clone())), None).expect("start");
    let statuses = || -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for w in got.named("gpu:batch") {
            let st = w["summary"]["status"].as_str().unwrap_or("").to_string();
            if seen.last() != Some(&st) {
                seen.push(st);
            }
        }
        seen
    };
    wait_until("four status episodes", || statuses().len() >= 4);
    assert_eq!(
        statuses()[..4],
        [
            "unavailable: NVML library not found",
            "ok",
            "unavailable: driver unloaded",
            "ok"
        ]
    );
    let first = &got.named("gpu:batch")[0]["summary"];
    assert_eq!(first["devices"], json!([]), "{first}");
    assert!(fake.init_calls() >= 4, "3 failed or dropped inits + 1");
    assert_eq!(telemetry.status(), GpuStatus::Ok);
}

// Catches the real (NVML) path panicking, hanging, or hiding why it cannot
// run: without libnvidia-ml the status must name the missing library, in the
// handle and in every gpu:batch summary, while host telemetry goes on.
#[test]
fn real_nvml_path_without_library_reports_why() {
    let (engine, _guard, got) = engine_by_count(2);
    let config = TelemetryConfig {
        interval_ms: 5,
        ..TelemetryConfig::default()
    };
    let telemetry = Telemetry::start(&engine, config).expect("start");
    wait_until("a gpu and a sys window", || {
        !got.named("gpu:batch").is_empty() && !got.named("sys:batch").is_empty()
    });
    let status = telemetry.status();
    if spillway::telemetry::nvml_library_present() {
        eprintln!("NVML is installed here; status: {status}");
        return;
    }
    let GpuStatus::Unavailable(reason) = &status else {
        panic!("expected unavailable, got {status}");
    };
    assert!(
        reason.contains("NVML library not found") && reason.contains(NVML_LIBRARY),
        "{reason}"
    );
    let s = &got.named("gpu:batch")[0]["summary"];
    assert_eq!(s["status"], format!("unavailable: {reason}"));
    assert_eq!(s["devices"], json!([]));
    let host = &got.named("sys:batch")[0]["summary"]["hosts"][0];
    assert_eq!(host["status"], "ok");
    assert!(
        host["memory_used_bytes"]["max"].as_f64().unwrap_or(0.0) > 0.0,
        "{host}"
    );
    assert!(host["process_rss_bytes"]["last"].as_f64().unwrap_or(0.0) > 0.0);
}

struct Batches(mpsc::Sender<(String, RecordKind, usize, Option<Value>)>);

impl Sink for Batches {
    fn write_batch(&mut self, b: &spillway::Batch) -> spillway::Result<()> {
        let summary = b.summary.as_ref().map(|s| (**s).clone());
        let _ = self
            .0
            .send((b.prefix.to_string(), b.kind, b.records.len(), summary));
        Ok(())
    }
    fn flush(&mut self) -> spillway::Result<()> {
        Ok(())
    }
}

// Catches summarized windows not reaching the sinks (so never persisted), or
// reaching them without their samples or their summary.
#[test]
fn windows_are_persisted_with_samples_and_summary() {
    let (tx, rx) = mpsc::channel();
    let summarized = Policy::batch(Duration::from_secs(60), 3)
        .summarize("stats")
        .prefix_depth(1);
    let config = BatchConfig::builder()
        .policy("sys:*", summarized)
        .build()
        .expect("config");
    let (engine, _guard) = Engine::builder(config)
        .sink(Box::new(Batches(tx)))
        .build()
        .expect("engine");
    let mut telemetry =
        Telemetry::start_with(&engine, fast(), None, Some(HostSource::new())).expect("start");
    assert_eq!(telemetry.status(), GpuStatus::Disabled);
    let (prefix, kind, n, summary) = rx.recv_timeout(DEADLINE).expect("a persisted window");
    assert!(telemetry.stop(DEADLINE));
    assert_eq!((prefix.as_str(), kind, n), ("sys", RecordKind::Sample, 3));
    let summary = summary.expect("summary travels with the batch");
    assert_eq!(summary["hosts"][0]["samples"], 3);
}

/// A source whose sampling blocks until released (saying when it is stuck),
/// or panics.
struct Misbehaving {
    block: Option<(mpsc::Receiver<()>, mpsc::Sender<()>)>,
}

impl GpuSource for Misbehaving {
    fn name(&self) -> &str {
        "misbehaving"
    }
    fn init(&mut self) -> Result<Vec<DeviceInfo>, GpuError> {
        Ok(vec![DeviceInfo {
            index: 0,
            name: "M".into(),
            uuid: "GPU-m".into(),
            memory_total_bytes: None,
            power_limit_watts: None,
        }])
    }
    fn sample(&mut self, _: &DeviceInfo, _: &[Metric]) -> Result<Readings, GpuError> {
        match &self.block {
            Some((release, entered)) => {
                let _ = entered.send(());
                let _ = release.recv();
                Ok(Vec::new())
            }
            None => panic!("a source bug"),
        }
    }
}

// Catches stopping the telemetry hanging on a source stuck in a driver call.
#[test]
fn stop_does_not_hang_on_a_stuck_source() {
    let (engine, _guard, _got) = engine_by_count(10);
    let (release, rx) = mpsc::channel();
    let (entered_tx, entered) = mpsc::channel();
    let source = Misbehaving {
        block: Some((rx, entered_tx)),
    };
    let mut telemetry =
        Telemetry::start_with(&engine, fast(), Some(Box::new(source)), None).expect("start");
    entered
        .recv_timeout(DEADLINE)
        .expect("the sampler reaches the source");
    assert!(
        !telemetry.stop(Duration::from_millis(50)),
        "a stuck thread is left behind"
    );
    assert!(telemetry.stop(Duration::from_millis(50)), "idempotent");
    drop(release);
}

// Catches a panicking source taking the sampler (or the process) down: it
// becomes an unavailable status, retried like any other failure.
#[test]
fn panicking_source_is_reported_not_fatal() {
    let (engine, _guard, got) = engine_by_count(1);
    let telemetry = Telemetry::start_with(
        &engine,
        fast(),
        Some(Box::new(Misbehaving { block: None })),
        None,
    )
    .expect("start");
    wait_until("an unavailable window", || {
        got.named("gpu:batch")
            .iter()
            .any(|w| w["summary"]["status"] == "unavailable: the GPU source panicked")
    });
    assert_eq!(
        telemetry.status(),
        GpuStatus::Unavailable("the GPU source panicked".into())
    );
}

/// CPU time (user + system) of this process's thread named like `prefix`,
/// from /proc, in clock ticks of 10 ms.
fn thread_cpu_ticks(prefix: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with(prefix) {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            return Some(utime + stime);
        }
    }
    None
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// Figure, not a check: the sampler's cost at the default rate (250 ms) with
// a 2-device fake GPU and the real sysinfo host source.
// cargo test --release --test integration figure_sampler_cost -- --ignored --nocapture
// (SPILLWAY_FIGURE_SECS, default 30; SPILLWAY_FIGURE_GPUS, default 2)
#[test]
#[ignore]
fn figure_sampler_cost() {
    let secs = env_u64("SPILLWAY_FIGURE_SECS", 30);
    let gpus = env_u64("SPILLWAY_FIGURE_GPUS", 2) as u32;
    let (engine, _guard) = Engine::builder(BatchConfig::default())
        .build()
        .expect("engine");
    let telemetry = Telemetry::start_with(
        &engine,
        TelemetryConfig::default(),
        Some(Box::new(FakeGpu::demo(gpus))),
        Some(HostSource::new()),
    )
    .expect("start");
    std::thread::sleep(Duration::from_millis(50));
    let cpu0 = thread_cpu_ticks("spillway-tele");
    std::thread::sleep(Duration::from_secs(secs));
    let cpu1 = thread_cpu_ticks("spillway-tele");
    let c = telemetry.cost();
    println!(
        "sampler ({gpus} fake GPUs + real host, 250 ms, {secs} s): {} ticks, {} samples, \
         {:?} per tick, {:?} per sample, busy {:.4}% of one core (GPU init {:?})",
        c.ticks,
        c.samples,
        c.per_tick(),
        c.per_sample(),
        100.0 * c.cpu_share(),
        c.init
    );
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        println!(
            "sampler thread CPU time from /proc: {} ms over {secs} s = {:.4}% of one core",
            (b - a) * 10,
            100.0 * ((b - a) as f64 * 0.01) / secs as f64
        );
    }
}

// Figure, not a check: bus events per minute from telemetry, windows vs
// samples. Runs the default shape (4 ticks per window) sped up, counts the
// deliveries on the bus, and scales to the default 250 ms / 1000 ms cadence.
// cargo test --release --test integration figure_bus_events -- --ignored --nocapture
// (SPILLWAY_FIGURE_SECS, default 6; SPILLWAY_FIGURE_INTERVAL_MS, default 25;
//  SPILLWAY_FIGURE_GPUS, default 2)
#[test]
#[ignore]
fn figure_bus_events_per_minute() {
    let secs = env_u64("SPILLWAY_FIGURE_SECS", 6);
    let interval = env_u64("SPILLWAY_FIGURE_INTERVAL_MS", 25);
    let gpus = env_u64("SPILLWAY_FIGURE_GPUS", 2) as u32;
    let window = 4 * interval;
    let summarized = || {
        Policy::batch(Duration::from_millis(window), 50)
            .summarize("stats")
            .prefix_depth(1)
    };
    let config = BatchConfig::builder()
        .policy("gpu:*", summarized())
        .policy("sys:*", summarized())
        .build()
        .expect("config");
    let (engine, _guard) = Engine::builder(config).build().expect("engine");
    let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
    let got = Arc::new(Collect::default());
    bus.subscribe("gpu:*", got.clone()).expect("subscribe");
    bus.subscribe("sys:*", got.clone()).expect("subscribe");
    let mut telemetry = Telemetry::start_with(
        &engine,
        TelemetryConfig {
            interval_ms: interval,
            ..TelemetryConfig::default()
        },
        Some(Box::new(FakeGpu::demo(gpus))),
        Some(HostSource::new()),
    )
    .expect("start");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    telemetry.stop(DEADLINE);
    engine.flush().expect("flush");
    let run = t0.elapsed().as_secs_f64();
    let samples = telemetry.samples() as f64;
    let events = got.0.lock().unwrap();
    let windows = events.iter().filter(|e| e.name.ends_with(":batch")).count() as f64;
    let raw = events.len() as f64 - windows;
    // Scale the sped-up run to the default cadence (250 ms ticks, 1 s windows).
    let speedup = 250.0 / interval as f64;
    println!(
        "{gpus} fake GPUs + host, {interval} ms ticks, {window} ms windows, {run:.1} s: \
         {samples} samples published, {windows} gpu:batch/sys:batch events delivered, \
         {raw} raw samples delivered"
    );
    println!(
        "at the defaults: {:.0} bus events/min from telemetry (one per window per prefix) \
         vs {:.0}/min if every sample were an event ({:.1}x fewer)",
        windows / run * 60.0 / speedup,
        samples / run * 60.0 / speedup,
        samples / windows.max(1.0)
    );
}
