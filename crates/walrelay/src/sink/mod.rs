//! Sinks: where events go. Each runs as its own task, takes batches from a queue bounded
//! in batches and bytes (back-pressure to the source), and publishes the highest LSN it
//! holds durably.
//!
//! The contract every sink keeps (`postgres`, `jsonl`, `amqp`; the pipeline relies on
//! nothing else):
//!
//! - **Input and order.** Batches arrive in the source's order: transactions whole and in
//!   commit order, or — for a sink with `applies_streams` — also the changes of streamed
//!   transactions as they stream (`StreamChange`/`StreamAbort`/`StreamCommit`, with their
//!   commits in commit order among the rest). A sink applies, writes or publishes in that
//!   order; it may group consecutive transactions, never reorder or split them.
//! - **Accepted is not durable.** Taking a batch from the queue means nothing for the
//!   source. A sink raises its `durable` watch (`advance`, never lowered) to an LSN only
//!   once every transaction that commits before it is durable in the sink — committed on
//!   the target, fsynced in the file, confirmed by the broker. The pipeline confirms to the
//!   server the minimum over all sinks (`pipeline::ack_position`), and nothing else.
//! - **Repeats.** After a restart the source sends again everything after the slot's
//!   confirmed position. A sink that records a position of its own reports it at open
//!   (`SinkHandle::recorded`) and skips what it holds by commit position; one that cannot
//!   (a broker) delivers the repeat with the same position and message id.
//! - **Shutdown.** When its queue closes, a sink makes durable what it accepted that ends a
//!   transaction, raises `durable` for it, and returns; what it held of an unfinished
//!   transaction is dropped (the source sends it again). An error ends the task with a
//!   `SinkError` whose `is_transient` tells the pipeline whether to restart.

pub mod amqp;
pub mod jsonl;
pub mod postgres;
pub mod queue;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use walrelay_model::{Event, Lsn};

use crate::config::SinkConfig;

/// Events travel in shared batches, so that several sinks read one copy.
pub type Batch = Arc<Vec<Event>>;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink {name}: {what} {path}: {source}")]
    Io {
        name: String,
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("sink {name} stopped unexpectedly: {reason}")]
    Crashed { name: String, reason: String },
    #[error("sink {name}: {source}")]
    Apply {
        name: String,
        source: Box<postgres::ApplyError>,
    },
    #[error("sink {name}: {source}")]
    Amqp {
        name: String,
        source: Box<crate::amqp::AmqpError>,
    },
    #[error("sink {name}: {source}")]
    Progress {
        name: String,
        source: postgres::progress::ProgressError,
    },
}

impl SinkError {
    /// Worth restarting the pipeline for: the target may come back.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Apply { source, .. } => source.is_transient(),
            SinkError::Amqp { source, .. } => source.is_transient(),
            SinkError::Progress {
                source: postgres::progress::ProgressError::Pg(e),
                ..
            } => e.is_transient(),
            _ => false,
        }
    }
}

/// Whether a sink takes the snapshot's rows as read events (see `snapshot::read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// No: a postgres target is copied by COPY.
    No,
    /// When the slot is created, at its snapshot.
    WithNewSlot,
    /// Now: it has none yet, or its read was cut short. A slot that exists already gets a
    /// temporary slot's snapshot for it.
    Needed,
}

/// A running sink, as the pipeline sees it.
pub struct SinkHandle {
    pub name: String,
    pub reads: Reads,
    /// Takes stream events and applies transactions as they stream; otherwise it gets
    /// streamed transactions whole, at their commit.
    pub applies_streams: bool,
    /// The position this sink had recorded when it opened, where it keeps one of its own
    /// and applies streamed transactions (`postgres`): transactions that committed before
    /// it may be in already, so the source must send them whole, to be skipped by their
    /// commit position (a streamed change cannot be told apart until its commit arrives).
    pub recorded: Option<Lsn>,
    pub input: queue::QueueSender,
    pub durable: watch::Receiver<Lsn>,
    pub task: JoinHandle<Result<(), SinkError>>,
    /// The sink takes only some sets: what it is sent goes through its route.
    pub route: Option<std::sync::Mutex<crate::sets::route::SinkRoute>>,
}

impl SinkHandle {
    /// What this sink is sent of `batch` (of `bytes`): the batch itself, or the part its
    /// sets take (`None` when nothing is left).
    pub fn routed(&self, batch: &Batch, bytes: usize) -> Option<(Batch, usize)> {
        let Some(route) = &self.route else {
            return Some((batch.clone(), bytes));
        };
        // Only the source's task routes; a poisoned lock means routing itself panicked,
        // and nothing sound is left to route with: fail the run rather than drop events.
        let events = route
            .lock()
            .expect("a sink's route survives only what did not panic")
            .filter(batch);
        if events.is_empty() {
            return None;
        }
        let bytes = queue::batch_bytes(&events);
        Some((Arc::new(events), bytes))
    }
}

/// Wait for a sink's task to finish (after its input is closed) and return how it ended.
pub async fn join(name: String, task: JoinHandle<Result<(), SinkError>>) -> Result<(), SinkError> {
    match task.await {
        Ok(r) => r,
        Err(e) => Err(SinkError::Crashed {
            name,
            reason: e.to_string(),
        }),
    }
}

/// What a sink learns of the source when it starts.
pub struct SinkContext<'a> {
    /// The source position already confirmed: the sink reports it as durable until it has
    /// made more durable.
    pub start: Lsn,
    /// The slot, naming the stream for sinks that record their progress.
    pub slot: &'a str,
    /// The source database's name (for Debezium's `source.db`).
    pub database: &'a str,
    /// The tables this sink takes (of its sets), as (schema, name) on the targets.
    pub tables: &'a [(String, String)],
    /// The source, for what the stream does not carry (sequences); none for a consumer
    /// of a queue.
    pub source: Option<&'a crate::pg::conninfo::ConnInfo>,
    /// The sequences of this sink's sets.
    pub sequences: &'a [crate::sets::SequencePair],
    /// What a postgres target does with a schema change it cannot replay.
    pub ddl_on_unsafe: crate::config::OnUnsafeDdl,
    /// The stream's relations add columns and widen types on postgres targets
    /// (`[ddl] mode = "additive"`).
    pub ddl_additive: bool,
    /// The targets take writes of their own (`source.origin = "none"`): postgres sinks
    /// find and resolve conflicts (`sink::postgres::conflict`), with each transaction's
    /// commit time, so they take streamed transactions whole.
    pub two_writers: bool,
}

/// Open and start the sink `config` describes.
pub async fn start(
    config: &SinkConfig,
    context: &SinkContext<'_>,
) -> Result<SinkHandle, SinkError> {
    let (input, rx) = queue::channel();
    let (durable_tx, durable) = watch::channel(context.start);
    let name = config.name().to_string();
    let (task, reads, recorded) = match config {
        SinkConfig::Jsonl(c) => {
            let sink = jsonl::JsonlSink::open(c)?;
            let reads = sink.reads();
            let task =
                crate::task::spawn_blocking_named("sink-jsonl", move || sink.run(rx, durable_tx));
            // Takes streamed transactions whole, and skips by position what it holds.
            (task, reads, None)
        }
        SinkConfig::Postgres(c) => {
            let sink = postgres::PostgresSink::open(c, context).await?;
            let recorded = sink.applied();
            let task = crate::task::spawn_named("sink-postgres", sink.run(rx, durable_tx));
            (task, Reads::No, recorded)
        }
        SinkConfig::Amqp(c) => {
            let sink = amqp::AmqpSink::open(c, context.database).await?;
            let task = crate::task::spawn_named("sink-amqp", sink.run(rx, durable_tx));
            // A broker keeps no position to tell a cut-short snapshot by: the rows go out
            // when the slot is created (docs/guarantees.md).
            (task, Reads::WithNewSlot, None)
        }
    };
    Ok(SinkHandle {
        name,
        reads,
        applies_streams: config.applies_streams() && !context.two_writers,
        recorded,
        input,
        durable,
        task,
        // `context.tables` are already the tables of the sink's sets.
        route: config.sets().map(|sets| {
            std::sync::Mutex::new(crate::sets::route::SinkRoute::new(
                context.tables.to_vec(),
                sets.to_vec(),
            ))
        }),
    })
}

/// Raise a durable-position watch, never lowering it.
pub fn advance(durable: &watch::Sender<Lsn>, lsn: Lsn) {
    durable.send_if_modified(|d| {
        if lsn > *d {
            *d = lsn;
            true
        } else {
            false
        }
    });
}
