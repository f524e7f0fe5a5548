//! Snapshot rows as events: for sinks that take rows rather than a COPY (`jsonl`, and the
//! message sinks to come), each row of each replicated table in the snapshot becomes a
//! `read` event, sent before the stream.
//!
//! Rows come from `COPY (SELECT ...) TO STDOUT` in text format, which prints each value with
//! its type's output function — exactly what pgoutput sends for a change — on a connection
//! with the replication session's settings (time zone, date style, float digits).

use std::sync::Arc;

use bytes::Bytes;
use walrelay_model::{Column, Position, Relation, ReplicaIdentity};

use super::{SnapshotError, SnapshotPoint};
use crate::pg::conninfo::ConnInfo;
use crate::pg::quote;
use crate::pg::replication::ReplicationConnection;
use crate::sets::TableShape;
use crate::sink::{Batch, SinkHandle};

/// Events per batch handed to the sinks.
const BATCH_EVENTS: usize = 1024;

/// Send every row of `tables`, as of `point`, to `sinks` as read events. Returns the rows
/// sent.
pub async fn send_reads(
    source: &ConnInfo,
    tables: &[Arc<TableShape>],
    point: &SnapshotPoint,
    sinks: &[&SinkHandle],
) -> Result<u64, SnapshotError> {
    let mut conn = ReplicationConnection::connect_plain(source).await?;
    conn.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    conn.simple_query(&format!(
        "SET TRANSACTION SNAPSHOT {}",
        quote::literal(&point.name)
    ))
    .await?;
    let mut seq = 0u64;
    for shape in tables {
        let (schema, name) = &shape.source;
        let source_relation = Arc::new(relation(&mut conn, schema, name).await?);
        let columns: Vec<String> = source_relation
            .columns
            .iter()
            .map(|c| quote::ident(&c.name))
            .collect();
        // Rows go through the set's shape as the stream's do; its filter is the same
        // predicate the publication evaluates.
        let shaped = shape
            .relation(source_relation.clone())
            .map_err(|e| SnapshotError::Worker(e.to_string()))?;
        let relation = shaped.relation.clone();
        let filter = shape
            .filter
            .as_ref()
            .map(|f| format!(" WHERE ({f})"))
            .unwrap_or_default();
        conn.copy_out(&format!(
            "COPY (SELECT {} FROM {}{filter}) TO STDOUT",
            columns.join(", "),
            quote::qualified(schema, name)
        ))
        .await
        .map_err(|error| SnapshotError::Copy {
            table: relation.qualified_name().to_string(),
            error,
        })?;
        let before = seq;
        let mut batch = Vec::with_capacity(BATCH_EVENTS);
        while let Some(chunk) = conn.copy_out_next(super::COPY_BUFFER).await? {
            for line in lines(&chunk) {
                seq += 1;
                batch.push(walrelay_model::Event::Read {
                    position: Position::new(point.lsn, seq),
                    relation: relation.clone(),
                    row: shaped.row(
                        crate::pg::copy_text::parse_row(line, source_relation.columns.len())
                            .map_err(|what| {
                                SnapshotError::Worker(format!(
                                    "reading {}: {what}",
                                    relation.qualified_name()
                                ))
                            })?,
                    ),
                });
                if batch.len() >= BATCH_EVENTS {
                    send(sinks, std::mem::take(&mut batch)).await?;
                }
            }
        }
        send(sinks, batch).await?;
        tracing::info!(table = %relation.qualified_name(), rows = seq - before, "snapshot rows sent as read events");
    }
    let _ = conn.simple_query("COMMIT").await;
    let end = walrelay_model::Event::SnapshotEnd {
        position: Position::new(point.lsn, seq + 1),
        rows: seq,
    };
    send(sinks, vec![end]).await?;
    Ok(seq)
}

async fn send(
    sinks: &[&SinkHandle],
    events: Vec<walrelay_model::Event>,
) -> Result<(), SnapshotError> {
    if events.is_empty() {
        return Ok(());
    }
    let bytes = crate::sink::queue::batch_bytes(&events);
    let batch: Batch = Arc::new(events);
    for s in sinks {
        let Some((batch, bytes)) = s.routed(&batch, bytes) else {
            continue;
        };
        s.input
            .send(batch, bytes)
            .await
            .map_err(|_| SnapshotError::Worker(format!("sink {} stopped", s.name)))?;
    }
    Ok(())
}

/// The table as pgoutput would describe it: published columns (generated ones are not),
/// their types, and which of them identify a row.
async fn relation(
    conn: &mut ReplicationConnection,
    schema: &str,
    name: &str,
) -> Result<Relation, SnapshotError> {
    let table = quote::literal(&quote::qualified(schema, name));
    let result = conn
        .simple_query(&format!(
            "SELECT c.oid::int8, c.relreplident::text, a.attname::text, a.atttypid::int8, a.atttypmod,
                    CASE WHEN n.nspname = 'pg_catalog' THEN t.typname::text
                         ELSE n.nspname || '.' || t.typname END,
                    c.relreplident = 'f' OR a.attnum = ANY (coalesce((
                        SELECT i.indkey::int2[] FROM pg_index i
                        WHERE i.indrelid = c.oid
                          AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                  WHEN 'i' THEN i.indisreplident
                                                  ELSE false END
                        LIMIT 1), '{{}}'))
             FROM pg_class c
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                AND a.attgenerated = ''
             JOIN pg_type t ON t.oid = a.atttypid
             JOIN pg_namespace n ON n.oid = t.typnamespace
             WHERE c.oid = {table}::regclass
             ORDER BY a.attnum"
        ))
        .await?;
    let mut oid = 0;
    let mut identity = ReplicaIdentity::Default;
    let mut columns = Vec::new();
    for row in &result.rows {
        let field = |i: usize| row.get(i).and_then(|v| v.as_deref()).unwrap_or_default();
        oid = field(0).parse().unwrap_or(0);
        identity = ReplicaIdentity::from_code(field(1).bytes().next().unwrap_or(b'd'))
            .unwrap_or(ReplicaIdentity::Default);
        columns.push(Column {
            name: field(2).to_string(),
            type_oid: field(3).parse().unwrap_or(0),
            type_modifier: field(4).parse().unwrap_or(-1),
            type_name: field(5).to_string(),
            is_key: field(6) == "t",
        });
    }
    Ok(Relation {
        oid,
        schema: schema.to_string(),
        name: name.to_string(),
        replica_identity: identity,
        columns,
    })
}

/// The lines of a chunk of COPY text output (each row ends with a newline).
fn lines(chunk: &Bytes) -> impl Iterator<Item = &[u8]> {
    chunk.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}
