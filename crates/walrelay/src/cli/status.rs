//! `walrelay status`: where the slot and each sink stand, and how far behind the source.
//!
//! A sink's lag in bytes is the source WAL after the later of its own position and the
//! slot's confirmed position (everything before that is durable in every sink). Its lag in
//! seconds is 0 when it is caught up (nothing after its position, or walrelay is streaming
//! and the sink holds all the slot confirmed), and otherwise the age of the last source
//! commit it holds.

use std::process::ExitCode;

use walrelay_model::Lsn;

use crate::config::{Config, SinkConfig};
use crate::format::json::line_position;
use crate::pg::sql;
use crate::sink::postgres::progress;
use crate::source::pgoutput::setup;

pub async fn status(config: &Config) -> anyhow::Result<ExitCode> {
    let info = crate::pg::locate::locate(&config.source.url.resolve()?).await?;
    let client = sql::connect(&info).await?;
    let current: Lsn = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get::<_, String>(0)
        .parse()?;
    println!("source   {}; current WAL {current}", info.describe());
    let slot_name = &config.source.slot;
    let slot = setup::slot_info(&client, slot_name).await?;
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
    print_sets(config, &client).await;
    match crate::migrate::describe(config).await {
        Ok(Some(text)) => println!("{text}"),
        Ok(None) => {}
        Err(e) => println!("migration: cannot read its record: {e}"),
    }
    for sink in &config.sinks {
        let (kind, applied) = match sink {
            SinkConfig::Jsonl(j) if j.path == "-" => {
                println!(
                    "sink     {} (jsonl, standard output): no position kept",
                    j.name
                );
                continue;
            }
            SinkConfig::Jsonl(j) => (format!("jsonl {}", j.path), jsonl_position(&j.path)),
            SinkConfig::Amqp(a) => {
                println!(
                    "sink     {} (amqp {}, exchange {}): confirmed up to the slot's position",
                    a.name,
                    a.url.redacted(),
                    a.exchange
                );
                continue;
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
                        continue;
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
                let streaming = slot.as_ref().is_some_and(|s| s.active_pid.is_some());
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
                                (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                                    .num_milliseconds() as f64
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
    }
    Ok(ExitCode::SUCCESS)
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
