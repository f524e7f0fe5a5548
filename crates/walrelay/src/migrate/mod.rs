//! `walrelay migrate`: move a database to a new server and keep a way back.
//!
//! One long-running process drives the migration through its phases, each recorded in the
//! target (`record`), so that after a crash it resumes where it stopped:
//! precheck → copy (schema and data, by the relay's initial copy) → incremental (the
//! stream catches up) → verify → ready. It runs the relay source → target meanwhile, and
//! keeps the target read-only for everyone but walrelay (`default_transaction_read_only`).
//!
//! `walrelay cutover` and `walrelay rollback` only ask (`record::request`); this process
//! does the switch (`switch`), so that the stream it runs stops and restarts at exactly
//! the right point: after a cutover the stream runs target → source, so the old server
//! stays current and a rollback loses nothing written on the new one.

mod record;
mod switch;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{CaptureMethod, Config, DdlMode, PostgresSinkConfig, SinkConfig};
use crate::pg::conninfo::ConnInfo;
use crate::pg::{quote, sql, PgError};
use crate::pipeline::{self, RelayError};
use crate::verify;
pub use record::{Phase, Record};

/// How often the process looks at the record and its stream.
const TICK: Duration = Duration::from_millis(500);
/// A verification that found differences is tried again after this long.
const VERIFY_AGAIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("the precheck found problems:\n  - {}", .0.join("\n  - "))]
    Precheck(Vec<String>),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
    #[error("{0}")]
    Switch(String),
}

/// A migration: the configured stream (source → target) and its reverse.
pub struct Migration {
    pub forward: Config,
    pub reverse: Config,
    pub source: ConnInfo,
    pub target: ConnInfo,
    /// The record's name, and the forward stream's progress name on the target.
    pub name: String,
    /// The reverse stream's progress name on the source.
    pub reverse_name: String,
}

impl Migration {
    /// Check that `config` describes a migration, and derive the reverse stream.
    pub fn new(config: &Config) -> Result<Migration, MigrateError> {
        if config.source.capture != CaptureMethod::Logical {
            return Err(MigrateError::Config(
                "migrate needs capture = \"logical\" (the reverse stream is logical decoding on the new server)".into(),
            ));
        }
        let sinks = config.postgres_sinks();
        let [sink] = sinks[..] else {
            return Err(MigrateError::Config(format!(
                "migrate needs exactly one postgres sink, the new server (this configuration has {})",
                sinks.len()
            )));
        };
        if config.sinks.len() != 1 {
            return Err(MigrateError::Config(
                "migrate takes one sink only, the new server: run other sinks from a relay of their own".into(),
            ));
        }
        if sink.protect {
            return Err(MigrateError::Config(
                "migrate keeps the target read-only by itself until the cutover: remove protect = true".into(),
            ));
        }
        for set in config.sets() {
            if let Some(o) = set.options.iter().find(|o| {
                o.filter.is_some()
                    || o.columns.is_some()
                    || o.target.is_some()
                    || !o.rename_columns.is_empty()
                    || !o.transform.is_empty()
            }) {
                return Err(MigrateError::Config(format!(
                    "set {:?}: table {} is filtered, reshaped or renamed; a migration moves tables as they are (a rollback could not put them back)",
                    set.name, o.name
                )));
            }
        }
        let source = config
            .source
            .url
            .resolve()
            .map_err(|e| MigrateError::Config(format!("source.url: {e}")))?;
        let target = sink
            .url
            .resolve()
            .map_err(|e| MigrateError::Config(format!("sink url: {e}")))?;
        let reverse_slot = format!("{}_reverse", config.source.slot);
        crate::config::check_slot_name(&reverse_slot)
            .map_err(|e| MigrateError::Config(format!("the reverse slot {reverse_slot}: {e}")))?;
        let mut reverse = config.clone();
        reverse.source.url = sink.url.clone();
        reverse.source.slot = reverse_slot.clone();
        reverse.source.publication = format!("{}_reverse", config.source.publication);
        reverse.snapshot.enabled = false;
        reverse.ddl.mode = DdlMode::Off;
        reverse.sinks = vec![SinkConfig::Postgres(PostgresSinkConfig {
            url: config.source.url.clone(),
            ..sink.clone()
        })];
        Ok(Migration {
            name: format!("{}/{}", config.source.slot, sink.name),
            reverse_name: format!("{reverse_slot}/{}", sink.name),
            forward: config.clone(),
            reverse,
            source,
            target,
        })
    }
}

/// The stream this process runs now.
struct Running {
    forward: bool,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), RelayError>>,
}

/// Start the stream in the given direction, stopping the other one first.
async fn run_stream(
    m: &Migration,
    running: &mut Option<Running>,
    forward: bool,
) -> Result<(), MigrateError> {
    if let Some(r) = running.as_ref() {
        if r.forward == forward {
            return Ok(());
        }
    }
    stop_stream(running).await?;
    let config = if forward { &m.forward } else { &m.reverse };
    let config = config.clone();
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tracing::info!(
        direction = if forward {
            "source -> target"
        } else {
            "target -> source (reverse)"
        },
        "starting the stream"
    );
    let task = crate::task::spawn_named("migrate-stream", async move {
        pipeline::run(&config, token).await
    });
    *running = Some(Running {
        forward,
        cancel,
        task,
    });
    Ok(())
}

/// Stop the stream (its sinks make durable what they hold) and wait for it.
async fn stop_stream(running: &mut Option<Running>) -> Result<(), MigrateError> {
    if let Some(r) = running.take() {
        r.cancel.cancel();
        match r.task.await {
            Ok(result) => result?,
            Err(e) => return Err(MigrateError::Switch(format!("the stream task failed: {e}"))),
        }
    }
    Ok(())
}

/// A stream that ended on its own ended on an error: pass it on.
async fn check_stream(running: &mut Option<Running>) -> Result<(), MigrateError> {
    if running.as_ref().is_some_and(|r| r.task.is_finished()) {
        if let Some(r) = running.take() {
            match r.task.await {
                Ok(Ok(())) => {
                    return Err(MigrateError::Switch(
                        "the stream stopped unexpectedly".into(),
                    ))
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => return Err(MigrateError::Switch(format!("the stream task failed: {e}"))),
            }
        }
    }
    Ok(())
}

/// Open a session that may write where a database is read-only by default.
pub(crate) async fn session(info: &ConnInfo) -> Result<Client, PgError> {
    let client = sql::connect(info).await?;
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(|e| PgError::from_sql("setting up a session", e))?;
    Ok(client)
}

/// Make the database of `client` read-only for new sessions (`on`), or writable again.
pub(crate) async fn set_read_only(client: &Client, on: bool) -> Result<(), PgError> {
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| PgError::from_sql("reading the database name", e))?
        .get(0);
    let sql = if on {
        format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            quote::ident(&db)
        )
    } else {
        format!(
            "ALTER DATABASE {} RESET default_transaction_read_only",
            quote::ident(&db)
        )
    };
    client.batch_execute(&sql).await.map_err(|e| {
        PgError::from_sql(
            "setting the database read-only or writable (needs its owner or a superuser)",
            e,
        )
    })
}

/// Run the migration until SIGINT/SIGTERM (`cancel`).
pub async fn migrate(config: &Config, cancel: CancellationToken) -> Result<(), MigrateError> {
    let m = Migration::new(config)?;
    let target = session(&m.target).await?;
    let mut rec = record::open(&target, &m.name).await?;
    tracing::info!(phase = rec.phase.as_str(), "migration");
    let mut running: Option<Running> = None;
    let mut verify_after: Option<std::time::Instant> = None;
    let result = loop {
        if cancel.is_cancelled() {
            break Ok(());
        }
        if let Err(e) = check_stream(&mut running).await {
            break Err(e);
        }
        let step = step(&m, &target, &rec, &mut running, &mut verify_after).await;
        match step {
            Ok(Some(next)) => {
                record::set_phase(&target, &m.name, next).await?;
                tracing::info!(phase = next.as_str(), "migration");
            }
            // A cutover or rollback goes on to its next step at once: the pause counts.
            Ok(None) if matches!(rec.phase, Phase::Cutover | Phase::Rollback) => {}
            Ok(None) => {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
            }
            Err(e) => break Err(e),
        }
        rec = match record::read(&target, &m.name).await? {
            Some(r) => r,
            None => {
                break Err(MigrateError::Switch(
                    "walrelay.migration lost this migration's row".into(),
                ))
            }
        };
    };
    stop_stream(&mut running).await?;
    result
}

/// One look at the migration: do what its phase needs now; the next phase when this one
/// is done.
async fn step(
    m: &Migration,
    target: &Client,
    rec: &Record,
    running: &mut Option<Running>,
    verify_after: &mut Option<std::time::Instant>,
) -> Result<Option<Phase>, MigrateError> {
    match rec.phase {
        Phase::Precheck => {
            precheck(m).await?;
            set_read_only(target, true).await?;
            Ok(Some(Phase::Copy))
        }
        Phase::Copy => {
            run_stream(m, running, true).await?;
            Ok(copies_done(m, target).await?.then_some(Phase::Incremental))
        }
        Phase::Incremental => {
            run_stream(m, running, true).await?;
            let source = session(&m.source).await?;
            let at = crate::sink::postgres::progress::wal_insert_position(&source).await?;
            let caught_up = crate::sink::postgres::progress::wait_applied(
                &source,
                target,
                &m.forward.source.slot,
                &m.name,
                at,
                Duration::from_secs(2),
            )
            .await?;
            Ok(caught_up.then_some(Phase::Verify))
        }
        Phase::Verify => {
            run_stream(m, running, true).await?;
            if verify_after.is_some_and(|t| std::time::Instant::now() < t) {
                return Ok(None);
            }
            let equal = verify_and_record(m, target, &[]).await?;
            if equal {
                record::set_note(target, &m.name, None).await?;
                Ok(Some(Phase::Ready))
            } else {
                *verify_after = Some(std::time::Instant::now() + VERIFY_AGAIN);
                Ok(None)
            }
        }
        Phase::Ready | Phase::RolledBack => {
            run_stream(m, running, true).await?;
            Ok((rec.requested.as_deref() == Some("cutover")).then_some(Phase::Cutover))
        }
        Phase::CutOver => {
            run_stream(m, running, false).await?;
            Ok((rec.requested.as_deref() == Some("rollback")).then_some(Phase::Rollback))
        }
        Phase::Cutover => switch::switch(m, target, rec, running, true).await,
        Phase::Rollback => switch::switch(m, target, rec, running, false).await,
    }
}

/// The precheck: `walrelay check` of the source, and of the target what a migration
/// needs (reachable, version, privileges, the source's extensions); sizes are logged.
async fn precheck(m: &Migration) -> Result<(), MigrateError> {
    let report = crate::cli::check::inspect(&m.forward).await;
    let mut problems: Vec<String> = report
        .problems
        .iter()
        .map(|p| format!("source: {p}"))
        .collect();
    let source = session(&m.source).await?;
    let target = session(&m.target).await?;
    let (s, t) = (server_facts(&source).await?, server_facts(&target).await?);
    let (source_version, target_version): (i32, i32) = (s.get(0), t.get(0));
    if target_version / 10000 < source_version / 10000 {
        problems.push(format!(
            "target: PostgreSQL {} is older than the source's {}: a migration goes to the same or a newer major version",
            target_version / 10000,
            source_version / 10000
        ));
    }
    if !t.get::<_, bool>(2) {
        problems.push("target: the role may not CREATE in the database (tables and the walrelay schema): GRANT CREATE ON DATABASE".into());
    }
    for (side, row) in [("source", &s), ("target", &t)] {
        if !row.get::<_, bool>(3) && !row.get::<_, bool>(4) {
            problems.push(format!("{side}: the role must own the database (or be a superuser): a cutover sets default_transaction_read_only on it"));
        }
    }
    let used = names(
        &source,
        "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql'",
    )
    .await?;
    let available = names(&target, "SELECT name::text FROM pg_available_extensions").await?;
    for e in used.iter().filter(|e| !available.contains(e)) {
        problems.push(format!(
            "target: extension {e} is installed on the source and not available on the target: install its package there"
        ));
    }
    if !problems.is_empty() {
        return Err(MigrateError::Precheck(problems));
    }
    // The schema phase's part that the initial copy does not do: extensions first, so
    // that the tables' types exist.
    for e in &used {
        target
            .batch_execute(&format!(
                "CREATE EXTENSION IF NOT EXISTS {}",
                quote::ident(e)
            ))
            .await
            .map_err(|err| {
                PgError::from_sql(format!("creating extension {e} on the target"), err)
            })?;
    }
    tracing::info!(
        source_bytes = s.get::<_, i64>(1),
        target_bytes = t.get::<_, i64>(1),
        source_version,
        target_version,
        "precheck passed"
    );
    Ok(())
}

/// Version, database size, CREATE privilege, superuser, database owner.
async fn server_facts(c: &Client) -> Result<tokio_postgres::Row, PgError> {
    c.query_one(
        "SELECT current_setting('server_version_num')::int, pg_database_size(current_database()),
                has_database_privilege(current_database(), 'CREATE'),
                (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'MEMBER')",
        &[],
    )
    .await
    .map_err(|e| PgError::from_sql("reading server facts", e))
}

/// The first column of every row of `sql`.
async fn names(c: &Client, sql: &str) -> Result<Vec<String>, PgError> {
    Ok(c.query(sql, &[])
        .await
        .map_err(|e| PgError::from_sql("listing extensions", e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Every table the stream replicates has a finished copy on the target.
async fn copies_done(m: &Migration, target: &Client) -> Result<bool, MigrateError> {
    let states = crate::snapshot::state::read(target, &m.name).await?;
    if states.is_empty() {
        return Ok(false);
    }
    Ok(states
        .values()
        .all(|s| matches!(s, crate::snapshot::state::CopyState::Done(_))))
}

/// Each table's count of rows inserted, updated and deleted so far (`pg_stat_user_tables`),
/// to tell which changed since the last verification.
pub(crate) async fn table_changes(client: &Client) -> Result<BTreeMap<String, i64>, PgError> {
    Ok(client
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(relname),
                    (n_tup_ins + n_tup_upd + n_tup_del)::int8
             FROM pg_stat_user_tables",
            &[],
        )
        .await
        .map_err(|e| PgError::from_sql("reading table statistics", e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Verify the forward stream's tables (`only`: these; empty: all); record the result with
/// the source's change counters taken before it. `true` when everything is equal.
async fn verify_and_record(
    m: &Migration,
    target: &Client,
    only: &[String],
) -> Result<bool, MigrateError> {
    let source = session(&m.source).await?;
    let counters = table_changes(&source).await?;
    let verified = run_verify(&m.forward, only, None).await?;
    // Rows that kept changing (hot rows under writes) are no difference found: they are
    // compared again at the cutover.
    let equal = verified.differences == 0 && verified.not_compared == 0;
    let summary = verified.summary;
    let counters = serde_json::to_string(&counters).unwrap_or_default();
    record::set_verified(target, &m.name, &summary, &counters).await?;
    let recheck = serde_json::to_string(&verified.unsettled).unwrap_or_default();
    record::set_recheck(target, &m.name, &recheck).await?;
    if equal {
        tracing::info!(%summary, "verified");
    } else {
        record::set_note(target, &m.name, Some(&summary)).await?;
        tracing::error!(%summary, "the target differs from the source: see `walrelay verify`, and `--repair`; verifying again in 30 s");
    }
    Ok(equal)
}

/// What a verification found, for the migration's decisions.
pub(crate) struct Verified {
    /// Differences proven (a missing table counts).
    pub differences: usize,
    /// Tables that could not be compared (no key).
    pub not_compared: usize,
    /// Key ranges left unsettled (rows that kept changing, a target that did not catch
    /// up), by table, to compare again.
    pub unsettled: std::collections::BTreeMap<String, Vec<verify::sql::Range>>,
    pub summary: String,
}

impl Verified {
    pub fn equal(&self) -> bool {
        self.differences == 0 && self.not_compared == 0 && self.unsettled.is_empty()
    }
}

/// Verify `config`'s tables (`only` by name, or all; `ranges`: only those).
pub(crate) async fn run_verify(
    config: &Config,
    only: &[String],
    ranges: Option<std::collections::BTreeMap<String, Vec<verify::sql::Range>>>,
) -> Result<Verified, MigrateError> {
    let mut tables = Vec::new();
    for t in only {
        tables.push(
            crate::config::TablePattern::parse(t)
                .map_err(|e| MigrateError::Switch(format!("table {t}: {e}")))?,
        );
    }
    let options = verify::Options {
        tables,
        chunk_rows: 10_000,
        rate: None,
        wait: Duration::from_secs(60),
        jobs: 4,
        ranges,
        repair: false,
    };
    let reports = verify::verify(config, &options, |_| {}).await?;
    let rows: u64 = reports.iter().map(|r| r.rows).sum();
    let differences: usize = reports
        .iter()
        .map(verify::TableReport::open_differences)
        .sum();
    let not_compared = reports
        .iter()
        .filter(|r| r.not_compared.is_some() && !r.missing_table)
        .count();
    let unsettled: std::collections::BTreeMap<String, Vec<verify::sql::Range>> = reports
        .iter()
        .filter(|r| !r.unsettled_ranges.is_empty())
        .map(|r| (r.table.clone(), r.unsettled_ranges.clone()))
        .collect();
    let mut summary = format!(
        "{} tables, {rows} rows: {differences} differences",
        reports.len()
    );
    if not_compared > 0 {
        summary += &format!(", {not_compared} tables without a key not compared");
    }
    if !unsettled.is_empty() {
        summary += &format!(
            ", rows still changing in {} tables (compared again at the cutover)",
            unsettled.len()
        );
    }
    for r in reports.iter().filter(|r| r.open_differences() > 0).take(5) {
        summary += &format!("; {}: {}", r.table, r.open_differences());
    }
    Ok(Verified {
        differences,
        not_compared,
        unsettled,
        summary,
    })
}

/// How a cutover or rollback asked for by `ask` ended.
pub enum Outcome {
    /// Done: the write pause, in seconds.
    Done(f64),
    /// Called off by the migrate process, with why.
    CalledOff(String),
}

/// Ask the running `walrelay migrate` for a cutover (`cutover = true`) or a rollback, and
/// wait until it is done or called off.
pub async fn ask(
    config: &Config,
    cutover: bool,
    timeout: Duration,
) -> Result<Outcome, MigrateError> {
    let m = Migration::new(config)?;
    let target = session(&m.target).await?;
    let (what, needed, done) = if cutover {
        ("cutover", "ready or rolled_back", Phase::CutOver)
    } else {
        ("rollback", "cut_over", Phase::RolledBack)
    };
    match record::request(&target, &m.name, what).await? {
        Ok(()) => {}
        Err(None) => {
            return Err(MigrateError::Switch(
                "no migration recorded on the target: start `walrelay migrate` first".into(),
            ))
        }
        Err(Some(phase)) => {
            return Err(MigrateError::Switch(format!(
            "the migration is in phase {}: a {what} needs phase {needed} (see `walrelay status`)",
            phase.as_str()
        )))
        }
    }
    let started = std::time::Instant::now();
    let mut taken_up = false;
    loop {
        let rec = record::read(&target, &m.name)
            .await?
            .ok_or_else(|| MigrateError::Switch("the migration record is gone".into()))?;
        if rec.phase == done {
            return Ok(Outcome::Done(rec.pause_seconds.unwrap_or(0.0)));
        }
        taken_up |= rec.requested.is_none();
        if taken_up && rec.requested.is_none() && matches!(rec.phase, Phase::Ready | Phase::CutOver)
        {
            if let Some(note) = rec.note.filter(|n| n.contains("called off")) {
                return Ok(Outcome::CalledOff(note));
            }
        }
        if started.elapsed() >= timeout {
            return Err(MigrateError::Switch(format!(
                "the {what} is not done after {} s (phase {}, step {}): is `walrelay migrate` running? It carries on when it runs; see `walrelay status`",
                timeout.as_secs(),
                rec.phase.as_str(),
                rec.step.map_or("none", |s| s.as_str())
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Once a cutover is done, the stream that runs is the reverse one (the new server into the
/// old): its configuration, for `walrelay status` to report; `None` before a cutover,
/// after a rollback, and when `config` is not a migration's.
pub async fn cut_over_stream(config: &Config) -> Result<Option<Config>, MigrateError> {
    let Ok(m) = Migration::new(config) else {
        return Ok(None);
    };
    let target = sql::connect(&m.target).await?;
    Ok(match record::read(&target, &m.name).await? {
        Some(rec) if rec.phase == Phase::CutOver => Some(m.reverse),
        _ => None,
    })
}

/// The migration's record for `status`, if there is one.
pub async fn describe(config: &Config) -> Result<Option<String>, MigrateError> {
    let Ok(m) = Migration::new(config) else {
        return Ok(None);
    };
    let target = sql::connect(&m.target).await?;
    let Some(rec) = record::read(&target, &m.name).await? else {
        return Ok(None);
    };
    let mut text = format!("migration {}: phase {}", m.name, rec.phase.as_str());
    if let Some(step) = rec.step {
        text += &format!(" (step {} done)", step.as_str());
    }
    if let Some(r) = &rec.requested {
        text += &format!("; {r} asked for");
    }
    match (&rec.verified_at, &rec.verify_summary) {
        (Some(at), Some(summary)) => text += &format!("; last verification {at}: {summary}"),
        _ => text += "; not verified yet",
    }
    if let Some(p) = rec.pause_seconds {
        text += &format!("; last write pause {p:.2} s");
    }
    if let Some(n) = &rec.note {
        text += &format!("\n         note: {n}");
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_source: &str, sets: &str, sinks: &str) -> Config {
        let text = format!(
            "[source]\nurl = \"postgresql://rep@old/app\"\n{extra_source}\n{sets}\n{sinks}"
        );
        Config::parse(&text, std::path::Path::new("move.toml")).unwrap()
    }

    const TARGET: &str = "[[sink]]\ntype = \"postgres\"\nurl = \"postgresql://rep@new/app\"\n";

    fn refused(c: &Config) -> String {
        match Migration::new(c) {
            Err(MigrateError::Config(why)) => why,
            Err(e) => panic!("not a configuration error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn the_reverse_stream_runs_from_the_target_into_the_source_with_nothing_to_copy() {
        let m = Migration::new(&config("tables = [\"public.*\"]", "", TARGET)).unwrap();
        assert_eq!(m.name, "walrelay/postgres");
        assert_eq!(m.reverse_name, "walrelay_reverse/postgres");
        assert_eq!(m.reverse.source.slot, "walrelay_reverse");
        assert_eq!(m.reverse.source.publication, "walrelay_reverse");
        assert_eq!(m.reverse.source.url.resolve().unwrap().hosts[0].0, "new");
        let sink = &m.reverse.postgres_sinks()[0];
        assert_eq!(sink.url.resolve().unwrap().hosts[0].0, "old");
        assert!(!m.reverse.snapshot.enabled);
        assert_eq!(m.reverse.ddl.mode, DdlMode::Off);
        assert!(m.forward.snapshot.enabled);
    }

    #[test]
    fn what_a_migration_cannot_carry_back_is_refused() {
        let tables = "tables = [\"public.*\"]";
        let jsonl = "[[sink]]\ntype = \"jsonl\"\npath = \"-\"\n";
        assert!(refused(&config(tables, "", jsonl)).contains("exactly one postgres sink"));
        assert!(refused(&config(tables, "", &format!("{TARGET}{jsonl}"))).contains("one sink only"));
        assert!(
            refused(&config(tables, "", &format!("{TARGET}protect = true\n"))).contains("protect")
        );
        let filtered = "[[set]]\nname = \"s\"\ntables = [\"public.t\"]\n\n[[set.table]]\nname = \"public.t\"\nwhere = \"id > 5\"\n";
        assert!(refused(&config("", filtered, TARGET)).contains("filtered, reshaped or renamed"));
        assert!(refused(&config(
            &format!("{tables}\ncapture = \"trigger\""),
            "",
            TARGET
        ))
        .contains("logical"));
    }
}
