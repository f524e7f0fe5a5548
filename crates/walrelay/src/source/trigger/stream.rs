//! The trigger capture's source task: prepares the source (installs the capture, records
//! the copy's tick), then ticks (every `BUSY_POLL` while writers log, on their
//! notification when they had stopped), hands each batch to the sinks as one transaction,
//! and records in `walrelay_capture.consumers` the last tick every sink holds durably (as a
//! slot's confirmed position).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use walrelay_model::{Change, Event, Lsn, Position, Relation, TxnBegin, TxnCommit};

use super::batch::{self, BatchError, BatchReader, Tick};
use super::install::{self, CHANNEL};
use crate::config::{SetConfig, SourceConfig};
use crate::pg::conninfo::ConnInfo;
use crate::pg::{sql, PgError};
use crate::pipeline::{ack_position, durable_moved, Fanout};
use crate::sets::shape::ShapedRelation;
use crate::sets::Plan;
use crate::snapshot::SnapshotPoint;
use crate::source::pgoutput::SourceError;

/// Events handed to the sinks at once, at most (a batch may hold millions of changes).
const CHUNK_BYTES: usize = 4 << 20;

impl From<BatchError> for SourceError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Pg(e) => SourceError::Pg(e),
            other => SourceError::Setup(other.to_string()),
        }
    }
}

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |e| SourceError::Pg(PgError::from_sql(format!("trigger capture: {what}"), e))
}

/// How often a relay looks for new changes while writers log: each look may tick, and each
/// tick is a transaction on the source and a batch on the targets, so batches stay large
/// under load and the lag stays near this.
const BUSY_POLL: Duration = Duration::from_millis(100);

/// What `prepare` found and made ready.
pub struct Prepared {
    pub info: ConnInfo,
    pub plan: Arc<Plan>,
    /// Everything before it was acknowledged earlier (or is in the copy).
    pub confirmed: Lsn,
    /// The snapshot for the copy, and the tick recorded at it; valid until `start`.
    pub snapshot: Option<SnapshotPoint>,
    /// The consumer is new: nothing was captured for it before this snapshot.
    pub created: bool,
    holder: Client,
    client: Client,
    relations: HashMap<i32, Arc<Relation>>,
    relids: Vec<walrelay_model::Oid>,
    newest_entry: i32,
    consumer: String,
    resume: Tick,
    status_interval: Duration,
    log_rotation: Duration,
    /// `source.origin = "none"`: what a walrelay apply wrote is left out.
    leave_out_applied: bool,
}

/// Install the capture for the sets' tables, take this consumer's lock, and record a tick
/// at a snapshot exported for the copy.
pub async fn prepare(cfg: &SourceConfig, sets: &[SetConfig]) -> Result<Prepared, SourceError> {
    let info = cfg
        .url
        .resolve()
        .map_err(|e| SourceError::Setup(format!("source.url: {e}")))?;
    let info = crate::pg::locate::locate(&info).await?;
    let mut client = sql::connect(&info).await?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(pg("reading the server version"))?
        .get(0);
    if version < 130000 {
        return Err(SourceError::Setup(
            "trigger capture needs PostgreSQL 13 or later (xid8 and pg_snapshot)".into(),
        ));
    }
    let consumer = cfg.slot.clone();
    take_consumer_lock(&client, &consumer).await?;
    let (plan, tables) = Plan::resolve(&client, sets).await?;
    if tables.is_empty() {
        return Err(SourceError::Setup(
            "the sets select no table on the source: nothing to capture".into(),
        ));
    }
    let captured = install::install(&mut client, &plan.published(&tables), &consumer).await?;
    let relids: Vec<walrelay_model::Oid> = captured.iter().map(|c| c.oid).collect();
    let newest_entry = batch::newest_entry(&client).await?;
    let relations = batch::relations(&client, &relids).await?;

    // The copy's snapshot, and a tick at exactly that snapshot: its batch holds what the
    // copy holds, the next ones what it does not.
    let holder = sql::connect(&info).await?;
    let exported = holder
        .simple_query(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;
             SELECT pg_export_snapshot(), pg_current_snapshot()::text",
        )
        .await
        .map_err(pg("exporting a snapshot for the copy"))?;
    let (name, current) = exported
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                r.get(0).unwrap_or_default().to_string(),
                r.get(1).unwrap_or_default().to_string(),
            )),
            _ => None,
        })
        .ok_or_else(|| SourceError::Setup("exporting a snapshot returned no row".into()))?;
    let at_copy = batch::tick(&client, &consumer, Some(&current)).await?;
    client
        .execute(
            "INSERT INTO walrelay_capture.consumers (name, tick) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&consumer, &at_copy.id],
        )
        .await
        .map_err(pg("registering the consumer"))?;
    let resume_id: i64 = client
        .query_one(
            "SELECT tick FROM walrelay_capture.consumers WHERE name = $1",
            &[&consumer],
        )
        .await
        .map_err(pg("reading the consumer"))?
        .get(0);
    let resume = batch::tick_by_id(&client, resume_id).await?;
    tracing::info!(
        server = %info.describe(),
        consumer = %consumer,
        tables = captured.len(),
        resume_tick = resume.id,
        "trigger capture ready"
    );
    Ok(Prepared {
        info,
        plan: Arc::new(plan),
        confirmed: resume.end(),
        created: resume.id == at_copy.id,
        snapshot: Some(SnapshotPoint {
            name,
            lsn: at_copy.end(),
        }),
        holder,
        client,
        relations,
        relids,
        newest_entry,
        consumer,
        resume,
        status_interval: cfg.status_interval,
        log_rotation: cfg.log_rotation,
        leave_out_applied: cfg.origin == crate::config::OriginFilter::None,
    })
}

/// How many log rows have been numbered: the log sequence's last value, or 0 before its
/// first `nextval` (a new sequence's `last_value` is already 1 then, so reading it alone
/// the first row logged after an installation would look like no change at all).
const LOGGED: &str =
    "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM walrelay_capture.log_seq)";

/// The server processes holding the lock of consumer `$1` (a relay capturing as it), as
/// one text: `NULL` when none does.
const CONSUMER_LOCK_HOLDERS: &str = "(SELECT string_agg(l.pid::text, ', ') FROM pg_locks l
      WHERE l.locktype = 'advisory' AND l.granted
        AND l.classid::int = hashtext('walrelay_capture')
        AND l.objid::int = hashtext($1))";

/// The consumer's lock, held by this session for the run: one relay per consumer. A
/// relay killed a moment ago may leave a server session that still holds it until the
/// server notices; wait for that as for a slot's previous consumer.
async fn take_consumer_lock(client: &Client, consumer: &str) -> Result<(), SourceError> {
    let deadline = tokio::time::Instant::now() + crate::source::pgoutput::setup::SLOT_RELEASE_WAIT;
    let mut logged = false;
    loop {
        let row = client
            .query_one(
                &format!(
                    "SELECT pg_try_advisory_lock(hashtext('walrelay_capture'), hashtext($1)),
                            {CONSUMER_LOCK_HOLDERS}"
                ),
                &[&consumer],
            )
            .await
            .map_err(pg("taking the consumer's lock"))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        let holder: Option<String> = row.get(1);
        let holder = holder.unwrap_or_default();
        if tokio::time::Instant::now() > deadline {
            return Err(SourceError::InUse(format!(
                "another walrelay is capturing from this database as {consumer:?} (source.slot; server process {holder}): stop it, or give this one another slot name"
            )));
        }
        if !logged {
            tracing::info!(consumer, pid = %holder, "waiting for the consumer's previous session to let go");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where a consumer of the log stands, for `walrelay status`.
#[derive(Debug)]
pub struct ConsumerState {
    /// The server process of the relay capturing as this consumer (its lock), if any.
    pub capturing_pid: Option<String>,
    /// The last tick whose batch every sink held, when the consumer has one.
    pub confirmed: Option<Tick>,
    /// Both log tables with their indexes.
    pub log_bytes: i64,
}

/// The state of `consumer`, or `None` when the capture's schema is not installed.
pub async fn consumer_state(
    client: &Client,
    consumer: &str,
) -> Result<Option<ConsumerState>, SourceError> {
    let installed: bool = client
        .query_one(
            "SELECT to_regclass('walrelay_capture.consumers') IS NOT NULL",
            &[],
        )
        .await
        .map_err(pg("looking for the capture's schema"))?
        .get(0);
    if !installed {
        return Ok(None);
    }
    let row = client
        .query_one(
            &format!(
                "SELECT {CONSUMER_LOCK_HOLDERS},
                        (SELECT tick FROM walrelay_capture.consumers WHERE name = $1),
                        pg_total_relation_size('walrelay_capture.log_1')
                          + pg_total_relation_size('walrelay_capture.log_2')"
            ),
            &[&consumer],
        )
        .await
        .map_err(pg("reading the log's consumer"))?;
    let confirmed = match row.get::<_, Option<i64>>(1) {
        Some(id) => Some(batch::tick_by_id(client, id).await?),
        None => None,
    };
    Ok(Some(ConsumerState {
        capturing_pid: row.get(0),
        confirmed,
        log_bytes: row.get(2),
    }))
}

pub struct TriggerSource {
    client: Client,
    /// The triggers' notifications (`LISTEN`), on a connection of their own.
    notified: UnboundedReceiver<String>,
    _listener: Client,
    /// The relation of each registry entry of the captured tables, by its number in the
    /// log, and as its set shapes it (by the relation's address).
    relations: HashMap<i32, Arc<Relation>>,
    shaped: HashMap<usize, Arc<ShapedRelation>>,
    plan: Arc<Plan>,
    relids: Vec<walrelay_model::Oid>,
    /// The registry's newest entry when `relations` was read.
    newest_entry: i32,
    consumer: String,
    /// The last tick whose batch went to the sinks.
    sent: Tick,
    /// Ticks sent and not yet confirmed, in order.
    unconfirmed: Vec<Tick>,
    confirmed: Tick,
    start: Lsn,
    /// `walrelay_capture.log_seq` at the last tick: no tick while it stays.
    logged_at_tick: i64,
    /// This relay's last tick.
    last_tick: i64,
    /// Writers logged at the last look: poll every `BUSY_POLL`, with notifications off.
    busy: bool,
    next_poll: tokio::time::Instant,
    status_interval: Duration,
    durable_watches: Vec<tokio::sync::watch::Receiver<Lsn>>,
    log_rotation: Duration,
    /// When the log last switched (or this run started).
    switched: tokio::time::Instant,
    leave_out_applied: bool,
}

impl TriggerSource {
    /// Listen for the triggers, end the copy's snapshot, and shape the relations as the
    /// sets say.
    pub async fn start(prepared: Prepared, fanout: &Fanout) -> Result<Self, SourceError> {
        let Prepared {
            info,
            plan,
            confirmed,
            holder,
            client,
            relations,
            relids,
            newest_entry,
            consumer,
            resume,
            status_interval,
            log_rotation,
            leave_out_applied,
            ..
        } = prepared;
        drop(holder);
        let (listener, notified) = sql::connect_listening(&info).await?;
        listener
            .batch_execute(&format!("LISTEN {}", crate::pg::quote::ident(CHANNEL)))
            .await
            .map_err(pg("listening for the triggers"))?;
        let shaped = shape_all(&plan, &relations)?;
        Ok(TriggerSource {
            client,
            notified,
            _listener: listener,
            relations,
            shaped,
            plan,
            relids,
            newest_entry,
            consumer,
            sent: resume,
            unconfirmed: Vec::new(),
            confirmed: resume,
            start: confirmed,
            // Tick once at start whatever the log holds.
            logged_at_tick: -1,
            last_tick: resume.id,
            busy: true,
            next_poll: tokio::time::Instant::now(),
            status_interval,
            durable_watches: fanout.sinks().iter().map(|s| s.durable.clone()).collect(),
            log_rotation,
            switched: tokio::time::Instant::now(),
            leave_out_applied,
        })
    }

    /// Until `cancel`: tick as writers log, hand the batches to the sinks, confirm what
    /// they hold.
    pub async fn run(
        &mut self,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        self.tick().await?;
        // Whatever a relay killed while idle left: notifications off, then a look soon.
        self.busy = false;
        self.set_busy(true).await?;
        loop {
            self.send_new_batches(fanout, cancel).await?;
            self.confirm(&fanout.durable()).await?;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                n = self.notified.recv() => {
                    if n.is_none() {
                        return Err(SourceError::StreamEnded);
                    }
                    // Many commits notify at once: one tick for all of them.
                    while self.notified.try_recv().is_ok() {}
                    if !self.busy {
                        self.tick().await?;
                        self.set_busy(true).await?;
                    }
                }
                _ = tokio::time::sleep_until(self.next_poll) => self.poll().await?,
                _ = durable_moved(&mut self.durable_watches) => {}
            }
        }
    }

    /// Tick when writers logged since the last tick, or when a transaction in progress
    /// at the last tick has ended since (it may have logged before that tick and not
    /// notified: notifications were off, or it read them on before they went off).
    /// Writers that logged keep the relay polling; a quiet look turns notifications on.
    async fn poll(&mut self) -> Result<(), SourceError> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT {LOGGED},
                            EXISTS (SELECT FROM walrelay_capture.ticks t, pg_snapshot_xip(t.snapshot) x
                                     WHERE t.id = $1 AND pg_visible_in_snapshot(x, pg_current_snapshot()))"
                ),
                &[&self.last_tick],
            )
            .await
            .map_err(pg("looking for new changes in the log"))?;
        let (logged, ended): (i64, bool) = (row.get(0), row.get(1));
        let moved = logged != self.logged_at_tick;
        if moved || ended {
            self.tick_at(logged).await?;
        }
        self.set_busy(moved).await
    }

    /// Notifications off while busy (PostgreSQL makes the commits of notifying
    /// transactions wait in turn), on while idle; the next look after `BUSY_POLL` or
    /// `status_interval`. With several relays on one source the last to switch wins;
    /// another then finds work at its next look.
    async fn set_busy(&mut self, busy: bool) -> Result<(), SourceError> {
        if busy != self.busy {
            self.client
                .execute(
                    "SELECT setval('walrelay_capture.wake', $1, true)",
                    &[&i64::from(!busy)],
                )
                .await
                .map_err(pg("switching the writers' notifications"))?;
            self.busy = busy;
        }
        let pause = if busy {
            BUSY_POLL
        } else {
            self.status_interval
        };
        self.next_poll = tokio::time::Instant::now() + pause;
        Ok(())
    }

    async fn logged(&self) -> Result<i64, SourceError> {
        Ok(self
            .client
            .query_one(&format!("SELECT {LOGGED}"), &[])
            .await
            .map_err(pg("reading the log's sequence"))?
            .get(0))
    }

    async fn tick(&mut self) -> Result<(), SourceError> {
        let logged = self.logged().await?;
        self.tick_at(logged).await
    }

    /// A tick, `logged` being the log's sequence read before it.
    async fn tick_at(&mut self, logged: i64) -> Result<(), SourceError> {
        self.logged_at_tick = logged;
        self.last_tick = batch::tick(&self.client, &self.consumer, None).await?.id;
        Ok(())
    }

    async fn send_new_batches(
        &mut self,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let ticks = batch::ticks_after(&self.client, &self.consumer, self.sent.id).await?;
        if !ticks.is_empty() {
            self.read_new_entries().await?;
        }
        for tick in ticks {
            self.send_batch(tick, fanout, cancel).await?;
            self.sent = tick;
            self.unconfirmed.push(tick);
        }
        Ok(())
    }

    /// The relations of entries registered since they were read (a relay of another
    /// consumer registered an altered table again). An entry commits before any row is
    /// logged under it, so the ticks listed before this call see only entries it reads.
    async fn read_new_entries(&mut self) -> Result<(), SourceError> {
        let newest = batch::newest_entry(&self.client).await?;
        if newest != self.newest_entry {
            self.relations = batch::relations(&self.client, &self.relids).await?;
            self.shaped = shape_all(&self.plan, &self.relations)?;
            self.newest_entry = newest;
        }
        Ok(())
    }

    /// One batch as one transaction: its changes at the tick's position, or a keepalive
    /// when it is empty (the sinks' positions move on all the same).
    async fn send_batch(
        &mut self,
        tick: Tick,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let mut reader = BatchReader::open(
            &self.client,
            self.sent.id,
            tick.id,
            &self.relations,
            self.leave_out_applied,
        )
        .await?;
        let begin = TxnBegin {
            xid: 0,
            commit_lsn: tick.lsn,
            commit_time: tick.at,
            origin: None,
        };
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut seq = 0u64;
        while let Some(change) = reader.next().await? {
            let Some(change) = self.shape(change) else {
                continue;
            };
            if seq == 0 {
                chunk.push(Event::Begin(begin.clone()));
            }
            seq += 1;
            let event = Event::Change {
                position: Position::new(tick.lsn, seq),
                change,
            };
            bytes += event.approx_bytes();
            chunk.push(event);
            if bytes >= CHUNK_BYTES {
                deliver(std::mem::take(&mut chunk), fanout, cancel).await?;
                bytes = 0;
            }
        }
        chunk.push(if seq == 0 {
            Event::Keepalive(tick.end())
        } else {
            Event::Commit(TxnCommit {
                xid: 0,
                commit_lsn: tick.lsn,
                end_lsn: tick.end(),
                commit_time: tick.at,
                seq: seq + 1,
            })
        });
        deliver(chunk, fanout, cancel).await
    }

    /// A change as its set shapes it; `None` for a table no set takes any more.
    fn shape(&self, change: Change) -> Option<Change> {
        let shaped = |relation: &Arc<Relation>| self.shaped.get(&(Arc::as_ptr(relation) as usize));
        Some(match change {
            Change::Insert { relation, new } => {
                let s = shaped(&relation)?;
                Change::Insert {
                    relation: s.relation.clone(),
                    new: s.row(new),
                }
            }
            Change::Update { relation, old, new } => {
                let s = shaped(&relation)?;
                Change::Update {
                    relation: s.relation.clone(),
                    old: old.map(|o| s.old(o)),
                    new: s.row(new),
                }
            }
            Change::Delete { relation, old } => {
                let s = shaped(&relation)?;
                Change::Delete {
                    relation: s.relation.clone(),
                    old: s.old(old),
                }
            }
            Change::Truncate {
                relations,
                cascade,
                restart_identity,
            } => Change::Truncate {
                relations: relations
                    .iter()
                    .filter_map(|r| shaped(r).map(|s| s.relation.clone()))
                    .collect(),
                cascade,
                restart_identity,
            },
            other => other,
        })
    }

    /// Record as the consumer's position the last tick every sink holds, and drop the
    /// ticks before it.
    async fn confirm(&mut self, durable: &[Lsn]) -> Result<(), SourceError> {
        let held = ack_position(self.start, durable, self.confirmed.end());
        let Some(i) = self.unconfirmed.iter().rposition(|t| t.end() <= held) else {
            return Ok(());
        };
        let tick = self.unconfirmed[i];
        self.unconfirmed.drain(..=i);
        self.client
            .execute(
                "UPDATE walrelay_capture.consumers SET tick = $2 WHERE name = $1",
                &[&self.consumer, &tick.id],
            )
            .await
            .map_err(pg("recording the consumer's position"))?;
        self.client
            .execute(
                "DELETE FROM walrelay_capture.ticks WHERE consumer = $1 AND id < $2",
                &[&self.consumer, &tick.id],
            )
            .await
            .map_err(pg("removing old ticks"))?;
        self.confirmed = tick;
        self.rotate_logs().await
    }

    /// Keep the log small without bloat: switch the triggers to the other table every
    /// `log_rotation`, and empty the table left (TRUNCATE) once every consumer's confirmed
    /// tick sees every transaction that wrote to it finished. The writers of the table
    /// left all took their transaction id before the switch (a row is changed before its
    /// statement's trigger reads the current table), so they are below the `xmax` of a
    /// snapshot taken after it.
    async fn rotate_logs(&mut self) -> Result<(), SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT c.last_value::int,
                        s.switched_at IS NOT NULL,
                        coalesce((SELECT bool_and(pg_snapshot_xmin(t.snapshot) >= pg_snapshot_xmax(s.switched_at))
                                    FROM walrelay_capture.consumers k
                                    JOIN walrelay_capture.ticks t ON t.id = k.tick), false),
                        EXISTS (SELECT 1 FROM walrelay_capture.log_1),
                        EXISTS (SELECT 1 FROM walrelay_capture.log_2)
                   FROM walrelay_capture.current_log c, walrelay_capture.state s",
                &[],
            )
            .await
            .map_err(pg("reading the log's state"))?;
        let (current, switched, all_past): (i32, bool, bool) = (row.get(0), row.get(1), row.get(2));
        let has_rows = [row.get::<_, bool>(3), row.get::<_, bool>(4)];
        let other = 3 - current;
        if has_rows[(other - 1) as usize] {
            if !switched {
                // A switch whose snapshot was not recorded (a crash between the two): a
                // snapshot now is later still, so just as safe.
                self.client
                    .batch_execute(
                        "UPDATE walrelay_capture.state SET switched_at = pg_current_snapshot()",
                    )
                    .await
                    .map_err(pg("recording the log's switch"))?;
            } else if all_past {
                // Never wait on a reader of that table: try again at the next confirm.
                let emptied = self
                    .client
                    .batch_execute(&format!(
                        "BEGIN; SET LOCAL lock_timeout = '1s';
                         TRUNCATE walrelay_capture.log_{other};
                         UPDATE walrelay_capture.state SET switched_at = NULL;
                         COMMIT"
                    ))
                    .await;
                match emptied {
                    Ok(()) => tracing::debug!(log = other, "trigger log emptied"),
                    Err(e) => {
                        let _ = self.client.batch_execute("ROLLBACK").await;
                        tracing::debug!(error = %e, "the trigger log was busy; emptied later");
                    }
                }
            }
        } else if has_rows[(current - 1) as usize] && self.switched.elapsed() >= self.log_rotation {
            self.client
                .batch_execute(&format!(
                    "SELECT setval('walrelay_capture.current_log', {other});
                     UPDATE walrelay_capture.state SET switched_at = pg_current_snapshot();"
                ))
                .await
                .map_err(pg("switching the log"))?;
            self.switched = tokio::time::Instant::now();
            tracing::debug!(log = other, "trigger log switched");
        }
        Ok(())
    }

    /// Confirm what the sinks hold at the end of a run.
    pub async fn finish(mut self, durable: &[Lsn]) -> Result<Lsn, SourceError> {
        self.confirm(durable).await?;
        // No relay to wake: writers need not notify until one waits again.
        if let Err(e) = self.set_busy(true).await {
            tracing::debug!(error = %e, "notifications left on");
        }
        Ok(self.confirmed.end())
    }
}

/// Each relation as its set shapes it, by the relation's address.
fn shape_all(
    plan: &Plan,
    relations: &HashMap<i32, Arc<Relation>>,
) -> Result<HashMap<usize, Arc<ShapedRelation>>, SourceError> {
    let mut shaped = HashMap::new();
    for relation in relations.values() {
        if let Some(shape) = plan.shape_by_oid(relation.oid) {
            let s = shape
                .relation(relation.clone())
                .map_err(|e| SourceError::Setup(e.to_string()))?;
            shaped.insert(Arc::as_ptr(relation) as usize, Arc::new(s));
        }
    }
    Ok(shaped)
}

/// Hand `events` to every sink (as its sets route them), waiting for room.
async fn deliver(
    events: Vec<Event>,
    fanout: &Fanout,
    cancel: &CancellationToken,
) -> Result<(), SourceError> {
    let bytes = crate::sink::queue::batch_bytes(&events);
    let batch = Arc::new(events);
    for sink in fanout.sinks() {
        let Some((batch, bytes)) = sink.routed(&batch, bytes) else {
            continue;
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(SourceError::Stopped),
            sent = sink.input.send(batch, bytes) => {
                if sent.is_err() {
                    return Err(SourceError::SinkClosed(sink.name.clone()));
                }
            }
        }
    }
    Ok(())
}

impl crate::pipeline::RunningSource for TriggerSource {
    async fn run(
        &mut self,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        TriggerSource::run(self, fanout, cancel).await
    }

    async fn finish(self, durable: &[Lsn]) -> Result<Lsn, SourceError> {
        TriggerSource::finish(self, durable).await
    }
}
