//! Replication sets in the configuration: named groups of tables, each table with an
//! optional row filter, column list, target name, column renames and value transforms.
//! A sink takes the sets it names (`sets = [...]`), or all of them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::TablePattern;

/// `[[set]]`: tables replicated together.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetConfig {
    pub name: String,
    /// Table patterns, as `source.tables` takes them.
    #[serde(default)]
    pub tables: Vec<TablePattern>,
    /// Per-table options (`[[set.table]]`); a table named here belongs to the set too.
    #[serde(default, rename = "table")]
    pub options: Vec<TableOptions>,
    /// The key of the `hash` transform (HMAC-SHA256): the same key gives the same hashes,
    /// so hashed columns still join. Required when a table of the set hashes a column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<Secret>,
    /// Sequences the set carries besides those its tables own (serial and identity
    /// columns), `schema.name`: kept at least as far on the targets as on the source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sequences: Vec<TablePattern>,
}

impl SetConfig {
    /// Every pattern that puts tables in the set: `tables`, and the tables named by
    /// `[[set.table]]`.
    pub fn patterns(&self) -> impl Iterator<Item = &TablePattern> {
        self.tables
            .iter()
            .chain(self.options.iter().map(|o| &o.name))
    }
}

/// `[[set.table]]`: how one table is replicated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableOptions {
    /// The source table, `schema.table` (no wildcard).
    pub name: TablePattern,
    /// A row filter in SQL, evaluated by the source (a publication row filter, and the
    /// initial copy's WHERE): only rows for which it is true are replicated.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Only these columns (source names); the row's key must be among them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// The table on the targets, `schema.table`: default the source's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TablePattern>,
    /// Source column name → target column name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename_columns: BTreeMap<String, String>,
    /// Source column name → what to do with its values before any sink sees them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub transform: BTreeMap<String, TransformSpec>,
    /// `"full"`: set REPLICA IDENTITY FULL on a source table that has no key, so that its
    /// updates and deletes can be replicated (each then carries the whole old row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityOption>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityOption {
    Full,
}

/// A transform as written: `"drop"`, `"null"`, `"hash"`, `{ mask = N }` or
/// `{ constant = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TransformSpec {
    Word(String),
    Mask { mask: usize },
    Constant { constant: String },
}

/// What a transform does to a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    /// The column is not replicated.
    Drop,
    /// Every value becomes NULL.
    Null,
    /// Every value that is not NULL becomes this text (read as the column's type).
    Constant(String),
    /// Every value that is not NULL becomes the hex HMAC-SHA256 of its text under the set's
    /// `hash_key`; the target column is `text`.
    Hash,
    /// Every character but the last N becomes `*`; the target column is `text`.
    Mask(usize),
}

impl TransformSpec {
    pub fn parse(&self) -> Result<Transform, String> {
        match self {
            TransformSpec::Word(w) => match w.as_str() {
                "drop" => Ok(Transform::Drop),
                "null" => Ok(Transform::Null),
                "hash" => Ok(Transform::Hash),
                other => Err(format!(
                    "{other:?} is not a transform: use \"drop\", \"null\", \"hash\", {{ mask = 4 }} or {{ constant = \"...\" }}"
                )),
            },
            TransformSpec::Mask { mask } => Ok(Transform::Mask(*mask)),
            TransformSpec::Constant { constant } => Ok(Transform::Constant(constant.clone())),
        }
    }
}

impl Transform {
    /// Whether the target column keeps the source's type.
    pub fn keeps_type(&self) -> bool {
        !matches!(self, Transform::Hash | Transform::Mask(_))
    }

    /// Whether a key column may take this transform: the target must still tell rows
    /// apart by it. A keyed hash keeps distinct values distinct.
    pub fn keeps_keys_distinct(&self) -> bool {
        matches!(self, Transform::Hash)
    }
}

/// A secret value from the configuration: never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The set `source.tables` stands for.
pub const DEFAULT_SET: &str = "default";

/// Checks of the sets that need no server: `Err((key, message))`.
pub fn validate(sets: &[SetConfig]) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, set) in sets.iter().enumerate() {
        let key = |k: &str| format!("set[{i}].{k}");
        if set.name.is_empty() {
            return Err((key("name"), "must not be empty".into()));
        }
        if !names.insert(set.name.as_str()) {
            return Err((
                key("name"),
                format!("{:?} names two sets; give each a distinct name", set.name),
            ));
        }
        if let Some(s) = set.sequences.iter().find(|s| !s.is_exact()) {
            return Err((
                key("sequences"),
                format!("{s} is a pattern: name each sequence as schema.name"),
            ));
        }
        if set.tables.is_empty() && set.options.is_empty() {
            return Err((
                key("tables"),
                "list at least one table, e.g. tables = [\"public.orders\"]".into(),
            ));
        }
        for (j, t) in set.options.iter().enumerate() {
            let key = |k: &str| format!("set[{i}].table[{j}].{k}");
            if !t.name.is_exact() {
                return Err((
                    key("name"),
                    format!(
                        "{} is a pattern: options apply to one table, name it as schema.table",
                        t.name
                    ),
                ));
            }
            if let Some(target) = &t.target {
                if !target.is_exact() {
                    return Err((
                        key("target"),
                        format!("{target} is a pattern: write schema.table"),
                    ));
                }
            }
            if let Some(filter) = &t.filter {
                if filter.trim().is_empty() {
                    return Err((key("where"), "must not be empty".into()));
                }
            }
            if let Some(columns) = &t.columns {
                if columns.is_empty() {
                    return Err((key("columns"), "list at least the key's columns".into()));
                }
            }
            let mut hashes = false;
            for (column, spec) in &t.transform {
                let transform = spec
                    .parse()
                    .map_err(|m| (format!("{}.{column}", key("transform")), m))?;
                hashes |= transform == Transform::Hash;
            }
            if hashes && set.hash_key.as_ref().is_none_or(|k| k.0.is_empty()) {
                return Err((
                    format!("set[{i}].hash_key"),
                    "a table of this set hashes a column: give the set a hash_key (a long random string; the same key gives the same hashes)".into(),
                ));
            }
            let mut targets = std::collections::HashSet::new();
            for (from, to) in &t.rename_columns {
                if to.is_empty() {
                    return Err((
                        key("rename_columns"),
                        format!("{from:?} is renamed to nothing"),
                    ));
                }
                if !targets.insert(to) {
                    return Err((
                        key("rename_columns"),
                        format!("two columns are renamed to {to:?}"),
                    ));
                }
            }
        }
        for (j, a) in set.options.iter().enumerate() {
            if set.options[..j].iter().any(|b| b.name == a.name) {
                return Err((
                    format!("set[{i}].table[{j}].name"),
                    format!("{} has two [[set.table]] entries in this set", a.name),
                ));
            }
        }
    }
    Ok(())
}
