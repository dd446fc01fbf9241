//! Batching policies and the engine's configuration.
//!
//! A [`BatchConfig`] is an ordered table of `pattern -> policy`: the first
//! pattern that matches an event's *name* decides its policy, and
//! [`BatchConfig::default_policy`] catches the rest. The built-in table is the
//! one from the user's design ([`default_rules`]); rules you add go in front of
//! it, so they win, unless you turn the built-in rules off.
//!
//! The same value comes from TOML (the `[batch]` table of the config file) or
//! from the builder:
//!
//! ```
//! use spillway::{BatchConfig, Policy};
//! use std::time::Duration;
//!
//! let from_toml: BatchConfig = toml::from_str(r#"
//!     memory_budget_bytes = 16777216
//!     [[policy]]
//!     pattern = "orders:*"
//!     max_interval_ms = 20
//!     max_count = 10
//! "#).unwrap();
//!
//! let built = BatchConfig::builder()
//!     .memory_budget(16 << 20)
//!     .policy("orders:*", Policy::batch(Duration::from_millis(20), 10))
//!     .build()
//!     .unwrap();
//! assert_eq!(from_toml, built);
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layer::name::{Pattern, DEFAULT_PREFIX_DEPTH};

/// Default batch window, from the batch's first event: 50 ms (the user's default).
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_millis(50);
/// Default number of events that closes a batch: 100 (the user's default).
pub const DEFAULT_MAX_COUNT: usize = 100;
/// Default batch size in (estimated) bytes that closes a batch: 1 MiB.
pub const DEFAULT_MAX_BYTES: usize = 1 << 20;
/// Default global budget for everything queued in the engine: 32 MiB.
pub const DEFAULT_MEMORY_BUDGET: usize = 32 << 20;
/// Default time a publisher waits for room under [`OnFull::Block`]: 10 ms.
pub const DEFAULT_BLOCK_TIMEOUT: Duration = Duration::from_millis(10);
/// Default deadline for the flush that dropping the guard performs: 5 s.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a publisher does when the engine's memory budget is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Wait up to the policy's `block_timeout` for room, then drop the new record.
    Block,
    /// Drop the new record.
    DropNewest,
    /// Make room by dropping the oldest records still waiting in this prefix's
    /// open batch (waiting up to `block_timeout` for the engine to do so; a
    /// record that still does not fit is dropped itself).
    DropOldest,
}

/// How the events matching one pattern are batched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Close a batch this long after its first event.
    #[serde(
        rename = "max_interval_ms",
        with = "millis",
        default = "default_max_interval"
    )]
    pub max_interval: Duration,
    /// Close a batch when it holds this many events.
    #[serde(default = "default_max_count")]
    pub max_count: usize,
    /// Close a batch when its events' estimated size reaches this many bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Deliver each event to subscribers at once (still persisted if `persist`).
    #[serde(default)]
    pub passthrough: bool,
    /// Write these events to segments (and so to SQLite).
    #[serde(default = "default_true")]
    pub persist: bool,
    /// What to do when the memory budget is spent.
    #[serde(default = "default_on_full")]
    pub on_full: OnFull,
    /// How long [`OnFull::Block`] (and [`OnFull::DropOldest`]) waits for room.
    #[serde(
        rename = "block_timeout_ms",
        with = "millis",
        default = "default_block_timeout"
    )]
    pub block_timeout: Duration,
    /// Republish a summary (by the named reducer) instead of the raw events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summarize: Option<String>,
    /// Batch by this many leading segments instead of the engine's `prefix_depth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_depth: Option<usize>,
}

fn default_max_interval() -> Duration {
    DEFAULT_MAX_INTERVAL
}
fn default_max_count() -> usize {
    DEFAULT_MAX_COUNT
}
fn default_max_bytes() -> usize {
    DEFAULT_MAX_BYTES
}
fn default_true() -> bool {
    true
}
fn default_on_full() -> OnFull {
    OnFull::Block
}
fn default_block_timeout() -> Duration {
    DEFAULT_BLOCK_TIMEOUT
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_interval: DEFAULT_MAX_INTERVAL,
            max_count: DEFAULT_MAX_COUNT,
            max_bytes: DEFAULT_MAX_BYTES,
            passthrough: false,
            persist: true,
            on_full: OnFull::Block,
            block_timeout: DEFAULT_BLOCK_TIMEOUT,
            summarize: None,
            prefix_depth: None,
        }
    }
}

impl Policy {
    /// A batching policy: close on `max_interval` or `max_count`, whichever first.
    pub fn batch(max_interval: Duration, max_count: usize) -> Policy {
        Policy {
            max_interval,
            max_count,
            ..Policy::default()
        }
    }

    /// A passthrough policy: every event is delivered at once, and persisted.
    pub fn passthrough() -> Policy {
        Policy {
            passthrough: true,
            ..Policy::default()
        }
    }

    /// Sets `max_bytes`.
    pub fn max_bytes(mut self, max_bytes: usize) -> Policy {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets `persist`.
    pub fn persist(mut self, persist: bool) -> Policy {
        self.persist = persist;
        self
    }

    /// Sets `on_full` (and, for [`OnFull::Block`], keeps the current timeout).
    pub fn on_full(mut self, on_full: OnFull) -> Policy {
        self.on_full = on_full;
        self
    }

    /// Sets `block_timeout`.
    pub fn block_timeout(mut self, timeout: Duration) -> Policy {
        self.block_timeout = timeout;
        self
    }

    /// Sets the summarizing reducer by name (`"stats"` is built in).
    pub fn summarize(mut self, reducer: impl Into<String>) -> Policy {
        self.summarize = Some(reducer.into());
        self
    }

    /// Sets the prefix depth for the events this policy matches.
    pub fn prefix_depth(mut self, depth: usize) -> Policy {
        self.prefix_depth = Some(depth);
        self
    }

    fn validate(&self, key: &str) -> Result<()> {
        if self.max_count == 0 {
            return Err(Error::config(
                format!("{key}.max_count"),
                "must be at least 1",
            ));
        }
        if self.max_bytes == 0 {
            return Err(Error::config(
                format!("{key}.max_bytes"),
                "must be at least 1",
            ));
        }
        if self.max_interval.is_zero() && !self.passthrough {
            return Err(Error::config(
                format!("{key}.max_interval_ms"),
                "must be at least 1 ms (use passthrough = true for no batching)",
            ));
        }
        if self.prefix_depth == Some(0) {
            return Err(Error::config(
                format!("{key}.prefix_depth"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The user's default table (DESIGN.md section 3).
///
/// | pattern | policy |
/// |---|---|
/// | `chat:*`, `presence:*`, `sentinel:*:status`, `health:*` | passthrough |
/// | `data:*` | 50 ms / 100 events |
/// | `code_index:*` | 200 ms / 500 events |
/// | `gpu:*`, `sys:*` | 1000 ms / 50 samples, summarized, one window for all devices |
/// | `training:*` | 500 ms / 20 events |
pub fn default_rules() -> Vec<(Pattern, Policy)> {
    let ms = Duration::from_millis;
    let rule = |p: &str, policy| (Pattern::parse(p).expect("built-in pattern"), policy);
    vec![
        rule("chat:*", Policy::passthrough()),
        rule("presence:*", Policy::passthrough()),
        rule("sentinel:*:status", Policy::passthrough()),
        rule("health:*", Policy::passthrough()),
        rule("data:*", Policy::batch(ms(50), 100)),
        rule("code_index:*", Policy::batch(ms(200), 500)),
        rule(
            "gpu:*",
            Policy::batch(ms(1000), 50)
                .summarize("stats")
                .prefix_depth(1),
        ),
        rule(
            "sys:*",
            Policy::batch(ms(1000), 50)
                .summarize("stats")
                .prefix_depth(1),
        ),
        rule("training:*", Policy::batch(ms(500), 20)),
    ]
}

/// The engine's configuration: the policy table, the memory budget and the
/// shutdown deadline. Build it with [`BatchConfig::builder`] or deserialize it
/// from TOML; both validate the same way.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchConfig {
    /// Segments in a batching prefix (default 2).
    pub prefix_depth: usize,
    /// Bytes (estimated) that may be queued in the engine at once.
    pub memory_budget: usize,
    /// Deadline for the flush performed when the guard is dropped.
    pub shutdown_timeout: Duration,
    /// The policy for names that match no rule.
    pub default_policy: Policy,
    /// The rules, in order; the first match wins.
    pub rules: Vec<(Pattern, Policy)>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            prefix_depth: DEFAULT_PREFIX_DEPTH,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            default_policy: Policy::default(),
            rules: default_rules(),
        }
    }
}

impl BatchConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> BatchConfigBuilder {
        BatchConfigBuilder::default()
    }

    /// The index of the policy for `name` (`rules.len()` means the default).
    pub(crate) fn policy_index(&self, name: &str) -> usize {
        self.rules
            .iter()
            .position(|(p, _)| p.matches(name))
            .unwrap_or(self.rules.len())
    }

    /// The policy at `index` as returned by `policy_index`.
    pub(crate) fn policy_at(&self, index: usize) -> &Policy {
        self.rules
            .get(index)
            .map(|(_, p)| p)
            .unwrap_or(&self.default_policy)
    }

    /// The policy that applies to `name`.
    pub fn policy_for(&self, name: &str) -> &Policy {
        self.policy_at(self.policy_index(name))
    }

    fn validate(&self) -> Result<()> {
        if self.prefix_depth == 0 {
            return Err(Error::config("prefix_depth", "must be at least 1"));
        }
        if !(4096..=1 << 48).contains(&self.memory_budget) {
            return Err(Error::config(
                "memory_budget_bytes",
                format!("{} is out of range (4096 to 2^48)", self.memory_budget),
            ));
        }
        self.default_policy.validate("default")?;
        for (pattern, policy) in &self.rules {
            policy.validate(&format!("policy[{pattern}]"))?;
        }
        Ok(())
    }
}

/// Builds a validated [`BatchConfig`].
#[derive(Debug)]
pub struct BatchConfigBuilder {
    config: BatchConfig,
    user_rules: Vec<(String, Policy)>,
    builtin_rules: bool,
}

impl Default for BatchConfigBuilder {
    fn default() -> Self {
        BatchConfigBuilder {
            config: BatchConfig::default(),
            user_rules: Vec::new(),
            builtin_rules: true,
        }
    }
}

impl BatchConfigBuilder {
    /// Segments in a batching prefix.
    pub fn prefix_depth(mut self, depth: usize) -> Self {
        self.config.prefix_depth = depth;
        self
    }
    /// Bytes that may be queued in the engine at once.
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.config.memory_budget = bytes;
        self
    }
    /// Deadline for the guard's flush on drop.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }
    /// The policy for names no rule matches.
    pub fn default_policy(mut self, policy: Policy) -> Self {
        self.config.default_policy = policy;
        self
    }
    /// Adds a rule; rules added here are tried in order, before the built-in ones.
    pub fn policy(mut self, pattern: impl Into<String>, policy: Policy) -> Self {
        self.user_rules.push((pattern.into(), policy));
        self
    }
    /// Keeps or drops the built-in rules ([`default_rules`]); on by default.
    pub fn builtin_rules(mut self, on: bool) -> Self {
        self.builtin_rules = on;
        self
    }
    /// Validates and returns the configuration.
    pub fn build(self) -> Result<BatchConfig> {
        let mut config = self.config;
        let mut rules = Vec::with_capacity(self.user_rules.len() + config.rules.len());
        for (text, policy) in self.user_rules {
            rules.push((Pattern::parse(&text)?, policy));
        }
        if self.builtin_rules {
            rules.extend(default_rules());
        }
        config.rules = rules;
        config.validate()?;
        Ok(config)
    }
}

/// The `[batch]` table as written in TOML.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawBatchConfig {
    #[serde(default = "default_prefix_depth")]
    prefix_depth: usize,
    #[serde(default = "default_memory_budget")]
    memory_budget_bytes: usize,
    #[serde(
        rename = "shutdown_timeout_ms",
        with = "millis",
        default = "default_shutdown_timeout"
    )]
    shutdown_timeout: Duration,
    #[serde(default = "default_true")]
    builtin_rules: bool,
    #[serde(default)]
    default: Policy,
    #[serde(default)]
    policy: Vec<RawRule>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    pattern: String,
    #[serde(
        rename = "max_interval_ms",
        with = "millis",
        default = "default_max_interval"
    )]
    max_interval: Duration,
    #[serde(default = "default_max_count")]
    max_count: usize,
    #[serde(default = "default_max_bytes")]
    max_bytes: usize,
    #[serde(default)]
    passthrough: bool,
    #[serde(default = "default_true")]
    persist: bool,
    #[serde(default = "default_on_full")]
    on_full: OnFull,
    #[serde(
        rename = "block_timeout_ms",
        with = "millis",
        default = "default_block_timeout"
    )]
    block_timeout: Duration,
    #[serde(default)]
    summarize: Option<String>,
    #[serde(default)]
    prefix_depth: Option<usize>,
}

fn default_prefix_depth() -> usize {
    DEFAULT_PREFIX_DEPTH
}
fn default_memory_budget() -> usize {
    DEFAULT_MEMORY_BUDGET
}
fn default_shutdown_timeout() -> Duration {
    DEFAULT_SHUTDOWN_TIMEOUT
}

impl<'de> Deserialize<'de> for BatchConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawBatchConfig::deserialize(d)?;
        let mut b = BatchConfig::builder()
            .prefix_depth(raw.prefix_depth)
            .memory_budget(raw.memory_budget_bytes)
            .shutdown_timeout(raw.shutdown_timeout)
            .default_policy(raw.default)
            .builtin_rules(raw.builtin_rules);
        for r in raw.policy {
            let policy = Policy {
                max_interval: r.max_interval,
                max_count: r.max_count,
                max_bytes: r.max_bytes,
                passthrough: r.passthrough,
                persist: r.persist,
                on_full: r.on_full,
                block_timeout: r.block_timeout,
                summarize: r.summarize,
                prefix_depth: r.prefix_depth,
            };
            b = b.policy(r.pattern, policy);
        }
        b.build().map_err(serde::de::Error::custom)
    }
}

/// `Duration` as whole milliseconds in config files (`*_ms` keys).
pub(crate) mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// `Duration` as whole seconds in config files (`*_secs` keys).
pub(crate) mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches a default table that drifts from the user's (passthrough lost, or windows changed).
    #[test]
    fn defaults_reproduce_the_users_table() {
        let c = BatchConfig::default();
        assert!(c.policy_for("chat:message").passthrough);
        assert!(c.policy_for("presence:typing").passthrough);
        assert!(c.policy_for("sentinel:42:status").passthrough);
        assert!(!c.policy_for("sentinel:42:log").passthrough);
        let data = c.policy_for("data:users:created");
        assert_eq!(
            (data.max_interval, data.max_count),
            (Duration::from_millis(50), 100)
        );
        let idx = c.policy_for("code_index:file:created");
        assert_eq!(
            (idx.max_interval, idx.max_count),
            (Duration::from_millis(200), 500)
        );
        let gpu = c.policy_for("gpu:0");
        assert_eq!(
            (gpu.max_interval, gpu.max_count),
            (Duration::from_millis(1000), 50)
        );
        assert_eq!(gpu.summarize.as_deref(), Some("stats"));
        let tr = c.policy_for("training:step");
        assert_eq!(
            (tr.max_interval, tr.max_count),
            (Duration::from_millis(500), 20)
        );
        assert_eq!(c.policy_for("other:thing"), &Policy::default());
    }

    // Catches TOML and builder drifting apart, including every policy field.
    #[test]
    fn toml_and_builder_give_equal_configs() {
        let text = r#"
            prefix_depth = 3
            memory_budget_bytes = 1048576
            shutdown_timeout_ms = 250
            [default]
            max_interval_ms = 75
            max_count = 10
            [[policy]]
            pattern = "orders:*"
            max_interval_ms = 5
            max_count = 7
            max_bytes = 4096
            persist = false
            on_full = "drop_oldest"
            block_timeout_ms = 3
            [[policy]]
            pattern = "alerts:*:fire"
            passthrough = true
        "#;
        let from_toml: BatchConfig = toml::from_str(text).unwrap();
        let built = BatchConfig::builder()
            .prefix_depth(3)
            .memory_budget(1 << 20)
            .shutdown_timeout(Duration::from_millis(250))
            .default_policy(Policy::batch(Duration::from_millis(75), 10))
            .policy(
                "orders:*",
                Policy::batch(Duration::from_millis(5), 7)
                    .max_bytes(4096)
                    .persist(false)
                    .on_full(OnFull::DropOldest)
                    .block_timeout(Duration::from_millis(3)),
            )
            .policy("alerts:*:fire", Policy::passthrough())
            .build()
            .unwrap();
        assert_eq!(from_toml, built);
        // user rules come first and win over the built-in table
        assert_eq!(built.rules[0].0.as_str(), "orders:*");
        assert!(built.policy_for("chat:x").passthrough);
    }

    // Catches unknown keys being ignored, and errors that do not name the key.
    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = toml::from_str::<BatchConfig>("max_cnt = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_cnt"), "{err}");
        let err =
            toml::from_str::<BatchConfig>("[[policy]]\npattern = \"a:*\"\nmax_intervall_ms = 3")
                .unwrap_err()
                .to_string();
        assert!(err.contains("max_intervall_ms"), "{err}");
        let err = toml::from_str::<BatchConfig>("[default]\nonfull = \"block\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("onfull"), "{err}");
    }

    // Catches bad patterns and nonsense values slipping into a running engine.
    #[test]
    fn invalid_values_are_rejected_naming_the_pattern_or_key() {
        let err = toml::from_str::<BatchConfig>("[[policy]]\npattern = \"data:**\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"data:**\""), "{err}");
        let err = toml::from_str::<BatchConfig>("[[policy]]\npattern = \"a:*\"\nmax_count = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy[a:*].max_count"), "{err}");
        let err =
            toml::from_str::<BatchConfig>("[[policy]]\npattern = \"a:*\"\non_full = \"explode\"")
                .unwrap_err()
                .to_string();
        assert!(err.contains("explode"), "{err}");
        let err = BatchConfig::builder()
            .memory_budget(10)
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory_budget_bytes"), "{err}");
    }
}
