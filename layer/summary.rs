//! Reducers that turn a window of samples into one summary.
//!
//! A policy with `summarize = "NAME"` republishes `<prefix>:batch` with the
//! named reducer's output instead of the raw events. The built-in `"stats"`
//! reducer gives, per event name, `{min, max, mean, last}` for every numeric
//! payload field and the last value of every other field.

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

#[derive(Default)]
struct Acc {
    min: f64,
    max: f64,
    sum: f64,
    n: u64,
    last: Value,
}

impl Summarizer for StatsReducer {
    fn summarize(&self, batch: &Batch) -> Value {
        type Series<'a> = (BTreeMap<&'a str, Acc>, Map<String, Value>, u64);
        let mut series: BTreeMap<&str, Series> = BTreeMap::new();
        if let Records::Events(events) = &batch.records {
            for e in events {
                let (nums, other, count) = series.entry(e.name.as_str()).or_default();
                *count += 1;
                let Value::Object(fields) = &*e.payload else {
                    other.insert("value".into(), (*e.payload).clone());
                    continue;
                };
                for (k, v) in fields {
                    match v.as_f64() {
                        Some(x) => {
                            let a = nums.entry(k.as_str()).or_insert_with(|| Acc {
                                min: f64::INFINITY,
                                max: f64::NEG_INFINITY,
                                ..Acc::default()
                            });
                            a.min = a.min.min(x);
                            a.max = a.max.max(x);
                            a.sum += x;
                            a.n += 1;
                            a.last = v.clone();
                        }
                        None => {
                            other.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
        }
        let mut out = Map::new();
        for (name, (nums, mut other, count)) in series {
            other.insert("samples".into(), count.into());
            for (k, a) in nums {
                other.insert(
                    k.to_string(),
                    json!({"min": a.min, "max": a.max, "mean": a.sum / a.n as f64, "last": a.last}),
                );
            }
            out.insert(name.to_string(), Value::Object(other));
        }
        json!({
            "window_start": rfc3339(batch.first_ts_ns),
            "window_end": rfc3339(batch.last_ts_ns),
            "count": batch.records.len(),
            "series": out,
        })
    }
}
