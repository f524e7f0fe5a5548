//! Sequences on the target, kept at least as far as the source's at every commit the
//! target applies, so that after a cutover the target never hands out a value the source
//! already used. Logical decoding carries no sequence changes; instead, before each target
//! commit, the sink reads the source's sequences — after it has received the transactions
//! it commits, so their `nextval`s are in what it reads — and raises the target's where
//! they are behind. Values only go up (ascending sequences; a descending one is left alone
//! with a warning): a value read later than the commit is ahead of it, which is what a
//! cutover needs.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::session::ApplyError;
use crate::pg::conninfo::ConnInfo;
use crate::pg::{quote, sql, PgError};
use crate::sets::{SequencePair, SequenceTarget};

pub struct SequenceSync {
    source: Client,
    /// Source sequences, quoted and qualified, and their targets' regclass text.
    sources: Vec<String>,
    targets: Vec<String>,
    /// The value last set on (or found at least on) each target sequence.
    raised: HashMap<String, i64>,
}

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
    move |e| ApplyError::Pg(PgError::from_sql(what, e))
}

impl SequenceSync {
    /// Find each sequence on the target (creating the named ones that are missing). `None`
    /// when the sink's sets carry no sequence.
    pub async fn open(
        source: &ConnInfo,
        target: &Client,
        pairs: &[SequencePair],
    ) -> Result<Option<Self>, ApplyError> {
        if pairs.is_empty() {
            return Ok(None);
        }
        let source = sql::connect(source).await?;
        let mut sync = SequenceSync {
            source,
            sources: Vec::new(),
            targets: Vec::new(),
            raised: HashMap::new(),
        };
        for pair in pairs {
            let ascending: bool = sync
                .source
                .query_one(
                    "SELECT seqincrement > 0 FROM pg_sequence WHERE seqrelid = $1::text::regclass",
                    &[&pair.source],
                )
                .await
                .map_err(pg("reading a source sequence"))?
                .get(0);
            if !ascending {
                tracing::warn!(sequence = %pair.source, "a descending sequence is not kept in step on the target");
                continue;
            }
            let found: Option<String> = match &pair.target {
                SequenceTarget::Column { table, column } => target
                    .query_one(
                        "SELECT CASE WHEN to_regclass($1) IS NOT NULL THEN pg_get_serial_sequence($1, $2) END",
                        &[table, column],
                    )
                    .await
                    .map_err(pg("finding a target sequence"))?
                    .get(0),
                SequenceTarget::Named { schema, name } => {
                    Some(create_named(&sync.source, target, &pair.source, schema, name).await?)
                }
            };
            match found {
                Some(t) => {
                    sync.sources.push(pair.source.clone());
                    sync.targets.push(t);
                }
                None => tracing::warn!(
                    sequence = %pair.source,
                    "the target table has no sequence for this column (created by hand without one?): not kept in step"
                ),
            }
        }
        // Nothing left to keep in step: no query per commit.
        Ok((!sync.sources.is_empty()).then_some(sync))
    }

    /// The statement that raises every target sequence behind the source's now, to send
    /// with the next COMMIT (`None` when none moved since the last). Literals only: the
    /// names are the target's own regclass text, the values numbers.
    pub async fn raise_sql(&mut self) -> Result<Option<String>, ApplyError> {
        let rows = self
            .source
            .query(
                "SELECT pg_sequence_last_value(s::regclass) FROM unnest($1::text[]) WITH ORDINALITY AS u(s, i) ORDER BY i",
                &[&self.sources],
            )
            .await
            .map_err(|e| {
                ApplyError::Pg(PgError::from_sql(
                    "reading the source's sequences (the relay's role needs SELECT or USAGE on them: GRANT SELECT ON SEQUENCE ... TO it)",
                    e,
                ))
            })?;
        let mut raised = Vec::new();
        for (row, target_name) in rows.iter().zip(&self.targets) {
            let Some(value) = row.get::<_, Option<i64>>(0) else {
                continue;
            };
            if self.raised.get(target_name).is_some_and(|&v| v >= value) {
                continue;
            }
            raised.push(format!("({}, {value}::int8)", quote::literal(target_name)));
            // Should the commit fail, the sink stops and a new run starts from nothing.
            self.raised.insert(target_name.clone(), value);
        }
        if raised.is_empty() {
            return Ok(None);
        }
        // setval acts at once, whatever becomes of the transaction around it: a value
        // raised early is still one the source has used.
        Ok(Some(format!(
            "SELECT setval(t::regclass, v) FROM (VALUES {}) AS u(t, v) WHERE coalesce(pg_sequence_last_value(t::regclass) < v, true)",
            raised.join(", ")
        )))
    }
}

/// A named sequence on the target: found, or created with the source's type and options.
async fn create_named(
    source: &Client,
    target: &Client,
    source_name: &str,
    schema: &str,
    name: &str,
) -> Result<String, ApplyError> {
    let name = crate::pg::quote::qualified(schema, name);
    let exists: bool = target
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name.as_str()])
        .await
        .map_err(pg("looking up a target sequence"))?
        .get(0);
    if !exists {
        let row = source
            .query_one(
                "SELECT format_type(seqtypid, NULL), seqincrement, seqmin, seqmax, seqstart, seqcache, seqcycle
                 FROM pg_sequence WHERE seqrelid = $1::text::regclass",
                &[&source_name],
            )
            .await
            .map_err(pg("reading a source sequence"))?;
        let schema = crate::pg::quote::ident(schema);
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; CREATE SEQUENCE IF NOT EXISTS {name} AS {} INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} CACHE {}{}",
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3),
            row.get::<_, i64>(4),
            row.get::<_, i64>(5),
            if row.get::<_, bool>(6) { " CYCLE" } else { "" }
        );
        target
            .batch_execute(&sql)
            .await
            .map_err(pg("creating a sequence on the target"))?;
        tracing::info!(sequence = %name, "created sequence on the target");
    }
    Ok(name)
}
