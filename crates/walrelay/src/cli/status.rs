//! `walrelay status`: where the slot (with trigger capture, the log's consumer) and each
//! sink stand, and how far behind the source.
//!
//! A sink's lag in bytes is the source WAL after the later of its own position and the
//! slot's (or the consumer's) confirmed position (everything before that is durable in
//! every sink). Its lag in seconds is 0 when it is caught up (nothing after its position,
//! or walrelay is running and the sink holds all that was confirmed), and otherwise the
//! age of the last source commit (or tick) it holds.

use std::process::ExitCode;

use walrelay_model::Lsn;

use crate::config::{CaptureMethod, Config, SinkConfig};
use crate::format::json::line_position;
use crate::pg::sql;
use crate::sink::postgres::progress;
use crate::source::pgoutput::setup;
use crate::source::trigger::stream;

pub async fn status(configured: &Config) -> anyhow::Result<ExitCode> {
    // After a migration's cutover the configured slot is gone: the stream to report runs
    // from the new server back into the old one.
    let reverse = crate::migrate::cut_over_stream(configured)
        .await
        .unwrap_or_default();
    if reverse.is_some() {
        println!("cut over: the stream runs from the new server back to the old one");
    }
    let config = reverse.as_ref().unwrap_or(configured);
    let info = crate::pg::locate::locate(&config.source.url.resolve()?).await?;
    let client = sql::connect(&info).await?;
    let current: Lsn = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get::<_, String>(0)
        .parse()?;
    println!("source   {}; current WAL {current}", info.describe());
    let slot_name = &config.source.slot;
    // Everything before `confirmed` is durable in every sink; `streaming`: a relay runs.
    let (confirmed, streaming) = match config.source.capture {
        CaptureMethod::Logical => print_slot(&client, slot_name, current).await?,
        CaptureMethod::Trigger => print_consumer(&client, slot_name, current).await?,
    };
    print_sets(config, &client).await;
    match crate::migrate::describe(configured).await {
        Ok(Some(text)) => println!("{text}"),
        Ok(None) => {}
        Err(e) => println!("migration: cannot read its record: {e}"),
    }
    for sink in &config.sinks {
        print_sink(sink, slot_name, current, confirmed, streaming).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The slot's line; its confirmed position, and whether a relay streams from it.
async fn print_slot(
    client: &tokio_postgres::Client,
    slot_name: &str,
    current: Lsn,
) -> anyhow::Result<(Lsn, bool)> {
    let slot = setup::slot_info(client, slot_name).await?;
    let confirmed = slot
        .as_ref()
        .and_then(|s| s.confirmed_flush)
        .unwrap_or(Lsn::ZERO);
    match &slot {
        None => println!("slot     {slot_name}: does not exist yet (walrelay run creates it)"),
        Some(s) => {
            let state = match s.active_pid {
                Some(pid) => {
                    let lag: Option<f64> = client
                        .query_opt(
                            "SELECT extract(epoch FROM flush_lag)::float8 FROM pg_stat_replication WHERE pid = $1",
                            &[&pid],
                        )
                        .await?
                        .and_then(|r| r.get(0));
                    match lag {
                        Some(l) => format!("streaming (pid {pid}, flush lag {l:.2} s)"),
                        None => format!("streaming (pid {pid})"),
                    }
                }
                None => "not streaming: walrelay is stopped; the source keeps WAL for it".into(),
            };
            println!(
                "slot     {slot_name}: {state}; confirmed {confirmed}, {} behind{}",
                bytes(current.bytes_since(confirmed)),
                s.wal_status
                    .as_deref()
                    .filter(|w| *w != "reserved")
                    .map(|w| format!("; WAL status {w}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok((confirmed, slot.is_some_and(|s| s.active_pid.is_some())))
}

/// Trigger capture: the log's consumer (`source.slot`) in place of a slot: whether a relay
/// captures, the last batch every sink held (its tick's time and position), and the log's
/// size. Returns that batch's end and whether a relay captures.
async fn print_consumer(
    client: &tokio_postgres::Client,
    consumer: &str,
    current: Lsn,
) -> anyhow::Result<(Lsn, bool)> {
    let Some(state) = stream::consumer_state(client, consumer).await? else {
        println!("consumer {consumer} (trigger capture): not installed yet (walrelay run installs the log and the triggers)");
        return Ok((Lsn::ZERO, false));
    };
    let running = match &state.capturing_pid {
        Some(pid) => format!("capturing (pid {pid})"),
        None => "not capturing: walrelay is stopped; the log keeps the changes for it".into(),
    };
    let confirmed = state.confirmed.map_or(Lsn::ZERO, |t| t.end());
    let at = state
        .confirmed
        .and_then(|t| chrono::DateTime::from_timestamp_micros(t.at.unix_micros()))
        .map(|t| {
            format!(
                " (tick at {}, {:.1} s ago)",
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0
            )
        })
        .unwrap_or_default();
    println!(
        "consumer {consumer} (trigger capture): {running}; confirmed {confirmed}{at}, {} behind; log {}",
        bytes(current.bytes_since(confirmed)),
        bytes(state.log_bytes.max(0) as u64)
    );
    Ok((confirmed, state.capturing_pid.is_some()))
}

/// One sink's line: what it applied and how far behind the source it is.
async fn print_sink(
    sink: &SinkConfig,
    slot_name: &str,
    current: Lsn,
    confirmed: Lsn,
    streaming: bool,
) -> anyhow::Result<()> {
    let (kind, applied) = match sink {
        SinkConfig::Jsonl(j) if j.path == "-" => {
            println!(
                "sink     {} (jsonl, standard output): no position kept",
                j.name
            );
            return Ok(());
        }
        SinkConfig::Jsonl(j) => (format!("jsonl {}", j.path), jsonl_position(&j.path)),
        SinkConfig::Amqp(a) => {
            println!(
                "sink     {} (amqp {}, exchange {}): confirmed up to the slot's position",
                a.name,
                a.url.redacted(),
                a.exchange
            );
            return Ok(());
        }
        SinkConfig::Postgres(p) => {
            let target = p.url.resolve()?;
            let progress_name = format!("{slot_name}/{}", p.name);
            let applied = match sql::connect(&target).await {
                Ok(c) => {
                    if let Some(n) =
                        crate::sink::postgres::conflict::logged(&c, &progress_name).await
                    {
                        println!(
                            "conflicts {} (postgres {}): {n} resolved (walrelay.conflicts)",
                            p.name,
                            target.describe()
                        );
                    }
                    progress::recorded(&c, &progress_name).await?
                }
                Err(e) => {
                    println!(
                        "sink     {} (postgres {}): cannot connect: {e}",
                        p.name,
                        target.describe()
                    );
                    return Ok(());
                }
            };
            (format!("postgres {}", target.describe()), applied)
        }
    };
    let name = sink.name();
    match applied {
        None => println!(
            "sink     {name} ({kind}): nothing applied yet; lag {}",
            bytes(current.bytes_since(confirmed))
        ),
        Some((lsn, commit_time)) => {
            let effective = lsn.max(confirmed);
            let caught_up = current <= effective || (streaming && lsn >= confirmed);
            let seconds = if caught_up {
                "0 s".to_string()
            } else {
                commit_time
                    .as_deref()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| {
                        format!(
                            "{:.1} s",
                            (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds()
                                as f64
                                / 1000.0
                        )
                    })
                    .unwrap_or_else(|| "unknown s".into())
            };
            println!(
                "sink     {name} ({kind}): applied {lsn}{}; lag {}, {seconds}",
                commit_time
                    .map(|t| format!(" (source commit {t})"))
                    .unwrap_or_default(),
                bytes(current.bytes_since(effective)),
            );
        }
    }
    Ok(())
}

/// Each set: its tables as the source has them now (with where each goes and how it is
/// shaped), its sequences, and the sinks that take it.
async fn print_sets(config: &Config, client: &tokio_postgres::Client) {
    let plan = match crate::sets::Plan::resolve(client, &config.sets()).await {
        Ok((plan, _)) => plan,
        Err(e) => {
            println!("sets     cannot be resolved on the source: {e}");
            return;
        }
    };
    for set in &plan.sets {
        let only = std::slice::from_ref(set);
        let tables: Vec<String> = plan
            .tables_of(Some(only))
            .map(|t| {
                let mut shown = t.shown();
                if t.source != t.target {
                    let target = walrelay_model::QualifiedName {
                        schema: &t.target.0,
                        name: &t.target.1,
                    };
                    shown.push_str(&format!(" -> {target}"));
                }
                let mut notes = Vec::new();
                if t.filter.is_some() {
                    notes.push("filtered");
                }
                if !t.keeps_columns() {
                    notes.push("columns shaped");
                }
                if !notes.is_empty() {
                    shown.push_str(&format!(" ({})", notes.join(", ")));
                }
                shown
            })
            .collect();
        let sinks: Vec<&str> = config
            .sinks
            .iter()
            .filter(|k| k.sets().is_none_or(|s| s.contains(set)))
            .map(|k| k.name())
            .collect();
        println!(
            "set      {set}: {} table(s): {}; {} sequence(s); sinks: {}",
            tables.len(),
            tables.join(", "),
            plan.sequences_of(Some(only)).len(),
            if sinks.is_empty() {
                "none".to_string()
            } else {
                sinks.join(", ")
            }
        );
    }
}

/// The end of the last event in a JSONL file, with its commit time.
fn jsonl_position(path: &str) -> Option<(Lsn, Option<String>)> {
    let last = crate::sink::jsonl::last_line_of(path).ok()??;
    let v: serde_json::Value = serde_json::from_slice(&last).ok()?;
    let end = v["end_lsn"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| line_position(&last).map(|p| p.commit_lsn))?;
    Some((end, v["commit_time"].as_str().map(str::to_string)))
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} kB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
