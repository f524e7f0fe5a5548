//! One connection to the target, applying changes inside its transaction: statements
//! prepared once per relation and shape, sent pipelined, their row counts checked for
//! conflicts in order.
//!
//! Conflict handling lives in the SQL itself (`ON CONFLICT`, `WITH ... UPDATE ... INSERT`),
//! so that no statement needs a follow-up that would run after later ones: the pipeline
//! then applies changes strictly in source order.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio_postgres::{Client, Statement};
use walrelay_model::{Change, Position, Relation, Xid};

use super::bulk::{self, ChangeRef, Run};
use super::param::TextParam;
use super::statements;
use crate::config::OnConflict;
use crate::pg::{quote, PgError};

mod ddl;
mod rows;
pub use ddl::DdlSettings;
use rows::{Check, Pending, Shape};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("target {target}: {message}")]
    Target { target: String, message: String },
    #[error("conflict on {table} ({at}): {what}; set on_conflict = \"apply\" or \"skip\" on the sink to resolve such conflicts automatically")]
    Conflict {
        table: String,
        at: ChangeAt,
        what: String,
    },
    #[error("applying to {table} ({at}): {error}")]
    Statement {
        table: String,
        at: ChangeAt,
        error: PgError,
    },
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Pg(e) | ApplyError::Statement { error: e, .. } => e.is_transient(),
            _ => false,
        }
    }
}

/// Where a change comes from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeAt {
    /// A committed transaction, at this position.
    Committed(Position),
    /// A transaction PostgreSQL is streaming before its commit.
    Streaming(Xid),
}

impl fmt::Display for ChangeAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeAt::Committed(p) => write!(f, "source position {p}"),
            ChangeAt::Streaming(xid) => write!(f, "streamed source transaction {xid}"),
        }
    }
}

pub struct ApplySession {
    client: Client,
    target: String,
    on_conflict: OnConflict,
    /// Relations checked against the target, by the address of their shared metadata, with
    /// the columns an UPDATE may set (not identity columns GENERATED ALWAYS on the target).
    relations: HashMap<usize, (Arc<Relation>, Vec<bool>)>,
    statements: HashMap<(usize, Shape), Statement>,
    /// walrelay's own statements, by their text.
    own_statements: HashMap<&'static str, Statement>,
    pending: Vec<Pending>,
    /// Bytes of the values in `pending`.
    queued_bytes: usize,
    pending_bytes: usize,
    in_transaction: bool,
    /// Open savepoints of a streamed transaction, one per subtransaction, in order.
    savepoints: Vec<Xid>,
    /// Runs of changes waiting to be applied in bulk, one per table. Tables are independent
    /// when the target's triggers and foreign keys are off (`reorder_tables`); otherwise
    /// at most one run is open, so changes keep their order across tables too.
    runs: Vec<Run>,
    reorder_tables: bool,
    /// Staging tables known to exist in this session.
    stages: std::collections::HashSet<String>,
    /// `pg_replication_origin_xact_setup(...)` to send with the next COMMIT.
    commit_origin: Option<String>,
    /// Sent with COMMIT, before it (`set_before_commit`).
    before_commit: Option<String>,
    ddl: DdlSettings,
    /// Sent with BEGIN: marks the transaction as walrelay's (`crate::origin`).
    begin_sql: String,
    /// `on_conflict` of single tables, by their qualified name on the target.
    on_conflict_tables: std::collections::BTreeMap<String, OnConflict>,
    /// The target takes writes of its own too (`source.origin = "none"`).
    two_writers: Option<TwoWriters>,
}

/// What the statements of two writable nodes need (`super::conflict`).
#[derive(Debug, Clone)]
pub struct TwoWriters {
    /// The relay's replication origin on the target, and its name in the conflict log.
    pub relay: String,
    /// The source's name for ties (`walrelay.nodes`).
    pub remote_node: String,
    /// Rows can be told by their last writer: the session holds the origin, and the
    /// target keeps commit timestamps. Without, only missing and existing keys conflict.
    pub detect_newer: bool,
    /// Commit time of the source transaction being applied.
    pub remote_time: String,
}

impl ApplySession {
    pub fn new(
        client: Client,
        target: String,
        on_conflict: OnConflict,
        reorder_tables: bool,
    ) -> Self {
        ApplySession {
            runs: Vec::new(),
            reorder_tables,
            stages: std::collections::HashSet::new(),
            commit_origin: None,
            before_commit: None,
            ddl: DdlSettings::default(),
            begin_sql: "BEGIN".into(),
            on_conflict_tables: Default::default(),
            two_writers: None,
            client,
            target,
            on_conflict,
            relations: HashMap::new(),
            statements: HashMap::new(),
            own_statements: HashMap::new(),
            pending: Vec::new(),
            queued_bytes: 0,
            pending_bytes: 0,
            in_transaction: false,
            savepoints: Vec::new(),
        }
    }

    /// Mark every transaction as written by relay `name`, so that a relay reading this
    /// target leaves it out (`crate::origin`).
    pub fn set_mark(&mut self, name: &str) {
        self.begin_sql = format!("BEGIN; {}", crate::origin::mark_statement(name));
    }

    /// `on_conflict` of single tables, by their qualified name on the target.
    pub fn set_on_conflict_tables(
        &mut self,
        tables: std::collections::BTreeMap<String, OnConflict>,
    ) {
        self.on_conflict_tables = tables;
    }

    /// The target takes writes of its own: conflicts are found and resolved as
    /// `super::conflict` says.
    pub fn set_two_writers(&mut self, two_writers: TwoWriters) {
        self.two_writers = Some(two_writers);
    }

    /// The source transaction applied from now on committed at `time`.
    pub fn set_remote_commit(&mut self, time: walrelay_model::PgTimestamp) {
        if let Some(t) = self.two_writers.as_mut() {
            t.remote_time = time.to_string();
        }
    }

    /// The conflict policy of a table.
    fn policy(&self, rel: &Relation) -> OnConflict {
        let configured = if self.on_conflict_tables.is_empty() {
            self.on_conflict
        } else {
            let name = format!("{}.{}", rel.schema, rel.name);
            self.on_conflict_tables
                .get(&name)
                .copied()
                .unwrap_or(self.on_conflict)
        };
        match configured {
            // With one writer the incoming change is always the later one.
            OnConflict::LastWriterWins if self.two_writers.is_none() => OnConflict::Apply,
            p => p,
        }
    }

    /// How schema changes are treated (`session::ddl`).
    pub fn set_ddl(&mut self, settings: DdlSettings) {
        self.ddl = settings;
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The target, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The session applies with `session_replication_role = replica`.
    pub fn replica_role(&self) -> bool {
        self.reorder_tables
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Bytes of values queued or applied in the open transaction, for batching.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes + self.runs.iter().map(|r| r.bytes).sum::<usize>()
    }

    fn pg_err(&self, what: &str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError + '_ {
        let context = format!("{what} on target {}", self.target);
        move |e| ApplyError::Pg(PgError::from_sql(context, e))
    }

    pub async fn begin(&mut self) -> Result<(), ApplyError> {
        if !self.in_transaction {
            self.client
                .batch_execute(&self.begin_sql)
                .await
                .map_err(self.pg_err("BEGIN"))?;
            self.in_transaction = true;
            self.pending_bytes = 0;
        }
        Ok(())
    }

    /// Send what is queued, then COMMIT.
    pub async fn commit(&mut self) -> Result<(), ApplyError> {
        self.apply_runs().await?;
        self.flush().await?;
        if self.in_transaction {
            // pg_replication_origin_xact_setup only sets session state; the origin moves
            // when the commit record is written, so it is as atomic here as anywhere in
            // the transaction. In one message with COMMIT it costs no round trip.
            let sql = self
                .before_commit
                .take()
                .into_iter()
                .chain(self.commit_origin.take())
                .chain(["COMMIT".to_string()])
                .collect::<Vec<_>>()
                .join("; ");
            crate::failpoint::POSTGRES_BEFORE_COMMIT.hit();
            self.client
                .batch_execute(&sql)
                .await
                .map_err(self.pg_err("COMMIT"))?;
        }
        self.end();
        Ok(())
    }

    /// Record `lsn` (a source commit's end) and `time` in the replication origin this
    /// session holds, with the next COMMIT.
    pub fn set_commit_origin(&mut self, lsn: walrelay_model::Lsn, time: &str) {
        // Literals, not parameters: a simple query has none. Both are walrelay's own
        // values (an LSN and a timestamp it printed), quoted all the same.
        self.commit_origin = Some(format!(
            "SELECT pg_replication_origin_xact_setup({}::pg_lsn, {}::timestamptz)",
            crate::pg::quote::literal(&lsn.to_string()),
            crate::pg::quote::literal(time)
        ));
    }

    /// Run `sql` (a simple query, literals only) in the message that carries the next
    /// COMMIT, before it: no round trip of its own.
    pub fn set_before_commit(&mut self, sql: String) {
        self.before_commit = Some(sql);
    }

    /// Undo the open transaction.
    pub async fn rollback(&mut self) -> Result<(), ApplyError> {
        self.take_pending();
        self.runs.clear();
        // A staging table created in this transaction is gone with it.
        self.stages.clear();
        if self.in_transaction {
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(self.pg_err("ROLLBACK"))?;
        }
        self.end();
        Ok(())
    }

    fn end(&mut self) {
        self.commit_origin = None;
        self.before_commit = None;
        self.in_transaction = false;
        self.pending_bytes = 0;
        self.savepoints.clear();
    }

    /// A savepoint before the first change of subtransaction `subxid`, so that its abort
    /// can be undone alone.
    pub async fn savepoint_for(&mut self, subxid: Xid) -> Result<(), ApplyError> {
        if self.savepoints.contains(&subxid) {
            return Ok(());
        }
        self.apply_runs().await?;
        self.flush().await?;
        self.client
            .batch_execute(&format!(
                "SAVEPOINT {}",
                quote::ident(&format!("s{subxid}"))
            ))
            .await
            .map_err(self.pg_err("SAVEPOINT"))?;
        self.savepoints.push(subxid);
        Ok(())
    }

    /// Undo subtransaction `subxid` and everything after its first change (its nested
    /// subtransactions). A subtransaction without a savepoint changed nothing here.
    pub async fn rollback_to(&mut self, subxid: Xid) -> Result<(), ApplyError> {
        let Some(i) = self.savepoints.iter().position(|&x| x == subxid) else {
            return Ok(());
        };
        // Changes queued after the savepoint belong to the aborted subtransactions.
        self.take_pending();
        self.runs.clear();
        self.stages.clear();
        self.client
            .batch_execute(&format!(
                "ROLLBACK TO SAVEPOINT {}",
                quote::ident(&format!("s{subxid}"))
            ))
            .await
            .map_err(self.pg_err("ROLLBACK TO SAVEPOINT"))?;
        self.savepoints.truncate(i);
        Ok(())
    }

    /// Queue one of walrelay's own statements (the progress record), to run in order with
    /// the changes.
    pub async fn queue_own(
        &mut self,
        sql: &'static str,
        params: Vec<TextParam>,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        let statement = match self.own_statements.get(sql) {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .client
                    .prepare(sql)
                    .await
                    .map_err(self.pg_err("preparing walrelay's statement"))?;
                self.own_statements.insert(sql, s.clone());
                s
            }
        };
        self.pending.push(Pending {
            statement,
            params,
            check: Check::Anything,
            table: None,
            what: "progress record".into(),
            at,
        });
        Ok(())
    }

    /// Apply one change inside the open transaction (opening one if needed). It joins its
    /// table's run, or is queued as a statement; `flush` sends queued statements, runs go
    /// when full or at the next barrier (commit, savepoint, truncate).
    pub async fn apply(&mut self, change: ChangeRef) -> Result<(), ApplyError> {
        self.begin().await?;
        let at = change_at(&change);
        let c = change.change();
        if let Change::Ddl(ddl) = c {
            return self.replay_ddl(ddl, at).await;
        }
        let relation = match c {
            Change::Insert { relation, .. }
            | Change::Update { relation, .. }
            | Change::Delete { relation, .. } => Some(relation.clone()),
            _ => None,
        };
        if let Some(rel) = &relation {
            self.check_relation(rel).await?;
        }
        let kind = match (&relation, bulk::run_kind(c)) {
            // Columns the target refuses to update stay out of the run's SET.
            (Some(rel), Some(bulk::RunKind::Update { set })) => {
                let set: Vec<bool> = set
                    .iter()
                    .zip(self.settable(rel))
                    .map(|(&s, &may)| s && may)
                    .collect();
                set.contains(&true).then_some(bulk::RunKind::Update { set })
            }
            (_, kind) => kind,
        };
        let bulk = relation
            .as_ref()
            .is_some_and(|rel| self.policy(rel) == OnConflict::Error && self.two_writers.is_none());
        if let (Some(rel), Some(kind), true) = (&relation, kind, bulk) {
            let mine = self.runs.iter().position(|r| Arc::ptr_eq(&r.relation, rel));
            match mine {
                Some(i) if self.runs[i].kind == kind => {}
                Some(i) => {
                    let run = self.runs.remove(i);
                    self.apply_run(run).await?;
                    self.runs.push(Run::new(rel.clone(), kind));
                }
                None => {
                    if !self.reorder_tables {
                        self.apply_runs().await?;
                    }
                    self.runs.push(Run::new(rel.clone(), kind));
                }
            }
            let i = self
                .runs
                .iter()
                .position(|r| Arc::ptr_eq(&r.relation, rel))
                .expect("pushed above");
            self.runs[i].push(change);
            if self.runs[i].is_full() {
                let run = self.runs.remove(i);
                self.apply_run(run).await?;
            }
            return Ok(());
        }
        // Row by row: after the table's run (or every run, when order across tables counts).
        match &relation {
            Some(rel) if self.reorder_tables => {
                if let Some(i) = self.runs.iter().position(|r| Arc::ptr_eq(&r.relation, rel)) {
                    let run = self.runs.remove(i);
                    self.apply_run(run).await?;
                }
            }
            _ => self.apply_runs().await?,
        }
        self.apply_row(c, at).await
    }

    /// Apply every open run.
    pub async fn apply_runs(&mut self) -> Result<(), ApplyError> {
        for run in std::mem::take(&mut self.runs) {
            self.apply_run(run).await?;
        }
        Ok(())
    }

    /// Apply a run: row by row when short, otherwise by COPY and one set statement.
    async fn apply_run(&mut self, run: Run) -> Result<(), ApplyError> {
        if run.changes.len() < bulk::BULK_MIN_ROWS {
            for c in &run.changes {
                self.apply_row(c.change(), change_at(c)).await?;
            }
            return Ok(());
        }
        // Statements queued before the run go first.
        self.flush().await?;
        let first_at = change_at(&run.changes[0]);
        let table = run.relation.qualified_name().to_string();
        let rows = run.changes.len();
        let stage_err = |e: tokio_postgres::Error| {
            let error = PgError::from_sql("", e);
            if error.code() == Some("23505") {
                ApplyError::Conflict {
                    table: table.clone(),
                    at: first_at,
                    what: format!(
                        "one of {rows} inserted rows: {}",
                        error.to_string().trim_start_matches(": ")
                    ),
                }
            } else {
                ApplyError::Statement {
                    table: table.clone(),
                    at: first_at,
                    error,
                }
            }
        };
        let columns = run.stage_columns();
        let stage = bulk::stage_name(&run.relation, &columns);
        if run.kind != bulk::RunKind::Insert && !self.stages.contains(&stage) {
            self.client
                .batch_execute(&bulk::create_stage_sql(&run.relation, &columns))
                .await
                .map_err(stage_err)?;
            self.stages.insert(stage.clone());
        }
        {
            use futures_util::SinkExt;
            let sink = self
                .client
                .copy_in(&bulk::copy_sql(&run))
                .await
                .map_err(stage_err)?;
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from(run.copy_data()))
                .await
                .map_err(stage_err)?;
            sink.finish().await.map_err(stage_err)?;
        }
        tracing::debug!(table = %table, rows, kind = ?run.kind, "applying a run in bulk");
        if run.kind == bulk::RunKind::Insert {
            return Ok(());
        }
        let applied = self
            .client
            .execute(bulk::apply_stage_sql(&run, run.repeated_keys).as_str(), &[])
            .await
            .map_err(stage_err)?;
        if applied as usize != run.distinct_keys() {
            let missing = self
                .client
                .query_opt(bulk::missing_key_sql(&run).as_str(), &[])
                .await
                .map_err(stage_err)?;
            let (at, key) = match missing {
                Some(row) => {
                    let seq: i64 = row.get(0);
                    let key: String = row.get(1);
                    let at = run
                        .changes
                        .get(usize::try_from(seq).unwrap_or(0))
                        .map_or(first_at, change_at);
                    (at, key)
                }
                None => (first_at, "?".into()),
            };
            let verb = if run.kind == bulk::RunKind::Delete {
                "delete"
            } else {
                "update"
            };
            let names: Vec<&str> = run
                .relation
                .key_columns()
                .map(|(_, c)| c.name.as_str())
                .collect();
            return Err(ApplyError::Conflict {
                table,
                at,
                what: format!(
                    "{verb} of ({})=({key}) found no such row on the target",
                    names.join(", ")
                ),
            });
        }
        self.client
            .batch_execute(&format!("TRUNCATE {}", quote::ident(&stage)))
            .await
            .map_err(stage_err)?;
        Ok(())
    }

    /// TRUNCATE `relations` after the queued statements. Open runs must be applied first
    /// (`apply_runs`), as `apply` does.
    pub async fn truncate(
        &mut self,
        relations: &[Arc<Relation>],
        restart_identity: bool,
        cascade: bool,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        self.begin().await?;
        for r in relations {
            self.check_relation(r).await?;
        }
        self.flush().await?;
        let rels: Vec<&Relation> = relations.iter().map(|r| r.as_ref()).collect();
        let sql = statements::truncate(&rels, restart_identity, cascade);
        self.client
            .batch_execute(&sql)
            .await
            .map_err(|e| ApplyError::Statement {
                table: rels
                    .iter()
                    .map(|r| r.qualified_name().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                at,
                error: PgError::from_sql("TRUNCATE", e),
            })?;
        Ok(())
    }

    /// The relation exists on the target with every column the source sends.
    async fn check_relation(&mut self, rel: &Arc<Relation>) -> Result<(), ApplyError> {
        let key = Arc::as_ptr(rel) as usize;
        if self.relations.contains_key(&key) {
            return Ok(());
        }
        let name = quote::qualified(&rel.schema, &rel.name);
        let row = self
            .client
            .query_one(
                "SELECT c.oid IS NOT NULL,
                        coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attname IS NOT NULL), '{}'),
                        coalesce(array_agg(a.attname::text) FILTER (WHERE a.attidentity = 'a'), '{}'),
                        coalesce(array_agg(a.atttypid ORDER BY a.attnum) FILTER (WHERE a.attname IS NOT NULL), '{}'),
                        coalesce(array_agg(a.atttypmod ORDER BY a.attnum) FILTER (WHERE a.attname IS NOT NULL), '{}')
                 FROM (SELECT to_regclass($1) AS oid) c
                 LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 GROUP BY c.oid",
                &[&name],
            )
            .await
            .map_err(self.pg_err("reading the target catalog"))?;
        let exists: bool = row.get(0);
        let mut columns: Vec<String> = row.get(1);
        if exists && self.ddl.additive {
            let (oids, modifiers): (Vec<u32>, Vec<i32>) = (row.get(3), row.get(4));
            let types: Vec<(String, u32, i32)> = columns
                .iter()
                .cloned()
                .zip(oids)
                .zip(modifiers)
                .map(|((name, oid), modifier)| (name, oid, modifier))
                .collect();
            if self.add_from_relation(rel, &types).await? {
                columns.extend(rel.columns.iter().map(|c| c.name.clone()));
            }
        }
        if !exists {
            return Err(ApplyError::Target {
                target: self.target.clone(),
                message: format!(
                    "table {} does not exist: create it with the source's columns",
                    rel.qualified_name()
                ),
            });
        }
        if let Some(missing) = rel.columns.iter().find(|c| !columns.contains(&c.name)) {
            return Err(ApplyError::Target {
                target: self.target.clone(),
                message: format!(
                    "table {} has no column {} (type {}): add it",
                    rel.qualified_name(),
                    quote::ident(&missing.name),
                    missing.type_name
                ),
            });
        }
        let always: Vec<String> = row.get(2);
        let settable = rel
            .columns
            .iter()
            .map(|c| !always.contains(&c.name))
            .collect();
        self.relations.insert(key, (rel.clone(), settable));
        Ok(())
    }

    /// Which columns of a checked relation an UPDATE may set.
    fn settable(&self, rel: &Arc<Relation>) -> &[bool] {
        self.relations
            .get(&(Arc::as_ptr(rel) as usize))
            .map_or(&[], |(_, s)| s.as_slice())
    }
}

/// Where a referenced change comes from.
fn change_at(c: &ChangeRef) -> ChangeAt {
    match c.event() {
        walrelay_model::Event::Change { position, .. } => ChangeAt::Committed(*position),
        walrelay_model::Event::StreamChange { xid, .. } => ChangeAt::Streaming(*xid),
        _ => ChangeAt::Streaming(0),
    }
}
