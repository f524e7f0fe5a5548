//! Schema changes on the target: a source command replayed at its place in the apply
//! transaction (mode `statements`), and the additive changes the stream itself shows
//! (mode `additive`: a relation arrives with a column the target lacks, or a wider type).
//!
//! A replayed command runs under a savepoint, with the source's `search_path` and as the
//! role that ran it on the source where the target has that role, so that what it creates
//! belongs to the same owner. What cannot be replayed (`Ddl::unsafe_reason`, or the target
//! refuses it) follows `[ddl] on_unsafe`: skipped with a warning naming the command, or
//! the relay stops at it. A DROP of something the target does not have is done already.

use walrelay_model::{Ddl, DdlAction, Relation};

use super::{ApplyError, ApplySession, ChangeAt};
use crate::config::OnUnsafeDdl;
use crate::ddl::statement;
use crate::pg::{quote, PgError};

/// How this session treats schema changes.
#[derive(Debug, Clone, Default)]
pub struct DdlSettings {
    pub on_unsafe: OnUnsafeDdl,
    /// Add columns and widen types from the stream's relations (mode `additive`).
    pub additive: bool,
    /// The sink's name in `walrelay.copies`: a table the stream creates is held complete
    /// from its creation.
    pub copies_name: Option<String>,
}

impl ApplySession {
    /// Replay `ddl` in the open transaction, after every change before it.
    pub async fn replay_ddl(&mut self, ddl: &Ddl, at: ChangeAt) -> Result<(), ApplyError> {
        self.begin().await?;
        self.apply_runs().await?;
        self.flush().await?;
        if let Some(reason) = &ddl.unsafe_reason {
            return self.not_replayed(ddl, at, reason);
        }
        let text = match ddl.tag.as_str() {
            // Not possible inside a transaction; the target is a replica, so building the
            // index with a lock is what it can do.
            "CREATE INDEX" | "DROP INDEX" => statement::without_concurrently(&ddl.statement),
            _ => ddl.statement.clone(),
        };
        let client = &self.client;
        let err = |e| ApplyError::Pg(PgError::from_sql("preparing a schema change", e));
        client
            .batch_execute("SAVEPOINT walrelay_ddl")
            .await
            .map_err(err)?;
        let previous_path: String = client
            .query_one("SELECT pg_catalog.current_setting('search_path')", &[])
            .await
            .map_err(err)?
            .get(0);
        client
            .execute(
                "SELECT pg_catalog.set_config('search_path', $1, true)",
                &[&ddl.search_path],
            )
            .await
            .map_err(err)?;
        let role = match &ddl.role {
            Some(role) => {
                let usable: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)
                                AND pg_catalog.pg_has_role(current_user, $1, 'MEMBER')",
                        &[role],
                    )
                    .await
                    .map_err(err)?
                    .get(0);
                usable.then_some(role)
            }
            None => None,
        };
        if let Some(role) = role {
            client
                .batch_execute(&format!("SET ROLE {}", quote::ident(role)))
                .await
                .map_err(err)?;
        }
        let ran = client.batch_execute(&text).await;
        if ran.is_ok() {
            let restore = format!(
                "RESET ROLE; SELECT pg_catalog.set_config('search_path', {}, true); RELEASE SAVEPOINT walrelay_ddl",
                quote::literal(&previous_path)
            );
            client.batch_execute(&restore).await.map_err(err)?;
            self.after_ddl(ddl, at).await?;
            crate::failpoint::POSTGRES_DDL_REPLAYED.hit();
            tracing::info!(target = %self.target, at = %at, command = %ddl.tag, tables = ?ddl.tables.iter().map(|t| format!("{}.{}", t.schema, t.name)).collect::<Vec<_>>(), "schema change replayed");
            return Ok(());
        }
        let error = ran.expect_err("checked above");
        // The savepoint undoes the command, the role and the search_path together.
        client
            .batch_execute("ROLLBACK TO SAVEPOINT walrelay_ddl; RELEASE SAVEPOINT walrelay_ddl")
            .await
            .map_err(err)?;
        let missing = matches!(
            error.code().map(|c| c.code()),
            Some("42704" | "42P01" | "3F000" | "42883")
        );
        if ddl.tag.starts_with("DROP") && missing {
            tracing::info!(target = %self.target, at = %at, command = %ddl.statement, "schema change not replayed: the target does not have what it drops");
            return Ok(());
        }
        let error = PgError::from_sql("replaying it", error);
        // A deadlock or a lost connection says nothing of the command: the relay retries
        // the whole transaction rather than skip it.
        if error.is_transient() {
            return Err(ApplyError::Statement {
                table: ddl.tag.clone(),
                at,
                error,
            });
        }
        self.not_replayed(ddl, at, &format!("the target refused it: {error}"))
    }

    fn not_replayed(&self, ddl: &Ddl, at: ChangeAt, reason: &str) -> Result<(), ApplyError> {
        match self.ddl.on_unsafe {
            OnUnsafeDdl::Skip => {
                tracing::warn!(
                    target = %self.target,
                    at = %at,
                    command = %ddl.statement,
                    reason,
                    "schema change NOT replayed on the target ([ddl] on_unsafe = \"skip\"): make it there by hand if the target needs it"
                );
                Ok(())
            }
            OnUnsafeDdl::Stop => Err(ApplyError::Target {
                target: self.target.clone(),
                message: format!(
                    "schema change at {at} cannot be replayed ({reason}): {}; make it on the target by hand, then restart with [ddl] on_unsafe = \"skip\" to go past it",
                    ddl.statement
                ),
            }),
        }
    }

    /// What the stream's tables are on the target now: a created table is held complete
    /// from here on, a dropped one no longer is.
    async fn after_ddl(&mut self, ddl: &Ddl, at: ChangeAt) -> Result<(), ApplyError> {
        let Some(name) = self.ddl.copies_name.clone() else {
            return Ok(());
        };
        // A streamed transaction's commit position is not known yet; every change of a
        // table it creates comes after the creation, so "held since the start" is as true.
        let held_since = match at {
            ChangeAt::Committed(position) => position.commit_lsn,
            ChangeAt::Streaming(_) => walrelay_model::Lsn::ZERO,
        };
        // No copy has run here (a queue consumer's target): nothing to record.
        let recorded: bool = self
            .client
            .query_one("SELECT to_regclass('walrelay.copies') IS NOT NULL", &[])
            .await
            .map_err(|e| PgError::from_sql("looking for walrelay.copies", e))?
            .get(0);
        if !recorded {
            return Ok(());
        }
        for t in &ddl.tables {
            let sql = match t.action {
                DdlAction::Create | DdlAction::Alter => {
                    // Only where no record is: an altered table copied earlier keeps its.
                    "INSERT INTO walrelay.copies (name, schema_name, table_name, state, created, lsn)
                     VALUES ($1, $2, $3, 'done', true, $4::text::pg_lsn)
                     ON CONFLICT (name, schema_name, table_name) DO NOTHING"
                }
                DdlAction::Drop => {
                    "DELETE FROM walrelay.copies
                     WHERE name = $1 AND schema_name = $2 AND table_name = $3 AND $4::text IS NOT NULL"
                }
            };
            self.client
                .execute(sql, &[&name, &t.schema, &t.name, &held_since.to_string()])
                .await
                .map_err(|e| PgError::from_sql("recording a table the stream created", e))?;
        }
        Ok(())
    }

    /// Mode `additive`: add the columns of `rel` the target lacks and widen the types it
    /// has narrower, from the stream's description of the table. Returns whether it
    /// changed anything. `target` holds the target's columns: name, type oid, modifier.
    pub(super) async fn add_from_relation(
        &mut self,
        rel: &Relation,
        target: &[(String, u32, i32)],
    ) -> Result<bool, ApplyError> {
        let table = quote::qualified(&rel.schema, &rel.name);
        let mut changes = Vec::new();
        for c in &rel.columns {
            let change = match target.iter().find(|(name, _, _)| *name == c.name) {
                None => "ADD COLUMN",
                // Other types' oids differ between servers: only built-in ones compare.
                Some((_, oid, typmod))
                    if walrelay_model::builtin_type_name(c.type_oid).is_some()
                        && (*oid != c.type_oid || *typmod != c.type_modifier) =>
                {
                    "ALTER COLUMN"
                }
                Some(_) => continue,
            };
            let type_sql = self.type_sql(c).await?;
            changes.push(match change {
                "ADD COLUMN" => format!("ADD COLUMN {} {type_sql}", quote::ident(&c.name)),
                _ => format!("ALTER COLUMN {} TYPE {type_sql}", quote::ident(&c.name)),
            });
        }
        if changes.is_empty() {
            return Ok(false);
        }
        let sql = format!("ALTER TABLE {table} {}", changes.join(", "));
        self.client
            .batch_execute(&format!(
                "SAVEPOINT walrelay_ddl; {sql}; RELEASE SAVEPOINT walrelay_ddl"
            ))
            .await
            .map_err(|e| ApplyError::Target {
                target: self.target.clone(),
                message: format!(
                    "adding the source's new shape of {} ({sql}) failed: {}",
                    rel.qualified_name(),
                    PgError::from_sql("ALTER TABLE", e)
                ),
            })?;
        tracing::info!(target = %self.target, table = %rel.qualified_name(), change = %sql, "additive schema change made on the target");
        Ok(true)
    }

    /// The SQL type of a column the stream describes: built-in types by their oid (the
    /// same on every server), printed by the target; others by the name the stream gave.
    async fn type_sql(&self, c: &walrelay_model::Column) -> Result<String, ApplyError> {
        if walrelay_model::builtin_type_name(c.type_oid).is_none() {
            return Ok(match c.type_name.split_once('.') {
                Some((schema, name)) => quote::qualified(schema, name),
                None => quote::ident(&c.type_name),
            });
        }
        Ok(self
            .client
            .query_one(
                "SELECT pg_catalog.format_type($1::int8::oid, $2)",
                &[&i64::from(c.type_oid), &c.type_modifier],
            )
            .await
            .map_err(|e| PgError::from_sql("naming a column type", e))?
            .get(0))
    }
}
