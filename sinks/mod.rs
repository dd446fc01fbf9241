//! Where closed batches go.
//!
//! [`segment`] writes every persisted batch to zstd-compressed JSON Lines
//! files under `DIR/segments/`, the source of truth for everything spillway
//! stores, and reads them back (frame by frame, across rotations, following
//! a live directory like `tail -f`).

pub mod index;
pub mod segment;
