//! Ticks and batches: a tick records a snapshot of committed transactions; the changes of
//! the transactions that committed between two ticks are one batch, a consistent cut of
//! the source (as Slony-I's SYNC events and PgQ's ticks), read in the order they were
//! logged. A batch's position is its closing tick's WAL position, so the sinks record and
//! compare it like a commit LSN.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_postgres::Client;
use walrelay_model::{
    Change, Column, Lsn, OldRow, PgTimestamp, Relation, ReplicaIdentity, Row, Value,
};

use super::record;
use crate::pg::PgError;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("trigger capture: log row {seq}: {what}")]
    Log { seq: i64, what: String },
}

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> BatchError {
    move |e| BatchError::Pg(PgError::from_sql(format!("trigger capture: {what}"), e))
}

/// A recorded tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub id: i64,
    pub lsn: Lsn,
    pub at: PgTimestamp,
}

impl Tick {
    /// The position a sink reports once it holds this tick's batch: just past the
    /// batch's own (`lsn`), as a commit's end is past its commit record, and below the
    /// next tick's (each tick writes WAL).
    pub fn end(&self) -> Lsn {
        Lsn(self.lsn.0 + 1)
    }
}

const TICK_COLUMNS: &str = "id, lsn::text, (extract(epoch FROM at) * 1000000)::int8";

fn tick_of(row: &tokio_postgres::Row) -> Result<Tick, BatchError> {
    Ok(Tick {
        id: row.get(0),
        lsn: parse_lsn(row.get(1))?,
        at: PgTimestamp::from_unix_micros(row.get(2)),
    })
}

/// Record a tick for `consumer` now: the snapshot of what has committed (`snapshot`, or
/// the current one), and the WAL insert position, which grows with every tick (each
/// writes a row).
pub async fn tick(
    client: &Client,
    consumer: &str,
    snapshot: Option<&str>,
) -> Result<Tick, BatchError> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO walrelay_capture.ticks (consumer, snapshot, lsn)
                 VALUES ($1, coalesce($2::text::pg_snapshot, pg_current_snapshot()), pg_current_wal_insert_lsn())
                 RETURNING {TICK_COLUMNS}"
            ),
            &[&consumer, &snapshot],
        )
        .await
        .map_err(pg("recording a tick"))?;
    tick_of(&row)
}

fn parse_lsn(text: &str) -> Result<Lsn, BatchError> {
    text.parse().map_err(|_| BatchError::Log {
        seq: 0,
        what: format!("a tick's position {text:?} is not an LSN"),
    })
}

/// The tick `id`.
pub async fn tick_by_id(client: &Client, id: i64) -> Result<Tick, BatchError> {
    let row = client
        .query_one(
            &format!("SELECT {TICK_COLUMNS} FROM walrelay_capture.ticks WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(pg("reading a tick"))?;
    tick_of(&row)
}

/// The ticks of `consumer` after `after`, in order.
pub async fn ticks_after(
    client: &Client,
    consumer: &str,
    after: i64,
) -> Result<Vec<Tick>, BatchError> {
    let rows = client
        .query(
            &format!(
                "SELECT {TICK_COLUMNS} FROM walrelay_capture.ticks
                  WHERE consumer = $1 AND id > $2 ORDER BY id"
            ),
            &[&consumer, &after],
        )
        .await
        .map_err(pg("reading ticks"))?;
    rows.iter().map(tick_of).collect()
}

/// The first recorded tick of `consumer` whose snapshot sees every transaction `snapshot`
/// sees (taken later, or with nothing committed in between), and whether the consumer
/// has confirmed it: a sink holding that tick's batch holds all those transactions.
pub async fn first_tick_seeing(
    client: &Client,
    consumer: &str,
    snapshot: &str,
) -> Result<Option<(Tick, bool)>, BatchError> {
    let row = client
        .query_opt(
            &format!(
                "WITH v AS (SELECT $2::text::pg_snapshot AS s)
                 SELECT {TICK_COLUMNS}, t.id <= coalesce(c.tick, 0)
                   FROM walrelay_capture.ticks t CROSS JOIN v
                   LEFT JOIN walrelay_capture.consumers c ON c.name = t.consumer
                  WHERE t.consumer = $1
                    AND pg_snapshot_xmax(t.snapshot) >= pg_snapshot_xmax(v.s)
                    AND NOT EXISTS (SELECT FROM pg_snapshot_xip(t.snapshot) x
                                     WHERE x < pg_snapshot_xmax(v.s) AND pg_visible_in_snapshot(x, v.s))
                  ORDER BY t.id LIMIT 1"
            ),
            &[&consumer, &snapshot],
        )
        .await
        .map_err(pg("reading the ticks"))?;
    row.map(|r| Ok((tick_of(&r)?, r.get(3)))).transpose()
}

/// The relations of the captured tables, by their number in the log (each entry the
/// registry keeps for them: rows logged before an ALTER TABLE have the columns of their
/// entry), described as pgoutput would (type names, key columns; all columns are the key
/// of a table without one, whose old rows are logged whole).
pub async fn relations(
    client: &Client,
    relids: &[walrelay_model::Oid],
) -> Result<HashMap<i32, Arc<Relation>>, BatchError> {
    let rows = client
        .query(
            "SELECT r.id, r.relid, n.nspname::text, c.relname::text, r.columns, r.types, r.typmods,
                    r.type_names, r.key
               FROM walrelay_capture.tables r
               JOIN pg_class c ON c.oid = r.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE r.relid = ANY ($1)",
            &[&relids],
        )
        .await
        .map_err(pg("reading the table registry"))?;
    let mut out = HashMap::new();
    for r in &rows {
        let names: Vec<String> = r.get(4);
        let types: Vec<walrelay_model::Oid> = r.get(5);
        let typmods: Vec<i32> = r.get(6);
        let type_names: Vec<String> = r.get(7);
        let key: Vec<String> = r.get(8);
        let keyed = !key.is_empty();
        let columns = names
            .into_iter()
            .zip(types)
            .zip(typmods)
            .zip(type_names)
            .map(|(((name, type_oid), type_modifier), type_name)| Column {
                is_key: !keyed || key.contains(&name),
                name,
                type_oid,
                type_modifier,
                type_name,
            })
            .collect();
        out.insert(
            r.get::<_, i32>(0),
            Arc::new(Relation {
                oid: r.get(1),
                schema: r.get(2),
                name: r.get(3),
                replica_identity: if keyed {
                    ReplicaIdentity::Default
                } else {
                    ReplicaIdentity::Full
                },
                columns,
            }),
        );
    }
    Ok(out)
}

/// The newest entry of the table registry: a relay that installs for another consumer
/// may register a table again (after an ALTER TABLE), and rows logged under the new entry
/// need its relation.
pub async fn newest_entry(client: &Client) -> Result<i32, BatchError> {
    Ok(client
        .query_one(
            "SELECT coalesce(max(id), 0) FROM walrelay_capture.tables",
            &[],
        )
        .await
        .map_err(pg("reading the table registry"))?
        .get(0))
}

/// The changes of the transactions that committed after tick `from` and by tick `to`, in
/// the order they were logged, read as they arrive (a batch may be millions of rows).
/// Changes of tables not in `relations` (no longer captured) are left out.
pub struct BatchReader<'r> {
    rows: std::pin::Pin<Box<tokio_postgres::RowStream>>,
    relations: &'r HashMap<i32, Arc<Relation>>,
    pairing: KeyChanges,
}

impl<'r> BatchReader<'r> {
    /// The batch between ticks `from` and `to`; without what a walrelay apply wrote when
    /// `leave_out_applied` (`source.origin = "none"`).
    pub async fn open(
        client: &Client,
        from: i64,
        to: i64,
        relations: &'r HashMap<i32, Arc<Relation>>,
        leave_out_applied: bool,
    ) -> Result<Self, BatchError> {
        // A transaction is in the batch when `to`'s snapshot sees it and `from`'s does
        // not; the txid bounds let the index on txid narrow the scan.
        let applied = if leave_out_applied {
            " AND applied_by IS NULL"
        } else {
            ""
        };
        let one_log = |n: u8| {
            format!(
                "SELECT seq, tbl, op::text, new_row, old_row FROM walrelay_capture.log_{n}, b, a
                  WHERE txid >= pg_snapshot_xmin(a.snapshot) AND txid < pg_snapshot_xmax(b.snapshot)
                    AND pg_visible_in_snapshot(txid, b.snapshot)
                    AND NOT pg_visible_in_snapshot(txid, a.snapshot){applied}"
            )
        };
        let sql = format!(
            "WITH a AS (SELECT snapshot FROM walrelay_capture.ticks WHERE id = $1),
                  b AS (SELECT snapshot FROM walrelay_capture.ticks WHERE id = $2)
             {} UNION ALL {} ORDER BY seq",
            one_log(1),
            one_log(2)
        );
        let rows = client
            .query_raw(
                &sql,
                [&from as &(dyn tokio_postgres::types::ToSql + Sync), &to],
            )
            .await
            .map_err(pg("reading a batch of the log"))?;
        Ok(BatchReader {
            rows: Box::pin(rows),
            relations,
            pairing: KeyChanges::default(),
        })
    }

    /// The next change, or `None` at the batch's end.
    pub async fn next(&mut self) -> Result<Option<Change>, BatchError> {
        use futures_util::TryStreamExt;
        while let Some(r) = self
            .rows
            .try_next()
            .await
            .map_err(pg("reading a batch of the log"))?
        {
            let seq: i64 = r.get(0);
            let tbl: i32 = r.get(1);
            let Some(relation) = self.relations.get(&tbl) else {
                continue;
            };
            let op: &str = r.get(2);
            let new_row: Option<&str> = r.get(3);
            let old_row: Option<&str> = r.get(4);
            if let Some(change) = to_change(seq, relation, op, new_row, old_row, &mut self.pairing)?
            {
                return Ok(Some(change));
            }
        }
        Ok(None)
    }
}

/// A whole batch in memory (small batches, tests).
pub async fn read(
    client: &Client,
    from: i64,
    to: i64,
    relations: &HashMap<i32, Arc<Relation>>,
    leave_out_applied: bool,
) -> Result<Vec<Change>, BatchError> {
    let mut reader = BatchReader::open(client, from, to, relations, leave_out_applied).await?;
    let mut changes = Vec::new();
    while let Some(change) = reader.next().await? {
        changes.push(change);
    }
    Ok(changes)
}

/// The new keys of updates that changed their key, logged by the row trigger, whose
/// statement trigger logs the same rows again right after: those second entries are left
/// out.
#[derive(Default)]
pub struct KeyChanges {
    pending: HashSet<(i32, Vec<Value>)>,
}

fn fields(seq: i64, text: &str, expected: usize) -> Result<Vec<Value>, BatchError> {
    let fields = record::parse(text).map_err(|e| BatchError::Log {
        seq,
        what: e.to_string(),
    })?;
    if fields.len() != expected {
        return Err(BatchError::Log {
            seq,
            what: format!(
                "{} values where the table has {expected} columns (was the table altered? restart walrelay)",
                fields.len()
            ),
        });
    }
    Ok(fields.into_iter().map(record::value).collect())
}

/// One log row as a change; `None` for the statement trigger's copy of a key change.
pub fn to_change(
    seq: i64,
    relation: &Arc<Relation>,
    op: &str,
    new_row: Option<&str>,
    old_row: Option<&str>,
    pairing: &mut KeyChanges,
) -> Result<Option<Change>, BatchError> {
    let width = relation.columns.len();
    let key_width = relation.key_columns().count();
    let missing = |what: &str| BatchError::Log {
        seq,
        what: format!("{op} without its {what}"),
    };
    let key_of = |row: &[Value]| -> Vec<Value> {
        relation
            .key_columns()
            .map(|(i, _)| row[i].clone())
            .collect()
    };
    let keyed = relation.replica_identity != ReplicaIdentity::Full;
    let tbl = relation.oid as i32;
    Ok(Some(match op {
        "I" => Change::Insert {
            relation: relation.clone(),
            new: Row(fields(seq, new_row.ok_or_else(|| missing("row"))?, width)?),
        },
        "U" => {
            let new = fields(seq, new_row.ok_or_else(|| missing("row"))?, width)?;
            match old_row {
                // A table without a key: the row trigger logged the whole old row.
                Some(old) if !keyed => Change::Update {
                    relation: relation.clone(),
                    old: Some(OldRow::Full(Row(fields(seq, old, width)?))),
                    new: Row(new),
                },
                // A row-filtered table's row trigger: the old key, never a second entry;
                // kept only when it changed, as logical decoding does.
                Some(old) => {
                    let old = fields(seq, old, key_width)?;
                    let changed = old != key_of(&new);
                    Change::Update {
                        relation: relation.clone(),
                        old: changed.then_some(OldRow::Key(Row(old))),
                        new: Row(new),
                    }
                }
                None => {
                    if keyed && pairing.pending.remove(&(tbl, key_of(&new))) {
                        return Ok(None);
                    }
                    Change::Update {
                        relation: relation.clone(),
                        old: None,
                        new: Row(new),
                    }
                }
            }
        }
        "K" => {
            let new = fields(seq, new_row.ok_or_else(|| missing("row"))?, width)?;
            let old = fields(seq, old_row.ok_or_else(|| missing("old key"))?, key_width)?;
            pairing.pending.insert((tbl, key_of(&new)));
            Change::Update {
                relation: relation.clone(),
                old: Some(OldRow::Key(Row(old))),
                new: Row(new),
            }
        }
        "D" => {
            let old = old_row.ok_or_else(|| missing("old row"))?;
            if keyed {
                Change::Delete {
                    relation: relation.clone(),
                    old: OldRow::Key(Row(fields(seq, old, key_width)?)),
                }
            } else {
                Change::Delete {
                    relation: relation.clone(),
                    old: OldRow::Full(Row(fields(seq, old, width)?)),
                }
            }
        }
        "T" => Change::Truncate {
            relations: vec![relation.clone()],
            cascade: false,
            restart_identity: false,
        },
        other => {
            return Err(BatchError::Log {
                seq,
                what: format!("unknown operation {other:?}"),
            })
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(keyed: bool) -> Arc<Relation> {
        let col = |name: &str, is_key| Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            type_name: "int4".into(),
            is_key,
        };
        Arc::new(Relation {
            oid: 5,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: if keyed {
                ReplicaIdentity::Default
            } else {
                ReplicaIdentity::Full
            },
            columns: vec![col("id", true), col("v", !keyed)],
        })
    }

    fn text(v: &str) -> Value {
        Value::Text(v.into())
    }

    #[test]
    fn a_key_change_is_one_update_with_the_old_key() {
        let rel = relation(true);
        let mut pairing = KeyChanges::default();
        let k = to_change(1, &rel, "K", Some("(2,x)"), Some("(1)"), &mut pairing).unwrap();
        assert_eq!(
            k,
            Some(Change::Update {
                relation: rel.clone(),
                old: Some(OldRow::Key(Row(vec![text("1")]))),
                new: Row(vec![text("2"), text("x")]),
            })
        );
        // The statement trigger's entry for the same row is left out, once.
        assert_eq!(
            to_change(2, &rel, "U", Some("(2,x)"), None, &mut pairing).unwrap(),
            None
        );
        assert!(matches!(
            to_change(3, &rel, "U", Some("(2,y)"), None, &mut pairing).unwrap(),
            Some(Change::Update { old: None, .. })
        ));
    }

    #[test]
    fn deletes_carry_the_key_or_the_whole_row() {
        let mut pairing = KeyChanges::default();
        let keyed = relation(true);
        assert!(matches!(
            to_change(1, &keyed, "D", None, Some("(7)"), &mut pairing).unwrap(),
            Some(Change::Delete { old: OldRow::Key(Row(v)), .. }) if v == vec![text("7")]
        ));
        let whole = relation(false);
        assert!(matches!(
            to_change(1, &whole, "D", None, Some("(7,)"), &mut pairing).unwrap(),
            Some(Change::Delete { old: OldRow::Full(Row(v)), .. }) if v == vec![text("7"), Value::Null]
        ));
    }

    #[test]
    fn a_row_of_another_width_is_an_error_naming_the_log_row() {
        let mut pairing = KeyChanges::default();
        let e = to_change(9, &relation(true), "I", Some("(1,2,3)"), None, &mut pairing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("log row 9") && e.contains("3 values"), "{e}");
    }
}
