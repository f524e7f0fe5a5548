//! The change model shared by every walrelay source and sink: positions in the WAL,
//! relation metadata, row values, changes and the events a source emits. No I/O lives here.

mod builtin_types;
mod event;
mod lsn;
mod relation;
mod time;
mod value;

pub use builtin_types::builtin_type_name;
pub use event::{
    Change, Ddl, DdlAction, DdlColumn, DdlTable, Event, NonTxnMessage, TxnBegin, TxnCommit,
};
pub use lsn::{Lsn, ParseLsnError, Position};
pub use relation::{display_ident, Column, QualifiedName, Relation, ReplicaIdentity};
pub use time::PgTimestamp;
pub use value::{OldRow, Row, Value};

/// A PostgreSQL transaction id (32 bits, as pgoutput sends it).
pub type Xid = u32;
/// A PostgreSQL object id.
pub type Oid = u32;
