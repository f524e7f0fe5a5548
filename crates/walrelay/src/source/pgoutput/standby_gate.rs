//! Holding decoded transactions until the synchronous standby has them.
//!
//! PostgreSQL's logical walsender sends a transaction once it is flushed on the primary,
//! before the synchronous standby confirms it and before its client is told it committed.
//! If the primary dies then, the standby is promoted without it — and a target that had
//! applied it would hold a transaction the cluster never had, and record a position past
//! the new primary's fork, so that the new primary's first transactions would be taken
//! for ones already applied. PostgreSQL 17 holds its own walsenders back
//! (`synchronized_standby_slots`); this gate does the same in the relay, for every
//! version: nothing reaches a sink (commit, message or keepalive position) until the
//! synchronous standbys have flushed past it — as PostgreSQL releases a waiting commit to
//! its client: with `FIRST n (…)` (or a plain list, n = 1) once all n synchronous
//! standbys have it, with `ANY n (…)` (quorum) once n of the candidates have it.
//!
//! Without a synchronous standby configured, everything passes, and the setting is looked
//! at again only every `UNNAMED_RECHECK`, not for every batch (a query per batch cost
//! the source a sixth more CPU per transaction in W2). That is safe: a standby just named
//! is not one a failover may promote until it has caught up past the moment it was named
//! — `walrelay ha` names it in etcd only a loop (`loop_wait`, 1 s) after that — and by
//! then the gate has seen the setting.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use walrelay_model::{Event, Lsn};

use super::SourceError;
use crate::pg::{sql, ConnInfo, PgError};

/// Whether a synchronous standby is asked for (a standby decoding, PostgreSQL 16+: nothing
/// to wait for), the setting, the flush positions of the standbys a commit waits on
/// (`sync` under `FIRST`, `quorum` under `ANY`), highest first, and the synchronous state
/// of the relay's own walsender (reading slot `$1`), which should be `async`.
const SAFE_POSITION: &str =
    "SELECT NOT pg_is_in_recovery() AND current_setting('synchronous_standby_names') <> '',
         current_setting('synchronous_standby_names'),
         (SELECT array_agg(flush_lsn::text ORDER BY flush_lsn DESC) FROM pg_stat_replication
           WHERE sync_state IN ('sync', 'quorum') AND flush_lsn IS NOT NULL),
         (SELECT r.sync_state FROM pg_stat_replication r
            JOIN pg_replication_slots s ON s.active_pid = r.pid
           WHERE s.slot_name = $1)";

/// How often the relay says again that `synchronous_standby_names` names its own
/// connection.
const SELF_NAMED_REPEAT: Duration = Duration::from_secs(60);

/// How long "no synchronous standby" is taken for granted (see the module's comment).
const UNNAMED_RECHECK: Duration = Duration::from_millis(100);

/// Between two looks while waiting: the standby confirms within milliseconds, so the
/// first pause is short; it doubles up to `POLL_MAX` while the standby is away.
pub const POLL: Duration = Duration::from_millis(2);
pub const POLL_MAX: Duration = Duration::from_millis(100);

pub struct StandbyGate {
    client: Client,
    /// The relay's slot: its walsender is the relay's own connection.
    slot: String,
    safe: Lsn,
    /// When the relay last said its own connection is a synchronous candidate.
    self_named_said: Option<Instant>,
    /// No synchronous standby was asked for at the last look: everything passes until then.
    unnamed_until: Option<Instant>,
}

impl StandbyGate {
    /// A gate on its own session, or `None` (with a warning) when this role cannot see the
    /// standby's position (`pg_read_all_stats`): holding back would then never end.
    pub async fn open(info: &ConnInfo, slot: &str) -> Result<Option<StandbyGate>, SourceError> {
        let client = sql::connect(info).await?;
        let can_see: bool = client
            .query_one(
                "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
                   FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| PgError::from_sql("checking pg_read_all_stats", e))?
            .get(0);
        if !can_see {
            tracing::warn!(
                "the source role can see no standby's position (grant it pg_read_all_stats): transactions are not held until the synchronous standby has them, so after a failover a target may hold one the new primary lacks"
            );
            return Ok(None);
        }
        Ok(Some(StandbyGate {
            client,
            slot: slot.to_string(),
            safe: Lsn::ZERO,
            self_named_said: None,
            unnamed_until: None,
        }))
    }

    /// Whether everything up to `lsn` is safe now (a query only when it may have become
    /// so since the last look).
    pub async fn passes(&mut self, lsn: Lsn) -> Result<bool, SourceError> {
        if lsn <= self.safe || self.unnamed_until.is_some_and(|t| Instant::now() < t) {
            return Ok(true);
        }
        let row = self
            .client
            .query_one(SAFE_POSITION, &[&self.slot])
            .await
            .map_err(|e| PgError::from_sql("reading the synchronous standby's position", e))?;
        if !row.get::<_, bool>(0) {
            self.unnamed_until = Some(Instant::now() + UNNAMED_RECHECK);
            return Ok(true);
        }
        self.unnamed_until = None;
        let setting: String = row.get(1);
        let own_state: Option<String> = row.get(3);
        if own_state.as_deref().is_some_and(|s| s != "async")
            && self
                .self_named_said
                .is_none_or(|t| t.elapsed() >= SELF_NAMED_REPEAT)
        {
            self.self_named_said = Some(Instant::now());
            tracing::error!(
                synchronous_standby_names = %setting,
                sync_state = own_state.as_deref().unwrap_or_default(),
                "synchronous_standby_names names this relay's own connection (its application_name; '*' names every one): commits may wait for the relay while the relay waits for the standbys to have them. Name only the physical standbys there, or set source.wait_for_sync_standby = false"
            );
        }
        let flushed: Vec<Lsn> = row
            .get::<_, Option<Vec<String>>>(2)
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l.parse().ok())
            .collect();
        if let Some(safe) = released_position(&flushed, standbys_a_commit_waits_for(&setting)) {
            self.safe = self.safe.max(safe);
        }
        Ok(lsn <= self.safe)
    }
}

/// How far PostgreSQL has released waiting commits, given the flush positions of the
/// standbys they wait on, highest first: the `n`th highest (under `FIRST n` exactly the n
/// synchronous standbys are listed, so it is their lowest). `None` while fewer than `n`
/// are connected: commits wait on the primary too.
fn released_position(flushed: &[Lsn], n: usize) -> Option<Lsn> {
    flushed.get(n.max(1) - 1).copied()
}

/// The number of standbys a commit waits for under `synchronous_standby_names` (a value
/// PostgreSQL accepted): `[FIRST] n (names)` or `ANY n (names)` give n; a plain list of
/// names (or `*`) gives 1. The keywords are case-insensitive; whitespace is what
/// PostgreSQL's scanner skips. A number too large to read holds everything, as it holds
/// every commit.
fn standbys_a_commit_waits_for(setting: &str) -> usize {
    let space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
    let s = setting.trim_start_matches(space);
    let after_keyword = ["first", "any"].iter().find_map(|k| {
        let head = s.get(..k.len())?;
        let rest = &s[k.len()..];
        (head.eq_ignore_ascii_case(k) && rest.starts_with(space))
            .then(|| rest.trim_start_matches(space))
    });
    let s = after_keyword.unwrap_or(s);
    let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || !s[digits..].trim_start_matches(space).starts_with('(') {
        return 1;
    }
    s[..digits].parse().unwrap_or(usize::MAX)
}

/// The highest position in `batch` that a sink could make durable or record: commits,
/// messages, keepalives.
pub fn gate_position(batch: &[Event]) -> Lsn {
    batch
        .iter()
        .filter_map(|e| match e {
            Event::Commit(c) | Event::StreamCommit { commit: c, .. } => Some(c.end_lsn),
            Event::Message(m) => Some(m.lsn),
            Event::Keepalive(l) => Some(*l),
            _ => None,
        })
        .max()
        .unwrap_or(Lsn::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_number_of_standbys_a_commit_waits_for_is_read_as_postgresql_does() {
        for (setting, n) in [
            ("s1", 1),
            ("s1, s2", 1),
            ("*", 1),
            ("2 (s1, s2, s3)", 2),
            ("FIRST 2 (s1, s2, s3)", 2),
            ("first 3(s1,s2,s3)", 3),
            ("ANY 2 (s1, s2, s3)", 2),
            ("  any   1 ( \"s 1\", s2)", 1),
            ("ANY\x0b2\x0c(s1, s2)", 2),
            ("99999999999999999999999 (s1)", usize::MAX),
            // A quoted name, not a number.
            ("\"2\"", 1),
        ] {
            assert_eq!(standbys_a_commit_waits_for(setting), n, "{setting}");
        }
    }

    #[test]
    fn commits_are_released_at_the_nth_highest_flush() {
        let l = |n: u64| Lsn(n);
        let flushed = [l(300), l(200), l(100)];
        assert_eq!(released_position(&flushed, 1), Some(l(300)));
        assert_eq!(released_position(&flushed, 2), Some(l(200)));
        assert_eq!(released_position(&flushed, 3), Some(l(100)));
        assert_eq!(released_position(&flushed, 4), None);
        assert_eq!(released_position(&[], 1), None);
        assert_eq!(released_position(&flushed, usize::MAX), None);
    }
}
