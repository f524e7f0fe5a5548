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
//! synchronous standby has flushed past it.
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

/// Whether a synchronous standby is asked for, and how far every commit is safe from a
/// failover: the synchronous standby's flush position (a standby decoding, PostgreSQL 16+:
/// nothing to wait for).
const SAFE_POSITION: &str =
    "SELECT NOT pg_is_in_recovery() AND current_setting('synchronous_standby_names') <> '',
         (SELECT max(flush_lsn) FROM pg_stat_replication WHERE sync_state = 'sync')::text";

/// How long "no synchronous standby" is taken for granted (see the module's comment).
const UNNAMED_RECHECK: Duration = Duration::from_millis(100);

/// Between two looks while waiting: the standby confirms within milliseconds, so the
/// first pause is short; it doubles up to `POLL_MAX` while the standby is away.
pub const POLL: Duration = Duration::from_millis(2);
pub const POLL_MAX: Duration = Duration::from_millis(100);

pub struct StandbyGate {
    client: Client,
    safe: Lsn,
    /// No synchronous standby was asked for at the last look: everything passes until then.
    unnamed_until: Option<Instant>,
}

impl StandbyGate {
    /// A gate on its own session, or `None` (with a warning) when this role cannot see the
    /// standby's position (`pg_read_all_stats`): holding back would then never end.
    pub async fn open(info: &ConnInfo) -> Result<Option<StandbyGate>, SourceError> {
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
            safe: Lsn::ZERO,
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
            .query_one(SAFE_POSITION, &[])
            .await
            .map_err(|e| PgError::from_sql("reading the synchronous standby's position", e))?;
        if !row.get::<_, bool>(0) {
            self.unnamed_until = Some(Instant::now() + UNNAMED_RECHECK);
            return Ok(true);
        }
        self.unnamed_until = None;
        // None: a standby is named but none is connected (commits wait on the primary too).
        let safe: Option<String> = row.get(1);
        self.safe = self
            .safe
            .max(safe.and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO));
        Ok(lsn <= self.safe)
    }
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
