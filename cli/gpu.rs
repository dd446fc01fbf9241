//! `spillway gpu`: live GPU and host telemetry, one line per summary window.
//!
//! Builds its own engine (no sinks: nothing is written), starts the
//! telemetry sampler (NVML + sysinfo) and prints each `gpu:batch` /
//! `sys:batch` pair as it is republished on the bus:
//!
//! ```text
//! 12:00:01 gpu0 NVIDIA H200 util 97% mem 120.3 GiB/140.4 GiB 61°C 652 W | host mem 41.2 GiB/125.6 GiB cpu 8% rss 12.5 MiB
//! 12:00:01 gpu unavailable: NVML library not found (libnvidia-ml.so.1): ... | host mem 3.1 GiB/7.7 GiB cpu 4% rss 9.8 MiB
//! ```
//!
//! Utilization and power are the window's mean, memory the last reading,
//! temperature the maximum. `--json` prints `{"gpu": <gpu:batch payload>,
//! "sys": <sys:batch payload>, "sampler": {...}}` per window instead.
//! `--once` prints the first window and exits 0, also when no GPU can be
//! read (the status says why).

use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use spillway::telemetry::{SamplerCost, Telemetry, TelemetryConfig, DEFAULT_SLOW_INTERVAL};
use spillway::{
    BatchAwareSubscriber, BatchConfig, BatchingBus, BusEvent, Engine, MessageBus, Policy,
};

/// Arguments of `spillway gpu`.
#[derive(clap::Args, Debug)]
pub struct GpuArgs {
    /// Print one summary (the first window) and exit; exits 0 also when the
    /// GPU is unavailable, saying why.
    #[arg(long)]
    pub once: bool,
    /// Print each window as one JSON object per line:
    /// {"gpu": <gpu:batch payload>, "sys": <sys:batch payload>, "sampler": {...}}.
    #[arg(long)]
    pub json: bool,
    /// Milliseconds between two samples.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    pub interval_ms: u64,
    /// Milliseconds per summary window.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub window_ms: u64,
}

struct Forward(mpsc::Sender<BusEvent>);

impl BatchAwareSubscriber for Forward {
    fn on_event(&self, e: &BusEvent) {
        let _ = self.0.send(e.clone());
    }
}

/// Runs `spillway gpu`.
pub fn run(args: &GpuArgs) -> Result<()> {
    if args.interval_ms == 0 {
        bail!("--interval-ms must be at least 1");
    }
    if args.window_ms < args.interval_ms {
        bail!(
            "--window-ms ({}) must be at least --interval-ms ({})",
            args.window_ms,
            args.interval_ms
        );
    }
    let window = Duration::from_millis(args.window_ms);
    // Windows close on time only: a count limit would split a tick's devices.
    let summarized = || {
        Policy::batch(window, 1_000_000)
            .summarize("stats")
            .prefix_depth(1)
            .persist(false)
    };
    let config = BatchConfig::builder()
        .policy("gpu:*", summarized())
        .policy("sys:*", summarized())
        .build()
        .context("building the telemetry windows")?;
    let (engine, _guard) = Engine::builder(config)
        .build()
        .context("starting the engine")?;
    let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
    let (tx, rx) = mpsc::channel();
    let forward = Arc::new(Forward(tx));
    bus.subscribe("gpu:batch", forward.clone())?;
    bus.subscribe("sys:batch", forward)?;
    let telemetry = Telemetry::start(
        &engine,
        TelemetryConfig {
            interval_ms: args.interval_ms,
            slow_interval_ms: args
                .interval_ms
                .max(DEFAULT_SLOW_INTERVAL.as_millis() as u64),
            ..TelemetryConfig::default()
        },
    )
    .context("starting telemetry")?;

    let timeout = window + Duration::from_secs(10);
    let (mut gpu, mut sys): (Option<Value>, Option<Value>) = (None, None);
    loop {
        let Ok(ev) = rx.recv_timeout(timeout) else {
            bail!(
                "no telemetry summary within {timeout:?} (GPU status: {})",
                telemetry.status()
            );
        };
        let is_gpu = ev.name == "gpu:batch";
        // One side skipped a window: print what we have rather than pair across windows.
        if (is_gpu && gpu.is_some()) || (!is_gpu && sys.is_some()) {
            print_window(args, gpu.take(), sys.take(), &telemetry.cost())?;
            if args.once {
                return Ok(());
            }
        }
        let payload = (*ev.payload).clone();
        if is_gpu {
            gpu = Some(payload);
        } else {
            sys = Some(payload);
        }
        if gpu.is_some() && sys.is_some() {
            print_window(args, gpu.take(), sys.take(), &telemetry.cost())?;
            if args.once {
                return Ok(());
            }
        }
    }
}

fn sampler_json(c: &SamplerCost) -> Value {
    json!({
        "ticks": c.ticks,
        "samples": c.samples,
        "per_tick_us": c.per_tick().as_secs_f64() * 1e6,
        "per_sample_us": c.per_sample().as_secs_f64() * 1e6,
        "cpu_percent": 100.0 * c.cpu_share(),
        "init_ms": c.init.as_secs_f64() * 1e3,
    })
}

fn print_window(
    args: &GpuArgs,
    gpu: Option<Value>,
    sys: Option<Value>,
    cost: &SamplerCost,
) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = json!({"gpu": gpu, "sys": sys, "sampler": sampler_json(cost)});
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{}", line(gpu.as_ref(), sys.as_ref()))?;
        if args.once {
            writeln!(
                out,
                "sampler: {} ticks, {} samples, {:.0} µs per tick, {:.3}% of one core \
                 (+ {:.1} ms GPU library initialisation)",
                cost.ticks,
                cost.samples,
                cost.per_tick().as_secs_f64() * 1e6,
                100.0 * cost.cpu_share(),
                cost.init.as_secs_f64() * 1e3
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

fn bytes(v: f64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if v >= GIB {
        format!("{:.1} GiB", v / GIB)
    } else {
        format!("{:.1} MiB", v / MIB)
    }
}

/// `stat` (`min`/`max`/`mean`/`last`) of metric `name` in `entry`.
fn get(entry: &Value, name: &str, stat: &str) -> Option<f64> {
    entry.get(name)?.get(stat)?.as_f64()
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

/// One human line for a window.
fn line(gpu: Option<&Value>, sys: Option<&Value>) -> String {
    let summary = |v: Option<&Value>| v.map(|v| v["summary"].clone());
    let (g, s) = (summary(gpu), summary(sys));
    let time = [&g, &s]
        .iter()
        .filter_map(|x| x.as_ref()?.get("window_end")?.as_str().map(str::to_owned))
        .next()
        .and_then(|t| t.get(11..19).map(str::to_owned))
        .unwrap_or_else(|| "--:--:--".into());
    let mut parts = Vec::new();
    if let Some(g) = &g {
        let status = g["status"].as_str().unwrap_or("unknown");
        let devices = g["devices"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if status != "ok" || devices.is_empty() {
            parts.push(format!("gpu {status}"));
        }
        for d in devices {
            let index = d["index"].as_u64().unwrap_or(0);
            let name = d["name"].as_str().unwrap_or("?");
            let dstatus = d["status"].as_str().unwrap_or("ok");
            if dstatus != "ok" {
                parts.push(format!("gpu{index} {name} {dstatus}"));
                continue;
            }
            let util = get(d, "utilization_gpu_percent", "mean").map(|u| format!("{u:.0}%"));
            let used = get(d, "memory_used_bytes", "last").map(bytes);
            let total = d["memory_total_bytes"].as_f64().map(bytes);
            let temp = get(d, "temperature_celsius", "max").map(|t| format!("{t:.0}°C"));
            let power = get(d, "power_avg_watts", "mean")
                .or_else(|| get(d, "power_watts", "mean"))
                .map(|w| format!("{w:.0} W"));
            parts.push(format!(
                "gpu{index} {name} util {} mem {}/{} {} {}",
                or_dash(util),
                or_dash(used),
                or_dash(total),
                or_dash(temp),
                or_dash(power)
            ));
        }
    }
    if let Some(s) = &s {
        for h in s["hosts"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let used = get(h, "memory_used_bytes", "last").map(bytes);
            let total = h["memory_total_bytes"].as_f64().map(bytes);
            let cpu = get(h, "cpu_usage_percent", "mean").map(|c| format!("{c:.0}%"));
            let rss = get(h, "process_rss_bytes", "last").map(bytes);
            parts.push(format!(
                "host mem {}/{} cpu {} rss {}",
                or_dash(used),
                or_dash(total),
                or_dash(cpu),
                or_dash(rss)
            ));
        }
    }
    format!("{time} {}", parts.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches the live line dropping the unavailability reason, misreading
    // the summary's shape, or printing garbage for missing metrics.
    #[test]
    fn line_shows_devices_host_and_status() {
        let gpu = json!({"summary": {"window_end": "2025-01-01T12:00:01.000000000Z", "status": "ok",
            "devices": [
                {"index": 0, "name": "H200", "status": "ok", "memory_total_bytes": 150_323_855_360u64,
                 "utilization_gpu_percent": {"min": 90.0, "max": 100.0, "mean": 97.4, "last": 100},
                 "memory_used_bytes": {"min": 1.0, "max": 2.0, "mean": 1.5, "last": 128_849_018_880u64},
                 "temperature_celsius": {"min": 60.0, "max": 61.0, "mean": 60.5, "last": 60},
                 "power_watts": {"min": 600.0, "max": 700.0, "mean": 652.0, "last": 650}},
                {"index": 1, "name": "H200", "status": "lost: fell off the bus"}]}});
        let sys = json!({"summary": {"hosts": [{"memory_total_bytes": 8_589_934_592u64,
            "memory_used_bytes": {"last": 4_294_967_296u64}, "process_rss_bytes": {"last": 10_485_760}}]}});
        let l = line(Some(&gpu), Some(&sys));
        assert_eq!(
            l,
            "12:00:01 gpu0 H200 util 97% mem 120.0 GiB/140.0 GiB 61°C 652 W \
             | gpu1 H200 lost: fell off the bus | host mem 4.0 GiB/8.0 GiB cpu - rss 10.0 MiB"
        );
        let down = json!({"summary": {"window_end": "2025-01-01T12:00:02.0Z",
            "status": "unavailable: NVML library not found", "devices": []}});
        assert_eq!(
            line(Some(&down), None),
            "12:00:02 gpu unavailable: NVML library not found"
        );
    }
}
