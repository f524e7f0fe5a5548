//! The `amqp` sink: publishes events to a RabbitMQ exchange, persistent, with publisher
//! confirms. Its durable position is the end of the last transaction whose messages — and
//! every message before them — the broker has confirmed, so the slot never passes an
//! unconfirmed message: after a broker or connection failure the pipeline restarts, the
//! source sends the unconfirmed tail again, and it is published again under the same
//! `message_id`s (repeats possible, loss impossible).
//!
//! Confirms are awaited in publish order (`FuturesOrdered`), at most `max_in_flight` at
//! once: beyond that the sink stops taking input, which holds the source back, so memory
//! stays bounded while the broker is slow or away.

use std::future::Future;
use std::pin::Pin;

use futures_util::stream::{FuturesOrdered, StreamExt as _};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use tokio::sync::watch;
use walrelay_model::{Change, Event, Lsn, Position, TxnBegin};

use super::{advance, SinkError};
use crate::amqp::{self, AmqpError};
use crate::config::{AmqpSinkConfig, ExchangeType, MessageBatch, MessageFormat, QueueKind};
use crate::format::debezium::DebeziumEncoder;
use crate::format::json::JsonEncoder;

/// A confirm to wait for, and the position that becomes durable with it.
type Pending = Pin<Box<dyn Future<Output = Result<Option<Lsn>, AmqpError>> + Send>>;

pub struct AmqpSink {
    config: AmqpSinkConfig,
    _connection: Connection,
    channel: Channel,
    json: JsonEncoder,
    debezium: DebeziumEncoder,
    /// The open transaction (or snapshot), for headers and `batch = "transaction"`.
    txn: Option<TxnBegin>,
    /// `batch = "transaction"`: the lines of the open transaction or snapshot not yet
    /// published, the position of the first of them, and the chunk's number.
    chunk: Vec<u8>,
    chunk_first: Option<Position>,
    chunk_number: u32,
    /// `batch = "group"`: the end of the last whole transaction gathered, durable with the
    /// group's confirm.
    group_durable: Option<Lsn>,
    /// Between the snapshot's first row and its end.
    reading: bool,
}

/// One message to publish.
struct Outgoing<'a> {
    routing_key: String,
    message_id: String,
    body: &'a [u8],
    /// `walrelay-op`: the event kind, or `transaction` / `snapshot` for a batch.
    op: &'a str,
    table: Option<String>,
    lsn: Lsn,
    /// `batch = "transaction"`: the chunk's number, and whether it is the last.
    chunk: Option<(u32, bool)>,
}

impl AmqpSink {
    pub async fn open(config: &AmqpSinkConfig, database: &str) -> Result<Self, SinkError> {
        let err = |source| SinkError::Amqp {
            name: config.name.clone(),
            source: Box::new(source),
        };
        let url = &config.url;
        let connection = amqp::connect(url, config.tls_ca_file.as_deref())
            .await
            .map_err(err)?;
        let channel = connection
            .create_channel()
            .await
            .map_err(AmqpError::broker(url, "opening a channel"))
            .map_err(err)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::broker(url, "enabling publisher confirms"))
            .map_err(err)?;
        let kind = match config.exchange_type {
            ExchangeType::Fanout => ExchangeKind::Fanout,
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Direct => ExchangeKind::Direct,
        };
        let mut arguments = FieldTable::default();
        if let Some(alternate) = &config.alternate_exchange {
            // The alternate takes what no binding of the exchange takes; a fanout, so that
            // any queue bound to it gets all of that.
            channel
                .exchange_declare(
                    alternate.as_str().into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(AmqpError::broker(url, "declaring the alternate exchange"))
                .map_err(err)?;
            arguments.insert(
                "alternate-exchange".into(),
                AMQPValue::LongString(alternate.as_str().into()),
            );
        }
        channel
            .exchange_declare(
                config.exchange.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .map_err(AmqpError::broker(url, "declaring the exchange"))
            .map_err(err)?;
        for q in &config.queues {
            let mut arguments = FieldTable::default();
            if q.kind == QueueKind::Quorum {
                arguments.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
            }
            channel
                .queue_declare(
                    q.name.as_str().into(),
                    QueueDeclareOptions::durable(),
                    arguments,
                )
                .await
                .map_err(AmqpError::broker(url, "declaring a queue"))
                .map_err(err)?;
            channel
                .queue_bind(
                    q.name.as_str().into(),
                    config.exchange.as_str().into(),
                    q.binding.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(AmqpError::broker(url, "binding a queue"))
                .map_err(err)?;
        }
        tracing::info!(sink = %config.name, broker = %url.redacted(), exchange = %config.exchange, "broker ready");
        Ok(AmqpSink {
            config: config.clone(),
            _connection: connection,
            channel,
            json: JsonEncoder::default(),
            debezium: DebeziumEncoder::new(&config.name, database),
            txn: None,
            chunk: Vec::new(),
            chunk_first: None,
            chunk_number: 0,
            group_durable: None,
            reading: false,
        })
    }

    pub async fn run(
        mut self,
        mut input: super::queue::QueueReceiver,
        durable: watch::Sender<Lsn>,
    ) -> Result<(), SinkError> {
        let name = self.config.name.clone();
        let err = |source| SinkError::Amqp {
            name: name.clone(),
            source: Box::new(source),
        };
        let mut in_flight: FuturesOrdered<Pending> = FuturesOrdered::new();
        loop {
            tokio::select! {
                biased;
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(lsn) = done.map_err(err)? {
                        advance(&durable, lsn);
                    }
                }
                batch = input.recv(), if in_flight.len() < self.config.max_in_flight => {
                    let Some(batch) = batch else { break };
                    for event in batch.iter() {
                        self.publish_event(event, &mut in_flight).await.map_err(err)?;
                    }
                    if self.config.batch == MessageBatch::Group && input.is_empty() {
                        self.flush_group(&mut in_flight).await.map_err(err)?;
                    }
                }
            }
        }
        // Input closed: what is published gets its confirm (and a group of whole
        // transactions is published); a transaction not yet whole is not published (the
        // source sends it again).
        if self.config.batch == MessageBatch::Group {
            self.flush_group(&mut in_flight).await.map_err(err)?;
        }
        while let Some(done) = in_flight.next().await {
            if let Some(lsn) = done.map_err(err)? {
                advance(&durable, lsn);
            }
        }
        Ok(())
    }

    async fn publish_event(
        &mut self,
        event: &Event,
        in_flight: &mut FuturesOrdered<Pending>,
    ) -> Result<(), AmqpError> {
        // The durable position this event brings once it and everything before is confirmed.
        let durable_at = match event {
            Event::Commit(c) => Some(c.end_lsn),
            Event::Keepalive(lsn) => Some(*lsn),
            _ => None,
        };
        match event {
            Event::Begin(b) => self.txn = Some(b.clone()),
            Event::Read { .. } => self.reading = true,
            Event::SnapshotEnd { .. } => self.reading = false,
            _ => {}
        }
        let published = match self.config.batch {
            MessageBatch::Row => self.publish_row(event, durable_at, in_flight).await?,
            MessageBatch::Transaction | MessageBatch::Group => {
                self.publish_batched(event, durable_at, in_flight).await?
            }
        };
        if !published {
            if let Some(lsn) = durable_at {
                // Nothing to confirm for it: durable once everything before it is.
                in_flight.push_back(durable_now(lsn));
            }
        }
        if let Event::Commit(_) = event {
            self.txn = None;
        }
        Ok(())
    }

    /// `batch = "row"`: one message per event. Returns whether it published one.
    async fn publish_row(
        &mut self,
        event: &Event,
        durable_at: Option<Lsn>,
        in_flight: &mut FuturesOrdered<Pending>,
    ) -> Result<bool, AmqpError> {
        match self.config.format {
            MessageFormat::Walrelay => {
                let mut body = Vec::with_capacity(256);
                let Some(position) = self.json.encode(event, &mut body) else {
                    return Ok(false);
                };
                body.pop(); // the newline: a message holds one event
                let (op, table) = kind_and_table(event);
                let routing_key = match &table {
                    Some(t) => format!("{t}.{op}"),
                    None => op.to_string(),
                };
                let message = Outgoing {
                    routing_key,
                    message_id: message_id(position, None),
                    body: &body,
                    op,
                    table,
                    lsn: position.commit_lsn,
                    chunk: None,
                };
                let confirm = self.publish(message).await?;
                in_flight.push_back(confirmed_then(confirm, durable_at, &self.config));
                Ok(true)
            }
            MessageFormat::Debezium => {
                let envelopes = self.debezium.encode(event);
                let Some(position) = event.position() else {
                    return Ok(false);
                };
                let several = envelopes.len() > 1;
                for (i, e) in envelopes.iter().enumerate() {
                    let table = format!("{}.{}", e.schema, e.table);
                    let message = Outgoing {
                        routing_key: format!("{table}.{}", debezium_op_name(e.op)),
                        message_id: message_id(position, several.then_some(i)),
                        body: &e.body,
                        op: debezium_op_name(e.op),
                        table: Some(table),
                        lsn: position.commit_lsn,
                        chunk: None,
                    };
                    let confirm = self.publish(message).await?;
                    in_flight.push_back(confirmed_then(confirm, None, &self.config));
                }
                Ok(false)
            }
        }
    }

    /// `batch = "transaction"`: a transaction's (or the snapshot's) events as one message
    /// of JSON lines, cut into chunks of about `chunk_bytes`; the last chunk is marked.
    async fn publish_batched(
        &mut self,
        event: &Event,
        durable_at: Option<Lsn>,
        in_flight: &mut FuturesOrdered<Pending>,
    ) -> Result<bool, AmqpError> {
        let start = self.chunk.len();
        let position = match self.config.format {
            MessageFormat::Walrelay => self.json.encode(event, &mut self.chunk),
            MessageFormat::Debezium => {
                let envelopes = self.debezium.encode(event);
                for e in &envelopes {
                    self.chunk.extend_from_slice(&e.body);
                    self.chunk.push(b'\n');
                }
                if envelopes.is_empty() {
                    None
                } else {
                    event.position()
                }
            }
        };
        if self.chunk.len() > start && self.chunk_first.is_none() {
            self.chunk_first = position;
        }
        let group = self.config.batch == MessageBatch::Group;
        let (ends, op) = match event {
            // A group takes whole transactions until it is big enough or input pauses.
            Event::Commit(_) if group => {
                self.group_durable = durable_at;
                if self.chunk.len() < self.config.chunk_bytes {
                    return Ok(true);
                }
                (true, "transaction")
            }
            Event::Keepalive(_) | Event::Message(_) if group => {
                // Whatever the group holds is confirmed before the keepalive's position.
                self.flush_group(in_flight).await?;
                return Ok(false);
            }
            Event::Commit(_) => (true, "transaction"),
            Event::SnapshotEnd { .. } => (true, "snapshot"),
            Event::Message(_) => (true, "message"),
            Event::Read { .. } => (false, "snapshot"),
            _ => (false, "transaction"),
        };
        if !ends && self.chunk.len() < self.config.chunk_bytes {
            return Ok(false);
        }
        let durable_at = match (group, ends) {
            (true, true) => self.group_durable.take(),
            (true, false) => None, // kept for the message that ends at a boundary
            (false, _) => durable_at,
        };
        self.flush_chunk(op, ends, if ends { durable_at } else { None }, in_flight)
            .await?;
        Ok(ends)
    }

    /// `batch = "group"`: publish the whole transactions gathered so far.
    async fn flush_group(
        &mut self,
        in_flight: &mut FuturesOrdered<Pending>,
    ) -> Result<(), AmqpError> {
        if self.txn.is_some() || self.reading {
            return Ok(()); // only between transactions, and not inside the snapshot
        }
        let durable_at = self.group_durable.take();
        self.flush_chunk("transaction", true, durable_at, in_flight)
            .await
    }

    /// Publish the lines gathered as one message (a chunk; `ends`: the last of its
    /// transaction or snapshot); `durable_at` becomes durable with its confirm.
    async fn flush_chunk(
        &mut self,
        op: &str,
        ends: bool,
        durable_at: Option<Lsn>,
        in_flight: &mut FuturesOrdered<Pending>,
    ) -> Result<(), AmqpError> {
        let Some(first) = self.chunk_first.take() else {
            // Nothing written (a transaction with no line in this format).
            self.chunk_number = 0;
            if let Some(lsn) = durable_at {
                in_flight.push_back(durable_now(lsn));
            }
            return Ok(());
        };
        let body = std::mem::take(&mut self.chunk);
        let message = Outgoing {
            routing_key: op.to_string(),
            message_id: message_id(first, None),
            body: &body,
            op,
            table: None,
            lsn: first.commit_lsn,
            chunk: (op != "message").then_some((self.chunk_number, ends)),
        };
        let confirm = self.publish(message).await?;
        in_flight.push_back(confirmed_then(confirm, durable_at, &self.config));
        self.chunk_number = if ends { 0 } else { self.chunk_number + 1 };
        self.chunk = body;
        self.chunk.clear();
        Ok(())
    }

    async fn publish(&self, m: Outgoing<'_>) -> Result<Published, AmqpError> {
        let mut headers = FieldTable::default();
        headers.insert(
            "walrelay-lsn".into(),
            AMQPValue::LongString(m.lsn.to_string().into()),
        );
        headers.insert("walrelay-op".into(), AMQPValue::LongString(m.op.into()));
        if let Some(t) = &self.txn {
            headers.insert(
                "walrelay-xid".into(),
                AMQPValue::LongLongInt(i64::from(t.xid)),
            );
            headers.insert(
                "walrelay-commit-time".into(),
                AMQPValue::LongString(t.commit_time.to_string().into()),
            );
        }
        if let Some(table) = m.table {
            headers.insert("walrelay-table".into(), AMQPValue::LongString(table.into()));
        }
        if let Some((number, last)) = m.chunk {
            headers.insert("walrelay-chunk".into(), AMQPValue::LongUInt(number));
            headers.insert("walrelay-last".into(), AMQPValue::Boolean(last));
        }
        let content_type = match (self.config.batch, m.chunk.is_some()) {
            (MessageBatch::Transaction | MessageBatch::Group, true) => "application/x-ndjson",
            _ => "application/json",
        };
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(content_type.into())
            .with_message_id(m.message_id.as_str().into())
            .with_headers(headers);
        if let Some(t) = &self.txn {
            properties =
                properties.with_timestamp(t.commit_time.unix_millis().max(0) as u64 / 1000);
        }
        let confirm = self
            .channel
            .basic_publish(
                self.config.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                // Mandatory: a message no queue takes comes back instead of being confirmed
                // and dropped while the slot moves on.
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                m.body,
                properties,
            )
            .await
            .map_err(AmqpError::broker(&self.config.url, "publishing"))?;
        crate::failpoint::AMQP_BEFORE_CONFIRM.hit();
        Ok(Published {
            confirm,
            message_id: m.message_id,
            routing_key: m.routing_key,
        })
    }
}

/// Nothing to confirm: `lsn` is durable once everything published before it is.
fn durable_now(lsn: Lsn) -> Pending {
    Box::pin(async move { Ok(Some(lsn)) })
}

/// A message handed to the broker, waiting for its confirm.
struct Published {
    confirm: lapin::PublisherConfirm,
    message_id: String,
    routing_key: String,
}

/// Wait for the broker's confirm; then `durable_at` may become durable. A message the broker
/// returned (no queue is bound for its routing key) stops the sink: it was not delivered.
fn confirmed_then(
    published: Published,
    durable_at: Option<Lsn>,
    config: &AmqpSinkConfig,
) -> Pending {
    let url = config.url.clone();
    let exchange = config.exchange.clone();
    let Published {
        confirm,
        message_id,
        routing_key,
    } = published;
    Box::pin(async move {
        match confirm.await {
            Ok(c) if c.is_ack() => match c.take_message() {
                None => Ok(durable_at),
                Some(returned) => Err(AmqpError::Unroutable {
                    url: url.redacted(),
                    exchange,
                    routing_key,
                    message_id,
                    reply: returned.reply_text.to_string(),
                }),
            },
            Ok(_) => Err(AmqpError::Refused {
                url: url.redacted(),
                message_id,
            }),
            Err(source) => Err(AmqpError::Broker {
                url: url.redacted(),
                what: "waiting for a confirm",
                source,
            }),
        }
    })
}

/// A message id that is the same each time the event is published: its position (and, for
/// a truncate of several tables in Debezium's format, the table's place).
fn message_id(position: Position, part: Option<usize>) -> String {
    match part {
        Some(i) => format!("{}/{}/{i}", position.commit_lsn, position.seq),
        None => format!("{}/{}", position.commit_lsn, position.seq),
    }
}

/// The `walrelay-op` of an event and its `schema.table`, if it has one table.
fn kind_and_table(event: &Event) -> (&'static str, Option<String>) {
    let table = |r: &walrelay_model::Relation| Some(format!("{}.{}", r.schema, r.name));
    match event {
        Event::Begin(_) => ("begin", None),
        Event::Commit(_) => ("commit", None),
        Event::Message(_) => ("message", None),
        Event::SnapshotEnd { .. } => ("snapshot_end", None),
        Event::Read { relation, .. } => ("read", table(relation)),
        Event::Change { change, .. } => match change {
            Change::Insert { relation, .. } => ("insert", table(relation)),
            Change::Update { relation, .. } => ("update", table(relation)),
            Change::Delete { relation, .. } => ("delete", table(relation)),
            Change::Truncate { relations, .. } => {
                ("truncate", relations.first().and_then(|r| table(r)))
            }
            Change::Message { .. } => ("message", None),
            Change::Ddl(ddl) => (
                "ddl",
                ddl.tables
                    .first()
                    .map(|t| format!("{}.{}", t.schema, t.name)),
            ),
        },
        _ => ("other", None),
    }
}

fn debezium_op_name(op: &str) -> &'static str {
    match op {
        "c" => "insert",
        "u" => "update",
        "d" => "delete",
        "t" => "truncate",
        "ddl" => "ddl",
        _ => "read",
    }
}
