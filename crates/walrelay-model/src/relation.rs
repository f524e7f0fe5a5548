//! Relation metadata as the source describes it: schema, name, columns with their types, and
//! the replica identity that says which columns identify a row.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Oid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaIdentity {
    /// The primary key (`REPLICA IDENTITY DEFAULT`); nothing if the table has none.
    Default,
    /// `REPLICA IDENTITY NOTHING`: updates and deletes carry no old values.
    Nothing,
    /// `REPLICA IDENTITY FULL`: the whole old row identifies it.
    Full,
    /// `REPLICA IDENTITY USING INDEX`.
    Index,
}

impl ReplicaIdentity {
    /// From `pg_class.relreplident` / the pgoutput Relation message.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub type_oid: Oid,
    /// `atttypmod`: -1 when the type has no modifier.
    pub type_modifier: i32,
    /// `pg_type.typname`, qualified with its schema unless it lives in `pg_catalog`
    /// (`int4`, `_text`, `public.mood`).
    pub type_name: String,
    /// Part of the replica identity (all columns are, under `REPLICA IDENTITY FULL`).
    pub is_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    pub oid: Oid,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

impl Relation {
    /// The columns that identify a row, with their index in `columns`.
    pub fn key_columns(&self) -> impl Iterator<Item = (usize, &Column)> {
        self.columns.iter().enumerate().filter(|(_, c)| c.is_key)
    }

    /// A display form for messages: `schema.name`, each part quoted when it needs it.
    pub fn qualified_name(&self) -> QualifiedName<'_> {
        QualifiedName {
            schema: &self.schema,
            name: &self.name,
        }
    }
}

/// `schema.name` printed as SQL would need it (quotes only where required), for messages.
#[derive(Debug, Clone, Copy)]
pub struct QualifiedName<'a> {
    pub schema: &'a str,
    pub name: &'a str,
}

impl fmt::Display for QualifiedName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_ident_for_display(f, self.schema)?;
        f.write_str(".")?;
        write_ident_for_display(f, self.name)
    }
}

fn write_ident_for_display(f: &mut fmt::Formatter<'_>, ident: &str) -> fmt::Result {
    f.write_str(&display_ident(ident))
}

/// An identifier as a person would write it in SQL: bare when it is a plain lower-case
/// name, double-quoted otherwise. For messages; generated SQL always quotes.
pub fn display_ident(ident: &str) -> std::borrow::Cow<'_, str> {
    let plain = !ident.is_empty()
        && ident
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        std::borrow::Cow::Borrowed(ident)
    } else {
        std::borrow::Cow::Owned(format!("\"{}\"", ident.replace('"', "\"\"")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_when_needed() {
        let q = QualifiedName {
            schema: "public",
            name: "orders",
        };
        assert_eq!(q.to_string(), "public.orders");
        let q = QualifiedName {
            schema: "My Schema",
            name: "Odd \"Name\"",
        };
        assert_eq!(q.to_string(), "\"My Schema\".\"Odd \"\"Name\"\"\"");
    }
}
