//! The GPU source abstraction: what a sampler asks of a GPU library.
//!
//! [`GpuSource`] has two implementations: [`NvmlSource`](crate::telemetry::NvmlSource)
//! (the real one, NVIDIA's NVML loaded at run time) and
//! [`FakeGpu`](crate::telemetry::FakeGpu) (scripted, for tests and demos).
//! The sampler owns the policy (what to ask, how often, what to do on
//! failure); a source only answers.

use std::fmt;

use serde::Serialize;

/// One thing a GPU can be asked about. [`Metric::field`] is its name in
/// samples and summaries, with the unit in the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Metric {
    /// Percent of the last period a kernel was running.
    GpuUtilization,
    /// Percent of the last period device memory was read or written.
    MemoryUtilization,
    /// Device memory in use, in bytes.
    MemoryUsed,
    /// GPU die temperature, in degrees Celsius.
    Temperature,
    /// Power draw now, in watts.
    Power,
    /// The energy counter, in joules since the driver loaded. The sampler
    /// turns two readings into the mean power between them (`power_avg_watts`).
    Energy,
    /// SM clock, in MHz.
    SmClock,
    /// Memory clock, in MHz.
    MemoryClock,
    /// Fan speed, in percent of maximum.
    FanSpeed,
    /// Why the clocks are held down: a [`Reading::Reasons`].
    ThrottleReasons,
    /// Processes with a compute context on the device (expensive: slow cadence).
    ComputeProcesses,
    /// PCIe transmit throughput, in bytes per second (expensive: slow cadence).
    PcieTx,
    /// PCIe receive throughput, in bytes per second (expensive: slow cadence).
    PcieRx,
}

impl Metric {
    /// Cheap metrics, asked every sample.
    pub const FAST: [Metric; 10] = [
        Metric::GpuUtilization,
        Metric::MemoryUtilization,
        Metric::MemoryUsed,
        Metric::Temperature,
        Metric::Power,
        Metric::Energy,
        Metric::SmClock,
        Metric::MemoryClock,
        Metric::FanSpeed,
        Metric::ThrottleReasons,
    ];

    /// Expensive metrics, asked on the slow cadence or on request.
    pub const SLOW: [Metric; 3] = [Metric::ComputeProcesses, Metric::PcieTx, Metric::PcieRx];

    /// The field name in samples and summaries (unit in the name).
    pub fn field(self) -> &'static str {
        match self {
            Metric::GpuUtilization => "utilization_gpu_percent",
            Metric::MemoryUtilization => "utilization_memory_percent",
            Metric::MemoryUsed => "memory_used_bytes",
            Metric::Temperature => "temperature_celsius",
            Metric::Power => "power_watts",
            Metric::Energy => "power_avg_watts",
            Metric::SmClock => "sm_clock_mhz",
            Metric::MemoryClock => "memory_clock_mhz",
            Metric::FanSpeed => "fan_speed_percent",
            Metric::ThrottleReasons => "throttle_reasons",
            Metric::ComputeProcesses => "compute_processes_count",
            Metric::PcieTx => "pcie_tx_bytes_per_second",
            Metric::PcieRx => "pcie_rx_bytes_per_second",
        }
    }

    /// Whether this metric is only asked on the slow cadence.
    pub fn is_slow(self) -> bool {
        Metric::SLOW.contains(&self)
    }
}

/// Throttle reasons that do not hold a busy GPU back: an idle GPU, or clocks
/// an administrator set. Any other active reason counts as throttled.
pub const BENIGN_THROTTLE_REASONS: [&str; 3] = [
    "gpu_idle",
    "applications_clocks_setting",
    "display_clock_setting",
];

/// A value read from a device.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    /// A number, in the unit the metric's field name says.
    Value(f64),
    /// The active throttle reasons (`sw_power_cap`, `hw_thermal_slowdown`, ...).
    Reasons(Vec<String>),
}

/// What went wrong reading a GPU. The variant decides what the sampler does.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// The library cannot be used at all (missing, driver not loaded,
    /// version mismatch, no permission): the status becomes
    /// `unavailable: <reason>` and initialisation is retried with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// This device fell off the bus or needs a reset: it is marked lost and
    /// retried with backoff; the other devices go on.
    #[error("{0}")]
    Lost(String),
    /// The device does not support this metric: it is left out and not asked again.
    #[error("not supported")]
    NotSupported,
    /// Anything else: the value is left out of this sample only.
    #[error("{0}")]
    Failed(String),
}

/// What a device is, read once when the source initialises.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceInfo {
    /// NVML's index of the device (`gpu:<index>`).
    pub index: u32,
    /// Product name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Stable identifier, e.g. `GPU-5c1e...`.
    pub uuid: String,
    /// Installed memory, in bytes, if the device reports it.
    pub memory_total_bytes: Option<u64>,
    /// Enforced power limit, in watts, if the device reports it.
    pub power_limit_watts: Option<f64>,
}

/// The outcome of each metric asked in one sample, in any order.
pub type Readings = Vec<(Metric, Result<Reading, GpuError>)>;

/// A GPU library the sampler can read from. Runs on the sampler's thread only.
pub trait GpuSource: Send + 'static {
    /// A short name for messages: `"nvml"`, `"fake"`.
    fn name(&self) -> &str;

    /// (Re)initialises the library and lists the devices. Called again after
    /// a [`GpuError::Unavailable`], with backoff; must release what an earlier
    /// call acquired. An empty list means "no GPU".
    fn init(&mut self) -> Result<Vec<DeviceInfo>, GpuError>;

    /// Reads `metrics` from `device`. A device-wide failure (handle lost)
    /// is the outer error; a failure of one metric goes next to it.
    fn sample(&mut self, device: &DeviceInfo, metrics: &[Metric]) -> Result<Readings, GpuError>;
}

/// The state of the GPU part of telemetry.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GpuStatus {
    /// GPU sampling is off (configuration, or no source given).
    Disabled,
    /// Not initialised yet: before the sampler's first tick.
    Starting,
    /// The library works; each device has its own [`DeviceState`].
    Ok,
    /// The library cannot be used, and why; initialisation is retried.
    Unavailable(String),
}

impl fmt::Display for GpuStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuStatus::Disabled => f.write_str("disabled"),
            GpuStatus::Starting => f.write_str("starting"),
            GpuStatus::Ok => f.write_str("ok"),
            GpuStatus::Unavailable(reason) => write!(f, "unavailable: {reason}"),
        }
    }
}

/// The state of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// Answering.
    Ok,
    /// Lost mid-run, and why; retried with backoff.
    Lost(String),
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceState::Ok => f.write_str("ok"),
            DeviceState::Lost(reason) => write!(f, "lost: {reason}"),
        }
    }
}

/// One device and its state, as [`Telemetry::devices`](crate::telemetry::Telemetry::devices) reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceStatus {
    /// What the device is.
    pub info: DeviceInfo,
    /// Whether it answers.
    pub state: DeviceState,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches two metrics sharing a field name (their stats would merge) or a
    // field without its unit.
    #[test]
    fn metric_fields_are_unique_and_carry_units() {
        let all: Vec<Metric> = Metric::FAST.iter().chain(&Metric::SLOW).copied().collect();
        let mut names: Vec<&str> = all.iter().map(|m| m.field()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for m in all {
            let f = m.field();
            let unit = [
                "_percent",
                "_bytes",
                "_celsius",
                "_watts",
                "_mhz",
                "_count",
                "_bytes_per_second",
                "_reasons",
            ];
            assert!(unit.iter().any(|u| f.ends_with(u)), "{f} has no unit");
            assert_eq!(m.is_slow(), Metric::SLOW.contains(&m));
        }
    }

    // Catches a status string that does not match the documented
    // `ok` / `unavailable: <reason>` / `lost: <reason>` forms.
    #[test]
    fn statuses_display_as_documented() {
        assert_eq!(GpuStatus::Ok.to_string(), "ok");
        assert_eq!(
            GpuStatus::Unavailable("no driver".into()).to_string(),
            "unavailable: no driver"
        );
        assert_eq!(
            DeviceState::Lost("fell off the bus".into()).to_string(),
            "lost: fell off the bus"
        );
    }
}
