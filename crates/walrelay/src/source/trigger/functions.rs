//! The SQL of one captured table's trigger functions and triggers, generated from its
//! registry entry.
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

use super::install::{Captured, CHANNEL, SCHEMA};
use crate::pg::quote;

/// Drops the two functions of registry entry `id`.
pub fn drop_functions(id: i32) -> String {
    format!(
        "DROP FUNCTION IF EXISTS {}(); DROP FUNCTION IF EXISTS {}();",
        function_name(id),
        row_function_name(id)
    )
}

/// A row filter as a boolean: a NULL result leaves the row out, as PostgreSQL's row
/// filters do.
pub fn filter_test(filter: &str) -> String {
    format!("coalesce(({filter}), false)")
}

/// Trigger names on a captured table (one per event: PostgreSQL takes transition tables only
/// on single-event triggers).
pub const TRIGGERS: [&str; 5] = [
    "walrelay_capture_insert",
    "walrelay_capture_update",
    "walrelay_capture_delete",
    "walrelay_capture_truncate",
    "walrelay_capture_row",
];

/// The version of the generated functions and triggers; raise it when `table_sql` changes
/// what it makes, so that a new walrelay makes them again.
pub const FORMAT: i32 = 2;

/// How many of `TRIGGERS` a table has: statement triggers for insert, update, delete and
/// truncate and the key-change row trigger; without a key, the update and delete
/// statement triggers are replaced by the row trigger; with a row filter, the update
/// statement trigger is.
pub fn expected_triggers(keyed: bool, filtered: bool) -> i64 {
    match (keyed, filtered) {
        (true, false) => 5,
        (true, true) => 4,
        (false, _) => 3,
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

/// Every function runs with a fixed `search_path`: it runs as its owner, for writers who
/// could otherwise put their own functions or operators in its way.
const SEARCH_PATH: &str = "SET search_path = pg_catalog, pg_temp";

/// The output formats values are printed in, whatever the writing session set (a
/// writer's `DateStyle = 'SQL, DMY'` or `TimeZone` must not change what the log says).
/// Only for tables with a column whose text depends on them: setting them on every call
/// costs writers about 5 % of their throughput.
const OUTPUT_SETTINGS: &str = "SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres' \
     SET TimeZone = 'UTC' SET extra_float_digits = 3 SET bytea_output = 'hex'";

/// Types whose text output no setting changes (`Captured::output_settings` is false for a
/// table whose columns are of these, their arrays, domains over them, or enums): bool,
/// "char", name, int8, int2, int4, text, oid, xid, json, macaddr8, cidr, macaddr, inet,
/// bpchar, varchar, bit, varbit, numeric, uuid, pg_lsn, jsonb, xid8.
pub const OUTPUT_STABLE_TYPES: [walrelay_model::Oid; 23] = [
    16, 18, 19, 20, 21, 23, 25, 26, 28, 114, 774, 650, 829, 869, 1042, 1043, 1560, 1562, 1700,
    2950, 3220, 3802, 5069,
];

/// Reads the current log and whether to notify, at the top of every function.
fn read_state() -> String {
    format!(
        "SELECT c.last_value, w.last_value INTO log, wake
     FROM {SCHEMA}.current_log c, {SCHEMA}.wake w;"
    )
}

/// Wakes an idle relay, at the end of every function that logged.
fn notify() -> String {
    format!(
        "IF wake = 1 THEN PERFORM pg_notify({}, ''); END IF;",
        quote::literal(CHANNEL)
    )
}

/// The statements that (re)create one table's function and triggers.
pub fn table_sql(table: &str, c: &Captured) -> Vec<String> {
    let keyed = !c.key.is_empty();
    let new_rows = row_text("n", &c.columns);
    let old_key = row_text("o", &c.key);
    // A row filter's column names are the table's, unqualified: each SELECT below reads
    // one row source, and `use_column` keeps a column named like a variable (`log`) a
    // column.
    let only = |alias: &str| match &c.filter {
        Some(f) => format!(" FROM {alias} WHERE {}", filter_test(f)),
        None => format!(" FROM {alias}"),
    };
    let statement_body = format!(
        "#variable_conflict use_column
DECLARE log int; wake int;
BEGIN
  {read_state}
  IF TG_OP = 'INSERT' THEN
    {insert}
  ELSIF TG_OP = 'UPDATE' THEN
    {update}
  ELSIF TG_OP = 'DELETE' THEN
    {delete}
  ELSE
    {truncate}
  END IF;
  {notify}
  RETURN NULL;
END",
        read_state = read_state(),
        insert = log_insert(c.id, 'I', &new_rows, "NULL", &only("new_rows n")),
        update = log_insert(c.id, 'U', &new_rows, "NULL", " FROM new_rows n"),
        delete = log_insert(c.id, 'D', "NULL", &old_key, &only("old_rows o")),
        truncate = log_insert(c.id, 'T', "NULL", "NULL", ""),
        notify = notify(),
    );
    let old_kept = if keyed { &c.key } else { &c.columns };
    let row_body = match &c.filter {
        None => row_trigger_body(c, keyed, old_kept),
        Some(f) => filtered_row_trigger_body(c, old_kept, f),
    };
    let settings = if c.output_settings {
        format!("{SEARCH_PATH} {OUTPUT_SETTINGS}")
    } else {
        SEARCH_PATH.to_string()
    };
    let function = |name: &str, body: &str| {
        format!(
            "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER {settings} AS {}",
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
    let row_trigger = |events: &str, when: &str| {
        format!(
            "CREATE TRIGGER {} AFTER {events} ON {table} FOR EACH ROW {when}EXECUTE FUNCTION {}()",
            TRIGGERS[4],
            row_function_name(c.id)
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
            TRIGGERS[2],
            "DELETE",
            "REFERENCING OLD TABLE AS old_rows",
        ));
        if c.filter.is_some() {
            // Whether an update is in the filter depends on the old row and the new one
            // together, which only a row trigger sees.
            out.push(row_trigger("UPDATE", ""));
        } else {
            out.push(statement_trigger(
                TRIGGERS[1],
                "UPDATE",
                "REFERENCING NEW TABLE AS new_rows",
            ));
            out.push(row_trigger(
                "UPDATE",
                &format!("WHEN ({}) ", key_changed(&c.key)),
            ));
        }
    } else {
        out.push(row_trigger("UPDATE OR DELETE", ""));
    }
    out
}

/// `OLD.k1 IS DISTINCT FROM NEW.k1 OR …`, the key's columns quoted.
fn key_changed(key: &[String]) -> String {
    let changed: Vec<String> = key
        .iter()
        .map(|k| {
            let k = quote::ident(k);
            format!("OLD.{k} IS DISTINCT FROM NEW.{k}")
        })
        .collect();
    changed.join(" OR ")
}

/// The row trigger without a row filter: a key change (keyed tables: the new row and the
/// old key), or every update and delete with the whole old row (tables without a key).
fn row_trigger_body(c: &Captured, keyed: bool, old_kept: &[String]) -> String {
    format!(
        "DECLARE log int; wake int;
BEGIN
  {read_state}
  IF TG_OP = 'UPDATE' THEN
    {update}
  ELSE
    {delete}
  END IF;
  {notify}
  RETURN NULL;
END",
        read_state = read_state(),
        update = log_insert(
            c.id,
            if keyed { 'K' } else { 'U' },
            &row_text("NEW", &c.columns),
            &row_text("OLD", old_kept),
            ""
        ),
        delete = log_insert(c.id, 'D', "NULL", &row_text("OLD", &c.columns), ""),
        notify = notify(),
    )
}

/// The row trigger of a table with a row filter, as PostgreSQL's row filters decide: an
/// update whose old and new rows both pass is an update, one whose new row alone passes
/// an insert, one whose old row alone passes a delete; a delete (tables without a key) is
/// logged when the old row passes. Updates and deletes carry the old key (the whole old
/// row without a key): an update logged with its old key is never taken for the
/// statement trigger's second entry of a key change, and the batch reader keeps the old
/// key only where it changed.
fn filtered_row_trigger_body(c: &Captured, old_kept: &[String], filter: &str) -> String {
    let passes = |var: &str, row: &str| {
        format!(
            "SELECT {} INTO {var} FROM (SELECT {row}.*) r;",
            filter_test(filter)
        )
    };
    let new_row = row_text("NEW", &c.columns);
    let old_row = row_text("OLD", old_kept);
    let update = log_insert(c.id, 'U', &new_row, &old_row, "");
    format!(
        "#variable_conflict use_column
DECLARE log int; wake int; old_passes boolean; new_passes boolean;
BEGIN
  {read_state}
  {old_test}
  IF TG_OP = 'UPDATE' THEN
    {new_test}
    IF old_passes AND new_passes THEN
      {update}
    ELSIF new_passes THEN
      {insert}
    ELSIF old_passes THEN
      {delete}
    ELSE
      RETURN NULL;
    END IF;
  ELSIF old_passes THEN
    {delete_whole}
  ELSE
    RETURN NULL;
  END IF;
  {notify}
  RETURN NULL;
END",
        read_state = read_state(),
        old_test = passes("old_passes", "OLD"),
        new_test = passes("new_passes", "NEW"),
        insert = log_insert(c.id, 'I', &new_row, "NULL", ""),
        delete = log_insert(c.id, 'D', "NULL", &old_row, ""),
        delete_whole = log_insert(c.id, 'D', "NULL", &row_text("OLD", &c.columns), ""),
        notify = notify(),
    )
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
            filter: None,
            output_settings: true,
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
            filter: None,
            output_settings: false,
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
        // Only settings-free types: the search_path alone.
        assert!(
            sql.contains("SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS"),
            "{sql}"
        );
        assert!(!sql.contains("TimeZone"), "{sql}");
        // Writers notify only while a relay waits for it.
        assert!(
            sql.contains(
                r#"IF wake = 1 THEN PERFORM pg_notify(''walrelay_capture'', ''''); END IF;"#
            ),
            "{sql}"
        );
    }

    #[test]
    fn a_row_filter_moves_updates_to_the_row_trigger() {
        let c = Captured {
            id: 4,
            oid: 1,
            columns: vec!["id".into(), "log".into()],
            key: vec!["id".into()],
            filter: Some("log <> 'x'".into()),
            output_settings: false,
        };
        let sql = table_sql("public.t", &c).join("\n");
        // Inserts and deletes are filtered in the statement triggers, updates row by row.
        assert!(
            sql.contains("FROM new_rows n WHERE coalesce((log <> ''x''), false)"),
            "{sql}"
        );
        assert!(
            sql.contains("FROM old_rows o WHERE coalesce((log <> ''x''), false)"),
            "{sql}"
        );
        assert!(
            !sql.contains("walrelay_capture_update AFTER UPDATE"),
            "{sql}"
        );
        assert!(
            sql.contains("walrelay_capture_row AFTER UPDATE ON public.t FOR EACH ROW EXECUTE"),
            "{sql}"
        );
        assert!(
            sql.contains("INTO new_passes FROM (SELECT NEW.*) r"),
            "{sql}"
        );
        // A column named like the functions' variable stays a column.
        assert_eq!(
            sql.matches("#variable_conflict use_column").count(),
            2,
            "{sql}"
        );
        assert_eq!(expected_triggers(true, true), 4);
    }
}
