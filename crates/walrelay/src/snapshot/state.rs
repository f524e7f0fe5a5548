//! Which tables a postgres sink's target holds a complete copy of, and as of which source
//! position: `walrelay.copies`. A table is marked `copying` before its data goes in and
//! `done` (with the snapshot's LSN) after its last row, keys and indexes; a restart copies
//! again what is not `done`, after emptying what a crash left half-filled.

use std::collections::HashMap;

use tokio_postgres::Client;
use walrelay_model::Lsn;

use crate::pg::PgError;

const CREATE_SQL: &str = "CREATE SCHEMA IF NOT EXISTS walrelay;
     CREATE TABLE IF NOT EXISTS walrelay.copies (
         name text NOT NULL,
         schema_name text NOT NULL,
         table_name text NOT NULL,
         state text NOT NULL CHECK (state IN ('copying', 'done')),
         created boolean NOT NULL DEFAULT false,
         lsn pg_lsn,
         changed_at timestamptz NOT NULL DEFAULT now(),
         PRIMARY KEY (name, schema_name, table_name))";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    /// A copy began and did not finish: whatever is in the table is ours and incomplete.
    /// `created`: walrelay created the table for it (its keys and indexes come after).
    Copying { created: bool },
    /// Complete as of this source position.
    Done(Lsn),
}

/// The recorded state of every table for `name` (a sink's `<slot>/<name>`).
pub async fn read(
    client: &Client,
    name: &str,
) -> Result<HashMap<(String, String), CopyState>, PgError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('walrelay.copies') IS NOT NULL", &[])
        .await
        .map_err(|e| PgError::from_sql("looking for walrelay.copies", e))?
        .get(0);
    if !exists {
        return Ok(HashMap::new());
    }
    let rows = client
        .query(
            "SELECT schema_name, table_name, state, lsn::text, created FROM walrelay.copies WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(|e| PgError::from_sql("reading walrelay.copies", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let copying = CopyState::Copying { created: r.get(4) };
            let state = match (
                r.get::<_, String>(2).as_str(),
                r.get::<_, Option<String>>(3),
            ) {
                ("done", Some(lsn)) => lsn.parse().map(CopyState::Done).unwrap_or(copying),
                _ => copying,
            };
            ((r.get(0), r.get(1)), state)
        })
        .collect())
}

pub async fn ensure_table(client: &Client) -> Result<(), PgError> {
    client.batch_execute(CREATE_SQL).await.map_err(|e| {
        PgError::from_sql(
            "creating walrelay.copies (the sink's role needs CREATE on the database)",
            e,
        )
    })
}

pub async fn mark_copying(
    client: &Client,
    name: &str,
    schema: &str,
    table: &str,
    created: bool,
) -> Result<(), PgError> {
    client
        .execute(
            "INSERT INTO walrelay.copies (name, schema_name, table_name, state, created) VALUES ($1, $2, $3, 'copying', $4)
             ON CONFLICT (name, schema_name, table_name) DO UPDATE SET state = 'copying', created = $4, lsn = NULL, changed_at = now()",
            &[&name, &schema, &table, &created],
        )
        .await
        .map(|_| ())
        .map_err(|e| PgError::from_sql("recording a copy's start", e))
}

pub async fn mark_done(
    client: &Client,
    name: &str,
    schema: &str,
    table: &str,
    lsn: Lsn,
) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.copies SET state = 'done', lsn = $4::text::pg_lsn, changed_at = now()
             WHERE name = $1 AND schema_name = $2 AND table_name = $3",
            &[&name, &schema, &table, &lsn.to_string()],
        )
        .await
        .map(|_| ())
        .map_err(|e| PgError::from_sql("recording a finished copy", e))
}

/// The table left the sink's sets: its record goes, so that if it comes back it is copied
/// again (its rows on the target, which stop following the source, must then be removed
/// first: the copy refuses a target table with rows it has no record of).
pub async fn forget(client: &Client, name: &str, schema: &str, table: &str) -> Result<(), PgError> {
    client
        .execute(
            "DELETE FROM walrelay.copies WHERE name = $1 AND schema_name = $2 AND table_name = $3",
            &[&name, &schema, &table],
        )
        .await
        .map(|_| ())
        .map_err(|e| PgError::from_sql("forgetting the copy of a table no longer replicated", e))
}
