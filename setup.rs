//! The whole configuration file, and [`Spillway`]: the engine wired to its
//! sinks and samplers from one data directory.
//!
//! The file has one table per part; every key has a default, and unknown keys
//! are refused with their name:
//!
//! ```toml
//! [batch]          # the engine: policies, memory budget (see BatchConfig)
//! memory_budget_bytes = 33554432
//! [[batch.policy]]
//! pattern = "orders:*"
//! max_interval_ms = 20
//! max_count = 10
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layer::config::BatchConfig;

/// The configuration file (`spillway.toml`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The engine's policies and bounds.
    #[serde(default)]
    pub batch: BatchConfig,
}

impl Config {
    /// Parses a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: "<string>".into(),
            reason: e.to_string(),
        })
    }

    /// Reads and parses a configuration file; the error names the file and the bad key.
    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("cannot read config file", path, e))?;
        toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches a config file error that does not say which file and which key.
    #[test]
    fn load_names_the_file_and_the_unknown_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spillway.toml");
        std::fs::write(&path, "[batch]\nmemory_budget = 5\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("spillway.toml") && err.contains("memory_budget"),
            "{err}"
        );
        let err = Config::from_toml("[bacth]\n").unwrap_err().to_string();
        assert!(err.contains("bacth"), "{err}");
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }
}
