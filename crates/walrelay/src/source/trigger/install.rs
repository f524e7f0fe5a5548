//! The capture's objects on the source: the schema `walrelay_capture` (two log tables used
//! in turn, ticks, consumers, the table registry) and, per captured table, one trigger
//! function and its triggers. Installed idempotently at start, removed by `uninstall`.
//!
//! Triggers are per statement with transition tables: one `INSERT … SELECT` per statement
//! writes all its rows to the log, which costs a fraction of a row trigger's call per row
//! (the W3 update of 5,000,000 rows). A row is logged as its text form (`ROW(…)::text`),
//! each value in its type's output format, exactly as the server prints it. Updates that
//! change a key are logged once more by a row trigger that fires only for them (`WHEN`,
//! checked without a function call), with the old key: it runs before the statement's
//! trigger, so the reader pairs the two. Tables without a primary key are logged by row
//! triggers with the whole old row.
//!
//! The functions are `SECURITY DEFINER` (the installing role owns the log; the writing
//! roles need no grant) with a fixed `search_path`; every name in them is quoted.

use tokio_postgres::Client;

use super::super::pgoutput::setup::SelectedTable;
use super::super::pgoutput::SourceError;
use crate::ddl::capture::OWN_DDL;
use crate::pg::quote;
use crate::pg::PgError;

/// The schema the capture owns on the source.
pub const SCHEMA: &str = "walrelay_capture";
/// The channel the triggers notify (once per writing transaction: PostgreSQL folds equal
/// notifications) so the relay ticks without polling.
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
CREATE TABLE IF NOT EXISTS walrelay_capture.log_1 (
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq bigint NOT NULL DEFAULT nextval('walrelay_capture.log_seq'),
    tbl int NOT NULL,
    op "char" NOT NULL,
    new_row text,
    old_row text
);
CREATE INDEX IF NOT EXISTS log_1_txid ON walrelay_capture.log_1 (txid);
CREATE TABLE IF NOT EXISTS walrelay_capture.log_2 (LIKE walrelay_capture.log_1 INCLUDING DEFAULTS);
CREATE INDEX IF NOT EXISTS log_2_txid ON walrelay_capture.log_2 (txid);
CREATE TABLE IF NOT EXISTS walrelay_capture.tables (
    id serial PRIMARY KEY,
    relid oid NOT NULL UNIQUE,
    columns text[] NOT NULL,
    key text[] NOT NULL,
    -- The version of the generated functions: a newer walrelay makes them again.
    format int NOT NULL
);
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
}

/// Create what is missing (the schema, then each table's function and triggers) and
/// return the registry entry of each of `tables`. A table whose columns changed since has
/// its function made again. Runs in one transaction under an advisory lock.
pub async fn install(
    client: &mut Client,
    tables: &[SelectedTable],
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
    }
    let mut out = Vec::new();
    for t in tables {
        // Keyed by the primary key (or the replica identity index); without one, by the
        // whole row.
        let key = if t.primary_key.is_empty() {
            t.key.clone()
        } else {
            t.primary_key.clone()
        };
        let found = tx
            .query_opt(
                "SELECT r.id, r.columns = $2 AND r.key = $3 AND r.format = $4
                        AND (SELECT count(*) FROM pg_trigger g
                              WHERE g.tgrelid = r.relid AND g.tgname::text = ANY ($5)) = $6
                   FROM walrelay_capture.tables r WHERE r.relid = $1",
                &[
                    &t.oid,
                    &t.columns,
                    &key,
                    &FORMAT,
                    &TRIGGERS.as_slice(),
                    &expected_triggers(!key.is_empty()),
                ],
            )
            .await
            .map_err(err("reading the table registry"))?;
        if let Some(row) = &found {
            if row.get::<_, bool>(1) {
                out.push(Captured {
                    id: row.get(0),
                    oid: t.oid,
                    columns: t.columns.clone(),
                    key,
                });
                continue;
            }
        }
        let row = tx
            .query_one(
                "INSERT INTO walrelay_capture.tables (relid, columns, key, format) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (relid) DO UPDATE
                    SET columns = EXCLUDED.columns, key = EXCLUDED.key, format = EXCLUDED.format
                 RETURNING id",
                &[&t.oid, &t.columns, &key, &FORMAT],
            )
            .await
            .map_err(err("registering a table"))?;
        let captured = Captured {
            id: row.get(0),
            oid: t.oid,
            columns: t.columns.clone(),
            key,
        };
        let table = quote::qualified(&t.schema, &t.name);
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
        out.push(captured);
    }
    tx.commit()
        .await
        .map_err(err("committing the installation"))?;
    Ok(out)
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

/// Trigger names on a captured table (one per event: PostgreSQL takes transition tables only
/// on single-event triggers).
const TRIGGERS: [&str; 5] = [
    "walrelay_capture_insert",
    "walrelay_capture_update",
    "walrelay_capture_delete",
    "walrelay_capture_truncate",
    "walrelay_capture_row",
];

/// The version of the generated functions and triggers; raise it when `table_sql` changes
/// what it makes, so that a new walrelay makes them again.
const FORMAT: i32 = 1;

/// How many of `TRIGGERS` a table has: statement triggers for insert, update, delete and
/// truncate and the key-change row trigger; without a key, the update and delete
/// statement triggers are replaced by the row trigger.
fn expected_triggers(keyed: bool) -> i64 {
    if keyed {
        5
    } else {
        3
    }
}

fn function_name(id: i32) -> String {
    format!("{SCHEMA}.capture_{id}")
}

fn row_function_name(id: i32) -> String {
    format!("{SCHEMA}.capture_row_{id}")
}

/// `ROW(alias.c1, alias.c2, …)::text`, the columns quoted.
fn row_text(alias: &str, columns: &[String]) -> String {
    let cols: Vec<String> = columns
        .iter()
        .map(|c| format!("{alias}.{}", quote::ident(c)))
        .collect();
    // ROW() of one column prints as `(v)`, the same as a record of one field.
    format!("ROW({})::text", cols.join(", "))
}

/// One `INSERT` into each log for `op`, chosen by the current log number in `log`.
fn log_insert(id: i32, op: char, new_row: &str, old_row: &str, from: &str) -> String {
    let insert = |n: u8| {
        format!(
            "INSERT INTO {SCHEMA}.log_{n} (tbl, op, new_row, old_row) SELECT {id}, '{op}', {new_row}, {old_row}{from};"
        )
    };
    format!("IF log = 1 THEN {} ELSE {} END IF;", insert(1), insert(2))
}

/// The settings the functions run under: a fixed `search_path`, and the output formats
/// the values are printed in, whatever the writing session set (a writer's `DateStyle =
/// 'SQL, DMY'` or `TimeZone` must not change what the log says).
const OUTPUT_SETTINGS: &str = "SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO, MDY' \
     SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = 3 \
     SET bytea_output = 'hex'";

/// The statements that (re)create one table's function and triggers.
pub fn table_sql(table: &str, c: &Captured) -> Vec<String> {
    let keyed = !c.key.is_empty();
    let new_rows = row_text("n", &c.columns);
    let old_key = row_text("o", &c.key);
    let statement_body = format!(
        "DECLARE log int;
BEGIN
  SELECT last_value INTO log FROM {SCHEMA}.current_log;
  IF TG_OP = 'INSERT' THEN
    {insert}
  ELSIF TG_OP = 'UPDATE' THEN
    {update}
  ELSIF TG_OP = 'DELETE' THEN
    {delete}
  ELSE
    {truncate}
  END IF;
  PERFORM pg_notify({channel}, '');
  RETURN NULL;
END",
        insert = log_insert(c.id, 'I', &new_rows, "NULL", " FROM new_rows n"),
        update = log_insert(c.id, 'U', &new_rows, "NULL", " FROM new_rows n"),
        delete = log_insert(c.id, 'D', "NULL", &old_key, " FROM old_rows o"),
        truncate = log_insert(c.id, 'T', "NULL", "NULL", ""),
        channel = quote::literal(CHANNEL),
    );
    // Row triggers: a key change (keyed tables), or every update and delete with the whole
    // old row (tables without a key).
    let row_body = format!(
        "DECLARE log int;
BEGIN
  SELECT last_value INTO log FROM {SCHEMA}.current_log;
  IF TG_OP = 'UPDATE' THEN
    {update}
  ELSE
    {delete}
  END IF;
  PERFORM pg_notify({channel}, '');
  RETURN NULL;
END",
        update = log_insert(
            c.id,
            if keyed { 'K' } else { 'U' },
            &row_text("NEW", &c.columns),
            &row_text("OLD", if keyed { &c.key } else { &c.columns }),
            ""
        ),
        delete = log_insert(c.id, 'D', "NULL", &row_text("OLD", &c.columns), ""),
        channel = quote::literal(CHANNEL),
    );
    let function = |name: &str, body: &str| {
        format!(
            "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {OUTPUT_SETTINGS} AS {}",
            quote::literal(body)
        )
    };
    let mut out = vec![
        function(&function_name(c.id), &statement_body),
        function(&row_function_name(c.id), &row_body),
    ];
    for name in TRIGGERS {
        out.push(format!("DROP TRIGGER IF EXISTS {name} ON {table}"));
    }
    let statement_trigger = |name: &str, event: &str, referencing: &str| {
        format!(
            "CREATE TRIGGER {name} AFTER {event} ON {table} {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {}()",
            function_name(c.id)
        )
    };
    out.push(statement_trigger(
        TRIGGERS[0],
        "INSERT",
        "REFERENCING NEW TABLE AS new_rows",
    ));
    out.push(statement_trigger(TRIGGERS[3], "TRUNCATE", ""));
    if keyed {
        out.push(statement_trigger(
            TRIGGERS[1],
            "UPDATE",
            "REFERENCING NEW TABLE AS new_rows",
        ));
        out.push(statement_trigger(
            TRIGGERS[2],
            "DELETE",
            "REFERENCING OLD TABLE AS old_rows",
        ));
        let changed: Vec<String> = c
            .key
            .iter()
            .map(|k| {
                let k = quote::ident(k);
                format!("OLD.{k} IS DISTINCT FROM NEW.{k}")
            })
            .collect();
        out.push(format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {table} FOR EACH ROW WHEN ({}) EXECUTE FUNCTION {}()",
            TRIGGERS[4],
            changed.join(" OR "),
            row_function_name(c.id)
        ));
    } else {
        out.push(format!(
            "CREATE TRIGGER {} AFTER UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION {}()",
            TRIGGERS[4],
            row_function_name(c.id)
        ));
    }
    out
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
    let tables = tx
        .query(
            "SELECT t.id, quote_ident(n.nspname) || '.' || quote_ident(c.relname)
               FROM walrelay_capture.tables t
               LEFT JOIN pg_class c ON c.oid = t.relid
               LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY t.id",
            &[],
        )
        .await
        .map_err(err("listing the captured tables"))?;
    let mut with_triggers = 0;
    for row in &tables {
        let id: i32 = row.get(0);
        if let Some(table) = row.get::<_, Option<String>>(1) {
            for name in TRIGGERS {
                tx.batch_execute(&format!("DROP TRIGGER IF EXISTS {name} ON {table}"))
                    .await
                    .map_err(err("dropping a trigger"))?;
            }
            with_triggers += 1;
        }
        tx.batch_execute(&format!(
            "DROP FUNCTION IF EXISTS {}(); DROP FUNCTION IF EXISTS {}();",
            function_name(id),
            row_function_name(id)
        ))
        .await
        .map_err(err("dropping a trigger function"))?;
    }
    tx.batch_execute(
        "DROP TABLE walrelay_capture.log_1, walrelay_capture.log_2, walrelay_capture.tables,
                    walrelay_capture.ticks, walrelay_capture.consumers, walrelay_capture.state;
         DROP SEQUENCE walrelay_capture.log_seq, walrelay_capture.current_log;
         DROP SCHEMA walrelay_capture",
    )
    .await
    .map_err(err(
        "dropping the schema walrelay_capture (an object someone else created there stops it: move or drop it)",
    ))?;
    tx.commit().await.map_err(err("committing"))?;
    Ok(Removed::Tables(with_triggers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_in_the_table_sql_is_quoted() {
        let c = Captured {
            id: 7,
            oid: 1,
            columns: vec!["id".into(), "a\"; drop table x; --".into(), "it's".into()],
            key: vec!["id".into()],
        };
        let table = quote::qualified("odd schema", "a\"; drop table x; --");
        let sql = table_sql(&table, &c).join("\n");
        assert!(
            sql.contains("ON \"odd schema\".\"a\"\"; drop table x; --\""),
            "{sql}"
        );
        // In the function bodies (literals) a column's name is quoted, its single quotes
        // doubled once more.
        assert!(sql.contains("n.\"a\"\"; drop table x; --\""), "{sql}");
        assert!(sql.contains("n.\"it''s\""), "{sql}");
        assert!(
            sql.contains("WHEN (OLD.\"id\" IS DISTINCT FROM NEW.\"id\")"),
            "{sql}"
        );
    }

    #[test]
    fn tables_without_a_key_log_whole_rows_by_row_triggers() {
        let c = Captured {
            id: 3,
            oid: 1,
            columns: vec!["a".into(), "b".into()],
            key: vec![],
        };
        let sql = table_sql("public.t", &c).join("\n");
        assert!(
            sql.contains("AFTER UPDATE OR DELETE ON public.t FOR EACH ROW"),
            "{sql}"
        );
        assert!(
            !sql.contains("walrelay_capture_update AFTER UPDATE"),
            "{sql}"
        );
    }
}
