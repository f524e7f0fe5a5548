//! Write protection of target tables, as Slony-I has it: a statement trigger rejects
//! INSERT, UPDATE, DELETE and TRUNCATE from any session but walrelay's. walrelay applies
//! with `session_replication_role = replica`, in which ordinary triggers do not fire, so
//! the protection never gets in its way.

use super::session::{ApplyError, ApplySession};
use crate::pg::{quote, PgError};

const TRIGGER: &str = "walrelay_protect";

const FUNCTION_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS walrelay;
CREATE OR REPLACE FUNCTION walrelay.reject_write() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'table %.% is a replica kept by walrelay: a change made here would be overwritten, or stop replication', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'Write to the source database instead. To write here anyway: ALTER TABLE ... DISABLE TRIGGER walrelay_protect.';
END
$fn$"#;

/// Install the protection on `tables` (`enabled`), or remove it (a previous run's) when
/// not enabled.
pub async fn apply(
    session: &ApplySession,
    enabled: bool,
    tables: &[(String, String)],
) -> Result<(), ApplyError> {
    let client = session.client();
    let target_err = |message: String| ApplyError::Target {
        target: session.target().to_string(),
        message,
    };
    if enabled {
        if !session.replica_role() {
            return Err(target_err(
                "protect = true needs the sink's role to set session_replication_role, so that walrelay's own changes pass the protection: make it superuser, or GRANT SET ON PARAMETER session_replication_role TO it".into(),
            ));
        }
        client.batch_execute(FUNCTION_SQL).await.map_err(|e| {
            target_err(format!(
                "creating walrelay.reject_write(): {}",
                PgError::from_sql("", e)
            ))
        })?;
    }
    for (schema, name) in tables {
        let table = quote::qualified(schema, name);
        let present = client
            .query_opt(
                "SELECT t.oid IS NOT NULL FROM (SELECT to_regclass($1) AS rel) r
                 LEFT JOIN pg_trigger t ON t.tgrelid = r.rel AND t.tgname = $2
                 WHERE r.rel IS NOT NULL",
                &[&table, &TRIGGER],
            )
            .await
            .map_err(|e| PgError::from_sql("looking up protection triggers", e))?;
        // A table missing on the target is reported when its first change arrives.
        let Some(row) = present else { continue };
        let has_trigger: bool = row.get(0);
        let sql = match (enabled, has_trigger) {
            (true, false) => format!(
                "CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
                 FOR EACH STATEMENT EXECUTE FUNCTION walrelay.reject_write()"
            ),
            (false, true) => format!("DROP TRIGGER {TRIGGER} ON {table}"),
            _ => continue,
        };
        client.batch_execute(&sql).await.map_err(|e| {
            target_err(format!(
                "{} write protection on {table}: {} (the sink's role must own the table)",
                if enabled { "installing" } else { "removing" },
                PgError::from_sql("", e)
            ))
        })?;
    }
    if enabled {
        tracing::info!(
            tables = tables.len(),
            "target tables protected from writes by others"
        );
    }
    Ok(())
}
