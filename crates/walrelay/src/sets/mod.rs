//! Replication sets at run time: the configuration's sets resolved against the source's
//! catalog into one plan (each table, its set, its shape), and the routing that gives each
//! sink only the tables of the sets it takes.
//!
//! A table belongs to one set at most, as in Slony-I: its row filter, columns and target
//! name are then a property of the table, the publication can carry them, and two sinks
//! never disagree on what a table's rows look like.

pub mod route;
pub mod shape;

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;

use crate::config::{SetConfig, TablePattern};
use crate::source::pgoutput::setup::{self, SelectedTable};
use crate::source::pgoutput::SourceError;
pub use shape::{ShapedRelation, TableShape};

/// Every captured table with its set and shape.
#[derive(Debug, Default)]
pub struct Plan {
    pub sets: Vec<String>,
    tables: Vec<Arc<TableShape>>,
    by_source: HashMap<(String, String), usize>,
    /// The tables by their oid on the source (a table keeps it when renamed).
    by_oid: HashMap<walrelay_model::Oid, usize>,
    /// Each set's table patterns, for tables created after the start (`shape_for_new`).
    patterns: Vec<(String, Vec<TablePattern>, Option<shape::HashKey>)>,
    /// The sequences the sets carry.
    pub sequences: Vec<SequencePair>,
}

/// A source sequence and where it lives on the targets.
#[derive(Debug, Clone)]
pub struct SequencePair {
    pub set: String,
    /// Quoted and qualified.
    pub source: String,
    pub target: SequenceTarget,
}

#[derive(Debug, Clone)]
pub enum SequenceTarget {
    /// The sequence of a column (serial or identity) of a target table: found on the
    /// target by `pg_get_serial_sequence`, whatever the target named it.
    Column { table: String, column: String },
    /// A sequence of this name, created if missing.
    Named { schema: String, name: String },
}

impl Plan {
    fn push(&mut self, shape: TableShape) {
        self.by_source
            .insert(shape.source.clone(), self.tables.len());
        self.tables.push(Arc::new(shape));
    }

    /// Tables replicated unchanged in one set (tests, and sources that need no catalog).
    pub fn unshaped(set: &str, tables: &[(&str, &str)]) -> Self {
        let mut plan = Plan {
            sets: vec![set.to_string()],
            ..Plan::default()
        };
        for (schema, name) in tables {
            plan.push(TableShape::unchanged(set, schema, name));
        }
        plan
    }

    /// Select each set's tables on the source and check the sets against them. Returns the
    /// plan and the selected tables, in the plan's order.
    pub async fn resolve(
        client: &Client,
        sets: &[SetConfig],
    ) -> Result<(Plan, Vec<SelectedTable>), SourceError> {
        let mut plan = Plan {
            sets: sets.iter().map(|s| s.name.clone()).collect(),
            ..Plan::default()
        };
        let mut selected = Vec::new();
        let mut targets: HashMap<(String, String), (String, String)> = HashMap::new();
        for set in sets {
            let patterns: Vec<TablePattern> = set.patterns().cloned().collect();
            let hash_key = set.hash_key.as_ref().map(|k| shape::HashKey::new(&k.0));
            plan.patterns
                .push((set.name.clone(), set.tables.clone(), hash_key.clone()));
            for table in setup::select_tables(client, &patterns).await? {
                let source = (table.schema.clone(), table.name.clone());
                if let Some(&i) = plan.by_source.get(&source) {
                    return Err(SourceError::Setup(format!(
                        "table {} is in set {:?} and in set {:?}: a table belongs to one set (it has one row filter, column list and target name); take it out of one",
                        table.qualified_name(),
                        plan.tables[i].set,
                        set.name
                    )));
                }
                let mut shape = TableShape::unchanged(&set.name, &table.schema, &table.name);
                shape.hash_key = hash_key.clone();
                if let Some(o) = set
                    .options
                    .iter()
                    .find(|o| o.name.matches(&table.schema, &table.name))
                {
                    shape.filter = o.filter.clone();
                    shape.only = o.columns.clone();
                    if let Some((schema, name)) = o.target.as_ref().and_then(TablePattern::exact) {
                        shape.target = (schema.to_string(), name.to_string());
                    }
                    shape.renames = o.rename_columns.clone();
                    for (column, spec) in &o.transform {
                        // Checked by `config::sets::validate`.
                        let t = spec.parse().map_err(SourceError::Setup)?;
                        shape.transforms.insert(column.clone(), t);
                    }
                    shape.identity_full = o.identity.is_some();
                }
                let full = table.replica_identity == 'f' || shape.identity_full;
                if !full {
                    shape.key = table.key.clone();
                }
                shape.primary_key = table.primary_key.clone();
                shape
                    .check(&table.columns, &table.key, full)
                    .map_err(|e| SourceError::Setup(format!("set {:?}: {e}", set.name)))?;
                if let Some(other) = targets.insert(shape.target.clone(), source.clone()) {
                    return Err(SourceError::Setup(format!(
                        "tables {} and {} would both be {}.{} on the targets: give one another target",
                        walrelay_model::QualifiedName { schema: &other.0, name: &other.1 },
                        table.qualified_name(),
                        shape.target.0,
                        shape.target.1
                    )));
                }
                for (column, sequence) in table.sequence_columns.iter().zip(&table.sequences) {
                    // A transformed column's values are not the sequence's any more.
                    if shape.keeps(column) && !shape.transforms.contains_key(column) {
                        plan.sequences.push(SequencePair {
                            set: set.name.clone(),
                            source: sequence.clone(),
                            target: SequenceTarget::Column {
                                table: crate::pg::quote::qualified(
                                    &shape.target.0,
                                    &shape.target.1,
                                ),
                                column: shape.target_column(column).to_string(),
                            },
                        });
                    }
                }
                plan.by_oid.insert(table.oid, plan.tables.len());
                plan.push(shape);
                selected.push(table);
            }
            for named in &set.sequences {
                let Some((schema, name)) = named.exact() else {
                    continue;
                };
                let qualified = crate::pg::quote::qualified(schema, name);
                let exists: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                        WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'S')",
                        &[&schema, &name],
                    )
                    .await
                    .map_err(|e| SourceError::Pg(crate::pg::PgError::from_sql("looking up a sequence", e)))?
                    .get(0);
                if !exists {
                    return Err(SourceError::Setup(format!(
                        "set {:?}: sequence {named} does not exist on the source",
                        set.name
                    )));
                }
                plan.sequences.push(SequencePair {
                    set: set.name.clone(),
                    source: qualified,
                    target: SequenceTarget::Named {
                        schema: schema.to_string(),
                        name: name.to_string(),
                    },
                });
            }
        }
        Ok((plan, selected))
    }

    /// `tables` (as `resolve` returned them, in the plan's order) with their row filters,
    /// for the publication.
    pub fn published<'a>(&'a self, tables: &'a [SelectedTable]) -> Vec<setup::Published<'a>> {
        tables
            .iter()
            .zip(&self.tables)
            .map(|(table, shape)| setup::Published {
                table,
                filter: shape.filter.as_deref(),
            })
            .collect()
    }

    pub fn tables(&self) -> &[Arc<TableShape>] {
        &self.tables
    }

    /// The shape of a source table, if a set captures it.
    pub fn shape_for(&self, schema: &str, name: &str) -> Option<&Arc<TableShape>> {
        self.by_source
            .get(&(schema.to_string(), name.to_string()))
            .map(|&i| &self.tables[i])
    }

    /// The shape of the table with this oid on the source, if a set captured it at start.
    pub fn shape_by_oid(&self, oid: walrelay_model::Oid) -> Option<&Arc<TableShape>> {
        self.by_oid.get(&oid).map(|&i| &self.tables[i])
    }

    /// The shape of a table created after the start that a set's patterns take: the
    /// table as it is (per-table options name existing tables, and apply from the next
    /// start).
    pub fn shape_for_new(&self, schema: &str, name: &str) -> Option<TableShape> {
        let (set, _, hash_key) = self
            .patterns
            .iter()
            .find(|(_, patterns, _)| patterns.iter().any(|p| p.matches(schema, name)))?;
        let mut shape = TableShape::unchanged(set, schema, name);
        shape.hash_key = hash_key.clone();
        Some(shape)
    }

    /// Each set's table patterns (`[[set]] tables`), for the source's DDL capture.
    pub fn patterns(&self) -> impl Iterator<Item = &TablePattern> {
        self.patterns.iter().flat_map(|(_, p, _)| p)
    }

    /// Whether objects of this schema belong with the replicated tables: a captured table
    /// lives there, or a set's pattern takes tables there.
    pub fn covers_schema(&self, schema: &str) -> bool {
        self.by_source.keys().any(|(s, _)| s == schema)
            || self.patterns().any(|p| p.schema.matches(schema))
    }

    /// The tables of `sets` (all when `None`).
    pub fn tables_of<'a>(
        &'a self,
        sets: Option<&'a [String]>,
    ) -> impl Iterator<Item = &'a Arc<TableShape>> + 'a {
        self.tables
            .iter()
            .filter(move |t| sets.is_none_or(|s| s.contains(&t.set)))
    }

    /// The sequences of `sets` (all when `None`).
    pub fn sequences_of(&self, sets: Option<&[String]>) -> Vec<SequencePair> {
        self.sequences
            .iter()
            .filter(|s| sets.is_none_or(|wanted| wanted.contains(&s.set)))
            .cloned()
            .collect()
    }

    /// The target names of the tables of `sets`.
    pub fn targets_of(&self, sets: Option<&[String]>) -> Vec<(String, String)> {
        self.tables_of(sets).map(|t| t.target.clone()).collect()
    }
}
