//! Trigger capture (`source.capture = "trigger"`, issue 12, in progress): for sources
//! without logical decoding. Triggers write each change to a log table in the changing
//! transaction (durable, nothing lost while the relay is down); ticks cut the log into
//! batches of committed transactions; a batch is one transaction for the sinks.
//!
//! Built so far: the objects on the source (`install`), the log's row format (`record`),
//! ticks and batches (`batch`). Not yet: the source task that feeds the pipeline, the
//! copy's hand-over tick, rotation of the two logs, `walrelay uninstall`.

pub mod batch;
pub mod install;
pub mod record;
