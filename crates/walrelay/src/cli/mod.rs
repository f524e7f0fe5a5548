//! Commands of the `walrelay` binary.

pub mod check;
mod consume;
mod demo;
mod ha;
mod migrate;
mod run;
mod status;
mod uninstall;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "walrelay",
    version,
    about = "PostgreSQL replication and high availability"
)]
pub struct Cli {
    /// Log filter, as RUST_LOG takes it (e.g. `info`, `walrelay=debug`). RUST_LOG wins.
    /// Server notices (tokio_postgres) are quiet unless asked for.
    #[arg(long, global = true, default_value = "info,tokio_postgres=warn")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture changes from the source and deliver them to the sinks until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check that the source is ready for capture; print each problem with what to do.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show where the slot and each sink stand, and their lag in bytes and seconds.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Remove from the source what trigger capture installed there (triggers, functions,
    /// the schema walrelay_capture and its log), and nothing else.
    Uninstall {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Move the database to the target server: precheck, copy, catch up, verify, then
    /// wait for `cutover` (and `rollback`), running the stream in the right direction,
    /// until SIGINT/SIGTERM. Resumes where it stopped.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask the running `walrelay migrate` to switch writes to the target (stop writes on
    /// the source, drain, verify, sequences, reverse stream, target writable); print the
    /// write pause.
    Cutover {
        #[arg(long, short)]
        config: PathBuf,
        /// Give up waiting after this long (the migrate process carries on).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Ask the running `walrelay migrate` to switch writes back to the source after a
    /// cutover, with nothing written on the target lost.
    Rollback {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Compare every replicated table between the source and each postgres target while
    /// replication runs; name the rows that differ; `--repair` puts them right. Exit 0:
    /// equal, 1: differences, 2: could not compare everything.
    Verify(verify::VerifyArgs),
    /// Apply a RabbitMQ queue of walrelay events to a PostgreSQL target, exactly once,
    /// until SIGINT/SIGTERM.
    Consume {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the high-availability agent of one PostgreSQL node until SIGINT/SIGTERM:
    /// bootstrap or clone it, then lead or follow, with the leader lease in etcd.
    Ha {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The HA agent's fence (it starts one): stops the node's PostgreSQL once the agent's
    /// lease may be gone or the agent is. Not for direct use.
    #[command(name = "ha-fence", hide = true)]
    HaFence {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Look at and steer an HA cluster (needs the `[cluster]` section of a node's file).
    Ctl {
        #[arg(long, short)]
        config: PathBuf,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Start a throwaway PostgreSQL server, capture it under a write load, verify that every
    /// committed change arrived exactly once, and clean up.
    Demo(demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Members with host, role, state, timeline, lag, and whether each could be promoted.
    List,
    /// Hand the primary role to another member without losing a write.
    Switchover {
        /// The member to promote (default: the most advanced streaming replica).
        #[arg(long)]
        candidate: Option<String>,
    },
}

/// Logs go to standard error, so that `path = "-"` keeps standard output for events.
pub fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => run::run(&Config::load(&config)?).await,
        Command::Check { config } => check::check(&Config::load(&config)?).await,
        Command::Demo(args) => demo::demo(args).await,
        Command::Consume { config } => {
            consume::consume(&crate::config::ConsumeConfig::load(&config)?).await
        }
        Command::Ha { config } => ha::ha(crate::config::ha::HaConfig::load(&config)?).await,
        Command::HaFence { data_dir } => ha::fence(data_dir).await,
        Command::Ctl { config, command } => {
            let config = crate::config::ha::CtlConfig::load(&config)?;
            match command {
                CtlCommand::List => ha::list(&config).await,
                CtlCommand::Switchover { candidate } => ha::switchover(&config, candidate).await,
            }
        }
        Command::Verify(args) => verify::verify(args).await,
        Command::Migrate { config } => migrate::migrate(&Config::load(&config)?).await,
        Command::Cutover { config, timeout } => {
            migrate::switch(&Config::load(&config)?, true, timeout).await
        }
        Command::Rollback { config, timeout } => {
            migrate::switch(&Config::load(&config)?, false, timeout).await
        }
        Command::Status { config } => status::status(&Config::load(&config)?).await,
        Command::Uninstall { config } => uninstall::uninstall(&Config::load(&config)?).await,
    }
}
