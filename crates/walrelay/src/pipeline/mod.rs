//! Wiring: source → sinks → acknowledgement. Runs the pipeline until a signal, restarts it
//! after transient failures, and decides what may be confirmed to the source.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use walrelay_model::Lsn;

use crate::config::Config;
use crate::sink::{self, SinkError, SinkHandle};
use crate::source::pgoutput::assemble::StreamNeeds;
use crate::source::pgoutput::{self, PgOutputSource, SourceError};

/// The position that may be confirmed to the source: the lowest that every sink holds
/// durably, never below where this run started, and never lower than what was already
/// confirmed.
pub fn ack_position(start: Lsn, sinks_durable: &[Lsn], already_confirmed: Lsn) -> Lsn {
    let lowest = sinks_durable.iter().copied().min().unwrap_or(start);
    lowest.max(start).max(already_confirmed)
}

/// Below which position a streamed transaction is held back and sent whole to every sink.
///
/// A sink that applies transactions while PostgreSQL streams them learns a transaction's
/// commit position only at its end; if it already holds that transaction (it committed it
/// before a crash, and the slot was not confirmed because another sink had not), applying
/// the streamed changes again would repeat them. Every transaction that commits before
/// the highest position a sink recorded starts streaming before it too, so holding back
/// the streams that start below it lets each sink skip what it holds by commit position.
/// Likewise for a table copied at `copied_until`. And at least below `start`: decoding
/// resumes at the slot's `restart_lsn`, and PostgreSQL 15 streams again the first chunks of
/// a large transaction that began there even when it committed before `start` (it then
/// ends it with a Stream Abort) — applying those would repeat rows and schema changes the
/// target holds (found with a `CREATE TABLE` streamed before a clean restart).
pub fn whole_until(
    start: Lsn,
    copied_until: Lsn,
    recorded: impl Iterator<Item = Option<Lsn>>,
) -> Lsn {
    let highest = recorded
        .flatten()
        .chain([copied_until])
        .max()
        .unwrap_or(Lsn::ZERO);
    highest.max(start)
}

/// Wait until one of the sinks' durable positions moves (never, without sinks).
pub async fn durable_moved(watches: &mut [tokio::sync::watch::Receiver<Lsn>]) {
    if watches.is_empty() {
        return std::future::pending().await;
    }
    let changes = watches.iter_mut().map(|w| {
        Box::pin(async move {
            if w.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    });
    futures_util::future::select_all(changes).await;
}

/// The sinks of one pipeline run, as the source sees them.
pub struct Fanout {
    sinks: Vec<SinkHandle>,
}

impl Fanout {
    pub fn sinks(&self) -> &[SinkHandle] {
        &self.sinks
    }

    /// What the sinks need of streamed transactions. Those that may have committed before
    /// `copied_until` (a table copied then) or before a position a sink recorded go whole to
    /// every sink: see `whole_until`.
    pub fn stream_needs(&self, start: Lsn, copied_until: Lsn) -> StreamNeeds {
        let recorded = self.sinks.iter().filter(|s| s.applies_streams);
        StreamNeeds {
            events: self.sinks.iter().any(|s| s.applies_streams),
            whole: self.sinks.iter().any(|s| !s.applies_streams),
            whole_until: whole_until(start, copied_until, recorded.map(|s| s.recorded)),
        }
    }

    /// Every sink's durable position now.
    pub fn durable(&self) -> Vec<Lsn> {
        self.sinks.iter().map(|s| *s.durable.borrow()).collect()
    }

    /// Close every input, wait for the sinks to drain and sync, and return their final
    /// durable positions with the first failure.
    async fn close(self) -> (Vec<Lsn>, Result<(), SinkError>) {
        let mut result = Ok(());
        let mut durable = Vec::new();
        for s in self.sinks {
            let SinkHandle {
                name,
                input,
                durable: watch,
                task,
                ..
            } = s;
            drop(input);
            let r = sink::join(name, task).await;
            durable.push(*watch.borrow());
            if result.is_ok() {
                result = r;
            }
        }
        (durable, result)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

impl RelayError {
    /// None of the source's hosts takes writes now.
    fn is_failover_under_way(&self) -> bool {
        matches!(
            self,
            RelayError::Source(SourceError::Pg(crate::pg::PgError::NoServerFits { .. }))
        )
    }

    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Source(e) => e.is_transient(),
            RelayError::Sink(e) => e.is_transient(),
            RelayError::Snapshot(e) => e.is_transient(),
        }
    }
}

/// How a pipeline run ended without error.
enum RunEnd {
    Stopped,
}

/// Run until `cancel` fires. A transient failure after the stream was running (the
/// connection dropped, the server restarted, a failover) restarts the pipeline after a pause
/// that grows to 5 s; while none of several hosts takes writes (a failover under way) it
/// looks every second, so that a relay finds a new primary within a second of its
/// promotion. A failure before the first stream started is returned, since it is most
/// likely a configuration problem the operator must see.
pub async fn run(config: &Config, cancel: CancellationToken) -> Result<(), RelayError> {
    let mut streamed_once = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        match run_once(config, &cancel, &mut streamed_once).await {
            Ok(RunEnd::Stopped) => return Ok(()),
            Err(e) if streamed_once && e.is_transient() && !cancel.is_cancelled() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "pipeline interrupted; restarting");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = if e.is_failover_under_way() {
                    Duration::from_secs(1)
                } else {
                    (backoff * 2).min(Duration::from_secs(5))
                };
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run_once(
    config: &Config,
    cancel: &CancellationToken,
    streamed_once: &mut bool,
) -> Result<RunEnd, RelayError> {
    if config.source.capture == crate::config::CaptureMethod::Trigger {
        return run_once_trigger(config, cancel, streamed_once).await;
    }
    // Until the stream runs, a signal drops whatever is under way (checks, waits for the
    // slot, the copy's catalog reads): nothing of it needs finishing.
    let sets = config.sets();
    let prepared = tokio::select! {
        p = async {
            let history = targets_history(config).await?;
            Ok::<_, RelayError>(pgoutput::prepare(&config.source, &sets, &config.ddl, &history).await?)
        } => p?,
        _ = cancel.cancelled() => return Ok(RunEnd::Stopped),
    };
    if let Some(ranges) = config.source.key_ranges {
        let mut sequences: Vec<String> = prepared
            .plan
            .sequences_of(None)
            .into_iter()
            .map(|pair| pair.source)
            .collect();
        sequences.sort();
        sequences.dedup();
        let client = crate::pg::sql::connect(&prepared.info)
            .await
            .map_err(SourceError::from)?;
        crate::source::key_ranges::apply(&client, &sequences, ranges).await?;
    }
    let start = prepared.confirmed;
    // Existing rows first: the copy uses the new slot's snapshot, or a later one for tables
    // still missing a copy (then streamed transactions go whole until past it).
    let Some(copied_until) = copy(
        config,
        &prepared.info,
        &prepared.plan,
        prepared.snapshot.as_ref(),
        cancel,
    )
    .await?
    else {
        return Ok(RunEnd::Stopped);
    };
    let fanout = open_sinks(
        config,
        &prepared.plan,
        &prepared.info,
        start,
        prepared.ddl_mode == crate::config::DdlMode::Additive,
        prepared.snapshot.as_ref(),
        prepared.snapshot.is_some(),
    )
    .await?;
    let needs = fanout.stream_needs(start, copied_until);
    let source = PgOutputSource::start(prepared, &config.source, needs, config.spill_dir()).await;
    stream(source, fanout, cancel, streamed_once).await
}

/// What the postgres targets hold that came through the slot: per sink, the highest of its
/// recorded position and its finished copies' positions (see `pgoutput::TargetsHistory`).
async fn targets_history(config: &Config) -> Result<pgoutput::TargetsHistory, RelayError> {
    let mut history = Vec::new();
    for sink in &config.sinks {
        let crate::config::SinkConfig::Postgres(p) = sink else {
            continue;
        };
        let name = format!("{}/{}", config.source.slot, p.name);
        let read = async {
            let client = crate::pg::sql::connect(&p.url.resolve()?).await?;
            let recorded = crate::sink::postgres::progress::recorded(&client, &name).await?;
            let copied = crate::snapshot::state::read(&client, &name).await?;
            let copied = copied.values().filter_map(|s| match s {
                crate::snapshot::state::CopyState::Done(lsn) => Some(*lsn),
                _ => None,
            });
            Ok::<_, crate::pg::PgError>(
                recorded.map(|(lsn, _)| lsn).into_iter().chain(copied).max(),
            )
        };
        let highest = read.await.map_err(SourceError::Pg)?;
        if let Some(lsn) = highest.filter(|l| *l > Lsn::ZERO) {
            history.push((p.name.clone(), lsn));
        }
    }
    Ok(history)
}

/// The copy for the postgres sinks (`snapshot::copy_for_sinks`): the position it was
/// consistent at, or `None` when a signal stopped it.
async fn copy(
    config: &Config,
    info: &crate::pg::conninfo::ConnInfo,
    plan: &crate::sets::Plan,
    snapshot: Option<&crate::snapshot::SnapshotPoint>,
    cancel: &CancellationToken,
) -> Result<Option<Lsn>, RelayError> {
    // The copy's workers stop on the same token (a child of `cancel`).
    let copied = tokio::select! {
        r = crate::snapshot::copy_for_sinks(config, info, plan, snapshot, cancel) => r,
        _ = cancel.cancelled() => Err(crate::snapshot::SnapshotError::Stopped),
    };
    match copied {
        Err(crate::snapshot::SnapshotError::Stopped) if cancel.is_cancelled() => {
            tracing::info!("copy stopped; the tables not finished are copied at the next start");
            Ok(None)
        }
        other => Ok(Some(other?)),
    }
}

/// A started source, as the pipeline drives it: it sends to the fanout until `cancel`
/// (`run` returns `Ok`, or `SourceError::Stopped` when the signal came while it waited for
/// a sink's room: both are a clean stop), then confirms what the sinks hold.
pub trait RunningSource {
    fn run(
        &mut self,
        fanout: &Fanout,
        cancel: &CancellationToken,
    ) -> impl std::future::Future<Output = Result<(), SourceError>> + Send;
    fn finish(
        self,
        durable: &[Lsn],
    ) -> impl std::future::Future<Output = Result<Lsn, SourceError>> + Send;
}

/// Run the source just started (or close the sinks if it did not start) until `cancel` or
/// a failure; whatever happened, let the sinks make durable what they received, then
/// confirm it.
async fn stream(
    started: Result<impl RunningSource, SourceError>,
    fanout: Fanout,
    cancel: &CancellationToken,
    streamed_once: &mut bool,
) -> Result<RunEnd, RelayError> {
    let mut source = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = fanout.close().await;
            return Err(e.into());
        }
    };
    *streamed_once = true;
    // A signal while a batch was being handed to the sinks ends the run as cleanly as
    // one between batches, whichever the source.
    let streamed = match source.run(&fanout, cancel).await {
        Err(SourceError::Stopped) => Ok(()),
        other => other,
    };
    let (durable, sinks_result) = fanout.close().await;
    match (streamed, sinks_result) {
        (Ok(()), Ok(())) => {
            let confirmed = source.finish(&durable).await?;
            tracing::info!(confirmed = %confirmed, "stopped cleanly");
            Ok(RunEnd::Stopped)
        }
        // A sink failure is the root cause when the source only noticed a closed sink.
        (_, Err(sink_err)) => Err(sink_err.into()),
        (Err(source_err), Ok(())) => {
            // The connection may be gone; confirming is best effort.
            let _ = source.finish(&durable).await;
            Err(source_err.into())
        }
    }
}

/// Open every sink at `start`, and send the snapshot's rows to those that take them
/// (`send_snapshot_reads`).
async fn open_sinks(
    config: &Config,
    plan: &crate::sets::Plan,
    source: &crate::pg::conninfo::ConnInfo,
    start: Lsn,
    ddl_additive: bool,
    snapshot: Option<&crate::snapshot::SnapshotPoint>,
    new_source: bool,
) -> Result<Fanout, RelayError> {
    let mut handles = Vec::new();
    for sink_config in &config.sinks {
        let tables = plan.targets_of(sink_config.sets());
        let sequences = plan.sequences_of(sink_config.sets());
        let context = sink::SinkContext {
            start,
            slot: &config.source.slot,
            database: &source.dbname,
            tables: &tables,
            source: Some(source),
            sequences: &sequences,
            ddl_on_unsafe: config.ddl.on_unsafe,
            ddl_additive,
            two_writers: config.source.origin == crate::config::OriginFilter::None,
        };
        match sink::start(sink_config, &context).await {
            Ok(h) => handles.push(h),
            Err(e) => {
                let _ = Fanout { sinks: handles }.close().await;
                return Err(e.into());
            }
        }
    }
    let fanout = Fanout { sinks: handles };
    if let Err(e) = send_snapshot_reads(config, source, plan, snapshot, new_source, &fanout).await {
        let _ = fanout.close().await;
        return Err(e.into());
    }
    Ok(fanout)
}

/// One run with trigger capture: the same copy, sinks and acknowledgement rule as with
/// logical decoding; the source is the log.
async fn run_once_trigger(
    config: &Config,
    cancel: &CancellationToken,
    streamed_once: &mut bool,
) -> Result<RunEnd, RelayError> {
    use crate::source::trigger::stream::{self, TriggerSource};
    let sets = config.sets();
    let prepared = tokio::select! {
        p = stream::prepare(&config.source, &sets) => p?,
        _ = cancel.cancelled() => return Ok(RunEnd::Stopped),
    };
    let start = prepared.confirmed;
    if copy(
        config,
        &prepared.info,
        &prepared.plan,
        prepared.snapshot.as_ref(),
        cancel,
    )
    .await?
    .is_none()
    {
        return Ok(RunEnd::Stopped);
    }
    let fanout = open_sinks(
        config,
        &prepared.plan,
        &prepared.info,
        start,
        false,
        prepared.snapshot.as_ref(),
        prepared.created,
    )
    .await?;
    let source = TriggerSource::start(prepared, &fanout).await;
    stream(source, fanout, cancel, streamed_once).await
}

/// The snapshot's rows, as read events, to the sinks that take them: at the new slot's
/// snapshot, or — for a sink that has none yet or whose read was cut short, when the slot
/// exists — at a temporary slot's. Such a sink skips what the stream sends of transactions
/// that committed before the snapshot (`sink::jsonl`).
async fn send_snapshot_reads(
    config: &Config,
    info: &crate::pg::conninfo::ConnInfo,
    plan: &crate::sets::Plan,
    snapshot: Option<&crate::snapshot::SnapshotPoint>,
    new_slot: bool,
    fanout: &Fanout,
) -> Result<(), crate::snapshot::SnapshotError> {
    if !config.snapshot.enabled {
        return Ok(());
    }
    let readers: Vec<&SinkHandle> = fanout
        .sinks
        .iter()
        .filter(|s| match s.reads {
            sink::Reads::No => false,
            sink::Reads::WithNewSlot => new_slot,
            sink::Reads::Needed => true,
        })
        .collect();
    if readers.is_empty() {
        return Ok(());
    }
    // The tables of the sets some reader takes (each reader's route keeps its own).
    let takes = |sink: &SinkHandle, set: &String| {
        config
            .sinks
            .iter()
            .find(|c| c.name() == sink.name)
            .and_then(|c| c.sets())
            .is_none_or(|sets| sets.contains(set))
    };
    let tables: Vec<_> = plan
        .tables()
        .iter()
        .filter(|t| readers.iter().any(|r| takes(r, &t.set)))
        .cloned()
        .collect();
    let mut _temporary = None;
    let point = match snapshot {
        Some(p) => p.clone(),
        None => {
            let (conn, point) =
                crate::snapshot::temporary_snapshot(info, &config.source.slot).await?;
            _temporary = Some(conn);
            point
        }
    };
    let rows = crate::snapshot::read::send_reads(info, &tables, &point, &readers).await?;
    tracing::info!(rows, snapshot_lsn = %point.lsn, sinks = readers.len(), "snapshot rows sent");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_is_the_lowest_durable_and_never_goes_back() {
        assert_eq!(ack_position(Lsn(10), &[Lsn(50), Lsn(30)], Lsn(10)), Lsn(30));
        assert_eq!(
            ack_position(Lsn(10), &[Lsn(5)], Lsn(10)),
            Lsn(10),
            "not below the start"
        );
        assert_eq!(
            ack_position(Lsn(10), &[Lsn(20)], Lsn(25)),
            Lsn(25),
            "never backwards"
        );
        assert_eq!(ack_position(Lsn(10), &[], Lsn(10)), Lsn(10));
    }

    #[test]
    fn streams_are_held_back_below_the_highest_recorded_or_copied_position() {
        let none = || [None::<Lsn>].into_iter();
        assert_eq!(
            whole_until(Lsn(10), Lsn::ZERO, none()),
            Lsn(10),
            "what streams again from before the start goes whole"
        );
        assert_eq!(
            whole_until(
                Lsn(10),
                Lsn::ZERO,
                [Some(Lsn(50)), Some(Lsn(30)), None].into_iter()
            ),
            Lsn(50),
            "the sink that is furthest ahead decides"
        );
        assert_eq!(
            whole_until(Lsn(10), Lsn(70), [Some(Lsn(50))].into_iter()),
            Lsn(70)
        );
        assert_eq!(
            whole_until(Lsn(60), Lsn(40), [Some(Lsn(60))].into_iter()),
            Lsn(60)
        );
    }
}
