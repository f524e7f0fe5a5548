//! A cutover (source → target becomes target → source) or a rollback (the other way), as
//! steps that are each recorded once done, so that a crash in the middle resumes at the
//! next one. Each step can run again without harm.
//!
//! 0. **verify** the tables changed since the last verification, while writes go on (the
//!    comparison waits for rows in flight); a difference calls the switch off.
//! 1. **fence** the side giving up its role: new sessions read-only by default
//!    (`ALTER DATABASE ... SET default_transaction_read_only = on`), every other client
//!    session ended (`pg_terminate_backend`, waiting until each is gone, so that no commit
//!    of theirs lands later); then its WAL position is the hand-off.
//! 2. **drain**: the running stream applies everything before the hand-off on the other
//!    side, then stops; the tables changed since step 0 are counted on both sides. A
//!    difference calls the switch off: the fence comes down and the stream goes on.
//! 3. **sequences**: each sequence on the side taking over is set past the other's value.
//! 4. **stream**: on the side taking over, the new stream's publication and slot (its
//!    start is the hand-off: nothing can be written there before step 5); the old slot is
//!    dropped.
//! 5. **open**: the side taking over made writable; the pause since the fence recorded.

use std::time::Duration;

use tokio_postgres::Client;

use super::record::{self, Phase, Record, Step};
use super::{
    check_stream, run_stream, run_verify, session, set_read_only, stop_stream, table_changes,
    MigrateError, Migration, Running,
};
use crate::config::Config;
use crate::pg::conninfo::ConnInfo;
use crate::pg::PgError;
use crate::sink::postgres::progress::wal_insert_position;
use crate::source::pgoutput::setup;

/// Longest wait for the stream to apply everything before the hand-off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// The two sides of a switch.
struct Sides<'a> {
    /// Giving up its role (fenced).
    from: &'a ConnInfo,
    /// Taking over.
    to: &'a ConnInfo,
    /// The stream from → to, which drains and stops.
    old: &'a Config,
    old_progress: &'a str,
    /// The stream to → from, which starts.
    new: &'a Config,
}

/// Do the next step of the cutover (`forward`: source → target becomes target → source)
/// or rollback under way; the phase it ends in once all are done.
pub(super) async fn switch(
    m: &Migration,
    target: &Client,
    rec: &Record,
    running: &mut Option<Running>,
    cutover: bool,
) -> Result<Option<Phase>, MigrateError> {
    let sides = if cutover {
        Sides {
            from: &m.source,
            to: &m.target,
            old: &m.forward,
            old_progress: &m.name,
            new: &m.reverse,
        }
    } else {
        Sides {
            from: &m.target,
            to: &m.source,
            old: &m.reverse,
            old_progress: &m.reverse_name,
            new: &m.forward,
        }
    };
    let what = if cutover { "cutover" } else { "rollback" };
    let from = session(sides.from).await?;
    match rec.step {
        None => {
            // While writes go on (the comparison waits for rows in flight): a difference
            // calls the switch off before anyone waits.
            run_stream(m, running, cutover).await?;
            let counters = table_changes(&from).await?;
            let changed = changed_tables(m, target, &counters, sides.old).await?;
            // Rows that kept changing, now or in the last verification, are compared
            // again under the fence (`recheck`).
            let mut recheck: std::collections::BTreeMap<String, Vec<crate::verify::sql::Range>> =
                rec.recheck
                    .as_deref()
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default();
            if !changed.is_empty() {
                tracing::info!(
                    tables = changed.len(),
                    "{what}: verifying the tables changed since the last verification"
                );
                let verified = run_verify(sides.old, &changed, None).await?;
                if verified.differences > 0 || verified.not_compared > 0 {
                    return call_off(m, target, &from, cutover, &verified.summary).await;
                }
                for (table, ranges) in verified.unsettled {
                    recheck.entry(table).or_default().extend(ranges);
                }
            }
            let counters = serde_json::to_string(&counters).unwrap_or_default();
            record::set_table_changes(target, &m.name, &counters).await?;
            let recheck = serde_json::to_string(&recheck).unwrap_or_default();
            record::set_recheck(target, &m.name, &recheck).await?;
            record::set_step(target, &m.name, Step::Verified).await?;
            Ok(None)
        }
        Some(Step::Verified) => {
            let ended = match fence(&from).await? {
                Fenced::Closed { ended } => ended,
                Fenced::Open(why) => return call_off(m, target, &from, cutover, &why).await,
            };
            let handoff = wal_insert_position(&from).await?;
            record::set_fenced(target, &m.name, handoff).await?;
            tracing::info!(%handoff, sessions_ended = ended, "{what}: writes stopped");
            record::set_step(target, &m.name, Step::Fence).await?;
            Ok(None)
        }
        Some(Step::Fence) => {
            let handoff = rec
                .handoff
                .ok_or_else(|| MigrateError::Switch("no hand-off position recorded".into()))?;
            run_stream(m, running, cutover).await?;
            let to = session(sides.to).await?;
            let started = std::time::Instant::now();
            let applied = loop {
                // A stream that fails is an error of the migration, not a slow drain.
                check_stream(running).await?;
                if crate::sink::postgres::progress::wait_applied(
                    &from,
                    &to,
                    &sides.old.source.slot,
                    sides.old_progress,
                    handoff,
                    Duration::from_secs(1),
                )
                .await?
                {
                    break true;
                }
                if started.elapsed() >= DRAIN_TIMEOUT {
                    break false;
                }
            };
            if !applied {
                return call_off(
                    m,
                    target,
                    &from,
                    cutover,
                    "the stream did not apply everything before the hand-off in time",
                )
                .await;
            }
            // With everything applied, and the stream still running (verify waits on its
            // position): the rows left unsettled before the fence, and the row counts of
            // the tables written since.
            let recheck: std::collections::BTreeMap<String, Vec<crate::verify::sql::Range>> = rec
                .recheck
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default();
            if !recheck.is_empty() {
                let verified = run_verify(sides.old, &[], Some(recheck)).await?;
                if !verified.equal() {
                    return call_off(m, target, &from, cutover, &verified.summary).await;
                }
            }
            let counters = table_changes(&from).await?;
            let changed = changed_tables(m, target, &counters, sides.old).await?;
            if let Some(differences) = compare_counts(&from, &to, &changed).await? {
                return call_off(m, target, &from, cutover, &differences).await;
            }
            stop_stream(running).await?;
            tracing::info!(%handoff, "{what}: everything before the hand-off applied");
            record::set_step(target, &m.name, Step::Drain).await?;
            Ok(None)
        }
        Some(Step::Drain) => {
            let to = session(sides.to).await?;
            let raised = raise_sequences(&from, &to).await?;
            tracing::info!(
                sequences = raised,
                "{what}: sequences set past the other side's"
            );
            record::set_step(target, &m.name, Step::Sequences).await?;
            Ok(None)
        }
        Some(Step::Sequences) => {
            let to = session(sides.to).await?;
            start_stream_at_handoff(&to, sides.new).await?;
            drop_slot(&from, &sides.old.source.slot).await?;
            record::set_step(target, &m.name, Step::Stream).await?;
            Ok(None)
        }
        Some(Step::Stream) => {
            let to = session(sides.to).await?;
            set_read_only(&to, false).await?;
            let pause = record::set_opened(target, &m.name).await?;
            // The tables' counters on the side that takes writes now: the next switch
            // verifies what changed there since.
            let counters = serde_json::to_string(&table_changes(&to).await?).unwrap_or_default();
            record::set_table_changes(target, &m.name, &counters).await?;
            // Compared under the fence: nothing left for the next switch.
            record::set_recheck(target, &m.name, "{}").await?;
            tracing::info!(
                write_pause_seconds = pause,
                "{what} done: writes go to the other side now"
            );
            Ok(Some(if cutover {
                Phase::CutOver
            } else {
                Phase::RolledBack
            }))
        }
    }
}

/// Give up the switch: the fence comes down, the stream goes on as before, and the
/// record says why.
async fn call_off(
    m: &Migration,
    target: &Client,
    from: &Client,
    cutover: bool,
    why: &str,
) -> Result<Option<Phase>, MigrateError> {
    set_read_only(from, false).await?;
    let what = if cutover { "cutover" } else { "rollback" };
    let note = format!("{what} called off, writes allowed again where they were: {why}");
    tracing::error!("{note}");
    record::set_note(target, &m.name, Some(&note)).await?;
    target
        .execute(
            "UPDATE walrelay.migration SET fenced_at = NULL, handoff_lsn = NULL, requested = NULL WHERE name = $1",
            &[&m.name],
        )
        .await
        .map_err(|e| PgError::from_sql("clearing the fence", e))?;
    Ok(Some(if cutover {
        Phase::Ready
    } else {
        Phase::CutOver
    }))
}

/// What stopping writes came to.
enum Fenced {
    /// No session or prepared transaction can write any more; `ended` sessions were ended.
    Closed { ended: i64 },
    /// Something can still write to the old side after the hand-off: why.
    Open(String),
}

/// Stop writes on the database of `client`: read-only for new sessions, and every other
/// client session ended (walrelay's own, named `walrelay...`, stay). Open if a session
/// outlives its 10 s to end, or a prepared transaction waits there: `COMMIT PREPARED`
/// runs even in a read-only session, and would write past the hand-off position.
async fn fence(client: &Client) -> Result<Fenced, PgError> {
    set_read_only(client, true).await?;
    // `pg_terminate_backend(pid, timeout)` waits until the session is gone (false if it
    // is not within the timeout): a commit it was making is then in the WAL before the
    // hand-off position is read.
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE ended),
                    coalesce(array_agg(pid) FILTER (WHERE NOT ended), '{}')
               FROM (SELECT pid, pg_terminate_backend(pid, 10000) AS ended
                       FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND backend_type = 'client backend'
                        AND coalesce(application_name, '') NOT LIKE 'walrelay%') s",
            &[],
        )
        .await
        .map_err(|e| {
            PgError::from_sql(
                "ending the sessions that could write (needs superuser or pg_signal_backend)",
                e,
            )
        })?;
    let ended: i64 = row.get(0);
    let not_ended: Vec<i32> = row.get(1);
    // False also for a session that left on its own before its turn (the list is read
    // once, and each termination may wait): only those still there, in a fresh look, hold
    // the fence open.
    let still_there: Option<String> = client
        .query_one(
            "SELECT string_agg(pid::text, ', ' ORDER BY pid) FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&not_ended],
        )
        .await
        .map_err(|e| PgError::from_sql("looking for the sessions that did not end", e))?
        .get(0);
    if let Some(pids) = still_there {
        return Ok(Fenced::Open(format!(
            "server processes {pids} did not end within 10 s of being terminated"
        )));
    }
    let prepared: Option<String> = client
        .query_one(
            "SELECT string_agg(quote_literal(gid), ', ' ORDER BY prepared)
               FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
        .map_err(|e| PgError::from_sql("looking for prepared transactions", e))?
        .get(0);
    if let Some(gids) = prepared {
        return Ok(Fenced::Open(format!(
            "prepared transactions {gids} wait in the database, and COMMIT PREPARED would write past the hand-off: commit or roll them back (COMMIT PREPARED / ROLLBACK PREPARED), then try again"
        )));
    }
    Ok(Fenced::Closed { ended })
}

/// The replicated tables (of `stream`) whose change counters on the side taking writes
/// (`now`) moved since the record's (the last verification's, or the last switch's).
async fn changed_tables(
    m: &Migration,
    target: &Client,
    now: &std::collections::BTreeMap<String, i64>,
    stream: &Config,
) -> Result<Vec<String>, MigrateError> {
    let before: std::collections::BTreeMap<String, i64> = record::read(target, &m.name)
        .await?
        .and_then(|r| r.table_changes)
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let sets = stream.sets();
    let replicated = |qualified: &str| {
        let Some((schema, name)) = crate::config::TablePattern::parse(qualified)
            .ok()
            .and_then(|p| p.exact().map(|(s, n)| (s.to_string(), n.to_string())))
        else {
            return false;
        };
        sets.iter()
            .any(|set| set.patterns().any(|p| p.matches(&schema, &name)))
    };
    Ok(now
        .iter()
        .filter(|(table, n)| before.get(*table) != Some(n) && replicated(table))
        .map(|(table, _)| table.clone())
        .collect())
}

/// Under the fence, with everything applied: the row counts of `tables` (quoted names, as
/// `table_changes` gives them) on both sides. A full comparison here would hold writes
/// for as long as the tables take to read; the rows were compared before the fence.
async fn compare_counts(
    from: &Client,
    to: &Client,
    tables: &[String],
) -> Result<Option<String>, PgError> {
    let mut differ = Vec::new();
    for table in tables {
        let sql = format!("SELECT count(*) FROM {table}");
        let (a, b) = tokio::join!(from.query_one(&sql, &[]), to.query_one(&sql, &[]));
        let count = |r: Result<tokio_postgres::Row, tokio_postgres::Error>| {
            r.map(|row| row.get::<_, i64>(0))
                .map_err(|e| PgError::from_sql(format!("counting the rows of {table}"), e))
        };
        let (a, b) = (count(a)?, count(b)?);
        if a != b {
            differ.push(format!(
                "{table}: {a} rows on the side giving up writes, {b} on the other"
            ));
        }
    }
    Ok((!differ.is_empty()).then(|| differ.join("; ")))
}

/// Each used sequence's last value, by quoted qualified name.
async fn last_values(client: &Client) -> Result<std::collections::HashMap<String, i64>, PgError> {
    Ok(client
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value
             FROM pg_sequences WHERE last_value IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| PgError::from_sql("reading the sequences", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Set each sequence of `to` that `from` has too past `from`'s value (never back).
/// Returns how many.
async fn raise_sequences(from: &Client, to: &Client) -> Result<usize, PgError> {
    let (theirs, ours) = (last_values(from).await?, last_values(to).await?);
    let mut raised = 0;
    for (name, value) in theirs {
        let exists: bool = to
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .map_err(|e| PgError::from_sql("looking up a sequence", e))?
            .get(0);
        if !exists || ours.get(&name).is_some_and(|v| *v >= value) {
            continue;
        }
        to.execute("SELECT setval($1::regclass, $2, true)", &[&name, &value])
            .await
            .map_err(|e| PgError::from_sql(format!("setting sequence {name}"), e))?;
        raised += 1;
    }
    Ok(raised)
}

/// The new stream's publication and slot on `to`, before it takes writes: the slot starts
/// at the hand-off. Nothing to do if the slot exists (a resumed switch).
async fn start_stream_at_handoff(to: &Client, stream: &Config) -> Result<(), MigrateError> {
    let slot = &stream.source.slot;
    if setup::slot_info(to, slot)
        .await
        .map_err(|e| MigrateError::Switch(e.to_string()))?
        .is_some()
    {
        return Ok(());
    }
    let facts = setup::server_facts(to)
        .await
        .map_err(|e| MigrateError::Switch(e.to_string()))?;
    to.batch_execute(crate::ddl::capture::OWN_DDL)
        .await
        .map_err(|e| PgError::from_sql("setting up the session", e))?;
    to.batch_execute("SET search_path = ''")
        .await
        .map_err(|e| PgError::from_sql("setting up the session", e))?;
    let (plan, tables) = crate::sets::Plan::resolve(to, &stream.sets())
        .await
        .map_err(|e| MigrateError::Switch(e.to_string()))?;
    // The publication first: pgoutput reads it as of each change it decodes.
    setup::ensure_publication(
        to,
        &stream.source.publication,
        &plan.published(&tables),
        facts.version_num,
        setup::PublicationMode::Apply,
    )
    .await
    .map_err(|e| MigrateError::Switch(e.to_string()))?;
    let lsn: String = to
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await
        .map_err(|e| PgError::from_sql("creating the new stream's slot", e))?
        .get(0);
    tracing::info!(%slot, %lsn, "slot of the new stream created at the hand-off");
    Ok(())
}

/// Drop the old stream's slot once its walsender is gone.
async fn drop_slot(client: &Client, slot: &str) -> Result<(), MigrateError> {
    for _ in 0..200 {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| PgError::from_sql("looking up the old slot", e))?;
        match row.map(|r| r.get::<_, bool>(0)) {
            None => return Ok(()),
            Some(false) => {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await
                    .map_err(|e| PgError::from_sql("dropping the old stream's slot", e))?;
                return Ok(());
            }
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Err(MigrateError::Switch(format!(
        "slot {slot} is still in use 20 s after its stream stopped: is another walrelay running on it?"
    )))
}
