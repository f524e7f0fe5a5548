//! Changes applied one statement each: the statements of each shape, queued and sent
//! pipelined, their row counts checked in order (a conflict stops the sink or is resolved
//! as configured).

use std::sync::Arc;

use tokio_postgres::Statement;
use walrelay_model::{Change, OldRow, Relation, ReplicaIdentity, Row, Value};

use super::super::conflict::{ConflictSql, EXTRA_PARAMS};
use super::super::param::TextParam;
use super::super::statements::{self, RowMatch};
use super::{ApplyError, ApplySession, ChangeAt};
use crate::config::OnConflict;
use crate::pg::PgError;

/// Statements queued before they are sent, at most...
const MAX_PENDING: usize = 2000;

/// ... and bytes of their values: a queue of wide rows is sent sooner.
const MAX_PENDING_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Shape {
    Insert,
    /// `complete`: every new value was sent (no unchanged TOAST), so the row could be
    /// inserted whole.
    Update {
        set: Vec<bool>,
        how: RowMatch,
        complete: bool,
    },
    Delete(RowMatch),
}

/// What the row count of a statement means.
pub(super) enum Check {
    /// Must be exactly one: anything else is a conflict that stops the sink.
    ExactlyOne,
    /// This many rows means a conflict was met and resolved as `resolution` says; log it.
    ResolvedAt {
        rows: u64,
        resolution: &'static str,
    },
    Anything,
    /// A statement of two writable nodes (`conflict`): it returns a row per conflict it
    /// met (kind, the target row's commit time and node, resolution), resolved and
    /// logged, or, with `stop`, left for the sink to stop on.
    Conflicts {
        stop: bool,
    },
}

pub(super) struct Pending {
    pub(super) statement: Statement,
    pub(super) params: Vec<TextParam>,
    pub(super) check: Check,
    /// The table it changes; none for walrelay's own bookkeeping.
    pub(super) table: Option<Arc<Relation>>,
    /// What the statement did, for messages: "insert of (id)=(42)".
    pub(super) what: String,
    pub(super) at: ChangeAt,
}

impl ApplySession {
    /// The queued statements, leaving none (and their byte count at zero).
    pub(super) fn take_pending(&mut self) -> Vec<Pending> {
        self.queued_bytes = 0;
        std::mem::take(&mut self.pending)
    }

    /// Apply one change by its own statement.
    pub(super) async fn apply_row(
        &mut self,
        change: &Change,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        match change {
            Change::Insert { relation, new } => self.insert(relation, new, at).await?,
            Change::Update { relation, old, new } => {
                self.update(relation, old.as_ref(), new, at).await?
            }
            Change::Delete { relation, old } => self.delete(relation, old, at).await?,
            Change::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                self.truncate(relations, *restart_identity, *cascade, at)
                    .await?
            }
            // Logical messages carry no data for tables; `apply` replays schema changes.
            Change::Message { .. } | Change::Ddl(_) => {}
        }
        if self.pending.len() >= MAX_PENDING || self.queued_bytes >= MAX_PENDING_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn insert(
        &mut self,
        rel: &Arc<Relation>,
        new: &Row,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        self.check_relation(rel).await?;
        let params = values(new.0.iter())?;
        let what = format!("insert of {}", key_text(rel, new));
        let policy = self.policy(rel);
        if self.two_writers.is_some() && rel.key_columns().next().is_some() {
            return self
                .queue_resolving(rel, Shape::Insert, params, new, what, at)
                .await;
        }
        let check = match policy {
            OnConflict::Error => Check::Anything,
            OnConflict::Skip => Check::ResolvedAt {
                rows: 0,
                resolution: "the row exists already; the insert was skipped",
            },
            OnConflict::Apply | OnConflict::LastWriterWins
                if rel.key_columns().next().is_some() =>
            {
                Check::ResolvedAt {
                    rows: 1,
                    resolution: "the row exists already; it was updated to the inserted values",
                }
            }
            OnConflict::Apply | OnConflict::LastWriterWins => Check::Anything,
        };
        self.queue(rel, Shape::Insert, params, check, what, at)
            .await
    }

    async fn update(
        &mut self,
        rel: &Arc<Relation>,
        old: Option<&OldRow>,
        new: &Row,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        self.check_relation(rel).await?;
        let (how, match_params, what) = row_match(rel, old, Some(new), "update", &self.target)?;
        // Set what was sent, except a key the row was found by and kept: setting it is a
        // no-op, and refused for GENERATED ALWAYS identity columns.
        let key_kept = old.is_none();
        let set: Vec<bool> = new
            .0
            .iter()
            .zip(&rel.columns)
            .zip(self.settable(rel))
            .map(|((v, c), &may)| {
                may && *v != Value::UnchangedToast
                    && !(key_kept && c.is_key && matches!(how, RowMatch::Key(_)))
            })
            .collect();
        let complete = !new.0.contains(&Value::UnchangedToast);
        let policy = self.policy(rel);
        let mut params = if complete && policy == OnConflict::Apply {
            values(new.0.iter())?
        } else {
            values(new.0.iter().zip(&set).filter(|(_, &s)| s).map(|(v, _)| v))?
        };
        params.extend(match_params);
        if self.two_writers.is_some() && matches!(how, RowMatch::Key(_)) {
            let shape = Shape::Update { set, how, complete };
            return self
                .queue_resolving(rel, shape, params, new, what, at)
                .await;
        }
        let check = match policy {
            OnConflict::Error => Check::ExactlyOne,
            OnConflict::Skip => Check::ResolvedAt {
                rows: 0,
                resolution: "no such row; the update was skipped",
            },
            OnConflict::Apply | OnConflict::LastWriterWins if complete => Check::ResolvedAt {
                rows: 1,
                resolution: "no such row; the new row was inserted",
            },
            OnConflict::Apply | OnConflict::LastWriterWins => Check::ResolvedAt {
                rows: 0,
                resolution: "no such row, and the source did not send its unchanged TOAST values; the update was skipped",
            },
        };
        self.queue(
            rel,
            Shape::Update { set, how, complete },
            params,
            check,
            what,
            at,
        )
        .await
    }

    async fn delete(
        &mut self,
        rel: &Arc<Relation>,
        old: &OldRow,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        self.check_relation(rel).await?;
        let (how, params, what) = row_match(rel, Some(old), None, "delete", &self.target)?;
        if let (Some(_), RowMatch::Key(_), OldRow::Key(key)) = (&self.two_writers, &how, old) {
            // The incoming "row" of a delete is its key.
            return self
                .queue_resolving(rel, Shape::Delete(how), params, key, what, at)
                .await;
        }
        let check = match self.policy(rel) {
            OnConflict::Error => Check::ExactlyOne,
            OnConflict::Skip | OnConflict::Apply | OnConflict::LastWriterWins => {
                Check::ResolvedAt {
                    rows: 0,
                    resolution: "no such row; the delete was skipped",
                }
            }
        };
        self.queue(rel, Shape::Delete(how), params, check, what, at)
            .await
    }

    pub(super) async fn queue(
        &mut self,
        rel: &Arc<Relation>,
        shape: Shape,
        params: Vec<TextParam>,
        check: Check,
        what: String,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        let key = (Arc::as_ptr(rel) as usize, shape);
        let statement = match self.statements.get(&key) {
            Some(s) => s.clone(),
            None => {
                let sql = self.sql_for(rel, &key.1);
                let s = self
                    .client
                    .prepare(&sql)
                    .await
                    .map_err(|e| ApplyError::Target {
                        target: self.target.clone(),
                        message: format!(
                            "cannot apply changes of {}: {}",
                            rel.qualified_name(),
                            PgError::from_sql("preparing", e)
                        ),
                    })?;
                self.statements.insert(key, s.clone());
                s
            }
        };
        let bytes = params
            .iter()
            .map(|p| p.0.as_ref().map_or(0, String::len))
            .sum::<usize>();
        self.pending_bytes += bytes;
        self.queued_bytes += bytes;
        self.pending.push(Pending {
            statement,
            params,
            check,
            table: Some(rel.clone()),
            what,
            at,
        });
        Ok(())
    }

    fn sql_for(&self, rel: &Relation, shape: &Shape) -> String {
        let key: Vec<usize> = rel.key_columns().map(|(i, _)| i).collect();
        let policy = self.policy(rel);
        if let Some(two) = &self.two_writers {
            if let Some(sql) = two_writers_sql(rel, shape, policy, two, &key) {
                return sql;
            }
        }
        match (shape, policy) {
            (Shape::Insert, OnConflict::Error) => statements::insert(rel, false),
            (Shape::Insert, OnConflict::Skip) => statements::insert(rel, true),
            (Shape::Insert, OnConflict::Apply) if !key.is_empty() => {
                statements::insert_or_update(rel, &key)
            }
            (Shape::Insert, _) => statements::insert(rel, false),
            (
                Shape::Update {
                    set,
                    how,
                    complete: true,
                },
                OnConflict::Apply,
            ) => statements::update_or_insert(rel, set, how),
            (Shape::Update { set, how, .. }, _) => statements::update(rel, set, how),
            (Shape::Delete(how), _) => statements::delete(rel, how),
        }
    }

    /// Send the queued statements, pipelined, and check their results in order.
    pub async fn flush(&mut self) -> Result<(), ApplyError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = self.take_pending();
        let client = &self.client;
        // Sent in order, pipelined: each future sends its statement when first polled.
        let results = futures_util::future::join_all(pending.iter().map(|p| async move {
            if let Check::Conflicts { .. } = p.check {
                use futures_util::TryStreamExt;
                let rows: Vec<tokio_postgres::Row> = client
                    .query_raw(&p.statement, p.params.iter())
                    .await?
                    .try_collect()
                    .await?;
                Ok((rows.len() as u64, rows))
            } else {
                client
                    .execute_raw(&p.statement, p.params.iter())
                    .await
                    .map(|n| (n, Vec::new()))
            }
        }))
        .await;
        for (p, result) in pending.iter().zip(results) {
            let table = match &p.table {
                Some(t) => t.qualified_name().to_string(),
                None => "walrelay.progress".to_string(),
            };
            let (rows, conflicts) = result.map_err(|e| {
                let error = PgError::from_sql("", e);
                let table = table.clone();
                if error.code() == Some("23505") {
                    ApplyError::Conflict {
                        table,
                        at: p.at,
                        what: format!("{}: {}", p.what, error.to_string().trim_start_matches(": ")),
                    }
                } else {
                    ApplyError::Statement {
                        table,
                        at: p.at,
                        error,
                    }
                }
            })?;
            match p.check {
                Check::ExactlyOne if rows == 1 => {}
                Check::ExactlyOne => {
                    return Err(ApplyError::Conflict {
                        table,
                        at: p.at,
                        what: if rows == 0 {
                            format!("{} found no such row on the target", p.what)
                        } else {
                            format!("{} matched {rows} rows on the target", p.what)
                        },
                    })
                }
                Check::Conflicts { stop } => {
                    for c in &conflicts {
                        let (kind, local_time, local_node, resolution): (
                            String,
                            Option<String>,
                            Option<String>,
                            String,
                        ) = (c.get(0), c.get(1), c.get(2), c.get(3));
                        let local = match local_time {
                            Some(t) => format!(
                                "the target's row was committed at {t} by node {}",
                                local_node.as_deref().unwrap_or("unknown")
                            ),
                            None => "the target has no such row".into(),
                        };
                        // The change's own, not the session's: the group went on since.
                        let remote = p.params[p.params.len() - EXTRA_PARAMS]
                            .0
                            .clone()
                            .unwrap_or_default();
                        if stop {
                            return Err(ApplyError::Conflict {
                                table,
                                at: p.at,
                                what: format!(
                                    "{}: {kind}: {local}; the change was committed on the source at {remote}",
                                    p.what
                                ),
                            });
                        }
                        tracing::warn!(
                            table = %table,
                            at = %p.at,
                            "conflict resolved ({resolution}, in walrelay.conflicts): {}: {kind}: {local}; the change was committed on the source at {remote}",
                            p.what
                        );
                    }
                }
                Check::ResolvedAt {
                    rows: r,
                    resolution,
                } if r == rows => {
                    tracing::warn!(
                        table = %table,
                        at = %p.at,
                        "conflict resolved: {}: {resolution}",
                        p.what
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl ApplySession {
    /// Queue the statement of two writable nodes (`conflict`) for a change whose own
    /// parameters are `params` and whose incoming row (or key) is `incoming`.
    async fn queue_resolving(
        &mut self,
        rel: &Arc<Relation>,
        shape: Shape,
        mut params: Vec<TextParam>,
        incoming: &Row,
        what: String,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        params.extend(self.conflict_params(rel, incoming, &what, at));
        let check = Check::Conflicts {
            stop: self.policy(rel) == OnConflict::Error,
        };
        self.queue(rel, shape, params, check, what, at).await
    }

    /// The parameters a statement of two writers takes after the change's own
    /// (`conflict::EXTRA_PARAMS`, the source's commit time first). `row` is a whole row,
    /// or the key's values.
    fn conflict_params(
        &self,
        rel: &Relation,
        row: &Row,
        what: &str,
        at: ChangeAt,
    ) -> Vec<TextParam> {
        let two = self.two_writers.as_ref().expect("two writers");
        let names: Vec<&str> = if row.0.len() == rel.columns.len() {
            rel.columns.iter().map(|c| c.name.as_str()).collect()
        } else {
            rel.key_columns().map(|(_, c)| c.name.as_str()).collect()
        };
        let incoming: serde_json::Map<String, serde_json::Value> = names
            .into_iter()
            .zip(&row.0)
            .map(|(name, v)| {
                let value = match v {
                    Value::Null => serde_json::Value::Null,
                    Value::UnchangedToast => serde_json::Value::String("(unchanged)".into()),
                    Value::Text(t) => serde_json::Value::String(t.clone()),
                    Value::Binary(b) => {
                        serde_json::Value::String(String::from_utf8_lossy(b).into())
                    }
                };
                (name.to_string(), value)
            })
            .collect();
        vec![
            TextParam(Some(two.remote_time.clone())),
            TextParam(Some(two.remote_node.clone())),
            TextParam(Some(at.to_string())),
            TextParam(Some(serde_json::Value::Object(incoming).to_string())),
            TextParam(Some(what.to_string())),
        ]
    }
}

/// The statement of two writable nodes for a shape, where the row is found by a key.
fn two_writers_sql(
    rel: &Relation,
    shape: &Shape,
    policy: OnConflict,
    two: &super::TwoWriters,
    key: &[usize],
) -> Option<String> {
    if key.is_empty() {
        return None;
    }
    let sql = ConflictSql {
        rel,
        policy,
        relay: &two.relay,
        detect_newer: two.detect_newer,
    };
    Some(match shape {
        Shape::Insert => sql.insert(key),
        Shape::Update {
            set,
            how: RowMatch::Key(k),
            complete,
        } => {
            let positional = *complete && policy == OnConflict::Apply;
            let mut n = 0;
            let assignments: Vec<String> = rel
                .columns
                .iter()
                .enumerate()
                .filter(|(i, _)| set[*i])
                .map(|(i, c)| {
                    n += 1;
                    let p = if positional { i + 1 } else { n };
                    format!("{} = ${p}", crate::pg::quote::ident(&c.name))
                })
                .collect();
            let first_key_param = if positional { rel.columns.len() } else { n } + 1;
            sql.update(&assignments, k, first_key_param, positional)
        }
        Shape::Delete(RowMatch::Key(k)) => sql.delete(k),
        _ => return None,
    })
}

/// Values as parameters; an unchanged TOAST value cannot be one.
pub(super) fn values<'a>(
    vals: impl Iterator<Item = &'a Value>,
) -> Result<Vec<TextParam>, ApplyError> {
    Ok(vals
        .map(|v| match v {
            Value::Null | Value::UnchangedToast => TextParam(None),
            Value::Text(t) => TextParam(Some(t.clone())),
            Value::Binary(b) => TextParam(Some(String::from_utf8_lossy(b).into_owned())),
        })
        .collect())
}

/// `(id, region)=(42, eu)` from the key columns of a full row, for messages.
pub(super) fn key_text(rel: &Relation, row: &Row) -> String {
    let (names, vals): (Vec<&str>, Vec<String>) = rel
        .key_columns()
        .map(|(i, c)| (c.name.as_str(), shown(&row.0[i])))
        .unzip();
    format!("({})=({})", names.join(", "), vals.join(", "))
}

pub(super) fn shown(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::UnchangedToast => "(unchanged)".into(),
        Value::Text(t) if t.len() > 64 => format!("{}…", &t[..t.floor_char_boundary(64)]),
        Value::Text(t) => t.clone(),
        Value::Binary(_) => "(binary)".into(),
    }
}

/// How to find the row an update or delete touches, its parameters, and a description.
pub(super) fn row_match(
    rel: &Relation,
    old: Option<&OldRow>,
    new: Option<&Row>,
    verb: &str,
    target: &str,
) -> Result<(RowMatch, Vec<TextParam>, String), ApplyError> {
    let key: Vec<usize> = rel.key_columns().map(|(i, _)| i).collect();
    let no_identity = || {
        ApplyError::Target {
        target: target.to_string(),
        message: format!(
            "cannot {verb} in {}: the source table has no replica identity, so the row cannot be found",
            rel.qualified_name()
        ),
    }
    };
    match (rel.replica_identity, old) {
        (ReplicaIdentity::Full, Some(OldRow::Full(row))) => {
            if row.0.contains(&Value::UnchangedToast) {
                return Err(ApplyError::Target {
                    target: target.to_string(),
                    message: format!(
                        "cannot {verb} in {}: an old value was not sent (unchanged TOAST)",
                        rel.qualified_name()
                    ),
                });
            }
            let nulls: Vec<bool> = row.0.iter().map(|v| *v == Value::Null).collect();
            let params = values(row.0.iter().filter(|v| **v != Value::Null))?;
            let what = format!(
                "{verb} of the row ({})",
                row.0.iter().map(shown).collect::<Vec<_>>().join(", ")
            );
            Ok((RowMatch::Full(nulls), params, what))
        }
        (_, Some(OldRow::Key(k))) if !key.is_empty() => {
            let params = values(k.0.iter())?;
            let names: Vec<&str> = key.iter().map(|&i| rel.columns[i].name.as_str()).collect();
            let what = format!(
                "{verb} of ({})=({})",
                names.join(", "),
                k.0.iter().map(shown).collect::<Vec<_>>().join(", ")
            );
            Ok((RowMatch::Key(key), params, what))
        }
        (_, None) if !key.is_empty() => {
            let row = new.ok_or_else(no_identity)?;
            let params = values(key.iter().map(|&i| &row.0[i]))?;
            let what = format!("{verb} of {}", key_text(rel, row));
            Ok((RowMatch::Key(key), params, what))
        }
        _ => Err(no_identity()),
    }
}
