//! Reducers that turn a window of samples into one summary.
//!
//! A policy with `summarize = "NAME"` republishes `<prefix>:batch` with the
//! named reducer's output instead of the raw events. The built-in `"stats"`
//! reducer understands two kinds of payload.
//!
//! **Plain payloads** (any object): per event name, `{min, max, mean, last}`
//! for every numeric field and the last value of every other field, under
//! `series.<event name>`.
//!
//! **Structured samples** (what spillway's telemetry publishes) use three
//! reserved keys:
//! - `window` (object): its members are copied to the top level of the
//!   summary, the last one seen winning (`"status": "ok"`). A member that
//!   names a section (`"devices": []`) is only a default: the section, when
//!   any sample fills it, replaces it;
//! - `section` (string): the sample describes one source (a GPU, the host);
//!   its summary entry goes into the array `<section>` of the output, one
//!   entry per event name, in the order the names first appear;
//! - `metrics` (object): the numbers to reduce. In an entry, every numeric
//!   member of `metrics` becomes `{min, max, mean, last}` (over the samples
//!   that carried it); every other field of the payload (identity, status) is
//!   kept as last seen; `samples` counts the entry's samples.
//!
//! A payload with only `window` adds no entry. The output always has
//! `window_start`, `window_end` (RFC 3339, first and last record), `count` and
//! `samples` (records in the window); `series` appears when a plain payload
//! was seen, or no structured one.
//!
//! ```
//! use spillway::{BatchConfig, BatchingBus, BatchAwareSubscriber, BusEvent, Engine, MessageBus, Policy};
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use serde_json::json;
//!
//! struct Keep(Mutex<Vec<BusEvent>>);
//! impl BatchAwareSubscriber for Keep {
//!     fn on_event(&self, e: &BusEvent) { self.0.lock().unwrap().push(e.clone()); }
//! }
//! let config = BatchConfig::builder()
//!     .policy("rig:*", Policy::batch(Duration::from_secs(60), 2).summarize("stats").prefix_depth(1))
//!     .build()?;
//! let (engine, _guard) = Engine::builder(config).build()?;
//! let bus = BatchingBus::new(&engine, Arc::new(MessageBus::new()));
//! let keep = Arc::new(Keep(Mutex::new(Vec::new())));
//! bus.subscribe("rig:batch", keep.clone())?;
//! for t in [40, 60] {
//!     let sample = json!({"section": "fans", "name": "front", "window": {"status": "ok"},
//!                         "metrics": {"speed_percent": t}});
//!     engine.publish_sample("rig:fan0", sample)?;
//! }
//! engine.flush()?;
//! let got = keep.0.lock().unwrap();
//! let summary = &got[0].payload["summary"];
//! assert_eq!(summary["status"], "ok");
//! assert_eq!(summary["fans"][0]["name"], "front");
//! assert_eq!(summary["fans"][0]["speed_percent"]["mean"], 50.0);
//! # Ok::<(), spillway::Error>(())
//! ```

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::layer::record::{rfc3339, Batch, Records};

/// Turns a closed batch into one summary value.
pub trait Summarizer: Send + Sync + 'static {
    /// The summary of `batch`. Called on the engine thread: keep it cheap.
    fn summarize(&self, batch: &Batch) -> Value;
}

/// The built-in `"stats"` reducer.
#[derive(Debug, Default, Clone, Copy)]
pub struct StatsReducer;

struct Acc {
    min: f64,
    max: f64,
    sum: f64,
    n: u64,
    last: Value,
}

impl Acc {
    fn new() -> Acc {
        Acc {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            n: 0,
            last: Value::Null,
        }
    }

    fn add(&mut self, x: f64, v: &Value) {
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.sum += x;
        self.n += 1;
        self.last = v.clone();
    }

    fn to_json(&self) -> Value {
        json!({"min": self.min, "max": self.max, "mean": self.sum / self.n as f64, "last": self.last})
    }
}

/// Everything seen for one event name.
#[derive(Default)]
struct Series<'a> {
    count: u64,
    nums: BTreeMap<&'a str, Acc>,
    other: Map<String, Value>,
}

impl<'a> Series<'a> {
    /// Reduces the numbers of `fields` and keeps the rest as last seen.
    fn reduce(&mut self, fields: &'a Map<String, Value>) {
        for (k, v) in fields {
            match v.as_f64() {
                Some(x) => self
                    .nums
                    .entry(k.as_str())
                    .or_insert_with(Acc::new)
                    .add(x, v),
                None => {
                    self.other.insert(k.clone(), v.clone());
                }
            }
        }
    }

    fn into_json(self) -> Value {
        let mut out = self.other;
        out.insert("samples".into(), self.count.into());
        for (k, a) in self.nums {
            out.insert(k.to_string(), a.to_json());
        }
        Value::Object(out)
    }
}

impl Summarizer for StatsReducer {
    fn summarize(&self, batch: &Batch) -> Value {
        let mut window = Map::new();
        let mut plain: BTreeMap<&str, Series> = BTreeMap::new();
        // (section, [(event name, series)]), both in order of first appearance:
        // a handful of devices per window, so linear lookups beat hashing.
        let mut sections: Vec<(&str, Vec<(&str, Series)>)> = Vec::new();
        let mut structured_seen = false;
        if let Records::Events(events) = &batch.records {
            for e in events {
                let Value::Object(fields) = &*e.payload else {
                    let s = plain.entry(e.name.as_str()).or_default();
                    s.count += 1;
                    s.other.insert("value".into(), (*e.payload).clone());
                    continue;
                };
                if let Some(Value::Object(w)) = fields.get("window") {
                    window.extend(w.iter().map(|(k, v)| (k.clone(), v.clone())));
                    structured_seen = true;
                }
                let section = fields.get("section").and_then(Value::as_str);
                let structured = section.is_some() || fields.contains_key("metrics");
                structured_seen |= structured;
                if !structured {
                    if fields.len() == 1 && fields.contains_key("window") {
                        continue;
                    }
                    let s = plain.entry(e.name.as_str()).or_default();
                    s.count += 1;
                    s.reduce(fields);
                    continue;
                }
                let s = match section {
                    Some(sec) => {
                        let i = match sections.iter().position(|(n, _)| *n == sec) {
                            Some(i) => i,
                            None => {
                                sections.push((sec, Vec::new()));
                                sections.len() - 1
                            }
                        };
                        let entries = &mut sections[i].1;
                        let j = match entries.iter().position(|(n, _)| *n == e.name) {
                            Some(j) => j,
                            None => {
                                entries.push((e.name.as_str(), Series::default()));
                                entries.len() - 1
                            }
                        };
                        &mut entries[j].1
                    }
                    None => plain.entry(e.name.as_str()).or_default(),
                };
                s.count += 1;
                for (k, v) in fields {
                    match k.as_str() {
                        "window" | "section" => {}
                        "metrics" => match v {
                            Value::Object(m) => s.reduce(m),
                            other => {
                                s.other.insert("metrics".into(), other.clone());
                            }
                        },
                        _ => {
                            s.other.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
        }
        let mut out = window;
        for (name, entries) in sections {
            let list = entries.into_iter().map(|(_, s)| s.into_json()).collect();
            out.insert(name.to_string(), Value::Array(list));
        }
        if !plain.is_empty() || !structured_seen {
            let series = plain
                .into_iter()
                .map(|(name, s)| (name.to_string(), s.into_json()))
                .collect();
            out.insert("series".into(), Value::Object(series));
        }
        let count = batch.records.len();
        out.insert("window_start".into(), rfc3339(batch.first_ts_ns).into());
        out.insert("window_end".into(), rfc3339(batch.last_ts_ns).into());
        out.insert("count".into(), count.into());
        out.insert("samples".into(), count.into());
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::budget::{Budget, Reservation};
    use crate::layer::record::{BusEvent, RecordKind};
    use std::sync::Arc;

    fn batch(events: Vec<(&str, Value)>) -> Batch {
        let budget = Budget::new(1 << 20);
        let events: Vec<BusEvent> = events
            .into_iter()
            .enumerate()
            .map(|(i, (name, payload))| BusEvent {
                name: name.into(),
                payload: Arc::new(payload),
                ts_ns: 1_000_000_000 + i as i64,
            })
            .collect();
        Batch {
            id: 1,
            prefix: "gpu".into(),
            kind: RecordKind::Sample,
            first_ts_ns: events.first().map_or(0, |e| e.ts_ns),
            last_ts_ns: events.last().map_or(0, |e| e.ts_ns),
            records: Records::Events(events),
            dropped: 0,
            dropped_since_ns: None,
            persist: true,
            urgent: false,
            summary: None,
            captured: None,
            _reservation: Reservation::new(&budget, &Default::default(), 0),
        }
    }

    // Catches a regression of the plain (non-telemetry) summary: numbers
    // reduced per event name, other fields kept as last, and `series` present.
    #[test]
    fn plain_payloads_reduce_per_event_name() {
        let b = batch(vec![
            ("t:a", json!({"x": 1, "tag": "p"})),
            ("t:a", json!({"x": 3, "tag": "q"})),
            ("t:b", json!(7)),
        ]);
        let s = StatsReducer.summarize(&b);
        assert_eq!(s["count"], 3);
        assert_eq!(s["series"]["t:a"]["samples"], 2);
        assert_eq!(
            s["series"]["t:a"]["x"],
            json!({"min": 1.0, "max": 3.0, "mean": 2.0, "last": 3})
        );
        assert_eq!(s["series"]["t:a"]["tag"], "q");
        assert_eq!(s["series"]["t:b"]["value"], 7);
    }

    // Catches structured samples leaking into `series`, sections out of
    // publish order (gpu:10 before gpu:2), or identity fields being reduced.
    #[test]
    fn structured_samples_fill_sections_in_first_seen_order() {
        let dev = |i: u32, util: u32| {
            json!({"section": "devices", "index": i, "name": "G", "status": "ok",
                   "window": {"status": "ok"}, "metrics": {"util_percent": util}})
        };
        let b = batch(vec![
            ("gpu:2", dev(2, 10)),
            ("gpu:10", dev(10, 50)),
            ("gpu:2", dev(2, 30)),
        ]);
        let s = StatsReducer.summarize(&b);
        assert_eq!(s["status"], "ok");
        assert!(s.get("series").is_none(), "{s}");
        let devices = s["devices"].as_array().expect("devices array");
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0]["index"], 2);
        assert_eq!(devices[0]["samples"], 2);
        assert_eq!(
            devices[0]["util_percent"],
            json!({"min": 10.0, "max": 30.0, "mean": 20.0, "last": 30})
        );
        assert_eq!(devices[1]["index"], 10);
        assert!(devices[0].get("metrics").is_none());
        assert!(devices[0].get("window").is_none());
    }

    // Catches a status-only record creating an entry, or its `devices: []`
    // default overriding a section that real samples filled.
    #[test]
    fn window_defaults_yield_to_sections() {
        let only_status = batch(vec![(
            "gpu:status",
            json!({"window": {"status": "unavailable: no driver", "devices": []}}),
        )]);
        let s = StatsReducer.summarize(&only_status);
        assert_eq!(s["status"], "unavailable: no driver");
        assert_eq!(s["devices"], json!([]));
        assert!(s.get("series").is_none(), "{s}");

        let mixed = batch(vec![
            (
                "gpu:status",
                json!({"window": {"status": "unavailable: x", "devices": []}}),
            ),
            (
                "gpu:0",
                json!({"section": "devices", "index": 0, "window": {"status": "ok"}, "metrics": {"m": 1}}),
            ),
        ]);
        let s = StatsReducer.summarize(&mixed);
        assert_eq!(s["status"], "ok", "the last window status wins");
        assert_eq!(s["devices"][0]["index"], 0);
        assert_eq!(s["samples"], 2);
    }
}
