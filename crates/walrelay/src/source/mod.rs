//! Capture: where changes come from. `pgoutput` reads a logical replication slot;
//! `key_ranges` sets up the source's sequences for writable nodes.

pub mod key_ranges;
pub mod pgoutput;
