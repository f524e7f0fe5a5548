//! Changes and the events a source emits, in commit order.
//!
//! A transaction is `Begin`, its `Change`s, `Commit`. Events carry their relation by
//! reference-counted pointer so that fanning a batch out to several sinks copies nothing;
//! the relation handle is a type parameter so that a change can be written to a spill file
//! with a small relation number instead.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Lsn, OldRow, PgTimestamp, Position, Relation, Row, Xid};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change<R = Arc<Relation>> {
    Insert {
        relation: R,
        new: Row,
    },
    Update {
        relation: R,
        /// Present when the replica identity changed or is FULL; absent when the key
        /// stayed the same (then `new` holds it).
        old: Option<OldRow>,
        new: Row,
    },
    Delete {
        relation: R,
        old: OldRow,
    },
    Truncate {
        relations: Vec<R>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A transactional logical message (`pg_logical_emit_message(true, ...)`).
    Message {
        prefix: String,
        content: Vec<u8>,
    },
    /// A schema change, at its place in the transaction.
    Ddl(Box<Ddl>),
}

/// A schema change captured on the source (docs/events.md, `ddl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ddl {
    /// The command tag: `ALTER TABLE`, `CREATE INDEX`.
    pub tag: String,
    /// The command as the source ran it.
    pub statement: String,
    /// The `search_path` it ran under, for its unqualified names.
    pub search_path: String,
    /// The role it ran as.
    pub role: Option<String>,
    /// The replicated tables it touched, by their names on the targets, each with its
    /// shape after the command.
    pub tables: Vec<DdlTable>,
    /// Why a target cannot run `statement` as it is, when it cannot.
    pub unsafe_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlTable {
    pub schema: String,
    pub name: String,
    pub action: DdlAction,
    /// The replication set it belongs to.
    pub set: Option<String>,
    /// Its columns after the command (none when dropped).
    pub columns: Vec<DdlColumn>,
    pub primary_key: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DdlAction {
    Create,
    Alter,
    Drop,
}

impl DdlAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DdlAction::Create => "create",
            DdlAction::Alter => "alter",
            DdlAction::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlColumn {
    pub name: String,
    /// As `format_type` prints it: `character varying(20)`.
    pub type_name: String,
    pub nullable: bool,
}

impl<R> Change<R> {
    /// The same change with every relation handle replaced.
    pub fn map_relations<S, E>(self, mut f: impl FnMut(R) -> Result<S, E>) -> Result<Change<S>, E> {
        Ok(match self {
            Change::Insert { relation, new } => Change::Insert {
                relation: f(relation)?,
                new,
            },
            Change::Update { relation, old, new } => Change::Update {
                relation: f(relation)?,
                old,
                new,
            },
            Change::Delete { relation, old } => Change::Delete {
                relation: f(relation)?,
                old,
            },
            Change::Truncate {
                relations,
                cascade,
                restart_identity,
            } => Change::Truncate {
                relations: relations.into_iter().map(f).collect::<Result<_, E>>()?,
                cascade,
                restart_identity,
            },
            Change::Message { prefix, content } => Change::Message { prefix, content },
            Change::Ddl(ddl) => Change::Ddl(ddl),
        })
    }

    /// Approximate payload size, for batching by bytes.
    pub fn payload_len(&self) -> usize {
        match self {
            Change::Insert { new, .. } => new.payload_len(),
            Change::Update { old, new, .. } => {
                new.payload_len() + old.as_ref().map_or(0, |o| o.row().payload_len())
            }
            Change::Delete { old, .. } => old.row().payload_len(),
            Change::Truncate { relations, .. } => relations.len() * 8,
            Change::Message { prefix, content } => prefix.len() + content.len(),
            Change::Ddl(ddl) => ddl.statement.len() + ddl.tables.len() * 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnBegin {
    pub xid: Xid,
    /// LSN of the commit record: the transaction's place in commit order.
    pub commit_lsn: Lsn,
    pub commit_time: PgTimestamp,
    /// Replication origin the transaction was replayed from, if any (loop prevention).
    pub origin: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnCommit {
    pub xid: Xid,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to acknowledge once the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    /// Sequence number of the commit event (one more than the last change).
    pub seq: u64,
}

/// A logical message emitted outside any transaction (`pg_logical_emit_message(false, ...)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonTxnMessage {
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Begin(TxnBegin),
    Change {
        position: Position,
        change: Change,
    },
    Commit(TxnCommit),
    Message(NonTxnMessage),
    /// The source has sent everything up to this LSN: a sink that has made every earlier
    /// event durable may report this LSN as durable too. This is what moves an idle slot.
    Keepalive(Lsn),
    /// A change of a transaction that PostgreSQL sends before it commits (it outgrew
    /// `logical_decoding_work_mem`). Only sinks that apply such transactions as they stream
    /// receive these; the others get the transaction whole, at its commit.
    StreamChange {
        /// The top-level transaction.
        xid: Xid,
        /// The (sub)transaction that made the change.
        subxid: Xid,
        change: Change,
    },
    /// A streamed transaction (`subxid == xid`) or one of its subtransactions rolled back:
    /// forget its changes from its first one on.
    StreamAbort {
        xid: Xid,
        subxid: Xid,
    },
    /// A streamed transaction committed.
    StreamCommit {
        begin: TxnBegin,
        commit: TxnCommit,
    },
    /// A row as it was in the snapshot the stream starts from (the initial copy, for sinks
    /// that take rows as events). Its position is the snapshot's LSN and the row's number
    /// from 1; the stream's transactions all come after it.
    Read {
        position: Position,
        relation: Arc<Relation>,
        row: Row,
    },
    /// The snapshot's rows are all sent: `rows` of them, at positions before this one.
    SnapshotEnd {
        position: Position,
        rows: u64,
    },
}

/// Bytes an event costs in memory beyond its values: its headers, position, relation
/// handle. An estimate: it bounds batches of tiny events, whose values weigh little.
const EVENT_OVERHEAD: usize = 64;

impl Event {
    /// Roughly the memory the event holds, for bounding batches and queues by bytes.
    pub fn approx_bytes(&self) -> usize {
        EVENT_OVERHEAD
            + match self {
                Event::Change { change, .. } | Event::StreamChange { change, .. } => {
                    change.payload_len()
                }
                Event::Read { row, .. } => row.payload_len(),
                Event::Message(m) => m.content.len(),
                _ => 0,
            }
    }

    /// The event's place in the stream (docs/events.md): its transaction's commit LSN and
    /// its number in it; a non-transactional message's own LSN and 0. `None` for events
    /// that are not delivered as such (keepalives, the parts of a streamed transaction).
    pub fn position(&self) -> Option<Position> {
        match self {
            Event::Begin(b) => Some(Position::new(b.commit_lsn, 0)),
            Event::Commit(c) => Some(Position::new(c.commit_lsn, c.seq)),
            Event::Message(m) => Some(Position::new(m.lsn, 0)),
            Event::Change { position, .. }
            | Event::Read { position, .. }
            | Event::SnapshotEnd { position, .. } => Some(*position),
            Event::Keepalive(_)
            | Event::StreamChange { .. }
            | Event::StreamAbort { .. }
            | Event::StreamCommit { .. } => None,
        }
    }

    /// The highest LSN a sink may report durable once this event and all before it are.
    pub fn durable_lsn(&self) -> Option<Lsn> {
        match self {
            // Not StreamCommit: a sink that ignores stream events receives the transaction
            // whole after it, and must not report it durable before.
            Event::Commit(c) => Some(c.end_lsn),
            Event::Keepalive(lsn) => Some(*lsn),
            _ => None,
        }
    }
}
