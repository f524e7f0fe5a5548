//! Putting one proven difference right on the target, in step with the stream.
//!
//! In one target transaction: lock the target row (`FOR UPDATE`; a relay transaction that
//! holds it finishes first), check that it still holds what the comparison saw, read the
//! source row again and check that its version is still the one the difference was proven
//! with, then write the source's row (insert, update) or remove the target's (delete).
//! The relay's changes to that row are all committed on the source after that version, so
//! they reach the target after this write — the row lock orders them — and apply on top
//! of it: nothing is lost and nothing applied twice. A row the target lacks cannot be
//! locked; its insert does nothing if the relay inserted it meanwhile (`ON CONFLICT`).

use tokio_postgres::types::ToSql;

use super::compare::{Difference, Key, SourceRow};
use super::{bind, pg, source_row, sql, Table, VerifyError, Worker};

/// What a repair did, or why it did nothing; shown (and in JSON) as `inserted`,
/// `updated`, `deleted` or `skipped: why`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    Inserted,
    Updated,
    Deleted,
    Skipped(&'static str),
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repair::Inserted => f.write_str("inserted"),
            Repair::Updated => f.write_str("updated"),
            Repair::Deleted => f.write_str("deleted"),
            Repair::Skipped(why) => write!(f, "skipped: {why}"),
        }
    }
}

impl serde::Serialize for Repair {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What the comparison that proved a difference saw on each side.
pub struct Seen<'a> {
    pub source: Option<&'a SourceRow>,
    pub target: Option<&'a Vec<Option<String>>>,
}

impl Worker<'_> {
    /// Repair one difference; returns what was done (`inserted`, `updated`, `deleted`) or
    /// why nothing was.
    pub(super) async fn repair(
        &mut self,
        table: &Table,
        key: &Key,
        difference: &Difference,
        seen: Seen<'_>,
    ) -> Result<Repair, VerifyError> {
        let writes = sql::writes(&table.target, &table.target_types);
        let key_params = bind(key);
        let tx = self
            .target
            .transaction()
            .await
            .map_err(pg("starting a repair on the target"))?;
        tx.batch_execute("SET LOCAL lock_timeout = '10s'")
            .await
            .map_err(pg("starting a repair on the target"))?;
        let now: Option<Vec<Option<String>>> = tx
            .query_opt(&table.target.row_for_update(), &key_params)
            .await
            .map_err(pg("locking the target row"))?
            .map(|r| (0..r.len()).map(|i| r.get(i)).collect());
        if now.as_ref() != seen.target {
            return Ok(Repair::Skipped(
                "the target row changed meanwhile; verify again",
            ));
        }
        let source_now = self
            .source
            .query_opt(&table.source.row_of_key(true), &key_params)
            .await
            .map_err(pg("reading the source row"))?
            .map(|r| source_row(&r, table.source.key.len(), table.shaper.as_deref()).1);
        if source_now.as_ref().map(|r| &r.version) != seen.source.map(|r| &r.version) {
            return Ok(Repair::Skipped(
                "the source row changed meanwhile (in flight); verify again",
            ));
        }
        let done = match (difference, source_now) {
            (Difference::Extra, None) => {
                tx.execute(&writes.delete, &key_params)
                    .await
                    .map_err(pg("deleting a row on the target"))?;
                Repair::Deleted
            }
            (Difference::Missing, Some(row)) => {
                let params = nullable(&row.values);
                tx.execute(&writes.insert, &params)
                    .await
                    .map_err(pg("inserting a row on the target"))?;
                Repair::Inserted
            }
            (Difference::Changed { .. }, Some(row)) => {
                let Some(update) = &writes.update else {
                    return Ok(Repair::Skipped("only key columns, nothing to update"));
                };
                let mut params: Vec<&(dyn ToSql + Sync)> = writes
                    .update_columns
                    .iter()
                    .map(|i| &row.values[*i] as &(dyn ToSql + Sync))
                    .collect();
                params.extend(bind(key));
                tx.execute(update, &params)
                    .await
                    .map_err(pg("updating a row on the target"))?;
                Repair::Updated
            }
            _ => return Ok(Repair::Skipped("the rows changed meanwhile; verify again")),
        };
        tx.commit()
            .await
            .map_err(pg("committing a repair on the target"))?;
        Ok(done)
    }
}

fn nullable(values: &[Option<String>]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}
