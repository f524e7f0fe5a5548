//! The pgoutput source: a logical replication slot read over the streaming replication
//! protocol, decoded into committed transactions in commit order.
//!
//! The loop reads messages, batches the events they make, and hands each batch to every
//! sink, waiting when a sink's queue is full. Whatever it is doing, a standby status update
//! goes to the server at least every `status_interval` (with a reply requested, so the
//! server answers with its position and an idle slot moves forward). The flush position in
//! those updates is the lowest position every sink holds durably: nothing the server
//! forgets can be lost.

pub mod assemble;
pub mod decode;
pub mod setup;
pub mod spill;
pub mod standby_gate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use walrelay_model::{Event, Lsn};

use crate::config::{DdlMode, SourceConfig};
use crate::pg::conninfo::ConnInfo;
use crate::pg::replication::{ReplicationConnection, ReplicationMessage};
use crate::pg::{sql, PgError};
use crate::pipeline::{ack_position, durable_moved, Fanout};
use crate::sink::queue::batch_bytes;
use assemble::{AssembleError, Assembler, StreamNeeds};
use decode::DecodeError;
use spill::SpillError;

/// Resolves when any sink's durable position changes. A sink that ended never resolves
/// here; the pipeline notices it when delivering.
/// Which sinks a batch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audience {
    All,
    /// Only sinks that take streamed transactions whole, at their commit.
    Whole,
}

/// Events per batch handed to the sinks, at most; a streamed transaction is read back in
/// batches of this many changes.
const BATCH_EVENTS: usize = 1024;

/// Bytes per batch (`Event::approx_bytes`): a batch closes at whichever limit comes first,
/// so that wide rows make small batches and the sinks' byte budgets stay meaningful.
const BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("decoding the replication stream: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Spill(#[from] SpillError),
    /// Something the operator must fix before capture can start.
    #[error("{0}")]
    Setup(String),
    /// The slot (or the trigger log's consumer) is held by another session past the wait:
    /// at the first start another relay runs with it; on a reconnect, more likely the old
    /// connection's server process, which lives until the server notices the connection
    /// is gone (up to `wal_sender_timeout` on a half-open one), so it is retried then.
    #[error("{0}")]
    InUse(String),
    #[error("the server ended the replication stream")]
    StreamEnded,
    #[error("sink {0} stopped")]
    SinkClosed(String),
    #[error("stopped")]
    Stopped,
    /// The slot is gone from the server while a target holds what came through it: a new
    /// slot would start later and lose what was committed in between.
    #[error("slot {slot} does not exist on {server}, but target {sink} holds changes up to {lsn} that came through it: a new slot would start later and lose what was committed in between, so none is created. Waiting for the slot (after a failover the HA agent copies it to the replicas; `walrelay ctl list` shows the copies). To start over instead, on the target empty the tables, then DROP SCHEMA walrelay CASCADE; SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = '{slot}/{sink}'")]
    SlotMissing {
        slot: String,
        server: String,
        sink: String,
        lsn: Lsn,
    },
}

impl SourceError {
    /// Worth retrying after a pause (the connection dropped, the server restarts).
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Pg(e) => e.is_transient(),
            SourceError::StreamEnded | SourceError::SlotMissing { .. } | SourceError::InUse(_) => {
                true
            }
            _ => false,
        }
    }
}

/// The targets that hold something that came through the slot (applied changes or a
/// finished copy), with the highest position they recorded: a slot missing then is lost,
/// not new.
pub type TargetsHistory = Vec<(String, Lsn)>;

/// What `prepare` found and made ready.
pub struct Prepared {
    pub info: ConnInfo,
    /// The slot's confirmed position: everything before it was acknowledged earlier.
    pub confirmed: Lsn,
    pub status_interval: Duration,
    /// Created now (not found), so there is no history to resume.
    pub created_slot: bool,
    /// The tables captured: their sets and shapes.
    pub plan: Arc<crate::sets::Plan>,
    /// The snapshot the slot exported when it was created now (valid until streaming).
    pub snapshot: Option<crate::snapshot::SnapshotPoint>,
    /// How schema changes are captured (`[ddl] mode`, `auto` decided).
    pub ddl_mode: DdlMode,
    /// `server_version_num` of the source.
    pub version_num: i32,
    conn: ReplicationConnection,
}

/// Check the server, select the tables, make the publication and the slot. After this the
/// sinks can be opened at `confirmed`, then `start` begins the stream.
pub async fn prepare(
    cfg: &SourceConfig,
    sets: &[crate::config::SetConfig],
    ddl: &crate::config::DdlConfig,
    history: &TargetsHistory,
) -> Result<Prepared, SourceError> {
    let info = cfg
        .url
        .resolve()
        .map_err(|e| SourceError::Setup(format!("source.url: {e}")))?;
    // Of several hosts, the one that fits now: after a failover, the new primary.
    let info = crate::pg::locate::locate(&info).await?;
    let client = sql::connect(&info).await?;
    let facts = setup::server_facts(&client).await?;
    if let Some(problem) = setup::server_problems(&facts).into_iter().next() {
        return Err(SourceError::Setup(problem));
    }
    // walrelay's own changes here (replica identity, publication) are not for the targets;
    // and they are made even where a cutover has made the database read-only for others
    // (the stream must drain it).
    client
        .batch_execute(&format!(
            "{}; SET default_transaction_read_only = off",
            crate::ddl::capture::OWN_DDL
        ))
        .await
        .map_err(|e| SourceError::Pg(PgError::from_sql("setting up the source session", e)))?;
    let (plan, mut tables) = crate::sets::Plan::resolve(&client, sets).await?;
    if tables.is_empty() {
        return Err(SourceError::Setup(
            "the sets select no table on the source: nothing to capture".into(),
        ));
    }
    for (t, shape) in tables.iter_mut().zip(plan.tables()) {
        if shape.identity_full && t.replica_identity != 'f' {
            setup::set_identity_full(&client, t).await?;
        }
    }
    if let Some(t) = tables.iter().find(|t| !t.has_replica_identity()) {
        return Err(SourceError::Setup(t.identity_advice()));
    }
    setup::ensure_publication(
        &client,
        &cfg.publication,
        &plan.published(&tables),
        facts.version_num,
        setup::PublicationMode::Apply,
    )
    .await?;
    let ddl_mode = crate::ddl::capture::mode_for(ddl.mode, facts.is_superuser, &facts.current_user)
        .map_err(SourceError::Setup)?;
    if ddl_mode == DdlMode::Statements {
        let patterns: Vec<_> = plan.patterns().collect();
        crate::ddl::capture::install(&client, &cfg.publication, &patterns).await?;
    }
    tracing::info!(mode = ?ddl_mode, "DDL capture");

    let mut conn = ReplicationConnection::connect(&info).await?;
    let (confirmed, created_slot, snapshot) = match setup::slot_info(&client, &cfg.slot).await? {
        Some(slot) => {
            if let Some(problem) = setup::slot_problem(&cfg.slot, &slot, &facts.database) {
                return Err(SourceError::Setup(problem));
            }
            let slot = setup::wait_until_released(&client, &cfg.slot, slot).await?;
            let confirmed = slot.confirmed_flush.ok_or_else(|| {
                SourceError::Setup(format!(
                    "slot {} has no confirmed position yet (is it still being created?): try again, or drop it",
                    cfg.slot
                ))
            })?;
            (confirmed, false, None)
        }
        None => {
            if let Some((sink, lsn)) = history.first() {
                return Err(SourceError::SlotMissing {
                    slot: cfg.slot.clone(),
                    server: info.describe(),
                    sink: sink.clone(),
                    lsn: *lsn,
                });
            }
            let (lsn, name) = setup::create_slot(&mut conn, &cfg.slot).await?;
            let snapshot = name.map(|name| crate::snapshot::SnapshotPoint { name, lsn });
            (lsn, true, snapshot)
        }
    };
    let status_interval = match facts.wal_sender_timeout {
        Some(t) => cfg.status_interval.min(t / 2),
        None => cfg.status_interval,
    };
    tracing::info!(
        server = %info.describe(),
        slot = %cfg.slot,
        confirmed = %confirmed,
        tables = tables.len(),
        "source ready"
    );
    Ok(Prepared {
        info,
        confirmed,
        status_interval,
        created_slot,
        plan: Arc::new(plan),
        snapshot,
        ddl_mode,
        version_num: facts.version_num,
        conn,
    })
}

pub struct PgOutputSource {
    conn: ReplicationConnection,
    assembler: Assembler,
    ticker: Interval,
    start: Lsn,
    /// Highest WAL position the server has told us of.
    received: Lsn,
    /// Highest flush position sent to the server.
    acked: Lsn,
    /// The sinks' durable positions, to confirm as soon as one moves.
    durable_watches: Vec<tokio::sync::watch::Receiver<Lsn>>,
    /// Holds batches until the synchronous standby has them (`standby_gate`).
    standby_gate: Option<standby_gate::StandbyGate>,
}

impl PgOutputSource {
    /// Open the stream from the slot's confirmed position.
    pub async fn start(
        prepared: Prepared,
        cfg: &SourceConfig,
        needs: StreamNeeds,
        spill_dir: PathBuf,
    ) -> Result<Self, SourceError> {
        let mut conn = prepared.conn;
        spill::prepare_dir(&spill_dir, &cfg.slot)?;
        let standby_gate = if cfg.wait_for_sync_standby {
            standby_gate::StandbyGate::open(&prepared.info, &cfg.slot).await?
        } else {
            None
        };
        let skip_replicated = cfg.origin == crate::config::OriginFilter::None;
        let options = setup::StartOptions {
            // walrelay's marks (`crate::origin`) come as messages.
            messages: cfg.messages || prepared.ddl_mode == DdlMode::Statements || skip_replicated,
            // PostgreSQL 16+ leaves out what has an origin itself, before decoding it out.
            no_origin: skip_replicated && prepared.version_num >= 160000,
        };
        conn.start_replication(&setup::start_command(cfg, prepared.confirmed, options))
            .await?;
        let mut ticker = tokio::time::interval(prepared.status_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut assembler =
            Assembler::new(prepared.plan.clone(), needs, spill_dir, cfg.slot.clone());
        assembler.set_other_messages(cfg.messages);
        assembler.set_additive(prepared.ddl_mode == DdlMode::Additive);
        assembler.set_skip_replicated(skip_replicated);
        Ok(PgOutputSource {
            conn,
            assembler,
            ticker,
            start: prepared.confirmed,
            received: prepared.confirmed,
            acked: prepared.confirmed,
            durable_watches: Vec::new(),
            standby_gate,
        })
    }

    /// Stream until `cancel` fires (then `Ok`, or `Stopped` if it came while a batch was
    /// handed over) or something fails.
    pub async fn run(
        &mut self,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let mut batch = Vec::with_capacity(BATCH_EVENTS);
        self.durable_watches = fanout.sinks().iter().map(|s| s.durable.clone()).collect();
        self.run_inner(fanout, cancel, &mut batch).await
    }

    async fn run_inner(
        &mut self,
        fanout: &Fanout,
        cancel: &CancellationToken,
        batch: &mut Vec<Event>,
    ) -> Result<(), SourceError> {
        loop {
            let msg = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                _ = self.ticker.tick() => {
                    self.send_status(&fanout.durable(), true).await?;
                    continue;
                }
                _ = durable_moved(&mut self.durable_watches) => {
                    self.confirm_if_moved(fanout).await?;
                    continue;
                }
                m = self.conn.recv() => m?,
            };
            let mut bytes = 0;
            self.handle_counted(msg, batch, &mut bytes, fanout, cancel)
                .await?;
            // Take what has already arrived without waiting, to fill the batch.
            while batch.len() < BATCH_EVENTS && bytes < BATCH_BYTES {
                match self.conn.try_recv_buffered()? {
                    Some(m) => {
                        self.handle_counted(m, batch, &mut bytes, fanout, cancel)
                            .await?
                    }
                    None => break,
                }
            }
            if !batch.is_empty() {
                self.deliver_to(std::mem::take(batch), fanout, cancel, Audience::All)
                    .await?;
            }
        }
    }

    /// `handle`, keeping `bytes` the size of what `batch` holds.
    async fn handle_counted(
        &mut self,
        msg: ReplicationMessage,
        batch: &mut Vec<Event>,
        bytes: &mut usize,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let before = batch.len();
        self.handle(msg, batch, fanout, cancel).await?;
        // `handle` may have delivered the batch and started another.
        *bytes = match batch.get(before..) {
            Some(added) => *bytes + batch_bytes(added),
            None => batch_bytes(batch),
        };
        Ok(())
    }

    async fn handle(
        &mut self,
        msg: ReplicationMessage,
        batch: &mut Vec<Event>,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        match msg {
            ReplicationMessage::XLogData { wal_end, data, .. } => {
                self.received = self.received.max(wal_end);
                self.assembler.set_position(wal_end);
                let message = decode::decode(&data, self.assembler.in_stream())?;
                if let Some(mut txn) = self.assembler.handle(message, batch)? {
                    tracing::debug!(
                        xid = txn.begin.xid,
                        changes = txn.changes.remaining(),
                        "streamed transaction committed; reading it back from its spill file"
                    );
                    // A streamed transaction committed: read it back in batches, after
                    // what came before it, for the sinks that take transactions whole.
                    if !batch.is_empty() {
                        self.deliver_to(std::mem::take(batch), fanout, cancel, Audience::All)
                            .await?;
                    }
                    let mut seq = 0;
                    loop {
                        let mut chunk = Vec::with_capacity(BATCH_EVENTS + 2);
                        let more = txn.emit(&mut chunk, &mut seq, BATCH_EVENTS, BATCH_BYTES)?;
                        let audience = if txn.for_all {
                            Audience::All
                        } else {
                            Audience::Whole
                        };
                        self.deliver_to(chunk, fanout, cancel, audience).await?;
                        if !more {
                            break;
                        }
                    }
                }
            }
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.received = self.received.max(wal_end);
                // Outside a transaction the server has sent every commit before wal_end,
                // so once the sinks hold what came before, wal_end is safe to confirm.
                if !self.assembler.in_transaction() {
                    if let Some(Event::Keepalive(last)) = batch.last_mut() {
                        *last = (*last).max(wal_end);
                    } else {
                        batch.push(Event::Keepalive(wal_end));
                    }
                }
                if reply_requested {
                    self.send_status(&fanout.durable(), false).await?;
                }
            }
            ReplicationMessage::CopyDone => return Err(SourceError::StreamEnded),
        }
        Ok(())
    }

    /// Hand a batch to the sinks of `audience`, waiting for room, and keep the server
    /// informed meanwhile.
    async fn deliver_to(
        &mut self,
        batch: Vec<Event>,
        fanout: &Fanout,
        cancel: &CancellationToken,
        audience: Audience,
    ) -> Result<(), SourceError> {
        self.wait_for_standby(&batch, fanout, cancel).await?;
        let bytes = batch_bytes(&batch);
        let batch = std::sync::Arc::new(batch);
        let sinks = fanout
            .sinks()
            .iter()
            .filter(|s| audience == Audience::All || !s.applies_streams);
        for sink in sinks {
            let Some((batch, bytes)) = sink.routed(&batch, bytes) else {
                continue;
            };
            if !sink.input.has_room(bytes) {
                tracing::debug!(sink = %sink.name, "the sink's queue is full: the source waits");
            }
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(SourceError::Stopped),
                    sent = sink.input.send(batch.clone(), bytes) => {
                        if sent.is_err() {
                            return Err(SourceError::SinkClosed(sink.name.clone()));
                        }
                        break;
                    }
                    _ = self.ticker.tick() => self.send_status(&fanout.durable(), true).await?,
                    _ = durable_moved(&mut self.durable_watches) => self.confirm_if_moved(fanout).await?,
                }
            }
        }
        Ok(())
    }

    /// Hold `batch` until the synchronous standby has everything in it, keeping the server
    /// informed meanwhile.
    async fn wait_for_standby(
        &mut self,
        batch: &[Event],
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let Some(mut gate) = self.standby_gate.take() else {
            return Ok(());
        };
        let lsn = standby_gate::gate_position(batch);
        let held = async {
            let mut pause = standby_gate::POLL;
            while !gate.passes(lsn).await? {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(SourceError::Stopped),
                    _ = self.ticker.tick() => self.send_status(&fanout.durable(), true).await?,
                    _ = tokio::time::sleep(pause) => pause = (pause * 2).min(standby_gate::POLL_MAX),
                }
            }
            Ok(())
        }
        .await;
        self.standby_gate = Some(gate);
        held
    }

    /// Confirm at once what every sink now holds, if that is more than already confirmed:
    /// the server can free WAL sooner, and the lag it reports stays small.
    async fn confirm_if_moved(&mut self, fanout: &Fanout) -> Result<(), SourceError> {
        let durable = fanout.durable();
        if ack_position(self.start, &durable, self.acked) > self.acked {
            self.send_status(&durable, false).await?;
        }
        Ok(())
    }

    async fn send_status(&mut self, sinks_durable: &[Lsn], reply: bool) -> Result<(), SourceError> {
        let flush = ack_position(self.start, sinks_durable, self.acked);
        let write = self.received.max(flush);
        crate::failpoint::BEFORE_STATUS_UPDATE.hit();
        self.conn.send_status(write, flush, flush, reply).await?;
        if flush > self.acked {
            tracing::debug!(flush = %flush, "confirmed to the source");
        }
        self.acked = flush;
        Ok(())
    }

    /// After the sinks have finished: confirm what they hold and end the stream.
    pub async fn finish(mut self, sinks_durable: &[Lsn]) -> Result<Lsn, SourceError> {
        self.send_status(sinks_durable, false).await?;
        let acked = self.acked;
        self.conn.finish().await?;
        Ok(acked)
    }
}

impl crate::pipeline::RunningSource for PgOutputSource {
    async fn run(
        &mut self,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        PgOutputSource::run(self, fanout, cancel).await
    }

    async fn finish(self, durable: &[Lsn]) -> Result<Lsn, SourceError> {
        PgOutputSource::finish(self, durable).await
    }
}
