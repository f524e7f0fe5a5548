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
use walrelay_model::{Change, OldRow, Position, Relation, ReplicaIdentity, Row, Value, Xid};

use super::bulk::{self, ChangeRef, Run};
use super::param::TextParam;
use super::statements::{self, RowMatch};
use crate::config::OnConflict;
use crate::pg::{quote, PgError};

/// Statements queued before they are sent, at most...
const MAX_PENDING: usize = 2000;

/// ... and bytes of their values: a queue of wide rows is sent sooner.
const MAX_PENDING_BYTES: usize = 8 << 20;

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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Shape {
    Insert,
    /// `complete`: every new value was sent (no unchanged TOAST), so the row could be
    /// inserted whole.
    Update {
        set: Vec<bool>,
        how: RowMatch,
        complete: bool,
    },
    Delete(RowMatch),
}

/// What the row count of a statement means.
enum Check {
    /// Must be exactly one: anything else is a conflict that stops the sink.
    ExactlyOne,
    /// This many rows means a conflict was met and resolved as `resolution` says; log it.
    ResolvedAt {
        rows: u64,
        resolution: &'static str,
    },
    Anything,
}

struct Pending {
    statement: Statement,
    params: Vec<TextParam>,
    check: Check,
    /// The table it changes; none for walrelay's own bookkeeping.
    table: Option<Arc<Relation>>,
    /// What the statement did, for messages: "insert of (id)=(42)".
    what: String,
    at: ChangeAt,
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
                .batch_execute("BEGIN")
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
            let sql = match self.commit_origin.take() {
                Some(setup) => format!("{setup}; COMMIT"),
                None => "COMMIT".to_string(),
            };
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

    /// Undo the open transaction.
    pub async fn rollback(&mut self) -> Result<(), ApplyError> {
        self.pending.clear();
        self.queued_bytes = 0;
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
        self.pending.clear();
        self.queued_bytes = 0;
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
        if let (Some(rel), Some(kind), OnConflict::Error) = (&relation, kind, self.on_conflict) {
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

    /// Apply one change by its own statement.
    async fn apply_row(&mut self, change: &Change, at: ChangeAt) -> Result<(), ApplyError> {
        match change {
            Change::Insert { relation, new } => self.insert(relation, new, at).await?,
            Change::Update { relation, old, new } => {
                self.update(relation, old.as_ref(), new, at).await?
            }
            Change::Delete { relation, old } => self.delete(relation, old, at).await?,
            Change::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                self.truncate(relations, *restart_identity, *cascade, at)
                    .await?
            }
            // Logical messages carry no data for tables.
            Change::Message { .. } => {}
        }
        if self.pending.len() >= MAX_PENDING || self.queued_bytes >= MAX_PENDING_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn insert(
        &mut self,
        rel: &Arc<Relation>,
        new: &Row,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        self.check_relation(rel).await?;
        let params = values(new.0.iter())?;
        let what = format!("insert of {}", key_text(rel, new));
        let check = match self.on_conflict {
            OnConflict::Error => Check::Anything,
            OnConflict::Skip => Check::ResolvedAt {
                rows: 0,
                resolution: "the row exists already; the insert was skipped",
            },
            OnConflict::Apply if rel.key_columns().next().is_some() => Check::ResolvedAt {
                rows: 1,
                resolution: "the row exists already; it was updated to the inserted values",
            },
            OnConflict::Apply => Check::Anything,
        };
        self.queue(rel, Shape::Insert, params, check, what, at)
            .await
    }

    async fn update(
        &mut self,
        rel: &Arc<Relation>,
        old: Option<&OldRow>,
        new: &Row,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        self.check_relation(rel).await?;
        let (how, match_params, what) = row_match(rel, old, Some(new), "update", &self.target)?;
        // Set what was sent, except a key the row was found by and kept: setting it is a
        // no-op, and refused for GENERATED ALWAYS identity columns.
        let key_kept = old.is_none();
        let set: Vec<bool> = new
            .0
            .iter()
            .zip(&rel.columns)
            .zip(self.settable(rel))
            .map(|((v, c), &may)| {
                may && *v != Value::UnchangedToast
                    && !(key_kept && c.is_key && matches!(how, RowMatch::Key(_)))
            })
            .collect();
        let complete = !new.0.contains(&Value::UnchangedToast);
        let mut params = if complete && self.on_conflict == OnConflict::Apply {
            values(new.0.iter())?
        } else {
            values(new.0.iter().zip(&set).filter(|(_, &s)| s).map(|(v, _)| v))?
        };
        params.extend(match_params);
        let check = match self.on_conflict {
            OnConflict::Error => Check::ExactlyOne,
            OnConflict::Skip => Check::ResolvedAt {
                rows: 0,
                resolution: "no such row; the update was skipped",
            },
            OnConflict::Apply if complete => Check::ResolvedAt {
                rows: 1,
                resolution: "no such row; the new row was inserted",
            },
            OnConflict::Apply => Check::ResolvedAt {
                rows: 0,
                resolution: "no such row, and the source did not send its unchanged TOAST values; the update was skipped",
            },
        };
        self.queue(
            rel,
            Shape::Update { set, how, complete },
            params,
            check,
            what,
            at,
        )
        .await
    }

    async fn delete(
        &mut self,
        rel: &Arc<Relation>,
        old: &OldRow,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        self.check_relation(rel).await?;
        let (how, params, what) = row_match(rel, Some(old), None, "delete", &self.target)?;
        let check = match self.on_conflict {
            OnConflict::Error => Check::ExactlyOne,
            OnConflict::Skip | OnConflict::Apply => Check::ResolvedAt {
                rows: 0,
                resolution: "no such row; the delete was skipped",
            },
        };
        self.queue(rel, Shape::Delete(how), params, check, what, at)
            .await
    }

    async fn queue(
        &mut self,
        rel: &Arc<Relation>,
        shape: Shape,
        params: Vec<TextParam>,
        check: Check,
        what: String,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        let key = (Arc::as_ptr(rel) as usize, shape);
        let statement = match self.statements.get(&key) {
            Some(s) => s.clone(),
            None => {
                let sql = self.sql_for(rel, &key.1);
                let s = self
                    .client
                    .prepare(&sql)
                    .await
                    .map_err(|e| ApplyError::Target {
                        target: self.target.clone(),
                        message: format!(
                            "cannot apply changes of {}: {}",
                            rel.qualified_name(),
                            PgError::from_sql("preparing", e)
                        ),
                    })?;
                self.statements.insert(key, s.clone());
                s
            }
        };
        let bytes = params
            .iter()
            .map(|p| p.0.as_ref().map_or(0, String::len))
            .sum::<usize>();
        self.pending_bytes += bytes;
        self.queued_bytes += bytes;
        self.pending.push(Pending {
            statement,
            params,
            check,
            table: Some(rel.clone()),
            what,
            at,
        });
        Ok(())
    }

    fn sql_for(&self, rel: &Relation, shape: &Shape) -> String {
        let key: Vec<usize> = rel.key_columns().map(|(i, _)| i).collect();
        match (shape, self.on_conflict) {
            (Shape::Insert, OnConflict::Error) => statements::insert(rel, false),
            (Shape::Insert, OnConflict::Skip) => statements::insert(rel, true),
            (Shape::Insert, OnConflict::Apply) if !key.is_empty() => {
                statements::insert_or_update(rel, &key)
            }
            (Shape::Insert, OnConflict::Apply) => statements::insert(rel, false),
            (
                Shape::Update {
                    set,
                    how,
                    complete: true,
                },
                OnConflict::Apply,
            ) => statements::update_or_insert(rel, set, how),
            (Shape::Update { set, how, .. }, _) => statements::update(rel, set, how),
            (Shape::Delete(how), _) => statements::delete(rel, how),
        }
    }

    /// Send the queued statements, pipelined, and check their results in order.
    pub async fn flush(&mut self) -> Result<(), ApplyError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.queued_bytes = 0;
        let client = &self.client;
        let results = futures_util::future::join_all(
            pending
                .iter()
                .map(|p| client.execute_raw(&p.statement, p.params.iter())),
        )
        .await;
        for (p, result) in pending.iter().zip(results) {
            let table = match &p.table {
                Some(t) => t.qualified_name().to_string(),
                None => "walrelay.progress".to_string(),
            };
            let rows = result.map_err(|e| {
                let error = PgError::from_sql("", e);
                let table = table.clone();
                if error.code() == Some("23505") {
                    ApplyError::Conflict {
                        table,
                        at: p.at,
                        what: format!("{}: {}", p.what, error.to_string().trim_start_matches(": ")),
                    }
                } else {
                    ApplyError::Statement {
                        table,
                        at: p.at,
                        error,
                    }
                }
            })?;
            match p.check {
                Check::ExactlyOne if rows == 1 => {}
                Check::ExactlyOne => {
                    return Err(ApplyError::Conflict {
                        table,
                        at: p.at,
                        what: if rows == 0 {
                            format!("{} found no such row on the target", p.what)
                        } else {
                            format!("{} matched {rows} rows on the target", p.what)
                        },
                    })
                }
                Check::ResolvedAt {
                    rows: r,
                    resolution,
                } if r == rows => {
                    tracing::warn!(
                        table = %table,
                        at = %p.at,
                        "conflict resolved: {}: {resolution}",
                        p.what
                    );
                }
                _ => {}
            }
        }
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
                        coalesce(array_agg(a.attname::text) FILTER (WHERE a.attname IS NOT NULL), '{}'),
                        coalesce(array_agg(a.attname::text) FILTER (WHERE a.attidentity = 'a'), '{}')
                 FROM (SELECT to_regclass($1) AS oid) c
                 LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 GROUP BY c.oid",
                &[&name],
            )
            .await
            .map_err(self.pg_err("reading the target catalog"))?;
        let exists: bool = row.get(0);
        let columns: Vec<String> = row.get(1);
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

/// Values as parameters; an unchanged TOAST value cannot be one.
fn values<'a>(vals: impl Iterator<Item = &'a Value>) -> Result<Vec<TextParam>, ApplyError> {
    Ok(vals
        .map(|v| match v {
            Value::Null | Value::UnchangedToast => TextParam(None),
            Value::Text(t) => TextParam(Some(t.clone())),
            Value::Binary(b) => TextParam(Some(String::from_utf8_lossy(b).into_owned())),
        })
        .collect())
}

/// `(id, region)=(42, eu)` from the key columns of a full row, for messages.
fn key_text(rel: &Relation, row: &Row) -> String {
    let (names, vals): (Vec<&str>, Vec<String>) = rel
        .key_columns()
        .map(|(i, c)| (c.name.as_str(), shown(&row.0[i])))
        .unzip();
    format!("({})=({})", names.join(", "), vals.join(", "))
}

fn shown(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::UnchangedToast => "(unchanged)".into(),
        Value::Text(t) if t.len() > 64 => format!("{}…", &t[..t.floor_char_boundary(64)]),
        Value::Text(t) => t.clone(),
        Value::Binary(_) => "(binary)".into(),
    }
}

/// How to find the row an update or delete touches, its parameters, and a description.
fn row_match(
    rel: &Relation,
    old: Option<&OldRow>,
    new: Option<&Row>,
    verb: &str,
    target: &str,
) -> Result<(RowMatch, Vec<TextParam>, String), ApplyError> {
    let key: Vec<usize> = rel.key_columns().map(|(i, _)| i).collect();
    let no_identity = || {
        ApplyError::Target {
        target: target.to_string(),
        message: format!(
            "cannot {verb} in {}: the source table has no replica identity, so the row cannot be found",
            rel.qualified_name()
        ),
    }
    };
    match (rel.replica_identity, old) {
        (ReplicaIdentity::Full, Some(OldRow::Full(row))) => {
            if row.0.contains(&Value::UnchangedToast) {
                return Err(ApplyError::Target {
                    target: target.to_string(),
                    message: format!(
                        "cannot {verb} in {}: an old value was not sent (unchanged TOAST)",
                        rel.qualified_name()
                    ),
                });
            }
            let nulls: Vec<bool> = row.0.iter().map(|v| *v == Value::Null).collect();
            let params = values(row.0.iter().filter(|v| **v != Value::Null))?;
            let what = format!(
                "{verb} of the row ({})",
                row.0.iter().map(shown).collect::<Vec<_>>().join(", ")
            );
            Ok((RowMatch::Full(nulls), params, what))
        }
        (_, Some(OldRow::Key(k))) if !key.is_empty() => {
            let params = values(k.0.iter())?;
            let names: Vec<&str> = key.iter().map(|&i| rel.columns[i].name.as_str()).collect();
            let what = format!(
                "{verb} of ({})=({})",
                names.join(", "),
                k.0.iter().map(shown).collect::<Vec<_>>().join(", ")
            );
            Ok((RowMatch::Key(key), params, what))
        }
        (_, None) if !key.is_empty() => {
            let row = new.ok_or_else(no_identity)?;
            let params = values(key.iter().map(|&i| &row.0[i]))?;
            let what = format!("{verb} of {}", key_text(rel, row));
            Ok((RowMatch::Key(key), params, what))
        }
        _ => Err(no_identity()),
    }
}
