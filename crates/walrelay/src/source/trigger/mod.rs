//! Trigger capture (`source.capture = "trigger"`): for sources without logical decoding.
//! Triggers write each change to a log table in the changing transaction (durable,
//! nothing lost while the relay is down); ticks cut the log into batches of committed
//! transactions; a batch is one transaction for the sinks.
//!
//! `install` makes and removes the objects on the source, `functions` is the SQL of a
//! table's triggers, `record` reads the log's row format, `batch` cuts the log into
//! batches at ticks, `stream` is the source task the pipeline runs (ticks, batches,
//! confirmation, rotation of the two log tables).

pub mod batch;
pub mod functions;
pub mod install;
pub mod record;
pub mod stream;
