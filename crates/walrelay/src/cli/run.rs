//! `walrelay run`: the relay, until a signal.

use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline;
use crate::task::spawn_named;

pub async fn run(config: &Config) -> anyhow::Result<ExitCode> {
    let cancel = cancel_on_signal()?;
    pipeline::run(config, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled at the first SIGINT or SIGTERM; a second one exits at once (exit code
/// 130), for an operator who will not wait for the sinks to flush. Nothing is lost either
/// way: what was not confirmed is sent again.
pub fn cancel_on_signal() -> std::io::Result<CancellationToken> {
    let cancel = CancellationToken::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let on_signal = cancel.clone();
    spawn_named("signals", async move {
        tokio::select! {
            _ = sigint.recv() => tracing::info!("SIGINT: stopping (again to exit at once)"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: stopping (again to exit at once)"),
        }
        on_signal.cancel();
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        tracing::warn!("second signal: exiting now, without waiting for the sinks");
        std::process::exit(130);
    });
    Ok(cancel)
}
