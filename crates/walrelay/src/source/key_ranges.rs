//! Disjoint keys for writable nodes (`source.key_ranges`): at start, every sequence the
//! relay carries steps by the number of nodes on this source and hands out only this
//! node's values, so that inserts on two nodes never take the same key.
//!
//! Each relay sets up its own source: with a relay each way, node 1's relay makes node 1's
//! sequences hand out 1, 3, 5, … and node 2's relay node 2's 2, 4, 6, …

use tokio_postgres::Client;

use super::pgoutput::SourceError;
use crate::config::KeyRanges;
use crate::ddl::capture::OWN_DDL;
use crate::pg::PgError;

/// The first value at or above `from` that is this node's (`v mod nodes == node mod
/// nodes`); `None` past the end of `int8`.
pub fn own_value_from(from: i64, ranges: KeyRanges) -> Option<i64> {
    let nodes = i64::from(ranges.nodes);
    let wanted = i64::from(ranges.node).rem_euclid(nodes);
    from.checked_add((wanted - from.rem_euclid(nodes)).rem_euclid(nodes))
}

/// One sequence that was changed: its name, and the next value it hands out now.
#[derive(Debug, PartialEq, Eq)]
pub struct Changed {
    pub sequence: String,
    pub next: i64,
}

/// Make each of `sequences` (quoted and qualified) step by `nodes` and hand out this node's
/// values from its next one on; a sequence already so is left alone (a restart changes
/// nothing). A descending sequence is left alone with a warning.
pub async fn apply(
    client: &Client,
    sequences: &[String],
    ranges: KeyRanges,
) -> Result<Vec<Changed>, SourceError> {
    let mut changed = Vec::new();
    for sequence in sequences {
        if let Some(next) = apply_one(client, sequence, ranges)
            .await
            .map_err(|e| explain(sequence, e))?
        {
            tracing::info!(%sequence, next, step = ranges.nodes, "sequence now hands out this node's keys (source.key_ranges)");
            changed.push(Changed {
                sequence: sequence.clone(),
                next,
            });
        }
    }
    Ok(changed)
}

async fn apply_one(
    client: &Client,
    sequence: &str,
    ranges: KeyRanges,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let step = i64::from(ranges.nodes);
    let row = client
        .query_one(
            "SELECT seqincrement, seqcache FROM pg_sequence WHERE seqrelid = $1::text::regclass",
            &[&sequence],
        )
        .await?;
    let (increment, cache): (i64, i64) = (row.get(0), row.get(1));
    if increment < 0 {
        tracing::warn!(%sequence, "a descending sequence is left alone by source.key_ranges");
        return Ok(None);
    }
    if increment == step {
        let next = next_value(client, sequence, increment).await?;
        if own_value_from(next, ranges) == Some(next) {
            return Ok(None);
        }
    }
    if cache > 1 {
        // Sessions that hold cached values hand them out at the old step until they run
        // out: those keys may be another node's.
        tracing::warn!(%sequence, cache, "sessions holding cached values of this sequence may still hand out up to that many at the old step");
    }
    // ALTER SEQUENCE locks out nextval until COMMIT, so the value read after it is the
    // last one handed out; not captured as DDL (the other node gets its own step).
    client
        .batch_execute(&format!(
            "BEGIN; {OWN_DDL}; ALTER SEQUENCE {sequence} INCREMENT BY {step}"
        ))
        .await?;
    let result = async {
        let next = next_value(client, sequence, 1).await?;
        let own = own_value_from(next, ranges).unwrap_or(next);
        client
            .execute(
                "SELECT setval($1::text::regclass, $2, false)",
                &[&sequence, &own],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        Ok(own)
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result.map(Some)
}

/// The value `nextval` would return if the sequence stepped by `increment`. `sequence` is
/// quoted and qualified: it can stand in the FROM clause.
async fn next_value(
    client: &Client,
    sequence: &str,
    increment: i64,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!("SELECT last_value, is_called FROM {sequence}"),
            &[],
        )
        .await?;
    let (last, called): (i64, bool) = (row.get(0), row.get(1));
    Ok(if called {
        last.saturating_add(increment)
    } else {
        last
    })
}

fn explain(sequence: &str, e: tokio_postgres::Error) -> SourceError {
    let owner_hint = e
        .as_db_error()
        .is_some_and(|db| db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE);
    let context = if owner_hint {
        format!("source.key_ranges: setting the step of sequence {sequence} needs its owner: run walrelay as the owner, or set it by hand (ALTER SEQUENCE {sequence} INCREMENT BY <nodes> RESTART WITH <this node's next value>) and remove key_ranges")
    } else {
        format!("source.key_ranges: setting the step of sequence {sequence}")
    };
    SourceError::Pg(PgError::from_sql(context, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_values_are_this_nodes_residue_at_or_after_the_start() {
        let one = KeyRanges { node: 1, nodes: 2 };
        let two = KeyRanges { node: 2, nodes: 2 };
        assert_eq!(own_value_from(1, one), Some(1));
        assert_eq!(own_value_from(2, one), Some(3));
        assert_eq!(own_value_from(1, two), Some(2));
        assert_eq!(own_value_from(2, two), Some(2));
        let three = KeyRanges { node: 3, nodes: 3 };
        assert_eq!(own_value_from(10, three), Some(12));
        // Negative starts (MINVALUE below zero) keep the residue.
        assert_eq!(own_value_from(-5, one), Some(-5));
        assert_eq!(own_value_from(-4, one), Some(-3));
        assert_eq!(own_value_from(i64::MAX, two), None);
        for start in -20..20 {
            for (node, nodes) in [(1, 2), (2, 2), (1, 3), (2, 3), (3, 3)] {
                let r = KeyRanges { node, nodes };
                let v = own_value_from(start, r).unwrap();
                assert!(v >= start && v - start < i64::from(nodes));
                assert_eq!(v.rem_euclid(i64::from(nodes)), i64::from(node % nodes));
            }
        }
    }
}
