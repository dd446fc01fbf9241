//! GPU and host telemetry, summarized per window.
//!
//! A sampler thread reads the GPUs (through NVML, loaded at run time) and the
//! host (through `sysinfo`) every `interval_ms` (250 ms by default) and
//! publishes each reading into the engine as a sample: `gpu:<index>` per
//! device, `sys:host` for the host, and `gpu:status` while the GPU library
//! is unavailable. The default policies for `gpu:*` and `sys:*` batch all
//! devices into one window (1000 ms or 50 samples, `prefix_depth = 1`) and
//! summarize it with the built-in `"stats"` reducer, so the bus sees one
//! `gpu:batch` and one `sys:batch` event per window, never one per sample.
//! The windows are persisted like any batch (the samples, then the summary).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::{Duration, Instant};
//! use spillway::{BatchAwareSubscriber, BatchConfig, BatchingBus, BusEvent, Engine, MessageBus};
//! use spillway::telemetry::{FakeGpu, GpuStatus, HostSource, Telemetry, TelemetryConfig};
//!
//! struct Keep(Mutex<Vec<BusEvent>>);
//! impl BatchAwareSubscriber for Keep {
//!     fn on_event(&self, e: &BusEvent) { self.0.lock().unwrap().push(e.clone()); }
//! }
//!
//! let (engine, _guard) = Engine::builder(BatchConfig::default()).build()?;
//! let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
//! let got = Arc::new(Keep(Mutex::new(Vec::new())));
//! bus.subscribe("gpu:batch", got.clone())?;
//!
//! // `Telemetry::start(&engine, config)` uses NVML; a fake GPU runs anywhere.
//! let config = TelemetryConfig { interval_ms: 10, ..TelemetryConfig::default() };
//! let telemetry = Telemetry::start_with(
//!     &engine, config, Some(Box::new(FakeGpu::demo(2))), Some(HostSource::new()))?;
//! let deadline = Instant::now() + Duration::from_secs(30);
//! while telemetry.samples() < 6 && Instant::now() < deadline {
//!     std::thread::sleep(Duration::from_millis(5));
//! }
//! engine.flush()?; // closes the open windows now
//! assert_eq!(telemetry.status(), GpuStatus::Ok);
//! let events = got.0.lock().unwrap();
//! let summary = &events[0].payload["summary"];
//! assert_eq!(summary["status"], "ok");
//! assert_eq!(summary["devices"][0]["uuid"], "GPU-fake-0000");
//! assert!(summary["devices"][0]["utilization_gpu_percent"]["mean"].is_number());
//! # Ok::<(), spillway::Error>(())
//! ```
//!
//! # The summary
//!
//! `gpu:batch`'s payload is `{count, dropped, first_ts, last_ts, summary}`
//! (see [`Batch::to_payload`](crate::Batch::to_payload)); `summary` is:
//!
//! ```json
//! {
//!   "window_start": "2025-01-01T12:00:00.000000000Z",
//!   "window_end":   "2025-01-01T12:00:00.750000000Z",
//!   "samples": 8, "count": 8,
//!   "status": "ok",
//!   "devices": [
//!     { "index": 0, "uuid": "GPU-5c1e...", "name": "NVIDIA H200",
//!       "memory_total_bytes": 150754820096, "power_limit_watts": 700.0,
//!       "status": "ok", "samples": 4, "throttle_reasons": ["sw_power_cap"],
//!       "utilization_gpu_percent": {"min": 90.0, "max": 100.0, "mean": 97.5, "last": 100},
//!       "utilization_memory_percent": {...}, "memory_used_bytes": {...},
//!       "temperature_celsius": {...}, "power_watts": {...}, "power_avg_watts": {...},
//!       "sm_clock_mhz": {...}, "memory_clock_mhz": {...}, "fan_speed_percent": {...},
//!       "throttled_percent": {...},
//!       "compute_processes_count": {...}, "pcie_tx_bytes_per_second": {...},
//!       "pcie_rx_bytes_per_second": {...} }
//!   ]
//! }
//! ```
//!
//! - `status` is `ok` or `unavailable: <reason>` (library missing, driver
//!   not loaded, driver/library version mismatch, no permission); while
//!   unavailable, `devices` is `[]` and initialisation is retried with
//!   backoff (`retry_initial_ms` doubling up to `retry_max_ms`). The reason
//!   is logged once as a warning per episode.
//! - a device's `status` is `ok` or `lost: <reason>`; a lost device has no
//!   metric fields while lost, is retried with backoff, and the other devices
//!   go on.
//! - each metric is `{min, max, mean, last}` over the window's samples that
//!   carried it; a metric the device does not support is absent (and not
//!   asked again). `power_avg_watts` is the mean power between two samples
//!   from the energy counter, so its `mean` is the window's mean power;
//!   `throttled_percent` is 100 for a sample with an active throttle reason
//!   other than [`BENIGN_THROTTLE_REASONS`], so its `mean` is the share of
//!   the window spent throttled; `throttle_reasons` are the last sample's.
//!   The expensive metrics (`compute_processes_count`, `pcie_*`) are read
//!   every `slow_interval_ms` (and on the first sample, or on
//!   [`Telemetry::request_slow`]), so most windows do not carry them.
//!
//! `sys:batch`'s summary has the same frame with `"hosts": [ {name,
//! memory_total_bytes, swap_total_bytes, status, samples, memory_used_bytes,
//! memory_available_bytes, swap_used_bytes, cpu_usage_percent,
//! process_rss_bytes} ]`, the numbers again as `{min, max, mean, last}`.
//! The reducer's general rules are in [`crate::layer::summary`].
//!
//! At the defaults (250 ms ticks; a window closes 1000 ms after its first
//! sample) the tick that falls on a window's end usually still makes it in,
//! so a window holds 4 or 5 samples per device and about 48 to 60 windows
//! close per minute and prefix; no sample falls between two windows.
//! Measured with two fake GPUs and the host: 97 `gpu:batch` + `sys:batch`
//! events a minute, against 720 if every sample were an event.

mod config;
mod fake;
mod host;
mod nvml;
mod sampler;
mod source;

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

pub use config::{
    TelemetryConfig, DEFAULT_INTERVAL, DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX,
    DEFAULT_SLOW_INTERVAL,
};
pub use fake::{FakeDevice, FakeFrame, FakeGpu};
pub use host::{HostSample, HostSource};
pub use nvml::{nvml_library_present, NvmlSource, NVML_LIBRARY};
pub use sampler::{GPU_STATUS_EVENT, HOST_EVENT};
pub use source::{
    DeviceInfo, DeviceState, DeviceStatus, GpuError, GpuSource, GpuStatus, Metric, Reading,
    Readings, BENIGN_THROTTLE_REASONS,
};

use crate::error::{Error, Result};
use crate::layer::engine::Engine;
use sampler::{Sampler, Shared};

/// How long dropping a [`Telemetry`] waits for the sampler thread: 2 s. A
/// thread stuck in a driver call is left behind rather than waited for.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// What the sampler has cost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SamplerCost {
    /// Ticks run (one tick reads every source once).
    pub ticks: u64,
    /// Samples published (one per device and one for the host, per tick).
    pub samples: u64,
    /// Wall time spent inside ticks (reading sources, building and handing
    /// over samples), not counting GPU library initialisation. Time blocked
    /// in a driver call counts too, so this is an upper bound on CPU time.
    pub busy: Duration,
    /// Wall time spent initialising the GPU library (a one-off per
    /// successful start, plus each retry while it is unavailable).
    pub init: Duration,
    /// Time since the sampler started.
    pub elapsed: Duration,
}

impl SamplerCost {
    /// Mean time per tick.
    pub fn per_tick(&self) -> Duration {
        self.busy
            .checked_div(self.ticks.max(1) as u32)
            .unwrap_or_default()
    }

    /// Mean time per published sample.
    pub fn per_sample(&self) -> Duration {
        let n = u32::try_from(self.samples.max(1)).unwrap_or(u32::MAX);
        self.busy.checked_div(n).unwrap_or_default()
    }

    /// Share of one core spent sampling: `busy / elapsed` (0.01 is 1 %).
    pub fn cpu_share(&self) -> f64 {
        let e = self.elapsed.as_secs_f64();
        if e > 0.0 {
            self.busy.as_secs_f64() / e
        } else {
            0.0
        }
    }
}

/// The running telemetry sampler. Stops (and joins its thread, with a
/// deadline) when dropped.
#[must_use = "dropping Telemetry stops the sampler"]
pub struct Telemetry {
    shared: Arc<Shared>,
    thread: Option<(JoinHandle<()>, mpsc::Receiver<()>)>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("status", &self.status())
            .field("samples", &self.samples())
            .finish()
    }
}

impl Telemetry {
    /// Starts the sampler on `engine` with the real sources: NVML for the
    /// GPUs (if `config.gpu`) and `sysinfo` for the host (if `config.host`).
    /// A machine without a GPU is not an error: the status says why.
    /// With `enabled = false`, nothing runs.
    pub fn start(engine: &Engine, config: TelemetryConfig) -> Result<Telemetry> {
        config.validate()?;
        let gpu: Option<Box<dyn GpuSource>> = if config.enabled && config.gpu {
            Some(Box::new(NvmlSource::new()))
        } else {
            None
        };
        let host = (config.enabled && config.host).then(HostSource::new);
        Telemetry::start_with(engine, config, gpu, host)
    }

    /// Starts the sampler with the given sources (`None` leaves that part
    /// out; `config.gpu`/`config.host` are not consulted). With
    /// `enabled = false`, nothing runs.
    pub fn start_with(
        engine: &Engine,
        config: TelemetryConfig,
        gpu: Option<Box<dyn GpuSource>>,
        host: Option<HostSource>,
    ) -> Result<Telemetry> {
        config.validate()?;
        let status = if config.enabled && gpu.is_some() {
            GpuStatus::Starting
        } else {
            GpuStatus::Disabled
        };
        let shared = Shared::new(status);
        if !config.enabled || (gpu.is_none() && host.is_none()) {
            return Ok(Telemetry {
                shared,
                thread: None,
            });
        }
        let sampler = Sampler::new(engine.clone(), config, shared.clone(), gpu, host);
        let (done_tx, done_rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("spillway-telemetry".into())
            .spawn(move || {
                // Signals on the way out, even if a source panicked past our guards.
                struct Done(mpsc::Sender<()>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        let _ = self.0.send(());
                    }
                }
                let _done = Done(done_tx);
                sampler::run(sampler);
            })
            .map_err(|e| Error::Other(format!("cannot start thread spillway-telemetry: {e}")))?;
        Ok(Telemetry {
            shared,
            thread: Some((handle, done_rx)),
        })
    }

    /// The GPU status now.
    pub fn status(&self) -> GpuStatus {
        self.shared.status()
    }

    /// Each GPU and its state (empty while the GPU library is unavailable).
    pub fn devices(&self) -> Vec<DeviceStatus> {
        self.shared.devices()
    }

    /// Samples published so far.
    pub fn samples(&self) -> u64 {
        self.shared.samples.load(Ordering::Relaxed)
    }

    /// What sampling has cost so far.
    pub fn cost(&self) -> SamplerCost {
        SamplerCost {
            ticks: self.shared.ticks.load(Ordering::Relaxed),
            samples: self.samples(),
            busy: Duration::from_nanos(self.shared.busy_ns.load(Ordering::Relaxed)),
            init: Duration::from_nanos(self.shared.init_ns.load(Ordering::Relaxed)),
            elapsed: self.shared.started.elapsed(),
        }
    }

    /// Samples now, including the expensive metrics (running processes,
    /// PCIe throughput), instead of waiting for the slow cadence.
    pub fn request_slow(&self) {
        self.shared.request_slow();
    }

    /// Stops the sampler and waits up to `timeout` for its thread. Returns
    /// whether it finished (a thread stuck in a driver call is left behind).
    /// Idempotent.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        self.shared.request_stop();
        let Some((handle, done)) = self.thread.take() else {
            return true;
        };
        match done.recv_timeout(timeout) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
                true
            }
            Err(mpsc::RecvTimeoutError::Timeout) => false,
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if !self.stop(DEFAULT_STOP_TIMEOUT) {
            eprintln!(
                "spillway: the telemetry sampler did not stop within {DEFAULT_STOP_TIMEOUT:?}; left behind"
            );
        }
    }
}
