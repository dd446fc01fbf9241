//! Integration tests: one binary, one module per part.

mod engine;
mod tracing_layer;
