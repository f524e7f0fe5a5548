//! Capture: where changes come from. `pgoutput` reads a logical replication slot.

pub mod pgoutput;
