//! A scripted GPU source, for tests and demos on machines without a GPU.
//!
//! Each device plays its frames in order, one per sample (the last frame
//! repeats); a device without frames answers plausible, varying values.
//! Initialisation can be scripted to fail, and every question the sampler
//! asks is counted, so tests can check what was (not) asked.
//!
//! ```
//! use spillway::telemetry::{FakeDevice, FakeFrame, FakeGpu, GpuSource, Metric};
//!
//! let fake = FakeGpu::new()
//!     .fail_init(["NVML library not found"])
//!     .device(FakeDevice::new(0, "Fake H200").unsupported(Metric::FanSpeed).frames([
//!         FakeFrame::ok([(Metric::GpuUtilization, 10.0)]),
//!         FakeFrame::lost("fell off the bus"),
//!     ]));
//! let mut source: Box<dyn GpuSource> = Box::new(fake.clone());
//! assert!(source.init().is_err());
//! let devices = source.init().unwrap();
//! let readings = source.sample(&devices[0], &[Metric::GpuUtilization]).unwrap();
//! assert_eq!(readings.len(), 1);
//! assert!(source.sample(&devices[0], &[Metric::GpuUtilization]).is_err());
//! assert_eq!(fake.init_calls(), 2);
//! assert_eq!(fake.asked(0, Metric::GpuUtilization), 2);
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::telemetry::source::{DeviceInfo, GpuError, GpuSource, Metric, Reading, Readings};

/// What a fake device does on one sample.
#[derive(Clone, Debug, PartialEq)]
pub enum FakeFrame {
    /// It answers these values; a metric asked but not listed fails
    /// ([`GpuError::Failed`]) for this sample, except throttle reasons,
    /// which are always answered (`throttle`, empty by default).
    Ok {
        /// Values in the units of the metrics' field names (energy in joules).
        values: Vec<(Metric, f64)>,
        /// Active throttle reasons.
        throttle: Vec<String>,
    },
    /// The device is lost ([`GpuError::Lost`]) with this reason.
    Lost(String),
    /// The whole library fails ([`GpuError::Unavailable`]) with this reason.
    Unavailable(String),
}

impl FakeFrame {
    /// A frame answering `values`.
    pub fn ok(values: impl IntoIterator<Item = (Metric, f64)>) -> FakeFrame {
        FakeFrame::Ok {
            values: values.into_iter().collect(),
            throttle: Vec::new(),
        }
    }

    /// A frame where the device is lost.
    pub fn lost(reason: impl Into<String>) -> FakeFrame {
        FakeFrame::Lost(reason.into())
    }

    /// A frame where the library stops working.
    pub fn unavailable(reason: impl Into<String>) -> FakeFrame {
        FakeFrame::Unavailable(reason.into())
    }

    /// Sets the active throttle reasons of an `Ok` frame.
    pub fn throttle<S: Into<String>>(mut self, reasons: impl IntoIterator<Item = S>) -> FakeFrame {
        if let FakeFrame::Ok { throttle, .. } = &mut self {
            *throttle = reasons.into_iter().map(Into::into).collect();
        }
        self
    }
}

/// One scripted device.
#[derive(Clone, Debug)]
pub struct FakeDevice {
    info: DeviceInfo,
    unsupported: Vec<Metric>,
    frames: Vec<FakeFrame>,
}

impl FakeDevice {
    /// A device with index `index` and product name `name`, 80 GiB and 700 W.
    pub fn new(index: u32, name: impl Into<String>) -> FakeDevice {
        FakeDevice {
            info: DeviceInfo {
                index,
                name: name.into(),
                uuid: format!("GPU-fake-{index:04}"),
                memory_total_bytes: Some(80 << 30),
                power_limit_watts: Some(700.0),
            },
            unsupported: Vec::new(),
            frames: Vec::new(),
        }
    }

    /// Makes the device answer [`GpuError::NotSupported`] for `metric`.
    pub fn unsupported(mut self, metric: Metric) -> FakeDevice {
        self.unsupported.push(metric);
        self
    }

    /// The frames to play, one per sample; the last repeats.
    pub fn frames(mut self, frames: impl IntoIterator<Item = FakeFrame>) -> FakeDevice {
        self.frames = frames.into_iter().collect();
        self
    }

    /// Overrides what `init` reports about the device.
    pub fn info(mut self, info: DeviceInfo) -> FakeDevice {
        self.info = info;
        self
    }
}

struct DeviceState {
    spec: FakeDevice,
    next: usize,
    samples: u64,
    energy_joules: f64,
    asked: HashMap<Metric, u64>,
}

#[derive(Default)]
struct State {
    init_failures: VecDeque<String>,
    init_calls: u64,
    devices: Vec<DeviceState>,
}

/// A scripted [`GpuSource`]. Clones share the script and the counters: keep
/// one to inspect while the sampler owns the other.
#[derive(Clone, Default)]
pub struct FakeGpu {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FakeGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGpu").finish_non_exhaustive()
    }
}

impl FakeGpu {
    /// A fake with no devices (so `init` reports none until one is added).
    pub fn new() -> FakeGpu {
        FakeGpu::default()
    }

    /// `n` devices answering plausible, varying values: for demos.
    pub fn demo(n: u32) -> FakeGpu {
        (0..n).fold(FakeGpu::new(), |f, i| {
            f.device(FakeDevice::new(i, "Fake GPU").unsupported(Metric::FanSpeed))
        })
    }

    /// Adds a device.
    pub fn device(self, device: FakeDevice) -> FakeGpu {
        self.lock().devices.push(DeviceState {
            spec: device,
            next: 0,
            samples: 0,
            energy_joules: 0.0,
            asked: HashMap::new(),
        });
        self
    }

    /// Makes the next calls to `init` fail, one reason per call, in order.
    pub fn fail_init<S: Into<String>>(self, reasons: impl IntoIterator<Item = S>) -> FakeGpu {
        self.lock()
            .init_failures
            .extend(reasons.into_iter().map(Into::into));
        self
    }

    /// How many times `init` was called.
    pub fn init_calls(&self) -> u64 {
        self.lock().init_calls
    }

    /// How many times `metric` was asked of device `index`.
    pub fn asked(&self, index: u32, metric: Metric) -> u64 {
        self.lock()
            .devices
            .iter()
            .find(|d| d.spec.info.index == index)
            .and_then(|d| d.asked.get(&metric).copied())
            .unwrap_or(0)
    }

    /// How many times device `index` was sampled (lost or not).
    pub fn samples(&self, index: u32) -> u64 {
        self.lock()
            .devices
            .iter()
            .find(|d| d.spec.info.index == index)
            .map_or(0, |d| d.samples)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Plausible values for a device without frames: a slow wave per metric.
fn synthetic(d: &mut DeviceState, metric: Metric) -> Reading {
    let k = d.samples as f64;
    let offset = f64::from(d.spec.info.index);
    let wave = |period: f64, phase: f64| 0.5 + 0.5 * (k / period + phase + offset).sin();
    let total = d.spec.info.memory_total_bytes.unwrap_or(80 << 30) as f64;
    let limit = d.spec.info.power_limit_watts.unwrap_or(700.0);
    let power = 80.0 + (limit - 80.0) * wave(9.0, 0.5);
    let v = match metric {
        Metric::GpuUtilization => (100.0 * wave(7.0, 0.0)).round(),
        Metric::MemoryUtilization => (60.0 * wave(7.0, 1.0)).round(),
        Metric::MemoryUsed => (total * (0.2 + 0.6 * wave(40.0, 0.0))).round(),
        Metric::Temperature => (35.0 + 40.0 * wave(30.0, 2.0)).round(),
        Metric::Power => power,
        Metric::Energy => {
            // At the default cadence: a quarter second at this power.
            d.energy_joules += power * 0.25;
            d.energy_joules
        }
        Metric::SmClock => (1000.0 + 980.0 * wave(7.0, 0.0)).round(),
        Metric::MemoryClock => 2619.0,
        Metric::FanSpeed => (30.0 + 50.0 * wave(30.0, 2.0)).round(),
        Metric::ThrottleReasons => {
            let hot = wave(30.0, 2.0) > 0.9;
            return Reading::Reasons(if hot {
                vec!["sw_thermal_slowdown".into()]
            } else {
                Vec::new()
            });
        }
        Metric::ComputeProcesses => (3.0 * wave(50.0, 0.0)).round(),
        Metric::PcieTx | Metric::PcieRx => (2e9 * wave(5.0, 0.3)).round(),
    };
    Reading::Value(v)
}

impl GpuSource for FakeGpu {
    fn name(&self) -> &str {
        "fake"
    }

    fn init(&mut self) -> Result<Vec<DeviceInfo>, GpuError> {
        let mut st = self.lock();
        st.init_calls += 1;
        if let Some(reason) = st.init_failures.pop_front() {
            return Err(GpuError::Unavailable(reason));
        }
        Ok(st.devices.iter().map(|d| d.spec.info.clone()).collect())
    }

    fn sample(&mut self, device: &DeviceInfo, metrics: &[Metric]) -> Result<Readings, GpuError> {
        let mut st = self.lock();
        let d = st
            .devices
            .iter_mut()
            .find(|d| d.spec.info.index == device.index)
            .ok_or_else(|| GpuError::Lost(format!("no fake device {}", device.index)))?;
        for &m in metrics {
            *d.asked.entry(m).or_insert(0) += 1;
        }
        let frame = match d.spec.frames.len() {
            0 => None,
            n => Some(d.spec.frames[d.next.min(n - 1)].clone()),
        };
        d.next += 1;
        d.samples += 1;
        let out = match frame {
            Some(FakeFrame::Lost(reason)) => return Err(GpuError::Lost(reason)),
            Some(FakeFrame::Unavailable(reason)) => return Err(GpuError::Unavailable(reason)),
            Some(FakeFrame::Ok { values, throttle }) => metrics
                .iter()
                .map(|&m| {
                    let r = if d.spec.unsupported.contains(&m) {
                        Err(GpuError::NotSupported)
                    } else if m == Metric::ThrottleReasons {
                        Ok(Reading::Reasons(throttle.clone()))
                    } else {
                        values
                            .iter()
                            .find(|(k, _)| *k == m)
                            .map(|(_, v)| Reading::Value(*v))
                            .ok_or_else(|| GpuError::Failed(format!("{m:?} not scripted")))
                    };
                    (m, r)
                })
                .collect(),
            None => metrics
                .iter()
                .map(|&m| {
                    let r = if d.spec.unsupported.contains(&m) {
                        Err(GpuError::NotSupported)
                    } else {
                        Ok(synthetic(d, m))
                    };
                    (m, r)
                })
                .collect(),
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches the demo fake producing values outside their physical range
    // (percent over 100, memory over the total), which would mislead a demo.
    #[test]
    fn demo_values_stay_in_range() {
        let mut f = FakeGpu::demo(2);
        let devices = f.init().expect("demo init");
        assert_eq!(devices.len(), 2);
        let all: Vec<Metric> = Metric::FAST.iter().chain(&Metric::SLOW).copied().collect();
        let mut last_energy = 0.0;
        for _ in 0..200 {
            for (m, r) in f.sample(&devices[1], &all).expect("sample") {
                match (m, r) {
                    (Metric::FanSpeed, r) => assert_eq!(r, Err(GpuError::NotSupported)),
                    (Metric::ThrottleReasons, r) => {
                        assert!(matches!(r, Ok(Reading::Reasons(_))))
                    }
                    (m, Ok(Reading::Value(v))) => {
                        assert!(v >= 0.0, "{m:?} = {v}");
                        if m.field().ends_with("_percent") {
                            assert!(v <= 100.0, "{m:?} = {v}");
                        }
                        if m == Metric::MemoryUsed {
                            assert!(v <= (80u64 << 30) as f64);
                        }
                        if m == Metric::Energy {
                            assert!(v > last_energy, "energy counter must grow");
                            last_energy = v;
                        }
                    }
                    (m, r) => panic!("{m:?}: {r:?}"),
                }
            }
        }
    }
}
