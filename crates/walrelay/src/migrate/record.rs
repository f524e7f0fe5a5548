//! Where a migration stands, recorded in the target (`walrelay.migration`), so that
//! `walrelay migrate` resumes after a crash where it stopped, and `cutover`, `rollback`
//! and `status` talk to it through the same row.

use tokio_postgres::Client;
use walrelay_model::Lsn;

use crate::pg::PgError;

const CREATE_SQL: &str = "CREATE SCHEMA IF NOT EXISTS walrelay;
     CREATE TABLE IF NOT EXISTS walrelay.migration (
         name text PRIMARY KEY,
         phase text NOT NULL,
         step text,
         requested text,
         handoff_lsn pg_lsn,
         fenced_at timestamptz,
         pause_seconds float8,
         verified_at timestamptz,
         verify_summary text,
         table_changes text,
         recheck text,
         note text,
         changed_at timestamptz NOT NULL DEFAULT now())";

/// The phases, in the order a migration goes through them. `Cutover` and `Rollback` are
/// under way (their `step` says how far); `CutOver` and `RolledBack` are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Precheck,
    Copy,
    Incremental,
    Verify,
    Ready,
    Cutover,
    CutOver,
    Rollback,
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Precheck,
        Phase::Copy,
        Phase::Incremental,
        Phase::Verify,
        Phase::Ready,
        Phase::Cutover,
        Phase::CutOver,
        Phase::Rollback,
        Phase::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Precheck => "precheck",
            Phase::Copy => "copy",
            Phase::Incremental => "incremental",
            Phase::Verify => "verify",
            Phase::Ready => "ready",
            Phase::Cutover => "cutover",
            Phase::CutOver => "cut_over",
            Phase::Rollback => "rollback",
            Phase::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// Whether the stream runs source → target in this phase (else target → source).
    pub fn forward(self) -> bool {
        !matches!(self, Phase::CutOver | Phase::Rollback)
    }
}

/// The steps of a cutover or rollback, in order; each is recorded once done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The tables changed since the last verification compared, while writes go on.
    Verified,
    /// Writes stopped on the side giving up its role; the hand-off position read.
    Fence,
    /// The other side applied everything before the hand-off; the old stream stopped and
    /// the row counts of the tables changed since the verification compared.
    Drain,
    /// Every sequence on the side taking over is past the other's.
    Sequences,
    /// The stream in the new direction set up (publication, slot at the hand-off) and the
    /// old stream's slot dropped.
    Stream,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Verified => "verified",
            Step::Fence => "fence",
            Step::Drain => "drain",
            Step::Sequences => "sequences",
            Step::Stream => "stream",
        }
    }

    pub fn parse(text: &str) -> Option<Step> {
        [
            Step::Verified,
            Step::Fence,
            Step::Drain,
            Step::Sequences,
            Step::Stream,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

#[derive(Debug, Clone)]
pub struct Record {
    pub phase: Phase,
    /// The last step done of a cutover or rollback under way.
    pub step: Option<Step>,
    /// `cutover` or `rollback`, asked for and not yet taken up.
    pub requested: Option<String>,
    pub handoff: Option<Lsn>,
    pub pause_seconds: Option<f64>,
    pub verified_at: Option<String>,
    pub verify_summary: Option<String>,
    /// Each table's change counters when it was last verified (JSON).
    pub table_changes: Option<String>,
    /// Key ranges a switch's verification left unsettled, to compare under the fence (JSON).
    pub recheck: Option<String>,
    pub note: Option<String>,
}

fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> PgError {
    move |e| PgError::from_sql(what, e)
}

pub async fn ensure(client: &Client) -> Result<(), PgError> {
    client
        .batch_execute(CREATE_SQL)
        .await
        .map_err(pg("creating walrelay.migration on the target"))
}

/// The record named `name`, if the table and the row exist.
pub async fn read(client: &Client, name: &str) -> Result<Option<Record>, PgError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('walrelay.migration') IS NOT NULL", &[])
        .await
        .map_err(pg("looking for walrelay.migration"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT phase, step, requested, handoff_lsn::text, pause_seconds,
                    to_char(verified_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC',
                    verify_summary, table_changes, note, recheck
             FROM walrelay.migration WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(pg("reading walrelay.migration"))?;
    let Some(r) = row else { return Ok(None) };
    let phase: String = r.get(0);
    Ok(Some(Record {
        phase: Phase::parse(&phase).unwrap_or(Phase::Precheck),
        step: r.get::<_, Option<String>>(1).and_then(|s| Step::parse(&s)),
        requested: r.get(2),
        handoff: r.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        pause_seconds: r.get(4),
        verified_at: r.get(5),
        verify_summary: r.get(6),
        table_changes: r.get(7),
        note: r.get(8),
        recheck: r.get(9),
    }))
}

/// The record, made (in phase `precheck`) if there is none.
pub async fn open(client: &Client, name: &str) -> Result<Record, PgError> {
    ensure(client).await?;
    client
        .execute(
            "INSERT INTO walrelay.migration (name, phase) VALUES ($1, 'precheck') ON CONFLICT (name) DO NOTHING",
            &[&name],
        )
        .await
        .map_err(pg("starting the migration record"))?;
    read(client, name).await?.ok_or_else(|| PgError::Protocol {
        target: "the target".into(),
        detail: "walrelay.migration has no row for this migration right after it was made".into(),
    })
}

/// Enter `phase`; a cutover or rollback starts with no step done, a finished one clears
/// the request it answered.
pub async fn set_phase(client: &Client, name: &str, phase: Phase) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.migration SET phase = $2, step = NULL, changed_at = now(),
                    requested = CASE WHEN $2 IN ('cut_over', 'rolled_back', 'cutover', 'rollback') THEN NULL ELSE requested END
             WHERE name = $1",
            &[&name, &phase.as_str()],
        )
        .await
        .map_err(pg("recording the migration's phase"))?;
    crate::failpoint::MIGRATE_PHASE_RECORDED.hit();
    Ok(())
}

pub async fn set_step(client: &Client, name: &str, step: Step) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.migration SET step = $2, changed_at = now() WHERE name = $1",
            &[&name, &step.as_str()],
        )
        .await
        .map_err(pg("recording a cutover step"))?;
    crate::failpoint::MIGRATE_STEP_RECORDED.hit();
    Ok(())
}

/// The fence is up: when (the first time only, so that a resumed cutover still measures
/// its pause from the first refused write) and at which position of the side fenced.
pub async fn set_fenced(client: &Client, name: &str, handoff: Lsn) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.migration SET handoff_lsn = $2::text::pg_lsn,
                    fenced_at = coalesce(fenced_at, clock_timestamp()), changed_at = now()
             WHERE name = $1",
            &[&name, &handoff.to_string()],
        )
        .await
        .map_err(pg("recording the hand-off position"))?;
    Ok(())
}

/// The new side is open for writes: the pause since the fence, kept in the record.
pub async fn set_opened(client: &Client, name: &str) -> Result<f64, PgError> {
    let pause: Option<f64> = client
        .query_one(
            "UPDATE walrelay.migration
             SET pause_seconds = extract(epoch FROM clock_timestamp() - fenced_at)::float8,
                 fenced_at = NULL, changed_at = now()
             WHERE name = $1 RETURNING pause_seconds",
            &[&name],
        )
        .await
        .map_err(pg("recording the write pause"))?
        .get(0);
    Ok(pause.unwrap_or(0.0))
}

pub async fn set_verified(
    client: &Client,
    name: &str,
    summary: &str,
    table_changes: &str,
) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.migration SET verified_at = now(), verify_summary = $2,
                    table_changes = $3, changed_at = now() WHERE name = $1",
            &[&name, &summary, &table_changes],
        )
        .await
        .map_err(pg("recording a verification"))?;
    Ok(())
}

/// Each table's change counters on the side that took writes when the record was made,
/// for the next switch's verification (what changed since).
pub async fn set_table_changes(
    client: &Client,
    name: &str,
    table_changes: &str,
) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.migration SET table_changes = $2, changed_at = now() WHERE name = $1",
            &[&name, &table_changes],
        )
        .await
        .map_err(pg("recording the tables' change counters"))?;
    Ok(())
}

pub async fn set_recheck(client: &Client, name: &str, recheck: &str) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.migration SET recheck = $2, changed_at = now() WHERE name = $1",
            &[&name, &recheck],
        )
        .await
        .map_err(pg("recording the ranges to compare again"))?;
    Ok(())
}

/// A line for the operator (why a cutover was called off, what a verification found);
/// `None` clears it.
pub async fn set_note(client: &Client, name: &str, note: Option<&str>) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.migration SET note = $2, changed_at = now() WHERE name = $1",
            &[&name, &note],
        )
        .await
        .map_err(pg("recording a note"))?;
    Ok(())
}

/// Ask the running `walrelay migrate` for a cutover or a rollback; only from a phase where
/// it can be taken up. Returns the phase the record is in when it cannot.
pub async fn request(
    client: &Client,
    name: &str,
    what: &str,
) -> Result<Result<(), Option<Phase>>, PgError> {
    let from: &[&str] = match what {
        "cutover" => &["ready", "rolled_back"],
        _ => &["cut_over"],
    };
    let from: Vec<String> = from.iter().map(|s| s.to_string()).collect();
    let done = client
        .execute(
            "UPDATE walrelay.migration SET requested = $2, note = NULL, changed_at = now()
             WHERE name = $1 AND phase = ANY($3)",
            &[&name, &what, &from],
        )
        .await
        .map_err(pg("asking for a cutover or rollback"))?;
    if done == 1 {
        return Ok(Ok(()));
    }
    Ok(Err(read(client, name).await?.map(|r| r.phase)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_steps_read_back() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        for s in [
            Step::Verified,
            Step::Fence,
            Step::Drain,
            Step::Sequences,
            Step::Stream,
        ] {
            assert_eq!(Step::parse(s.as_str()), Some(s));
        }
        assert!(Phase::Ready.forward() && Phase::Cutover.forward() && Phase::RolledBack.forward());
        assert!(!Phase::CutOver.forward() && !Phase::Rollback.forward());
    }
}
