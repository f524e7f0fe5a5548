//! Where the postgres sink records how far it has applied, written in the same target
//! transaction as the changes it covers, so that a crash at any instant leaves changes and
//! position together: both in, or both out.
//!
//! - A **replication origin**, where the role may use one: the position goes into the
//!   commit record (`pg_replication_origin_xact_setup`), and the target's WAL marks the
//!   changes as replicated, which a reverse replication can use to avoid loops.
//! - Otherwise a row of **`walrelay.progress`**.
//!
//! PostgreSQL 15 lets one session at a time use an origin. The main session holds it; a
//! streamed transaction's session borrows it for its commit.
//!
//! Before the position is read, this relay must own the progress (`fence`): a relay killed
//! with `kill -9` leaves its target backends running until they finish what they were
//! sent, and one of them may be inside a commit that moves the position. Reading before
//! that commit lands would apply its changes a second time.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use tokio_postgres::Client;
use walrelay_model::{Lsn, TxnCommit};

use super::param::TextParam;
use super::session::{ApplyError, ApplySession, ChangeAt};
use crate::pg::PgError;

const RECORD_SQL: &str = "INSERT INTO walrelay.progress (name, lsn, commit_time, applied_at) \
     VALUES ($1, $2::pg_lsn, $3::timestamptz, now()) \
     ON CONFLICT (name) DO UPDATE SET lsn = EXCLUDED.lsn, commit_time = EXCLUDED.commit_time, applied_at = EXCLUDED.applied_at";

pub const CREATE_TABLE_SQL: &str = "CREATE SCHEMA IF NOT EXISTS walrelay;
     CREATE TABLE IF NOT EXISTS walrelay.progress (
         name text PRIMARY KEY,
         lsn pg_lsn NOT NULL,
         commit_time timestamptz,
         applied_at timestamptz NOT NULL DEFAULT now())";

/// The first key of the session advisory lock that marks the owner of a sink's progress
/// (the second is `hashtext` of the progress name): "walr" as a number, to keep clear of
/// the application's own advisory locks.
const FENCE_LOCK_CLASS: i32 = 0x7761_6c72;

/// The longest `application_name` PostgreSQL keeps (NAMEDATALEN - 1).
const APPLICATION_NAME_MAX: usize = 63;

/// The `application_name` of every session a sink opens on its target: it lets the fence
/// find the sessions of an earlier run, and a DBA tell them apart in `pg_stat_activity`.
///
/// PostgreSQL keeps 63 bytes of printable ASCII and rewrites the rest (`?` up to 15,
/// `\xNN` from 16): a name it would change is made to fit, so that the fence looks for what
/// the server shows. Such a name keeps a readable head and ends in `#` and eight hex digits
/// of its SHA-256, so that two sinks whose names differ only past the cut or in their
/// non-ASCII letters do not wait for each other's sessions. A name that fits is unchanged.
pub fn session_name(progress_name: &str) -> String {
    let name = format!("walrelay {progress_name}");
    let kept_as_is = |c: char| c.is_ascii() && !c.is_ascii_control();
    if name.len() <= APPLICATION_NAME_MAX && name.chars().all(kept_as_is) {
        return name;
    }
    let digest = Sha256::digest(progress_name.as_bytes());
    let tag = format!(
        "#{:08x}",
        u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
    );
    let mut head: String = name
        .chars()
        .map(|c| if kept_as_is(c) { c } else { '_' })
        .collect();
    head.truncate(APPLICATION_NAME_MAX - tag.len());
    head + &tag
}

/// Waiting for another session to end: pauses that grow from 50 ms to 2 s, and what is
/// waited for said at most every 30 s.
struct Patience {
    pause: Duration,
    last_said: Option<Instant>,
}

impl Patience {
    fn new() -> Self {
        Patience {
            pause: Duration::from_millis(50),
            last_said: None,
        }
    }

    /// Time to say (again) what is waited for; the caller logs it.
    fn time_to_say(&mut self) -> bool {
        let due = self
            .last_said
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(30));
        if due {
            self.last_said = Some(Instant::now());
        }
        due
    }

    fn has_waited(&self) -> bool {
        self.last_said.is_some()
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(2));
    }
}

/// Wait until the session of `client` owns the progress named `name` on its target: it
/// holds the advisory lock that one live relay holds per sink, and no other session of the
/// sink (`session_name`) is left — a killed relay's backends end once they have finished
/// what they were sent, commits included. Only then is the recorded position final.
///
/// A second relay configured for the same sink waits here for as long as the first one
/// runs, saying so every 30 s.
pub async fn fence(client: &Client, name: &str) -> Result<(), ProgressError> {
    let sql_err = |e| PgError::from_sql("taking ownership of the sink's progress", e);
    let application = session_name(name);
    let mut locked = false;
    let mut patience = Patience::new();
    loop {
        if !locked {
            locked = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, hashtext($2::text))",
                    &[&FENCE_LOCK_CLASS, &name],
                )
                .await
                .map_err(sql_err)?
                .get(0);
        }
        let others = client
            .query(
                "SELECT pid, coalesce(state, '') || coalesce(' on ' || wait_event_type || ' ' || wait_event, '') \
                 FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid() \
                   AND datname = current_database() \
                 ORDER BY pid",
                &[&application],
            )
            .await
            .map_err(sql_err)?;
        if locked && others.is_empty() {
            if patience.has_waited() {
                tracing::info!(progress = %name, "the earlier sessions have ended; this relay owns the sink's progress");
            }
            return Ok(());
        }
        if patience.time_to_say() {
            let sessions: Vec<String> = others
                .iter()
                .map(|r| format!("pid {} ({})", r.get::<_, i32>(0), r.get::<_, String>(1)))
                .collect();
            tracing::warn!(
                progress = %name,
                sessions = %sessions.join(", "),
                "waiting for other walrelay sessions of this sink on the target to end (a relay that was killed leaves its sessions finishing what they were sent; if another relay runs for this sink, stop one of them)"
            );
        }
        patience.pause().await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("cannot create walrelay.progress on the target ({0}): grant the sink's role CREATE on the database, or create it once as a superuser: {CREATE_TABLE_SQL}")]
    CannotCreate(PgError),
}

/// How this sink records its position: a replication origin where permitted, and the
/// `walrelay.progress` row (which also keeps the commit time, for `walrelay status`)
/// wherever the table can exist.
///
/// With both, the row is the authority: it is an ordinary row, written in the transaction
/// whose changes it covers. Both move with the commit record (the origin's
/// `pg_replication_origin_xact_setup` only sets session state until then), so they cannot
/// disagree after a crash. Kill -9 tests once found the origin a transaction ahead of the
/// row: most likely a restarted relay read the row while the killed relay's backend was
/// still committing, which `fence` now prevents. An origin that disagrees is still set
/// back to the row at start, after the fence, with a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    name: String,
    origin: bool,
    table: bool,
}

impl Progress {
    /// Choose the stores and read the recorded position: the end of the last source
    /// transaction applied.
    pub async fn open(
        client: &Client,
        name: &str,
    ) -> Result<(Progress, Option<Lsn>), ProgressError> {
        let origin_lsn = open_origin(client, name).await;
        let origin = origin_lsn.is_some();
        let table = match ensure_table(client).await {
            Ok(()) => true,
            // With an origin the table is optional; without one it is the only store.
            Err(e) if origin => {
                tracing::info!(error = %e, "recording progress in the replication origin only");
                false
            }
            Err(e) => return Err(e),
        };
        let table_lsn = if table {
            read_table(client, name).await?
        } else {
            None
        };
        let applied = match (table_lsn, origin_lsn.flatten()) {
            (Some(row), Some(origin_at)) => {
                if origin_at != row {
                    realign_origin(client, name, row, origin_at).await;
                }
                Some(row)
            }
            (Some(row), None) => Some(row),
            // No row yet: a role that used the origin alone before, or nothing applied.
            (None, origin_at) => origin_at,
        };
        Ok((
            Progress {
                name: name.into(),
                origin,
                table,
            },
            applied,
        ))
    }

    /// Whether the applying session holds a replication origin, which marks every
    /// transaction it commits.
    pub fn has_origin(&self) -> bool {
        self.origin
    }

    pub fn describe(&self) -> String {
        match (self.origin, self.table) {
            (true, true) => format!("replication origin and walrelay.progress row {}", self.name),
            (true, false) => format!("replication origin {}", self.name),
            _ => format!("walrelay.progress row {}", self.name),
        }
    }

    /// Make `session` the one that records (with an origin: it holds the origin). An
    /// origin still held by a session this relay does not know of (`fence` waits for those
    /// it knows) is waited for, with a log line naming it.
    pub async fn attach(&self, session: &ApplySession) -> Result<(), ApplyError> {
        if !self.origin {
            return Ok(());
        }
        let mut patience = Patience::new();
        loop {
            let taken = session
                .client()
                .execute(
                    "SELECT pg_replication_origin_session_setup($1)",
                    &[&self.name],
                )
                .await
                .map_err(|e| PgError::from_sql("taking the replication origin", e));
            match taken {
                Ok(_) => return Ok(()),
                Err(e) if e.code() == Some("55006") => {
                    if patience.time_to_say() {
                        tracing::warn!(origin = %self.name, error = %e, "waiting for the session that holds the replication origin to end");
                    }
                    patience.pause().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn detach(&self, session: &ApplySession) -> Result<(), ApplyError> {
        if self.origin {
            session
                .client()
                .batch_execute("SELECT pg_replication_origin_session_reset()")
                .await
                .map_err(|e| PgError::from_sql("releasing the replication origin", e))?;
        }
        Ok(())
    }

    /// Queue the record of `commit` in the session's open transaction (which `attach`ed).
    pub async fn record(
        &self,
        session: &mut ApplySession,
        commit: &TxnCommit,
        at: ChangeAt,
    ) -> Result<(), ApplyError> {
        let time = commit.commit_time.to_string();
        if self.origin {
            session.set_commit_origin(commit.end_lsn, &time);
        }
        if self.table {
            let params = vec![
                TextParam(Some(self.name.clone())),
                TextParam(Some(commit.end_lsn.to_string())),
                TextParam(Some(time)),
            ];
            session.queue_own(RECORD_SQL, params, at).await?;
        }
        Ok(())
    }

    /// Commit a streamed transaction's session with the record of `commit`. An origin is
    /// borrowed from `main` (which has no transaction open) for the duration.
    pub async fn commit_stream(
        &self,
        main: &ApplySession,
        stream: &mut ApplySession,
        commit: &TxnCommit,
    ) -> Result<(), ApplyError> {
        if self.origin {
            self.detach(main).await?;
            self.attach(stream).await?;
        }
        self.record(stream, commit, ChangeAt::Streaming(commit.xid))
            .await?;
        let committed = stream.commit().await;
        if self.origin {
            self.detach(stream).await?;
            self.attach(main).await?;
        }
        committed
    }
}

/// What `walrelay status` shows of a postgres sink: the recorded position and, where the
/// table has it, the commit time of the last transaction applied.
pub async fn recorded(
    client: &Client,
    name: &str,
) -> Result<Option<(Lsn, Option<String>)>, PgError> {
    let table = client
        .query_opt(
            "SELECT p.lsn::text, to_char(p.commit_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM walrelay.progress p WHERE p.name = $1 AND to_regclass('walrelay.progress') IS NOT NULL",
            &[&name],
        )
        .await;
    let from_table = match table {
        Ok(row) => row.and_then(|r| {
            let lsn: Lsn = r.get::<_, String>(0).parse().ok()?;
            Some((lsn, r.get::<_, Option<String>>(1)))
        }),
        // No table: only an origin, or nothing yet.
        Err(_) => None,
    };
    let origin: Option<Lsn> = client
        .query_one(
            "SELECT pg_replication_origin_progress($1, true)::text",
            &[&name],
        )
        .await
        .ok()
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|s| s.parse().ok());
    // The row is the authority where there is one (see `Progress`).
    Ok(match (from_table, origin) {
        (Some(t), _) => Some(t),
        (None, Some(o)) => Some((o, None)),
        (None, None) => None,
    })
}

/// The source's WAL insert position: past every transaction committed (visible or not)
/// when it is read, so a target that applied past it holds all an earlier read saw.
pub async fn wal_insert_position(source: &Client) -> Result<Lsn, PgError> {
    let text: String = source
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| PgError::from_sql("reading the WAL position", e))?
        .get(0);
    text.parse().map_err(|_| PgError::Protocol {
        target: "the source".into(),
        detail: format!("WAL position {text:?} does not parse"),
    })
}

/// Wait until the target holds everything the source committed before `at`: the sink's
/// recorded position (`name`), or the slot's confirmed one (every sink holds that), is
/// past it. An idle source gets an empty transaction now and then, so that the stream
/// moves past `at` (the relay confirms the server's keepalives). `false` once `timeout`
/// passed.
pub async fn wait_applied(
    source: &Client,
    target: &Client,
    slot: &str,
    name: &str,
    at: Lsn,
    timeout: Duration,
) -> Result<bool, PgError> {
    let started = Instant::now();
    let mut nudged: Option<Instant> = None;
    loop {
        let recorded = recorded(target, name)
            .await?
            .map(|(lsn, _)| lsn)
            .unwrap_or(Lsn::ZERO);
        let confirmed: Option<String> = source
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| PgError::from_sql("reading the slot's position", e))?
            .and_then(|r| r.get(0));
        let confirmed = confirmed.and_then(|t| t.parse().ok()).unwrap_or(Lsn::ZERO);
        if recorded.max(confirmed) >= at {
            return Ok(true);
        }
        if started.elapsed() >= timeout {
            return Ok(false);
        }
        if started.elapsed() >= Duration::from_millis(200)
            && nudged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            // A transaction id and a commit record: WAL the stream passes, which pgoutput
            // skips (no change) and the server follows with a keepalive. Read-write even
            // where a cutover made the database read-only by default.
            source
                .batch_execute("BEGIN READ WRITE; SELECT pg_current_xact_id(); COMMIT")
                .await
                .map_err(|e| PgError::from_sql("moving the source's stream on", e))?;
            nudged = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The origin's position, creating the origin if missing; `None` when the role may not use
/// origins (they need superuser, or EXECUTE granted on the functions).
async fn open_origin(client: &Client, name: &str) -> Option<Option<Lsn>> {
    let exists = client
        .query_one("SELECT pg_replication_origin_oid($1) IS NOT NULL", &[&name])
        .await
        .ok()?
        .get::<_, bool>(0);
    if !exists {
        if let Err(e) = client
            .execute("SELECT pg_replication_origin_create($1)", &[&name])
            .await
        {
            tracing::info!(
                error = %PgError::from_sql("pg_replication_origin_create", e),
                "recording progress in walrelay.progress (the role may not create a replication origin)"
            );
            return None;
        }
    }
    let row = client
        .query_one(
            "SELECT pg_replication_origin_progress($1, true)::text",
            &[&name],
        )
        .await
        .ok()?;
    Some(
        row.get::<_, Option<String>>(0)
            .and_then(|s| s.parse().ok())
            .filter(|l: &Lsn| *l != Lsn::ZERO),
    )
}

/// Set the origin back (or forward) to the recorded row, which only a commit moves. Best
/// effort: the row decides where the sink resumes either way.
async fn realign_origin(client: &Client, name: &str, row: Lsn, origin_at: Lsn) {
    tracing::warn!(
        origin = %name,
        origin_at = %origin_at,
        recorded = %row,
        "the replication origin disagrees with walrelay.progress (a transaction was cut off); setting it to the recorded position"
    );
    if let Err(e) = client
        .execute(
            "SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)",
            &[&name, &row.to_string()],
        )
        .await
    {
        tracing::warn!(error = %PgError::from_sql("", e), "the replication origin keeps its position");
    }
}

async fn read_table(client: &Client, name: &str) -> Result<Option<Lsn>, ProgressError> {
    let row = client
        .query_opt(
            "SELECT lsn::text FROM walrelay.progress WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(|e| PgError::from_sql("reading walrelay.progress", e))?;
    Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
}

async fn ensure_table(client: &Client) -> Result<(), ProgressError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('walrelay.progress') IS NOT NULL", &[])
        .await
        .map_err(|e| PgError::from_sql("looking for walrelay.progress", e))?
        .get(0);
    if !exists {
        client.batch_execute(CREATE_TABLE_SQL).await.map_err(|e| {
            ProgressError::CannotCreate(PgError::from_sql("creating walrelay.progress", e))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_what_postgresql_keeps_and_stay_apart() {
        assert_eq!(
            session_name("walrelay/postgres"),
            "walrelay walrelay/postgres"
        );
        let long = |end: &str| format!("walrelay/{}{end}", "x".repeat(60));
        let (a, b) = (session_name(&long("a")), session_name(&long("b")));
        let french = session_name("walrelay/entrepôt");
        let german = session_name("walrelay/entrepöt");
        for name in [&a, &b, &french, &german] {
            assert!(name.len() <= APPLICATION_NAME_MAX, "{name}");
            assert!(
                name.chars().all(|c| c.is_ascii() && !c.is_ascii_control()),
                "{name}"
            );
        }
        assert_ne!(a, b);
        assert_ne!(french, german);
        assert!(french.starts_with("walrelay walrelay/entrep_"), "{french}");
        assert_eq!(
            french,
            session_name("walrelay/entrepôt"),
            "the same on every run"
        );
    }
}
