//! The shape a set gives one table on its way to the sinks: the target's schema and name,
//! the columns kept and their target names, and the transforms of their values. Applied in
//! the relay, once, before any sink: to the stream's relations and rows, to the snapshot's
//! read events, and to the table definition and the rows of the initial copy.

use std::collections::BTreeMap;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use walrelay_model::{Column, OldRow, Relation, ReplicaIdentity, Row, Value};

use crate::config::Transform;
use crate::schema::TableDef;

/// The key of the `hash` transform, ready for use.
#[derive(Clone)]
pub struct HashKey(Hmac<Sha256>);

impl HashKey {
    pub fn new(key: &str) -> Self {
        // HMAC takes a key of any length.
        HashKey(Hmac::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length"))
    }

    /// Lower-case hex of HMAC-SHA256(key, value).
    pub fn hash(&self, value: &[u8]) -> String {
        let mut mac = self.0.clone();
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(digest.len() * 2);
        for b in digest {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(***)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{table}: {message}")]
pub struct ShapeError {
    pub table: String,
    pub message: String,
}

/// How one table of a set is replicated.
#[derive(Debug, Clone)]
pub struct TableShape {
    pub set: String,
    pub source: (String, String),
    pub target: (String, String),
    /// Row filter (SQL), evaluated by the source.
    pub filter: Option<String>,
    /// Only these source columns, when set.
    pub only: Option<Vec<String>>,
    pub renames: BTreeMap<String, String>,
    pub transforms: BTreeMap<String, Transform>,
    pub hash_key: Option<HashKey>,
    /// Set REPLICA IDENTITY FULL on the source (`identity = "full"`).
    pub identity_full: bool,
    /// The source's replica-identity columns (empty under FULL).
    pub key: Vec<String>,
    /// The source's primary key columns, rebuilt on the target where the set changes
    /// columns.
    pub primary_key: Vec<String>,
}

impl TableShape {
    /// A table replicated as it is.
    pub fn unchanged(set: &str, schema: &str, name: &str) -> Self {
        TableShape {
            set: set.to_string(),
            source: (schema.to_string(), name.to_string()),
            target: (schema.to_string(), name.to_string()),
            filter: None,
            only: None,
            renames: BTreeMap::new(),
            transforms: BTreeMap::new(),
            hash_key: None,
            identity_full: false,
            key: Vec::new(),
            primary_key: Vec::new(),
        }
    }

    /// The shaper of the initial copy's rows, which come as text in the order of
    /// `source_columns` (the copy's SELECT list).
    pub fn copy_rows(&self, source_columns: &[String]) -> Result<ShapedRelation, ShapeError> {
        let full = self.key.is_empty();
        let columns = source_columns
            .iter()
            .map(|name| Column {
                name: name.clone(),
                type_oid: 25,
                type_modifier: -1,
                type_name: "text".into(),
                is_key: full || self.key.contains(name),
            })
            .collect();
        self.relation(Arc::new(Relation {
            oid: 0,
            schema: self.source.0.clone(),
            name: self.source.1.clone(),
            replica_identity: if full {
                ReplicaIdentity::Full
            } else {
                ReplicaIdentity::Default
            },
            columns,
        }))
    }

    /// The name (quoted, qualified) a serial column's sequence `source` (quoted,
    /// qualified) has on the target.
    pub fn target_sequence(&self, source: &str) -> String {
        // The catalog's text quotes what needs it, as a table name in the configuration.
        let bare = crate::config::TablePattern::parse(source)
            .ok()
            .and_then(|p| p.exact().map(|(_, name)| name.to_string()))
            .unwrap_or_else(|| source.to_string());
        let name = match bare.strip_prefix(&format!("{}_", self.source.1)) {
            Some(rest) => format!("{}_{rest}", self.target.1),
            None => bare,
        };
        crate::pg::quote::qualified(&self.target.0, &name)
    }

    /// The source's name for messages.
    pub fn shown(&self) -> String {
        walrelay_model::QualifiedName {
            schema: &self.source.0,
            name: &self.source.1,
        }
        .to_string()
    }

    /// The target is the source table as it is (a row filter aside): a schema change
    /// of the source can run on the target as the source ran it.
    pub fn is_unchanged(&self) -> bool {
        self.keeps_columns() && self.source == self.target
    }

    /// Columns keep their names, types and values (the table may still be renamed or
    /// filtered): the target can be created from the source's full definition.
    pub fn keeps_columns(&self) -> bool {
        self.only.is_none() && self.renames.is_empty() && self.transforms.is_empty()
    }

    /// Values change on the way (not only which columns and what they are called).
    pub fn changes_values(&self) -> bool {
        self.transforms.values().any(|t| *t != Transform::Drop)
    }

    /// Whether this source column reaches the targets.
    pub fn keeps(&self, column: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|c| c == column))
            && self.transforms.get(column) != Some(&Transform::Drop)
    }

    /// A source column's name on the target.
    pub fn target_column<'a>(&'a self, column: &'a str) -> &'a str {
        self.renames.get(column).map_or(column, String::as_str)
    }

    fn err(&self, message: String) -> ShapeError {
        ShapeError {
            table: self.shown(),
            message,
        }
    }

    /// Check the shape against the source table's columns and key: every column it names
    /// exists, and the key reaches the target unchanged in what it identifies.
    pub fn check(&self, columns: &[String], key: &[String], full: bool) -> Result<(), ShapeError> {
        let named = self
            .only
            .iter()
            .flatten()
            .map(|c| ("columns", c))
            .chain(self.renames.keys().map(|c| ("rename_columns", c)))
            .chain(self.transforms.keys().map(|c| ("transform", c)));
        for (option, column) in named {
            if !columns.contains(column) {
                return Err(self.err(format!(
                    "{option} names column {column:?}, which the table does not have (its columns: {})",
                    columns.join(", ")
                )));
            }
        }
        if !full {
            for k in key {
                if !self.keeps(k) {
                    return Err(self.err(format!(
                        "key column {k:?} must be replicated: add it to columns and do not drop it"
                    )));
                }
                if let Some(t) = self.transforms.get(k) {
                    if !t.keeps_keys_distinct() {
                        return Err(self.err(format!(
                            "key column {k:?} cannot take {t:?}: the target could no longer tell its rows apart (only hash keeps keys distinct)"
                        )));
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in columns.iter().filter(|c| self.keeps(c)) {
            let target = self.target_column(c);
            if !seen.insert(target) {
                return Err(self.err(format!(
                    "two columns would be named {target:?} on the target"
                )));
            }
        }
        if seen.is_empty() {
            return Err(self.err("no column is left to replicate".into()));
        }
        Ok(())
    }

    /// The relation the sinks see, and how to make its rows from the source's.
    pub fn relation(&self, source: Arc<Relation>) -> Result<ShapedRelation, ShapeError> {
        let full = source.replica_identity == ReplicaIdentity::Full;
        let mut picks = Vec::new();
        let mut columns = Vec::new();
        for (i, c) in source.columns.iter().enumerate() {
            if !self.keeps(&c.name) {
                if c.is_key && !full {
                    return Err(self.err(format!(
                        "key column {:?} is not replicated (the table's key changed since walrelay started?)",
                        c.name
                    )));
                }
                continue;
            }
            let transform = self.transforms.get(&c.name).cloned();
            let mut column = Column {
                name: self.target_column(&c.name).to_string(),
                ..c.clone()
            };
            if !transform.as_ref().is_none_or(Transform::keeps_type) {
                column.type_oid = 25;
                column.type_modifier = -1;
                column.type_name = "text".into();
            }
            picks.push((i, transform));
            columns.push(column);
        }
        // The old key arrives as the source's key columns in order; each goes through the
        // same transform as in the new row. Under FULL the old row is a whole row.
        let key_transforms = source
            .columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| self.transforms.get(&c.name).cloned())
            .collect();
        let relation = Relation {
            oid: source.oid,
            schema: self.target.0.clone(),
            name: self.target.1.clone(),
            replica_identity: source.replica_identity,
            columns,
        };
        Ok(ShapedRelation {
            unchanged: self.keeps_columns() && self.source == self.target,
            relation: Arc::new(relation),
            source,
            picks,
            key_transforms,
            hash_key: self.hash_key.clone(),
        })
    }

    /// The target table's definition from the source's: renamed, its columns kept and
    /// renamed, `text` where a transform makes text. A table whose columns change keeps
    /// only its primary key (rebuilt on the target's column names) of its keys, indexes
    /// and constraints: their definitions name the source's columns. Partitions are not
    /// carried: the target table is a plain table that receives the rows of all of them.
    pub fn table_def(&self, source: &TableDef) -> TableDef {
        let mut def = source.clone();
        def.schema = self.target.0.clone();
        def.name = self.target.1.clone();
        if self.source != self.target {
            let from = crate::pg::quote::qualified(&self.source.0, &self.source.1);
            let to = crate::pg::quote::qualified(&self.target.0, &self.target.1);
            // `pg_get_indexdef` writes "ON [ONLY] schema.table USING": only that part names
            // the table. Foreign keys name other tables, which a set may rename too.
            def.indexes = def
                .indexes
                .iter()
                .map(|i| {
                    i.replacen(&format!(" ON {from} "), &format!(" ON {to} "), 1)
                        .replacen(&format!(" ON ONLY {from} "), &format!(" ON ONLY {to} "), 1)
                })
                .collect();
            def.constraints
                .retain(|(_, c)| !c.trim_start().starts_with("FOREIGN KEY"));
            def.partition_key = None;
            def.partitions.clear();
            // A serial column's sequence moves with its table: to the target's schema, and
            // `<table>_...` becomes `<target table>_...`. Identity sequences come with
            // their column and are named by the target.
            for seq in def.sequences.iter_mut().filter(|s| s.owned_by.is_some()) {
                let renamed = self.target_sequence(&seq.name);
                for c in def.columns.iter_mut() {
                    if let Some(d) = &mut c.default {
                        // As `pg_get_expr` printed it: never `E''`.
                        *d = d.replace(
                            &crate::pg::quote::standard_literal(&seq.name),
                            &crate::pg::quote::standard_literal(&renamed),
                        );
                    }
                }
                seq.name = renamed;
            }
        }
        if self.keeps_columns() {
            return def;
        }
        def.sequences.retain_mut(|s| {
            let column = s.owned_by.as_mut().or(s.identity_of.as_mut());
            match column {
                Some(c) if self.keeps(c) && !self.transforms.contains_key(c.as_str()) => {
                    *c = self.target_column(c).to_string();
                    true
                }
                _ => false,
            }
        });
        def.columns = def
            .columns
            .iter()
            .filter(|c| c.generated.is_none() && self.keeps(&c.name))
            .map(|c| {
                let mut c = c.clone();
                let transform = self.transforms.get(&c.name);
                c.name = self.target_column(&c.name).to_string();
                if let Some(t) = transform {
                    c.default = None;
                    c.identity = None;
                    if !t.keeps_type() {
                        c.type_sql = "text".into();
                        c.collation = None;
                    }
                    if *t == Transform::Null {
                        c.not_null = false;
                    }
                }
                c
            })
            .collect();
        // The key stays a key where its columns reach the target and still tell rows apart.
        let key_kept = !self.primary_key.is_empty()
            && self.primary_key.iter().all(|k| {
                self.keeps(k)
                    && self
                        .transforms
                        .get(k)
                        .is_none_or(Transform::keeps_keys_distinct)
            });
        def.primary_key = def
            .primary_key
            .take()
            .filter(|_| key_kept)
            .map(|(name, _)| {
                let columns: Vec<String> = self
                    .primary_key
                    .iter()
                    .map(|k| crate::pg::quote::ident(self.target_column(k)))
                    .collect();
                (name, format!("PRIMARY KEY ({})", columns.join(", ")))
            });
        def.constraints.clear();
        def.indexes.clear();
        def.partition_key = None;
        def.partitions.clear();
        def
    }
}

/// A relation as a set shapes it.
#[derive(Debug)]
pub struct ShapedRelation {
    /// What the sinks see.
    pub relation: Arc<Relation>,
    /// What the source sends.
    pub source: Arc<Relation>,
    /// Nothing to do to rows: they pass as they are.
    unchanged: bool,
    /// For each column the sinks see: its index in the source's row, and its transform.
    picks: Vec<(usize, Option<Transform>)>,
    /// The transform of each source key column, in order.
    key_transforms: Vec<Option<Transform>>,
    hash_key: Option<HashKey>,
}

impl ShapedRelation {
    /// A row of the source relation as the sinks see it.
    pub fn row(&self, row: Row) -> Row {
        if self.unchanged {
            return row;
        }
        let mut values: Vec<Option<Value>> = row.0.into_iter().map(Some).collect();
        Row(self
            .picks
            .iter()
            .map(|(i, t)| {
                let v = values[*i].take().unwrap_or(Value::Null);
                self.apply(t.as_ref(), v)
            })
            .collect())
    }

    /// An old row (key or whole) of the source relation as the sinks see it.
    pub fn old(&self, old: OldRow) -> OldRow {
        match old {
            OldRow::Full(row) => OldRow::Full(self.row(row)),
            OldRow::Key(row) if self.unchanged => OldRow::Key(row),
            OldRow::Key(row) => OldRow::Key(Row(row
                .0
                .into_iter()
                .zip(&self.key_transforms)
                .map(|(v, t)| self.apply(t.as_ref(), v))
                .collect())),
        }
    }

    fn apply(&self, transform: Option<&Transform>, value: Value) -> Value {
        match (transform, value) {
            (None, v) => v,
            // Not sent because not changed: the target keeps what it has, already
            // transformed the same way.
            (_, Value::UnchangedToast) => Value::UnchangedToast,
            (Some(Transform::Null), _) => Value::Null,
            (Some(_), Value::Null) => Value::Null,
            (Some(Transform::Drop), v) => v,
            (Some(Transform::Constant(c)), _) => Value::Text(c.clone()),
            (Some(Transform::Hash), v) => {
                let key = self.hash_key.as_ref();
                let bytes: &[u8] = match &v {
                    Value::Text(s) => s.as_bytes(),
                    Value::Binary(b) => b,
                    _ => &[],
                };
                Value::Text(key.map_or_else(String::new, |k| k.hash(bytes)))
            }
            (Some(Transform::Mask(keep)), v) => {
                let text = match v {
                    Value::Text(s) => s,
                    Value::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                    _ => String::new(),
                };
                Value::Text(mask(&text, *keep))
            }
        }
    }
}

/// Every character but the last `keep` replaced by `*`.
pub fn mask(text: &str, keep: usize) -> String {
    let count = text.chars().count();
    let hidden = count.saturating_sub(keep);
    text.chars()
        .enumerate()
        .map(|(i, c)| if i < hidden { '*' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, key: bool) -> Column {
        Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            type_name: "int4".into(),
            is_key: key,
        }
    }

    fn source() -> Arc<Relation> {
        Arc::new(Relation {
            oid: 7,
            schema: "public".into(),
            name: "accounts".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                col("id", true),
                col("email", false),
                col("card", false),
                col("note", false),
            ],
        })
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn shape() -> TableShape {
        let mut s = TableShape::unchanged("s", "public", "accounts");
        s.target = ("archive".into(), "clients".into());
        s.renames.insert("email".into(), "mail".into());
        s.transforms.insert("email".into(), Transform::Hash);
        s.transforms.insert("card".into(), Transform::Mask(4));
        s.transforms.insert("note".into(), Transform::Drop);
        s.hash_key = Some(HashKey::new("k"));
        s
    }

    #[test]
    fn rows_are_renamed_projected_and_transformed() {
        let shaped = shape().relation(source()).unwrap();
        let r = &shaped.relation;
        assert_eq!((r.schema.as_str(), r.name.as_str()), ("archive", "clients"));
        let names: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "mail", "card"]);
        assert_eq!(r.columns[1].type_name, "text");
        let row = shaped.row(Row(vec![
            text("1"),
            text("a@b"),
            text("1234567890"),
            text("x"),
        ]));
        assert_eq!(row.0[0], text("1"));
        assert_eq!(row.0[1], text(&HashKey::new("k").hash(b"a@b")));
        assert_eq!(row.0[2], text("******7890"));
        assert_eq!(
            shaped
                .row(Row(vec![
                    text("2"),
                    Value::Null,
                    Value::UnchangedToast,
                    Value::Null
                ]))
                .0[1..],
            [Value::Null, Value::UnchangedToast]
        );
    }

    #[test]
    fn hmac_matches_the_rfc_4231_vector() {
        // RFC 4231 test case 2: key "Jefe".
        assert_eq!(
            HashKey::new("Jefe").hash(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_key_must_reach_the_target() {
        let cols: Vec<String> = ["id", "email"].map(String::from).to_vec();
        let key = vec!["id".to_string()];
        let mut s = TableShape::unchanged("s", "public", "t");
        s.only = Some(vec!["email".into()]);
        assert!(s
            .check(&cols, &key, false)
            .unwrap_err()
            .message
            .contains("key column"));
        assert!(
            s.check(&cols, &key, true).is_ok(),
            "under FULL any column list identifies"
        );
        let mut s = TableShape::unchanged("s", "public", "t");
        s.transforms.insert("id".into(), Transform::Mask(2));
        assert!(s.check(&cols, &key, false).is_err());
        s.transforms.insert("id".into(), Transform::Hash);
        assert!(s.check(&cols, &key, false).is_ok());
        let mut s = TableShape::unchanged("s", "public", "t");
        s.renames.insert("nope".into(), "x".into());
        assert!(s
            .check(&cols, &key, false)
            .unwrap_err()
            .message
            .contains("nope"));
        let mut s = TableShape::unchanged("s", "public", "t");
        s.renames.insert("email".into(), "id".into());
        assert!(s
            .check(&cols, &key, false)
            .unwrap_err()
            .message
            .contains("two columns"));
    }

    #[test]
    fn a_serial_sequence_moves_with_its_table() {
        let mut s = TableShape::unchanged("s", "public", "tickets");
        s.target = ("crm".into(), "issues".into());
        assert_eq!(
            s.target_sequence("public.tickets_id_seq"),
            crate::pg::quote::qualified("crm", "issues_id_seq")
        );
        assert_eq!(
            s.target_sequence("\"My\".\"other\""),
            crate::pg::quote::qualified("crm", "other")
        );
    }

    #[test]
    fn masks_count_characters() {
        assert_eq!(mask("héllo", 2), "***lo");
        assert_eq!(mask("ab", 4), "ab");
        assert_eq!(mask("abc", 0), "***");
    }
}
