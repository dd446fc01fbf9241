//! The engine, the tracing layer and the bus adapter: everything on the
//! caller's side of the pipeline. Depends on nothing else in the crate.

pub(crate) mod budget;
pub mod bus;
pub(crate) mod capture;
pub mod config;
pub mod engine;
pub(crate) mod intake;
pub mod name;
pub mod record;
pub mod summary;
pub mod tracing_layer;
