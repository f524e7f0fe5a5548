//! Row values as the source sends them, aligned with the columns of their relation.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch: PostgreSQL does not send it, and an applier
    /// must leave the stored value as it is.
    UnchangedToast,
    /// The value in PostgreSQL's text output format.
    Text(String),
    /// The value in PostgreSQL's binary send format.
    Binary(Vec<u8>),
}

impl Value {
    /// Payload bytes, used to bound memory and batch sizes.
    pub fn payload_len(&self) -> usize {
        match self {
            Value::Null | Value::UnchangedToast => 0,
            Value::Text(s) => s.len(),
            Value::Binary(b) => b.len(),
        }
    }
}

/// One value per column of the relation, in column order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Row(pub Vec<Value>);

impl Row {
    pub fn payload_len(&self) -> usize {
        self.0.iter().map(Value::payload_len).sum()
    }
}

/// What an update or delete tells of the row before the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OldRow {
    /// Only the replica-identity columns: one value per key column, in the order of
    /// `Relation::key_columns`. The other columns are absent (not NULL).
    Key(Row),
    /// The whole old row (`REPLICA IDENTITY FULL`), one value per column.
    Full(Row),
}

impl OldRow {
    pub fn row(&self) -> &Row {
        match self {
            OldRow::Key(r) | OldRow::Full(r) => r,
        }
    }
}
