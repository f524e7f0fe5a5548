//! Trigger capture (`source.capture = "trigger"`, issue 12, in progress): for sources
//! without logical decoding. Triggers write each change to a log table in the changing
//! transaction (durable, nothing lost while the relay is down); ticks cut the log into
//! batches of committed transactions; a batch is one transaction for the sinks.
//!
//! `install` makes the objects on the source, `record` reads the log's row format,
//! `batch` cuts the log into batches at ticks, `stream` is the source task the pipeline
//! runs. Not yet: rotation of the two logs, `walrelay uninstall`.

pub mod batch;
pub mod install;
pub mod record;
pub mod stream;
