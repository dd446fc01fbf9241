//! The whole configuration file, and [`Spillway`]: the engine wired to its
//! sinks and samplers from one data directory.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tracing_subscriber::prelude::*;
//!
//! let mut spillway = spillway::Spillway::open("spillway-data")?;      // engine, segments, index
//! tracing_subscriber::registry().with(spillway.layer()).init();       // 1. install the layer
//! let bus = spillway.bus(Arc::new(spillway::MessageBus::new()));      // 2. wrap the bus
//! spillway.start_telemetry()?;                                        // 3. start telemetry
//! bus.publish("data:users:created", serde_json::json!({ "id": 42 }))?;
//! # Ok::<(), spillway::Error>(())
//! ```
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
//! [segments]       # zstd segment files (see SegmentConfig)
//! durability = "buffered"
//! [index]          # the SQLite indexer (see IndexConfig)
//! rows_per_transaction = 5000
//! [logs]           # the tracing layer (see LogConfig)
//! urgent_level = "warn"
//! [telemetry]      # GPU and host samplers (see TelemetryConfig)
//! interval_ms = 250
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layer::bus::{BatchingBus, InnerBus};
use crate::layer::config::BatchConfig;
use crate::layer::engine::{Engine, Guard};
use crate::layer::tracing_layer::{LogConfig, SpillwayLayer};
use crate::sinks::index::{IndexConfig, Indexer, IndexerHandle};
use crate::sinks::segment::reader::Damage;
use crate::sinks::segment::{create_dir_private, SegmentConfig, SegmentSink};
use crate::telemetry::{Telemetry, TelemetryConfig};

/// The configuration file (`spillway.toml`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The engine's policies and bounds.
    #[serde(default)]
    pub batch: BatchConfig,
    /// The tracing layer.
    #[serde(default)]
    pub logs: LogConfig,
    /// Segment files: frames, rotation, retention, durability.
    #[serde(default)]
    pub segments: SegmentConfig,
    /// The SQLite index that follows the segments.
    #[serde(default)]
    pub index: IndexConfig,
    /// The GPU and host samplers.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
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

/// The pipeline for one data directory: the engine with its sinks, and the
/// samplers once started. Dropping it stops the samplers, flushes (within
/// `batch.shutdown_timeout_ms`) and stops the engine; it never hangs.
#[must_use = "dropping Spillway shuts the pipeline down"]
pub struct Spillway {
    dir: PathBuf,
    config: Config,
    engine: Engine,
    telemetry: Option<Telemetry>,
    guard: Option<Guard>,
    indexer: Option<IndexerHandle>,
    recovered: Vec<Damage>,
}

impl Spillway {
    /// Opens (creating it, owner-only) the data directory with the default configuration.
    pub fn open(dir: impl AsRef<Path>) -> Result<Spillway> {
        Spillway::open_with(dir, Config::default())
    }

    /// Opens the data directory with `config`.
    pub fn open_with(dir: impl AsRef<Path>, config: Config) -> Result<Spillway> {
        let dir = dir.as_ref().to_path_buf();
        create_dir_private(&dir)?;
        config.telemetry.validate()?;
        let segments = SegmentSink::open(&dir, config.segments.clone())?;
        let recovered = segments.recovered().to_vec();
        let (engine, guard) = Engine::builder(config.batch.clone())
            .sink(Box::new(segments))
            .build()?;
        // The index follows the segments on its own thread; a locked or
        // corrupt index.db is reported and retried there, never fatal here.
        let indexer = Indexer::spawn(&dir, config.index.clone())?;
        Ok(Spillway {
            dir,
            config,
            engine,
            telemetry: None,
            guard: Some(guard),
            indexer: Some(indexer),
            recovered,
        })
    }

    /// The engine: publish, flush, stats.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Torn frames cut off the segment files when the directory was opened
    /// (after a crash: the records that were still being written).
    pub fn recovered(&self) -> &[Damage] {
        &self.recovered
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A tracing layer feeding this pipeline, configured by `[logs]`.
    pub fn layer(&self) -> SpillwayLayer {
        SpillwayLayer::builder(&self.engine)
            .config(self.config.logs.clone())
            .build()
    }

    /// Wraps the service's bus: publishes go through this pipeline; batch
    /// and passthrough events are delivered on `inner`.
    pub fn bus(&self, inner: Arc<dyn InnerBus>) -> BatchingBus {
        BatchingBus::new(&self.engine, inner)
    }

    /// Starts the GPU (NVML) and host samplers configured by `[telemetry]`.
    /// A missing GPU is not an error: the summaries say `unavailable: <reason>`.
    pub fn start_telemetry(&mut self) -> Result<&Telemetry> {
        if self.telemetry.is_none() {
            self.telemetry = Some(Telemetry::start(
                &self.engine,
                self.config.telemetry.clone(),
            )?);
        }
        self.telemetry
            .as_ref()
            .ok_or_else(|| Error::Other("telemetry did not start".into()))
    }

    /// Starts telemetry with sources of your choosing (a fake GPU, host only).
    pub fn start_telemetry_with(
        &mut self,
        gpu: Option<Box<dyn crate::telemetry::GpuSource>>,
        host: Option<crate::telemetry::HostSource>,
    ) -> Result<&Telemetry> {
        let t = Telemetry::start_with(&self.engine, self.config.telemetry.clone(), gpu, host)?;
        Ok(self.telemetry.insert(t))
    }

    /// The samplers, once started.
    pub fn telemetry(&self) -> Option<&Telemetry> {
        self.telemetry.as_ref()
    }

    /// See [`Engine::flush`].
    pub fn flush(&self) -> Result<()> {
        self.engine.flush()
    }

    /// The background indexer (status, lag, catch-up).
    pub fn indexer(&self) -> Option<&IndexerHandle> {
        self.indexer.as_ref()
    }

    /// Flushes, then waits (up to `timeout`) until the index holds every
    /// record written so far.
    pub fn flush_and_index(&self, timeout: std::time::Duration) -> Result<()> {
        self.engine.flush_timeout(timeout)?;
        if let Some(ix) = &self.indexer {
            ix.catch_up_now(timeout)?;
        }
        Ok(())
    }
}

impl Drop for Spillway {
    fn drop(&mut self) {
        // Samplers first, so their last window is in the final flush.
        if let Some(mut t) = self.telemetry.take() {
            t.stop(std::time::Duration::from_secs(2));
        }
        drop(self.guard.take());
        // Then index what the final flush wrote, within the indexer's stop deadline.
        if let Some(ix) = self.indexer.take() {
            let _ = ix.catch_up_now(self.config.index.stop_timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches the documented example (README, spillway.example.toml) drifting
    // from the defaults the code actually uses.
    #[test]
    fn the_example_file_states_the_defaults() {
        let example = include_str!("spillway.example.toml");
        assert_eq!(Config::from_toml(example).unwrap(), Config::default());
        // And the README shows that same file.
        let readme = include_str!("README.md");
        let block = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block in the README");
        assert_eq!(
            block, example,
            "README's configuration block differs from spillway.example.toml"
        );
    }

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
