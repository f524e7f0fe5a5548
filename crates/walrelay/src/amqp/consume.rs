//! `walrelay consume`: applies one queue of walrelay-format messages to a PostgreSQL target
//! with the postgres sink, in order and exactly once, acknowledging each message only after
//! the target transaction holding it has committed.
//!
//! Exactly once: the sink records the source position of the last transaction it applied
//! in the same target transaction (`sink::postgres`), and at start skips transactions at or
//! before it — so a message delivered again after a crash changes nothing. Within a
//! session, events at or below a position already passed on are dropped: the publisher
//! sends its unconfirmed tail again after a restart, so a queue can hold repeats anywhere.
//! Snapshot rows (`read` events) are applied as one transaction ending at the snapshot's
//! position, so they too are applied once.
//!
//! Acknowledgement: deliveries wait in order with the position the target must reach;
//! when the sink reports a durable position, every delivery up to the last one covered is
//! acknowledged with one `multiple` ack. A transaction spread over more messages than the
//! prefetch window lifts the window until it is complete (it could not commit otherwise).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use walrelay_model::{Change, Event, Lsn, Position, Row, TxnBegin, TxnCommit};

use super::AmqpError;
use crate::config::{ConsumeConfig, OnPoison};
use crate::format::parse::EventParser;
use crate::sink::{self, postgres::PostgresSink, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("poison message {message_id} in queue {queue}: {reason} (it stays in the queue; set on_poison = \"dead_letter\" to move such messages aside)")]
    Poison {
        queue: String,
        message_id: String,
        reason: String,
    },
    #[error(transparent)]
    Pg(#[from] crate::pg::error::PgError),
    #[error("target: checking for a table: {0}")]
    Catalog(#[source] tokio_postgres::Error),
    #[error("queue {queue} already has a consumer (walrelay consume takes its queue exclusively, since two consumers would apply interleaved transactions to one target): stop the other one first, or give each consumer a queue of its own")]
    QueueInUse { queue: String },
    #[error("queue {queue}: {what} (message {message_id}); the queue is not a whole stream from this point: nothing after it was applied")]
    Gap {
        queue: String,
        message_id: String,
        what: String,
    },
}

/// A delivery waiting for its acknowledgement.
struct Unacked {
    tag: u64,
    /// Acknowledge once the target's durable position passes this; `None`: at once (in
    /// order).
    after: Option<Lsn>,
}

impl ConsumeError {
    /// Worth reconnecting for: the broker or the target may come back.
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumeError::Amqp(e) => e.is_transient(),
            ConsumeError::Sink(e) => e.is_transient(),
            ConsumeError::Pg(e) => e.is_transient(),
            ConsumeError::Catalog(_) => true,
            ConsumeError::Poison { .. }
            | ConsumeError::Gap { .. }
            | ConsumeError::QueueInUse { .. } => false,
        }
    }
}

/// Consume until `cancel` fires or a failure; returns the messages applied. `started` is
/// set once the queue is being consumed.
pub async fn consume(
    config: &ConsumeConfig,
    cancel: CancellationToken,
    started: &mut bool,
) -> Result<u64, ConsumeError> {
    let c = &config.consume;
    let connection = super::connect(&c.url, c.tls_ca_file.as_deref()).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(AmqpError::broker(&c.url, "opening a channel"))?;
    // Poison messages are published on a channel of their own, in broker transactions.
    let poison_channel = connection
        .create_channel()
        .await
        .map_err(AmqpError::broker(&c.url, "opening a channel"))?;
    // A transaction, not a confirm: the dead letter is safe once `tx.commit-ok` arrives.
    poison_channel
        .tx_select()
        .await
        .map_err(AmqpError::broker(&c.url, "opening a transaction"))?;
    if c.on_poison == OnPoison::DeadLetter {
        poison_channel
            .queue_declare(
                config.dead_letter_queue().as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(AmqpError::broker(&c.url, "declaring the dead-letter queue"))?;
    }
    let mut prefetch = c.prefetch;
    set_prefetch(&channel, config, prefetch).await?;
    // The queue first, exclusively: a second consumer is refused here, while a consumer
    // restarted after a crash gets it at once (the broker dropped the dead one) and then
    // waits, in the sink's fence, for the dead one's target sessions to end.
    let mut generation = 0u32;
    let mut consumer = start_consumer(&channel, config, generation).await?;

    // The target: the postgres sink, fed from this loop, recording its progress under the
    // queue's name.
    let stream = format!("queue:{}", c.queue);
    let context = sink::SinkContext {
        start: Lsn::ZERO,
        slot: &stream,
        database: "",
        tables: &[],
        source: None,
        sequences: &[],
        // The relay decided what can be replayed (`Ddl::unsafe_reason`); what cannot is
        // logged and passed.
        ddl_on_unsafe: crate::config::OnUnsafeDdl::Skip,
        ddl_additive: false,
        two_writers: false,
    };
    let target = PostgresSink::open(&config.target, &context).await?;
    let info = config
        .target
        .url
        .resolve()
        .map_err(|e| ConsumeError::Pg(e.into()))?;
    let catalog = crate::pg::sql::connect(&info).await?;
    let (input, rx) = sink::queue::channel();
    let (durable_tx, mut durable) = watch::channel(Lsn::ZERO);
    let mut sink_task = crate::task::spawn_named("sink-postgres", target.run(rx, durable_tx));
    *started = true;
    tracing::info!(queue = %c.queue, broker = %c.url.redacted(), prefetch, "consuming");

    let mut session = Session {
        config,
        channel: &channel,
        poison_channel: &poison_channel,
        catalog,
        input,
        parser: EventParser::default(),
        tables: TableCheck::default(),
        unacked: VecDeque::new(),
        snapshot: SnapshotTxn::default(),
        open_txn: false,
        forwarded: None,
        after_poison: false,
        applied: 0,
    };
    let mut sink_ended = false;
    let result: Result<(), ConsumeError> = loop {
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            ended = &mut sink_task, if !sink_ended => {
                sink_ended = true;
                break match ended {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Err(SinkError::Crashed { name: config.target.name.clone(), reason: "the sink stopped".into() }.into()),
                };
            }
            changed = durable.changed() => {
                if changed.is_err() { continue; }
                let at = *durable.borrow_and_update();
                if let Err(e) = session.ack_through(at).await { break Err(e); }
            }
            delivery = consumer.next() => {
                let delivery = match delivery {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => break Err(AmqpError::Broker { url: c.url.redacted(), what: "receiving", source: e }.into()),
                    None => break Err(AmqpError::ConsumerEnded { url: c.url.redacted(), queue: c.queue.clone() }.into()),
                };
                // Copied out: a watch borrow held across an await blocks the sink's update.
                let at = *durable.borrow();
                if let Err(e) = session.handle(delivery, at).await { break Err(e); }
                let Some(wanted) = session.window(prefetch) else { continue };
                // A window is fixed when a consumer starts: cancel this one, apply what it
                // still brings, and consume again with the new window.
                tracing::debug!(from = prefetch, to = wanted, "prefetch window changed (0: unlimited until the transaction is whole)");
                let switched = async {
                    channel
                        .basic_cancel(consumer_tag(generation).as_str().into(), BasicCancelOptions::default())
                        .await
                        .map_err(AmqpError::broker(&c.url, "cancelling the consumer"))?;
                    while let Some(d) = consumer.next().await {
                        let d = d.map_err(AmqpError::broker(&c.url, "receiving"))?;
                        let at = *durable.borrow();
                        session.handle(d, at).await?;
                    }
                    set_prefetch(&channel, config, wanted).await?;
                    generation += 1;
                    start_consumer(&channel, config, generation).await
                };
                match switched.await {
                    Ok(next) => {
                        consumer = next;
                        prefetch = wanted;
                    }
                    Err(e) => break Err(e),
                }
            }
        }
    };
    let Session {
        input,
        mut unacked,
        applied,
        ..
    } = session;
    // Let the sink commit what it holds whole, then acknowledge what that covers.
    drop(input);
    let sink_result = match sink_ended {
        true => Ok(()), // its failure is `result`
        false => match sink_task.await {
            Ok(r) => r,
            Err(e) => Err(SinkError::Crashed {
                name: config.target.name.clone(),
                reason: e.to_string(),
            }),
        },
    };
    // Whatever ended the session, what the target holds is acknowledged (best effort
    // after a failure: the broker may be gone).
    let at = *durable.borrow();
    let acked = ack_through(&channel, &mut unacked, at, config).await;
    if result.is_ok() {
        acked?;
    }
    let _ = channel.close(200, "walrelay consume stopping".into()).await;
    let _ = connection
        .close(200, "walrelay consume stopping".into())
        .await;
    result?;
    sink_result?;
    Ok(applied)
}

/// The window of the consumers started after it (per consumer: quorum queues do not
/// support a channel-wide one).
async fn set_prefetch(
    channel: &Channel,
    config: &ConsumeConfig,
    prefetch: u16,
) -> Result<(), ConsumeError> {
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(AmqpError::broker(
            &config.consume.url,
            "setting the prefetch window",
        ))?;
    Ok(())
}

fn consumer_tag(generation: u32) -> String {
    format!("walrelay-consume-{generation}")
}

async fn start_consumer(
    channel: &Channel,
    config: &ConsumeConfig,
    generation: u32,
) -> Result<lapin::Consumer, ConsumeError> {
    let options = BasicConsumeOptions {
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    let queue = &config.consume.queue;
    match channel
        .basic_consume(
            queue.as_str().into(),
            consumer_tag(generation).as_str().into(),
            options,
            FieldTable::default(),
        )
        .await
    {
        Ok(consumer) => Ok(consumer),
        Err(e) if is_access_refused(&e) => Err(ConsumeError::QueueInUse {
            queue: queue.clone(),
        }),
        Err(e) => Err(AmqpError::broker(&config.consume.url, "consuming the queue")(e).into()),
    }
}

/// The broker's answer to a consumer on a queue that another holds exclusively.
fn is_access_refused(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
}

/// What one consuming session keeps between deliveries.
struct Session<'a> {
    config: &'a ConsumeConfig,
    channel: &'a Channel,
    poison_channel: &'a Channel,
    catalog: tokio_postgres::Client,
    input: sink::queue::QueueSender,
    parser: EventParser,
    tables: TableCheck,
    unacked: VecDeque<Unacked>,
    snapshot: SnapshotTxn,
    open_txn: bool,
    /// The highest position passed to the sink in this session.
    forwarded: Option<Position>,
    /// A poison message was moved aside: the rest of its transaction has a gap.
    after_poison: bool,
    applied: u64,
}

impl Session<'_> {
    /// Pass a delivery's events to the sink (or move a poison message aside), and queue
    /// its acknowledgement; `durable` is the target's position now.
    async fn handle(&mut self, delivery: Delivery, durable: Lsn) -> Result<(), ConsumeError> {
        let c = &self.config.consume;
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default();
        tracing::debug!(tag = delivery.delivery_tag, %message_id, "message received");
        let events = match read_message(
            &delivery,
            &mut self.parser,
            &mut self.tables,
            &self.catalog,
        )
        .await
        {
            Ok(events) => events,
            Err(Rejected::Catalog(e)) => return Err(ConsumeError::Catalog(e)),
            Err(Rejected::Poison(reason)) => {
                if c.on_poison == OnPoison::Stop {
                    return Err(ConsumeError::Poison {
                        queue: c.queue.clone(),
                        message_id,
                        reason,
                    });
                }
                dead_letter(self.poison_channel, self.config, &delivery, &reason).await?;
                tracing::warn!(queue = %c.queue, %message_id, %reason, dead_letter_queue = %self.config.dead_letter_queue(), "poison message moved aside");
                // What follows may continue the transaction it was part of, without it.
                self.after_poison = true;
                self.unacked.push_back(Unacked {
                    tag: delivery.delivery_tag,
                    after: None,
                });
                return self.ack_through(durable).await;
            }
        };
        let mut batch = Vec::with_capacity(events.len() + 2);
        let mut after = None;
        for event in events {
            // The publisher sends a tail again after it restarts: such repeats come at or
            // below what was already passed on, and are dropped.
            if let Some(p) = position_of(&event) {
                if self.forwarded.is_some_and(|f| p <= f) {
                    continue;
                }
                if let Err(what) = self.follows(&event, p) {
                    return Err(ConsumeError::Gap {
                        queue: c.queue.clone(),
                        message_id,
                        what,
                    });
                }
                self.forwarded = Some(p);
            }
            match &event {
                Event::Begin(_) => self.open_txn = true,
                Event::Commit(_) => self.open_txn = false,
                _ => {}
            }
            if let Some(lsn) = wait_for(&event) {
                after = Some(lsn);
            }
            self.snapshot.translate(event, &mut batch);
        }
        self.applied += 1;
        self.unacked.push_back(Unacked {
            tag: delivery.delivery_tag,
            after,
        });
        // A send fails only when the sink ended; its result then comes from its task.
        if !batch.is_empty() {
            let bytes = sink::queue::batch_bytes(&batch);
            let _ = self.input.send(Arc::new(batch), bytes).await;
        }
        // Covered already (a repeat of what the target holds): acknowledged now, since no
        // later commit may come to do it.
        self.ack_through(durable).await
    }

    /// Whether `event` at `p` continues the stream after what was passed on: inside a
    /// transaction or snapshot the next position in it, outside one the start of the next.
    /// A message lost by the broker, or a snapshot cut short and sent again, shows here.
    fn follows(&mut self, event: &Event, p: Position) -> Result<(), String> {
        let inside = self.open_txn || self.snapshot.open;
        if self.after_poison {
            if !inside || matches!(event, Event::Commit(_) | Event::SnapshotEnd { .. }) {
                self.after_poison = false;
            }
            return Ok(());
        }
        let expected = match self.forwarded {
            Some(f) if inside => Some(Position::new(f.commit_lsn, f.seq + 1)),
            _ => None,
        };
        let starts = match event {
            Event::Begin(_) | Event::Message(_) => true,
            Event::Read { position, .. } => position.seq == 1,
            Event::SnapshotEnd { rows, .. } => *rows == 0,
            _ => false,
        };
        match expected {
            Some(e) if e != p => Err(format!(
                "expected the event at {}/{} next, got {}/{}",
                e.commit_lsn, e.seq, p.commit_lsn, p.seq
            )),
            None if !starts => Err(format!(
                "the event at {}/{} continues a transaction or snapshot whose start is missing",
                p.commit_lsn, p.seq
            )),
            _ => Ok(()),
        }
    }

    /// The window the consumer should have now, if not `current`: wider while a
    /// transaction is open and fills it (it cannot commit, so nothing could be acknowledged,
    /// until the rest arrives), back to the configured one once it is whole.
    fn window(&self, current: u16) -> Option<u16> {
        let inside = self.open_txn || self.snapshot.open;
        let wanted = if !inside {
            self.config.consume.prefetch
        } else if current != 0 && self.unacked.len() >= usize::from(current) {
            // One configured window wider at a time, and only once every delivery so far
            // was handled: the broker then runs at most `prefetch` messages ahead of this
            // consumer, so memory stays bounded by `prefetch` times the message size. Past
            // the protocol's 65535 only "unlimited" (0) is left.
            current
                .checked_add(self.config.consume.prefetch.max(1))
                .unwrap_or(0)
        } else {
            current
        };
        (wanted != current).then_some(wanted)
    }

    async fn ack_through(&mut self, durable: Lsn) -> Result<(), ConsumeError> {
        ack_through(self.channel, &mut self.unacked, durable, self.config).await
    }
}

/// The position the target must reach before a message carrying `event` is acknowledged:
/// past the transaction's commit (its end is beyond the commit's start), or the snapshot's
/// position for snapshot rows.
fn wait_for(event: &Event) -> Option<Lsn> {
    match event {
        Event::Begin(b) => Some(Lsn(b.commit_lsn.0 + 1)),
        Event::Change { position, .. } => Some(Lsn(position.commit_lsn.0 + 1)),
        Event::Commit(c) => Some(c.end_lsn),
        Event::Read { position, .. } => Some(position.commit_lsn),
        Event::SnapshotEnd { position, .. } => Some(position.commit_lsn),
        _ => None,
    }
}

/// An event's position in the order the consumer applies: the stream's position, with the
/// snapshot's rows placed just before its LSN (as the synthetic transaction applies them).
fn position_of(event: &Event) -> Option<Position> {
    match event {
        // Before any transaction that commits at the snapshot's position (as applied).
        Event::Read { position, .. } | Event::SnapshotEnd { position, .. } => Some(Position::new(
            Position::covered_by_snapshot(position.commit_lsn).commit_lsn,
            position.seq,
        )),
        _ => event.position(),
    }
}

/// Acknowledge, with one `multiple` ack, every delivery from the front that `durable`
/// covers.
async fn ack_through(
    channel: &Channel,
    unacked: &mut VecDeque<Unacked>,
    durable: Lsn,
    config: &ConsumeConfig,
) -> Result<(), ConsumeError> {
    let mut last = None;
    while let Some(front) = unacked.front() {
        if front.after.is_some_and(|a| a > durable) {
            break;
        }
        last = Some(front.tag);
        unacked.pop_front();
    }
    if let Some(tag) = last {
        channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(AmqpError::broker(&config.consume.url, "acknowledging"))?;
    }
    Ok(())
}

/// Why a message is not applied.
enum Rejected {
    /// Not walrelay's format, or a table the target lacks.
    Poison(String),
    /// The target could not be asked (it may come back).
    Catalog(tokio_postgres::Error),
}

impl From<String> for Rejected {
    fn from(reason: String) -> Self {
        Rejected::Poison(reason)
    }
}

/// The events of a message, or why it is rejected.
async fn read_message(
    delivery: &Delivery,
    parser: &mut EventParser,
    tables: &mut TableCheck,
    catalog: &tokio_postgres::Client,
) -> Result<Vec<Event>, Rejected> {
    let mut events = Vec::new();
    for line in delivery
        .data
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
    {
        let event = parser.parse_line(line)?;
        for (schema, name) in tables_of(&event) {
            tables.check(catalog, schema, name).await?;
        }
        // A table a schema change creates exists once the sink has applied it, which is
        // before any later event of the stream reaches the target.
        if let Event::Change {
            change: Change::Ddl(ddl),
            ..
        } = &event
        {
            for t in &ddl.tables {
                tables.expect(&t.schema, &t.name);
            }
        }
        events.push(event);
    }
    if events.is_empty() {
        return Err(Rejected::Poison("the message holds no event".into()));
    }
    Ok(events)
}

fn tables_of(event: &Event) -> Vec<(&str, &str)> {
    fn one(r: &walrelay_model::Relation) -> Vec<(&str, &str)> {
        vec![(r.schema.as_str(), r.name.as_str())]
    }
    match event {
        Event::Read { relation, .. } => one(relation),
        Event::Change { change, .. } => match change {
            Change::Insert { relation, .. }
            | Change::Update { relation, .. }
            | Change::Delete { relation, .. } => one(relation),
            Change::Truncate { relations, .. } => relations
                .iter()
                .map(|r| (r.schema.as_str(), r.name.as_str()))
                .collect(),
            // A schema change makes its tables itself.
            Change::Message { .. } | Change::Ddl(_) => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// Which tables the target has; a table is asked for until it is found.
#[derive(Default)]
struct TableCheck {
    /// Tables found, by schema. Only a table found is remembered: one created later is
    /// found when a message first names it after that.
    found: HashMap<String, HashSet<String>>,
}

impl TableCheck {
    /// `schema.name` is taken as found: an earlier event makes it.
    fn expect(&mut self, schema: &str, name: &str) {
        self.found
            .entry(schema.to_string())
            .or_default()
            .insert(name.to_string());
    }

    /// Asked for every change: a table found before costs a lookup, no allocation.
    async fn check(
        &mut self,
        catalog: &tokio_postgres::Client,
        schema: &str,
        name: &str,
    ) -> Result<(), Rejected> {
        if self.found.get(schema).is_some_and(|t| t.contains(name)) {
            return Ok(());
        }
        let qualified = crate::pg::quote::qualified(schema, name);
        let exists: bool = catalog
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
            .await
            .map_err(Rejected::Catalog)?
            .get(0);
        if !exists {
            return Err(Rejected::Poison(format!(
                "the target has no table {qualified}"
            )));
        }
        self.expect(schema, name);
        Ok(())
    }
}

/// Snapshot rows become one target transaction: `read` events turn into inserts between a
/// begin and a commit that end exactly at the snapshot's position, so that the first
/// streamed transaction (which commits at or after it) is not taken for applied.
#[derive(Default)]
struct SnapshotTxn {
    open: bool,
}

impl SnapshotTxn {
    fn translate(&mut self, event: Event, out: &mut Vec<Event>) {
        match event {
            Event::Read {
                position,
                relation,
                row,
            } => {
                let covered = Position::covered_by_snapshot(position.commit_lsn).commit_lsn;
                if !self.open {
                    self.open = true;
                    out.push(Event::Begin(TxnBegin {
                        xid: 0,
                        commit_lsn: covered,
                        commit_time: walrelay_model::PgTimestamp::now(),
                        origin: None,
                    }));
                }
                out.push(Event::Change {
                    position: Position::new(covered, position.seq),
                    change: Change::Insert {
                        relation,
                        new: Row(row.0),
                    },
                });
            }
            Event::SnapshotEnd { position, rows } => {
                let covered = Position::covered_by_snapshot(position.commit_lsn).commit_lsn;
                if self.open {
                    self.open = false;
                    out.push(Event::Commit(TxnCommit {
                        xid: 0,
                        commit_lsn: covered,
                        end_lsn: position.commit_lsn,
                        commit_time: walrelay_model::PgTimestamp::now(),
                        seq: rows + 1,
                    }));
                }
            }
            other => out.push(other),
        }
    }
}

/// Put a poison message on the dead-letter queue, with the reason, in a broker transaction;
/// once it commits the original may be acknowledged.
async fn dead_letter(
    channel: &Channel,
    config: &ConsumeConfig,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), ConsumeError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        "walrelay-error".into(),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        "walrelay-queue".into(),
        AMQPValue::LongString(config.consume.queue.as_str().into()),
    );
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = delivery.properties.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    channel
        .basic_publish(
            "".into(),
            config.dead_letter_queue().as_str().into(),
            BasicPublishOptions::default(),
            &delivery.data,
            properties,
        )
        .await
        .map_err(AmqpError::broker(&config.consume.url, "dead-lettering"))?;
    channel
        .tx_commit()
        .await
        .map_err(AmqpError::broker(&config.consume.url, "dead-lettering"))?;
    Ok(())
}
