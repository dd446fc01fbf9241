//! The `[telemetry]` table of the configuration file.
//!
//! ```
//! use spillway::telemetry::TelemetryConfig;
//!
//! let config: TelemetryConfig = toml::from_str("interval_ms = 500\ngpu = false").unwrap();
//! assert_eq!(config.interval_ms, 500);
//! assert!(config.host && !config.gpu);
//! config.validate().unwrap();
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default time between two samples: 250 ms.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);
/// Default time between two reads of the expensive metrics (running
/// processes, PCIe throughput): 5 s.
pub const DEFAULT_SLOW_INTERVAL: Duration = Duration::from_secs(5);
/// Default first wait before retrying a failed GPU initialisation or a lost
/// device: 1 s. It doubles on each failure, up to [`DEFAULT_RETRY_MAX`].
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Default longest wait between two retries: 60 s.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);

/// GPU and host telemetry settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Run the sampler at all. Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Milliseconds between two samples. Each sample reads every GPU once
    /// (`gpu:<index>`) and the host once (`sys:host`). Default: 250.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Milliseconds between two reads of the expensive GPU metrics (running
    /// processes, PCIe throughput); at least `interval_ms`. Default: 5000.
    #[serde(default = "default_slow_interval_ms")]
    pub slow_interval_ms: u64,
    /// Sample the GPUs through NVML. Default: true.
    #[serde(default = "default_true")]
    pub gpu: bool,
    /// Sample host memory, swap, CPU and this process's RSS. Default: true.
    #[serde(default = "default_true")]
    pub host: bool,
    /// Milliseconds before the first retry of a failed GPU initialisation or
    /// a lost device; doubles on each failure. Default: 1000.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest wait between two retries, in milliseconds. Default: 60000.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
}

fn default_true() -> bool {
    true
}
fn default_interval_ms() -> u64 {
    DEFAULT_INTERVAL.as_millis() as u64
}
fn default_slow_interval_ms() -> u64 {
    DEFAULT_SLOW_INTERVAL.as_millis() as u64
}
fn default_retry_initial_ms() -> u64 {
    DEFAULT_RETRY_INITIAL.as_millis() as u64
}
fn default_retry_max_ms() -> u64 {
    DEFAULT_RETRY_MAX.as_millis() as u64
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            interval_ms: default_interval_ms(),
            slow_interval_ms: default_slow_interval_ms(),
            gpu: true,
            host: true,
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
        }
    }
}

impl TelemetryConfig {
    /// Checks the values; the error names the bad key.
    pub fn validate(&self) -> Result<()> {
        let key = |k: &str| format!("telemetry.{k}");
        if self.interval_ms == 0 {
            return Err(Error::config(key("interval_ms"), "must be at least 1"));
        }
        if self.slow_interval_ms < self.interval_ms {
            return Err(Error::config(
                key("slow_interval_ms"),
                format!(
                    "{} is shorter than interval_ms ({})",
                    self.slow_interval_ms, self.interval_ms
                ),
            ));
        }
        if self.retry_initial_ms == 0 {
            return Err(Error::config(key("retry_initial_ms"), "must be at least 1"));
        }
        if self.retry_max_ms < self.retry_initial_ms {
            return Err(Error::config(
                key("retry_max_ms"),
                format!(
                    "{} is shorter than retry_initial_ms ({})",
                    self.retry_max_ms, self.retry_initial_ms
                ),
            ));
        }
        Ok(())
    }

    /// `interval_ms` as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// `slow_interval_ms` as a duration.
    pub fn slow_interval(&self) -> Duration {
        Duration::from_millis(self.slow_interval_ms)
    }

    /// `retry_initial_ms` as a duration.
    pub fn retry_initial(&self) -> Duration {
        Duration::from_millis(self.retry_initial_ms)
    }

    /// `retry_max_ms` as a duration.
    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches serde defaults drifting from `Default` (the TOML and code
    // paths would then disagree).
    #[test]
    fn empty_table_equals_default() {
        let c: TelemetryConfig = toml::from_str("").expect("empty table");
        assert_eq!(c, TelemetryConfig::default());
        assert_eq!(c.interval(), DEFAULT_INTERVAL);
        c.validate().expect("defaults are valid");
    }

    // Catches a misspelt key being silently ignored.
    #[test]
    fn unknown_key_is_named() {
        let e = toml::from_str::<TelemetryConfig>("interval = 5").expect_err("unknown key");
        assert!(e.to_string().contains("interval"), "{e}");
    }

    // Catches out-of-range values passing validation, and errors that do not
    // say which key is wrong.
    #[test]
    fn bad_values_name_their_key() {
        let bad = [
            (
                TelemetryConfig {
                    interval_ms: 0,
                    ..Default::default()
                },
                "telemetry.interval_ms",
            ),
            (
                TelemetryConfig {
                    slow_interval_ms: 100,
                    ..Default::default()
                },
                "telemetry.slow_interval_ms",
            ),
            (
                TelemetryConfig {
                    retry_initial_ms: 0,
                    ..Default::default()
                },
                "telemetry.retry_initial_ms",
            ),
            (
                TelemetryConfig {
                    retry_max_ms: 10,
                    ..Default::default()
                },
                "telemetry.retry_max_ms",
            ),
        ];
        for (c, key) in bad {
            let e = c.validate().expect_err(key);
            assert!(e.to_string().contains(key), "{e}");
        }
    }
}
