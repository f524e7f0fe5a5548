//! From pgoutput messages to events in commit order: keeps the relation and type caches,
//! numbers the changes of each transaction, drops changes of tables the configuration does
//! not select, and sends streamed transactions through spill files so that they come out
//! whole, at their commit, in commit order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use walrelay_model::{
    builtin_type_name, Change, Column, Event, Lsn, NonTxnMessage, Oid, OldRow, Position, Relation,
    ReplicaIdentity, Row, TxnBegin, TxnCommit, Value, Xid,
};

use super::decode::{OldTuple, PgOutputMessage, RawRelation};
use super::spill::{SpillError, SpillReader, SpillWriter};
use crate::sets::{Plan, ShapedRelation};

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("replication stream out of order: {0}")]
    Sequence(String),
    #[error("change for relation oid {0} arrived before its Relation message")]
    UnknownRelation(Oid),
    #[error("{relation}: the server sent {got} values for {expected} columns")]
    ColumnCount {
        relation: String,
        got: usize,
        expected: usize,
    },
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error("replication set: {0}")]
    Shape(#[from] crate::sets::shape::ShapeError),
    #[error("{0}")]
    Ddl(String),
}

/// A relation the server described: as the sinks see it when a set captures it.
struct RelationEntry {
    shaped: Option<Arc<ShapedRelation>>,
}

/// A transaction sent whole (not streamed), between its Begin and Commit.
struct OpenTxn {
    begin: TxnBegin,
    /// Begin is emitted with the first selected change, so that a transaction touching only
    /// unselected tables leaves no trace but its position.
    begun: bool,
    /// Left out for its replication origin: its changes are dropped.
    skipped: bool,
    seq: u64,
}

/// A committed streamed transaction, ready to be read back from its spill file.
pub struct StreamedTxn {
    /// For every sink (held back for a recent copy), not only those that want it whole.
    pub for_all: bool,
    pub begin: TxnBegin,
    pub end_lsn: Lsn,
    pub changes: SpillReader,
}

impl StreamedTxn {
    /// Emit the next events of the transaction into `out`, at most `max` changes or about
    /// `max_bytes`; returns `false` once the commit has been emitted.
    pub fn emit(
        &mut self,
        out: &mut Vec<Event>,
        seq: &mut u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<bool, SpillError> {
        let mut bytes = 0;
        if *seq == 0 {
            if self.changes.remaining() == 0 {
                // Nothing selected in it: only its position moves on.
                out.push(Event::Keepalive(self.end_lsn));
                return Ok(false);
            }
            out.push(Event::Begin(self.begin.clone()));
        }
        for _ in 0..max {
            if bytes >= max_bytes {
                break;
            }
            match self.changes.next_change()? {
                Some(change) => {
                    *seq += 1;
                    let event = Event::Change {
                        position: Position::new(self.begin.commit_lsn, *seq),
                        change,
                    };
                    bytes += event.approx_bytes();
                    out.push(event);
                }
                None => {
                    out.push(Event::Commit(TxnCommit {
                        xid: self.begin.xid,
                        commit_lsn: self.begin.commit_lsn,
                        end_lsn: self.end_lsn,
                        commit_time: self.begin.commit_time,
                        seq: *seq + 1,
                    }));
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// What the sinks need of transactions that PostgreSQL streams before they commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamNeeds {
    /// Stream events as they arrive (sinks that apply while the transaction streams).
    pub events: bool,
    /// The whole transaction at its commit, from a spill file (sinks that want commit order).
    pub whole: bool,
    /// Streamed transactions whose first chunk comes before this position go whole to
    /// every sink: a table copied at this position, or a sink that recorded it, needs their
    /// commit position before their changes (`pipeline::whole_until`).
    pub whole_until: Lsn,
}

pub struct Assembler {
    plan: Arc<Plan>,
    /// Tables whose shape changed since the start, by oid: renamed on the source, or
    /// created under a set's pattern.
    learned: HashMap<Oid, Arc<crate::sets::TableShape>>,
    /// Pass on logical messages other than walrelay's own DDL messages.
    other_messages: bool,
    /// `[ddl] mode = "additive"`: columns the source drops are reported, not replicated.
    additive: bool,
    /// `source.origin = "none"`: transactions with a replication origin are left out.
    skip_replicated: bool,
    /// Streamed transactions left out for their origin.
    skipped_streams: std::collections::HashSet<Xid>,
    needs: StreamNeeds,
    relations: HashMap<Oid, RelationEntry>,
    types: HashMap<Oid, String>,
    txn: Option<OpenTxn>,
    /// The streamed transaction whose chunk is being received (between Stream Start and Stop).
    stream: Option<Xid>,
    streams: HashMap<Xid, SpillWriter>,
    /// Streamed transactions held back whole for every sink.
    held_back: std::collections::HashSet<Xid>,
    /// The WAL position of the latest message.
    position: Lsn,
    spill_dir: PathBuf,
    spill_prefix: String,
}

impl Assembler {
    pub fn new(
        plan: Arc<Plan>,
        needs: StreamNeeds,
        spill_dir: PathBuf,
        spill_prefix: String,
    ) -> Self {
        Assembler {
            plan,
            learned: HashMap::new(),
            other_messages: true,
            additive: false,
            skip_replicated: false,
            skipped_streams: std::collections::HashSet::new(),
            needs,
            relations: HashMap::new(),
            types: HashMap::new(),
            txn: None,
            stream: None,
            streams: HashMap::new(),
            held_back: std::collections::HashSet::new(),
            position: Lsn::ZERO,
            spill_dir,
            spill_prefix,
        }
    }

    /// Whether logical messages other than walrelay's DDL messages reach the sinks (the
    /// stream carries them all once DDL capture asks for messages).
    pub fn set_other_messages(&mut self, pass: bool) {
        self.other_messages = pass;
    }

    /// Leave out the transactions that have a replication origin (`source.origin = "none"`):
    /// what a replication applied on the source does not go back out.
    pub fn set_skip_replicated(&mut self, skip: bool) {
        self.skip_replicated = skip;
    }

    /// Report the columns the source drops as not replicated (`[ddl] mode = "additive"`).
    pub fn set_additive(&mut self, additive: bool) {
        self.additive = additive;
    }

    /// Inside a stream chunk: transactional messages carry a transaction id.
    pub fn in_stream(&self) -> bool {
        self.stream.is_some()
    }

    /// Between the Begin and Commit of a transaction sent whole. A keepalive received now
    /// must not be taken as "everything before this is sent".
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// The WAL position the next message comes from.
    pub fn set_position(&mut self, lsn: Lsn) {
        self.position = self.position.max(lsn);
    }

    /// Streamed transactions waiting for their commit.
    pub fn pending_streams(&self) -> usize {
        self.streams.len()
    }

    /// Take one message. Events go to `out`; a committed streamed transaction is returned for
    /// the caller to read back (it may be far too large for `out`).
    pub fn handle(
        &mut self,
        msg: PgOutputMessage,
        out: &mut Vec<Event>,
    ) -> Result<Option<StreamedTxn>, AssembleError> {
        use PgOutputMessage as M;
        match msg {
            M::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                if self.txn.is_some() || self.stream.is_some() {
                    return Err(seq_err("Begin inside another transaction"));
                }
                self.txn = Some(OpenTxn {
                    begin: TxnBegin {
                        xid,
                        commit_lsn: final_lsn,
                        commit_time,
                        origin: None,
                    },
                    begun: false,
                    skipped: false,
                    seq: 0,
                });
            }
            M::Commit {
                commit_lsn,
                end_lsn,
                commit_time,
            } => {
                let txn = self
                    .txn
                    .take()
                    .ok_or_else(|| seq_err("Commit without Begin"))?;
                if txn.begin.commit_lsn != commit_lsn {
                    return Err(seq_err(&format!(
                        "Commit at {commit_lsn} for a transaction that began for {}",
                        txn.begin.commit_lsn
                    )));
                }
                if txn.begun {
                    out.push(Event::Commit(TxnCommit {
                        xid: txn.begin.xid,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                        seq: txn.seq + 1,
                    }));
                } else {
                    out.push(Event::Keepalive(end_lsn));
                }
            }
            M::Origin { name, .. } => {
                // pgoutput sends it before the transaction's first change (in a streamed
                // one's first chunk), so leaving the transaction out loses nothing of it.
                if let Some(xid) = self.stream {
                    if self.skip_replicated {
                        self.skipped_streams.insert(xid);
                    }
                    if let Some(w) = self.streams.get_mut(&xid) {
                        w.origin = Some(name);
                    }
                } else if let Some(txn) = self.txn.as_mut() {
                    txn.skipped = self.skip_replicated;
                    txn.begin.origin = Some(name);
                } else {
                    return Err(seq_err("Origin outside a transaction"));
                }
            }
            M::Relation { relation, .. } => self.add_relation(relation)?,
            M::Type {
                oid, schema, name, ..
            } => {
                let qualified = if schema == "pg_catalog" {
                    name
                } else {
                    format!("{schema}.{name}")
                };
                self.types.insert(oid, qualified);
            }
            M::Insert { xid, relid, new } => {
                if let Some(rel) = self.selected(relid)? {
                    let new = self.row(&rel, new)?;
                    let relation = rel.relation.clone();
                    self.change(xid, Change::Insert { relation, new }, out)?;
                }
            }
            M::Update {
                xid,
                relid,
                old,
                new,
            } => {
                if let Some(rel) = self.selected(relid)? {
                    let old = old.map(|o| self.old_row(&rel, o)).transpose()?;
                    let new = self.row(&rel, new)?;
                    self.change(
                        xid,
                        Change::Update {
                            relation: rel.relation.clone(),
                            old,
                            new,
                        },
                        out,
                    )?;
                }
            }
            M::Delete { xid, relid, old } => {
                if let Some(rel) = self.selected(relid)? {
                    let old = self.old_row(&rel, old)?;
                    let relation = rel.relation.clone();
                    self.change(xid, Change::Delete { relation, old }, out)?;
                }
            }
            M::Truncate {
                xid,
                cascade,
                restart_identity,
                relids,
            } => {
                let mut relations = Vec::new();
                for relid in relids {
                    if let Some(rel) = self.selected(relid)? {
                        relations.push(rel.relation.clone());
                    }
                }
                if !relations.is_empty() {
                    let change = Change::Truncate {
                        relations,
                        cascade,
                        restart_identity,
                    };
                    self.change(xid, change, out)?;
                }
            }
            M::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            } => {
                if prefix == crate::origin::APPLIED_PREFIX {
                    // walrelay's own mark: never for the sinks.
                    if transactional && self.skip_replicated {
                        self.leave_out_current();
                    }
                } else if transactional && prefix == crate::ddl::capture::MESSAGE_PREFIX {
                    if let Some(ddl) = self.ddl(&content)? {
                        self.change(xid, Change::Ddl(Box::new(ddl)), out)?;
                    }
                } else if !self.other_messages {
                    // Sent only because DDL capture asked for messages: not for the sinks.
                } else if transactional {
                    self.change(xid, Change::Message { prefix, content }, out)?;
                } else {
                    out.push(Event::Message(NonTxnMessage {
                        lsn,
                        prefix,
                        content,
                    }));
                }
            }
            M::StreamStart { xid, .. } => {
                if self.stream.is_some() || self.txn.is_some() {
                    return Err(seq_err("Stream Start inside a transaction or stream"));
                }
                if !self.streams.contains_key(&xid) {
                    // The server streams a transaction it has not yet seen commit, so its
                    // commit lies beyond every message sent so far: at or past
                    // `whole_until` here means it commits after it, and need not be held.
                    let hold = self.position < self.needs.whole_until;
                    if hold {
                        self.held_back.insert(xid);
                    }
                    let w = SpillWriter::create(
                        &self.spill_dir,
                        &self.spill_prefix,
                        xid,
                        self.needs.whole || hold,
                    )?;
                    self.streams.insert(xid, w);
                }
                self.stream = Some(xid);
            }
            M::StreamStop => {
                if self.stream.take().is_none() {
                    return Err(seq_err("Stream Stop without Stream Start"));
                }
            }
            M::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
            } => {
                if self.stream.is_some() || self.txn.is_some() {
                    return Err(seq_err("Stream Commit inside a transaction or stream"));
                }
                let w = self.streams.remove(&xid).ok_or_else(|| {
                    seq_err(&format!("Stream Commit for unknown transaction {xid}"))
                })?;
                if self.skipped_streams.remove(&xid) {
                    self.held_back.remove(&xid);
                    w.discard();
                    out.push(Event::Keepalive(end_lsn));
                    return Ok(None);
                }
                let begin = TxnBegin {
                    xid,
                    commit_lsn,
                    commit_time,
                    origin: w.origin.clone(),
                };
                let held = self.held_back.remove(&xid);
                if self.needs.events && !held {
                    out.push(Event::StreamCommit {
                        begin: begin.clone(),
                        commit: TxnCommit {
                            xid,
                            commit_lsn,
                            end_lsn,
                            commit_time,
                            seq: w.len() + 1,
                        },
                    });
                }
                if !self.needs.whole && !held {
                    w.discard();
                    return Ok(None);
                }
                return Ok(Some(StreamedTxn {
                    for_all: held,
                    begin,
                    end_lsn,
                    changes: w.into_reader()?,
                }));
            }
            M::StreamAbort { xid, subxid } => {
                if self.stream.is_some() || self.txn.is_some() {
                    return Err(seq_err("Stream Abort inside a transaction or stream"));
                }
                let held = self.held_back.contains(&xid);
                let skipped = self.skipped_streams.contains(&xid);
                if self.needs.events && !held && !skipped && self.streams.contains_key(&xid) {
                    out.push(Event::StreamAbort { xid, subxid });
                }
                if xid == subxid {
                    self.skipped_streams.remove(&xid);
                    self.held_back.remove(&xid);
                    if let Some(w) = self.streams.remove(&xid) {
                        w.discard();
                    }
                } else if let Some(w) = self.streams.get_mut(&xid) {
                    w.abort_subxact(subxid)?;
                }
            }
        }
        Ok(None)
    }

    fn add_relation(&mut self, raw: RawRelation) -> Result<(), AssembleError> {
        let columns = raw
            .columns
            .into_iter()
            .map(|c| Column {
                type_name: builtin_type_name(c.type_oid)
                    .map(str::to_string)
                    .or_else(|| self.types.get(&c.type_oid).cloned())
                    .unwrap_or_else(|| format!("oid:{}", c.type_oid)),
                name: c.name,
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                is_key: c.is_key,
            })
            .collect();
        let shape = self.shape_of(raw.oid, &raw.schema, &raw.name);
        let oid = raw.oid;
        let relation = Arc::new(Relation {
            oid,
            schema: raw.schema,
            name: raw.name,
            replica_identity: ReplicaIdentity::from_code(raw.replica_identity)
                .unwrap_or(ReplicaIdentity::Default),
            columns,
        });
        let shaped = match shape {
            Some(shape) => Some(Arc::new(shape.relation(relation)?)),
            None => None,
        };
        if self.additive {
            let before = self.relations.get(&oid).and_then(|e| e.shaped.as_ref());
            if let (Some(before), Some(now)) = (before, &shaped) {
                for gone in before
                    .source
                    .columns
                    .iter()
                    .filter(|c| !now.source.columns.iter().any(|n| n.name == c.name))
                {
                    tracing::warn!(
                        table = %now.source.qualified_name(),
                        column = %gone.name,
                        "a column was dropped on the source (or renamed): NOT replicated in [ddl] mode = \"additive\"; the target keeps it, and its new rows get its default or NULL"
                    );
                }
            }
        }
        self.relations.insert(oid, RelationEntry { shaped });
        Ok(())
    }

    /// The shape of a table the server describes: the start's, by oid (a renamed table
    /// stays in its set), by name, or a set pattern's for a table created since.
    fn shape_of(
        &mut self,
        oid: Oid,
        schema: &str,
        name: &str,
    ) -> Option<Arc<crate::sets::TableShape>> {
        use crate::ddl::command::TableRole;
        match TableRole::of(&self.plan, &self.learned, Some(oid), schema, name) {
            TableRole::Captured(shape) if shape.source.0 == schema && shape.source.1 == name => {
                Some(shape)
            }
            TableRole::Captured(shape) => {
                let mut renamed = (*shape).clone();
                if shape.source == shape.target {
                    renamed.target = (schema.to_string(), name.to_string());
                }
                renamed.source = (schema.to_string(), name.to_string());
                tracing::info!(
                    from = %shape.shown(),
                    to = %renamed.shown(),
                    set = %shape.set,
                    "a captured table was renamed on the source: it stays in its set (where the configuration names it, rename it there before the next start)"
                );
                let renamed = Arc::new(renamed);
                self.learned.insert(oid, renamed.clone());
                Some(renamed)
            }
            TableRole::New(shape) => {
                let shape = Arc::new(*shape);
                tracing::info!(table = %shape.shown(), set = %shape.set, "a table created under the set's pattern is captured");
                self.learned.insert(oid, shape.clone());
                Some(shape)
            }
            TableRole::Not => None,
        }
    }

    /// The change a DDL message makes, if it concerns the replicated tables.
    fn ddl(&self, content: &[u8]) -> Result<Option<walrelay_model::Ddl>, AssembleError> {
        let plan = &self.plan;
        let role = |oid: Option<Oid>, schema: &str, name: &str| {
            crate::ddl::command::TableRole::of(plan, &self.learned, oid, schema, name)
        };
        crate::ddl::command::from_message(content, plan, role).map_err(AssembleError::Ddl)
    }

    fn selected(&self, relid: Oid) -> Result<Option<Arc<ShapedRelation>>, AssembleError> {
        let entry = self
            .relations
            .get(&relid)
            .ok_or(AssembleError::UnknownRelation(relid))?;
        Ok(entry.shaped.clone())
    }

    fn row(&self, rel: &ShapedRelation, values: Vec<Value>) -> Result<Row, AssembleError> {
        Ok(rel.row(self.source_row(rel, values)?))
    }

    /// The values as the source sent them, checked against its relation.
    fn source_row(&self, rel: &ShapedRelation, values: Vec<Value>) -> Result<Row, AssembleError> {
        if values.len() != rel.source.columns.len() {
            return Err(AssembleError::ColumnCount {
                relation: rel.source.qualified_name().to_string(),
                got: values.len(),
                expected: rel.source.columns.len(),
            });
        }
        Ok(Row(values))
    }

    fn old_row(&self, rel: &ShapedRelation, old: OldTuple) -> Result<OldRow, AssembleError> {
        Ok(rel.old(match old {
            OldTuple::Full(values) => OldRow::Full(self.source_row(rel, values)?),
            OldTuple::Key(values) => {
                let row = self.source_row(rel, values)?;
                // The server sends every column; those outside the key are placeholders.
                let key = rel
                    .source
                    .columns
                    .iter()
                    .zip(row.0)
                    .filter(|(c, _)| c.is_key)
                    .map(|(_, v)| v)
                    .collect();
                OldRow::Key(Row(key))
            }
        }))
    }

    /// The open transaction (or stream) carries walrelay's mark (`crate::origin`): leave it
    /// out, as one with an origin. The mark is its first change, so nothing of it has gone
    /// out; a mark met later is not walrelay's doing, and is ignored with a warning.
    fn leave_out_current(&mut self) {
        let passed_on = if let Some(top) = self.stream {
            match self.streams.get(&top) {
                Some(w) if !w.has_changes() => {
                    self.skipped_streams.insert(top);
                    false
                }
                _ => !self.skipped_streams.contains(&top),
            }
        } else if let Some(txn) = self.txn.as_mut() {
            if !txn.begun {
                txn.skipped = true;
            }
            txn.begun && !txn.skipped
        } else {
            false
        };
        if passed_on {
            tracing::warn!(
                "a transaction carries walrelay's mark after changes of its own: it is not one walrelay applied, and is replicated"
            );
        }
    }

    fn change(
        &mut self,
        xid: Option<Xid>,
        change: Change,
        out: &mut Vec<Event>,
    ) -> Result<(), AssembleError> {
        if let Some(top) = self.stream {
            if self.skipped_streams.contains(&top) {
                return Ok(());
            }
            let subxid = xid.unwrap_or(top);
            let w = self
                .streams
                .get_mut(&top)
                .ok_or_else(|| seq_err("change for a stream that was not started"))?;
            let held = self.held_back.contains(&top);
            let (for_event, for_spill) =
                match (self.needs.events && !held, self.needs.whole || held) {
                    (true, true) => (Some(change.clone()), Some(change)),
                    (true, false) => (Some(change), None),
                    (false, _) => (None, Some(change)),
                };
            match for_spill {
                Some(c) => w.append(subxid, c)?,
                None => w.note(subxid),
            }
            if let Some(change) = for_event {
                out.push(Event::StreamChange {
                    xid: top,
                    subxid,
                    change,
                });
            }
            return Ok(());
        }
        let txn = self
            .txn
            .as_mut()
            .ok_or_else(|| seq_err("change outside a transaction"))?;
        if txn.skipped {
            return Ok(());
        }
        if !txn.begun {
            txn.begun = true;
            out.push(Event::Begin(txn.begin.clone()));
        }
        txn.seq += 1;
        out.push(Event::Change {
            position: Position::new(txn.begin.commit_lsn, txn.seq),
            change,
        });
        Ok(())
    }
}

impl Drop for Assembler {
    fn drop(&mut self) {
        for (_, w) in self.streams.drain() {
            w.discard();
        }
    }
}

fn seq_err(what: &str) -> AssembleError {
    AssembleError::Sequence(what.to_string())
}

#[cfg(test)]
mod tests;
