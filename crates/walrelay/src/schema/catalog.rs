//! Reading a table's definition from the source catalog: columns, the user-defined types
//! they depend on (in dependency order), defaults, identity and generated columns,
//! sequences, constraints, indexes and partitions.
//!
//! The session runs with `search_path = ''`, so `format_type`, `pg_get_expr`,
//! `pg_get_indexdef` and `pg_get_constraintdef` qualify every name that is not in
//! `pg_catalog`: the text means the same on the target.

use tokio_postgres::Client;

use crate::pg::{quote, PgError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    /// `format_type`, qualified: `integer`, `public.mood[]`, `character varying(20)`.
    pub type_sql: String,
    pub not_null: bool,
    /// A default the target can have (it depends on nothing the target lacks).
    pub default: Option<String>,
    /// `a` (ALWAYS) or `d` (BY DEFAULT) for identity columns.
    pub identity: Option<char>,
    /// The expression of a `GENERATED ALWAYS AS (...) STORED` column.
    pub generated: Option<String>,
    /// A collation other than the type's default, qualified.
    pub collation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceDef {
    /// Qualified and quoted.
    pub name: String,
    pub type_sql: String,
    pub start: i64,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    pub cache: i64,
    pub cycle: bool,
    pub last_value: i64,
    pub is_called: bool,
    /// The column it belongs to (serial), unquoted; for identity columns the sequence is
    /// the column's own.
    pub owned_by: Option<String>,
    pub identity_of: Option<String>,
}

/// A user-defined type a table depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeDef {
    Enum {
        name: String,
        labels: Vec<String>,
    },
    Domain {
        name: String,
        base: String,
        not_null: bool,
        default: Option<String>,
        checks: Vec<String>,
    },
    Composite {
        name: String,
        attributes: Vec<(String, String)>,
    },
    Range {
        name: String,
        subtype: String,
    },
    /// A base type from an extension: the target needs the extension.
    Extension {
        name: String,
        extension: String,
    },
}

impl TypeDef {
    pub fn name(&self) -> &str {
        match self {
            TypeDef::Enum { name, .. }
            | TypeDef::Domain { name, .. }
            | TypeDef::Composite { name, .. }
            | TypeDef::Range { name, .. }
            | TypeDef::Extension { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDef {
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnDef>,
    /// Types the columns need, each after those it needs.
    pub types: Vec<TypeDef>,
    pub sequences: Vec<SequenceDef>,
    /// `pg_get_constraintdef` of the primary key, and its name.
    pub primary_key: Option<(String, String)>,
    /// Other constraints (unique, check, foreign key, exclusion): (name, definition).
    pub constraints: Vec<(String, String)>,
    /// `pg_get_indexdef` of indexes that back no constraint.
    pub indexes: Vec<String>,
    /// `PARTITION BY ...` of a partitioned table.
    pub partition_key: Option<String>,
    /// Storage parameters (`fillfactor=100`), as `pg_class.reloptions` lists them.
    pub storage: Vec<String>,
    /// Partitions: (schema, name, bound, their own partition key if sub-partitioned).
    pub partitions: Vec<PartitionDef>,
    /// Defaults left out because they depend on objects the target may lack.
    pub dropped_defaults: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDef {
    pub schema: String,
    pub name: String,
    pub bound: String,
    pub partition_key: Option<String>,
    pub parent_schema: String,
    pub parent_name: String,
}

impl TableDef {
    /// Quoted, for SQL.
    pub fn qualified(&self) -> String {
        quote::qualified(&self.schema, &self.name)
    }

    /// As a person writes it, for messages.
    pub fn shown(&self) -> String {
        walrelay_model::QualifiedName {
            schema: &self.schema,
            name: &self.name,
        }
        .to_string()
    }

    /// The columns that hold data to copy (not generated).
    pub fn data_columns(&self) -> impl Iterator<Item = &ColumnDef> {
        self.columns.iter().filter(|c| c.generated.is_none())
    }
}

fn err(what: &str) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
    move |e| PgError::from_sql(format!("reading the source catalog ({what})"), e)
}

/// Prepare a session for reading definitions: names come out qualified.
pub async fn prepare_session(client: &Client) -> Result<(), PgError> {
    client
        .batch_execute("SET search_path = ''")
        .await
        .map_err(err("search_path"))
}

/// Read the definition of `schema.name` (a session prepared with `prepare_session`).
pub async fn read_table(client: &Client, schema: &str, name: &str) -> Result<TableDef, PgError> {
    let rel = quote::qualified(schema, name);
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    pg_get_expr(d.adbin, d.adrelid),
                    nullif(a.attidentity, '')::text, nullif(a.attgenerated, '')::text,
                    CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0
                         THEN (SELECT quote_ident(n.nspname) || '.' || quote_ident(co.collname)
                               FROM pg_collation co JOIN pg_namespace n ON n.oid = co.collnamespace
                               WHERE co.oid = a.attcollation) END,
                    EXISTS (SELECT 1 FROM pg_depend dep JOIN pg_proc p ON p.oid = dep.refobjid
                            WHERE dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid
                              AND dep.refclassid = 'pg_proc'::regclass
                              AND p.pronamespace <> 'pg_catalog'::regnamespace),
                    a.atttypid
             FROM pg_attribute a
             JOIN pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&rel],
        )
        .await
        .map_err(err("columns"))?;
    let mut columns = Vec::new();
    let mut dropped_defaults = Vec::new();
    let mut type_oids = Vec::new();
    for r in &cols {
        let name: String = r.get(0);
        let identity = r.get::<_, Option<String>>(4).and_then(|s| s.chars().next());
        let generated = r.get::<_, Option<String>>(5).is_some();
        let default: Option<String> = r.get(3);
        let depends_on_functions: bool = r.get(7);
        let (default, generated_expr) = if generated {
            (None, default)
        } else if identity.is_some() {
            (None, None)
        } else if depends_on_functions {
            if default.is_some() {
                dropped_defaults.push(name.clone());
            }
            (None, None)
        } else {
            (default, None)
        };
        type_oids.push(r.get::<_, u32>(8));
        columns.push(ColumnDef {
            name,
            type_sql: r.get(1),
            not_null: r.get(2),
            default,
            identity,
            generated: generated_expr,
            collation: r.get(6),
        });
    }
    let mut types = Vec::new();
    for oid in type_oids {
        collect_types(client, oid, &mut types).await?;
    }
    let sequences = read_sequences(client, &rel).await?;
    let cons = client
        .query(
            "SELECT conname::text, contype::text, pg_get_constraintdef(oid)
             FROM pg_constraint
             WHERE conrelid = $1::text::regclass AND contype IN ('p', 'u', 'c', 'f', 'x') AND conislocal
             ORDER BY contype, conname",
            &[&rel],
        )
        .await
        .map_err(err("constraints"))?;
    let mut primary_key = None;
    let mut constraints = Vec::new();
    for r in cons {
        let (name, kind, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        if kind == "p" {
            primary_key = Some((name, def));
        } else {
            constraints.push((name, def));
        }
    }
    let indexes = client
        .query(
            "SELECT pg_get_indexdef(i.indexrelid)
             FROM pg_index i
             WHERE i.indrelid = $1::text::regclass
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid)
               AND NOT EXISTS (SELECT 1 FROM pg_inherits inh WHERE inh.inhrelid = i.indexrelid)
             ORDER BY i.indexrelid",
            &[&rel],
        )
        .await
        .map_err(err("indexes"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let row = client
        .query_one(
            "SELECT CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
                    coalesce(c.reloptions::text[], '{}')
             FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&rel],
        )
        .await
        .map_err(err("partition key"))?;
    let partition_key: Option<String> = row.get(0);
    let storage: Vec<String> = row.get(1);
    let partitions = if partition_key.is_some() {
        read_partitions(client, &rel).await?
    } else {
        Vec::new()
    };
    Ok(TableDef {
        schema: schema.into(),
        name: name.into(),
        columns,
        types,
        sequences,
        primary_key,
        constraints,
        indexes,
        partition_key,
        storage,
        partitions,
        dropped_defaults,
    })
}

/// Add the user-defined type `oid` (and first, the types it needs) to `out`.
fn collect_types<'a>(
    client: &'a Client,
    oid: u32,
    out: &'a mut Vec<TypeDef>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PgError>> + Send + 'a>> {
    Box::pin(async move {
        let row = client
            .query_one(
                "SELECT t.typtype::text, n.nspname::text, t.typname::text, t.typelem, t.typbasetype,
                        t.typrelid, format_type(t.oid, NULL), t.typnotnull, pg_get_expr(t.typdefaultbin, 0),
                        (SELECT e.extname::text FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                         WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'),
                        t.typcategory::text
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
                &[&oid],
            )
            .await
            .map_err(err("types"))?;
        let (kind, nsp): (String, String) = (row.get(0), row.get(1));
        let elem: u32 = row.get(3);
        let category: String = row.get(10);
        if category == "A" && elem != 0 {
            return collect_types(client, elem, out).await;
        }
        if nsp == "pg_catalog" || nsp == "information_schema" {
            return Ok(());
        }
        let name: String = row.get(6);
        if out.iter().any(|t| t.name() == name) {
            return Ok(());
        }
        if let Some(extension) = row.get::<_, Option<String>>(9) {
            out.push(TypeDef::Extension { name, extension });
            return Ok(());
        }
        let def = match kind.as_str() {
            "e" => {
                let labels = client
                    .query("SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder", &[&oid])
                    .await
                    .map_err(err("enum labels"))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                TypeDef::Enum { name, labels }
            }
            "d" => {
                let base_oid: u32 = row.get(4);
                collect_types(client, base_oid, out).await?;
                let base: String = client
                    .query_one(
                        "SELECT format_type(typbasetype, typtypmod) FROM pg_type WHERE oid = $1",
                        &[&oid],
                    )
                    .await
                    .map_err(err("domain"))?
                    .get(0);
                let checks = client
                    .query(
                        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = $1 AND contype = 'c' ORDER BY conname",
                        &[&oid],
                    )
                    .await
                    .map_err(err("domain checks"))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                TypeDef::Domain {
                    name,
                    base,
                    not_null: row.get(7),
                    default: row.get(8),
                    checks,
                }
            }
            "c" => {
                let relid: u32 = row.get(5);
                let attrs = client
                    .query(
                        "SELECT attname::text, format_type(atttypid, atttypmod), atttypid FROM pg_attribute
                         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                        &[&relid],
                    )
                    .await
                    .map_err(err("composite type"))?;
                let mut attributes = Vec::new();
                for a in attrs {
                    collect_types(client, a.get(2), out).await?;
                    attributes.push((a.get(0), a.get(1)));
                }
                TypeDef::Composite { name, attributes }
            }
            "r" => {
                let sub = client
                    .query_one(
                        "SELECT rngsubtype, format_type(rngsubtype, NULL) FROM pg_range WHERE rngtypid = $1",
                        &[&oid],
                    )
                    .await
                    .map_err(err("range type"))?;
                collect_types(client, sub.get(0), out).await?;
                TypeDef::Range {
                    name,
                    subtype: sub.get(1),
                }
            }
            _ => TypeDef::Extension {
                extension: "(none: a base type defined in C)".into(),
                name,
            },
        };
        out.push(def);
        Ok(())
    })
}

/// Sequences the table's columns use: serial defaults and identity columns.
async fn read_sequences(client: &Client, rel: &str) -> Result<Vec<SequenceDef>, PgError> {
    let rows = client
        .query(
            "SELECT a.attname::text, pg_get_serial_sequence($1, a.attname) AS seq, a.attidentity::text
             FROM pg_attribute a
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
               AND pg_get_serial_sequence($1, a.attname) IS NOT NULL",
            &[&rel],
        )
        .await
        .map_err(err("sequences"))?;
    let mut out = Vec::new();
    for r in rows {
        let column: String = r.get(0);
        let seq: String = r.get(1);
        let identity: String = r.get(2);
        let s = client
            .query_one(
                "SELECT format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
                        s.seqcache, s.seqcycle
                 FROM pg_sequence s WHERE s.seqrelid = $1::text::regclass",
                &[&seq],
            )
            .await
            .map_err(err("sequence"))?;
        let state = client
            .query_one(&format!("SELECT last_value, is_called FROM {seq}"), &[])
            .await
            .map_err(err("sequence value"))?;
        let is_identity = !identity.is_empty();
        out.push(SequenceDef {
            name: seq,
            type_sql: s.get(0),
            start: s.get(1),
            increment: s.get(2),
            min: s.get(3),
            max: s.get(4),
            cache: s.get(5),
            cycle: s.get(6),
            last_value: state.get(0),
            is_called: state.get(1),
            owned_by: (!is_identity).then(|| column.clone()),
            identity_of: is_identity.then_some(column),
        });
    }
    Ok(out)
}

/// The partitions of a partitioned table, parents before their own partitions.
async fn read_partitions(client: &Client, rel: &str) -> Result<Vec<PartitionDef>, PgError> {
    let rows = client
        .query(
            "WITH RECURSIVE tree AS (
                 SELECT i.inhrelid AS child, i.inhparent AS parent, 1 AS depth
                 FROM pg_inherits i WHERE i.inhparent = $1::text::regclass
                 UNION ALL
                 SELECT i.inhrelid, i.inhparent, t.depth + 1
                 FROM pg_inherits i JOIN tree t ON i.inhparent = t.child)
             SELECT cn.nspname::text, c.relname::text, pg_get_expr(c.relpartbound, c.oid),
                    CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
                    pn.nspname::text, p.relname::text
             FROM tree
             JOIN pg_class c ON c.oid = tree.child JOIN pg_namespace cn ON cn.oid = c.relnamespace
             JOIN pg_class p ON p.oid = tree.parent JOIN pg_namespace pn ON pn.oid = p.relnamespace
             WHERE c.relkind IN ('r', 'p')
             ORDER BY tree.depth, c.relname",
            &[&rel],
        )
        .await
        .map_err(err("partitions"))?;
    Ok(rows
        .iter()
        .map(|r| PartitionDef {
            schema: r.get(0),
            name: r.get(1),
            bound: r.get(2),
            partition_key: r.get(3),
            parent_schema: r.get(4),
            parent_name: r.get(5),
        })
        .collect())
}
