//! The `tracing` layer: every event becomes a [`LogRecord`] in the engine.
//!
//! [`SpillwayLayer`] is a [`tracing_subscriber::Layer`] that composes with the
//! rest of a registry (an `EnvFilter`, per-layer filters, the fmt layer). Each
//! event it sees is captured into an owned record (timestamp, level, target,
//! module path, file:line, the formatted message, its other fields with their
//! types kept, and the names and fields of its enclosing spans, outermost
//! first) and handed to the engine under the key `log:<target>`, so policies
//! can batch and route logs per module. Events at or above
//! [`LogConfig::urgent_level`] (WARN by default) are submitted as *urgent*:
//! the engine closes their batch at its next sweep instead of waiting for the
//! policy's interval, and sinks write it through at once.
//!
//! Records from the `log` crate arrive through `tracing-log`'s `LogTracer`
//! and keep the `log` record's own target, module, file and line.
//!
//! ```
//! use spillway::{BatchConfig, Engine, SpillwayLayer};
//! use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};
//!
//! let (engine, _guard) = Engine::builder(BatchConfig::default()).build()?;
//! // `log` records, too (optional; once per process).
//! tracing_log::LogTracer::init().expect("no other logger is installed");
//! tracing_subscriber::registry()
//!     .with(EnvFilter::new("info"))
//!     .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
//!     .with(SpillwayLayer::new(&engine))
//!     .init();
//!
//! tracing::info!(target: "myapp::db", rows = 3_u64, "transaction committed");
//! tracing::debug!(target: "myapp::db", "filtered out by the EnvFilter");
//! tracing_log::log::warn!(target: "legacy::module", "from the log crate");
//! engine.flush()?;
//! assert_eq!(engine.stats().total.accepted, 2);
//! # Ok::<(), spillway::Error>(())
//! ```
//!
//! The capture is built for the caller's cost: no JSON, no I/O and no
//! allocation per event on the caller's thread. The message and fields are
//! visited into the thread's reusable buffers and copied into its current
//! chunk (whose buffers are recycled too); the engine thread builds the
//! [`LogRecord`], reusing delivered ones. Field names are borrowed
//! (`&'static str`), and span fields are captured once per span (and once
//! per `span.record`) rather than once per event: each event only clones the
//! `Arc`s of its enclosing spans. Records from the `log` crate, whose
//! metadata is not `'static`, are built on the caller's thread.
//! `spillway bench --only logs` measures it against tracing-subscriber's
//! JSON fmt layer.
//!
//! Field values are formatted with no lock held, so a `Debug` impl that logs
//! cannot deadlock the layer: a `tracing` event it emits is dropped by
//! tracing-core itself (the dispatcher is busy with the outer event), and a
//! record it hands the engine directly is taken like any other.
//!
//! Events emitted on the engine's sink thread (a sink logging about its own
//! writes) are not captured: they would feed the sink that emitted them, and a
//! sink that logs on every failed write would keep itself busy forever. They
//! still reach the registry's other layers.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Event, Level, Metadata, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::error::{Error, Result};
use crate::layer::capture::{Arena, ArenaVisitor, Parts};
use crate::layer::engine::Engine;
use crate::layer::record::{now_ns, LogRecord, SpanRecord};

/// Default level at and above which records are urgent: WARN.
pub const DEFAULT_URGENT_LEVEL: Level = Level::WARN;
/// Default for attaching enclosing spans to records: on.
pub const DEFAULT_SPANS: bool = true;
/// Default for attaching file, line and module path to records: on.
pub const DEFAULT_INCLUDE_LOCATION: bool = true;

/// The name of the engine's sink thread (see the module docs for why its
/// events are not captured).
const SINK_THREAD: &str = "spillway-sink";

/// How the tracing layer captures events: the `[logs]` table of the config file.
///
/// ```
/// let c: spillway::LogConfig = toml::from_str(r#"
///     urgent_level = "error"
///     spans = false
/// "#).unwrap();
/// assert_eq!(c.urgent_level, tracing::Level::ERROR);
/// assert!(c.include_location);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Records at this level or more severe (one of `trace`, `debug`, `info`,
    /// `warn`, `error`) are urgent: their batch closes at the engine's next
    /// sweep and is written through at once, so an ERROR reaches disk promptly.
    #[serde(
        default = "default_urgent_level",
        serialize_with = "serialize_level",
        deserialize_with = "deserialize_level"
    )]
    pub urgent_level: Level,
    /// Attach the names and fields of the spans enclosing each event.
    #[serde(default = "default_spans")]
    pub spans: bool,
    /// Attach each event's file, line and module path.
    #[serde(default = "default_include_location")]
    pub include_location: bool,
}

fn default_urgent_level() -> Level {
    DEFAULT_URGENT_LEVEL
}
fn default_spans() -> bool {
    DEFAULT_SPANS
}
fn default_include_location() -> bool {
    DEFAULT_INCLUDE_LOCATION
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            urgent_level: DEFAULT_URGENT_LEVEL,
            spans: DEFAULT_SPANS,
            include_location: DEFAULT_INCLUDE_LOCATION,
        }
    }
}

/// Parses a level name as written in the config file (case-insensitive).
/// The error names `key` and quotes the value.
pub fn parse_level(key: &str, text: &str) -> Result<Level> {
    match text.to_ascii_lowercase().as_str() {
        "trace" => Ok(Level::TRACE),
        "debug" => Ok(Level::DEBUG),
        "info" => Ok(Level::INFO),
        "warn" => Ok(Level::WARN),
        "error" => Ok(Level::ERROR),
        _ => Err(Error::config(
            key,
            format!("unknown level {text:?} (expected one of trace, debug, info, warn, error)"),
        )),
    }
}

fn serialize_level<S: Serializer>(level: &Level, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&level.as_str().to_ascii_lowercase())
}

fn deserialize_level<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Level, D::Error> {
    let text = String::deserialize(d)?;
    parse_level("urgent_level", &text).map_err(serde::de::Error::custom)
}

/// A [`Layer`] that hands every event to an [`Engine`] as a [`LogRecord`].
/// See the [module docs](self) for how to install it.
#[derive(Clone, Debug)]
pub struct SpillwayLayer {
    engine: Engine,
    config: LogConfig,
}

impl SpillwayLayer {
    /// A layer feeding `engine`, with the default [`LogConfig`].
    pub fn new(engine: &Engine) -> SpillwayLayer {
        SpillwayLayer::builder(engine).build()
    }

    /// A builder for a layer feeding `engine`.
    pub fn builder(engine: &Engine) -> SpillwayLayerBuilder {
        SpillwayLayerBuilder {
            engine: engine.clone(),
            config: LogConfig::default(),
        }
    }

    /// The configuration this layer captures with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }
}

/// Builds a [`SpillwayLayer`] from a [`LogConfig`] or setting by setting.
#[derive(Debug)]
pub struct SpillwayLayerBuilder {
    engine: Engine,
    config: LogConfig,
}

impl SpillwayLayerBuilder {
    /// Replaces every setting with those of `config` (the `[logs]` table).
    pub fn config(mut self, config: LogConfig) -> Self {
        self.config = config;
        self
    }
    /// Records at `level` or more severe are urgent.
    pub fn urgent_level(mut self, level: Level) -> Self {
        self.config.urgent_level = level;
        self
    }
    /// Attach enclosing spans (names and fields) or not.
    pub fn spans(mut self, on: bool) -> Self {
        self.config.spans = on;
        self
    }
    /// Attach file, line and module path or not.
    pub fn include_location(mut self, on: bool) -> Self {
        self.config.include_location = on;
        self
    }
    /// The layer.
    pub fn build(self) -> SpillwayLayer {
        SpillwayLayer {
            engine: self.engine,
            config: self.config,
        }
    }
}

/// A span's captured name and fields, kept in the span's extensions.
/// A private type, so no other layer's extension can collide with it.
struct SpanFields(Arc<SpanRecord>);

thread_local! {
    // Computed once per thread: whether this is the engine's sink thread.
    static ON_SINK_THREAD: bool = std::thread::current().name() == Some(SINK_THREAD);
    // The thread's capture buffers (see `layer::capture`).
    static SCRATCH: RefCell<Arena> = RefCell::new(Arena::default());
}

impl<S> Layer<S> for SpillwayLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if !self.config.spans {
            return;
        }
        let meta = attrs.metadata();
        // Visit before taking the extensions lock: a field's `Debug` may log.
        let record = SpanRecord {
            name: Cow::Borrowed(meta.name()),
            fields: span_fields(|v| attrs.record(v)),
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().replace(SpanFields(Arc::new(record)));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if !self.config.spans || values.is_empty() {
            return;
        }
        // Visit before taking the extensions lock: a field's `Debug` may log.
        let update = span_fields(|v| values.record(v));
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(SpanFields(arc)) = ext.get_mut::<SpanFields>() else {
            return;
        };
        // Copy-on-write: events already captured keep the values they saw.
        let record = Arc::make_mut(arc);
        for (name, value) in update {
            match record.fields.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = value,
                None => record.fields.push((name, value)),
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if ON_SINK_THREAD.try_with(|on| *on).unwrap_or(false) {
            return;
        }
        let urgent = *event.metadata().level() <= self.config.urgent_level;
        if event.normalized_metadata().is_none() {
            // The common case: captured into the thread's buffers, no allocation.
            // Busy buffers (a field's `Debug` logging from inside the capture)
            // or a thread in teardown take the allocating path below.
            let done = SCRATCH.try_with(|cell| {
                let Ok(mut arena) = cell.try_borrow_mut() else {
                    return false;
                };
                arena.clear();
                let ts_ns = now_ns();
                let parts = self.capture_into(&mut arena, event, &ctx, false);
                // Fails only after shutdown; the event still reaches the other layers.
                let _ = self.engine.shared.submit_captured(
                    event.metadata(),
                    ts_ns,
                    &mut arena,
                    &parts,
                    self.config.include_location,
                    urgent,
                );
                if arena.oversized() {
                    *arena = Arena::default();
                }
                true
            });
            if done.unwrap_or(false) {
                return;
            }
        }
        let record = self.capture(event, &ctx);
        let _ = self.engine.submit_log(record, urgent);
    }
}

impl SpillwayLayer {
    /// Visits `event`'s fields into `arena` and takes its spans' handles.
    fn capture_into<S>(
        &self,
        arena: &mut Arena,
        event: &Event<'_>,
        ctx: &Context<'_, S>,
        skip_log_fields: bool,
    ) -> Parts
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let mut message = 0..0;
        event.record(&mut ArenaVisitor::event(
            arena,
            &mut message,
            skip_log_fields,
        ));
        let fields = 0..arena.fields.len() as u32;
        if self.config.spans && !event.is_root() {
            if let Some(scope) = ctx.event_scope(event) {
                // The scope runs leaf to root; records list spans outermost first.
                for span in scope {
                    if let Some(SpanFields(arc)) = span.extensions().get::<SpanFields>() {
                        arena.spans.push(arc.clone());
                    }
                }
                arena.spans.reverse();
            }
        }
        Parts {
            message,
            fields,
            spans: 0..arena.spans.len() as u32,
        }
    }

    /// Captures `event` into an owned record, boxed once here so that it
    /// moves through the pipeline as a pointer (records from the `log`
    /// crate, whose metadata is not `'static`, and re-entrant captures).
    fn capture<S>(&self, event: &Event<'_>, ctx: &Context<'_, S>) -> Box<LogRecord>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let ts_ns = now_ns();
        let mut arena = Arena::default();
        let Some(log_meta) = event.normalized_metadata() else {
            let parts = self.capture_into(&mut arena, event, ctx, false);
            return Box::new(captured_record(
                event.metadata(),
                ts_ns,
                &arena,
                &parts,
                self.config.include_location,
            ));
        };
        // A `log` record: its target and location live in the event's
        // fields, borrowed from the record, so they are copied.
        let parts = self.capture_into(&mut arena, event, ctx, true);
        let location = self.config.include_location;
        Box::new(LogRecord {
            ts_ns,
            level: *log_meta.level(),
            target: Cow::Owned(log_meta.target().to_owned()),
            module_path: log_meta
                .module_path()
                .filter(|_| location)
                .map(|m| Cow::Owned(m.to_owned())),
            file: log_meta
                .file()
                .filter(|_| location)
                .map(|f| Cow::Owned(f.to_owned())),
            line: log_meta.line().filter(|_| location),
            message: arena.str(&parts.message).to_owned(),
            fields: arena.field_values(&parts.fields),
            spans: arena.span_list(&parts.spans).to_vec(),
        })
    }
}

/// The record of an event captured into `arena` at `parts`, with the
/// event's `'static` metadata (file, line and module only with `location`).
pub(crate) fn captured_record(
    meta: &'static Metadata<'static>,
    ts_ns: i64,
    arena: &Arena,
    parts: &Parts,
    location: bool,
) -> LogRecord {
    let mut rec = LogRecord {
        ts_ns,
        level: *meta.level(),
        target: Cow::Borrowed(meta.target()),
        module_path: None,
        file: None,
        line: None,
        message: String::new(),
        fields: Vec::new(),
        spans: Vec::new(),
    };
    fill_record(&mut rec, meta, ts_ns, arena, parts, location);
    rec
}

/// Overwrites `rec` with the event captured into `arena` at `parts`,
/// reusing the memory of its message and string fields (the engine keeps
/// delivered records for this).
pub(crate) fn fill_record(
    rec: &mut LogRecord,
    meta: &'static Metadata<'static>,
    ts_ns: i64,
    arena: &Arena,
    parts: &Parts,
    location: bool,
) {
    rec.ts_ns = ts_ns;
    rec.level = *meta.level();
    rec.target = Cow::Borrowed(meta.target());
    rec.module_path = meta.module_path().filter(|_| location).map(Cow::Borrowed);
    rec.file = meta.file().filter(|_| location).map(Cow::Borrowed);
    rec.line = meta.line().filter(|_| location);
    rec.message.clear();
    rec.message.push_str(arena.str(&parts.message));
    arena.fill_fields(&mut rec.fields, &parts.fields);
    rec.spans.clear();
    rec.spans.extend_from_slice(arena.span_list(&parts.spans));
}

/// A span's fields, visited by `record`.
fn span_fields(
    record: impl FnOnce(&mut ArenaVisitor<'_>),
) -> Vec<(Cow<'static, str>, crate::layer::record::FieldValue)> {
    let mut arena = Arena::default();
    record(&mut ArenaVisitor::fields(&mut arena));
    arena.field_values(&(0..arena.fields.len() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches a config that accepts unknown keys or bad levels silently, or
    // whose error does not name the key and the value.
    #[test]
    fn log_config_rejects_bad_levels_and_unknown_keys() {
        let err = toml::from_str::<LogConfig>(r#"urgent_level = "loud""#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("urgent_level") && err.contains("\"loud\""),
            "{err}"
        );
        let err = toml::from_str::<LogConfig>("spanz = true")
            .unwrap_err()
            .to_string();
        assert!(err.contains("spanz"), "{err}");
        let err = parse_level("logs.urgent_level", "verbose")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("logs.urgent_level") && err.contains("\"verbose\""),
            "{err}"
        );
    }

    // Catches defaults that drift from the documented constants, or a
    // serialized form that does not read back.
    #[test]
    fn log_config_defaults_and_round_trip() {
        let empty: LogConfig = toml::from_str("").unwrap();
        assert_eq!(empty, LogConfig::default());
        assert_eq!(empty.urgent_level, Level::WARN);
        assert!(empty.spans && empty.include_location);
        for level in [
            Level::TRACE,
            Level::DEBUG,
            Level::INFO,
            Level::WARN,
            Level::ERROR,
        ] {
            let c = LogConfig {
                urgent_level: level,
                spans: false,
                include_location: false,
            };
            let text = toml::to_string(&c).unwrap();
            assert_eq!(toml::from_str::<LogConfig>(&text).unwrap(), c, "{text}");
        }
        assert_eq!(parse_level("k", "ERROR").unwrap(), Level::ERROR);
    }

    // Catches typed values turned into strings, or the message kept as a field.
    #[test]
    fn visitor_keeps_types_and_separates_the_message() {
        use crate::layer::record::FieldValue;
        use tracing_core::field::Visit;
        let mut arena = Arena::default();
        let mut message = 0..0;
        let mut v = ArenaVisitor::event(&mut arena, &mut message, false);
        // Field handles come from a callsite; borrow them from an enabled span.
        let _default = tracing::subscriber::set_default(tracing_subscriber::registry());
        let span = tracing::trace_span!("probe", message = 1_u64, big = 2_u64, huge = 3_u64);
        let meta = span.metadata().expect("trace spans have metadata");
        let f = |name: &str| meta.fields().field(name).unwrap();
        v.record_u64(&f("message"), 7);
        v.record_i128(&f("big"), -5);
        v.record_u128(&f("huge"), u128::MAX);
        assert_eq!(arena.str(&message), "7");
        assert_eq!(
            arena.field_values(&(0..arena.fields.len() as u32)),
            vec![
                (Cow::Borrowed("big"), FieldValue::I64(-5)),
                (
                    Cow::Borrowed("huge"),
                    FieldValue::Str(u128::MAX.to_string())
                ),
            ]
        );
    }
}
