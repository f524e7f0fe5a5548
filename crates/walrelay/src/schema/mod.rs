//! Target schema: read a replicated table's definition from the source catalog, create it
//! on the target when missing (types, sequences, columns, partitions first; primary key,
//! indexes and constraints after the data is in), or check that an existing target table
//! has compatible columns.

pub mod catalog;
pub mod ddl;

use tokio_postgres::Client;

pub use catalog::TableDef;

use crate::pg::{quote, PgError};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("target table {table}: {message}")]
    Incompatible { table: String, message: String },
    #[error("creating {what} on the target: {error}")]
    Create { what: String, error: PgError },
}

/// What the target had of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetTable {
    /// walrelay created it now; its keys, indexes and constraints come after the data.
    Created,
    /// It existed, with compatible columns.
    Existing,
}

async fn run(target: &Client, sql: &str, what: &str) -> Result<(), SchemaError> {
    target
        .batch_execute(sql)
        .await
        .map_err(|e| SchemaError::Create {
            what: what.to_string(),
            error: PgError::from_sql(sql.chars().take(80).collect::<String>(), e),
        })
}

/// Create `def` on the target if it is missing, or check the existing table.
pub async fn prepare_target(target: &Client, def: &TableDef) -> Result<TargetTable, SchemaError> {
    let table = def.qualified();
    let exists: bool = target
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(|e| PgError::from_sql("looking up a target table", e))?
        .get(0);
    if exists {
        check_compatible(target, def).await?;
        return Ok(TargetTable::Existing);
    }
    run(
        target,
        &format!("CREATE SCHEMA IF NOT EXISTS {}", quote::ident(&def.schema)),
        "schema",
    )
    .await?;
    for t in &def.types {
        let present: bool = target
            .query_one("SELECT to_regtype($1) IS NOT NULL", &[&t.name()])
            .await
            .map_err(|e| PgError::from_sql("looking up a target type", e))?
            .get(0);
        if present {
            continue;
        }
        match ddl::create_type(t) {
            Some(sql) => {
                if let Some(schema) = ddl::schema_of(t.name()) {
                    run(
                        target,
                        &format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
                        "schema",
                    )
                    .await?;
                }
                run(target, &sql, &format!("type {}", t.name())).await?;
            }
            None => {
                let extension = match t {
                    catalog::TypeDef::Extension { extension, .. } => extension.as_str(),
                    _ => "?",
                };
                return Err(SchemaError::Incompatible {
                    table: def.shown(),
                    message: format!(
                        "column type {} comes from extension {extension}: CREATE EXTENSION it on the target first",
                        t.name()
                    ),
                });
            }
        }
    }
    for s in &def.sequences {
        if let Some(sql) = ddl::create_sequence(s) {
            let present: bool = target
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&s.name])
                .await
                .map_err(|e| PgError::from_sql("looking up a target sequence", e))?
                .get(0);
            if !present {
                run(target, &sql, &format!("sequence {}", s.name)).await?;
            }
        }
    }
    run(target, &ddl::create_table(def), &format!("table {table}")).await?;
    for p in &def.partitions {
        run(
            target,
            &format!("CREATE SCHEMA IF NOT EXISTS {}", quote::ident(&p.schema)),
            "schema",
        )
        .await?;
        run(
            target,
            &ddl::create_partition(p),
            &format!("partition {}.{}", p.schema, p.name),
        )
        .await?;
    }
    for column in &def.dropped_defaults {
        tracing::warn!(
            table = %table,
            column = %column,
            "the source's default for this column calls functions the target may lack; created without it"
        );
    }
    Ok(TargetTable::Created)
}

/// After the data: primary key, indexes, constraints, sequence values.
pub async fn finish_target(target: &Client, def: &TableDef) -> Result<(), SchemaError> {
    for sql in ddl::finish_table(def) {
        run(
            target,
            &sql,
            &format!("keys and indexes of {}", def.qualified()),
        )
        .await?;
    }
    Ok(())
}

/// The target table must have every data column of the source with the same type, and
/// every extra column must be able to stay empty (nullable, or with a default).
async fn check_compatible(target: &Client, def: &TableDef) -> Result<(), SchemaError> {
    let qualified = def.qualified();
    let table = def.shown();
    let rows = target
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''
             FROM pg_attribute a
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            &[&qualified],
        )
        .await
        .map_err(|e| PgError::from_sql("reading a target table's columns", e))?;
    let target_cols: Vec<(String, String, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    for c in def.data_columns() {
        match target_cols.iter().find(|(n, ..)| *n == c.name) {
            None => {
                return Err(SchemaError::Incompatible {
                    table,
                    message: format!(
                        "has no column {} (the source's is {})",
                        quote::ident(&c.name),
                        c.type_sql
                    ),
                })
            }
            Some((_, t, ..)) if *t != c.type_sql => {
                return Err(SchemaError::Incompatible {
                    table,
                    message: format!(
                        "column {} is {t} on the target but {} on the source",
                        quote::ident(&c.name),
                        c.type_sql
                    ),
                })
            }
            _ => {}
        }
    }
    for (name, _, not_null, has_default) in &target_cols {
        let from_source = def.data_columns().any(|c| c.name == *name);
        if !from_source && *not_null && !has_default {
            return Err(SchemaError::Incompatible {
                table,
                message: format!(
                    "column {} is NOT NULL without a default, and the source has no such column to fill it",
                    quote::ident(name)
                ),
            });
        }
    }
    Ok(())
}

/// Prepare a target session for schema work: names resolved only when qualified; writes
/// allowed where a migration keeps the database read-only for everyone else.
pub async fn prepare_target_session(target: &Client) -> Result<(), PgError> {
    catalog::prepare_session(target).await?;
    target
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(|e| PgError::from_sql("setting up the target session", e))
}
