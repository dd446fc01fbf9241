//! The host source: memory, swap, CPU and this process's RSS, via `sysinfo`.
//!
//! CPU usage is a difference between two readings, so it is refreshed at
//! most once per [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] and left out of
//! samples taken sooner (and out of the first one).
//!
//! ```
//! use std::time::Instant;
//! use spillway::telemetry::HostSource;
//!
//! let mut host = HostSource::new();
//! let sample = host.sample(Instant::now());
//! assert!(sample.memory_total_bytes > 0);
//! assert!(sample.metrics.iter().any(|(name, _)| *name == "memory_used_bytes"));
//! ```

use std::time::Instant;

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System, MINIMUM_CPU_UPDATE_INTERVAL};

/// Reads the host. Owned by the sampler's thread.
pub struct HostSource {
    sys: System,
    pid: Pid,
    host_name: String,
    cpu_refreshed: Instant,
}

impl std::fmt::Debug for HostSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSource")
            .field("host_name", &self.host_name)
            .finish_non_exhaustive()
    }
}

impl Default for HostSource {
    fn default() -> Self {
        HostSource::new()
    }
}

/// One reading of the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostSample {
    /// Installed memory, in bytes.
    pub memory_total_bytes: u64,
    /// Swap size, in bytes.
    pub swap_total_bytes: u64,
    /// The values, named with their units: `memory_used_bytes`,
    /// `memory_available_bytes`, `swap_used_bytes`, `cpu_usage_percent`
    /// (mean over all CPUs, left out when too soon), `process_rss_bytes`.
    pub metrics: Vec<(&'static str, f64)>,
}

impl HostSource {
    /// A host source; takes the first CPU reading now.
    pub fn new() -> HostSource {
        let mut sys = System::new();
        sys.refresh_cpu_usage();
        HostSource {
            sys,
            pid: Pid::from_u32(std::process::id()),
            host_name: System::host_name().unwrap_or_else(|| "localhost".into()),
            cpu_refreshed: Instant::now(),
        }
    }

    /// The host's name, as the summary reports it.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// Reads the host; `now` decides whether CPU usage may be refreshed.
    pub fn sample(&mut self, now: Instant) -> HostSample {
        self.sys.refresh_memory();
        let mut metrics = Vec::with_capacity(6);
        metrics.push(("memory_used_bytes", self.sys.used_memory() as f64));
        metrics.push(("memory_available_bytes", self.sys.available_memory() as f64));
        metrics.push(("swap_used_bytes", self.sys.used_swap() as f64));
        if now.saturating_duration_since(self.cpu_refreshed) >= MINIMUM_CPU_UPDATE_INTERVAL {
            self.sys.refresh_cpu_usage();
            self.cpu_refreshed = now;
            metrics.push(("cpu_usage_percent", f64::from(self.sys.global_cpu_usage())));
        }
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing().with_memory().without_tasks(),
        );
        if let Some(p) = self.sys.process(self.pid) {
            metrics.push(("process_rss_bytes", p.memory() as f64));
        }
        HostSample {
            memory_total_bytes: self.sys.total_memory(),
            swap_total_bytes: self.sys.total_swap(),
            metrics,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn has(s: &HostSample, name: &str) -> bool {
        s.metrics.iter().any(|(n, _)| *n == name)
    }

    // Catches CPU usage being read faster than sysinfo's minimum interval
    // (on Linux that reports a meaningless value) or never read at all.
    #[test]
    fn cpu_usage_respects_the_minimum_interval() {
        let mut h = HostSource::new();
        let t0 = h.cpu_refreshed;
        let s = h.sample(t0 + MINIMUM_CPU_UPDATE_INTERVAL / 2);
        assert!(!has(&s, "cpu_usage_percent"), "too soon: {s:?}");
        let s = h.sample(t0 + MINIMUM_CPU_UPDATE_INTERVAL + Duration::from_millis(1));
        assert!(has(&s, "cpu_usage_percent"), "{s:?}");
        let s = h.sample(t0 + MINIMUM_CPU_UPDATE_INTERVAL + Duration::from_millis(2));
        assert!(!has(&s, "cpu_usage_percent"), "again too soon: {s:?}");
    }

    // Catches memory figures that contradict each other or an RSS that is
    // missing for our own (certainly running) process.
    #[test]
    fn memory_and_rss_are_consistent() {
        let mut h = HostSource::new();
        let s = h.sample(Instant::now());
        let get = |n: &str| {
            s.metrics
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("{n} missing: {s:?}"))
        };
        let total = s.memory_total_bytes as f64;
        assert!(total > 0.0);
        assert!(get("memory_used_bytes") <= total);
        assert!(get("memory_available_bytes") <= total);
        let rss = get("process_rss_bytes");
        assert!(rss > 0.0 && rss < total, "rss {rss}");
        assert!(!h.host_name().is_empty());
    }
}
