//! The capture's objects on the source: the schema `walrelay_capture` (two log tables used
//! in turn, ticks, consumers, the table registry) and, per captured table, one trigger
//! function and its triggers. Installed idempotently at start, removed by `uninstall`.
//! The SQL of the functions and triggers is in `functions`.

use tokio_postgres::Client;

use super::super::pgoutput::setup::{Published, SelectedTable};
use super::super::pgoutput::SourceError;
use super::functions::{
    drop_functions, expected_triggers, filter_test, table_sql, FORMAT, OUTPUT_STABLE_TYPES,
    TRIGGERS,
};
use crate::ddl::capture::OWN_DDL;
use crate::pg::quote;
use crate::pg::PgError;

/// The schema the capture owns on the source.
pub const SCHEMA: &str = "walrelay_capture";
/// The channel the triggers notify so that an idle relay ticks without polling: only
/// while `walrelay_capture.wake` is 1. A relay with work polls instead and sets it to 0,
/// because PostgreSQL makes the commits of notifying transactions wait for each other.
pub const CHANNEL: &str = "walrelay_capture";

/// One advisory lock key for installing and removing, so two relays do not race.
const INSTALL_LOCK: i64 = 0x7761_6c72_6361_7074; // "walrcapt"

const SCHEMA_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS walrelay_capture;
REVOKE ALL ON SCHEMA walrelay_capture FROM PUBLIC;
-- The log the triggers write to now. A sequence, not a row: its value is read the same
-- by every transaction whatever its snapshot, so once it is switched no transaction that
-- has not yet read it writes to the old log.
CREATE SEQUENCE IF NOT EXISTS walrelay_capture.current_log MINVALUE 1 MAXVALUE 2 START 1;
CREATE TABLE IF NOT EXISTS walrelay_capture.state (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- A snapshot taken just after the last switch: every writer of the other log is
    -- below its xmax.
    switched_at pg_snapshot
);
INSERT INTO walrelay_capture.state DEFAULT VALUES ON CONFLICT DO NOTHING;
CREATE SEQUENCE IF NOT EXISTS walrelay_capture.log_seq;
-- 1 while a relay waits for notifications, 0 while relays poll (see CHANNEL).
CREATE SEQUENCE IF NOT EXISTS walrelay_capture.wake MINVALUE 0 MAXVALUE 1 START 0;
CREATE TABLE IF NOT EXISTS walrelay_capture.log_1 (
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq bigint NOT NULL DEFAULT nextval('walrelay_capture.log_seq'),
    tbl int NOT NULL,
    op "char" NOT NULL,
    new_row text,
    old_row text,
    -- The relay that wrote the change here (its apply sets walrelay.applied_by): left
    -- out by a relay with origin = "none", so two writable nodes do not loop.
    applied_by text DEFAULT nullif(pg_catalog.current_setting('walrelay.applied_by', true), '')
);
CREATE INDEX IF NOT EXISTS log_1_txid ON walrelay_capture.log_1 (txid);
CREATE TABLE IF NOT EXISTS walrelay_capture.log_2 (LIKE walrelay_capture.log_1 INCLUDING DEFAULTS);
CREATE INDEX IF NOT EXISTS log_2_txid ON walrelay_capture.log_2 (txid);
-- One entry per captured table and shape of it: the log's rows name the entry they were
-- written under, so rows logged before an ALTER TABLE still read with the columns they
-- have. The table's triggers log under its current entry.
CREATE TABLE IF NOT EXISTS walrelay_capture.tables (
    id serial PRIMARY KEY,
    relid oid NOT NULL,
    current boolean NOT NULL DEFAULT true,
    columns text[] NOT NULL,
    types oid[] NOT NULL,
    typmods int[] NOT NULL,
    type_names text[] NOT NULL,
    key text[] NOT NULL,
    -- The version of the generated functions: a newer walrelay makes them again.
    format int NOT NULL,
    -- The row filter (a set's `where`) the functions log through, if any.
    filter text
);
CREATE UNIQUE INDEX IF NOT EXISTS tables_current ON walrelay_capture.tables (relid) WHERE current;
CREATE TABLE IF NOT EXISTS walrelay_capture.ticks (
    id bigserial PRIMARY KEY,
    -- Each consumer ticks for itself, so its ticks' snapshots only grow.
    consumer text NOT NULL,
    snapshot pg_snapshot NOT NULL,
    lsn pg_lsn NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS walrelay_capture.consumers (
    name text PRIMARY KEY,
    tick bigint NOT NULL
);
"#;

/// A captured table as the registry knows it: its number in the log, and the columns the
/// log's rows carry (`columns` in full rows, `key` in old keys), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub id: i32,
    pub oid: walrelay_model::Oid,
    pub columns: Vec<String>,
    pub key: Vec<String>,
    /// The row filter the triggers log through (a set's `where`).
    pub filter: Option<String>,
    /// A column's text depends on output settings, which its functions then fix.
    pub output_settings: bool,
}

/// Create what is missing (the schema, then each table's function and triggers) and
/// return the registry entry of each of `tables`. A table whose columns changed since has
/// its function made again. Runs in one transaction under an advisory lock.
pub async fn install(
    client: &mut Client,
    tables: &[Published<'_>],
    consumer: &str,
) -> Result<Vec<Captured>, SourceError> {
    let err = |what: &'static str| {
        move |e| SourceError::Pg(PgError::from_sql(format!("trigger capture: {what}"), e))
    };
    let (tx, installed) = begin_locked(client)
        .await
        .map_err(err("starting the installation"))?;
    // Only what is missing: a restart under writes must not take locks on the log or
    // the tables (CREATE INDEX IF NOT EXISTS locks its table even when the index exists).
    if !installed {
        tx.batch_execute(SCHEMA_SQL).await.map_err(err(
            "creating the schema walrelay_capture (needs CREATE on the database)",
        ))?;
    } else if !schema_is_current(&tx)
        .await
        .map_err(err("reading the schema walrelay_capture"))?
    {
        return Err(SourceError::Setup(
            "the schema walrelay_capture was installed by another version of walrelay: \
             stop every relay of this source, run `walrelay uninstall --config FILE`, then start again \
             (a new log: changes made in between are not captured, so re-copy the targets' tables)"
                .into(),
        ));
    }
    let mut out = Vec::new();
    for &Published { table: t, filter } in tables {
        // Keyed by the primary key (or the replica identity index); without one, by the
        // whole row.
        let key = if t.primary_key.is_empty() {
            t.key.clone()
        } else {
            t.primary_key.clone()
        };
        let table = quote::qualified(&t.schema, &t.name);
        let types = column_types(&tx, t.oid, &t.columns)
            .await
            .map_err(err("reading the table's column types"))?;
        let found = tx
            .query_opt(
                "SELECT r.id, r.columns = $2 AND r.key = $3 AND r.format = $4
                        AND r.types = $7 AND r.typmods = $8
                        AND (SELECT count(*) FROM pg_trigger g
                              WHERE g.tgrelid = r.relid AND g.tgname::text = ANY ($5)) = $6,
                        r.filter
                   FROM walrelay_capture.tables r WHERE r.relid = $1 AND r.current",
                &[
                    &t.oid,
                    &t.columns,
                    &key,
                    &FORMAT,
                    &TRIGGERS.as_slice(),
                    &expected_triggers(!key.is_empty(), filter.is_some()),
                    &types.oids,
                    &types.typmods,
                ],
            )
            .await
            .map_err(err("reading the table registry"))?;
        let mut replaced = None;
        if let Some(row) = &found {
            let registered: Option<String> = row.get(2);
            if registered.as_deref() != filter {
                refuse_other_filter(&tx, t, registered.as_deref(), filter, consumer).await?;
            } else if row.get::<_, bool>(1) {
                out.push(Captured {
                    id: row.get(0),
                    oid: t.oid,
                    columns: t.columns.clone(),
                    key,
                    filter: filter.map(str::to_string),
                    output_settings: types.output_settings,
                });
                continue;
            }
            replaced = Some(row.get::<_, i32>(0));
        }
        if let Some(f) = filter {
            check_filter(&tx, t, &table, f).await?;
        }
        // The entry the table had stays for the rows logged under it.
        if let Some(old) = replaced {
            tx.execute(
                "UPDATE walrelay_capture.tables SET current = false WHERE id = $1",
                &[&old],
            )
            .await
            .map_err(err("retiring a table's entry"))?;
        }
        let row = tx
            .query_one(
                "INSERT INTO walrelay_capture.tables
                        (relid, columns, types, typmods, type_names, key, format, filter)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                &[
                    &t.oid,
                    &t.columns,
                    &types.oids,
                    &types.typmods,
                    &types.names,
                    &key,
                    &FORMAT,
                    &filter,
                ],
            )
            .await
            .map_err(err("registering a table"))?;
        let captured = Captured {
            id: row.get(0),
            oid: t.oid,
            columns: t.columns.clone(),
            key,
            filter: filter.map(str::to_string),
            output_settings: types.output_settings,
        };
        for statement in table_sql(&table, &captured) {
            tx.batch_execute(&statement).await.map_err(|e| {
                let denied = e.as_db_error().is_some_and(|db| {
                    db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE
                });
                let what = if denied {
                    format!("trigger capture: creating triggers on {} needs its owner or the TRIGGER privilege on it", t.qualified_name())
                } else {
                    format!("trigger capture: creating triggers on {}", t.qualified_name())
                };
                SourceError::Pg(PgError::from_sql(what, e))
            })?;
        }
        if let Some(old) = replaced {
            tx.batch_execute(&drop_functions(old))
                .await
                .map_err(err("dropping a table's earlier functions"))?;
        }
        out.push(captured);
    }
    forget_retired_entries(&tx)
        .await
        .map_err(err("forgetting table entries the log no longer holds"))?;
    tx.commit()
        .await
        .map_err(err("committing the installation"))?;
    Ok(out)
}

/// The installed schema has what this version uses (its newest additions).
pub async fn schema_is_current(
    client: &impl tokio_postgres::GenericClient,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT to_regclass('walrelay_capture.wake') IS NOT NULL
                AND EXISTS (SELECT FROM pg_attribute
                             WHERE attrelid = to_regclass('walrelay_capture.tables') AND attname = 'current')",
            &[],
        )
        .await?
        .get(0))
}

/// The types of `columns` of table `oid`, in order, as the registry keeps them.
struct ColumnTypes {
    oids: Vec<walrelay_model::Oid>,
    typmods: Vec<i32>,
    /// As pgoutput names them: `int4` in pg_catalog, `schema.name` elsewhere.
    names: Vec<String>,
    /// Some column's text depends on output settings (a type, or a type inside it, that
    /// is not in `OUTPUT_STABLE_TYPES`).
    output_settings: bool,
}

async fn column_types(
    tx: &tokio_postgres::Transaction<'_>,
    oid: walrelay_model::Oid,
    columns: &[String],
) -> Result<ColumnTypes, tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT a.atttypid, a.atttypmod,
                    CASE WHEN tn.nspname = 'pg_catalog' THEN t.typname::text
                         ELSE tn.nspname || '.' || t.typname END
               FROM unnest($2::text[]) WITH ORDINALITY AS u(col, i)
               JOIN pg_attribute a ON a.attrelid = $1 AND a.attname = u.col
               JOIN pg_type t ON t.oid = a.atttypid
               JOIN pg_namespace tn ON tn.oid = t.typnamespace
              ORDER BY u.i",
            &[&oid, &columns],
        )
        .await?;
    let oids: Vec<walrelay_model::Oid> = rows.iter().map(|r| r.get(0)).collect();
    // Down through domains, arrays, ranges and composite types to the types that print.
    let output_settings: bool = tx
        .query_one(
            "WITH RECURSIVE t(oid) AS (
                 SELECT unnest($1::oid[])
               UNION
                 SELECT inner_type.oid
                   FROM t JOIN pg_type ty ON ty.oid = t.oid
                  CROSS JOIN LATERAL (
                        SELECT ty.typbasetype WHERE ty.typtype = 'd'
                        UNION ALL SELECT ty.typelem WHERE ty.typcategory = 'A' AND ty.typelem <> 0
                        UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid
                        UNION ALL SELECT a.atttypid FROM pg_attribute a
                                   WHERE ty.typtype = 'c' AND a.attrelid = ty.typrelid
                                     AND a.attnum > 0 AND NOT a.attisdropped
                  ) inner_type(oid))
             SELECT coalesce(bool_or(NOT (ty.typtype IN ('d', 'c', 'r', 'e')
                                         OR (ty.typcategory = 'A' AND ty.typelem <> 0)
                                         OR ty.oid = ANY ($2))), false)
               FROM t JOIN pg_type ty ON ty.oid = t.oid",
            &[&oids, &OUTPUT_STABLE_TYPES.as_slice()],
        )
        .await?
        .get(0);
    Ok(ColumnTypes {
        oids,
        typmods: rows.iter().map(|r| r.get(1)).collect(),
        names: rows.iter().map(|r| r.get(2)).collect(),
        output_settings,
    })
}

/// Earlier entries of altered tables, once no consumer can read a row logged under them:
/// the log holds none (rotation empties it behind every consumer).
async fn forget_retired_entries(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "DELETE FROM walrelay_capture.tables r
          WHERE NOT r.current
            AND NOT EXISTS (SELECT FROM walrelay_capture.log_1 l WHERE l.tbl = r.id)
            AND NOT EXISTS (SELECT FROM walrelay_capture.log_2 l WHERE l.tbl = r.id)",
        &[],
    )
    .await?;
    Ok(())
}

/// A table's row filter lives in its trigger, which every consumer of the log shares: a
/// relay may change it only while no other consumer reads the log.
async fn refuse_other_filter(
    tx: &tokio_postgres::Transaction<'_>,
    t: &SelectedTable,
    registered: Option<&str>,
    filter: Option<&str>,
    consumer: &str,
) -> Result<(), SourceError> {
    let others: Vec<String> = tx
        .query(
            "SELECT name FROM walrelay_capture.consumers WHERE name <> $1 ORDER BY name",
            &[&consumer],
        )
        .await
        .map_err(|e| {
            SourceError::Pg(PgError::from_sql(
                "trigger capture: reading the consumers",
                e,
            ))
        })?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    let say = |f: Option<&str>| f.map_or("no row filter".to_string(), |f| format!("where = {f:?}"));
    Err(SourceError::Setup(format!(
        "table {} is captured with {} for the log's other consumer(s) {}, and this relay asks for {}: \
         trigger capture filters rows in the table's trigger, which all consumers share; give every \
         relay on this source the same filter for it, or filter on the target",
        t.qualified_name(),
        say(registered),
        others.join(", "),
        say(filter),
    )))
}

/// Try a row filter on the table before a trigger runs it: a filter the server cannot
/// evaluate must stop this relay, not every write to the table.
async fn check_filter(
    tx: &tokio_postgres::Transaction<'_>,
    t: &SelectedTable,
    table: &str,
    filter: &str,
) -> Result<(), SourceError> {
    tx.batch_execute(&format!(
        // Under the triggers' search_path: a function outside pg_catalog needs its schema.
        "SAVEPOINT check_filter; SET LOCAL search_path = pg_catalog, pg_temp;
         SELECT {} FROM ONLY {table} r LIMIT 0;
         ROLLBACK TO SAVEPOINT check_filter; RELEASE SAVEPOINT check_filter",
        filter_test(filter)
    ))
    .await
    .map_err(|e| {
        let why = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_string());
        SourceError::Setup(format!(
            "the row filter (where = {filter:?}) of table {} does not evaluate on its rows: {why} \
             (trigger capture evaluates it on the table's unqualified columns, with search_path = pg_catalog)",
            t.qualified_name()
        ))
    })
}

/// A transaction for installing or removing: not captured as DDL, after any other
/// installation (an advisory lock), and whether the capture's tables exist.
async fn begin_locked(
    client: &mut Client,
) -> Result<(tokio_postgres::Transaction<'_>, bool), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(OWN_DDL).await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSTALL_LOCK])
        .await?;
    let installed: bool = tx
        .query_one(
            "SELECT to_regclass('walrelay_capture.tables') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    Ok((tx, installed))
}

/// What `uninstall` removed.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    Nothing,
    /// The triggers of this many tables, and the schema.
    Tables(usize),
}

/// Remove every object the capture created: the triggers on the registered tables that
/// still exist, then the schema's own objects and the schema. Something a user put in the
/// schema stops it with an error rather than being dropped; so does a relay capturing
/// now (it holds its consumer's lock).
pub async fn uninstall(client: &mut Client) -> Result<Removed, SourceError> {
    let err = |what: &'static str| {
        move |e| {
            SourceError::Pg(PgError::from_sql(
                format!("uninstalling trigger capture: {what}"),
                e,
            ))
        }
    };
    let (tx, installed) = begin_locked(client).await.map_err(err("starting"))?;
    if !installed {
        let schema_left: bool = tx
            .query_one(
                "SELECT to_regnamespace('walrelay_capture') IS NOT NULL",
                &[],
            )
            .await
            .map_err(err("looking for the schema"))?
            .get(0);
        if schema_left {
            tx.batch_execute("DROP SCHEMA walrelay_capture")
                .await
                .map_err(err("dropping the schema walrelay_capture"))?;
        }
        tx.commit().await.map_err(err("committing"))?;
        return Ok(if schema_left {
            Removed::Tables(0)
        } else {
            Removed::Nothing
        });
    }
    let capturing: Option<String> = tx
        .query_one(
            "SELECT string_agg(pid::text, ', ') FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND classid::int = hashtext('walrelay_capture')",
            &[],
        )
        .await
        .map_err(err("looking for a running relay"))?
        .get(0);
    if let Some(pids) = capturing {
        return Err(SourceError::Setup(format!(
            "a walrelay is capturing from this database (server process {pids}): stop it before uninstalling"
        )));
    }
    // Found by their names and functions rather than by the registry, so that an
    // installation by another version of walrelay is removed as well.
    let tables = tx
        .query(
            "SELECT DISTINCT g.tgrelid::regclass::text
               FROM pg_trigger g JOIN pg_proc p ON p.oid = g.tgfoid
              WHERE g.tgname::text = ANY ($1) AND p.pronamespace = 'walrelay_capture'::regnamespace",
            &[&TRIGGERS.as_slice()],
        )
        .await
        .map_err(err("listing the captured tables"))?;
    for row in &tables {
        let table: String = row.get(0);
        for name in TRIGGERS {
            tx.batch_execute(&format!("DROP TRIGGER IF EXISTS {name} ON {table}"))
                .await
                .map_err(err("dropping a trigger"))?;
        }
    }
    let functions = tx
        .query(
            "SELECT oid::regprocedure::text FROM pg_proc
              WHERE pronamespace = 'walrelay_capture'::regnamespace AND proname::text LIKE 'capture%'",
            &[],
        )
        .await
        .map_err(err("listing the trigger functions"))?;
    for row in &functions {
        tx.batch_execute(&format!("DROP FUNCTION {}", row.get::<_, String>(0)))
            .await
            .map_err(err("dropping a trigger function"))?;
    }
    let with_triggers = tables.len();
    tx.batch_execute(
        // IF EXISTS: another version may have made fewer of them.
        "DROP TABLE IF EXISTS walrelay_capture.log_1, walrelay_capture.log_2, walrelay_capture.tables,
                    walrelay_capture.ticks, walrelay_capture.consumers, walrelay_capture.state;
         DROP SEQUENCE IF EXISTS walrelay_capture.log_seq, walrelay_capture.current_log,
                    walrelay_capture.wake;
         DROP SCHEMA walrelay_capture",
    )
    .await
    .map_err(err(
        "dropping the schema walrelay_capture (an object someone else created there stops it: move or drop it)",
    ))?;
    tx.commit().await.map_err(err("committing"))?;
    Ok(Removed::Tables(with_triggers))
}
