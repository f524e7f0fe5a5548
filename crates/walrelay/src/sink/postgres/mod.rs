//! The `postgres` sink: applies source transactions to a target database in commit order,
//! exactly once.
//!
//! - Exactly once: the end of the last applied source transaction is written to
//!   `walrelay.progress` in the same target transaction as its changes. At start the sink
//!   waits until it owns the progress (`progress::fence`: a killed relay's sessions may
//!   still be committing), reads it, and skips transactions the source sends again that
//!   are already in; the source sends whole the streamed transactions among them.
//! - Grouping: consecutive source transactions share one target transaction, up to
//!   `batch_transactions`, `batch_bytes` or `batch_delay`, and it commits as soon as no more
//!   input is waiting; the target passes only through states the source had at a commit.
//! - Streaming: a transaction PostgreSQL streams before its commit is applied as it arrives,
//!   on a connection of its own (a savepoint per subtransaction), and committed when its
//!   commit arrives — after every transaction that committed before it. Before a stream's
//!   statements run, the open group commits, so that they never wait on its locks.

mod bulk;
pub mod conflict;
mod param;
pub mod progress;
mod protect;
mod sequences;
mod session;
pub mod statements;

use std::collections::HashMap;

use tokio::sync::watch;
use tokio::time::Instant;
use walrelay_model::{Event, Lsn, TxnCommit, Xid};

use bulk::ChangeRef;
use progress::Progress;

use super::{advance, Batch, SinkError};
use crate::config::PostgresSinkConfig;
use crate::pg::conninfo::ConnInfo;
use crate::pg::{sql, PgError};
pub use session::{ApplyError, ApplySession, ChangeAt};

/// Idle stream connections kept for the next streamed transaction.
const IDLE_STREAM_SESSIONS: usize = 2;

pub struct PostgresSink {
    config: PostgresSinkConfig,
    /// Names the progress on the target, and (`progress::session_name`) every session.
    progress_name: String,
    info: ConnInfo,
    /// Where the applied position is recorded.
    progress: Progress,
    main: ApplySession,
    /// End of the last source transaction applied, as recorded on the target.
    applied: Option<Lsn>,
    /// Tables copied as of a source position: their changes committed before it are in
    /// the copy already.
    copied_at: HashMap<(String, String), Lsn>,
    /// The sequences of the sink's sets, raised before each commit.
    sequences: Option<sequences::SequenceSync>,
    /// How its sessions treat schema changes.
    ddl: session::DdlSettings,
}

impl PostgresSink {
    /// Connect, create the progress table if needed and read the recorded position.
    pub async fn open(
        config: &PostgresSinkConfig,
        context: &super::SinkContext<'_>,
    ) -> Result<Self, SinkError> {
        let slot = context.slot;
        let err = |source: ApplyError| SinkError::Apply {
            name: config.name.clone(),
            source: Box::new(source),
        };
        let info = config
            .url
            .resolve()
            .map_err(|e| err(ApplyError::Pg(e.into())))?;
        let progress_name = format!("{slot}/{}", config.name);
        let ddl = session::DdlSettings {
            on_unsafe: context.ddl_on_unsafe,
            additive: context.ddl_additive,
            copies_name: Some(progress_name.clone()),
        };
        let mut main = connect_session(&info, config, &progress_name, &ddl)
            .await
            .map_err(err)?;
        let progress_err = |source| SinkError::Progress {
            name: config.name.clone(),
            source,
        };
        progress::fence(main.client(), &progress_name)
            .await
            .map_err(progress_err)?;
        let (progress, applied) = Progress::open(main.client(), &progress_name)
            .await
            .map_err(progress_err)?;
        progress.attach(&main).await.map_err(err)?;
        if context.two_writers {
            let two = conflict::prepare(
                &main,
                progress.has_origin(),
                &progress_name,
                config,
                context.source,
            )
            .await
            .map_err(err)?;
            main.set_two_writers(two);
        } else if config.uses_last_writer_wins() {
            tracing::warn!(sink = %config.name, "on_conflict = \"last_writer_wins\" compares the two nodes' commits only with source.origin = \"none\" (two writable nodes); with one writer the incoming change wins");
        }
        let copied_at = crate::snapshot::copied_positions(main.client(), &progress_name)
            .await
            .map_err(|e| err(ApplyError::Pg(e)))?;
        protect::apply(&main, config.protect, context.tables)
            .await
            .map_err(err)?;
        let sequences = match context.source {
            // Each writable node hands out its own keys (`source.key_ranges`): raising the
            // target's sequences to this node's values would give it this node's keys.
            Some(_) if context.two_writers => {
                if !context.sequences.is_empty() {
                    tracing::info!(sink = %config.name, "sequences are not kept in step with two writable nodes: each node hands out its own values (source.key_ranges)");
                }
                None
            }
            Some(source) => sequences::SequenceSync::open(source, main.client(), context.sequences)
                .await
                .map_err(err)?,
            None => None,
        };
        tracing::info!(
            sink = %config.name,
            target = %info.describe(),
            progress = %progress.describe(),
            applied = %applied.map(|l| l.to_string()).unwrap_or_else(|| "nothing yet".into()),
            "target ready"
        );
        Ok(PostgresSink {
            config: config.clone(),
            progress_name,
            info,
            progress,
            main,
            applied,
            copied_at,
            sequences,
            ddl,
        })
    }

    /// The position the target holds, if any.
    pub fn applied(&self) -> Option<Lsn> {
        self.applied
    }

    pub async fn run(
        self,
        input: crate::sink::queue::QueueReceiver,
        durable: watch::Sender<Lsn>,
    ) -> Result<(), SinkError> {
        let name = self.config.name.clone();
        let mut applier = Applier::new(self);
        let result = applier.run(input, &durable).await;
        applier.abandon_streams().await;
        result.map_err(|source| SinkError::Apply {
            name,
            source: Box::new(source),
        })
    }
}

/// Open a target session set up for applying.
async fn connect_session(
    info: &ConnInfo,
    config: &PostgresSinkConfig,
    progress_name: &str,
    ddl: &session::DdlSettings,
) -> Result<ApplySession, ApplyError> {
    let client = sql::connect(info).await?;
    client
        .batch_execute(
            // Read-write even where a cutover (`migrate`) made the database read-only for
            // everyone else.
            "SET idle_in_transaction_session_timeout = 0; SET statement_timeout = 0; \
             SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
             SET default_transaction_read_only = off",
        )
        .await
        .map_err(|e| PgError::from_sql("setting up the target session", e))?;
    // The source is confirmed once the target's COMMIT returns: with the target's
    // `synchronous_commit = off` (a database's or role's setting) that COMMIT is not yet
    // durable, and a target crash would lose what the source then frees. Other settings
    // (`local`, `remote_apply`, ...) are the DBA's and stay.
    let forced: Option<tokio_postgres::Row> = client
        .query_opt(
            "SELECT set_config('synchronous_commit', 'on', false) \
              WHERE current_setting('synchronous_commit') = 'off'",
            &[],
        )
        .await
        .map_err(|e| PgError::from_sql("setting synchronous_commit", e))?;
    if forced.is_some() {
        tracing::info!(
            target = %info.describe(),
            "the target has synchronous_commit = off: walrelay's apply sessions commit with on, so that nothing confirmed to the source can be lost"
        );
    }
    // The fence finds a killed relay's sessions by this name (`progress::fence`).
    client
        .execute(
            "SELECT set_config('application_name', $1, false)",
            &[&progress::session_name(progress_name)],
        )
        .await
        .map_err(|e| PgError::from_sql("naming the target session", e))?;
    // As PostgreSQL's own apply worker does: the target's triggers and foreign-key checks do
    // not fire for replicated changes (the source checked them already).
    let replica_role = client
        .batch_execute("SET session_replication_role = replica")
        .await;
    if let Err(e) = replica_role.as_ref() {
        tracing::warn!(
            target = %info.describe(),
            error = %e,
            "applying with the target's triggers and foreign keys active; give the sink's role superuser, or in PostgreSQL 15: GRANT SET ON PARAMETER session_replication_role"
        );
    }
    // Tables may be applied in any order inside a target transaction only while nothing on
    // the target checks one table against another.
    let reorder_tables = replica_role.is_ok();
    let mut session =
        ApplySession::new(client, info.describe(), config.on_conflict, reorder_tables);
    session.set_ddl(ddl.clone());
    session.set_on_conflict_tables(config.on_conflict_tables.clone());
    session.set_mark(progress_name);
    Ok(session)
}

/// The state of one run of the sink.
struct Applier {
    sink: PostgresSink,
    /// Transactions whose commit LSN lies below this are already on the target.
    skip_before: Lsn,
    /// Skipping the rest of a transaction that is already applied.
    skipping: bool,
    /// Between the Begin and Commit of a source transaction being applied: the group must
    /// not commit now, or the target would show half a transaction.
    inside_transaction: bool,
    /// Commit position of the transaction being applied.
    commit_lsn: Lsn,
    /// The open group: source transactions applied in the main session, not yet committed.
    group: Group,
    /// Streamed transactions being applied, each on its own session.
    streams: HashMap<Xid, ApplySession>,
    idle_streams: Vec<ApplySession>,
    /// The highest durable position reached while a streamed transaction was open, to
    /// publish once none is (see `advance_durable`).
    durable_held: Lsn,
}

#[derive(Default)]
struct Group {
    /// The last source transaction in the group.
    last: Option<TxnCommit>,
    transactions: usize,
    /// Changes applied in the group (for the log).
    changes: usize,
    /// Commit the group at the end of the transaction being applied.
    ends_with_transaction: bool,
    opened: Option<Instant>,
}

impl Applier {
    fn new(sink: PostgresSink) -> Self {
        Applier {
            skip_before: sink.applied.unwrap_or(Lsn::ZERO),
            sink,
            skipping: false,
            inside_transaction: false,
            commit_lsn: Lsn::ZERO,
            group: Group::default(),
            streams: HashMap::new(),
            idle_streams: Vec::new(),
            durable_held: Lsn::ZERO,
        }
    }

    async fn run(
        &mut self,
        mut input: crate::sink::queue::QueueReceiver,
        durable: &watch::Sender<Lsn>,
    ) -> Result<(), ApplyError> {
        if let Some(applied) = self.sink.applied {
            advance(durable, applied);
        }
        loop {
            let deadline = self.group.opened.filter(|_| !self.inside_transaction);
            let batch = match deadline {
                Some(opened) => {
                    let deadline = opened + self.sink.config.batch_delay;
                    match tokio::time::timeout_at(deadline, input.recv()).await {
                        Ok(Some(b)) => b,
                        Ok(None) => break,
                        Err(_) => {
                            self.commit_group(durable).await?;
                            continue;
                        }
                    }
                }
                None => match input.recv().await {
                    Some(b) => b,
                    None => break,
                },
            };
            for index in 0..batch.len() {
                self.handle(&batch, index, durable).await?;
            }
            self.sink.main.flush().await?;
            for s in self.streams.values_mut() {
                s.flush().await?;
            }
            if self.group.opened.is_some()
                && !self.inside_transaction
                && self.group_is_due(input.is_empty())
            {
                self.commit_group(durable).await?;
            }
        }
        // Input closed. A group that ends inside a transaction cannot commit: the source
        // sends all of it again, since none of it was confirmed.
        if self.inside_transaction {
            self.group = Group::default();
            return self.sink.main.rollback().await;
        }
        self.commit_group(durable).await
    }

    fn group_is_due(&self, input_idle: bool) -> bool {
        let c = &self.sink.config;
        input_idle
            || self.group.transactions >= c.batch_transactions
            || self.sink.main.pending_bytes() >= c.batch_bytes
            || self
                .group
                .opened
                .is_some_and(|o| o.elapsed() >= c.batch_delay)
    }

    async fn handle(
        &mut self,
        batch: &Batch,
        index: usize,
        durable: &watch::Sender<Lsn>,
    ) -> Result<(), ApplyError> {
        match &batch[index] {
            Event::Begin(b) => {
                self.sink.main.set_remote_commit(b.commit_time);
                self.skipping = b.commit_lsn < self.skip_before;
                self.inside_transaction = !self.skipping;
                self.commit_lsn = b.commit_lsn;
            }
            Event::Change { change, position } => {
                if let walrelay_model::Change::Truncate {
                    relations,
                    cascade,
                    restart_identity,
                } = change
                {
                    // Only the tables whose copy does not already hold the truncate's effect.
                    let kept: Vec<_> = relations
                        .iter()
                        .filter(|r| !self.copied_after(r))
                        .cloned()
                        .collect();
                    if !self.skipping && kept.len() < relations.len() {
                        if self.group.opened.is_none() {
                            self.group.opened = Some(Instant::now());
                        }
                        if !kept.is_empty() {
                            let at = ChangeAt::Committed(*position);
                            self.sink.main.apply_runs().await?;
                            self.sink
                                .main
                                .truncate(&kept, *restart_identity, *cascade, at)
                                .await?;
                        }
                        return Ok(());
                    }
                }
                if !self.skipping && !self.in_copy(change) {
                    if self.group.opened.is_none() {
                        self.group.opened = Some(Instant::now());
                    }
                    // What a schema change makes (an enum's new value) may only be used
                    // once committed: its transaction ends the group.
                    if matches!(change, walrelay_model::Change::Ddl(_)) {
                        self.group.ends_with_transaction = true;
                    }
                    let change = ChangeRef::new(batch.clone(), index);
                    self.sink.main.apply(change).await?;
                    self.group.changes += 1;
                }
            }
            Event::Commit(c) => {
                self.inside_transaction = false;
                if self.skipping {
                    self.skipping = false;
                } else if self.sink.main.in_transaction() {
                    self.group.last = Some(c.clone());
                    self.group.transactions += 1;
                    if self.group.ends_with_transaction {
                        self.commit_group(durable).await?;
                    }
                } else {
                    // Nothing in it for the target, and nothing open before it.
                    self.advance_durable(durable, c.end_lsn);
                }
            }
            Event::Keepalive(lsn) => {
                // Everything before it is applied; once the group commits it is durable.
                if !self.sink.main.in_transaction() {
                    self.advance_durable(durable, *lsn);
                }
            }
            // A postgres target gets the snapshot's rows by COPY (`snapshot`), not as events.
            Event::Message(_) | Event::Read { .. } | Event::SnapshotEnd { .. } => {}
            Event::StreamChange { xid, subxid, .. } => {
                // The stream's statements must not wait on locks of the open group.
                self.commit_group(durable).await?;
                let session = self.stream_session(*xid).await?;
                if subxid != xid {
                    session.savepoint_for(*subxid).await?;
                }
                session.apply(ChangeRef::new(batch.clone(), index)).await?;
            }
            Event::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    if let Some(mut s) = self.streams.remove(xid) {
                        s.rollback().await?;
                        self.park(s);
                    }
                    self.advance_durable(durable, Lsn::ZERO);
                } else if let Some(s) = self.streams.get_mut(xid) {
                    s.rollback_to(*subxid).await?;
                }
            }
            Event::StreamCommit { commit, .. } => {
                // Every transaction that committed before it is in first.
                self.commit_group(durable).await?;
                if let Some(mut s) = self.streams.remove(&commit.xid) {
                    if commit.commit_lsn < self.skip_before {
                        s.rollback().await?;
                    } else {
                        self.raise_sequences().await?;
                        self.sink
                            .progress
                            .commit_stream(&self.sink.main, &mut s, commit)
                            .await?;
                        crate::failpoint::POSTGRES_AFTER_COMMIT.hit();
                        tracing::debug!(xid = commit.xid, end = %commit.end_lsn, "streamed transaction applied");
                    }
                    self.park(s);
                }
                self.advance_durable(durable, commit.end_lsn);
            }
        }
        Ok(())
    }

    /// Commit the open group with its position; then all of it is durable.
    async fn commit_group(&mut self, durable: &watch::Sender<Lsn>) -> Result<(), ApplyError> {
        if !self.sink.main.in_transaction() {
            self.group = Group::default();
            return Ok(());
        }
        // Changes without a finished transaction stay open, group and all: committing them
        // would show half a transaction.
        let Some(last) = self.group.last.take() else {
            return Ok(());
        };
        let group = std::mem::take(&mut self.group);
        let at = ChangeAt::Committed(walrelay_model::Position::new(last.commit_lsn, last.seq));
        // The source's sequences are read while the target records the position: both
        // must be done before the COMMIT, which then carries the sequences' raise.
        let PostgresSink {
            progress,
            main,
            sequences,
            ..
        } = &mut self.sink;
        let (recorded, raise) = tokio::join!(progress.record(main, &last, at), async {
            match sequences {
                Some(s) => s.raise_sql().await,
                None => Ok(None),
            }
        });
        recorded?;
        if let Some(sql) = raise? {
            main.set_before_commit(sql);
        }
        self.sink.main.commit().await?;
        crate::failpoint::POSTGRES_AFTER_COMMIT.hit();
        tracing::debug!(
            end = %last.end_lsn,
            transactions = group.transactions,
            changes = group.changes,
            "target transaction committed"
        );
        self.advance_durable(durable, last.end_lsn);
        Ok(())
    }

    /// Before a streamed transaction's commit: the target's sequences at least where the
    /// source's are now.
    async fn raise_sequences(&mut self) -> Result<(), ApplyError> {
        if let Some(s) = &mut self.sink.sequences {
            if let Some(sql) = s.raise_sql().await? {
                self.sink
                    .main
                    .client()
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| {
                        ApplyError::Pg(PgError::from_sql("raising target sequences", e))
                    })?;
            }
        }
        Ok(())
    }

    /// Publish `lsn` as durable — but while a streamed transaction is open in a stream
    /// session, hold it back until none is. What this sink holds would allow it (the open
    /// transaction commits after every position the source sent before its commit), but a
    /// durable position past the start of a transaction not yet committed here is easy to
    /// misread, and it gains nothing: the slot's restart point cannot pass that start
    /// either.
    fn advance_durable(&mut self, durable: &watch::Sender<Lsn>, lsn: Lsn) {
        self.durable_held = self.durable_held.max(lsn);
        if self.streams.is_empty() {
            advance(durable, self.durable_held);
        }
    }

    /// The change is in a table's copy already (committed before the copy's position).
    /// Streamed transactions never meet a table copied after their changes: the source
    /// holds them back whole until it has passed every such position.
    fn in_copy(&self, change: &walrelay_model::Change) -> bool {
        match change {
            walrelay_model::Change::Insert { relation, .. }
            | walrelay_model::Change::Update { relation, .. }
            | walrelay_model::Change::Delete { relation, .. } => self.copied_after(relation),
            walrelay_model::Change::Truncate { relations, .. } => {
                relations.iter().all(|r| self.copied_after(r))
            }
            walrelay_model::Change::Message { .. } | walrelay_model::Change::Ddl(_) => false,
        }
    }

    /// The table was copied after the current transaction committed.
    fn copied_after(&self, r: &walrelay_model::Relation) -> bool {
        !self.sink.copied_at.is_empty()
            && self
                .sink
                .copied_at
                .get(&(r.schema.clone(), r.name.clone()))
                .is_some_and(|at| self.commit_lsn < *at)
    }

    async fn stream_session(&mut self, xid: Xid) -> Result<&mut ApplySession, ApplyError> {
        if !self.streams.contains_key(&xid) {
            let session = match self.idle_streams.pop() {
                Some(s) => s,
                None => {
                    let sink = &self.sink;
                    connect_session(&sink.info, &sink.config, &sink.progress_name, &sink.ddl)
                        .await?
                }
            };
            self.streams.insert(xid, session);
        }
        Ok(self.streams.get_mut(&xid).expect("inserted above"))
    }

    fn park(&mut self, session: ApplySession) {
        if self.idle_streams.len() < IDLE_STREAM_SESSIONS {
            self.idle_streams.push(session);
        }
    }

    /// Streamed transactions still open when the sink stops did not commit (as far as it
    /// knows); the source sends them again.
    async fn abandon_streams(&mut self) {
        for (_, mut s) in self.streams.drain() {
            let _ = s.rollback().await;
        }
    }
}
