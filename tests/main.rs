//! Integration tests: one binary, one module per part.

mod engine;
mod index;
mod segments;
mod telemetry;
mod tracing_layer;
