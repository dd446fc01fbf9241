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
//! The capture is built for the caller's cost: no JSON and no I/O on the
//! caller's thread, field names borrowed (`&'static str`), one allocation for
//! the message and one for the field list, and span fields captured once per
//! span (and once per `span.record`) rather than once per event: each event
//! only clones the `Arc`s of its enclosing spans. `spillway bench --only logs`
//! measures it against tracing-subscriber's JSON fmt layer.
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
use std::fmt::{self, Write as _};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::error::{Error, Result};
use crate::layer::engine::Engine;
use crate::layer::record::{now_ns, FieldValue, LogRecord, SpanRecord};

/// Default level at and above which records are urgent: WARN.
pub const DEFAULT_URGENT_LEVEL: Level = Level::WARN;
/// Default for attaching enclosing spans to records: on.
pub const DEFAULT_SPANS: bool = true;
/// Default for attaching file, line and module path to records: on.
pub const DEFAULT_INCLUDE_LOCATION: bool = true;

/// Bytes reserved for a message before it is formatted: enough for a typical
/// log line, so most messages are written without growing.
const MESSAGE_CAPACITY: usize = 64;
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
        let mut fields = Vec::new();
        // Visit before taking the extensions lock: a field's `Debug` may log.
        attrs.record(&mut FieldVisitor::new(&mut fields, meta.fields().len()));
        let record = SpanRecord {
            name: Cow::Borrowed(meta.name()),
            fields,
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().replace(SpanFields(Arc::new(record)));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if !self.config.spans || values.is_empty() {
            return;
        }
        let mut update = Vec::new();
        // Visit before taking the extensions lock: a field's `Debug` may log.
        values.record(&mut FieldVisitor::new(&mut update, values.len()));
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
        let record = self.capture(event, &ctx);
        let urgent = record.level <= self.config.urgent_level;
        // Fails only after shutdown; the event still reaches the other layers.
        let _ = self.engine.submit_log(record, urgent);
    }
}

impl SpillwayLayer {
    /// Captures `event` into an owned record, boxed once here so that it
    /// moves through the pipeline as a pointer.
    fn capture<S>(&self, event: &Event<'_>, ctx: &Context<'_, S>) -> Box<LogRecord>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let ts_ns = now_ns();
        let meta = event.metadata();
        let mut message = String::new();
        let mut fields = Vec::new();
        let mut visitor = FieldVisitor {
            fields: &mut fields,
            capacity: meta.fields().len(),
            message: Some(&mut message),
            skip_log_fields: false,
        };
        let (target, module_path, file, line) = match event.normalized_metadata() {
            // A `log` record: its target and location live in the event's
            // fields, borrowed from the record, so they are copied.
            Some(log_meta) => {
                visitor.skip_log_fields = true;
                (
                    Cow::Owned(log_meta.target().to_owned()),
                    log_meta.module_path().map(|m| Cow::Owned(m.to_owned())),
                    log_meta.file().map(|f| Cow::Owned(f.to_owned())),
                    log_meta.line(),
                )
            }
            None => (
                Cow::Borrowed(meta.target()),
                meta.module_path().map(Cow::Borrowed),
                meta.file().map(Cow::Borrowed),
                meta.line(),
            ),
        };
        event.record(&mut visitor);
        let (module_path, file, line) = if self.config.include_location {
            (module_path, file, line)
        } else {
            (None, None, None)
        };
        let mut spans = Vec::new();
        if self.config.spans && !event.is_root() {
            if let Some(scope) = ctx.event_scope(event) {
                // The scope runs leaf to root; records list spans outermost first.
                for span in scope {
                    if let Some(SpanFields(arc)) = span.extensions().get::<SpanFields>() {
                        spans.push(arc.clone());
                    }
                }
                spans.reverse();
            }
        }
        Box::new(LogRecord {
            ts_ns,
            level: *meta.level(),
            target,
            module_path,
            file,
            line,
            message,
            fields,
            spans,
        })
    }
}

/// Collects typed fields (and, for events, the `message` field as text).
struct FieldVisitor<'a> {
    fields: &'a mut Vec<(Cow<'static, str>, FieldValue)>,
    /// How many fields there can be at most: the list is allocated once, at
    /// the first field kept, so a message-only event allocates no list at all.
    capacity: usize,
    /// Where the `message` field goes; `None` keeps it as a plain field (spans).
    message: Option<&'a mut String>,
    /// Leave out `log.target`, `log.file`, ...: a `log` record's metadata.
    skip_log_fields: bool,
}

impl<'a> FieldVisitor<'a> {
    fn new(fields: &'a mut Vec<(Cow<'static, str>, FieldValue)>, capacity: usize) -> Self {
        FieldVisitor {
            fields,
            capacity,
            message: None,
            skip_log_fields: false,
        }
    }

    /// The message buffer, if `field` is the message.
    fn message_for(&mut self, field: &Field) -> Option<&mut String> {
        if field.name() != "message" {
            return None;
        }
        let m = self.message.as_deref_mut()?;
        if m.capacity() == 0 {
            m.reserve(MESSAGE_CAPACITY);
        }
        Some(m)
    }

    fn push(&mut self, field: &Field, value: FieldValue) {
        if self.skip_log_fields && field.name().starts_with("log.") {
            return;
        }
        if self.fields.capacity() == 0 {
            self.fields.reserve_exact(self.capacity.max(1));
        }
        self.fields.push((Cow::Borrowed(field.name()), value));
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        match self.message_for(field) {
            Some(m) => {
                let _ = write!(m, "{value}");
            }
            None => self.push(field, FieldValue::I64(value)),
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match self.message_for(field) {
            Some(m) => {
                let _ = write!(m, "{value}");
            }
            None => self.push(field, FieldValue::U64(value)),
        }
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        match i64::try_from(value) {
            Ok(v) => self.record_i64(field, v),
            Err(_) => self.record_debug(field, &value),
        }
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        match u64::try_from(value) {
            Ok(v) => self.record_u64(field, v),
            Err(_) => self.record_debug(field, &value),
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        match self.message_for(field) {
            Some(m) => {
                let _ = write!(m, "{value}");
            }
            None => self.push(field, FieldValue::F64(value)),
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        match self.message_for(field) {
            Some(m) => {
                let _ = write!(m, "{value}");
            }
            None => self.push(field, FieldValue::Bool(value)),
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match self.message_for(field) {
            Some(m) => m.push_str(value),
            None => self.push(field, FieldValue::Str(value.to_owned())),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match self.message_for(field) {
            Some(m) => {
                let _ = write!(m, "{value:?}");
            }
            None => {
                if self.skip_log_fields && field.name().starts_with("log.") {
                    return;
                }
                self.push(field, FieldValue::Str(format!("{value:?}")));
            }
        }
    }
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
        let mut fields = Vec::new();
        let mut message = String::new();
        let mut v = FieldVisitor {
            fields: &mut fields,
            capacity: 3,
            message: Some(&mut message),
            skip_log_fields: false,
        };
        // Field handles come from a callsite; borrow them from an enabled span.
        let _default = tracing::subscriber::set_default(tracing_subscriber::registry());
        let span = tracing::trace_span!("probe", message = 1_u64, big = 2_u64, huge = 3_u64);
        let meta = span.metadata().expect("trace spans have metadata");
        let f = |name: &str| meta.fields().field(name).unwrap();
        v.record_u64(&f("message"), 7);
        v.record_i128(&f("big"), -5);
        v.record_u128(&f("huge"), u128::MAX);
        assert_eq!(message, "7");
        assert_eq!(
            fields,
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
