//! walrelay: PostgreSQL replication and high availability.
//!
//! A source (pgoutput over the streaming replication protocol) yields committed
//! transactions in commit order; sinks make them durable; the source is acknowledged only up
//! to the position every sink holds durably. See `docs/architecture.md`.

pub mod amqp;
pub mod cli;
pub mod config;
pub mod ddl;
pub mod failpoint;
pub mod format;
pub mod ha;
pub mod migrate;
pub mod origin;
pub mod pg;
pub mod pipeline;
pub mod schema;
pub mod sets;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod task;
pub mod verify;
