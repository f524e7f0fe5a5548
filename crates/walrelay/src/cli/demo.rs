//! `walrelay demo`: two throwaway PostgreSQL servers; the source gets pgbench-like data and
//! a write load; walrelay creates the tables on the target, copies the existing rows and
//! streams the rest; at the end the target must equal the source, table by table. Needs
//! nothing but the PostgreSQL server binaries; cleans up after itself.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{
    Config, ConnString, OnConflict, PostgresSinkConfig, SinkConfig, SnapshotConfig, SourceConfig,
    TablePattern,
};
use crate::pg::local::{pick_free_port, LocalServer, LocalServerOptions, StopMode};
use crate::pg::{conninfo, sql};
use crate::pipeline;
use crate::task::spawn_named;

const TABLES: [&str; 4] = ["accounts", "branches", "tellers", "history"];

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the write load runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Accounts on the source before replication starts (100 bytes each, about).
    #[arg(long, default_value_t = 500_000)]
    pub accounts: u32,
    /// Keep the servers' directory (printed) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

/// Stops the demo servers and removes their directory, also when the demo fails.
struct Cleanup {
    servers: Vec<LocalServer>,
    dir: Option<tempfile::TempDir>,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mode = if self.keep {
            StopMode::Fast
        } else {
            StopMode::Immediate
        };
        for s in &self.servers {
            let _ = s.stop(mode);
        }
        if self.keep {
            if let Some(dir) = self.dir.take() {
                println!("kept: {}", dir.keep().display());
            }
        }
    }
}

async fn start_server(dir: &Path, name: &str) -> anyhow::Result<LocalServer> {
    let port = pick_free_port().context("finding a free port")?;
    let options = LocalServerOptions::new(dir.join(name), port)
        .setting("shared_buffers", "'256MB'")
        .setting("max_wal_size", "'2GB'");
    let server = tokio::task::spawn_blocking(move || -> anyhow::Result<LocalServer> {
        let server = LocalServer::init(options)?;
        server.start()?;
        Ok(server)
    })
    .await??;
    println!("started {name} server on 127.0.0.1:{port}");
    Ok(server)
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("walrelay-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    // The servers may run as another OS user (walrelay as root runs them as postgres).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    println!("demo directory {}", dir.path().display());
    let mut cleanup = Cleanup {
        servers: Vec::new(),
        dir: None,
        keep: args.keep,
    };
    let source_server = start_server(dir.path(), "source").await?;
    let target_server = start_server(dir.path(), "target").await?;
    let (source_url, target_url) = (source_server.url("postgres"), target_server.url("postgres"));
    cleanup.servers = vec![source_server, target_server];
    let spill = dir.path().join("spill");
    cleanup.dir = Some(dir);

    let source = connect(&source_url).await?;
    let target = connect(&target_url).await?;
    println!(
        "filling the source: {} accounts, pgbench style",
        args.accounts
    );
    fill(&source, args.accounts).await?;

    let config = demo_config(&source_url, &target_url, &spill);
    let cancel = CancellationToken::new();
    let relay = {
        let cancel = cancel.clone();
        spawn_named(
            "demo-relay",
            async move { pipeline::run(&config, cancel).await },
        )
    };
    println!("walrelay: create the tables on the target, copy them, stream the rest, while transfers run on the source");

    let load_stop = CancellationToken::new();
    let load = {
        let stop = load_stop.clone();
        let url = source_url.clone();
        let accounts = args.accounts;
        spawn_named(
            "demo-load",
            async move { transfers(&url, accounts, stop).await },
        )
    };
    // Poll often, so that a copy shorter than a second is still seen finishing; print the
    // copy's end once and the stream's lag every second.
    let started = Instant::now();
    let mut copy_done_shown = false;
    let mut next_line = Duration::from_secs(1);
    while started.elapsed() < args.duration && !relay.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let state = demo_state(&source, &target).await;
        let elapsed = started.elapsed();
        if let DemoState::Streaming { .. } = state {
            if !copy_done_shown {
                copy_done_shown = true;
                println!(
                    "{:>4.1}s  copy finished: {n} of {n} tables done",
                    elapsed.as_secs_f64(),
                    n = TABLES.len()
                );
            }
        }
        if elapsed >= next_line {
            next_line += Duration::from_secs(1);
            println!("{:>4.0}s  {state}", elapsed.as_secs_f64());
        }
    }
    load_stop.cancel();
    let transfers = load.await??;
    println!("load stopped after {transfers} transfers; waiting for the target to catch up");

    let deadline = Instant::now() + Duration::from_secs(300);
    let verdict = loop {
        if relay.is_finished() {
            break Err(anyhow::anyhow!("walrelay stopped early"));
        }
        match compare(&source, &target).await {
            Ok(summary) => break Ok(summary),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(e) => break Err(e),
        }
    };
    cancel.cancel();
    let relay_result = relay.await?;
    drop(source);
    drop(target);
    drop(cleanup);
    match (verdict, relay_result) {
        (Ok(summary), Ok(())) => {
            println!("verified: target = source: {summary}; {transfers} transfers replicated");
            Ok(ExitCode::SUCCESS)
        }
        (Err(e), Ok(())) => {
            println!("verification FAILED: {e}");
            Ok(ExitCode::FAILURE)
        }
        (_, Err(e)) => bail!("walrelay failed: {e}"),
    }
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let info = conninfo::resolve(url, &conninfo::ProcessEnv)?;
    Ok(sql::connect(&info).await?)
}

/// pgbench's tables, with its proportions: 100,000 accounts per branch, 10 tellers each.
async fn fill(source: &Client, accounts: u32) -> anyhow::Result<()> {
    let branches = (accounts / 100_000).max(1);
    source
        .batch_execute(&format!(
            "CREATE TABLE branches (bid int PRIMARY KEY, bbalance int NOT NULL, filler char(88));
             CREATE TABLE tellers (tid int PRIMARY KEY, bid int NOT NULL, tbalance int NOT NULL, filler char(84));
             CREATE TABLE accounts (aid int PRIMARY KEY, bid int NOT NULL, abalance int NOT NULL, filler char(84));
             CREATE TABLE history (hid bigserial PRIMARY KEY, tid int, bid int, aid int, delta int,
                                   mtime timestamptz NOT NULL DEFAULT now(), filler char(22));
             INSERT INTO branches SELECT g, 0 FROM generate_series(1, {branches}) g;
             INSERT INTO tellers SELECT g, (g - 1) / 10 + 1, 0 FROM generate_series(1, {tellers}) g;
             INSERT INTO accounts SELECT g, (g - 1) / 100000 + 1, 0, '' FROM generate_series(1, {accounts}) g;",
            tellers = branches * 10
        ))
        .await?;
    Ok(())
}

/// pgbench's TPC-B-like transfers until `stop`; returns how many committed.
async fn transfers(url: &str, accounts: u32, stop: CancellationToken) -> anyhow::Result<u64> {
    let c = connect(url).await?;
    let branches = (accounts / 100_000).max(1);
    let mut state = 42u64;
    let mut n = 0u64;
    while !stop.is_cancelled() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let aid = (state >> 33) as u32 % accounts + 1;
        let tid = (state >> 13) as u32 % (branches * 10) + 1;
        let bid = (tid - 1) / 10 + 1;
        let delta = (state >> 40) as i32 % 10000 - 5000;
        c.batch_execute(&format!(
            "BEGIN;
             UPDATE accounts SET abalance = abalance + {delta} WHERE aid = {aid};
             UPDATE tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};
             UPDATE branches SET bbalance = bbalance + {delta} WHERE bid = {bid};
             INSERT INTO history (tid, bid, aid, delta) VALUES ({tid}, {bid}, {aid}, {delta});
             COMMIT;"
        ))
        .await?;
        n += 1;
    }
    Ok(n)
}

fn demo_config(source_url: &str, target_url: &str, spill: &Path) -> Config {
    Config {
        ddl: Default::default(),
        source: SourceConfig {
            kind: Default::default(),
            capture: Default::default(),
            log_rotation: Duration::from_secs(10),
            url: ConnString(source_url.to_string()),
            slot: "walrelay_demo".into(),
            publication: "walrelay_demo".into(),
            tables: vec![TablePattern::parse("public.*").expect("valid pattern")],
            status_interval: Duration::from_secs(1),
            spill_dir: Some(spill.to_path_buf()),
            messages: true,
            wait_for_sync_standby: true,
            origin: Default::default(),
            key_ranges: None,
        },
        snapshot: SnapshotConfig::default(),
        sets: Vec::new(),
        sinks: vec![SinkConfig::Postgres(PostgresSinkConfig {
            name: "target".into(),
            sets: None,
            url: ConnString(target_url.to_string()),
            on_conflict: OnConflict::Error,
            on_conflict_tables: Default::default(),
            batch_transactions: 10_000,
            batch_bytes: 16 << 20,
            batch_delay: Duration::from_millis(200),
            protect: true,
        })],
    }
}

/// Where the copy and the stream stand.
enum DemoState {
    Preparing,
    Copying { done: usize },
    Streaming { lag_bytes: i64 },
}

impl std::fmt::Display for DemoState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DemoState::Preparing => write!(f, "preparing"),
            DemoState::Copying { done } => {
                write!(f, "copying: {done} of {} tables done", TABLES.len())
            }
            DemoState::Streaming { lag_bytes } => {
                write!(
                    f,
                    "streaming; the slot is {} kB behind the source",
                    lag_bytes / 1024
                )
            }
        }
    }
}

async fn demo_state(source: &Client, target: &Client) -> DemoState {
    let copied: Option<i64> = target
        .query_one(
            "SELECT count(*) FROM walrelay.copies WHERE state = 'done'",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get(0));
    let lag: Option<i64> = source
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
             FROM pg_replication_slots WHERE slot_name = 'walrelay_demo'",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.get(0));
    match (copied, lag) {
        (Some(n), Some(lag_bytes)) if n as usize == TABLES.len() => {
            DemoState::Streaming { lag_bytes }
        }
        (Some(n), _) => DemoState::Copying { done: n as usize },
        _ => DemoState::Preparing,
    }
}

/// Every table equal on both sides (row count and a hash of every row), or why not.
async fn compare(source: &Client, target: &Client) -> anyhow::Result<String> {
    let mut rows = 0i64;
    for t in TABLES {
        let q =
            format!("SELECT count(*), coalesce(sum(hashtext(x::text)::int8), 0)::int8 FROM {t} x");
        let s = source.query_one(&q, &[]).await?;
        let d = target.query_one(&q, &[]).await?;
        let (sc, ss): (i64, i64) = (s.get(0), s.get(1));
        let (dc, ds): (i64, i64) = (d.get(0), d.get(1));
        if (sc, ss) != (dc, ds) {
            bail!("{t}: source {sc} rows (hash {ss}), target {dc} rows (hash {ds})");
        }
        rows += sc;
    }
    Ok(format!(
        "{} tables, {rows} rows, every row equal",
        TABLES.len()
    ))
}
