//! Conflicts between two writable nodes (`source.origin = "none"`): the statements that
//! apply a change only where the target's row allows it, resolve a conflict as the table's
//! `on_conflict` says and record it in `walrelay.conflicts`, all in one statement, so that
//! changes stay pipelined; and the target's table and function they use.
//!
//! A conflict is: an insert of a key the target has (`insert_exists`), an update or delete
//! of a row the target lacks (`update_missing`, `delete_missing`), or an update or delete
//! of a row that someone other than this relay committed on the target after the incoming
//! change was committed on its source (`update_newer_local`, `delete_newer_local`). Who
//! wrote a row and when is read from its `xmin` (`track_commit_timestamp`): this relay's
//! transactions carry its replication origin, and with it the source's commit time
//! (`pg_replication_origin_xact_setup`), so what it applied is told from local writes.

use walrelay_model::Relation;

use super::session::{ApplyError, ApplySession, TwoWriters};
use crate::config::{OnConflict, PostgresSinkConfig};
use crate::pg::conninfo::ConnInfo;
use crate::pg::{quote, PgError};

/// The target's objects: the conflict log, the nodes' names for ties, and the lookup of a
/// row's last writer. Run under an advisory lock: two sinks may set up one target at once.
pub const SETUP_SQL: &str = r#"
SELECT pg_advisory_xact_lock(hashtext('walrelay.conflicts'));
CREATE SCHEMA IF NOT EXISTS walrelay;
CREATE TABLE IF NOT EXISTS walrelay.conflicts (
    id bigserial PRIMARY KEY,
    noted_at timestamptz NOT NULL DEFAULT now(),
    relay text NOT NULL,
    table_name text NOT NULL,
    kind text NOT NULL,
    change text NOT NULL,
    local_row jsonb,
    local_commit_time timestamptz,
    local_node text,
    remote_row jsonb,
    remote_commit_time timestamptz,
    remote_node text,
    remote_position text NOT NULL,
    resolution text NOT NULL);
CREATE TABLE IF NOT EXISTS walrelay.nodes (
    origin text PRIMARY KEY,
    node text NOT NULL);
COMMENT ON TABLE walrelay.nodes IS 'the node whose changes each replication origin applies; '''' for this node''s own writes';
CREATE OR REPLACE FUNCTION walrelay.row_writer(x xid, OUT commit_time timestamptz, OUT node text, OUT origin text)
LANGUAGE sql STABLE AS $fn$
    SELECT c.timestamp,
           (SELECT n.node FROM walrelay.nodes n WHERE n.origin = coalesce(r.roname, '')),
           r.roname::text
      FROM pg_catalog.pg_xact_commit_timestamp_origin(x) c
      LEFT JOIN pg_catalog.pg_replication_origin r ON r.roident = c.roident
$fn$;
"#;

/// Records which node writes under `origin` ('' for the target itself).
pub const NODE_SQL: &str = "INSERT INTO walrelay.nodes (origin, node) VALUES ($1, $2) \
     ON CONFLICT (origin) DO UPDATE SET node = EXCLUDED.node";

/// The statements' parameters after the change's own: the source's commit time, its
/// node, the change's position, the incoming row (JSON) and the change in words.
pub const EXTRA_PARAMS: usize = 5;

/// A node's name for ties: its system identifier and database, the same whichever relay
/// reads it.
const NODE_NAME_SQL: &str =
    "SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()";

/// Set up the target for two writable nodes: its objects, the nodes' names, and whether
/// rows can be told by their last writer. `last_writer_wins` cannot work without that.
pub async fn prepare(
    session: &ApplySession,
    holds_origin: bool,
    relay: &str,
    config: &PostgresSinkConfig,
    source: Option<&ConnInfo>,
) -> Result<TwoWriters, ApplyError> {
    let client = session.client();
    let target_err = |what: &str, e: tokio_postgres::Error| {
        ApplyError::Pg(PgError::from_sql(format!("{what} on the target"), e))
    };
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL walrelay.own_ddl = on; {SETUP_SQL} COMMIT"
        ))
        .await
        .map_err(|e| target_err("creating walrelay.conflicts", e))?;
    let track: bool = client
        .query_one(
            "SELECT current_setting('track_commit_timestamp')::bool",
            &[],
        )
        .await
        .map_err(|e| target_err("reading track_commit_timestamp", e))?
        .get(0);
    let own = node_name(client).await;
    let remote = match source {
        Some(info) => match crate::pg::sql::connect(info).await {
            Ok(c) => node_name(&c).await,
            Err(e) => Err(e.to_string()),
        },
        None => Err("no source connection".into()),
    };
    let (own, remote) = match (own, remote) {
        (Ok(own), Ok(remote)) => (own, remote),
        (own, remote) => {
            let why = own.err().or(remote.err()).unwrap_or_default();
            tracing::warn!(error = %why, "the nodes' system identifiers cannot be read (pg_control_system: a superuser or pg_monitor): commits at the same microsecond on both nodes may then resolve differently on each");
            (String::new(), relay.to_string())
        }
    };
    for (origin, node) in [("", &own), (relay, &remote)] {
        client
            .execute(NODE_SQL, &[&origin, node])
            .await
            .map_err(|e| target_err("recording the nodes", e))?;
    }
    let detect_newer = holds_origin && track;
    if let Some(missing) = lacking_for_newer(track, holds_origin) {
        if config.uses_last_writer_wins() {
            return Err(ApplyError::Target {
                target: config.name.clone(),
                message: format!("on_conflict = \"last_writer_wins\" needs {missing}"),
            });
        }
        tracing::warn!(sink = %config.name, "rows changed on the target after the incoming change are not found as conflicts without {missing}: only missing and existing keys are");
    }
    Ok(TwoWriters {
        relay: relay.to_string(),
        remote_node: remote,
        detect_newer,
        remote_time: String::new(),
    })
}

/// What a target lacks for rows changed there after an incoming change to be found (for
/// `walrelay check` and the sink's start alike), if anything.
pub fn lacking_for_newer(track_commit_timestamp: bool, origin: bool) -> Option<String> {
    let mut missing = Vec::new();
    if !track_commit_timestamp {
        missing.push("track_commit_timestamp = on (a restart)");
    }
    if !origin {
        missing.push("a replication origin for the sink (a superuser role, or EXECUTE on the pg_replication_origin_* functions)");
    }
    (!missing.is_empty()).then(|| missing.join(" and "))
}

async fn node_name(client: &tokio_postgres::Client) -> Result<String, String> {
    client
        .query_one(NODE_NAME_SQL, &[])
        .await
        .map(|r| r.get(0))
        .map_err(|e| PgError::from_sql("", e).to_string())
}

/// How many conflicts relay `relay` logged on a target, if it logs there.
pub async fn logged(client: &tokio_postgres::Client, relay: &str) -> Option<i64> {
    client
        .query_one(
            "SELECT count(*) FROM walrelay.conflicts WHERE relay = $1",
            &[&relay],
        )
        .await
        .ok()
        .map(|r| r.get(0))
}

/// Where one table's statements stand.
pub struct ConflictSql<'a> {
    pub rel: &'a Relation,
    pub policy: OnConflict,
    /// The relay's replication origin on the target (and its name in the log).
    pub relay: &'a str,
    /// Rows can be told by their last writer (`session::TwoWriters::detect_newer`).
    pub detect_newer: bool,
}

impl ConflictSql<'_> {
    fn table(&self) -> String {
        quote::qualified(&self.rel.schema, &self.rel.name)
    }

    fn cols(&self) -> Vec<String> {
        self.rel
            .columns
            .iter()
            .map(|c| quote::ident(&c.name))
            .collect()
    }

    /// `prefix.k1 = $first AND ...` over the key columns.
    fn key_condition(&self, key: &[usize], first: usize, prefix: &str) -> String {
        key.iter()
            .enumerate()
            .map(|(n, &i)| {
                format!(
                    "{prefix}{} = ${}",
                    quote::ident(&self.rel.columns[i].name),
                    first + n
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The target's row, locked, with its last writer where it can be told (without
    /// `track_commit_timestamp` asking is an error).
    fn local(&self, key: &[usize], first: usize) -> String {
        let (writer, from) = if self.detect_newer {
            (
                "w.commit_time, w.node, w.origin",
                ", walrelay.row_writer(t.xmin) w",
            )
        } else {
            (
                "NULL::timestamptz AS commit_time, NULL::text AS node, NULL::text AS origin",
                "",
            )
        };
        format!(
            "loc AS (SELECT {writer}, to_jsonb(t.*) AS row FROM {} t{from} WHERE {} FOR UPDATE OF t)",
            self.table(),
            self.key_condition(key, first, "t.")
        )
    }

    /// The incoming row (parameters `$1..$n`), where the target has none.
    fn insert_missing(&self) -> String {
        let cols = self.cols();
        let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        format!(
            "ins AS (INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} WHERE NOT EXISTS (SELECT 1 FROM loc) RETURNING 1)",
            self.table(),
            cols.join(", "),
            params.join(", ")
        )
    }

    /// The target's row, if someone else committed it after the incoming change.
    fn newer(&self, e: usize) -> String {
        if !self.detect_newer {
            return "newer AS (SELECT * FROM loc WHERE false)".into();
        }
        format!(
            "newer AS (SELECT * FROM loc WHERE loc.origin IS DISTINCT FROM {} \
               AND (loc.commit_time, loc.node) > (${e}::timestamptz, ${}::text))",
            quote::literal(self.relay),
            e + 1
        )
    }

    /// The end of the statement: what conflicted, from `conflicts` (kind, row, commit_time,
    /// node, resolution), logged (or only returned, when the policy is to stop).
    fn finish(&self, ctes: Vec<String>, conflicts: &str, e: usize) -> String {
        let mut ctes = ctes;
        let tail = if self.policy == OnConflict::Error {
            // Every parameter is named, as where the conflict is logged.
            format!(
                "SELECT c.kind, c.commit_time::text, c.node, c.resolution FROM ({conflicts}) c, \
                 (SELECT ${e}::timestamptz, ${}::text, ${}::text, ${}::jsonb, ${}::text) AS named",
                e + 1,
                e + 2,
                e + 3,
                e + 4
            )
        } else {
            ctes.push(format!(
                "log AS (INSERT INTO walrelay.conflicts (relay, table_name, kind, change, local_row, \
                   local_commit_time, local_node, remote_row, remote_commit_time, remote_node, \
                   remote_position, resolution) \
                 SELECT {relay}, {table}, c.kind, ${what}, c.row, c.commit_time, c.node, ${row}::jsonb, \
                   ${e}::timestamptz, ${node}::text, ${pos}, c.resolution FROM ({conflicts}) c \
                 RETURNING kind, local_commit_time::text, local_node, resolution)",
                relay = quote::literal(self.relay),
                table = quote::literal(&self.rel.qualified_name().to_string()),
                node = e + 1,
                pos = e + 2,
                row = e + 3,
                what = e + 4,
            ));
            "SELECT * FROM log".into()
        };
        format!("WITH {} {tail}", ctes.join(", "))
    }

    /// An insert: where the key exists, the policy decides (last writer: the later commit).
    /// Parameters: every column's value, then the extras.
    pub fn insert(&self, key: &[usize]) -> String {
        let cols = self.cols();
        let n = cols.len();
        let e = n + 1;
        let params: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
        let remote_wins = match self.policy {
            OnConflict::Apply => "true".to_string(),
            OnConflict::Skip | OnConflict::Error => "false".to_string(),
            OnConflict::LastWriterWins => format!(
                "coalesce((loc.commit_time, loc.node) < (${e}::timestamptz, ${}::text), true)",
                e + 1
            ),
        };
        let mut ctes = vec![self.local(key, 1), self.insert_missing()];
        let assignments = super::statements::set_all_but_key(&cols, &params, key);
        if self.policy != OnConflict::Error && !assignments.is_empty() {
            ctes.push(format!(
                "upd AS (UPDATE {} SET {} WHERE {} AND EXISTS (SELECT 1 FROM loc WHERE {remote_wins}) RETURNING 1)",
                self.table(),
                assignments.join(", "),
                self.key_condition(key, 1, "")
            ));
        }
        let conflicts = format!(
            "SELECT 'insert_exists' AS kind, loc.row, loc.commit_time, loc.node, \
               CASE WHEN {remote_wins} THEN 'apply_remote' ELSE 'keep_local' END AS resolution FROM loc"
        );
        self.finish(ctes, &conflicts, e)
    }

    /// An update found by its old key. `assignments` set the columns from the parameters
    /// before the key's; `insert_missing` inserts the whole row (parameters `$1..$n`)
    /// where the target lacks it.
    pub fn update(
        &self,
        assignments: &[String],
        key: &[usize],
        first_key_param: usize,
        insert_missing: bool,
    ) -> String {
        let e = first_key_param + key.len();
        let mut ctes = vec![self.local(key, first_key_param), self.newer(e)];
        let keep_newer = self.policy != OnConflict::Apply;
        if !assignments.is_empty() {
            ctes.push(format!(
                "upd AS (UPDATE {} SET {} WHERE {}{} RETURNING 1)",
                self.table(),
                assignments.join(", "),
                self.key_condition(key, first_key_param, ""),
                if keep_newer {
                    " AND NOT EXISTS (SELECT 1 FROM newer)"
                } else {
                    ""
                }
            ));
        }
        if insert_missing {
            ctes.push(self.insert_missing());
        }
        let conflicts = self.row_conflicts(
            "update",
            keep_newer,
            if insert_missing {
                "inserted"
            } else {
                "skipped"
            },
        );
        self.finish(ctes, &conflicts, e)
    }

    /// A delete found by its old key (parameters `$1..`).
    pub fn delete(&self, key: &[usize]) -> String {
        let e = 1 + key.len();
        let keep_newer = self.policy != OnConflict::Apply;
        let ctes = vec![
            self.local(key, 1),
            self.newer(e),
            format!(
                "del AS (DELETE FROM {} WHERE {}{} RETURNING 1)",
                self.table(),
                self.key_condition(key, 1, ""),
                if keep_newer {
                    " AND NOT EXISTS (SELECT 1 FROM newer)"
                } else {
                    ""
                }
            ),
        ];
        let conflicts = self.row_conflicts("delete", keep_newer, "skipped");
        self.finish(ctes, &conflicts, e)
    }

    /// The conflicts of an update or delete: a newer target row, or none.
    fn row_conflicts(&self, verb: &str, keep_newer: bool, missing: &str) -> String {
        format!(
            "SELECT '{verb}_newer_local' AS kind, row, commit_time, node, '{}' AS resolution FROM newer \
             UNION ALL SELECT '{verb}_missing', NULL::jsonb, NULL::timestamptz, NULL::text, '{missing}' \
             WHERE NOT EXISTS (SELECT 1 FROM loc)",
            if keep_newer {
                "keep_local"
            } else {
                "apply_remote"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walrelay_model::{Column, ReplicaIdentity};

    fn rel() -> Relation {
        let col = |name: &str, is_key| Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            type_name: "int4".into(),
            is_key,
        };
        Relation {
            oid: 1,
            schema: "public".into(),
            name: "t\"x".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", true), col("node", false)],
        }
    }

    #[test]
    fn the_last_writer_decides_an_existing_key_and_names_are_quoted() {
        let r = rel();
        let sql = ConflictSql {
            rel: &r,
            policy: OnConflict::LastWriterWins,
            relay: "slot/it's",
            detect_newer: true,
        }
        .insert(&[0]);
        assert!(sql.contains("FROM \"public\".\"t\"\"x\" t"), "{sql}");
        assert!(sql.contains("t.\"id\" = $1"), "{sql}");
        assert!(
            sql.contains("(loc.commit_time, loc.node) < ($3::timestamptz, $4::text)"),
            "{sql}"
        );
        assert!(sql.contains("'slot/it''s'"), "{sql}");
        assert!(sql.contains("$7"), "the change in words: {sql}");
        assert!(!sql.contains("$8"), "{sql}");
    }

    #[test]
    fn to_stop_nothing_is_logged_and_a_newer_row_is_kept() {
        let r = rel();
        let sql = ConflictSql {
            rel: &r,
            policy: OnConflict::Error,
            relay: "r",
            detect_newer: true,
        }
        .delete(&[0]);
        assert!(!sql.contains("walrelay.conflicts"), "{sql}");
        assert!(sql.contains("NOT EXISTS (SELECT 1 FROM newer)"), "{sql}");
    }
}
