//! The real GPU source: NVIDIA's NVML through `nvml-wrapper`.
//!
//! The library (`libnvidia-ml.so.1`) is loaded when [`GpuSource::init`] runs,
//! not at link time, so spillway builds and runs on machines without a GPU;
//! there, `init` fails with a reason the sampler reports as the status.
//!
//! ```
//! use spillway::telemetry::{GpuError, GpuSource, NvmlSource};
//!
//! let mut nvml = NvmlSource::new();
//! match nvml.init() {
//!     Ok(devices) => println!("{} GPU(s)", devices.len()),
//!     Err(GpuError::Unavailable(reason)) => println!("no GPU telemetry: {reason}"),
//!     Err(e) => println!("unexpected: {e}"),
//! }
//! ```

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, PcieUtilCounter, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use crate::telemetry::source::{DeviceInfo, GpuError, GpuSource, Metric, Reading, Readings};

/// The NVML library file loaded at run time (on Linux).
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// Reads NVIDIA GPUs through NVML. The default [`GpuSource`].
#[derive(Default)]
pub struct NvmlSource {
    nvml: Option<Nvml>,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("initialised", &self.nvml.is_some())
            .finish()
    }
}

impl NvmlSource {
    /// A source that has not loaded NVML yet.
    pub fn new() -> NvmlSource {
        NvmlSource::default()
    }
}

/// Why NVML cannot be initialised, in words an operator can act on.
pub(crate) fn init_reason(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(e) => {
            // The loader's message names the file it looked for; say it if not.
            let e = e.to_string();
            if e.contains(NVML_LIBRARY) {
                format!("NVML library not found: {e}")
            } else {
                format!("NVML library not found ({NVML_LIBRARY}): {e}")
            }
        }
        NvmlError::LibraryNotFound => format!("NVML library not found ({NVML_LIBRARY})"),
        NvmlError::FailedToLoadSymbol(s) => {
            format!("NVML library too old or damaged: cannot load {s}")
        }
        NvmlError::FunctionNotFound => "NVML library too old or damaged".into(),
        NvmlError::DriverNotLoaded => "NVIDIA driver not loaded".into(),
        NvmlError::LibRmVersionMismatch => {
            "NVIDIA driver/library version mismatch (reload the driver or reboot)".into()
        }
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".into(),
        NvmlError::Uninitialized => "NVML is not initialised".into(),
        other => format!("NVML initialisation failed: {other}"),
    }
}

/// What one failed call means for the sampler.
pub(crate) fn call_error(e: NvmlError) -> GpuError {
    match e {
        NvmlError::NotSupported
        | NvmlError::FunctionNotFound
        | NvmlError::FailedToLoadSymbol(_)
        | NvmlError::NoPermission => GpuError::NotSupported,
        NvmlError::GpuLost | NvmlError::ResetRequired | NvmlError::NotFound => {
            GpuError::Lost(e.to_string())
        }
        NvmlError::Uninitialized
        | NvmlError::DriverNotLoaded
        | NvmlError::LibRmVersionMismatch
        | NvmlError::LibraryNotFound => GpuError::Unavailable(init_reason(&e)),
        other => GpuError::Failed(other.to_string()),
    }
}

/// NVML's throttle reasons, as the names spillway reports.
const THROTTLE_NAMES: [(ThrottleReasons, &str); 9] = [
    (ThrottleReasons::GPU_IDLE, "gpu_idle"),
    (
        ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
        "applications_clocks_setting",
    ),
    (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
    (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
    (ThrottleReasons::SYNC_BOOST, "sync_boost"),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
    (
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        "hw_power_brake_slowdown",
    ),
    (
        ThrottleReasons::DISPLAY_CLOCK_SETTING,
        "display_clock_setting",
    ),
];

fn throttle_names(r: ThrottleReasons) -> Vec<String> {
    THROTTLE_NAMES
        .iter()
        .filter(|(flag, _)| r.contains(*flag))
        .map(|(_, name)| (*name).to_string())
        .collect()
}

fn device_info(index: u32, d: &Device<'_>) -> DeviceInfo {
    DeviceInfo {
        index,
        name: d.name().unwrap_or_else(|e| format!("unknown ({e})")),
        uuid: d.uuid().unwrap_or_default(),
        memory_total_bytes: d.memory_info().ok().map(|m| m.total),
        power_limit_watts: d
            .enforced_power_limit()
            .or_else(|_| d.power_management_limit())
            .ok()
            .map(|mw| f64::from(mw) / 1000.0),
    }
}

impl GpuSource for NvmlSource {
    fn name(&self) -> &str {
        "nvml"
    }

    fn init(&mut self) -> Result<Vec<DeviceInfo>, GpuError> {
        // Release the previous handle (nvmlShutdown) before initialising again.
        self.nvml = None;
        let nvml = Nvml::init().map_err(|e| GpuError::Unavailable(init_reason(&e)))?;
        let count = nvml
            .device_count()
            .map_err(|e| GpuError::Unavailable(init_reason(&e)))?;
        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            match nvml.device_by_index(index) {
                Ok(d) => devices.push(device_info(index, &d)),
                // Listed but not answering: report it, the sampler marks it lost.
                Err(e) => devices.push(DeviceInfo {
                    index,
                    name: format!("unknown ({e})"),
                    uuid: String::new(),
                    memory_total_bytes: None,
                    power_limit_watts: None,
                }),
            }
        }
        self.nvml = Some(nvml);
        Ok(devices)
    }

    fn sample(&mut self, device: &DeviceInfo, metrics: &[Metric]) -> Result<Readings, GpuError> {
        let nvml = self
            .nvml
            .as_ref()
            .ok_or_else(|| GpuError::Unavailable("NVML is not initialised".into()))?;
        // A `Device` borrows the `Nvml`, so it cannot be kept beside it; the
        // lookup by index is a table read in the driver library.
        // A device that cannot even be opened is lost (retried), unless the
        // whole library is gone.
        let d = nvml.device_by_index(device.index).map_err(|e| {
            let reason = format!("cannot open the device: {e}");
            match call_error(e) {
                GpuError::Unavailable(r) => GpuError::Unavailable(r),
                _ => GpuError::Lost(reason),
            }
        })?;
        let mut out = Vec::with_capacity(metrics.len());
        // One call answers both utilization metrics.
        let mut utilization = None;
        for &m in metrics {
            let value = |r: Result<u32, NvmlError>, scale: f64| {
                r.map(|v| Reading::Value(f64::from(v) * scale))
                    .map_err(call_error)
            };
            let reading = match m {
                Metric::GpuUtilization | Metric::MemoryUtilization => {
                    let u = utilization
                        .get_or_insert_with(|| d.utilization_rates().map_err(call_error));
                    match u {
                        Ok(u) => Ok(Reading::Value(f64::from(if m == Metric::GpuUtilization {
                            u.gpu
                        } else {
                            u.memory
                        }))),
                        Err(e) => Err(e.clone()),
                    }
                }
                Metric::MemoryUsed => d
                    .memory_info()
                    .map(|i| Reading::Value(i.used as f64))
                    .map_err(call_error),
                Metric::Temperature => value(d.temperature(TemperatureSensor::Gpu), 1.0),
                Metric::Power => value(d.power_usage(), 1e-3),
                Metric::Energy => d
                    .total_energy_consumption()
                    .map(|mj| Reading::Value(mj as f64 / 1000.0))
                    .map_err(call_error),
                Metric::SmClock => value(d.clock_info(Clock::SM), 1.0),
                Metric::MemoryClock => value(d.clock_info(Clock::Memory), 1.0),
                Metric::FanSpeed => value(d.fan_speed(0), 1.0),
                Metric::ThrottleReasons => d
                    .current_throttle_reasons()
                    .map(|r| Reading::Reasons(throttle_names(r)))
                    .map_err(call_error),
                Metric::ComputeProcesses => d
                    .running_compute_processes_count()
                    .map(|n| Reading::Value(f64::from(n)))
                    .map_err(call_error),
                // NVML reports PCIe throughput in KiB/s.
                Metric::PcieTx => value(d.pcie_throughput(PcieUtilCounter::Send), 1024.0),
                Metric::PcieRx => value(d.pcie_throughput(PcieUtilCounter::Receive), 1024.0),
            };
            out.push((m, reading));
        }
        Ok(out)
    }
}

/// Whether `libnvidia-ml.so.1` is in one of the usual places (or on
/// `LD_LIBRARY_PATH`): a quick check that needs no driver call.
pub fn nvml_library_present() -> bool {
    let mut dirs: Vec<String> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/lib/x86_64-linux-gnu",
            "/lib64",
            "/usr/local/nvidia/lib64",
        ]
        .map(String::from),
    );
    dirs.iter()
        .any(|d| std::path::Path::new(d).join(NVML_LIBRARY).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches the real path panicking or mis-reporting where NVML is absent:
    // on a machine without libnvidia-ml, init must fail with the
    // missing-library reason (and on a GPU machine it must list devices).
    #[test]
    fn init_without_library_fails_cleanly() {
        let mut s = NvmlSource::new();
        match s.init() {
            Err(GpuError::Unavailable(reason)) => {
                if !nvml_library_present() {
                    assert!(
                        reason.contains("NVML library not found") && reason.contains(NVML_LIBRARY),
                        "{reason}"
                    );
                }
            }
            Ok(devices) => assert!(devices.iter().all(|d| !d.name.is_empty())),
            Err(other) => panic!("init must fail only as Unavailable, got {other:?}"),
        }
        // Sampling before a successful init is an error, never a panic.
        let info = DeviceInfo {
            index: 0,
            name: "x".into(),
            uuid: String::new(),
            memory_total_bytes: None,
            power_limit_watts: None,
        };
        let mut fresh = NvmlSource::new();
        assert!(matches!(
            fresh.sample(&info, &Metric::FAST),
            Err(GpuError::Unavailable(_))
        ));
    }

    // Catches a failure being misclassified: an unsupported metric asked
    // again every sample, a lost GPU taken for a transient error, or a driver
    // problem not triggering re-initialisation.
    #[test]
    fn errors_map_to_sampler_actions() {
        assert_eq!(call_error(NvmlError::NotSupported), GpuError::NotSupported);
        assert_eq!(
            call_error(NvmlError::FailedToLoadSymbol("nvmlX".into())),
            GpuError::NotSupported
        );
        assert!(matches!(call_error(NvmlError::GpuLost), GpuError::Lost(_)));
        assert!(matches!(
            call_error(NvmlError::ResetRequired),
            GpuError::Lost(_)
        ));
        assert!(matches!(
            call_error(NvmlError::DriverNotLoaded),
            GpuError::Unavailable(_)
        ));
        assert!(matches!(
            call_error(NvmlError::Timeout),
            GpuError::Failed(_)
        ));
        assert_eq!(
            init_reason(&NvmlError::LibRmVersionMismatch),
            "NVIDIA driver/library version mismatch (reload the driver or reboot)"
        );
        assert_eq!(
            init_reason(&NvmlError::DriverNotLoaded),
            "NVIDIA driver not loaded"
        );
        assert!(init_reason(&NvmlError::NoPermission).contains("permission"));
        assert!(
            init_reason(&NvmlError::FailedToLoadSymbol("nvmlInit_v2".into()))
                .contains("nvmlInit_v2")
        );
    }

    // Catches throttle flags mapped to the wrong names.
    #[test]
    fn throttle_reasons_have_names() {
        let r = ThrottleReasons::SW_POWER_CAP | ThrottleReasons::GPU_IDLE;
        assert_eq!(throttle_names(r), vec!["gpu_idle", "sw_power_cap"]);
        assert!(throttle_names(ThrottleReasons::NONE).is_empty());
    }
}
