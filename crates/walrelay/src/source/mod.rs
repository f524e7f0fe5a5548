//! Capture: where changes come from. `pgoutput` reads a logical replication slot;
//! `trigger` reads a log that triggers write; `key_ranges` sets up the source's sequences
//! for writable nodes.

pub mod key_ranges;
pub mod pgoutput;
pub mod trigger;
