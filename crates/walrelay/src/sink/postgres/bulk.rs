//! Set-based apply of a run of changes: many rows of one table and one shape go to the
//! target as one COPY and, for updates and deletes, one statement joining a staging table.
//! A run holds references into the batches it came from, so a short run can still be
//! applied row by row.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use walrelay_model::{Change, Event, Relation, Row, Value};

use crate::pg::quote;
use crate::sink::Batch;

/// Runs shorter than this are applied row by row: a bulk run costs three round trips.
pub const BULK_MIN_ROWS: usize = 8;
/// A run is applied once it holds this many rows or bytes.
pub const RUN_MAX_ROWS: usize = 50_000;
pub const RUN_MAX_BYTES: usize = 8 << 20;

/// A change inside a shared batch.
#[derive(Clone)]
pub struct ChangeRef {
    batch: Batch,
    index: usize,
}

impl ChangeRef {
    pub fn new(batch: Batch, index: usize) -> Self {
        ChangeRef { batch, index }
    }

    pub fn change(&self) -> &Change {
        match &self.batch[self.index] {
            Event::Change { change, .. } | Event::StreamChange { change, .. } => change,
            other => unreachable!("a ChangeRef points at a change, not {other:?}"),
        }
    }

    pub fn event(&self) -> &Event {
        &self.batch[self.index]
    }
}

/// What a run does; every change in it has this kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunKind {
    Insert,
    /// Updates that keep their key and set the columns marked `true`.
    Update {
        set: Vec<bool>,
    },
    Delete,
}

/// The kind of run a change can join, if any: changes that find their row by key and do
/// not change it. Key changes and REPLICA IDENTITY FULL go row by row.
pub fn run_kind(change: &Change) -> Option<RunKind> {
    match change {
        Change::Insert { .. } => Some(RunKind::Insert),
        Change::Update {
            relation,
            old: None,
            new,
        } if has_key(relation) && key_present(relation, new) => {
            // The key found the row and stays: only the other sent columns change.
            let set: Vec<bool> = new
                .0
                .iter()
                .zip(&relation.columns)
                .map(|(v, c)| *v != Value::UnchangedToast && !c.is_key)
                .collect();
            set.contains(&true).then_some(RunKind::Update { set })
        }
        Change::Delete {
            relation,
            old: walrelay_model::OldRow::Key(_),
        } if has_key(relation)
            && relation.replica_identity != walrelay_model::ReplicaIdentity::Full =>
        {
            Some(RunKind::Delete)
        }
        _ => None,
    }
}

fn has_key(rel: &Relation) -> bool {
    rel.replica_identity != walrelay_model::ReplicaIdentity::Full
        && rel.key_columns().next().is_some()
}

fn key_present(rel: &Relation, row: &Row) -> bool {
    rel.key_columns()
        .all(|(i, _)| !matches!(row.0[i], Value::UnchangedToast | Value::Null))
}

/// Consecutive changes of one table with one kind.
pub struct Run {
    pub relation: Arc<Relation>,
    pub kind: RunKind,
    pub changes: Vec<ChangeRef>,
    pub bytes: usize,
    keys: HashSet<u64>,
    /// Some key appears more than once (updates of a hot row).
    pub repeated_keys: bool,
}

impl Run {
    pub fn new(relation: Arc<Relation>, kind: RunKind) -> Self {
        Run {
            relation,
            kind,
            changes: Vec::new(),
            bytes: 0,
            keys: HashSet::new(),
            repeated_keys: false,
        }
    }

    pub fn push(&mut self, change: ChangeRef) {
        let c = change.change();
        self.bytes += c.payload_len();
        if let Some(key) = key_hash(&self.relation, c) {
            if !self.keys.insert(key) {
                self.repeated_keys = true;
            }
        }
        self.changes.push(change);
    }

    pub fn is_full(&self) -> bool {
        self.changes.len() >= RUN_MAX_ROWS || self.bytes >= RUN_MAX_BYTES
    }

    /// Distinct keys in the run (the rows an update or delete must find).
    pub fn distinct_keys(&self) -> usize {
        self.keys.len()
    }

    /// The columns the staging table holds: the set columns (updates) or none (deletes),
    /// then the key columns.
    pub fn stage_columns(&self) -> Vec<usize> {
        let key: Vec<usize> = self.relation.key_columns().map(|(i, _)| i).collect();
        match &self.kind {
            RunKind::Update { set } => set
                .iter()
                .enumerate()
                .filter(|(_, &s)| s)
                .map(|(i, _)| i)
                .chain(key.iter().copied().filter(|i| !set[*i]))
                .collect(),
            RunKind::Delete => key,
            RunKind::Insert => (0..self.relation.columns.len()).collect(),
        }
    }

    /// The COPY text of the run's rows: a sequence number, then the stage columns (for
    /// inserts: every column, no sequence number).
    pub fn copy_data(&self) -> Vec<u8> {
        let columns = self.stage_columns();
        let mut out = Vec::with_capacity(self.bytes + self.changes.len() * (columns.len() * 2 + 8));
        for (seq, c) in self.changes.iter().enumerate() {
            let values: Vec<&Value> = match c.change() {
                Change::Insert { new, .. } => new.0.iter().collect(),
                Change::Update { new, .. } => columns.iter().map(|&i| &new.0[i]).collect(),
                Change::Delete {
                    old: walrelay_model::OldRow::Key(k),
                    ..
                } => k.0.iter().collect(),
                _ => continue,
            };
            if self.kind != RunKind::Insert {
                out.extend_from_slice(seq.to_string().as_bytes());
                out.push(b'\t');
            }
            for (n, v) in values.iter().enumerate() {
                if n > 0 {
                    out.push(b'\t');
                }
                crate::pg::copy_text::encode_value(v, &mut out);
            }
            out.push(b'\n');
        }
        out
    }
}

/// A hash of the key values of a change, to notice repeated keys.
fn key_hash(rel: &Relation, change: &Change) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match change {
        Change::Update { new, .. } => {
            for (i, _) in rel.key_columns() {
                new.0[i].hash_into(&mut h);
            }
        }
        Change::Delete {
            old: walrelay_model::OldRow::Key(k),
            ..
        } => {
            for v in &k.0 {
                v.hash_into(&mut h);
            }
        }
        _ => return None,
    }
    Some(h.finish())
}

trait HashInto {
    fn hash_into(&self, h: &mut std::collections::hash_map::DefaultHasher);
}

impl HashInto for Value {
    fn hash_into(&self, h: &mut std::collections::hash_map::DefaultHasher) {
        match self {
            Value::Text(t) => t.hash(h),
            Value::Binary(b) => b.hash(h),
            Value::Null => 0u8.hash(h),
            Value::UnchangedToast => 1u8.hash(h),
        }
    }
}

/// Name of the staging table for a run of `rel` with `columns`: stable, so that it is
/// created once per session (and again after a rollback undid its creation). The columns'
/// names and types are in it: after a schema change the table gets a new stage.
pub fn stage_name(rel: &Relation, columns: &[usize]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rel.schema.hash(&mut h);
    rel.name.hash(&mut h);
    for &i in columns {
        let c = &rel.columns[i];
        (&c.name, c.type_oid, c.type_modifier).hash(&mut h);
    }
    format!("walrelay_stage_{:016x}", h.finish())
}

/// `CREATE TEMP TABLE IF NOT EXISTS stage AS SELECT seq, columns FROM t WITH NO DATA`: the
/// columns with the target's types and no constraints.
pub fn create_stage_sql(rel: &Relation, columns: &[usize]) -> String {
    let cols: Vec<String> = columns
        .iter()
        .map(|&i| quote::ident(&rel.columns[i].name))
        .collect();
    format!(
        "CREATE TEMP TABLE IF NOT EXISTS {} AS SELECT NULL::int8 AS walrelay_seq, {} FROM {} WITH NO DATA",
        quote::ident(&stage_name(rel, columns)),
        cols.join(", "),
        quote::qualified(&rel.schema, &rel.name)
    )
}

/// `COPY stage (walrelay_seq, columns) FROM STDIN`, or for inserts `COPY t (all) FROM STDIN`.
pub fn copy_sql(run: &Run) -> String {
    let rel = &run.relation;
    let columns = run.stage_columns();
    let cols: Vec<String> = columns
        .iter()
        .map(|&i| quote::ident(&rel.columns[i].name))
        .collect();
    match run.kind {
        RunKind::Insert => format!(
            "COPY {} ({}) FROM STDIN",
            quote::qualified(&rel.schema, &rel.name),
            cols.join(", ")
        ),
        _ => format!(
            "COPY {} (walrelay_seq, {}) FROM STDIN",
            quote::ident(&stage_name(rel, &columns)),
            cols.join(", ")
        ),
    }
}

/// The statement that applies a staged run of updates or deletes; `latest_only` keeps the
/// last version of each key when keys repeat.
pub fn apply_stage_sql(run: &Run, latest_only: bool) -> String {
    let rel = &run.relation;
    let columns = run.stage_columns();
    let stage = quote::ident(&stage_name(rel, &columns));
    let target = quote::qualified(&rel.schema, &rel.name);
    let key: Vec<String> = rel
        .key_columns()
        .map(|(_, c)| quote::ident(&c.name))
        .collect();
    let source = if latest_only {
        format!(
            "(SELECT DISTINCT ON ({k}) * FROM {stage} ORDER BY {k}, walrelay_seq DESC)",
            k = key.join(", ")
        )
    } else {
        stage
    };
    let matches: Vec<String> = key
        .iter()
        .map(|k| format!("walrelay_t.{k} = walrelay_s.{k}"))
        .collect();
    match &run.kind {
        RunKind::Update { set } => {
            let assignments: Vec<String> = rel
                .columns
                .iter()
                .zip(set)
                .filter(|(_, &s)| s)
                .map(|(c, _)| {
                    let c = quote::ident(&c.name);
                    format!("{c} = walrelay_s.{c}")
                })
                .collect();
            format!(
                "UPDATE {target} AS walrelay_t SET {} FROM {source} AS walrelay_s WHERE {}",
                assignments.join(", "),
                matches.join(" AND ")
            )
        }
        RunKind::Delete => format!(
            "DELETE FROM {target} AS walrelay_t USING {source} AS walrelay_s WHERE {}",
            matches.join(" AND ")
        ),
        RunKind::Insert => String::new(),
    }
}

/// One key of the staged run that has no row on the target, for a conflict message.
pub fn missing_key_sql(run: &Run) -> String {
    let rel = &run.relation;
    let columns = run.stage_columns();
    let stage = quote::ident(&stage_name(rel, &columns));
    let key: Vec<String> = rel
        .key_columns()
        .map(|(_, c)| quote::ident(&c.name))
        .collect();
    let matches: Vec<String> = key
        .iter()
        .map(|k| format!("walrelay_t.{k} = walrelay_s.{k}"))
        .collect();
    let shown: Vec<String> = key
        .iter()
        .map(|k| format!("walrelay_s.{k}::text"))
        .collect();
    format!(
        "SELECT walrelay_s.walrelay_seq, concat_ws(', ', {}) FROM {stage} AS walrelay_s \
         WHERE NOT EXISTS (SELECT 1 FROM {} AS walrelay_t WHERE {}) ORDER BY walrelay_s.walrelay_seq LIMIT 1",
        shown.join(", "),
        quote::qualified(&rel.schema, &rel.name),
        matches.join(" AND ")
    )
}
