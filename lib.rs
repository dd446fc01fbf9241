//! # spillway: flood control for busy services
//!
//! One coalescing pipeline takes what a busy service emits (bus publishes,
//! `tracing` events, telemetry samples), groups it by key prefix, and releases
//! it in batches: one `<prefix>:batch` event per batch instead of a spray of
//! single events.
//!
//! ```
//! use std::sync::Arc;
//! use spillway::{BatchConfig, BatchingBus, Engine, MessageBus};
//!
//! let (engine, _guard) = Engine::builder(BatchConfig::default()).build()?;
//! let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
//! bus.publish("data:users:created", serde_json::json!({ "id": 42 }))?;
//! bus.flush()?;
//! # Ok::<(), spillway::Error>(())
//! ```

mod error;
pub mod layer;
mod setup;
pub mod sinks;
pub mod telemetry;

pub use error::{Error, Result};
pub use layer::bus::{
    BatchAwareSubscriber, BatchStream, BatchingBus, InnerBus, Lagged, MessageBus, SubscriptionId,
};
pub use layer::config::{default_rules, BatchConfig, BatchConfigBuilder, OnFull, Policy};
pub use layer::engine::{Engine, EngineBuilder, Guard, PrefixStats, Sink, Stats};
pub use layer::name::{prefix_of, validate_name, Pattern};
pub use layer::record::{
    now_ns, rfc3339, Batch, BusEvent, FieldValue, Level, LogRecord, Payload, RecordKind, Records,
    SpanRecord,
};
pub use layer::summary::{StatsReducer, Summarizer};
pub use layer::tracing_layer::{LogConfig, SpillwayLayer, SpillwayLayerBuilder};
pub use setup::{Config, Spillway};
pub use sinks::index::{
    Index, IndexConfig, IndexReader, Indexer, IndexerHandle, Query, QueryRecord,
};
pub use sinks::segment::reader::{Damage, Frame, FrameReader, ReadItem, SegmentReader};
pub use sinks::segment::{list_segments, Durability, SegmentConfig, SegmentSink, Stream};
pub use telemetry::{GpuSource, GpuStatus, Telemetry, TelemetryConfig};

// The README's examples compile and run as doctests.
#[doc = include_str!("README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
